"""Smoke test of tools/bench.py: a --quick run exits 0 and its JSON holds every measurement
and ratio, the fresh-process headline included. No timing assertions: machines are too
noisy for them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("safetensors")

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"

QPACK_ROWS = [
    (method, bits, storage)
    for method in ("qpack save", "qpack load")
    for bits in (8, 4, 3)
    for storage in ("packed", "entropy")
]
PEER_ROWS = [
    ("gguf quantize", 8, "Q8_0"),
    ("gguf dequantize", 8, "Q8_0"),
    ("gguf quantize", 4, "Q4_0"),
    ("gguf dequantize", 4, "Q4_0"),
    ("gguf dequantize", 3, "Q3_K"),
    ("float32 copy", 32, "clone"),
    ("torch.load", 32, "float32 .pt"),
    ("safetensors load_file", 16, "float16"),
    ("gguf-py file load", 8, "Q8_0"),
    ("gguf-py file load", 4, "Q4_0"),
]
FRESH_ROWS = [
    "torch.load float32 .pt",
    "safetensors float32",
    "np.copy float32",
    "qpack --bits 8",
    "qpack --bits 4",
    "qpack 8-bit fixed-width",
]
RATIOS = [
    *(
        f"qpack load {s} {b}-bit / gguf dequantize {t}"
        for s in ("packed", "entropy")
        for b, t in ((8, "Q8_0"), (4, "Q4_0"), (3, "Q3_K"), (3, "Q4_0"))
    ),
    *(
        f"qpack save {s} {b}-bit / gguf quantize {t}"
        for s in ("packed", "entropy")
        for b, t in ((8, "Q8_0"), (4, "Q4_0"), (3, "Q4_0"))
    ),
    *(
        f"qpack load {s} {b}-bit / torch.load float32 .pt"
        for s in ("packed", "entropy")
        for b in (8, 4, 3)
    ),
    *(
        f"qpack load {s} {b}-bit / gguf-py file load {t}"
        for s in ("packed", "entropy")
        for b, t in ((8, "Q8_0"), (4, "Q4_0"))
    ),
]


def test_quick_run_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    data = json.loads(out.read_text())
    assert {"date", "cpu", "python", "numpy", "torch", "gguf", "safetensors", "qpack"} <= set(
        data["machine"]
    )
    assert {"malloc (headline)", "malloc (in-process)", "headline dir"} <= set(data["machine"])
    assert set(data["workloads"]) == {"conv19m", "unet"}
    assert set(data["headline"]) == {"conv19m", "audio22m"}
    for name, fresh in data["headline"].items():
        check_headline(name, fresh)
    head, _, second = proc.stdout.partition("Warm loads and saves in this process (malloc: ")
    assert "Headline: first load in a fresh process" in head and "== targets" in head
    assert second.startswith(data["machine"]["malloc (in-process)"]), second[:200]
    for name, workload in data["workloads"].items():
        rows = {(r["method"], r["bits"], r["storage"]): r for r in workload["results"]}
        for key in QPACK_ROWS + PEER_ROWS:
            assert key in rows, (name, key)
            row = rows[key]
            assert math.isfinite(row["params_per_s"]) and row["params_per_s"] > 0, (name, key)
            assert row["best_s"] > 0 and row["params"] > 0
        for key in QPACK_ROWS:
            assert rows[key]["bytes"] > 0 and rows[key]["params"] == workload["params"]
        assert rows[("gguf dequantize", 8, "Q8_0")]["params"] == workload["gguf_params"]
        ratios = {r["name"]: r for r in workload["ratios"]}
        for ratio in RATIOS:
            assert ratio in ratios, (name, ratio)
            r = ratios[ratio]
            assert math.isfinite(r["value"]) and r["value"] > 0
            assert "target" in r and "pass" in r and r["median"] > 0
            # targets: against gguf-py's quantize/dequantize on conv19m (throughput), against
            # torch.load on the UNet; the rest is information
            judged = "torch.load" in ratio if name == "unet" else "gguf " in ratio
            if judged:
                assert r["target"] > 0 and isinstance(r["pass"], bool), (name, ratio)
            else:
                assert r["target"] is None and r["pass"] is None, (name, ratio)
        # the decoded weights are sane (a fast but wrong load would show up here)
        assert all(
            c.get("ok", True) and c.get("packed_equals_entropy", True) for c in workload["checks"]
        ), workload["checks"]


def check_headline(name: str, fresh: dict) -> None:
    """One workload of the headline: every contender's warm (and, unless skipped with a
    reason, cold) first load, its ratio to torch.load, the pack ratio and the targets."""
    assert fresh["name"] == name and fresh["params"] > 0 and fresh["rounds"] == 1
    rows = {r["label"]: r for r in fresh["rows"]}
    assert list(rows) == FRESH_ROWS
    modes = ["warm"] if fresh["cold_skipped"] else ["warm", "cold"]
    for label, row in rows.items():
        assert row["bytes"] > 0
        for mode in modes:
            cell = row[mode]
            assert len(cell["times_s"]) == 1 and cell["median_s"] == cell["times_s"][0]
            assert math.isfinite(cell["median_s"]) and cell["median_s"] > 0, (name, label)
            assert math.isfinite(cell["vs_torch_load"]) and cell["vs_torch_load"] > 0
        if fresh["cold_skipped"]:
            assert row["cold"] is None
    for mode in modes:
        assert rows["torch.load float32 .pt"][mode]["vs_torch_load"] == 1.0
    pack = fresh["pack"]
    assert len(pack["qpack_save_s"]) == len(pack["torch_save_s"]) == 1
    assert math.isfinite(pack["vs_torch_save"]) and pack["vs_torch_save"] > 0
    targets = {t["name"]: t for t in fresh["targets"]}
    wanted = {
        f"{name}: {mode} first load, qpack --bits {b} vs torch.load float32": (mode, b)
        for mode in ("warm", "cold")
        for b in (8, 4)
    }
    assert set(targets) == {*wanted, f"{name}: pack, qpack.save(bits=8) time / torch.save float32"}
    for key, t in targets.items():
        if key in wanted:
            mode, bits = wanted[key]
            assert t["target"] == {"warm": 1.5, "cold": 2.0}[mode]
            cell = rows[f"qpack --bits {bits}"][mode]
            if cell is None:
                assert t["value"] is t["pass"] is None and t["why_not"] == fresh["cold_skipped"]
                continue
            assert t["value"] == cell["vs_torch_load"]
            assert t["pass"] is (t["value"] >= t["target"])
        else:
            assert t["target"] == 3.0 and t["value"] == pack["vs_torch_save"]
            assert t["pass"] is (t["value"] <= 3.0)


def _fresh_module():
    _bench_module()  # puts tools/ on sys.path
    import bench_fresh

    return bench_fresh


def test_fresh_targets_and_the_cold_column_where_pages_cannot_drop(monkeypatch):
    """Targets are judged on the medians of per-round ratios; where the files' pages cannot
    be dropped the cold column is skipped with the reason, reported, not judged."""
    fresh = _fresh_module()
    rows = [
        {"label": label, "bytes": 1, "warm": {"times_s": [1.0], "median_s": 1.0}, "cold": None}
        for label in FRESH_ROWS
    ]
    for row, speedup in zip(rows, (1.0, 0.5, 2.0, 1.5, 1.49, 3.0), strict=True):
        row["warm"]["vs_torch_load"] = speedup
    result = {
        "name": "toy",
        "params": 10,
        "rounds": 1,
        "cold_skipped": "on tmpfs",
        "rows": rows,
        "pack": {"qpack_save_s": [3.0], "torch_save_s": [1.0], "vs_torch_save": 3.0},
    }
    result["targets"] = fresh.judge(result)
    verdicts = [fresh.verdict(t) for t in result["targets"]]
    assert verdicts == ["PASS", "MISS", *["not measured (on tmpfs)"] * 2, "PASS"]
    text = fresh.report(result, markdown=False) + fresh.report_targets([result], False)
    assert "cold cache: not measured (on tmpfs)" in text and "cold: median" not in text
    assert fresh.ratio([2.0, 4.0, 9.0], [1.0, 1.0, 1.0]) == 4.0  # the median, not the best
    if fresh.filesystem(Path("/dev/shm")) == "tmpfs":
        assert "tmpfs" in fresh.cold_unavailable(Path("/dev/shm"))
    monkeypatch.delattr(fresh.os, "posix_fadvise", raising=False)
    assert "posix_fadvise" in fresh.cold_unavailable(Path("."))


def test_device_rows_on_the_cpu(tmp_path):
    """The --device cuda rows, run on torch's "cpu" device so machines without a GPU check
    them too: every load is timed, bit-identical to the CPU load, and ratioed."""
    import torch

    import qpack

    bench = _bench_module()
    state = bench.bench_fresh.conv_state(2, (16, 8, 3, 3))
    res = bench.Results("tiny", bench.n_params(state), 0, 2)
    torch.save(state, tmp_path / "tiny-f32.pt")
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "tiny-f16.safetensors"))
    files = {}
    for bits, storage in ((4, "packed"), (3, "entropy")):
        files[(bits, storage)] = tmp_path / f"{bits}-{storage}.qpk"
        entropy = storage == "entropy"
        qpack.save(state, files[(bits, storage)], bits=bits, uniform=True, entropy=entropy)
    bench.bench_cuda(res, state, files, tmp_path, name="cpu")
    res.measure()
    res.finish()
    assert all(len(r["times_s"]) == 2 and r["best_s"] == min(r["times_s"]) for r in res.rows)
    rows = {(r["method"], r["bits"], r["label"]) for r in res.rows}
    assert {
        ("float32 copy (cpu)", 32, "clone"),
        ("torch.load (cpu)", 32, "float32 .pt"),
        ("safetensors (cpu)", 16, "float16"),
        ("qpack load (cpu)", 4, "packed"),
        ("qpack load (cpu)", 3, "entropy"),
        ("qpack load (cpu)", 4, "packed, pageable"),
        ("qpack host stage (cpu)", 4, "packed, host only"),
    } <= rows
    assert [c["cpu_bit_identical"] for c in res.checks] == [True, True]
    assert len(res.ratios) == 6 and all(r["value"] > 0 for r in res.ratios)
    assert all(len(r["rounds"]) == 2 and r["median"] > 0 for r in res.ratios)
    assert not res.notes


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qpack_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_rounds_interleave_and_the_target_is_judged_on_the_median():
    """Every queued measurement runs once per round, in turn; a ratio's verdict is the
    median of its per-round ratios, not the ratio of the two best times."""
    bench = _bench_module()
    res = bench.Results("toy", 100, 50, 3)
    calls: list[str] = []
    fast = res.time("fast", 8, "a", lambda: calls.append("fast"))
    slow = res.time("slow", 8, "b", lambda: calls.append("slow"), params=50)
    assert calls == ["fast", "slow"]  # the warm-ups, at queueing
    res.measure()
    assert calls == ["fast", "slow"] * 4  # then three rounds, interleaved
    # replace the timings with known ones: per-round speed-ups 3, 1.5 and 1 (params 100
    # against 50 in the same time is 2x; den 3 s against num 1, 2, 3 s)
    fast["times_s"], slow["times_s"] = [1.0, 2.0, 3.0], [3.0, 3.0, 3.0]
    for row in (fast, slow):
        row["best_s"] = min(row["times_s"])
        row["params_per_s"] = row["params"] / row["best_s"]
    res.ratio("fast / slow", fast, slow, 2.5)
    res.ratio("info", fast, slow, None)
    res.finish()
    judged, info = res.ratios
    assert judged["value"] == pytest.approx(6.0)  # best against best: 100/1 over 50/3
    assert judged["rounds"] == pytest.approx([6.0, 3.0, 2.0])
    assert judged["median"] == pytest.approx(3.0)
    assert judged["pass"] is True and judged["target_text"] == ">= 2.5x"
    assert info["pass"] is None and info["target_text"] == "-"
    res.ratio("fast / slow, higher bar", fast, slow, 4.0)  # the best pair would pass it
    res.finish()
    assert res.ratios[-1]["pass"] is False


def test_a_slow_measurement_is_timed_in_the_first_round_only(monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(bench, "SLOW_S", 0.0)
    res = bench.Results("toy", 10, 10, 4)
    row = res.time("slow", 8, "a", lambda: None)
    res.measure()
    assert len(row["times_s"]) == 1 and row["slow"]
