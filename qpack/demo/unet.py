"""A small segmentation UNet for unrolled borehole-wall patches.

The network takes a 36x36 patch (rows = depth, columns = azimuth) and returns per-pixel logits
of the same size. Because the azimuth is circular, the patch is wrapped by a full width on each
side before the convolutions and the centre is cropped back out at the end, so a groove that
crosses the left/right edge is seen as one continuous structure.

Its ~577k parameters make it the reference model that qpack's quantization is exercised on;
:func:`load_default` returns a copy trained on :mod:`qpack.demo.synthetic` data.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INPUT_SIZE",
    "UNet",
    "crop_output",
    "default_checkpoint_path",
    "load_default",
    "is_unet_state_dict",
    "make_evaluator",
    "pad_input",
]

INPUT_SIZE = 36
#: Replicate-padding added on every side after the circular wrap; it makes the padded
#: 40x112 image divisible by 8 for the three stride-2 downsamplings.
EDGE_PAD = 2
NEG_SLOPE = 0.01


def pad_input(x: torch.Tensor) -> torch.Tensor:
    """Wrap ``x`` [N, C, H, W] circularly by W columns per side, then replicate-pad 2 px.

    A 36x36 patch becomes 40x112.
    """
    width = x.shape[-1]
    x = torch.cat([x[..., -width:], x, x[..., :width]], dim=-1)
    return F.pad(x, (EDGE_PAD, EDGE_PAD, EDGE_PAD, EDGE_PAD), mode="replicate")


def crop_output(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Inverse of :func:`pad_input`: take the original ``size`` x ``size`` region back out."""
    col = EDGE_PAD + size
    return x[..., EDGE_PAD : EDGE_PAD + size, col : col + size]


class ConvLayer(nn.Module):
    """A conv (replicate padding for 3x3) with an optional LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, activate: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            padding=kernel_size // 2,
            padding_mode="replicate",
            bias=True,
        )
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, NEG_SLOPE) if self.activate else x


class ConvBlock(nn.Module):
    """A chain of conv layers; ``channels`` lists in, then each layer's out channels."""

    def __init__(self, channels: list[int], kernel_size: int = 3, activate: bool = True):
        super().__init__()
        self.conv_stage = nn.Sequential(
            *(
                ConvLayer(c_in, c_out, kernel_size, activate)
                for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_stage(x)


class Encoder(nn.Module):
    """Convs at one resolution; returns (downsampled output, skip)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.conv_block = ConvBlock(channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv_block(x)
        return skip[..., ::2, ::2], skip


class Decoder(nn.Module):
    """Bilinear x2 upsampling, concat with the skip, then convs."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.conv_block = ConvBlock(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv_block(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """Three-level UNet, 1 input channel -> 1 logit channel, on 36x36 patches."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_list = nn.ModuleList(
            [Encoder([1, 16, 16]), Encoder([16, 32]), Encoder([32, 64])]
        )
        # decoder i takes the upsampled output of level i+1 plus the level-i skip.
        self.decoder_list = nn.ModuleList(
            [Decoder([32 + 16, 16]), Decoder([64 + 32, 32]), Decoder([128 + 64, 192, 64])]
        )
        self.bottleneck = ConvBlock([64, 128])
        self.refinement_stage = ConvBlock([16, 1], kernel_size=1, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [N, 1, 36, 36] patches to [N, 1, 36, 36] logits."""
        x = pad_input(x)
        skips = []
        for encoder in self.encoder_list:
            x, skip = encoder(x)
            skips.append(skip)
        x = self.bottleneck(x)
        for decoder, skip in zip(reversed(self.decoder_list), reversed(skips), strict=True):
            x = decoder(x, skip)
        return self.refinement_stage(crop_output(x))


def default_checkpoint_path() -> Path:
    """Path of the embedded trained checkpoint (``qpack/demo/data/unet_default.pt``)."""
    return Path(__file__).resolve().parent / "data" / "unet_default.pt"


def load_default(device: str | torch.device = "cpu") -> UNet:
    """Build a :class:`UNet`, load the embedded trained weights strictly, and set eval mode."""
    state = torch.load(default_checkpoint_path(), weights_only=True, map_location="cpu")
    model = UNet()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def make_evaluator(state_dict: dict[str, torch.Tensor], inputs, batch_size: int = 64):
    """A distortion measure for :func:`qpack.allocate`: the mean squared difference of the
    UNet's output probabilities on ``inputs`` ([N, 1, 36, 36]) between the float model and
    the model with some tensors replaced by their dequantized values.

    Squared differences add up across layers far better than absolute ones, which is what the
    allocator assumes; the demo still reports mean |probability difference|.
    """
    import numpy as np

    model = UNet()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    params = dict(model.named_parameters())

    def probabilities() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.sigmoid(model(b)) for b in x.split(batch_size)])

    reference = probabilities()

    def evaluate(replaced) -> float:
        saved = {}
        with torch.no_grad():
            for name, value in replaced.items():
                saved[name] = params[name].detach().clone()
                params[name].copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))
            try:
                return float(((probabilities() - reference) ** 2).mean())
            finally:
                for name, value in saved.items():
                    params[name].copy_(value)

    return evaluate


def is_unet_state_dict(state_dict) -> bool:
    """Whether a state_dict has exactly the names and shapes of :class:`UNet`."""
    expected = {k: tuple(v.shape) for k, v in UNet().state_dict().items()}
    try:
        got = {k: tuple(v.shape) for k, v in state_dict.items()}
    except AttributeError:
        return False
    return got == expected
