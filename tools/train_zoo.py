"""Train the zoo models of ``tools/zoo.py`` and write ``tools/zoo/<name>.pt`` and ``.json``.

Each model trains with Adam (warm-up then cosine decay, gradient clipping) for a few epochs
over its task's fixed training split, seeded and on one thread by default, so a rerun on the
same machine gives the same weights. Progress is checkpointed to ``--ckpt-dir`` every
``--ckpt-every`` steps and at every epoch's end; ``--resume`` continues from there exactly
(batch order is a pure function of seed and epoch, the learning rate of the step).

Examples::

    python tools/train_zoo.py                      # every model in zoo.ZOO, one after another
    python tools/train_zoo.py lstm --resume        # continue an interrupted run of one model
    python tools/train_zoo.py --check              # re-evaluate the saved checkpoints

The ``.pt`` file is the model's plain state_dict (floating tensors float32; BatchNorm's
``num_batches_tracked`` int64); the ``.json`` file records the command, times, machine, date,
parameter count, held-out accuracy and a description (with SHA-256) of every data split.
``--check`` loads every saved checkpoint strictly, recomputes its held-out accuracy and the
data hashes, and exits 1 if the accuracy differs from the record by more than ``--tol``.
"""

from __future__ import annotations

import os

# Data generation is numpy; keep any BLAS it touches on one thread too (before the import).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import zoo  # noqa: E402

WARMUP_STEPS = 100
CLIP_NORM = 1.0
# Seed stride between epochs for the batch order; the init uses torch.manual_seed(seed).
EPOCH_SEED_STRIDE = 1_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"models to train (default: all of {list(zoo.ZOO)})")
    p.add_argument("--check", action="store_true", help="re-evaluate saved checkpoints only")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir")
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--epochs", type=int, help="override the spec's epochs (for trials)")
    p.add_argument("--train-n", type=int, help="override the spec's training-set size")
    p.add_argument("--out-dir", type=Path, default=zoo.ZOO_DIR, help="final .pt/.json folder")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / "runs" / "zoo", help="progress")
    p.add_argument("--ckpt-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--tol", type=float, default=0.002, help="--check accuracy tolerance")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in zoo.ZOO]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(zoo.ZOO)}")
    args.names = args.names or list(zoo.ZOO)
    return args


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up then cosine decay to 5% of the peak (a pure function: resume-safe)."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    t = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of ``epoch`` (a pure function: resume-safe)."""
    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n, generator=g)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode; leaves the model in eval mode."""
    return float((zoo.predict(model, x).argmax(dim=1) == y).double().mean())


def save_atomic(obj: object, path: Path) -> None:
    """torch.save via a temporary file so an interrupted write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of a split's input and label bytes (to notice generator drift)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x.numpy()).tobytes())
    h.update(np.ascontiguousarray(y.numpy()).tobytes())
    return h.hexdigest()


