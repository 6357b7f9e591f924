#!/usr/bin/env python3
"""The first load in a fresh process, as a program loads its model, and the time to pack.

This is the headline of ``tools/bench.py``, which imports this module; run alone, it
prints that part only. A program loads its weights once: into memory it has never
touched, with every page it writes a page fault. This measures that load. For each
workload (``conv19m``: 32 tensors of shape (256, 256, 3, 3), 18.9M parameters, normal *
0.02; ``audio22m``: the shapes of a released 22M audio CNN, (1024,1,512,1),
(128,1024,64,1), (128,128,64,1) x2, (256,128,64,1), (512,256,64,1) and (360,2048), with a
bias each; weights heavy-tailed, Student-t(4) * 0.02), every contender's file is loaded in
a new Python process that first imports everything it needs and then times only the load
call:

- ``torch.load`` of the float32 state_dict saved with ``torch.save`` (the reference);
- safetensors of the float32 state_dict, reading the whole file
  (``safetensors.torch.load(f.read())``; ``load_file`` maps the file and reads nothing until
  a tensor is used);
- ``np.copy`` of the float32 arrays, read into memory before the clock starts: the cost of
  making float32 tensors in fresh memory, with nothing to read or decode;
- ``qpack.load`` of the files ``qpack pack --bits 8`` and ``--bits 4`` make (the library's
  ``save(sd, bits=N)``: widths chosen per tensor, Huffman-coded), and of
  ``save(sd, bits=8, entropy=False)`` (fixed-width 8-bit codes).

Rounds take every contender once, in turn; each ratio is the median over the rounds of
that round's ``torch.load`` time over the contender's (above 1: faster than torch.load).
Warm: the files' pages are in the page cache (a file read once just before). Cold: before
every load the file is fsynced and its pages dropped (``posix_fadvise(DONTNEED)``), so it
is read from the disk, as after a reboot; where the files live on tmpfs, or the system
has no ``posix_fadvise``, this cannot be done: the cold column is skipped and the output
says why. The files are written under ``--dir`` (default: the system's temporary
directory, which must be on a disk for the cold column).

Packing: ``qpack.save(sd, path, bits=8)`` (no model: the width search) against
``torch.save`` of the float32 state_dict, in this process, median of per-round ratios.

Targets, judged on those medians (PASS/MISS): the ``--bits 8`` and ``--bits 4`` files
load at least 1.5x as fast as ``torch.load`` warm and 2x cold, on both workloads, and
packing takes at most 3x ``torch.save``'s time.

Usage::

    python tools/bench_fresh.py [--rounds 7] [--only conv19m] [--markdown] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qpack  # noqa: E402

WORKLOADS = ("conv19m", "audio22m")
AUDIO_SHAPES = [
    (1024, 1, 512, 1),
    (128, 1024, 64, 1),
    (128, 128, 64, 1),
    (128, 128, 64, 1),
    (256, 128, 64, 1),
    (512, 256, 64, 1),
    (360, 2048),
]
REFERENCE = "torch.load float32 .pt"
JUDGED = ("qpack --bits 8", "qpack --bits 4")
LOAD_TARGETS = {"warm": 1.5, "cold": 2.0}  # at least this many times torch.load's speed
PACK_TARGET = 3.0  # at most this many times torch.save's time

# One load in a fresh process: imports and a small warm-up first, then the timed call.
PROBE = r"""
import sys, time
how, path = sys.argv[1], sys.argv[2]
import numpy as np, torch, qpack, safetensors.torch
if how == "copy":
    with np.load(path) as f:
        arrays = [f[k] for k in f.files]
    start = time.perf_counter()
    kept = [np.copy(a) for a in arrays]
elif how == "torch":
    start = time.perf_counter()
    kept = torch.load(path, weights_only=True, map_location="cpu")
elif how == "safetensors":
    start = time.perf_counter()
    with open(path, "rb") as f:  # the whole file read, as the others (load_file maps it)
        kept = safetensors.torch.load(f.read())
else:
    start = time.perf_counter()
    kept = qpack.load(path)
print(time.perf_counter() - start)
"""


def conv_state(count: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of ``shape``, normal * 0.02 from ``default_rng(0)``."""
    rng = np.random.default_rng(0)
    return {
        f"layers.{i}.weight": torch.from_numpy(
            (rng.standard_normal(shape) * 0.02).astype(np.float32)
        )
        for i in range(count)
    }


