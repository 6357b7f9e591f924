#!/usr/bin/env python3
"""Size against accuracy of the UNet under every quantizer we compare qpack with.

One run measures, on the embedded trained UNet (or ``--checkpoint PATH``) and held-out
synthetic patches, for each setting: the size in bytes, the compression ratio against float32
(4 bytes per parameter), the mean |probability difference| to the float32 model, dice and IoU.

Settings (one function per method below):

- ``float32``: the reference.
- ``origin``: the origin project's per-layer symmetric quantizer at 8/4/3 bits, sized as its
  "ideally packed" stream ``n_weights * bits / 8 + 4 * n_biases`` bytes;
  ``origin+zstd``: that stream (plus the per-layer float32 scales) compressed with zstd -19.
- ``gguf``: GGUF Q8_0 and Q4_0 (``gguf.quants``) on each weight viewed as (out, in*kh*kw);
  weights whose rows are not a multiple of the 32-weight block stay float16.
- ``qpack fixed`` / ``qpack entropy``: ``qpack.save`` with ``entropy=False`` / ``True`` at
  8/4/3 bits (asymmetric per channel); ``qpack optimized``: ``qpack.allocate`` with ``bits=N``
  and with ``max_size`` = half the origin's 4-bit packed size. These are real ``.qpk`` files,
  read back with ``qpack.load``.

Usage::

    python tools/evaluate.py [--checkpoint PATH] [--samples 1000] [--markdown FILE]
                             [--json FILE] [--plots DIR]

gguf, zstandard and matplotlib are optional: without them their rows or plots are skipped
with a note. Rows whose dequantized weights are identical (fixed vs entropy-coded qpack,
origin vs origin+zstd) share one evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, uninstalled

import qpack  # noqa: E402
from qpack import demo  # noqa: E402
from qpack.budget import CHANNEL_SCHEMES  # noqa: E402
from qpack.checkpoint import read_checkpoint  # noqa: E402
from qpack.demo import synthetic  # noqa: E402
from qpack.demo.unet import default_checkpoint_path  # noqa: E402

BITS = (8, 4, 3)
GGUF_TYPES = ("Q8_0", "Q4_0")
GGUF_BLOCK = 32
QPACK_SCHEME = "asymmetric-per-channel"
ORIGIN_SCHEME = "symmetric-per-layer"
ZSTD_LEVEL = 19
DEFAULT_SAMPLES = 1000
DEFAULT_CALIBRATION = 64  # as `qpack pack --max-size` and `qpack demo` use
#: Calibration patches for the allocator's evaluator: disjoint from training and held-out.
CALIBRATION_SEED = getattr(synthetic, "CALIBRATION_SEED", synthetic.HELDOUT_SEED - 1000)
METHODS = (
    "float32",
    "origin",
    "origin+zstd",
    "gguf",
    "qpack fixed",
    "qpack entropy",
    "qpack optimized",
)
# Curves of size_vs_error.png, in legend order.
CURVES = ("origin", "origin+zstd", "gguf", "qpack fixed", "qpack entropy", "qpack optimized")

Arrays = dict[str, np.ndarray]


# --------------------------------------------------------------------------- model and data


def is_weight(array: np.ndarray) -> bool:
    """Quantized by every method: floating tensors with two or more dimensions."""
    return array.ndim >= 2 and np.issubdtype(array.dtype, np.floating)


def load_state(checkpoint: str | os.PathLike | None) -> Arrays:
    """The float32 UNet state_dict of ``checkpoint`` (the embedded one by default) as numpy,
    in the model's order; it is loaded into a UNet with ``strict=True`` first."""
    if checkpoint is None:
        checkpoint = default_checkpoint_path()
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"the embedded trained checkpoint {checkpoint} is missing; pass --checkpoint PATH"
            )
    state = read_checkpoint(checkpoint).state_dict
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = demo.build_model(state, checkpoint)
    return state_to_numpy(model.state_dict())


def state_to_numpy(state: Mapping[str, Any]) -> Arrays:
    return {
        k: np.ascontiguousarray(torch.as_tensor(v).detach().cpu().float().numpy())
        for k, v in state.items()
    }


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()
    }


