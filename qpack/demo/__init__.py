"""What quantization costs the reference UNet: size against accuracy at several bit widths.

:func:`run_demo` packs a UNet state_dict at each bit width into a temporary folder, loads
every file back into a fresh :class:`~qpack.demo.unet.UNet` with ``strict=True``, and scores it on
held-out synthetic patches against the float32 model; :func:`format_table` prints the rows.
``qpack demo`` is a thin wrapper around the two. :func:`predict`, :func:`score` and
:func:`evaluate` are reusable on their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import errors as E
from .._threads import cpu_count
from ..api import load, pack
from ..checkpoint import read_checkpoint
from ..plan import widths
from ..planner import Planner
from ..schemes import DEFAULT_SCHEME, check_scheme, parse_scheme
from .synthetic import CALIBRATION_PATCHES, CALIBRATION_SEED, HELDOUT_SEED, dice_iou, make_patches
from .unet import UNet, default_checkpoint_path

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_SAMPLES",
    "FLOAT_SIZE_BASIS",
    "build_model",
    "evaluate",
    "format_table",
    "predict",
    "run_demo",
    "score",
]

DEFAULT_BITS = (8, 4, 3)
DEFAULT_SAMPLES = 300
BATCH_SIZE = 100
#: How the float32 row's size is measured.
FLOAT_SIZE_BASIS = "float32 state_dict written with torch.save"


def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Per-pixel probabilities (sigmoid of the logits), float32, same shape as ``x``."""
    model.eval()
    out = np.empty(x.shape, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            out[start : start + len(batch)] = torch.sigmoid(model(batch)).numpy()
    return out


def score(
    prob: np.ndarray, y: np.ndarray, reference: np.ndarray | None = None
) -> dict[str, float | None]:
    """Dice and IoU of ``prob > 0.5`` against labels ``y`` (pooled over all pixels), and the
    mean absolute difference to ``reference`` probabilities (None without a reference)."""
    dice, iou = dice_iou(prob, y)
    dp = None if reference is None else float(np.mean(np.abs(prob - reference), dtype=np.float64))
    return {"dice": float(dice), "iou": float(iou), "mean_abs_dp": dp}


def evaluate(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray | None = None,
    batch_size: int = BATCH_SIZE,
) -> dict[str, float | None]:
    """:func:`score` of ``model``'s predictions on ``x``."""
    return score(predict(model, x, batch_size), y, reference)


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_model(state_dict: Mapping[str, torch.Tensor], source: object = None) -> UNet:
    """A :class:`UNet` in eval mode holding ``state_dict`` (loaded with ``strict=True``);
    a state_dict that does not fit raises :class:`~qpack.errors.CheckpointError`."""
    model = UNet()
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise E.CheckpointError(f"does not fit the UNet: {_one_line(exc)}", path=source) from None
    return model.eval()


def _float32(state: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v.detach().to(torch.float32)
        if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v
        for k, v in state.items()
    }


def run_demo(
    checkpoint: str | os.PathLike | None = None,
    samples: int = DEFAULT_SAMPLES,
    bits: Iterable[int] = DEFAULT_BITS,
    scheme: str | None = None,
    *,
    seed: int = HELDOUT_SEED,
    batch_size: int = BATCH_SIZE,
    threads: int | None = None,
    workdir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    origin: bool = True,
    uniform: bool = False,
) -> list[dict[str, Any]]:
    """Compare the float32 UNet with its qpack-quantized copies on held-out patches.

    ``checkpoint`` is a UNet state_dict ``.pt`` (plain or wrapped; the embedded trained one by
    default). Returns one dict per row, float32 first, then for each bit width in the order
    given the origin's per-layer symmetric quantizer stored fixed-width (unless ``origin`` is
    false) and qpack's file: ``bits=N`` widths chosen per layer by :func:`qpack.allocate`
    for the UNet's output, Huffman-coded (or, with ``uniform``, N bits everywhere). Keys:
    ``model``, ``bits``, ``scheme``, ``bytes``, ``ratio`` (float32 bytes over
    these bytes), ``dice``, ``iou`` (fractions in [0, 1]) and ``mean_abs_dp`` (mean absolute
    probability difference to the float32 model, in [0, 1]). The float32 row's ``bytes`` is the
    size of the float32 state_dict written with ``torch.save``; ``param_bytes`` adds 4 bytes
    per parameter. Quantized files go to ``workdir`` (kept) or a temporary folder (removed).
    """
    bits = [int(b) for b in bits]
    if scheme is not None:
        check_scheme(scheme)
    for b in bits:
        if not 1 <= b <= 8:
            raise ValueError(f"bits must be integers from 1 to 8, got {b}")
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    note = progress or (lambda _msg: None)

    if checkpoint is None:
        checkpoint = default_checkpoint_path()
        if not Path(checkpoint).is_file():
            raise E.CheckpointError(
                "the embedded trained checkpoint is missing; pass --checkpoint PATH",
                path=checkpoint,
            )
    state = read_checkpoint(checkpoint).state_dict
    float_model = build_model(_float32(state), checkpoint)
    state = _float32(float_model.state_dict())
    params = sum(t.numel() for t in state.values())

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or cpu_count())
    try:
        scratch = (
            contextlib.nullcontext(os.fspath(workdir))
            if workdir is not None
            else tempfile.TemporaryDirectory(prefix="qpack-demo-")
        )
        with scratch as tmp:
            folder = Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            note(f"generating {samples} held-out patches (seed {seed})")
            x, y = make_patches(samples, seed)

            float_path = folder / "unet_float32.pt"
            torch.save(state, float_path)
            float_bytes = float_path.stat().st_size
            note("evaluating float32")
            reference = predict(float_model, x, batch_size)
            rows = [
                {
                    "model": "float32",
                    "bits": 32,
                    "scheme": "-",
                    "bytes": float_bytes,
                    "param_bytes": 4 * params,
                    "ratio": 1.0,
                    **score(reference, y, reference),
                }
            ]
            name = Path(checkpoint).name
            planner = None
            if not uniform:
                note("calibrating on synthetic patches: layer statistics and sensitivities")
                calibration, _ = make_patches(CALIBRATION_PATCHES, CALIBRATION_SEED)
                planner = Planner(
                    state,
                    model=build_model(state, checkpoint),
                    calibration=torch.from_numpy(calibration).split(16),
                    postprocess=torch.sigmoid,
                )
            for b in bits:
                for label, how, options in _settings(b, scheme, origin, planner):
                    path = folder / f"unet_{label}_{b}bit.qpk"
                    pack(state, path, metadata={"source": name}, **options)
                    size = path.stat().st_size
                    note(f"evaluating {label} {b}-bit ({size:,} bytes)")
                    model = build_model(load(path), path)
                    rows.append(
                        {
                            "model": f"{label} {b}-bit",
                            "bits": b,
                            "scheme": how,
                            "bytes": size,
                            "param_bytes": 4 * params,
                            "ratio": float_bytes / size,
                            **score(predict(model, x, batch_size), y, reference),
                        }
                    )
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def _settings(bits: int, scheme: str | None, origin: bool, planner: Planner | None):
    """(label, description, save options) of the files compared at one bit width."""
    if origin:
        # the origin's per-layer symmetric quantizer, stored densely: what it never had
        yield (
            "origin",
            "symmetric-per-layer, fixed-width",
            {
                "bits": bits,
                "scheme": "symmetric-per-layer",
                "entropy": False,
            },
        )
    if planner is None:
        scheme = scheme or DEFAULT_SCHEME
        yield "qpack", f"{scheme}, Huffman", {"bits": bits, "scheme": scheme, "entropy": True}
    else:
        planned = planner.plan(bits=bits, scheme=scheme)
        plan = planned.options
        coded, halves = widths(plan["bits"])
        schemes = plan["scheme"]
        if isinstance(schemes, str):
            schemes = dict.fromkeys(coded, schemes)
        finer = [parse_scheme(s)[0].rsplit("-", 1)[-1] for s in schemes.values()]
        kinds = [f"{finer.count(k)} per-{k}" for k in ("channel", "group") if k in finer]
        if halves:
            kinds.append(f"{halves} float16")
        span = f"{min(coded):g}-{max(coded):g} bits" if coded else "float16"
        layers = len(coded) + halves
        how = f"Huffman, {span}, {layers} layers ({', '.join(kinds) or 'all per-layer'}), GPTQ"
        yield "qpack", how, {"planned": planned, "entropy": True}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`run_demo` as a plain-text table, with a note on the float32 size."""
    head = ("model", "stored as", "size (kB)", "ratio", "dice %", "IoU %", "mean|dp| %")
    body = []
    for r in rows:
        dp = r.get("mean_abs_dp")
        body.append(
            (
                str(r["model"]),
                str(r["scheme"]),
                f"{r['bytes'] / 1000:.1f}",
                f"{r['ratio']:.2f}x",
                f"{100 * r['dice']:.2f}",
                f"{100 * r['iou']:.2f}",
                "-" if dp is None else f"{100 * dp:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    left = {0, 1}

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *(line(row) for row in body)]
    if rows and rows[0].get("model") == "float32":
        first = rows[0]
        out.append(
            f"float32 size: the {FLOAT_SIZE_BASIS} ({first['bytes']:,} bytes; "
            f"{first['param_bytes']:,} bytes at 4 per parameter). kB = 1000 bytes; "
            "ratio = float32 size / size; mean|dp| = mean |p - p_float32| over all pixels."
        )
    return "\n".join(out)
