"""Loading a large checkpoint onto a device: qpack against torch.load and safetensors.

A state_dict of ``--tensors`` float32 matrices of ``--side`` x ``--side`` (default 16 of
4096 x 4096: 268M parameters, 1.07 GB), drawn with ``torch.Generator().manual_seed(0)``,
normal * 0.02, is written as a float32 ``.pt``, a float16 ``.safetensors`` and qpack files
(packed, 8 and 4 bits; Huffman-coded, 4 bits). Each is then loaded onto ``--device`` (best
wall time of ``--repeat`` runs after a warm-up, the device synchronized), and params/s and
the ratio to ``torch.load`` are printed. One tensor of each qpack file loaded on the device
is compared bit for bit with the CPU decoder's.

    python tools/bench_scale.py --device cuda
    python tools/bench_scale.py --device cpu --tensors 4 --side 2048   # small, no GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, uninstalled

import qpack  # noqa: E402


def best(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
        del out
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    gen = torch.Generator().manual_seed(0)
    state = {
        f"layers.{i}.weight": torch.randn(args.side, args.side, generator=gen) * 0.02
        for i in range(args.tensors)
    }
    params = sum(t.numel() for t in state.values())
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpack-scale-", dir=where) as tmp:
        pt = Path(tmp) / "f32.pt"
        torch.save(state, pt)
        from safetensors.torch import load_file, save_file

        st = Path(tmp) / "f16.safetensors"
        save_file({k: v.half() for k, v in state.items()}, str(st))
        files = {}
        for bits, entropy in ((8, False), (4, False), (4, True)):
            path = Path(tmp) / f"{bits}-{'huffman' if entropy else 'packed'}.qpk"
            qpack.save(state, path, bits=bits, uniform=True, entropy=entropy)
            files[path.stem] = path
        del state
        gc.collect()

        def row(name: str, path: Path, fn) -> None:
            rows.append((name, path.stat().st_size, best(fn, args.repeat, sync)))
            print(f"  {name:<28} {rows[-1][2] * 1e3:9.1f} ms", file=sys.stderr, flush=True)

        row(
            "torch.load float32 .pt",
            pt,
            lambda: torch.load(pt, weights_only=True, map_location=device),
        )
        row(
            "safetensors float16",
            st,
            lambda: load_file(str(st), device=str(device)),
        )
        same = {}
        for stem, path in files.items():
            row(f"qpack load {stem}", path, lambda path=path: qpack.load(path, device=device))
            with qpack.open(path) as cpu, qpack.open(path, device=device) as dev:
                name = cpu.keys()[-1]
                want, got = cpu.get(name), dev.get(name)
                same[stem] = got.device.type == device.type and torch.equal(got.cpu(), want)
    base = rows[0][2]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "host memory"
    print(
        f"{args.tensors} x ({args.side}, {args.side}) float32: {params:,} params, "
        f"loaded onto {device} ({card})"
    )
    print(f"{'method':<28} {'file MB':>9} {'ms':>9} {'M params/s':>11} {'vs torch.load':>14}")
    for name, size, secs in rows:
        speed = params / secs / 1e6
        print(f"{name:<28} {size / 1e6:9.1f} {secs * 1e3:9.1f} {speed:11.0f} {base / secs:13.2f}x")
    print("bit-identical to the CPU decoder: " + ", ".join(f"{k} {v}" for k, v in same.items()))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
