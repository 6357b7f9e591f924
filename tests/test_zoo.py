"""tools/zoo.py: the zoo's data are deterministic per split and differ between splits, every
model builds with no arguments and maps its task's inputs to logits, the saved checkpoints
load strictly and beat chance clearly, and the output-error metrics and the allocator's
evaluator behave. All on small slices of the data: seconds in total."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_zoo():
    """Import tools/zoo.py as module ``zoo`` (tools/ is not a package)."""
    if "zoo" in sys.modules:
        return sys.modules["zoo"]
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "tools" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["zoo"] = module  # one copy for every test module that imports it

    return module


zoo = _load_zoo()
NAMES = sorted(zoo.ZOO)
SUBSET = 400  # held-out examples for the accuracy check


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Leave the other cores to the rest of the suite; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_has_other_architectures():
    assert len(zoo.ZOO) >= 2
    kinds = {name: spec.model.__name__ for name, spec in zoo.ZOO.items()}
    assert {"lstm", "conv1d"} <= set(kinds), kinds
    assert all(spec.name == name for name, spec in zoo.ZOO.items())
    assert zoo.ZOO["lstm"].target == "tools/zoo.py:WordLSTM"


def test_loads_by_path_under_any_name():
    """As a CLI given ``tools/zoo.py:ClassName`` would: no sys.modules entry, another name."""
    spec = importlib.util.spec_from_file_location("some_user_models", ROOT / "tools" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for entry in module.ZOO.values():
        model = getattr(module, entry.model.__name__)()
        assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("name", NAMES)
def test_data_deterministic_per_split_and_splits_differ(name):
    spec = zoo.ZOO[name]
    a_x, a_y = spec.make_data("calibration", 64)
    b_x, b_y = spec.make_data("calibration", 64)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    h_x, h_y = spec.make_data("heldout", 64)
    t_x, _ = spec.make_data("train", 64)
    assert not torch.equal(a_x, h_x)
    assert not torch.equal(a_x, t_x)
    assert not torch.equal(h_x, t_x)
    # every example is new: no input of one split reappears in another
    flat = torch.cat([a_x, h_x, t_x]).reshape(192, -1)
    assert len(torch.unique(flat, dim=0)) == 192
    # a shorter request is a prefix of a longer one (chunked seeds), across a chunk boundary
    n = zoo.CHUNK + 10
    long_x, long_y = spec.make_data("heldout", n)
    assert torch.equal(long_x[:64], h_x) and torch.equal(long_y[:64], h_y)
    assert len(long_x) == len(long_y) == n


@pytest.mark.parametrize("name", NAMES)
def test_default_split_sizes_and_labels(name):
    spec = zoo.ZOO[name]
    cx, cy = spec.make_data("calibration")
    assert len(cx) == len(cy) == zoo.CALIBRATION_N == 256
    hx, hy = spec.make_data("heldout")
    assert len(hx) == len(hy) == zoo.HELDOUT_N >= 1000
    assert cy.dtype == hy.dtype == torch.int64
    assert set(hy.tolist()) == set(range(len(spec.classes)))  # every class is held out
    if hx.is_floating_point():
        assert hx.dtype == torch.float32 and torch.isfinite(hx).all()
    x0, y0 = spec.make_data("heldout", 0)
    assert x0.shape == (0, *hx.shape[1:]) and x0.dtype == hx.dtype and len(y0) == 0
    with pytest.raises(ValueError, match="unknown split"):
        spec.make_data("test")


@pytest.mark.parametrize("name", NAMES)
def test_model_builds_and_gives_logits(name):
    spec = zoo.ZOO[name]
    torch.manual_seed(0)
    model = spec.model()  # no arguments: a CLI can build it from "tools/zoo.py:ClassName"
    assert 200_000 <= zoo.n_params(model) <= 1_500_000
    x, _ = spec.make_data("calibration", 8)
    logits = zoo.predict(model, x)
    assert logits.shape == (8, len(spec.classes))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    model.train()  # training mode too (BatchNorm batch statistics), with gradients
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_strictly_and_beats_chance(name):
    spec = zoo.ZOO[name]
    if not spec.checkpoint.is_file():
        pytest.fail(f"{spec.checkpoint} is missing: run python tools/train_zoo.py {name}")
    assert spec.checkpoint.stat().st_size < 6_000_000
    state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model = spec.build()
    model.load_state_dict(state, strict=True)
    x, y = spec.make_data("heldout", SUBSET)
    acc = float((zoo.predict(model, x).argmax(dim=1) == y).double().mean())
    chance = 1.0 / len(spec.classes)
    assert acc > max(0.6, 4 * chance), acc
    record = json.loads(spec.record.read_text())
    assert record["n_params"] == zoo.n_params(model)
    assert record["model"] == spec.target
    # the recorded accuracy is over all held-out examples; the subset's is close to it
    assert abs(record["heldout_accuracy"] - acc) < 0.06
    assert record["data"]["heldout"]["n"] >= 1000


@pytest.mark.parametrize("name", NAMES)
def test_qpack_round_trip_8bit(name, tmp_path):
    """qpack serves the zoo: an 8-bit file of each trained model loads strictly and keeps
    its outputs (the integer BatchNorm counters, LSTM and attention weights included)."""
    qpack = pytest.importorskip("qpack")
    spec = zoo.ZOO[name]
    if not spec.checkpoint.is_file():
        pytest.fail(f"{spec.checkpoint} is missing: run python tools/train_zoo.py {name}")
    model = spec.load()
    path = tmp_path / f"{name}.qpk"
    qpack.save(model.state_dict(), path, bits=8)
    assert path.stat().st_size < spec.checkpoint.stat().st_size / 3
    restored = spec.build()
    restored.load_state_dict(qpack.load(path), strict=True)
    x, y = spec.make_data("calibration")
    err = zoo.output_error(zoo.predict(model, x), zoo.predict(restored, x), y)
    assert err["mean_abs_dp"] < 2e-3 and err["top1_agreement"] >= 0.98, err


def test_output_error_metrics():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    same = zoo.output_error(ref, ref.clone(), torch.tensor([0, 1, 2, 1]))
    assert same["mean_abs_dp"] == 0.0 and same["max_abs_dp"] == 0.0
    assert same["top1_agreement"] == 1.0
    assert same["accuracy"] == same["float_accuracy"] == 0.75
    # adding a constant to every logit of a row leaves its softmax unchanged
    assert zoo.output_error(ref, ref + 5.0)["mean_abs_dp"] < 1e-12
    q = ref.clone()
    q[3] = torch.tensor([0.0, 1.0, 0.0])  # row 3's top class flips from 0 to 1
    out = zoo.output_error(ref, q, torch.tensor([0, 1, 2, 1]))
    p, pq = ref.softmax(dim=1), q.softmax(dim=1)
    assert out["mean_abs_dp"] == pytest.approx(float((p - pq).abs().mean()))
    assert out["max_abs_dp"] == pytest.approx(float((p - pq).abs().max()))
    assert out["top1_agreement"] == 0.75
    assert out["accuracy"] == 1.0 and out["float_accuracy"] == 0.75
    with pytest.raises(ValueError):
        zoo.output_error(ref, ref[:, :2])


def test_make_evaluator_measures_and_restores():
    torch.manual_seed(0)
    spec = zoo.ZOO["conv1d"]
    state = spec.build().state_dict()
    x, _ = spec.make_data("calibration", 32)
    evaluate = zoo.make_evaluator("conv1d", state, x)
    assert evaluate({}) == 0.0
    name = "head.0.weight"
    noisy = state[name] + 0.05 * torch.randn_like(state[name])
    assert evaluate({name: noisy.numpy()}) > 0.0
    assert evaluate({}) == 0.0  # the replaced weight was put back
