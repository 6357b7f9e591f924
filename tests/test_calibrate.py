"""Tests of qpack.calibrate: each layer's Hessian is the statistic that predicts its output
change exactly (count * trace(dW H dW^T) = squared output change) for every layer kind,
stride, dilation, groups and padding mode; and the bookkeeping around the hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpack import calibrate
from qpack.calibrate import layer_statistics
from qpack.demo.synthetic import make_patches
from qpack.demo.unet import EDGE_PAD, load_default, pad_input

MODES = ["zeros", "reflect", "replicate", "circular"]


def batches(shape, count=3, seed=0) -> list[torch.Tensor]:
    """Random float32 inputs with a nonzero mean (so that padding values matter)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) + 0.5 for _ in range(count)]


def check_output_change(layer: nn.Module, inputs: list[torch.Tensor], seed: int = 1) -> None:
    """count * sum_g trace(dW_g H_g dW_g^T) equals the squared change of the layer's output
    (computed in float64) when its weight moves by a random dW."""
    stats = layer_statistics(layer, inputs)
    assert set(stats) == {"weight"}
    s = stats["weight"]
    cols = layer.weight[0].numel()
    groups = getattr(layer, "groups", 1)
    assert s.groups == groups
    assert s.hessian.dtype == np.float64 and s.hessian.shape == (groups, cols, cols)
    np.testing.assert_allclose(s.hessian, s.hessian.transpose(0, 2, 1), rtol=1e-6, atol=1e-9)

    gen = torch.Generator().manual_seed(seed)
    dw = torch.randn(layer.weight.shape, dtype=torch.float64, generator=gen)
    before = copy.deepcopy(layer).double()
    after = copy.deepcopy(before)
    change, rows = 0.0, 0
    with torch.no_grad():
        after.weight += dw
        for x in inputs:
            y = before(x.double())
            change += float(((after(x.double()) - y) ** 2).sum())
            rows += y.numel() // layer.weight.shape[0]  # one row per sample and position
    assert s.count == rows
    d = dw.reshape(groups, -1, cols).numpy()
    predicted = s.count * np.einsum("grc,gcd,grd->", d, s.hessian, d)
    np.testing.assert_allclose(predicted, change, rtol=1e-5)


