"""Tests for treepool.FlatParams."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

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


def test_layout_follows_named_parameters():
    model = ConvNet()
    fp = FlatParams(model)
    named = list(model.named_parameters())
    assert fp.names == tuple(n for n, _ in named)
    assert fp.shapes == tuple(p.shape for _, p in named)
    assert fp.numel == sum(p.numel() for _, p in named) == len(fp)
    assert fp.offsets[0] == 0 and fp.offsets[-1] == fp.numel
    assert fp.dtype == torch.float32 and fp.device == torch.device("cpu")
    assert fp.buffer.shape == (fp.numel,) and fp.buffer.is_contiguous()
    for name, p in named:
        assert torch.equal(fp.buffer[fp.slice(name)], p.detach().reshape(-1))
    # the buffer is a copy: the module is not rewired
    assert all(p.data_ptr() != fp.buffer.data_ptr() for _, p in named)


def test_unflatten_views_alias_the_buffer():
    model = mlp([3, 4, 2])
    fp = FlatParams(model)
    buf = fp.flatten(model)
    views = fp.unflatten(buf)
    for name, v in views.items():
        assert v.shape == dict(model.named_parameters())[name].shape
        assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    x = torch.randn(5, 3)
    before = functional_call(model, views, (x,))
    torch.testing.assert_close(before, model(x))
    with torch.no_grad():
        buf[fp.slice("2.bias")] += 1.0  # write the buffer ...
    after = functional_call(model, views, (x,))  # ... the same views see it
    torch.testing.assert_close(after, before + 1.0)
    views["0.weight"].zero_()  # and writing a view changes the buffer
    assert (buf[fp.slice("0.weight")] == 0).all()
    # batched views alias an [N, P] buffer row by row
    batch = torch.randn(3, fp.numel)
    bviews = fp.unflatten(batch)
    assert bviews["0.weight"].shape == (3, 4, 3)
    batch[1, fp.slice("0.weight")] = 7.0
    assert (bviews["0.weight"][1] == 7).all() and not (bviews["0.weight"][0] == 7).any()


@settings(deadline=None, max_examples=25)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), n=st.integers(1, 4),
       batch=st.integers(1, 3), seed=st.integers(0, 1000))
def test_functional_and_batched_calls_match_the_module(sizes, n, batch, seed):
    model = mlp(sizes, seed=seed, dtype=torch.float64)
    fp = FlatParams(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fp.functional_call(model, fp.buffer, x), model(x))
    torch.testing.assert_close(functional_call(model, fp.unflatten(fp.flatten(model)), (x,)), model(x))
    rows = fp.buffer + 0.1 * torch.randn(n, fp.numel, generator=gen, dtype=torch.float64)
    xs = torch.randn(n, batch, sizes[0], generator=gen, dtype=torch.float64)
    out = fp.batched_call(model, rows, xs)
    expected = []
    for i in range(n):
        fp.load_into(model, rows[i])
        expected.append(model(xs[i]))
    torch.testing.assert_close(out, torch.stack(expected))
    shared = fp.batched_call(model, rows, x, in_dims=None)
    torch.testing.assert_close(shared, torch.stack([fp.functional_call(model, r, x) for r in rows]))


def test_gradients_come_back_in_buffer_layout():
    model = ConvNet().double()
    fp = FlatParams(model)
    rows = (fp.buffer + 0.01 * torch.randn(3, fp.numel, dtype=torch.float64)).requires_grad_()
    xs = torch.randn(3, 2, 2, 4, 4, dtype=torch.float64)
    out = fp.batched_call(model, rows, xs)
    (grads,) = torch.autograd.grad(out.pow(2).sum(), rows)
    assert grads.shape == rows.shape
    for i in range(3):
        fp.load_into(model, rows[i].detach())
        model.zero_grad()
        model(xs[i]).pow(2).sum().backward()
        torch.testing.assert_close(grads[i], fp.grads(model))


def test_flatten_and_load_into_round_trip():
    model = ConvNet()
    fp = FlatParams(model)
    new = torch.randn(fp.numel)
    fp.load_into(model, new)
    assert torch.equal(fp.flatten(model), new)
    assert torch.equal(fp.flatten(fp.unflatten(new)), new)
    batch = torch.randn(4, fp.numel)
    assert torch.equal(fp.flatten(fp.unflatten(batch)), batch)
    assert torch.equal(fp.flatten(dict(model.named_parameters())), new)
    model.zero_grad(set_to_none=True)
    assert torch.equal(fp.grads(model), torch.zeros(fp.numel))


def test_frozen_and_tied_parameters():
    model = mlp([3, 3, 3])
    model[0].bias.requires_grad_(False)
    model[2].weight = model[0].weight  # tied
    fp = FlatParams(model)
    assert fp.names == ("0.weight", "2.bias")
    x = torch.randn(2, 3)
    torch.testing.assert_close(fp.functional_call(model, fp.buffer, x), model(x))
    buf = fp.buffer.clone()
    buf[fp.slice("0.weight")] = 0.0  # both uses of the tied weight see it
    torch.testing.assert_close(fp.functional_call(model, buf, x), model[2].bias.expand(2, 3))


def test_buffers_are_refused_or_shared():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    msg = "module has buffers ['1.running_mean', '1.running_var', '1.num_batches_tracked']"
    with pytest.raises(ValueError, match=re.escape(msg)):
        FlatParams(model)
    fp = FlatParams(model, buffers="share")
    assert fp.buffer_names == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    rows = fp.buffer.expand(2, -1).clone()
    xs = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="'1' \\(BatchNorm1d\\) is in training mode"):
        fp.batched_call(model, rows, xs)
    model.eval()
    out = fp.batched_call(model, rows, xs)
    torch.testing.assert_close(out[0], model(xs[0]))
    # BatchNorm without running stats has no buffers and works in training mode
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    fp2 = FlatParams(plain)
    torch.testing.assert_close(fp2.batched_call(plain, fp2.buffer.expand(2, -1).clone(), xs)[1], plain(xs[1]))


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
    with pytest.raises(ValueError, match="unit stride"):
        fp.unflatten(torch.zeros(fp.numel, 2).T)
    with pytest.raises(ValueError, match="use batched_call"):
        fp.functional_call(model, torch.zeros(2, fp.numel), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="use functional_call"):
        fp.batched_call(model, torch.zeros(fp.numel), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="does not match this FlatParams layout"):
        fp.functional_call(mlp([3, 5, 2]), fp.buffer, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=re.escape("params is missing parameter(s) ['2.bias']")):
        fp.flatten({k: v for k, v in model.named_parameters() if k != "2.bias"})
    with pytest.raises(ValueError, match=re.escape("params['0.bias'] has shape (5,), expected (4,)")):
        fp.flatten(dict(dict(model.named_parameters()), **{"0.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams(nn.ReLU())
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        FlatParams(torch.zeros(3))
    with pytest.raises(ValueError, match="buffers must be 'refuse' or 'share'"):
        FlatParams(model, buffers="copy")
    with pytest.raises(ValueError, match="in_dims has 2 entries but 1 args"):
        fp.batched_call(model, torch.zeros(2, fp.numel), torch.zeros(2, 1, 3), in_dims=(0, 0))
