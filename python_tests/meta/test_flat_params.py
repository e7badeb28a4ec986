"""Tests for treepool.FlatParams, the [P] layout of transference's parameter rows."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, vmap

from treepool import FlatParams


def mlp(sizes, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm([3, 4, 4])
        self.head = nn.Linear(48, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x))).flatten(-3)) * self.scale


def columns(fp, name):
    """The columns of parameter ``name`` in the [P] vector."""
    i = fp.names.index(name)
    return slice(fp.offsets[i], fp.offsets[i + 1])


def load(model, fp, row):
    """Copy a [P] row into the model's parameters (by hand, independent of FlatParams)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape, a, b in zip(fp.names, fp.shapes, fp.offsets, fp.offsets[1:]):
            params[name].copy_(row[a:b].view(shape))


def test_layout_follows_named_parameters():
    model = ConvNet()
    fp = FlatParams(model)
    named = list(model.named_parameters())
    assert fp.names == tuple(n for n, _ in named)
    assert fp.shapes == tuple(p.shape for _, p in named)
    assert fp.numels == tuple(p.numel() for _, p in named)
    assert fp.numel == sum(p.numel() for _, p in named) == len(fp)
    assert fp.offsets[0] == 0 and fp.offsets[-1] == fp.numel
    assert fp.dtype == torch.float32 and fp.device == torch.device("cpu")
    assert fp.buffer.shape == (fp.numel,) and fp.buffer.is_contiguous()
    assert not fp.buffer.requires_grad
    for name, p in named:
        assert torch.equal(fp.buffer[columns(fp, name)], p.detach().reshape(-1))
    # the buffer is a copy: the module is not rewired
    assert all(p.data_ptr() != fp.buffer.data_ptr() for _, p in named)
    assert repr(fp) == (f"FlatParams(numel={fp.numel}, num_params={len(named)}, "
                        "dtype=torch.float32, device=cpu)")


def test_unflatten_views_alias_the_buffer():
    model = mlp([3, 4, 2])
    fp = FlatParams(model)
    buf = fp.buffer.clone()
    views = fp.unflatten(buf)
    for name, v in views.items():
        assert v.shape == dict(model.named_parameters())[name].shape
        assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    x = torch.randn(5, 3)
    before = functional_call(model, views, (x,))
    torch.testing.assert_close(before, model(x))
    with torch.no_grad():
        buf[columns(fp, "2.bias")] += 1.0  # write the buffer ...
    after = functional_call(model, views, (x,))  # ... the same views see it
    torch.testing.assert_close(after, before + 1.0)
    views["0.weight"].zero_()  # and writing a view changes the buffer
    assert (buf[columns(fp, "0.weight")] == 0).all()
    # batched views alias an [N, P] buffer row by row
    batch = torch.randn(3, fp.numel)
    bviews = fp.unflatten(batch)
    assert bviews["0.weight"].shape == (3, 4, 3)
    batch[1, columns(fp, "0.weight")] = 7.0
    assert (bviews["0.weight"][1] == 7).all() and not (bviews["0.weight"][0] == 7).any()


@settings(deadline=None, max_examples=25)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), n=st.integers(1, 4),
       batch=st.integers(1, 3), seed=st.integers(0, 1000))
def test_rows_vmapped_through_unflatten_match_the_module(sizes, n, batch, seed):
    # what transference does: unflatten one row inside a vmap over [N, P] rows
    model = mlp(sizes, seed=seed, dtype=torch.float64)
    fp = FlatParams(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(functional_call(model, fp.unflatten(fp.buffer), (x,)), model(x))
    rows = fp.buffer + 0.1 * torch.randn(n, fp.numel, generator=gen, dtype=torch.float64)
    xs = torch.randn(n, batch, sizes[0], generator=gen, dtype=torch.float64)
    out = vmap(lambda row, xi: functional_call(model, fp.unflatten(row), (xi,)))(rows, xs)
    expected = []
    for i in range(n):
        load(model, fp, rows[i])
        expected.append(model(xs[i]))
    torch.testing.assert_close(out, torch.stack(expected))


def test_gradients_come_back_in_buffer_layout():
    model = ConvNet().double()
    fp = FlatParams(model)
    rows = (fp.buffer + 0.01 * torch.randn(3, fp.numel, dtype=torch.float64)).requires_grad_()
    xs = torch.randn(3, 2, 2, 4, 4, dtype=torch.float64)
    out = vmap(lambda row, xi: functional_call(model, fp.unflatten(row), (xi,)))(rows, xs)
    (grads,) = torch.autograd.grad(out.pow(2).sum(), rows)
    assert grads.shape == rows.shape
    for i in range(3):
        load(model, fp, rows[i].detach())
        model.zero_grad()
        model(xs[i]).pow(2).sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])
        torch.testing.assert_close(grads[i], expected)


def test_frozen_and_tied_parameters():
    model = mlp([3, 3, 3])
    model[0].bias.requires_grad_(False)
    model[2].weight = model[0].weight  # tied
    fp = FlatParams(model)
    assert fp.names == ("0.weight", "2.bias")
    x = torch.randn(2, 3)
    torch.testing.assert_close(functional_call(model, fp.unflatten(fp.buffer), (x,)), model(x))
    buf = fp.buffer.clone()
    buf[columns(fp, "0.weight")] = 0.0  # both uses of the tied weight see it
    torch.testing.assert_close(functional_call(model, fp.unflatten(buf), (x,)),
                               model[2].bias.expand(2, 3))


def test_buffers_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    msg = "module has buffers ['1.running_mean', '1.running_var', '1.num_batches_tracked']"
    with pytest.raises(ValueError, match=re.escape(msg)):
        FlatParams(model)
    # BatchNorm without running stats has no buffers
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert FlatParams(plain).names == ("0.weight", "0.bias", "1.weight", "1.bias")


def test_mixed_dtype_and_device_are_refused():
    model = mlp([3, 4, 2])
    model[2].double()
    with pytest.raises(TypeError, match=re.escape("'0.weight' is torch.float32 but '2.weight' is torch.float64")):
        FlatParams(model)
    model = mlp([3, 4, 2])
    model[2].to("meta")
    with pytest.raises(ValueError, match=re.escape("'0.weight' is on cpu but '2.weight' is on meta")):
        FlatParams(model)


def test_argument_errors():
    model = mlp([3, 4, 2])
    fp = FlatParams(model)
    with pytest.raises(ValueError, match=re.escape(f"buffer must have shape [P] or [N, P] with P = {fp.numel}")):
        fp.unflatten(torch.zeros(fp.numel + 1))
    with pytest.raises(ValueError, match=re.escape(f"buffer must have shape [P] or [N, P] with P = {fp.numel}")):
        fp.unflatten(torch.zeros(2, 2, fp.numel))
    with pytest.raises(ValueError, match="unit stride"):
        fp.unflatten(torch.zeros(fp.numel, 2).T)
    with pytest.raises(TypeError, match="buffer must be a tensor"):
        fp.unflatten(fp.buffer.tolist())
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams(nn.ReLU())
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        FlatParams(torch.zeros(3))
