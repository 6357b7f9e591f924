"""Model-aware packing: a model and its calibration inputs decide widths, grids and codes.

The contracts under test: ``bits=N`` is at least as accurate as N-bit round-to-nearest
quantization with one scale per channel (standard per-layer int8 at 8 bits) on the
calibration data with a model, and per tensor without one; ``max_size`` never exceeds its
budget, never loses to a plan it considered or to a ``bits=N`` plan that fits, and never
gets worse with more room; error-compensating rounding beats round-to-nearest codes on the
same plan.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qpack
from qpack.api import pack
from qpack.budget import Allocator
from qpack.measure import Evaluator
from qpack.planner import Planner

SRC = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small conv + linear model with a mixing input layer."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, width, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(width * 10, 5)

    def forward(self, x):
        x = self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.fc(torch.tanh(self.conv(x)).flatten(1))
'''


def _net_class():
    scope: dict = {}
    exec(compile(SRC, "net.py", "exec"), scope)  # noqa: S102 (the test's own source)
    return scope["Net"]


Net = _net_class()


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Correlated inputs [n, 6, 10]: error compensation has something to work with."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 2, 10, generator=gen)
    mix = torch.randn(6, 2, generator=gen)
    return torch.einsum("ck,nkt->nct", mix, base) + 0.1 * torch.randn(n, 6, 10, generator=gen)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # heavy-tailed weights, as trained ones are
        for p in net.parameters():
            p.mul_(1 + 2 * torch.rand_like(p) ** 4)
    return net.eval()


@pytest.fixture(scope="module")
def calibration() -> list[torch.Tensor]:
    return list(_inputs(128, 1).split(32))


def _error(model, calibration, path) -> float:
    """The model's mean absolute output change with ``path`` on the calibration batches
    plans are checked on (every other one: the rest fit the rounding)."""
    evaluate = Evaluator(model, calibration[1::2])
    return evaluate.mean_abs({k: v.numpy() for k, v in qpack.load(path).items()})


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_bits_meets_its_reference_on_the_calibration_data(tmp_path, model, calibration, bits):
    ours, ref = tmp_path / "ours.qpk", tmp_path / "ref.qpk"
    qpack.save(model, ours, bits=bits, calibration=calibration)
    scheme = "symmetric-per-layer" if bits == 8 else "asymmetric-per-channel"
    qpack.save(model.state_dict(), ref, bits=bits, scheme=scheme, rounding="nearest",
               entropy=False)
    assert _error(model, calibration, ours) <= _error(model, calibration, ref) * (1 + 1e-9)
    if bits >= 3:
        assert ours.stat().st_size < ref.stat().st_size


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_without_a_model_no_tensor_is_coarser_than_its_reference(tmp_path, model, bits):
    state = model.state_dict()
    qpack.save(state, tmp_path / "ours.qpk", bits=bits)
    scheme = "symmetric-per-layer" if bits == 8 else "asymmetric-per-channel"
    qpack.save(state, tmp_path / "ref.qpk", bits=bits, scheme=scheme, entropy=False)
    ours, ref = qpack.load(tmp_path / "ours.qpk"), qpack.load(tmp_path / "ref.qpk")

    def channel_error(q: torch.Tensor, w: torch.Tensor) -> float:
        """Each output channel's squared error relative to its energy, averaged."""
        w64 = w.double().reshape(w.shape[0], -1)
        diff = q.double().reshape(w64.shape) - w64
        return float(((diff**2).sum(1) / (w64**2).sum(1)).mean())

    for name, w in state.items():
        if w.ndim >= 2:
            err = channel_error(ours[name], w)
            assert err <= channel_error(ref[name], w) * (1 + 1e-6), name


def test_error_compensating_codes_beat_nearest_on_the_same_plan(tmp_path, model, calibration):
    planner = Planner(model.state_dict(), model=model, calibration=calibration)
    for bits in (3, 4):
        planned = planner.plan(bits=bits)
        assert set(planned.options["rounding"].values()) == {"gptq"}
        pack(model.state_dict(), tmp_path / "g.qpk", planned=planned)
        qpack.save(model.state_dict(), tmp_path / "n.qpk",
                   **dict(planned.options, rounding="nearest"))
        gptq = _error(model, calibration, tmp_path / "g.qpk")
        nearest = _error(model, calibration, tmp_path / "n.qpk")
        assert gptq < 0.8 * nearest, (bits, gptq, nearest)