def counts(state: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(quantized weights, float32-kept parameters) of a state_dict."""
    weights = sum(a.size for a in state.values() if is_weight(a))
    return weights, sum(a.size for a in state.values()) - weights


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, a in arrays.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


@dataclass
class Bench:
    """The float model, the held-out set and its float32 predictions; evaluates weights."""

    state: Arrays
    x: np.ndarray
    y: np.ndarray
    reference: np.ndarray = field(init=False)
    _cache: dict[str, dict] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.reference = demo.predict(demo.build_model(to_torch(self.state)), self.x)

    def metrics(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float | None]:
        """:func:`qpack.demo.evaluate` of a UNet holding ``arrays`` (memoized by content)."""
        key = digest(arrays)
        if key not in self._cache:
            model = demo.build_model(to_torch(arrays))
            self._cache[key] = demo.evaluate(model, self.x, self.y, self.reference)
        return dict(self._cache[key])


# --------------------------------------------------------------------------- rows


def make_row(
    bench: Bench,
    method: str,
    setting: str,
    bits: float | None,
    size: int,
    arrays: Mapping[str, np.ndarray],
    basis: str,
    note: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One table row: size, ratio against 4 bytes per parameter, and the model's scores."""
    params = sum(a.size for a in bench.state.values())
    return {
        "method": method,
        "setting": setting,
        "bits": bits,
        "bytes": int(size),
        "basis": basis,
        "ratio": 4 * params / size,
        **bench.metrics(arrays),
        "note": note,
        **extra,
    }


# --------------------------------------------------------------------------- methods


def float_row(bench: Bench) -> dict[str, Any]:
    params = sum(a.size for a in bench.state.values())
    return make_row(bench, "float32", "float32", 32, 4 * params, bench.state, "4 B/param")


def origin_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32, np.ndarray]:
    """The origin's per-layer symmetric quantizer, in float32 as the origin evaluates it:
    ``q = clip(round(w / max|w| * 2^(b-1)), -2^(b-1), 2^(b-1) - 1)`` and
    ``w' = q * max|w| / 2^(b-1)``. Returns (signed integer codes, max|w|, w')."""
    w = np.asarray(w, dtype=np.float32)
    half = np.float32(2 ** (bits - 1))
    peak = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    if not peak > 0:
        peak = np.float32(1)
    q = np.clip(np.round(w / peak * half), -half, half - 1)
    return q.astype(np.int16), peak, (q * peak / half).astype(np.float32)


def origin_state(state: Arrays, bits: int) -> tuple[Arrays, Arrays, dict[str, np.float32]]:
    """(dequantized state_dict, signed codes per weight, max|w| per weight)."""
    out, codes, peaks = dict(state), {}, {}
    for name, a in state.items():
        if is_weight(a):
            codes[name], peaks[name], out[name] = origin_quantize(a, bits)
    return out, codes, peaks


def origin_packed_size(state: Arrays, bits: int) -> int:
    """The origin's "ideally packed" size: n_weights * bits / 8 + 4 * n_biases bytes."""
    n_weights, n_other = counts(state)
    return (n_weights * bits + 7) // 8 + 4 * n_other


def origin_stream(state: Arrays, bits: int) -> bytes:
    """The ideally packed byte stream: every weight's code ``q + 2^(b-1)`` packed densely with
    :func:`qpack.pack_codes`, then the float32 biases, then the per-layer float32 max|w|."""
    _, codes, peaks = origin_state(state, bits)
    flat = np.concatenate([c.reshape(-1) for c in codes.values()]) + 2 ** (bits - 1)
    packed = qpack.pack_codes(flat.astype(np.uint8), bits).tobytes()
    others = [a.astype("<f4").reshape(-1) for a in state.values() if not is_weight(a)]
    biases = np.concatenate(others).tobytes() if others else b""
    scales = np.array(list(peaks.values()), dtype="<f4").tobytes()
    return packed + biases + scales


def origin_rows(bench: Bench, bits: Iterable[int]) -> tuple[list[dict], dict[int, Arrays]]:
    rows, weights = [], {}
    for b in bits:
        arrays, _, _ = origin_state(bench.state, b)
        weights[b] = arrays
        rows.append(
            make_row(
                bench,
                "origin",
                f"{b}-bit",
                b,
                origin_packed_size(bench.state, b),
                arrays,
                "ideal packed",
            )
        )
    return rows, weights


def origin_zstd_rows(
    bench: Bench, bits: Iterable[int], level: int = ZSTD_LEVEL
) -> tuple[list[dict], str | None]:
    """zstd level-``level`` size of :func:`origin_stream`; skipped without ``zstandard``."""
    try:
        import zstandard
    except ImportError:
        return [], "origin+zstd: skipped (the optional `zstandard` package is not installed)"
    rows = []
    for b in bits:
        stream = origin_stream(bench.state, b)
        size = len(zstandard.ZstdCompressor(level=level).compress(stream))
        arrays, _, _ = origin_state(bench.state, b)
        note = f"zstd -{level} of the {len(stream):,}-byte packed stream (incl. per-layer scales)"
        rows.append(make_row(bench, "origin+zstd", f"{b}-bit", b, size, arrays, "zstd", note))
    return rows, None


