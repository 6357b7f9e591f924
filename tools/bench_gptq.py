"""GPTQ against round-to-nearest on the embedded UNet.

Gathers the layer statistics (:func:`qpack.calibrate.layer_statistics`) on ``--calib``
calibration patches, then for each width quantizes every conv weight on the per-channel grid
of ``asymmetric-per-channel`` twice: codes by round-to-nearest, and by GPTQ
(:func:`qpack.gptq.gptq_codes`) for each damp / act-order setting. Biases stay float in
both. Prints the wall and CPU times of the statistics and of GPTQ over all weights, and the
mean |sigmoid(quantized output) - sigmoid(float output)| over ``--heldout`` held-out
patches::

    python3 tools/bench_gptq.py [--calib 256] [--heldout 300] [--bits 3 4] [--threads 2]
        [--damp 0.01 ...] [--no-act-order] [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from qpack.calibrate import layer_statistics
from qpack.demo.synthetic import CALIBRATION_SEED, HELDOUT_SEED, make_patches
from qpack.demo.unet import load_default
from qpack.gptq import gptq_codes, output_error
from qpack.schemes import dequantize, levels_for, quantize

SCHEME = "asymmetric-per-channel"


def timed(fn, repeat: int = 1):
    """(result, wall seconds, CPU seconds of this process) of the fastest of ``repeat`` calls
    of ``fn()`` (on a shared machine the fastest is the least disturbed)."""
    best = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        run = (result, time.perf_counter() - wall, time.process_time() - cpu)
        best = run if best is None or run[1] < best[1] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--bits", type=float, nargs="+", default=[3.0, 4.0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--damp", type=float, nargs="+", default=[0.01])
    parser.add_argument("--no-act-order", action="store_true", help="also without act order")
    parser.add_argument("--repeat", type=int, default=1, help="time the fastest of N runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_default()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = torch.from_numpy(make_patches(args.calib, CALIBRATION_SEED)[0])
    heldout = torch.from_numpy(make_patches(args.heldout, HELDOUT_SEED)[0])

    def probabilities() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.sigmoid(model(b)) for b in heldout.split(args.batch)])

    reference = probabilities()

    def score(weights: dict[str, np.ndarray]) -> float:
        model.load_state_dict({**state, **{k: torch.from_numpy(v) for k, v in weights.items()}})
        try:
            return float((probabilities() - reference).abs().mean())
        finally:
            model.load_state_dict(state)

    def forward_all():
        with torch.no_grad():
            for b in calib.split(args.batch):
                model(b)

    _, wall, cpu = timed(forward_all, args.repeat)
    print(f"forward alone, {args.calib} patches: {wall:.2f} s wall, {cpu:.2f} s CPU")
    stats, wall, cpu = timed(lambda: layer_statistics(model, calib.split(args.batch)), args.repeat)
    print(f"layer_statistics, {args.calib} patches: {wall:.2f} s wall, {cpu:.2f} s CPU")

    settings = [(d, True) for d in args.damp]
    if args.no_act_order:
        settings += [(d, False) for d in args.damp]
    print("bits  codes                    GPTQ s (wall/CPU)  pred. out. err  mean|dp| %  vs RTN")
    for bits in args.bits:
        grids = {k: quantize(state[k].numpy(), bits, SCHEME) for k in stats}
        rtn = {k: q.codes for k, q in grids.items()}
        rtn_weights = decoded(state, grids, rtn)
        base = score(rtn_weights)
        print(
            f"{bits:4g}  RTN{'':22s}{'':19s}{predicted(state, stats, rtn_weights):14.4g}"
            f"  {100 * base:10.3f}"
        )
        for damp, act_order in settings:
            run = functools.partial(gptq_all, state, stats, grids, bits, damp, act_order)
            codes, wall, cpu = timed(run, args.repeat)
            weights = decoded(state, grids, codes)
            err = score(weights)
            label = f"GPTQ damp={damp:g} act_order={'on' if act_order else 'off'}"
            print(
                f"{bits:4g}  {label:25s}{wall:7.2f} / {cpu:5.2f}     "
                f"{predicted(state, stats, weights):14.4g}  {100 * err:10.3f}  {err / base:5.2f}x"
            )


def gptq_all(state, stats, grids, bits, damp, act_order) -> dict[str, np.ndarray]:
    """GPTQ codes of every weight with statistics."""
    return {
        k: gptq_codes(
            state[k].numpy(),
            s.hessian,
            grids[k].scale,
            grids[k].zero_point,
            levels_for(bits),
            granularity=grids[k].granularity,
            damp=damp,
            act_order=act_order,
        )
        for k, s in stats.items()
    }


def decoded(state, grids, codes) -> dict[str, np.ndarray]:
    """The float32 weights that ``codes`` decode to on ``grids``."""
    return {
        k: dequantize(c, grids[k].scale, grids[k].zero_point).reshape(state[k].shape)
        for k, c in codes.items()
    }


def predicted(state, stats, weights) -> float:
    """The summed closed-form output error of the weight changes (per output position)."""
    return sum(output_error(weights[k] - state[k].numpy(), s.hessian) for k, s in stats.items())


if __name__ == "__main__":
    main()