def test_max_size_is_monotone_and_never_loses_to_a_fitting_plan(tmp_path, model, calibration):
    planner = Planner(model.state_dict(), model=model, calibration=calibration)
    allocator: Allocator = planner.allocator()
    by_bits = {}
    for bits in range(1, 9):
        plan = allocator.for_bits(bits)
        chosen = {n: (plan["bits"][n], plan["scheme"][n]) for n in plan["scheme"]}
        by_bits[bits] = (allocator.file_size(chosen), allocator.joint(chosen))
    smallest = min(size for size, _ in by_bits.values())
    errors = []
    for budget in np.geomspace(smallest, 4 * smallest, 6).astype(int):
        plan = allocator.for_size(int(budget))
        chosen = {n: (plan["bits"][n], plan["scheme"][n]) for n in plan["scheme"]}
        size, error = allocator.file_size(chosen), allocator.joint(chosen)
        assert size <= budget
        path = tmp_path / f"{budget}.qpk"
        qpack.save(model, path, calibration=calibration, **plan)
        assert path.stat().st_size == size  # the size it promised is the file's
        for candidate in allocator.candidates():  # nothing it considered and fits is better
            if allocator.file_size(candidate) <= budget:
                assert error <= allocator.joint(candidate)
        for bits, (b_size, b_error) in by_bits.items():  # nor any bits=N plan that fits
            if b_size <= budget:
                assert error <= b_error, bits
        errors.append(error)
    assert all(a >= b for a, b in zip(errors, errors[1:], strict=False))
    with pytest.raises(qpack.QpackError, match="cannot fit"):
        allocator.for_size(100)


def test_recurrent_layers_are_rounded_with_compensation_others_fall_back(tmp_path):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 16, batch_first=True)
            self.up = nn.ConvTranspose1d(16, 8, 3)
            self.head = nn.Linear(8 * 3, 4)

        def forward(self, x):
            h = self.rnn(x.transpose(1, 2))[0][:, -1]
            return self.head(self.up(h.unsqueeze(-1)).flatten(1))

    torch.manual_seed(3)
    model = Recurrent().eval()
    planner = Planner(model.state_dict(), model=model, calibration=list(_inputs(64, 2).split(32)))
    planned = planner.plan(bits=4)
    rounding = planned.options["rounding"]
    assert rounding["head.weight"] == "gptq"
    assert rounding["rnn.weight_ih_l0"] == rounding["rnn.weight_hh_l0"] == "gptq"
    assert rounding["up.weight"] == "nearest"  # no hook sees a transposed conv's inputs
    pack(model.state_dict(), tmp_path / "r.qpk", planned=planned)
    assert set(qpack.load(tmp_path / "r.qpk")) == set(model.state_dict())


def test_calibration_needs_the_model(tmp_path, model, calibration):
    with pytest.raises(qpack.QpackError, match="need the model"):
        qpack.save(model.state_dict(), tmp_path / "x.qpk", calibration=calibration)
    with pytest.raises(qpack.QpackError, match="gptq rounding needs"):
        qpack.save(model.state_dict(), tmp_path / "x.qpk", rounding="gptq")
    with pytest.raises(qpack.QpackError, match="model failed"):
        qpack.save(model, tmp_path / "x.qpk", calibration=[torch.zeros(2, 3)])
    assert not (tmp_path / "x.qpk").exists()


def test_plans_are_deterministic(tmp_path, model, calibration):
    for name in ("a.qpk", "b.qpk"):
        qpack.save(model, tmp_path / name, bits=4, calibration=calibration)
    assert (tmp_path / "a.qpk").read_bytes() == (tmp_path / "b.qpk").read_bytes()


@pytest.mark.parametrize("bits", [3, 4])
def test_below_8_bits_the_reference_includes_blocks_of_32(tmp_path, model, calibration, bits):
    """With a model, N-bit is also held to N-bit codes in blocks of 32 with a float16 scale
    each (GGUF's Q4_0 kind), the finer reference on wide rows."""
    from qpack.budget import _block_values

    ours = tmp_path / "ours.qpk"
    qpack.save(model, ours, bits=bits, calibration=calibration)
    blocks = {
        n: _block_values(w.double().numpy(), bits)
        for n, w in model.state_dict().items()
        if w.ndim >= 2
    }
    reference = Evaluator(model, calibration[1::2]).mean_abs(blocks)
    assert _error(model, calibration, ours) <= reference * (1 + 1e-9)


def test_the_block_reference_is_what_gguf_writes_for_q4_0():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    from qpack.budget import _block_values

    rng = np.random.default_rng(7)
    wide = rng.standard_t(4, size=(6, 96)).astype(np.float32)
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    want = quants.dequantize(quants.quantize(wide, q4_0), q4_0)
    np.testing.assert_array_equal(_block_values(wide.astype(np.float64), 4), want)
    odd = rng.normal(size=(4, 40)).astype(np.float32)  # a short block ends each row
    padded = np.zeros((4, 64), np.float32)
    padded[:, :40] = odd
    want = quants.dequantize(quants.quantize(padded, q4_0), q4_0)[:, :40]
    np.testing.assert_array_equal(_block_values(odd.astype(np.float64), 4), want)