def gguf_quantize_state(
    state: Arrays, qtype_name: str, pad: bool = False
) -> tuple[Arrays, int, list[str]]:
    """GGUF-quantize each weight viewed as (out, in*kh*kw); weights whose row length is not
    a multiple of the block size stay float16 (as a GGUF file keeps them), or with ``pad``
    are quantized too, each row zero-padded to whole blocks (the blocks' grid on every
    tensor). Returns (dequantized state_dict, bytes: blocks + float16 fallbacks + float32
    biases, names kept as float16)."""
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    out, size, fallback = {}, 0, []
    for name, a in state.items():
        if not is_weight(a):
            out[name] = a
            size += 4 * a.size
            continue
        rows = a.reshape(a.shape[0], -1)
        cols = rows.shape[1]
        if cols % block == 0 or pad:
            padded = np.zeros((rows.shape[0], -(-cols // block) * block), dtype=np.float32)
            padded[:, :cols] = rows
            q = quants.quantize(padded, qtype)
            size += q.nbytes
            values = quants.dequantize(q, qtype).astype(np.float32)[:, :cols]
            out[name] = values.reshape(a.shape)
        else:
            fallback.append(name)
            size += 2 * a.size
            out[name] = a.astype(np.float16).astype(np.float32)
    return out, size, fallback


def gguf_rows(bench: Bench, types: Iterable[str] = GGUF_TYPES) -> tuple[list[dict], str | None]:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return [], "gguf: skipped (the optional `gguf` package is not installed)"
    rows = []
    for t in types:
        arrays, size, fallback = gguf_quantize_state(bench.state, t)
        kept = sum(bench.state[n].size for n in fallback)
        note = (
            f"{len(fallback)} weights ({kept:,} params) kept float16, rows not a multiple of "
            f"{GGUF_BLOCK}: {', '.join(short(n) for n in fallback)}"
            if fallback
            else ""
        )
        bits = {"Q8_0": 8.5, "Q4_0": 4.5}.get(t)  # bits per weight including block scales
        rows.append(make_row(bench, "gguf", t, bits, size, arrays, "blocks+f16+f32", note))
    return rows, None


def qpack_file(state: Arrays, path: Path, entropy: bool, **options: Any) -> tuple[int, Arrays]:
    """Write a .qpk with :func:`qpack.save` (``options``: its ``bits`` and ``scheme``), read
    it back with :func:`qpack.load`."""
    qpack.save(to_torch(state), path, entropy=entropy, **options)
    return path.stat().st_size, state_to_numpy(qpack.load(path))


def qpack_rows(
    bench: Bench, folder: Path, bits: Iterable[int]
) -> tuple[list[dict], dict[int, Arrays]]:
    """Fixed-width and entropy-coded files at each width."""
    rows, weights = [], {}
    for method, entropy in (("qpack fixed", False), ("qpack entropy", True)):
        for b in bits:
            path = folder / f"unet_{b}bit_{'huffman' if entropy else 'fixed'}.qpk"
            size, arrays = qpack_file(bench.state, path, entropy, bits=b, scheme=QPACK_SCHEME)
            weights.setdefault(b, arrays)
            rows.append(make_row(bench, method, f"{b}-bit", b, size, arrays, "file"))
    return rows, weights


def caching(evaluate: Callable[[Mapping[str, np.ndarray]], float]):
    """Memoize an allocator evaluator by the content of what it is given: the allocator
    measures the same (tensor, width) pairs again on every call."""
    memo: dict[str, float] = {}

    def cached(replaced: Mapping[str, np.ndarray]) -> float:
        key = digest(replaced)
        if key not in memo:
            memo[key] = evaluate(replaced)
        return memo[key]

    return cached


def make_allocator_evaluator(state: Arrays, calibration: int):
    """``qpack.demo.unet.make_evaluator`` on ``calibration`` patches (seed ``CALIBRATION_SEED``),
    memoized; None (the allocator's weight-error default) where it does not exist yet."""
    from qpack.demo import unet

    if not hasattr(unet, "make_evaluator") or calibration < 1:
        return None
    inputs, _ = synthetic.make_patches(calibration, CALIBRATION_SEED)
    return caching(unet.make_evaluator(to_torch(state), inputs))


def allocate_plan(state: Mapping[str, torch.Tensor], evaluate, **request: Any) -> dict[str, Any]:
    """:func:`qpack.allocate`'s plan for ``request`` (``bits=N`` or ``max_size=BYTES``) as
    keyword arguments for :func:`qpack.save`: ``{"bits": {name: width}, "scheme": ...}``.

    Takes both shapes the API has had: ``allocate(..., scheme=S)`` returning a bits mapping
    (saved with scheme S), and ``allocate(...)`` returning ``{"bits": ..., "scheme": ...}``
    with a scheme chosen per tensor."""
    from inspect import signature

    fixed_scheme = "scheme" in signature(qpack.allocate).parameters
    extra = {"scheme": QPACK_SCHEME} if fixed_scheme else {}
    plan = qpack.allocate(state, evaluate=evaluate, **extra, **request)
    if {"bits", "scheme"} <= set(plan) and isinstance(plan["bits"], Mapping):
        return dict(plan)
    return {"bits": dict(plan), "scheme": QPACK_SCHEME}


def describe_plan(state: Arrays, plan: Mapping[str, Any]) -> str:
    """Mean width over the quantized weights, and how many tensors use each scheme."""
    text = f"mean {mean_bits(state, plan['bits']):.2f} bits/weight"
    schemes = plan["scheme"]
    if isinstance(schemes, Mapping):
        used: dict[str, int] = {}
        for name, b in plan["bits"].items():
            if b is not None:
                s = schemes.get(name, QPACK_SCHEME)
                used[s] = used.get(s, 0) + 1
        text += " (" + ", ".join(f"{n} x {s}" for s, n in sorted(used.items())) + ")"
    else:
        text += f" ({schemes})"
    return text


def mean_bits(state: Arrays, bits: Mapping[str, float | None]) -> float:
    """Weighted mean of the chosen widths over the quantized weights."""
    chosen = [(state[n].size, b) for n, b in bits.items() if b is not None]
    total = sum(n for n, _ in chosen)
    return sum(n * b for n, b in chosen) / total if total else float("nan")


def optimized_rows(
    bench: Bench,
    folder: Path,
    bits: Iterable[int],
    max_size: int | None,
    calibration: int = DEFAULT_CALIBRATION,
    progress: Callable[[str], None] = lambda _m: None,
) -> tuple[list[dict], list[str]]:
    """``qpack.allocate`` plans (``bits=N`` for each N, then ``max_size``), saved entropy-coded.
    Skipped with a note while the library has no ``allocate``."""
    if not hasattr(qpack, "allocate"):
        return [], ["qpack optimized: skipped (qpack.allocate not available)"]
    evaluate = make_allocator_evaluator(bench.state, calibration)
    if evaluate is not None:
        distortion = f"output MSE on {calibration} calibration patches"
    elif calibration < 1:
        distortion = "the allocator's default weight error (--calibration 0)"
    else:
        distortion = "the allocator's default weight error (no qpack.demo.unet.make_evaluator)"
    requests = [(f"bits={b}", float(b), {"bits": b}) for b in bits]
    if max_size is not None:
        requests.append((f"max_size={max_size:,}", None, {"max_size": max_size}))
    rows, skipped = [], []
    torch_state = to_torch(bench.state)
    for label, b, kwargs in requests:
        progress(f"allocating {label}")
        try:
            plan = allocate_plan(torch_state, evaluate, **kwargs)
            path = folder / f"unet_opt_{label.replace('=', '').replace(',', '')}.qpk"
            size, arrays = qpack_file(bench.state, path, True, **plan)
        except Exception as exc:  # the API is new: report, keep the other rows
            traceback.print_exc(file=sys.stderr)
            skipped.append(f"qpack optimized {label}: failed ({type(exc).__name__}: {exc})")
            continue
        note = f"{describe_plan(bench.state, plan)}; distortion: {distortion}"
        if max_size is not None and label.startswith("max_size") and size > max_size:
            note += f"; OVER BUDGET by {size - max_size:,} B"
        plan_json = {
            "bits": {k: v for k, v in plan["bits"].items() if v is not None},
            "scheme": plan["scheme"],
        }
        rows.append(
            make_row(bench, "qpack optimized", label, b, size, arrays, "file", note, plan=plan_json)
        )
    return rows, skipped


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    rows: list[dict]
    skipped: list[str]
    weights: dict[str, dict[int, Arrays]]  # method -> bits -> dequantized state (for plots)
    meta: dict[str, Any]


def run(
    state: Arrays,
    samples: int = DEFAULT_SAMPLES,
    *,
    seed: int = synthetic.HELDOUT_SEED,
    bits: Sequence[int] = BITS,
    methods: Iterable[str] = METHODS,
    calibration: int = DEFAULT_CALIBRATION,
    workdir: str | os.PathLike | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> Result:
    """Every row of the comparison (``methods`` picks which), float32 first."""
    methods = set(methods)
    unknown = methods - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    start = time.perf_counter()
    progress(f"generating {samples} held-out patches (seed {seed})")
    x, y = synthetic.make_patches(samples, seed)
    bench = Bench(state, x, y)
    rows, skipped, weights = [float_row(bench)], [], {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        progress(f"{name} ({time.perf_counter() - start:.0f} s)")
        return fn()

    if "origin" in methods:
        more, weights["origin"] = step("origin", lambda: origin_rows(bench, bits))
        rows += more
    if "origin+zstd" in methods:
        more, skip = step("origin+zstd", lambda: origin_zstd_rows(bench, bits))
        rows += more
        skipped += [skip] if skip else []
    if "gguf" in methods:
        more, skip = step("gguf", lambda: gguf_rows(bench))
        rows += more
        skipped += [skip] if skip else []
    scratch = (
        tempfile.TemporaryDirectory(prefix="qpack-eval-")
        if workdir is None
        else _Kept(Path(workdir))
    )
    with scratch as tmp:
        folder = Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if methods & {"qpack fixed", "qpack entropy"}:
            more, weights["qpack"] = step("qpack", lambda: qpack_rows(bench, folder, bits))
            rows += [r for r in more if r["method"] in methods]
        if "qpack optimized" in methods:
            budget = origin_packed_size(state, 4) // 2
            more, skip = step(
                "qpack optimized",
                lambda: optimized_rows(bench, folder, bits, budget, calibration, progress),
            )
            rows += more
            skipped += skip
    elapsed = time.perf_counter() - start
    n_weights, n_other = counts(state)
    meta = {
        "samples": samples,
        "seed": seed,
        "calibration": calibration,
        "calibration_seed": CALIBRATION_SEED,
        "params": n_weights + n_other,
        "weights": n_weights,
        "float32_kept": n_other,
        "qpack_scheme": QPACK_SCHEME,
        "threads": torch.get_num_threads(),
        "seconds": round(elapsed, 1),
    }
    return Result(rows, skipped, weights, meta)


class _Kept:
    """A context manager that yields a folder to keep (the --workdir one)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        return os.fspath(self.path)

    def __exit__(self, *_exc: object) -> None:
        return None


def ratios(rows: Sequence[Mapping[str, Any]], bits: Iterable[int] = BITS) -> list[dict]:
    """For each width and qpack variant: its mean|dp| and size over the origin's at that
    width (size against the origin's ideally packed size)."""
    by = {(r["method"], r["setting"]): r for r in rows}
    out = []
    for b in bits:
        origin = by.get(("origin", f"{b}-bit"))
        if origin is None:
            continue
        for method, setting in (
            ("qpack fixed", f"{b}-bit"),
            ("qpack entropy", f"{b}-bit"),
            ("qpack optimized", f"bits={b}"),
        ):
            r = by.get((method, setting))
            if r is None:
                continue
            dp, odp = r["mean_abs_dp"], origin["mean_abs_dp"]
            out.append(
                {
                    "bits": b,
                    "qpack": f"{method} {setting}",
                    "bytes": r["bytes"],
                    "size_over_origin": r["bytes"] / origin["bytes"],
                    "dp_over_origin": dp / odp if odp else float("nan"),
                }
            )
    return out


# --------------------------------------------------------------------------- output


def short(name: str) -> str:
    """A layer's name without the repetitive module path."""
    for part in (".conv_block", ".conv_stage", ".conv.weight", ".conv.bias", "_list"):
        name = name.replace(part, "")
    return name


def _pct(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def format_markdown(result: Result) -> str:
    head = [
        "method",
        "setting",
        "size (B)",
        "size basis",
        "ratio",
        "mean abs dp %",
        "dice %",
        "IoU %",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---", "---:", "---", "---:", "---:", "---:", "---:"]) + "|",
    ]
    notes = []
    for r in result.rows:
        mark = ""
        if r.get("note"):
            notes.append(r["note"])
            mark = f" [{len(notes)}]"
        cells = [
            r["method"],
            r["setting"] + mark,
            f"{r['bytes']:,}",
            r["basis"],
            f"{r['ratio']:.2f}x",
            _pct(r["mean_abs_dp"], 4),
            _pct(r["dice"], 2),
            _pct(r["iou"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m = result.meta
    out = [
        f"UNet, {m['params']:,} parameters ({m['weights']:,} quantized weights, "
        f"{m['float32_kept']:,} float32 biases); {m['samples']} held-out patches "
        f"(seed {m['seed']}); ratio = 4 B/param / size; mean abs dp = mean |p - p_float32|.",
        "",
        *lines,
        "",
    ]
    out += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    rat = ratios(result.rows)
    if rat:
        out += [
            "",
            "qpack against the origin at the same width (size: origin's ideally packed size):",
            "",
            "| bits | qpack | size (B) | size / origin | mean abs dp / origin |",
            "|---:|---|---:|---:|---:|",
        ]
        out += [
            f"| {r['bits']} | {r['qpack']} | {r['bytes']:,} | {r['size_over_origin']:.3f} "
            f"| {r['dp_over_origin']:.3f} |"
            for r in rat
        ]
    if result.skipped:
        out += ["", "Skipped:", *(f"- {s}" for s in result.skipped)]
    out += ["", f"Run time {m['seconds']} s on {m['threads']} threads."]
    return "\n".join(out) + "\n"


def to_json(result: Result) -> dict[str, Any]:
    return {
        "meta": result.meta,
        "rows": result.rows,
        "ratios": ratios(result.rows),
        "skipped": result.skipped,
    }


# --------------------------------------------------------------------------- plots


def relative_rmse(a: np.ndarray, b: np.ndarray) -> float:
    """||b - a|| / ||a|| (RMS of the error over RMS of the weights)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norm = float(np.sqrt(np.mean(a64 * a64))) or 1.0
    return float(np.sqrt(np.mean((b64 - a64) ** 2))) / norm


def write_plots(result: Result, state: Arrays, folder: Path, bits: int = 4) -> list[str]:
    """size_vs_error.png, layer_error.png, histograms.png; returns the files written, or a
    note in ``result.skipped`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result.skipped.append("plots: skipped (the optional `matplotlib` package is not installed)")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 5))
    for method in CURVES:
        pts = sorted(
            (r["bytes"], r["mean_abs_dp"], r["setting"])
            for r in result.rows
            if r["method"] == method and r["mean_abs_dp"]
        )
        if not pts:
            continue
        xs, ys, labels = zip(*pts, strict=True)
        ax.plot(xs, [100 * v for v in ys], "o-", label=method)
        for px, py, lab in zip(xs, ys, labels, strict=True):
            ax.annotate(lab, (px, 100 * py), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("mean |p - p_float32| (%)")
    ax.set_title(f"UNet: size vs output error ({result.meta['samples']} held-out patches)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "size_vs_error.png"))

    origin = result.weights.get("origin", {}).get(bits)
    ours = result.weights.get("qpack", {}).get(bits)
    if origin is None or ours is None:
        result.skipped.append(f"layer_error.png, histograms.png: no {bits}-bit origin/qpack rows")
        return written
    names = [n for n, a in state.items() if is_weight(a)]

    fig, ax = plt.subplots(figsize=(9, 4.5))
    pos = np.arange(len(names))
    ax.bar(
        pos - 0.2,
        [relative_rmse(state[n], origin[n]) for n in names],
        0.4,
        label=f"origin symmetric per-layer {bits}-bit",
    )
    ax.bar(
        pos + 0.2,
        [relative_rmse(state[n], ours[n]) for n in names],
        0.4,
        label=f"qpack {QPACK_SCHEME} {bits}-bit",
    )
    ax.set_xticks(pos, [short(n) for n in names], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("relative weight RMSE")
    ax.set_title(f"Per-layer weight error at {bits} bits")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "layer_error.png"))

    by_size = sorted(names, key=lambda n: state[n].size)
    picks = list(dict.fromkeys([names[0], by_size[len(by_size) // 2], by_size[-1]]))
    fig, axes = plt.subplots(len(picks), 2, figsize=(10, 2.8 * len(picks)), squeeze=False)
    for row, name in zip(axes, picks, strict=True):
        w = state[name].reshape(-1)
        edges = np.linspace(w.min(), w.max(), 121)
        for ax, (label, deq) in zip(row, (("origin", origin), ("qpack", ours)), strict=True):
            # np.histogram + stairs: one artist per curve instead of one bar per bin
            ax.stairs(np.histogram(w, edges)[0], edges, fill=True, alpha=0.5, label="float32")
            deq_counts = np.histogram(deq[name].reshape(-1), edges)[0]
            ax.stairs(deq_counts, edges, alpha=0.9, label=f"{label} {bits}-bit")
            ax.set_yscale("log")
            ax.set_title(f"{short(name)} {tuple(state[name].shape)}", fontsize=8)
            ax.legend(fontsize=7)
    written.append(_save(fig, folder / "histograms.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return os.fspath(path)


# --------------------------------------------------------------------------- CLI


# --------------------------------------------------------------------------- any model
#
# `--models unet lstm conv1d attn`: model-aware qpack against the references and peers on
# every model of the evaluation (the embedded UNet and tools/zoo.py's), each with its own
# calibration set (256 examples) and held-out set, never the calibration set.

ZOO_MODELS = ("unet", "lstm", "conv1d", "attn")
# Calibration examples: 256 patches for the UNet (each has 1296 outputs); 1024 for the zoo's
# classifiers, whose 8-12 outputs per example make a smaller check half too noisy to hold
# a plan to its reference (256 let held-out error land 1.15x off).
MODEL_CALIBRATION = {"unet": 256}
ZOO_CALIBRATION = 1024


@dataclass
class Subject:
    """A model to evaluate, its data and how its outputs become probabilities."""

    name: str
    model: torch.nn.Module
    calibration: list[torch.Tensor]
    heldout: torch.Tensor
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    fresh: Callable[[], torch.nn.Module]


def subject(name: str, samples: int | None = None) -> Subject:
    """The embedded UNet (sigmoid per pixel) or a zoo model (softmax over classes)."""
    if name == "unet":
        from qpack.demo.unet import UNet, load_default

        calib, _ = synthetic.make_patches(MODEL_CALIBRATION["unet"], CALIBRATION_SEED)
        held, _ = synthetic.make_patches(samples or DEFAULT_SAMPLES, synthetic.HELDOUT_SEED)
        return Subject(
            name, load_default(), list(torch.from_numpy(calib).split(64)),
            torch.from_numpy(held), torch.sigmoid, UNet,
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo

    spec = zoo.ZOO[name]
    calib, _ = spec.make_data("calibration", MODEL_CALIBRATION.get(name, ZOO_CALIBRATION))
    held, _ = spec.make_data("heldout", samples)
    return Subject(
        name, spec.load(), list(calib.split(64)), held, lambda t: t.softmax(dim=-1), spec.build
    )


def predict_probabilities(s: Subject, state: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The probabilities on the held-out set, of the float model or with ``state`` loaded."""
    model = s.model
    if state is not None:
        model = s.fresh()
        model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return torch.cat([s.probabilities(model(b)) for b in s.heldout.split(128)])


def model_rows(s: Subject, workdir: Path, progress=None) -> list[dict[str, Any]]:
    """Size and held-out mean |p - p_float| of every setting on one model."""
    from qpack.api import pack
    from qpack.planner import Planner

    note = progress or (lambda _m: None)
    state = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    params = sum(int(v.numel()) for v in floats.values())
    reference = predict_probabilities(s, None)
    rows = []

    def add(label: str, size: int, decoded: Mapping[str, torch.Tensor], how: str = "") -> None:
        probs = predict_probabilities(s, decoded)
        err = float((probs - reference).abs().mean())
        rows.append({"model": s.name, "setting": label, "bytes": int(size), "how": how,
                     "ratio": 4 * params / size, "mean_abs_dp": err})
        note(f"{s.name}: {label}: {size:,} bytes, mean|dp| {100 * err:.4f}%")

    def qpk(label: str, obj, **options) -> None:
        path = workdir / f"{s.name}_{label.replace(' ', '_').replace('/', '-')}.qpk"
        planned = pack(obj, path, **options)
        add(label, path.stat().st_size, qpack.load(path), planned.summary)

    qpk("int8 per-layer", state, bits=8, scheme=ORIGIN_SCHEME, entropy=False)
    qpk("int4 per-layer", state, bits=4, scheme=ORIGIN_SCHEME, entropy=False)
    qpk("int4 per-channel", state, bits=4, scheme=QPACK_SCHEME, entropy=False)
    try:
        arrays = state_to_numpy(state)
        for t in GGUF_TYPES:
            dq, size, kept = gguf_quantize_state(arrays, t)
            add(f"gguf {t}", size, to_torch(dq), "blocks+f16+f32")
            if t == "Q4_0" and kept:  # also its blocks on the tensors GGUF keeps float16
                dq, size, _ = gguf_quantize_state(arrays, t, pad=True)
                add(f"gguf {t}, blocks on every tensor", size, to_torch(dq), "blocks+f32")
    except ImportError:
        note("gguf rows skipped (the optional gguf package is not installed)")
    for bits in (8, 4, 3):
        qpk(f"qpack --bits {bits}, no model", state, bits=bits)
    planner = Planner(state, model=s.model, calibration=s.calibration,
                      postprocess=s.probabilities)
    for bits in (8, 7, 6, 5, 4, 3):
        qpk(f"qpack --bits {bits}", state, planned=planner.plan(bits=bits), entropy=True)
    # the same choice without per-group grids: what groups add to the size/error curve
    channel = Planner(state, model=s.model, calibration=s.calibration,
                      postprocess=s.probabilities, schemes=CHANNEL_SCHEMES)
    for bits in (8, 7, 6, 5, 4, 3):
        qpk(f"qpack --bits {bits}, per-channel grids only", state,
            planned=channel.plan(bits=bits), entropy=True)
    for bits in (4, 3):
        # error-compensating rounding against round to nearest at the same size: the
        # model-aware --bits N file with nearest codes, then GPTQ within its size
        qpk(f"qpack --bits {bits} --rounding nearest", state,
            planned=planner.plan(bits=bits, rounding="nearest"), entropy=True)
        size = rows[-1]["bytes"]
        qpk(f"qpack --max-size {size} (GPTQ)", state, planned=planner.plan(max_size=size),
            entropy=True)
    note(f"{s.name}: planner timings " + ", ".join(
        f"{k} {v:.1f} s" for k, v in planner.timings.items()))
    return rows


def model_checks(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The targets of model-aware quantization, judged on held-out data."""
    by = {r["setting"]: r for r in rows}
    out = []

    def check(what: str, ok: bool) -> None:
        out.append(f"{'PASS' if ok else 'MISS'} {rows[0]['model']}: {what}")

    def ratio(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> float:
        return a[key] / max(b[key], 1e-12)

    i8, i4, g = by["int8 per-layer"], by["int4 per-layer"], by.get("gguf Q4_0")
    for how in ("", ", no model"):  # with the model and its calibration data, and without
        q8, q4 = by[f"qpack --bits 8{how}"], by[f"qpack --bits 4{how}"]
        check(f"--bits 8{how} {ratio(q8, i8, 'bytes'):.2f}x int8's size (<= 0.75x), error "
              f"{ratio(q8, i8, 'mean_abs_dp'):.2f}x (<= 1x)",
              q8["bytes"] <= 0.75 * i8["bytes"] and q8["mean_abs_dp"] <= i8["mean_abs_dp"])
        check(f"--bits 4{how} {ratio(q4, i4, 'bytes'):.2f}x int4 per-layer's size (< 1x), "
              f"error {ratio(q4, i4, 'mean_abs_dp'):.2f}x (<= 0.5x)",
              q4["bytes"] < i4["bytes"] and q4["mean_abs_dp"] <= 0.5 * i4["mean_abs_dp"])
        if g is not None:
            check(f"--bits 4{how} {ratio(q4, g, 'bytes'):.2f}x Q4_0's bytes (< 1x), error "
                  f"{ratio(q4, g, 'mean_abs_dp'):.2f}x (<= 1x)",
                  q4["bytes"] < g["bytes"] and q4["mean_abs_dp"] <= g["mean_abs_dp"])
    curve = sorted((r["bytes"], r["mean_abs_dp"]) for r in rows
                   if re.fullmatch(r"qpack --bits \d", r["setting"]))
    alone = [(r["bytes"], r["mean_abs_dp"]) for r in rows
             if r["setting"].endswith("per-channel grids only")]
    # the curve through the --bits 3..8 files, interpolated in log size and log error,
    # at the size of each per-channel-only file (beyond its ends: its end points)
    sizes, errors = (np.log([p[i] for p in curve]) for i in (0, 1))
    below = [math.log(e) >= np.interp(math.log(s), sizes, errors) - 1e-9 for s, e in alone]
    check(f"with per-group grids the size/error curve (--bits 3..8) is at or below the "
          f"per-channel-only one at its files' sizes ({sum(below)} of {len(below)})",
          all(below))
    for bits in (4, 3):
        r = by[f"qpack --bits {bits} --rounding nearest"]
        q = by[f"qpack --max-size {r['bytes']} (GPTQ)"]
        check(f"at the --bits {bits} RTN file's size GPTQ has "
              f"{q['mean_abs_dp'] / max(r['mean_abs_dp'], 1e-12):.2f}x its error (<= 0.6x)",
              q["mean_abs_dp"] <= 0.6 * r["mean_abs_dp"] and q["bytes"] <= r["bytes"])
    return out


def format_model_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "| model | setting | bytes | ratio | mean abs dp % |\n|---|---|---:|---:|---:|"
    body = [
        f"| {r['model']} | {r['setting'].strip()} | {r['bytes']:,} | {r['ratio']:.2f}x | "
        f"{100 * r['mean_abs_dp']:.4f} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def run_models(names: Sequence[str], samples: int | None, workdir: Path | None, progress):
    """Every model's rows and checks, as markdown."""
    rows, checks = [], []
    scratch = (
        contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory()
    )
    with scratch as tmp:
        folder = Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            mine = model_rows(subject(name, samples), folder, progress)
            rows += mine
            checks += model_checks(mine)
    stamp = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{demo.cpu_count()} CPUs, torch {torch.__version__}")
    return rows, "\n".join([format_model_rows(rows), "", *checks, "", f"({stamp})"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="UNet state_dict .pt (default: the embedded one)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="held-out patches")
    p.add_argument("--seed", type=int, default=synthetic.HELDOUT_SEED, help="held-out seed")
    p.add_argument(
        "--calibration",
        type=int,
        default=DEFAULT_CALIBRATION,
        help="calibration patches for qpack.allocate's evaluator (0: weight error)",
    )
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--json", type=Path, help="dump every row here")
    p.add_argument("--plots", type=Path, help="write the PNG plots into this folder")
    p.add_argument("--workdir", type=Path, help="keep the .qpk files here")
    p.add_argument("--threads", type=int, help="torch threads (default: all usable cores)")
    p.add_argument(
        "--models",
        nargs="+",
        choices=ZOO_MODELS,
        help="instead: model-aware qpack against per-layer int8/int4, per-channel int4 and "
        "GGUF on these models (their own calibration and held-out data)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 1:
        print("evaluate: --samples must be positive", file=sys.stderr)
        return 2
    methods = METHODS if not args.methods else [m.strip() for m in args.methods.split(",")]
    torch.set_num_threads(args.threads or demo.cpu_count())
    say = lambda msg: print(f"[evaluate] {msg}", file=sys.stderr)  # noqa: E731
    if args.models:
        rows, text = run_models(args.models, args.samples, args.workdir, say)
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    try:
        state = load_state(args.checkpoint)
    except (FileNotFoundError, qpack.QpackError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    result = run(
        state,
        args.samples,
        seed=args.seed,
        methods=methods,
        calibration=args.calibration,
        workdir=args.workdir,
        progress=say,
    )
    result.meta["checkpoint"] = os.fspath(args.checkpoint or default_checkpoint_path())
    if args.plots:
        for path in write_plots(result, state, args.plots):
            say(f"wrote {path}")
    text = format_markdown(result)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(to_json(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
