"""Width/scheme allocation (qpack.allocate), the extra schemes and fractional widths."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qpack
from qpack.api import pack
from qpack.budget import Allocator, parse_size
from qpack.schemes import code_bits, levels_for, quantize


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": (0.05 * rng.standard_t(4, size=(32, 32, 3, 3))).astype(np.float32),
        "a.bias": rng.normal(size=32).astype(np.float32),
        "b.weight": (0.2 * rng.standard_t(4, size=(64, 32, 3, 3))).astype(np.float32),
        "steps": np.array(3, dtype=np.int64),
    }


def _rel_errors(state, path) -> dict[str, float]:
    out = qpack.load_numpy(path)
    return {
        k: float(np.mean((out[k] - v) ** 2) / np.mean(v**2))
        for k, v in state.items()
        if v.ndim >= 2
    }


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_allocate_bits_is_smaller_and_at_least_as_accurate(tmp_path, bits):
    state = _state()
    plan = qpack.allocate(state, bits=bits)
    assert set(plan["bits"]) == set(state)
    assert plan["bits"]["a.bias"] is None and plan["bits"]["steps"] is None
    assert set(plan["scheme"]) == {"a.weight", "b.weight"}
    qpack.save(state, tmp_path / "plan.qpk", **plan)
    # the reference: fixed-width N-bit per channel (standard per-layer int8 at 8 bits)
    ref_scheme = "symmetric-per-layer" if bits == 8 else "asymmetric-per-channel"
    qpack.save(state, tmp_path / "ref.qpk", bits=bits, scheme=ref_scheme, entropy=False)
    assert (tmp_path / "plan.qpk").stat().st_size < (tmp_path / "ref.qpk").stat().st_size
    got = sum(_rel_errors(state, tmp_path / "plan.qpk").values())
    ref = sum(_rel_errors(state, tmp_path / "ref.qpk").values())
    assert got <= ref * (1 + 1e-9)
    np.testing.assert_array_equal(
        qpack.load_numpy(tmp_path / "plan.qpk")["a.bias"], state["a.bias"]
    )


@pytest.mark.parametrize("bits", [4, 3])
def test_rows_of_no_whole_blocks_are_held_to_binary16(bits):
    # a GGUF file keeps such tensors in F16: up to 5 bits that is the reference
    rng = np.random.default_rng(3)
    state = {
        "odd.weight": (0.05 * rng.standard_t(4, size=(32, 16, 3, 3))).astype(np.float32),
        "even.weight": (0.05 * rng.standard_t(4, size=(32, 32, 3, 3))).astype(np.float32),
    }
    plan = qpack.allocate(state, bits=bits)
    assert plan["bits"]["odd.weight"] == 16 and "odd.weight" not in plan["scheme"]
    assert plan["bits"]["even.weight"] <= 8
    out = qpack.decode(qpack.encode(state, **plan))
    half = state["odd.weight"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out["odd.weight"], half)
    # from 6 bits on the reference is N-bit per channel (per-layer int8 at 8), which codes meet
    for wide in (6, 8):
        assert qpack.allocate(state, bits=wide)["bits"]["odd.weight"] <= 8


def test_allocate_max_size_never_exceeds_the_budget(tmp_path):
    state = _state(1)
    errors = []
    for budget in (6_000, 12_000, 24_000):
        plan = qpack.allocate(state, max_size=budget)
        path = tmp_path / f"{budget}.qpk"
        qpack.save(state, path, **plan)
        assert path.stat().st_size <= budget
        errors.append(sum(_rel_errors(state, path).values()))
    assert errors[0] > errors[1] > errors[2]  # more room, less error
    with pytest.raises(qpack.QpackError, match="cannot fit"):
        qpack.allocate(state, max_size=500)
    with pytest.raises(qpack.QpackError):
        qpack.allocate(state)  # neither bits nor max_size
    with pytest.raises(qpack.QpackError):
        qpack.allocate(state, bits=4, max_size=10_000)


def test_sensitive_tensors_get_more_bits():
    """With an evaluator that weighs one tensor 1000x, that tensor gets the finer grid."""
    state = _state(2)
    reference = {k: v.astype(np.float64) for k, v in state.items()}
    weight = {"a.weight": 1000.0, "b.weight": 1.0}

    def evaluate(replaced):
        return sum(
            weight[k] * float(np.mean((v - reference[k]) ** 2) / np.mean(reference[k] ** 2))
            for k, v in replaced.items()
        )

    allocator = Allocator(state, evaluate=evaluate)
    for bits in (4, 6):
        plan = allocator.for_bits(bits)
        assert plan["bits"]["a.weight"] > plan["bits"]["b.weight"]


def test_fractional_widths_use_round_2_pow_bits_levels():
    w = np.random.default_rng(3).normal(size=(8, 50)).astype(np.float32)
    for bits in (1.5, 2.5, 4.5, 6.5, 7.5):
        levels = levels_for(bits)
        assert levels == round(2**bits)
        q = quantize(w, bits, "asymmetric-per-channel")
        assert q.bits == code_bits(levels) and int(q.codes.max()) < levels

    def decoded(bits: float) -> np.ndarray:
        return qpack.decode(qpack.encode({"w": w}, bits=bits, scheme="asymmetric-per-channel"))["w"]

    assert np.abs(decoded(4.5) - w).max() < np.abs(decoded(4) - w).max()


def test_asymmetric_per_layer_and_mse_per_channel():
    rng = np.random.default_rng(4)
    w = (rng.standard_t(3, size=(16, 64)) * np.exp(rng.normal(size=(16, 1)))).astype(np.float32)
    for bits in (2, 3, 4, 8):
        layer = quantize(w, bits, "asymmetric-per-layer")
        assert layer.granularity == "tensor" and layer.scale.size == 1
        decoded = qpack.decode(qpack.encode({"w": w}, bits=bits, scheme="asymmetric-per-layer"))
        lo, hi = min(w.min(), 0), max(w.max(), 0)
        assert np.abs(decoded["w"] - w).max() <= 0.5 * (hi - lo) / (2**bits - 1) * (1 + 1e-5)
        errs = {}
        for scheme in ("asymmetric-per-channel", "mse-per-channel"):
            out = qpack.decode(qpack.encode({"w": w}, bits=bits, scheme=scheme))["w"]
            errs[scheme] = ((out - w).astype(np.float64) ** 2).sum(axis=1)
        # the clipping search includes the unclipped range, so it is never worse per channel
        assert np.all(errs["mse-per-channel"] <= errs["asymmetric-per-channel"] * (1 + 1e-6))
        if bits <= 3:
            assert errs["mse-per-channel"].sum() < errs["asymmetric-per-channel"].sum()


def test_scheme_mapping_in_save(tmp_path):
    state = _state(5)
    qpack.save(state, tmp_path / "m.qpk", bits=4, scheme={"a.weight": "asymmetric-per-layer"})
    rows = {t["name"]: t for t in qpack.inspect(tmp_path / "m.qpk")["tensors"]}
    assert rows["a.weight"]["scheme"] == "asymmetric-per-layer"
    assert rows["b.weight"]["scheme"] == qpack.DEFAULT_SCHEME
    with pytest.raises(qpack.QpackError):
        qpack.save(state, tmp_path / "x.qpk", scheme={"nope": "asymmetric-per-layer"})
    with pytest.raises(qpack.QpackError):
        qpack.save(state, tmp_path / "x.qpk", scheme={"a.weight": "nope"})
    with pytest.raises(qpack.QpackError):
        qpack.save(state, tmp_path / "x.qpk", bits=4.5, scheme="symmetric-per-layer")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("145000", 145000),
        ("145k", 145000),
        ("145kB", 145000),
        ("1.5M", 1500000),
        ("64KiB", 65536),
        ("2MiB", 2097152),
        ("1_000", 1000),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-5", "0", "1.5x", "nan", "inf"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def _channel_errors(values: np.ndarray, reference: np.ndarray) -> float:
    rows = reference.reshape(reference.shape[0], -1).astype(np.float64)
    diff = values.reshape(rows.shape) - rows
    return float(((diff * diff).sum(axis=1) / (rows * rows).sum(axis=1)).mean())


def test_bits_4_without_a_model_is_as_accurate_as_q4_0_blocks_on_every_tensor(tmp_path):
    """No tensor of a ``bits=4`` file is less accurate than the 32-weight blocks of GGUF's
    Q4_0 (one float16 scale a block, codes q - 8 around the value of largest magnitude),
    nor than per-channel 4-bit; rows of 40 weights end in a short block."""
    rng = np.random.default_rng(7)
    state = {
        "wide.weight": (0.05 * rng.standard_t(3, size=(48, 40))).astype(np.float32),
        "conv.weight": (0.1 * rng.standard_t(4, size=(16, 8, 3, 3))).astype(np.float32),
    }
    qpack.save(state, tmp_path / "q.qpk", bits=4)
    out = qpack.load_numpy(tmp_path / "q.qpk")
    for name, w in state.items():
        rows = w.reshape(w.shape[0], -1)
        cols = rows.shape[1]
        blocks = np.zeros((rows.shape[0], -(-cols // 32) * 32))
        blocks[:, :cols] = rows
        blocks = blocks.reshape(rows.shape[0], -1, 32)
        peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)
        scale = (peak / -8).astype(np.float16).astype(np.float64)
        q = np.clip(np.rint(blocks / np.where(scale == 0, 1, scale)), -8, 7)
        q4_0 = (q * scale).reshape(rows.shape[0], -1)[:, :cols]
        channel = quantize(w, 4, "asymmetric-per-channel").values()
        got = _channel_errors(out[name], w)
        assert got <= _channel_errors(q4_0, w) * (1 + 1e-6), name
        assert got <= _channel_errors(channel, w) * (1 + 1e-6), name


def test_per_group_grids_are_taken_where_they_win(tmp_path):
    """On real weights (the demo UNet's) at 3 bits some tensors are stored with per-group
    scales, and the file is smaller than the one chosen among per-tensor and per-channel
    grids only, at the same accuracy reference (more options never cost bytes)."""
    from qpack.budget import CHANNEL_SCHEMES
    from qpack.demo.unet import default_checkpoint_path

    state = {
        k: v.numpy()
        for k, v in __import__("torch").load(default_checkpoint_path(), weights_only=True).items()
    }
    plan = Allocator(state).for_bits(3)
    assert any(s.startswith("symmetric-per-group") for s in plan["scheme"].values())
    channel_only = Allocator(state, schemes=CHANNEL_SCHEMES).for_bits(3)
    qpack.save(state, tmp_path / "g.qpk", **plan)
    qpack.save(state, tmp_path / "c.qpk", **channel_only)
    assert (tmp_path / "g.qpk").stat().st_size < (tmp_path / "c.qpk").stat().st_size


@given(st.integers(1, 20), st.data())
def test_first_passing_finds_the_first_index_that_passes_from_any_start(count, data):
    """The search returns the first index of a predicate that fails then holds (None when
    it never holds), whatever the start, trying each index at most once; started right
    at the answer it tries two."""
    from qpack.budget import _first_passing

    first = data.draw(st.integers(0, count), label="first")  # count: none passes
    start = data.draw(st.integers(0, count - 1), label="start")
    tried = []

    def passes(i: int) -> bool:
        assert 0 <= i < count
        tried.append(i)
        return i >= first

    assert _first_passing(count, start, passes) == (first if first < count else None)
    assert len(tried) == len(set(tried))
    if start == first:
        assert len(tried) <= 2


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((24, 96)) * np.exp(rng.normal(0, 1, size=(24, 1)))
    rows[3] = 0  # a zero channel
    rows[5] = 0.25  # a constant one
    return {
        "normal": rng.standard_normal((32, 64)).astype(np.float32),
        "heavy": rng.standard_t(2, size=(16, 256)).astype(np.float32),
        "channels": rows.astype(np.float32),
        "on a grid": (np.round(rng.standard_normal((16, 64)) * 8) / 8).astype(np.float32),
        "short rows": rng.laplace(size=(40, 48)).astype(np.float32),
        "vector": rng.standard_normal(300).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(_tensors()))
def test_width_search_finds_each_grids_narrowest_width_within_the_limit(name, monkeypatch):
    """For every grid, the search from the predicted width returns what trying every width
    returns (the narrowest within the limit), at limits between each pair of widths, in
    fewer quantizations than a bisection of the widths."""
    import qpack.budget as B

    w = _tensors()[name]
    target = (name, w, "float32")
    weights = B._Weights(target)
    quantizations = bisections = 0
    calls, trial = [], B._Weights.trial

    def counted(self, option, *args, **kwargs):
        calls.append(option)
        return trial(self, option, *args, **kwargs)

    monkeypatch.setattr(B._Weights, "trial", counted)
    for scheme in B.OPTION_SCHEMES:
        widths = sorted(b for b, s in B._fitting(B._options((scheme,)), w) if s == scheme)
        if not widths:
            continue
        errors = [weights.error(B._quantized(target, (b, scheme))) for b in widths]
        for limit in sorted({*errors, *(e * 1.01 for e in errors), errors[0] * 2, 0.0}):
            passing = [b for b, e in zip(widths, errors, strict=True) if e <= limit]
            calls.clear()
            found = B._smallest_width(weights, scheme, widths, limit)
            if all(a >= b for a, b in zip(errors, errors[1:], strict=False)):  # finer, never worse
                assert (found and found[0]) == (passing[0] if passing else None), scheme
            quantizations += len(calls)
            if found is not None:  # the one-pass measure is that of the values found
                assert weights.error(found[1]) <= limit
                assert weights.option_error((found[0], scheme)) == weights.error(found[1])
            bisections += math.ceil(math.log2(len(widths) + 1))
    assert quantizations < bisections


def test_without_a_model_the_output_layer_is_held_to_8_bits(tmp_path):
    """The last tensor of two or more dimensions (the state_dict's output layer) of a bare
    ``bits=3`` file is at least as accurate as per-layer int8, weight by weight of its
    channels, when it is small; earlier layers are not, nor are 1-D tensors after it."""
    import qpack.budget as B

    rng = np.random.default_rng(11)
    state = {
        "body.weight": rng.standard_normal((128, 192)).astype(np.float32),
        "head.weight": rng.standard_normal((8, 64)).astype(np.float32),
        "head.bias": rng.standard_normal(8).astype(np.float32),
    }
    assert Allocator(state).output == "head.weight"
    planned = pack(state, tmp_path / "q.qpk", bits=3)
    assert "output layer head.weight held to 8-bit" in planned.summary
    out = qpack.load_numpy(tmp_path / "q.qpk")

    def error(name: str, values: np.ndarray) -> float:
        return B._channel_error(values, state[name])

    int8 = {n: quantize(w, 8, "symmetric-per-layer").values() for n, w in state.items()}
    assert error("head.weight", out["head.weight"]) <= error("head.weight", int8["head.weight"])
    assert error("body.weight", out["body.weight"]) > 4 * error("body.weight", int8["body.weight"])
    # with a model the allocator measures the output itself: no layer is singled out; nor
    # is a large last layer
    assert Allocator(state, evaluate=lambda replaced: 0.0).output is None
    state["head.weight"] = rng.standard_normal((128, 192)).astype(np.float32)
    assert Allocator(state).output is None


def test_the_writer_takes_the_tensors_the_search_quantized(tmp_path, monkeypatch):
    """Without a model, the codes the width search made for each chosen option are the ones
    written (nothing is quantized twice), and the file is byte for byte the one that
    spelling the same plan out writes (the writer quantizing every tensor itself)."""
    import qpack.writer as W

    rng = np.random.default_rng(4)
    state = {
        "conv.weight": rng.standard_t(4, (32, 32, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(32).astype(np.float32),
        "fc.weight": rng.laplace(size=(40, 256)).astype(np.float32),
        "odd.weight": rng.standard_normal((6, 33)).astype(np.float16),  # binary16 at <= 5
    }
    calls, quantize_tensor = [], W.quantize_tensor
    monkeypatch.setattr(
        W, "quantize_tensor", lambda *a, **k: calls.append(a[0]) or quantize_tensor(*a, **k)
    )
    for bits in (3, 4.5, 8):
        calls.clear()
        planned = pack(state, tmp_path / "searched.qpk", bits=bits)
        assert calls == [] and planned.quantized == {}
        plan = qpack.allocate(state, bits=bits)
        pack(state, tmp_path / "spelled.qpk", bits=plan["bits"], scheme=plan["scheme"])
        coded = [n for n, b in plan["bits"].items() if b not in (None, 16.0)]
        assert len(coded) >= 2 and sorted(calls) == sorted(coded)
        searched = (tmp_path / "searched.qpk").read_bytes()
        assert searched == (tmp_path / "spelled.qpk").read_bytes(), bits


def test_the_codes_kept_for_the_writer_are_bounded(tmp_path, monkeypatch):
    """The search keeps at most MADE_MEMORY bytes of codes for the writer; the tensors it
    does not keep are quantized again, into the same file."""
    import qpack.budget as B

    rng = np.random.default_rng(6)
    state = {f"l{i}.weight": rng.laplace(size=(64, 256)).astype(np.float32) for i in range(4)}
    pack(state, tmp_path / "kept.qpk", bits=6)
    monkeypatch.setattr(B, "MADE_MEMORY", 2 * 64 * 256)  # room for two tensors' codes
    allocator = Allocator(state)
    allocator.for_bits(6)
    assert len(allocator.made) == 2
    monkeypatch.setattr(B, "MADE_MEMORY", 0)
    planned = pack(state, tmp_path / "none.qpk", bits=6)
    assert (
        planned.summary
        and (tmp_path / "none.qpk").read_bytes() == (tmp_path / "kept.qpk").read_bytes()
    )