def describe_split(spec: zoo.Spec, split: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """How to regenerate a split, and what it holds."""
    return {
        "call": f"zoo.ZOO[{spec.name!r}].make_data({split!r}, {len(x)})",
        "n": len(x),
        "inputs": {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")},
        "label_counts": torch.bincount(y, minlength=len(spec.classes)).tolist(),
        "sha256": data_digest(x, y),
    }


def machine() -> dict[str, Any]:
    """CPU model, core count, OS and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def float32_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with floating tensors as float32; integer buffers keep their dtype."""
    return {
        k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).clone()
        for k, v in model.state_dict().items()
    }


def train(spec: zoo.Spec, args: argparse.Namespace, command: str) -> dict:
    """Train one model (or resume it), write its .pt and .json, and return the record."""
    wall0 = time.perf_counter()
    torch.manual_seed(args.seed)
    epochs = args.epochs or spec.epochs
    train_n = args.train_n or spec.train_n
    ckpt_path = args.ckpt_dir / f"{spec.name}_ckpt.pt"

    t0 = time.perf_counter()
    x, y = spec.make_data("train", train_n)
    hx, hy = spec.make_data("heldout")
    cx, cy = spec.make_data("calibration")
    data_s = time.perf_counter() - t0

    model = spec.build()
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    steps_per_epoch = train_n // spec.batch  # drop the ragged last batch: BatchNorm
    total = epochs * steps_per_epoch
    step, elapsed, cpu, history, commands = 0, 0.0, 0.0, [], [command]
    resumed_loss = (0.0, 0)
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if (ck["epochs"], ck["train_n"], ck["seed"]) != (epochs, train_n, args.seed):
            raise SystemExit(f"{ckpt_path}: run with the same --epochs/--train-n/--seed")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed, cpu, history = ck["step"], ck["elapsed_s"], ck["cpu_s"], ck["history"]
        commands = [*ck["commands"], command]
        resumed_loss = (ck["loss_sum"], ck["loss_steps"])
        print(f"[{spec.name}] resumed from {ckpt_path} at step {step}/{total}", flush=True)
    n_params = zoo.n_params(model)
    print(
        f"[{spec.name}] {spec.model.__name__}: {n_params:,} params, {train_n} train examples, "
        f"{epochs} epochs x {steps_per_epoch} steps, data {data_s:.1f} s",
        flush=True,
    )

    def checkpoint() -> None:
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "elapsed_s": elapsed,
                "cpu_s": cpu,
                "loss_sum": loss_acc,  # the running epoch's loss so far, for its average
                "loss_steps": n_acc,
                "history": history,
                "commands": commands,
                "epochs": epochs,
                "train_n": train_n,
                "seed": args.seed,
            },
            ckpt_path,
        )

    model.train()
    loss_acc, n_acc = resumed_loss
    t_last, c_last = time.perf_counter(), time.process_time()
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = batch_order(train_n, args.seed, epoch)
        idx = order[pos * spec.batch : (pos + 1) * spec.batch]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, spec.lr)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        loss_acc, n_acc = loss_acc + loss.item(), n_acc + 1
        step += 1

        epoch_end = step % steps_per_epoch == 0
        if epoch_end or step % args.ckpt_every == 0:
            elapsed += time.perf_counter() - t_last
            cpu += time.process_time() - c_last
            if epoch_end:
                acc = accuracy(model, hx, hy)
                model.train()
                history.append(
                    {
                        "epoch": step // steps_per_epoch,
                        "step": step,
                        "train_loss": round(loss_acc / n_acc, 4),
                        "heldout_accuracy": round(acc, 4),
                        "elapsed_s": round(elapsed, 1),
                    }
                )
                print(
                    f"[{spec.name}] epoch {step // steps_per_epoch}/{epochs} step {step} "
                    f"loss {loss_acc / n_acc:.4f} held-out acc {acc:.4f} "
                    f"({elapsed:.0f} s, {step * spec.batch / elapsed:.0f} examples/s)",
                    flush=True,
                )
                loss_acc, n_acc = 0.0, 0
            checkpoint()
            # evaluation and checkpoint time is not training time
            t_last, c_last = time.perf_counter(), time.process_time()

    model.eval()
    heldout_acc = accuracy(model, hx, hy)
    calib_acc = accuracy(model, cx, cy)
    state = float32_state(model)
    out = args.out_dir / f"{spec.name}.pt"
    save_atomic(state, out)
    record = {
        "name": spec.name,
        "model": spec.target,
        "task": spec.task,
        "classes": list(spec.classes),
        "command": commands[0],
        "resume_commands": commands[1:],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "optimizer": f"Adam, peak lr {spec.lr}, {WARMUP_STEPS}-step warm-up, cosine to 5%, "
        f"grad-norm clip {CLIP_NORM}",
        "epochs": epochs,
        "batch": spec.batch,
        "steps": total,
        "train_time_s": round(elapsed, 1),
        "train_cpu_s": round(cpu, 1),
        "wall_time_s": round(time.perf_counter() - wall0, 1),
        "note": "train_time_s / train_cpu_s: wall-clock / CPU seconds of the optimizer steps "
        "only, summed over resumes (the machine was shared: CPU time is the steadier "
        "figure); wall_time_s: this process, data generation and evaluation included",
        "n_params": n_params,
        "state_dict": {
            "tensors": len(state),
            "float32_bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "file_bytes": out.stat().st_size,
        },
        "heldout_accuracy": round(heldout_acc, 4),
        "calibration_accuracy": round(calib_acc, 4),
        "chance_accuracy": round(1.0 / len(spec.classes), 4),
        "history": history,
        "data": {
            "generator": f"tools/zoo.py:{spec.data.__name__}",
            "train": describe_split(spec, "train", x, y),
            "calibration": describe_split(spec, "calibration", cx, cy),
            "heldout": describe_split(spec, "heldout", hx, hy),
        },
    }
    record_path = out.with_suffix(".json")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"[{spec.name}] wrote {out} and {record_path}: held-out accuracy {heldout_acc:.4f} "
        f"({elapsed:.0f} s training, {cpu:.0f} s CPU)",
        flush=True,
    )
    return record


def check(names: list[str], out_dir: Path, tol: float) -> int:
    """Re-evaluate the saved checkpoints; 0 if all match their records, 1 otherwise."""
    failed = 0
    for name in names:
        spec = zoo.ZOO[name]
        pt, js = out_dir / f"{name}.pt", out_dir / f"{name}.json"
        if not pt.is_file() or not js.is_file():
            print(f"{name}: MISSING {pt if not pt.is_file() else js}")
            failed += 1
            continue
        record = json.loads(js.read_text())
        model = spec.load(pt)
        hx, hy = spec.make_data("heldout", record["data"]["heldout"]["n"])
        acc = accuracy(model, hx, hy)
        same_data = {
            split: data_digest(*spec.make_data(split, record["data"][split]["n"]))
            == record["data"][split]["sha256"]
            for split in ("calibration", "heldout")
        }
        ok = abs(acc - record["heldout_accuracy"]) <= tol
        failed += not ok
        print(
            f"{name}: {'ok' if ok else 'MISMATCH'} held-out accuracy {acc:.4f} "
            f"(recorded {record['heldout_accuracy']:.4f}, chance {1 / len(spec.classes):.3f}); "
            f"{zoo.n_params(model):,} params; data identical: {same_data}"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Train (or with --check, verify) the requested models."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check:
        return check(args.names, args.out_dir, args.tol)
    command = shlex.join(
        ["python", "tools/train_zoo.py", *(sys.argv[1:] if argv is None else argv)]
    )
    for name in args.names:
        train(zoo.ZOO[name], args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