def test_linear_on_3d_input():
    check_output_change(nn.Linear(7, 5), batches((4, 3, 7)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv1d(mode, stride):
    conv = nn.Conv1d(4, 6, 3, stride=stride, dilation=2, groups=2, padding=2, padding_mode=mode)
    check_output_change(conv, batches((3, 4, 17)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, (2, 1), 3])
def test_conv2d(mode, stride):
    conv = nn.Conv2d(
        6, 9, (3, 2), stride=stride, dilation=(2, 1), groups=3, padding=(2, 1), padding_mode=mode
    )
    check_output_change(conv, batches((2, 6, 9, 8)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, (1, 2, 2)])
def test_conv3d(mode, stride):
    conv = nn.Conv3d(
        4, 4, 3, stride=stride, dilation=(1, 2, 1), groups=2, padding=1, padding_mode=mode
    )
    check_output_change(conv, batches((2, 4, 5, 6, 5)))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_same_padding_with_even_kernel():
    # torch pads the odd pixel of an even kernel's padding on the high side
    conv = nn.Conv2d(3, 4, (4, 2), padding="same", dilation=(1, 3))
    check_output_change(conv, batches((2, 3, 7, 8)))


def test_conv_valid_padding_unbatched_input_and_1x1():
    check_output_change(nn.Conv2d(3, 4, 3, padding="valid"), batches((3, 7, 8)))
    check_output_change(nn.Conv2d(5, 2, 1), batches((2, 5, 4, 6)))
    check_output_change(nn.Conv1d(6, 6, 5, groups=6, padding=2), batches((2, 6, 11)))


def test_lazy_modules():
    """Lazy layers get their shapes (and their Hessian's) at the first call."""
    check_output_change(nn.LazyLinear(3), batches((4, 5, 6)))
    check_output_change(nn.LazyConv2d(4, 3, padding=1), batches((2, 3, 6, 5)))


@pytest.mark.parametrize("stride", [1, 2])
def test_chunking_gives_the_same_statistics(monkeypatch, stride):
    """Bounding memory (a few samples at a time; whole samples too big for the shifted sums
    going by im2col; im2col a few output lines at a time) changes nothing but round-off."""
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, padding_mode="reflect", groups=2)
    inputs = batches((5, 4, 9, 7))
    whole = layer_statistics(conv, inputs)["weight"]
    per_sample = 3 * 4 * 11 * 9  # what the shifted sums hold per sample
    for chunk in (per_sample, per_sample - 1, 40):
        monkeypatch.setattr(calibrate, "CHUNK_ELEMENTS", chunk)
        part = layer_statistics(conv, inputs)["weight"]
        assert part.count == whole.count
        np.testing.assert_allclose(part.hessian, whole.hessian, rtol=1e-5, atol=1e-6)
    check_output_change(conv, inputs)  # still at the smallest chunk


def test_unet_has_one_entry_per_conv():
    model = load_default()
    x = torch.from_numpy(make_patches(3, 5)[0])
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    checked = [
        "encoder_list.0.conv_block.conv_stage.0.conv",
        "decoder_list.0.conv_block.conv_stage.0.conv",
    ]
    seen = {name: [] for name in checked}
    for name in checked:
        convs[name].register_forward_hook(
            lambda m, args, out, name=name: seen[name].append(args[0])
        )
    stats = layer_statistics(model, [x])
    assert set(stats) == {f"{n}.weight" for n in convs}
    for name, conv in convs.items():
        s = stats[f"{name}.weight"]
        cols = conv.weight[0].numel()
        assert s.groups == 1 and s.hessian.shape == (1, cols, cols)
    first = stats[f"{checked[0]}.weight"]
    wide = 36 + 2 * EDGE_PAD
    assert first.count == 3 * wide * (3 * 36 + 2 * EDGE_PAD)  # 40 x 112 positions each
    assert stats["bottleneck.conv_stage.0.conv.weight"].count == 3 * (wide // 8) * (112 // 8)
    # independently: im2col of what the layers saw, replicate-padded
    for name in checked:
        inputs = F.pad(torch.cat(seen[name]), (1, 1, 1, 1), mode="replicate").double()
        patches = F.unfold(inputs, 3).transpose(1, 2).reshape(-1, convs[name].weight[0].numel())
        expected = (patches.T @ patches / patches.shape[0]).numpy()
        got = stats[f"{name}.weight"].hessian[0]
        # float32 products: errors relative to the largest entry, not to each
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # the input of the first layer is the wrapped patch
    np.testing.assert_array_equal(torch.cat(seen[checked[0]]), pad_input(x))


class TwoInputs(nn.Module):
    """A Linear called twice, another sharing its weight, and layers that are not hooked."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.tied = nn.Linear(4, 3)
        self.tied.weight = self.lin.weight
        self.unused = nn.Linear(4, 3)
        self.up = nn.ConvTranspose1d(1, 1, 2)
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.up(a[:, None, :])
        self.norm(a)
        return self.lin(a).sum() + self.lin(b).sum() + self.tied(a + self.embed.weight[0]).sum()


def test_calls_shared_weights_and_skipped_layers():
    model = TwoInputs()
    a, b = batches((6, 4), count=2)
    tied_input = a + model.embed.weight[0].detach()
    a, b, tied_input = a.double(), b.double(), tied_input.double()
    expected = (a.T @ a + b.T @ b + tied_input.T @ tied_input) / 18
    a, b = a.float(), b.float()
    for item in ((a, b), [a, b], {"a": a, "b": b}):
        stats = layer_statistics(model, [item])
        # one entry, under the weight's first name: both Linears, all three calls
        assert set(stats) == {"lin.weight"}
        assert stats["lin.weight"].count == 18
        # float32 products summed in float64: a float32 rounding per product
        np.testing.assert_allclose(stats["lin.weight"].hessian[0], expected.numpy(), rtol=1e-5)


def test_restores_modes_and_removes_hooks():
    model = TwoInputs()
    model.train()
    model.norm.eval()
    seen = []

    def spy(module, args, output):
        seen.append(module.training)

    model.norm.register_forward_hook(spy)
    messages = []
    inputs = [batches((6, 4), count=2) for _ in range(3)]
    layer_statistics(model, inputs, progress=messages.append)
    assert seen == [False] * 3  # ran in eval mode
    assert model.training and model.lin.training and not model.norm.training
    assert len(messages) == 3
    assert all(not m._forward_hooks for m in (model.lin, model.tied, model.unused))


def test_restores_modes_when_the_model_fails():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2))  # shapes do not chain
    model.train()
    with pytest.raises(RuntimeError):
        layer_statistics(model, [torch.zeros(2, 4)])
    assert model.training and not model[0]._forward_hooks


def _mean_outer(rows: torch.Tensor) -> np.ndarray:
    rows = rows.reshape(-1, rows.shape[-1]).double()
    return (rows.T @ rows / rows.shape[0]).numpy()


@pytest.mark.parametrize("kind", [torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN])
def test_recurrent_weights_see_their_inputs_and_previous_states(kind):
    """weight_ih_l{k} multiplies layer k's input at every step and weight_hh_l{k} the
    hidden state before every step, in each direction: checked against torch's own
    one-layer bidirectional module for layer 0's outputs."""
    torch.manual_seed(5)
    model = kind(5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(3, 6, 5)
    stats = layer_statistics(model, [x])
    first = kind(5, 7, num_layers=1, bidirectional=True, batch_first=True).eval()
    with torch.no_grad():
        for name, param in first.named_parameters():
            param.copy_(getattr(model, name))
        out = first(x)[0]  # (batch, steps, 2 * hidden): layer 1's input
    forward, backward = out[..., :7], out[..., 7:]
    zeros = torch.zeros(3, 1, 7)
    expected = {
        "weight_ih_l0": _mean_outer(x),
        "weight_ih_l0_reverse": _mean_outer(x),
        "weight_hh_l0": _mean_outer(torch.cat([zeros, forward[:, :-1]], dim=1)),
        "weight_hh_l0_reverse": _mean_outer(torch.cat([backward[:, 1:], zeros], dim=1)),
        "weight_ih_l1": _mean_outer(out),
    }
    for name, want in expected.items():
        assert stats[name].count == 18
        np.testing.assert_allclose(stats[name].hessian[0], want, rtol=1e-4, atol=1e-6)
    assert "weight_hh_l1_reverse" in stats and "bias_ih_l0" not in stats


def test_packed_sequences_and_projections_are_left_to_nearest_rounding():
    lstm = torch.nn.LSTM(4, 6, proj_size=3).eval()
    assert layer_statistics(lstm, [torch.randn(5, 2, 4)]) == {}
    gru = torch.nn.GRU(4, 6).eval()

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = gru

        def forward(self, x):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3], enforce_sorted=True)
            return self.gru(packed)[1]

    assert layer_statistics(Packed(), [torch.randn(5, 2, 4)]) == {}
