"""Train the default qpack UNet on synthetic borehole-wall patches.

Every step draws a fresh batch from :func:`qpack.demo.synthetic.make_patches` with a seed derived
from the step number (always below ``HELDOUT_SEED``), so a resumed run sees exactly the batches
an uninterrupted one would. Evaluation uses ``make_patches(1000, HELDOUT_SEED)``.

Example (the defaults are the settings used for the shipped checkpoint)::

    python tools/train.py --checkpoint runs/unet_ckpt.pt
    python tools/train.py --checkpoint runs/unet_ckpt.pt --resume   # after an interruption

Resume with the same ``--steps``/``--lr``: the learning-rate schedule is computed from them.
A resumed run restarts from the last checkpoint, i.e. the last ``--eval-every`` boundary.

Writes ``--out`` (a float32 state_dict) and a JSON record with the same stem next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qpack.demo.synthetic import HELDOUT_SEED, dice_iou, make_patches  # noqa: E402
from qpack.demo.unet import UNet, default_checkpoint_path  # noqa: E402

# Groove pixels are ~4% of all pixels: up-weight them in the BCE term so thin, faint grooves
# are not traded away for background accuracy (the soft-dice term also counters the imbalance).
POS_WEIGHT = 2.0
WARMUP_STEPS = 100
EVAL_N = 1000
# Seed stride between --seed values, so different runs draw disjoint batches.
SEED_STRIDE = 100_003


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=32, help="patches per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="init and data seed")
    p.add_argument("--out", type=Path, default=default_checkpoint_path(), help="final weights")
    p.add_argument("--checkpoint", type=Path, default=REPO / "runs" / "unet_ckpt.pt")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--eval-every", type=int, default=400, help="eval + checkpoint interval")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def batch_seed(seed: int, step: int) -> int:
    """Data seed of training step ``step``; asserts it stays out of the held-out range."""
    s = seed * SEED_STRIDE + step
    if not 0 <= s < HELDOUT_SEED:
        raise ValueError(f"training seed {s} outside [0, {HELDOUT_SEED})")
    return s


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up then cosine decay to 5% of the peak (a pure function: resume-safe)."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    t = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted BCE plus batch-level soft dice."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(POS_WEIGHT))
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = (2 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + (1 - dice)


@torch.no_grad()
def evaluate(model: UNet, x: np.ndarray, y: np.ndarray, batch: int = 250) -> tuple[float, float]:
    """Held-out dice and IoU at threshold 0.5."""
    model.eval()
    probs = [
        torch.sigmoid(model(torch.from_numpy(x[i : i + batch]))).numpy()
        for i in range(0, len(x), batch)
    ]
    model.train()
    return dice_iou(np.concatenate(probs), y)


def save_atomic(obj: object, path: Path) -> None:
    """torch.save via a temporary file so an interrupted write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate, checkpoint, and write the final weights and JSON record."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join(["python", *sys.argv])

    model = UNet()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_step, elapsed, history, commands = 0, 0.0, [], [command]
    if args.resume:
        ck = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        start_step, elapsed, history = ck["step"], ck["elapsed_s"], ck["history"]
        commands = [*ck["commands"], command]
        print(f"resumed from {args.checkpoint} at step {start_step}", flush=True)

    hx, hy = make_patches(EVAL_N, HELDOUT_SEED)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params={n_params} steps={args.steps} batch={args.batch} lr={args.lr}", flush=True)

    def checkpoint(step: int) -> None:
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "elapsed_s": elapsed,
                "history": history,
                "commands": commands,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            args.checkpoint,
        )

    model.train()
    t_last, loss_acc, n_acc = time.perf_counter(), 0.0, 0
    for step in range(start_step, args.steps):
        xb, yb = make_patches(args.batch, batch_seed(args.seed, step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = loss_fn(model(torch.from_numpy(xb)), torch.from_numpy(yb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_acc, n_acc = loss_acc + loss.item(), n_acc + 1

        done = step + 1
        if done % 50 == 0 or done == args.steps:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            rate = done * args.batch / elapsed if elapsed else 0.0
            print(
                f"step {done:6d} loss {loss_acc / n_acc:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{rate:.1f} samples/s elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
            loss_acc, n_acc = 0.0, 0
        if done % args.eval_every == 0 or done == args.steps:
            t0 = time.perf_counter()
            dice, iou = evaluate(model, hx, hy)
            history.append({"step": done, "dice": dice, "iou": iou})
            print(f"eval step {done}: held-out dice {dice:.4f} iou {iou:.4f}", flush=True)
            checkpoint(done)
            t_last += time.perf_counter() - t0  # eval/checkpoint time is not training time

    dice, iou = history[-1]["dice"], history[-1]["iou"]
    state = {
        k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
    }
    save_atomic(state, args.out)
    record = {
        "command": commands[0],
        "resume_commands": commands[1:],
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "train_samples": args.steps * args.batch,
        "train_time_s": round(elapsed, 1),
        "samples_per_s": round(args.steps * args.batch / elapsed, 1),
        "heldout": {"n": EVAL_N, "seed": HELDOUT_SEED, "threshold": 0.5},
        "heldout_dice": round(dice, 4),
        "heldout_iou": round(iou, 4),
        "history": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()} for h in history
        ],
        "loss": f"BCE(pos_weight={POS_WEIGHT}) + soft dice",
        "n_params": n_params,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
    }
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {json_path}: dice {dice:.4f} iou {iou:.4f}", flush=True)


if __name__ == "__main__":
    main()