def workload(name: str, quick: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of a workload (see the module's documentation); ``quick``: a tiny
    one of the same kind, for smoke tests."""
    if name == "conv19m":
        return conv_state(4, (64, 64, 3, 3)) if quick else conv_state(32, (256, 256, 3, 3))
    rng = np.random.default_rng(1)
    state = {}
    for i, full in enumerate(AUDIO_SHAPES):
        shape = tuple(max(1, d // 8) for d in full) if quick else full
        w = (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
        state[f"layers.{i}.weight"] = torch.from_numpy(w)
        bias = (rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
        state[f"layers.{i}.bias"] = torch.from_numpy(bias)
    return state


def write_files(state: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[str, Path]]:
    """label -> (probe kind, file) for every contender."""
    import safetensors.torch

    files = {
        REFERENCE: ("torch", folder / "f32.pt"),
        "safetensors float32": ("safetensors", folder / "f32.safetensors"),
        "np.copy float32": ("copy", folder / "f32.npz"),
        "qpack --bits 8": ("qpack", folder / "bits8.qpk"),
        "qpack --bits 4": ("qpack", folder / "bits4.qpk"),
        "qpack 8-bit fixed-width": ("qpack", folder / "fixed8.qpk"),
    }
    for _, path in files.values():
        path.unlink(missing_ok=True)
    torch.save(state, files[REFERENCE][1])
    safetensors.torch.save_file(state, str(files["safetensors float32"][1]))
    np.savez(files["np.copy float32"][1], **{k: v.numpy() for k, v in state.items()})
    qpack.save(state, files["qpack --bits 8"][1], bits=8)
    qpack.save(state, files["qpack --bits 4"][1], bits=4)
    qpack.save(state, files["qpack 8-bit fixed-width"][1], bits=8, entropy=False)
    return files


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` ("?" where /proc/mounts is missing)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return "?"
    path = path.resolve()
    inside = [m for m in mounts if path.is_relative_to(m[1])]
    return max(inside, key=lambda m: len(m[1]))[2] if inside else "?"


def cold_unavailable(folder: Path) -> str | None:
    """Why the files in ``folder`` cannot be read cold; None where they can."""
    if not hasattr(os, "posix_fadvise"):
        return "this system has no posix_fadvise to drop a file's pages"
    fs = filesystem(folder)
    if fs in ("tmpfs", "ramfs"):
        return f"the files are on {fs}, whose pages cannot be dropped; --dir on a disk"
    return None


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (dirty pages are not dropped: fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def one_load(kind: str, path: Path, cold: bool) -> float:
    """Seconds of one load call in a new process."""
    if cold:
        drop_cache(path)
    else:
        warm(path)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, kind, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return float(done.stdout.strip().splitlines()[-1])


def bench_loads(
    files: dict[str, tuple[str, Path]], rounds: int, cold: bool, warmup: bool = True
) -> dict[str, list[float]]:
    """label -> load times, ``rounds`` rounds each taking every contender in turn."""
    times: dict[str, list[float]] = {label: [] for label in files}
    if warmup:  # one untimed load each
        for kind, path in files.values():
            one_load(kind, path, cold)
    for _ in range(rounds):
        for label, (kind, path) in files.items():
            times[label].append(one_load(kind, path, cold))
    return times


def bench_pack(
    state: dict[str, torch.Tensor], folder: Path, rounds: int
) -> tuple[list[float], list[float]]:
    """(torch.save times, qpack.save(bits=8) times), one untimed round first."""
    saves, packs = [], []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        torch.save(state, folder / "save.pt")
        saves.append(time.perf_counter() - start)
        (folder / "pack.qpk").unlink(missing_ok=True)
        start = time.perf_counter()
        qpack.save(state, folder / "pack.qpk", bits=8)
        packs.append(time.perf_counter() - start)
    return saves[1:], packs[1:]


def ratio(reference: list[float], other: list[float]) -> float:
    """Median over the rounds of reference / other (above 1: other is faster)."""
    return statistics.median(r / o for r, o in zip(reference, other, strict=True))


def measure(name: str, folder: Path, rounds: int, quick: bool = False) -> dict[str, Any]:
    """Every contender's first load in fresh processes, warm and (where possible) cold,
    the pack time, and the targets judged. ``quick``: the tiny workload, no warm-up."""
    state = workload(name, quick)
    files = write_files(state, folder)
    skipped = cold_unavailable(folder)
    modes = {"warm": False} if skipped else {"warm": False, "cold": True}
    times = {m: bench_loads(files, rounds, cold, warmup=not quick) for m, cold in modes.items()}
    rows = []
    for label, (_, path) in files.items():
        row: dict[str, Any] = {"label": label, "bytes": path.stat().st_size}
        for mode in LOAD_TARGETS:
            t = times.get(mode)
            row[mode] = None
            if t is not None:
                row[mode] = {
                    "times_s": t[label],
                    "median_s": statistics.median(t[label]),
                    "vs_torch_load": ratio(t[REFERENCE], t[label]),
                }
        rows.append(row)
    saves, packs = bench_pack(state, folder, 1 if quick else max(3, rounds // 2))
    result = {
        "name": name,
        "params": sum(v.numel() for v in state.values()),
        "rounds": rounds,
        "cold_skipped": skipped,
        "rows": rows,
        "pack": {
            "qpack_save_s": packs,
            "torch_save_s": saves,
            "vs_torch_save": ratio(packs, saves),
        },
    }
    result["targets"] = judge(result)
    return result


def judge(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of one workload's results: value, wanted bound and PASS (True), MISS
    (False) or not measured (None, with the reason)."""
    rows = {r["label"]: r for r in result["rows"]}
    out = []
    for mode, target in LOAD_TARGETS.items():
        for label in JUDGED:
            cell = rows[label][mode]
            value = None if cell is None else cell["vs_torch_load"]
            out.append(
                {
                    "name": f"{result['name']}: {mode} first load, {label} vs torch.load float32",
                    "value": value,
                    "target": target,
                    "target_text": f">= {target:g}x",
                    "pass": None if value is None else value >= target,
                    "why_not": None if value is not None else result["cold_skipped"],
                }
            )
    value = result["pack"]["vs_torch_save"]
    out.append(
        {
            "name": f"{result['name']}: pack, qpack.save(bits=8) time / torch.save float32",
            "value": value,
            "target": PACK_TARGET,
            "target_text": f"<= {PACK_TARGET:g}x",
            "pass": value <= PACK_TARGET,
            "why_not": None,
        }
    )
    return out


def table(headers: list[str], rows: list[list[str]], markdown: bool, right: set[int]) -> str:
    """A plain-text or Markdown table; the columns in ``right`` are right-aligned."""
    if markdown:
        sep = ["---:" if i in right else "---" for i in range(len(headers))]
        return "\n".join("| " + " | ".join(r) + " |" for r in [headers, sep, *rows])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def heading(text: str, markdown: bool) -> str:
    return f"### {text}" if markdown else f"== {text}"


def report(result: dict[str, Any], markdown: bool) -> str:
    """One workload's table and pack line."""
    title = (
        f"{result['name']}: {result['params']:,} parameters, first load in a fresh "
        f"process, median of {result['rounds']} rounds"
    )
    out = [heading(title, markdown)]
    if result["cold_skipped"]:
        out.append(f"cold cache: not measured ({result['cold_skipped']})")
    modes = [m for m in LOAD_TARGETS if result["rows"][0][m]]
    head = ["first load in a fresh process", "file"]
    for mode in modes:
        head += [f"{mode}: median", f"{mode}: vs torch.load"]
    rows = []
    for r in result["rows"]:
        row = [r["label"], f"{r['bytes'] / 1e6:.1f} MB"]
        for mode in modes:
            row += [f"{r[mode]['median_s'] * 1e3:.1f} ms", f"{r[mode]['vs_torch_load']:.2f}x"]
        rows.append(row)
    out.append(table(head, rows, markdown, set(range(1, len(head)))))
    pack = result["pack"]
    out.append(
        f"pack: qpack.save(bits=8) {statistics.median(pack['qpack_save_s']):.3f} s, "
        f"torch.save {statistics.median(pack['torch_save_s']):.3f} s: "
        f"{pack['vs_torch_save']:.2f}x torch.save's time"
    )
    return "\n\n".join(out)


def verdict(target: dict[str, Any]) -> str:
    if target["pass"] is None:
        return f"not measured ({target['why_not']})"
    return "PASS" if target["pass"] else "MISS"


def report_targets(results: list[dict[str, Any]], markdown: bool) -> str:
    """The targets of every workload, judged (PASS/MISS) on the medians of rounds."""
    rows = [
        [
            t["name"],
            "-" if t["value"] is None else f"{t['value']:.2f}x",
            t["target_text"],
            verdict(t),
        ]
        for r in results
        for t in r["targets"]
    ]
    headers = ["target (median of rounds)", "value", "target", "result"]
    return "\n\n".join([heading("targets", markdown), table(headers, rows, markdown, {1, 2})])


def run_all(
    names: list[str], folder: Path, rounds: int, markdown: bool, quick: bool = False
) -> tuple[list[dict[str, Any]], str]:
    """Measure ``names`` in a temporary directory under ``folder``; the results and the
    report (every workload's table, then the targets)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="qpack-fresh-", dir=folder) as tmp:
        for name in names:
            print(f"fresh-process loads: {name}", file=sys.stderr, flush=True)
            results.append(measure(name, Path(tmp), rounds, quick))
    text = [report(r, markdown) for r in results] + [report_targets(results, markdown)]
    return results, "\n\n".join(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="rounds (default 7; 1 with --quick)")
    p.add_argument("--only", choices=WORKLOADS)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny workloads, one round")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 7)
    stamp = (
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"qpack {qpack.__version__}, files on {filesystem(args.dir)}"
    )
    print(f"python tools/bench_fresh.py --rounds {rounds} ({stamp})\n")
    names = [args.only] if args.only else list(WORKLOADS)
    print(run_all(names, args.dir, rounds, args.markdown, args.quick)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
