#!/usr/bin/env python3
"""How long packing takes, as a user runs it: `qpack pack` in a fresh process, against
`torch.save` of the same float32 state_dict.

Rows: the embedded UNet packed model-aware (`--bits 4`: calibration, sensitivities, the
allocator and error-compensating rounding; target under 10 s on 2 cores), the same with
nearest rounding (the allocator measuring each layer with forward passes instead), and
the same width everywhere (`--uniform`). Each is the wall time of the whole command
(interpreter start, imports and all), the median of `--repeat` runs taken in turn;
`torch.save` of the float32 state_dict is timed in-process.

Usage::

    python tools/bench_pack.py [--repeat 3] [--bits 4] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 10.0


def _run(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qpack", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of each row (median)")
    p.add_argument("--bits", type=int, default=4, help="--bits of the packs")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    from qpack.demo.unet import default_checkpoint_path

    ckpt = default_checkpoint_path()
    state = torch.load(ckpt, weights_only=True)
    rows = {
        f"qpack pack --bits {args.bits} (UNet, model-aware)": ["--bits", str(args.bits)],
        f"qpack pack --bits {args.bits} --rounding nearest": [
            "--bits", str(args.bits), "--rounding", "nearest"],
        f"qpack pack --bits {args.bits} --uniform": ["--bits", str(args.bits), "--uniform"],
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    times["torch.save (in-process)"] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.qpk")
        for _ in range(args.repeat):
            for name, extra in rows.items():
                times[name].append(_run(["pack", str(ckpt), "-o", out, "--force", *extra]))
            started = time.perf_counter()
            torch.save(state, os.path.join(tmp, "float.pt"))
            times["torch.save (in-process)"].append(time.perf_counter() - started)
    header = "| command | median s | runs (s) | target |\n|---|---:|---|---|"
    lines = [header] if args.markdown else []
    for name, values in times.items():
        median = statistics.median(values)
        target = ""
        if "model-aware" in name:
            target = f"< {TARGET_S:g} s: {'PASS' if median < TARGET_S else 'MISS'}"
        runs = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {median:.2f} | {runs} | {target} |" if args.markdown
                     else f"{name:55s} {median:7.2f} s  ({runs})  {target}")
    print("\n".join(lines))
    print(f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
