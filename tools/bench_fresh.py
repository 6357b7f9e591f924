#!/usr/bin/env python3
"""The first load in a fresh process, as a program loads its model, and the time to pack.

A program loads its weights once: into memory it has never touched, with every page it
writes a page fault. This measures that load. For each workload (``conv19m``: 32 tensors
of shape (256, 256, 3, 3), 18.9M parameters; ``audio22m``: the shapes of a released 22M
audio CNN, (1024,1,512,1), (128,1024,64,1), (128,128,64,1) x2, (256,128,64,1),
(512,256,64,1) and (360,2048), with a bias each; weights heavy-tailed, Student-t(4) *
0.02), every contender's file is loaded in a new Python process that first imports
everything it needs and then times only the load call:

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
is read from the disk, as after a reboot; where the files live on tmpfs this is not
possible and is skipped with a note. The files are written under ``--dir`` (default: the
system's temporary directory, which must be on a disk for the cold rows).

Packing: ``qpack.save(sd, path, bits=8)`` (no model: the width search) against
``torch.save`` of the float32 state_dict, in this process, median of per-round ratios.

Usage::

    python tools/bench_fresh.py [--rounds 7] [--only conv19m] [--markdown]
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qpack  # noqa: E402

AUDIO_SHAPES = [
    (1024, 1, 512, 1),
    (128, 1024, 64, 1),
    (128, 128, 64, 1),
    (128, 128, 64, 1),
    (256, 128, 64, 1),
    (512, 256, 64, 1),
    (360, 2048),
]

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


def workload(name: str) -> dict[str, torch.Tensor]:
    """The state_dict of a workload (see the module's documentation)."""
    if name == "conv19m":
        rng = np.random.default_rng(0)
        return {
            f"layers.{i}.weight": torch.from_numpy(
                (rng.standard_normal((256, 256, 3, 3)) * 0.02).astype(np.float32)
            )
            for i in range(32)
        }
    rng = np.random.default_rng(1)
    state = {}
    for i, shape in enumerate(AUDIO_SHAPES):
        w = (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
        state[f"layers.{i}.weight"] = torch.from_numpy(w)
        bias = (rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
        state[f"layers.{i}.bias"] = torch.from_numpy(bias)
    return state


def write_files(state: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[str, Path]]:
    """label -> (probe kind, file) for every contender."""
    import safetensors.torch

    files = {
        "torch.load float32 .pt": ("torch", folder / "f32.pt"),
        "safetensors float32": ("safetensors", folder / "f32.safetensors"),
        "np.copy float32": ("copy", folder / "f32.npz"),
        "qpack --bits 8": ("qpack", folder / "bits8.qpk"),
        "qpack --bits 4": ("qpack", folder / "bits4.qpk"),
        "qpack 8-bit fixed-width": ("qpack", folder / "fixed8.qpk"),
    }
    for _, path in files.values():
        path.unlink(missing_ok=True)
    torch.save(state, files["torch.load float32 .pt"][1])
    safetensors.torch.save_file(state, str(files["safetensors float32"][1]))
    np.savez(files["np.copy float32"][1], **{k: v.numpy() for k, v in state.items()})
    qpack.save(state, files["qpack --bits 8"][1], bits=8)
    qpack.save(state, files["qpack --bits 4"][1], bits=4)
    qpack.save(state, files["qpack 8-bit fixed-width"][1], bits=8, entropy=False)
    return files


def drop_cache(path: Path) -> bool:
    """Evict the file's pages from the page cache; False where that cannot be done."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def one_load(kind: str, path: Path, cold: bool) -> float:
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


def on_tmpfs(path: Path) -> bool:
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    best = max((m for m in mounts if str(path).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2] in ("tmpfs", "ramfs")


def bench_loads(files, rounds: int, cold: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in files}
    for kind, path in files.values():  # one untimed load each
        one_load(kind, path, cold)
    for _ in range(rounds):
        for label, (kind, path) in files.items():
            times[label].append(one_load(kind, path, cold))
    return times


def bench_pack(state, folder: Path, rounds: int) -> tuple[list[float], list[float]]:
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


def table(rows: list[list[str]], head: list[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def fmt(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def run(name: str, folder: Path, rounds: int, markdown: bool) -> str:
    state = workload(name)
    params = sum(v.numel() for v in state.values())
    files = write_files(state, folder)
    out = [f"{name}: {params / 1e6:.1f}M parameters"]
    modes = [("warm", False)]
    if on_tmpfs(folder):
        out.append(f"(cold cache skipped: {folder} is on tmpfs, whose pages cannot be dropped)")
    else:
        modes.append(("cold", True))
    reference = "torch.load float32 .pt"
    rows = []
    results = {mode: bench_loads(files, rounds, cold) for mode, cold in modes}
    for label, (_, path) in files.items():
        row = [label, f"{path.stat().st_size / 1e6:.1f} MB"]
        for mode, _ in modes:
            times = results[mode][label]
            row += [
                f"{1e3 * statistics.median(times):.1f} ms",
                f"{ratio(results[mode][reference], times):.2f}x",
            ]
        rows.append(row)
    head = ["first load in a fresh process", "file"]
    for mode, _ in modes:
        head += [f"{mode}: median", f"{mode}: vs torch.load"]
    out.append(table(rows, head, markdown))
    saves, packs = bench_pack(state, folder, max(3, rounds // 2))
    out.append(
        f"pack: qpack.save(bits=8) {statistics.median(packs):.2f} s, torch.save "
        f"{statistics.median(saves):.2f} s: {ratio(packs, saves):.2f}x torch.save's time"
    )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", choices=("conv19m", "audio22m"))
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    stamp = (
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"qpack {qpack.__version__}"
    )
    print(f"python tools/bench_fresh.py --rounds {args.rounds} ({stamp})\n")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in [args.only] if args.only else ["conv19m", "audio22m"]:
            print(run(name, Path(tmp), args.rounds, args.markdown), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
