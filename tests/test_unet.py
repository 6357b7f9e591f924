"""Tests of the segmentation UNet's layout, arithmetic and geometry."""

from __future__ import annotations

import pytest
import torch

from qpack.demo.unet import (
    INPUT_SIZE,
    UNet,
    crop_output,
    default_checkpoint_path,
    load_default,
    pad_input,
)

# (name, weight shape) in state_dict order; each also has a bias of shape (out_channels,).
LAYOUT = [
    ("encoder_list.0.conv_block.conv_stage.0.conv", (16, 1, 3, 3)),
    ("encoder_list.0.conv_block.conv_stage.1.conv", (16, 16, 3, 3)),
    ("encoder_list.1.conv_block.conv_stage.0.conv", (32, 16, 3, 3)),
    ("encoder_list.2.conv_block.conv_stage.0.conv", (64, 32, 3, 3)),
    ("decoder_list.0.conv_block.conv_stage.0.conv", (16, 48, 3, 3)),
    ("decoder_list.1.conv_block.conv_stage.0.conv", (32, 96, 3, 3)),
    ("decoder_list.2.conv_block.conv_stage.0.conv", (192, 192, 3, 3)),
    ("decoder_list.2.conv_block.conv_stage.1.conv", (64, 192, 3, 3)),
    ("bottleneck.conv_stage.0.conv", (128, 64, 3, 3)),
    ("refinement_stage.conv_stage.0.conv", (1, 16, 1, 1)),
]


def expected_state() -> dict[str, torch.Tensor]:
    state = {}
    gen = torch.Generator().manual_seed(0)
    for name, shape in LAYOUT:
        state[f"{name}.weight"] = torch.randn(shape, generator=gen)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=gen)
    return state


def convs(model: UNet) -> dict[str, torch.nn.Conv2d]:
    return {name: model.get_submodule(name) for name, _ in LAYOUT}


def test_state_dict_layout_loads_strictly() -> None:
    model = UNet()
    state = expected_state()
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_parameter_count() -> None:
    assert sum(p.numel() for p in UNet().parameters()) == 576_721


@pytest.mark.parametrize("n", [1, 3])
def test_output_shape(n: int) -> None:
    with torch.no_grad():
        out = UNet()(torch.randn(n, 1, INPUT_SIZE, INPUT_SIZE) * 0.05)
    assert out.shape == (n, 1, INPUT_SIZE, INPUT_SIZE)
    assert torch.isfinite(out).all()


def test_zero_weights_give_bias_driven_constant() -> None:
    # With zero weights each conv emits its bias; only decoder 0 and the 1x1 conv matter.
    model = UNet()
    with torch.no_grad():
        for conv in convs(model).values():
            conv.weight.zero_()
            conv.bias.zero_()
        convs(model)["decoder_list.0.conv_block.conv_stage.0.conv"].bias.fill_(-2.0)
        ref = convs(model)["refinement_stage.conv_stage.0.conv"]
        ref.weight.fill_(0.5)
        ref.bias.fill_(0.25)
        out = model(torch.randn(2, 1, INPUT_SIZE, INPUT_SIZE))
    # LeakyReLU(-2) = -0.02; 16 channels * 0.5 * -0.02 + 0.25 = 0.09
    torch.testing.assert_close(out, torch.full_like(out, 0.09), rtol=0, atol=1e-6)


@pytest.mark.parametrize("c", [0.7, -1.0])
def test_averaging_weights_on_constant_image(c: float) -> None:
    # Every conv averages its inputs (weights 1/fan_in, bias 0). A constant image stays
    # constant through replicate padding, striding and bilinear upsampling, so each layer
    # maps value v to leaky(mean of its input channels), computed here by hand.
    model = UNet()
    with torch.no_grad():
        for conv in convs(model).values():
            conv.weight.fill_(1.0 / conv.weight[0].numel())
            conv.bias.zero_()
        out = model(torch.full((1, 1, INPUT_SIZE, INPUT_SIZE), c))

    def leaky(v: float) -> float:
        return v if v >= 0 else 0.01 * v

    def mix(*parts: tuple[int, float]) -> float:  # (channels, value) pairs -> channel mean
        return sum(n * v for n, v in parts) / sum(n for n, _ in parts)

    skip0 = leaky(leaky(c))
    skip1 = leaky(skip0)
    skip2 = leaky(skip1)
    bott = leaky(skip2)
    d2 = leaky(leaky(mix((128, bott), (64, skip2))))
    d1 = leaky(mix((64, d2), (32, skip1)))
    d0 = leaky(mix((32, d1), (16, skip0)))
    expected = d0  # refinement: mean of 16 equal channels, no activation
    torch.testing.assert_close(out, torch.full_like(out, expected), rtol=1e-5, atol=0)


def test_pad_input_wraps_azimuth_and_replicates_edges() -> None:
    x = torch.arange(INPUT_SIZE * INPUT_SIZE, dtype=torch.float32).reshape(
        1, 1, INPUT_SIZE, INPUT_SIZE
    )
    p = pad_input(x)
    assert p.shape == (1, 1, 40, 112)
    off = 2 + INPUT_SIZE  # padded column of original column 0
    # The left neighbour of column 0 is column 35; the right neighbour of 35 is column 0.
    torch.testing.assert_close(p[..., 2:38, off - 1], x[..., :, 35])
    torch.testing.assert_close(p[..., 2:38, off + INPUT_SIZE], x[..., :, 0])
    # Three full copies side by side, then a 2 px replicate border.
    for k in range(3):
        start = 2 + k * INPUT_SIZE
        torch.testing.assert_close(p[..., 2:38, start : start + INPUT_SIZE], x)
    torch.testing.assert_close(p[..., 0, :], p[..., 2, :])
    torch.testing.assert_close(p[..., 39, :], p[..., 37, :])
    torch.testing.assert_close(p[..., :, 0], p[..., :, 2])
    torch.testing.assert_close(p[..., :, 111], p[..., :, 109])


def test_crop_returns_original_region() -> None:
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    assert torch.equal(crop_output(pad_input(x)), x)


def test_network_sees_across_the_azimuth_seam() -> None:
    torch.manual_seed(0)
    model = UNet().eval()
    x = (torch.randn(1, 1, INPUT_SIZE, INPUT_SIZE) * 0.05).requires_grad_(True)
    model(x)[0, 0, 18, 0].backward()
    grad = x.grad[0, 0, 18]
    assert grad[35].abs() > 0  # left neighbour across the seam
    assert grad[1].abs() > 0


@pytest.mark.skipif(not default_checkpoint_path().exists(), reason="no trained checkpoint yet")
def test_load_default_checkpoint() -> None:
    state = torch.load(default_checkpoint_path(), weights_only=True, map_location="cpu")
    assert all(v.dtype == torch.float32 for v in state.values())
    model = load_default()
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(4, 1, INPUT_SIZE, INPUT_SIZE) * 0.05)
    assert out.shape == (4, 1, INPUT_SIZE, INPUT_SIZE)
    assert torch.isfinite(out).all()
