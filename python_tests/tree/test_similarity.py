"""Tests for treepool.tree.similarity (chunked pairwise cosine similarity)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treepool.tree.similarity import cosine_similarity_matrix, gram_matrix


def naive_cosine(a):
    a = a.double()
    return torch.nn.functional.cosine_similarity(a[:, None, :], a[None, :, :], dim=-1, eps=1e-300)


@settings(deadline=None)
@given(t=st.integers(1, 12), p=st.integers(1, 40), chunk=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_matches_naive_for_any_chunk_size(t, p, chunk, seed):
    g = torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sim = cosine_similarity_matrix(g, chunk_size=chunk)
    assert sim.shape == (t, t) and sim.dtype == torch.float64
    expected = naive_cosine(g)
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(sim, expected, atol=1e-12, rtol=0)
    assert torch.equal(sim, sim.T)


def test_chunking_does_not_change_the_result():
    g = torch.randn(9, 1000, generator=torch.Generator().manual_seed(0))
    full = cosine_similarity_matrix(g, chunk_size=1000)
    for chunk in (1, 7, 128, 999, 5000):
        torch.testing.assert_close(cosine_similarity_matrix(g, chunk_size=chunk), full, atol=1e-6, rtol=0)
    assert full.dtype == torch.float32


def test_zero_rows_give_no_nan():
    g = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    g[1] = 0
    g[3] = 0
    sim = cosine_similarity_matrix(g, chunk_size=5)
    assert torch.isfinite(sim).all()
    assert torch.equal(sim.diagonal(), torch.ones(5))
    off = ~torch.eye(5, dtype=torch.bool)
    assert (sim[1][off[1]] == 0).all() and (sim[:, 3][off[:, 3]] == 0).all()


def test_all_zero_and_tiny_and_half_inputs():
    assert torch.equal(cosine_similarity_matrix(torch.zeros(3, 4)), torch.eye(3))
    tiny = torch.tensor([[1e-30, 0.0], [2e-30, 0.0], [0.0, 1e-30]])
    sim = cosine_similarity_matrix(tiny)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    # float32 rows whose squares would underflow or overflow
    extreme = torch.tensor([[1e-30, 1e-30], [3e25, 3e25], [-1e-25, 1e-25]])
    torch.testing.assert_close(cosine_similarity_matrix(extreme),
                               torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(gram_matrix(extreme.double() * 1e-5)[1, 1], torch.tensor(2 * 9e40, dtype=torch.float64))
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    sim16 = cosine_similarity_matrix(h.to(torch.bfloat16), chunk_size=10)
    assert sim16.dtype == torch.float32
    torch.testing.assert_close(sim16, cosine_similarity_matrix(h), atol=2e-2, rtol=0)


def test_range_symmetry_and_scale_invariance():
    g = torch.randn(6, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sim = cosine_similarity_matrix(g, chunk_size=8)
    assert sim.min() >= -1 and sim.max() <= 1
    scaled = g * torch.tensor([1e-3, 1.0, 7.0, 1e3, 2.0, 0.5], dtype=torch.float64)[:, None]
    torch.testing.assert_close(cosine_similarity_matrix(scaled), sim, atol=1e-12, rtol=0)
    # opposite and identical directions
    pair = torch.stack([g[0], -2 * g[0], 3 * g[0]])
    torch.testing.assert_close(cosine_similarity_matrix(pair),
                               torch.tensor([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float64))


def test_gram_matrix():
    a = torch.randn(4, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(gram_matrix(a, chunk_size=4), a @ a.T)


def test_grads_requiring_grad_are_accepted():
    g = torch.randn(3, 5, requires_grad=True)
    sim = cosine_similarity_matrix(g)
    assert not sim.requires_grad


@pytest.mark.parametrize("bad, exc, msg", [
    (torch.zeros(3), ValueError, "grads must be a 2-D"),
    (torch.zeros(2, 3, dtype=torch.int64), TypeError, "floating dtype"),
    ([[1.0, 2.0]], TypeError, "grads must be a torch.Tensor"),
    (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), ValueError, "non-finite"),
    (torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), ValueError, "non-finite"),
])
def test_invalid_inputs(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        cosine_similarity_matrix(bad)


def test_invalid_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        cosine_similarity_matrix(torch.ones(2, 3), chunk_size=0)
