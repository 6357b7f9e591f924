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
from qpack.container import HALF
from qpack.measure import Evaluator
from qpack.planner import Planner

SRC = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small conv + linear model with a mixing input layer (whose rows of 6 weights are
    no whole 32-weight block, as a first layer's often are)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.mix = nn.Linear(6, 32)
        self.conv = nn.Conv1d(32, width, 3, padding=1, padding_mode="circular")
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
    qpack.save(model.state_dict(), ref, bits=bits, scheme=scheme, rounding="nearest", entropy=False)
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
        qpack.save(
            model.state_dict(), tmp_path / "n.qpk", **dict(planned.options, rounding="nearest")
        )
        gptq = _error(model, calibration, tmp_path / "g.qpk")
        nearest = _error(model, calibration, tmp_path / "n.qpk")
        assert gptq < 0.8 * nearest, (bits, gptq, nearest)


def _chosen(plan: dict) -> dict:
    """An allocator's (width, scheme) options of a plan it returned."""
    return {n: (b, plan["scheme"].get(n, HALF)) for n, b in plan["bits"].items() if b is not None}


def test_max_size_is_monotone_and_never_loses_to_a_fitting_plan(tmp_path, model, calibration):
    planner = Planner(model.state_dict(), model=model, calibration=calibration)
    allocator: Allocator = planner.allocator()
    by_bits = {}
    for bits in range(1, 9):
        plan = allocator.for_bits(bits)
        chosen = _chosen(plan)
        by_bits[bits] = (allocator.file_size(chosen), allocator.joint(chosen))
    smallest = min(size for size, _ in by_bits.values())
    errors = []
    for budget in np.geomspace(smallest, 4 * smallest, 6).astype(int):
        plan = allocator.for_size(int(budget))
        chosen = _chosen(plan)
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
            self.rnn = nn.LSTM(6, 32, batch_first=True)
            self.up = nn.ConvTranspose1d(32, 8, 4)
            self.head = nn.Linear(8 * 4, 4)

        def forward(self, x):
            h = self.rnn(x.transpose(1, 2))[0][:, -1]
            return self.head(self.up(h.unsqueeze(-1)).flatten(1))

    torch.manual_seed(3)
    model = Recurrent().eval()
    planner = Planner(model.state_dict(), model=model, calibration=list(_inputs(64, 2).split(32)))
    planned = planner.plan(bits=4)
    rounding = planned.options["rounding"]
    assert rounding["head.weight"] == "gptq"
    assert rounding["rnn.weight_hh_l0"] == "gptq"
    # rows of 6 weights are no whole blocks: held to float16, like a GGUF file, or rounded
    ih = "rnn.weight_ih_l0"
    assert planned.options["bits"][ih] == 16 or rounding[ih] == "gptq"
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


def _gguf_like(state: dict, bits: int) -> dict[str, np.ndarray]:
    """The decoded state a GGUF file of N-bit blocks makes, as qpack writes it: blocks of 32
    with a float16 scale each where rows are whole blocks, float16 values elsewhere."""
    from qpack.budget import BLOCK_SCHEME

    out = {}
    for name, w in state.items():
        if w.ndim >= 2:
            whole = w[0].numel() % 32 == 0
            options = {"bits": bits, "scheme": BLOCK_SCHEME} if whole else {"bits": 16}
            out[name] = qpack.decode(qpack.encode({"w": w.numpy()}, **options, entropy=False))["w"]
    return out


@pytest.mark.parametrize("bits", [3, 4])
def test_below_8_bits_the_reference_includes_a_gguf_file_of_blocks(
    tmp_path, model, calibration, bits
):
    """With a model, N-bit is also held to what a GGUF file of N-bit blocks holds (Q4_0 at
    4 bits): blocks of 32 with a float16 scale each, float16 where rows are no whole blocks."""
    ours = tmp_path / "ours.qpk"
    qpack.save(model, ours, bits=bits, calibration=calibration)
    reference = Evaluator(model, calibration[1::2]).mean_abs(_gguf_like(model.state_dict(), bits))
    assert _error(model, calibration, ours) <= reference * (1 + 1e-9)


def test_the_block_reference_is_what_gguf_writes_for_q4_0():
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    rng = np.random.default_rng(7)
    wide = torch.from_numpy(rng.standard_t(4, size=(64, 96)).astype(np.float32))
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    want = quants.dequantize(quants.quantize(wide.numpy(), q4_0), q4_0)
    got = _gguf_like({"w": wide}, 4)["w"]
    # codes are chosen against the scale as stored (float16), which Q4_0 does not: a code
    # may differ where a weight lies halfway, never to the worse
    assert np.mean(got != want) < 1e-3
    assert np.sum((got - wide.numpy()) ** 2) <= np.sum((want - wide.numpy()) ** 2)
    odd = torch.randn(4, 40)  # GGUF keeps such a tensor in F16
    np.testing.assert_array_equal(_gguf_like({"w": odd}, 4)["w"], odd.half().float().numpy())


def test_example_errors_split_the_mean_error(model, calibration):
    evaluate = Evaluator(model, calibration[1::2])
    noisy = {k: (v + 0.01 * torch.randn_like(v)).numpy() for k, v in model.state_dict().items()}
    shares = evaluate.example_errors(noisy)
    assert shares.shape == (sum(len(b) for b in calibration[1::2]),)
    assert shares.sum() == pytest.approx(evaluate.mean_abs(noisy), rel=1e-9)


@pytest.mark.parametrize("bits", [3, 4])
def test_width_plans_beat_the_reference_beyond_the_noise(tmp_path, model, calibration, bits):
    """The plan's paired per-example errors are below MARGIN x the reference's by
    CONFIDENCE_Z standard errors on the check inputs."""
    from qpack.budget import CONFIDENCE_Z, MARGIN

    evaluate = Evaluator(model, calibration[1::2])
    path = tmp_path / "ours.qpk"
    qpack.save(model, path, bits=bits, calibration=calibration)
    ours = evaluate.example_errors({k: v.numpy() for k, v in qpack.load(path).items()})
    state = model.state_dict()
    per_channel = {}
    for name, w in state.items():
        if w.ndim >= 2:
            blob = qpack.encode({"w": w.numpy()}, bits=bits, scheme="asymmetric-per-channel")
            per_channel[name] = qpack.decode(blob)["w"]
    references = [
        evaluate.example_errors(per_channel),
        evaluate.example_errors(_gguf_like(state, bits)),
    ]
    ref = min(references, key=np.sum)
    diff = (ours - MARGIN * ref) * ours.size
    assert diff.mean() + CONFIDENCE_Z * diff.std(ddof=1) / np.sqrt(diff.size) <= 1e-12
