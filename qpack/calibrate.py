"""Calibration statistics for model-aware quantization: the second moment of every layer's
inputs, gathered by one pass of the model over calibration data.

A layer computes ``y = W x`` on each input row ``x`` (a Linear's last dimension, a conv's
im2col patch), so changing its weight by ``dW`` changes the output by ``dW x``, and over the
``count`` rows seen the total squared change is ``count * trace(dW H dW^T)`` with
``H = mean(x x^T)``. That makes ``H`` the statistic that :mod:`qpack.gptq` rounds against
and that predicts a layer's output error in closed form.

Convolutions with stride 1 (the usual case) sum products of shifted copies of the input
(:class:`_ShiftPlan`), about 6 times fewer operations than multiplying out the im2col patches
of a 3x3 kernel, which is how strided ones are done, a bounded piece at a time.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerStats", "layer_statistics"]

# Float32 elements of unfolded patches (or shifted copies) handled at a time: 64 MiB.
CHUNK_ELEMENTS = 16 << 20

_HOOKED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)


@dataclass
class LayerStats:
    """Input statistics of one layer.

    ``hessian`` (float64, shape (groups, cols, cols)) is the mean of ``x x^T`` over the
    ``count`` input rows the layer saw (one per sample and output position), its columns
    in the order of ``weight.reshape(out_channels, -1)``'s columns; group ``g`` is the
    input of output channels ``g * out/groups`` to ``(g + 1) * out/groups``.
    """

    hessian: np.ndarray
    count: int
    groups: int


def layer_statistics(
    model: nn.Module,
    inputs: Iterable,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LayerStats]:
    """Run ``model`` over ``inputs`` (in eval mode, without gradients) and return the input
    statistics of every Linear and Conv1d/2d/3d that ran, keyed by the state_dict name of
    its weight (the first name, for a weight shared by several modules, whose inputs then
    add up; a module called several times adds up every call).

    Each item of ``inputs`` is a tensor (``model(x)``), a tuple or list (``model(*x)``) or a
    dict (``model(**x)``). RNN, GRU and LSTM weights get the statistics of their inputs
    and of the hidden states before each step. Other layer kinds (ConvTranspose, Embedding,
    attention's own projections, ...) and layers that never ran get no entry. ``progress``
    is called after each item.
    """
    names: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), name)
    accumulators: dict[int, _Accumulator] = {}
    scratch = _Scratch()  # the hooks run one at a time
    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for module in model.modules():
            weight = module._parameters.get("weight") if isinstance(module, _HOOKED) else None
            if weight is None or id(weight) not in names:  # e.g. a parametrized weight
                continue
            groups = getattr(module, "groups", 1)
            acc = accumulators.get(id(weight))
            if acc is None:
                acc = accumulators[id(weight)] = _Accumulator(names[id(weight)], groups, scratch)
            if acc.groups != groups:
                raise ValueError(f"{acc.name} is shared by layers with different groups")
            handles.append(module.register_forward_hook(acc.hook, with_kwargs=True))
        for module in model.modules():
            if isinstance(module, _RECURRENT) and not getattr(module, "proj_size", 0):
                hook = _Recurrent(module, names, accumulators, scratch)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for i, item in enumerate(inputs, 1):
                if isinstance(item, dict):
                    model(**item)
                elif isinstance(item, (tuple, list)):
                    model(*item)
                else:
                    model(item)
                if progress is not None:
                    progress(f"calibration batch {i}: {len(accumulators)} layers")
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:  # per module: a model may hold frozen parts in eval mode
            m.training = training
    return {a.name: a.result() for a in accumulators.values() if a.count}


class _Recurrent:
    """A forward hook feeding the weights of an RNN, GRU or LSTM: ``weight_ih_l{k}`` sees
    layer k's input at every step, ``weight_hh_l{k}`` the hidden state before every step.
    The layers are run again one at a time (one direction at a time) to see those; packed
    sequences and projected LSTMs are not followed (their weights are rounded to nearest).
    """

    def __init__(self, module: nn.RNNBase, names: dict, accumulators: dict, scratch):
        self.accumulators = {}
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("weight_") and id(param) in names:
                acc = accumulators.get(id(param))
                if acc is None:
                    acc = accumulators[id(param)] = _Accumulator(names[id(param)], 1, scratch)
                self.accumulators[name] = acc

    def __call__(self, module: nn.RNNBase, args: tuple, kwargs: dict, output) -> None:
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if not isinstance(x, torch.Tensor):
            return  # a PackedSequence
        x = x.detach().float()
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
        elif module.batch_first:
            x = x.transpose(0, 1)  # (steps, batch, features)
        if isinstance(hx, tuple):  # an LSTM's (h0, c0)
            hx = tuple(h if batched else h.unsqueeze(1) for h in hx)
        elif hx is not None and not batched:
            hx = hx.unsqueeze(1)
        directions = 2 if module.bidirectional else 1
        layer_input = x
        for k in range(module.num_layers):
            outputs = []
            for d in range(directions):
                suffix = f"l{k}" + ("_reverse" if d else "")
                h0 = _initial(hx, k * directions + d)
                seq = layer_input.flip(0) if d else layer_input
                out = _one_layer(module, suffix, seq, h0)
                before = torch.cat([_first_state(h0, out), out[:-1]])
                self._add(f"weight_ih_{suffix}", seq)
                self._add(f"weight_hh_{suffix}", before)
                outputs.append(out.flip(0) if d else out)
            layer_input = torch.cat(outputs, dim=2)

    def _add(self, name: str, rows: torch.Tensor) -> None:
        acc = self.accumulators.get(name)
        if acc is not None:
            acc.cols = rows.shape[-1]
            acc._add_rows(rows.reshape(-1, rows.shape[-1]))


def _initial(hx, index: int):
    """The initial state of one layer and direction (None: zeros)."""
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(h[index : index + 1] for h in hx)
    return hx[index : index + 1]


def _first_state(h0, out: torch.Tensor) -> torch.Tensor:
    """The hidden state before the first step, shaped (1, batch, hidden)."""
    if h0 is None:
        return out.new_zeros((1, *out.shape[1:]))
    return (h0[0] if isinstance(h0, tuple) else h0).float()


def _one_layer(module: nn.RNNBase, suffix: str, seq: torch.Tensor, h0) -> torch.Tensor:
    """The outputs (steps, batch, hidden) of one layer and direction of ``module``."""
    single = {"input_size": seq.shape[-1], "hidden_size": module.hidden_size, "num_layers": 1,
              "bias": module.bias, "batch_first": False}
    if isinstance(module, nn.RNN):
        single["nonlinearity"] = module.nonlinearity
    layer = type(module)(**single).to(seq.device)
    params = {name.replace("l0", suffix, 1): name for name, _ in layer.named_parameters()}
    with torch.no_grad():
        for theirs, ours in params.items():
            getattr(layer, ours).copy_(getattr(module, theirs))
        out, _ = layer(seq, h0) if h0 is not None else layer(seq)
    return out.float()


class _Accumulator:
    """Float64 sums of one weight's input products, fed by a forward hook."""

    def __init__(self, name: str, groups: int, scratch: _Scratch):
        self.name = name
        self.groups = groups
        self.scratch = scratch
        self.cols = 0  # inputs per output channel, known at the first call (lazy modules)
        self.total: torch.Tensor | None = None
        self.count = 0
        # stride-1 convs: float64 sums of partial products per input geometry, turned into
        # the Hessian once at the end (see _ShiftPlan)
        self.pending: dict[_ShiftPlan, torch.Tensor] = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        x = args[0] if args else kwargs["input"]
        x = x.detach()
        self.cols = module.weight[0].numel()
        if isinstance(module, nn.Linear):
            self._add_rows(x.reshape(-1, x.shape[-1]))
        else:
            self._add_conv(module, x)

    def _sums(self, device: torch.device) -> torch.Tensor:
        if self.total is None:
            shape = (self.groups, self.cols, self.cols)
            self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        return self.total

    def _add_rows(self, rows: torch.Tensor) -> None:
        total = self._sums(rows.device)
        step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step].float().reshape(-1, self.groups, self.cols)
            total += _gram(chunk, chunk)
        self.count += rows.shape[0]

    def _add_conv(self, module: nn.Module, x: torch.Tensor) -> None:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if x.dim() == len(kernel) + 1:  # unbatched input
            x = x.unsqueeze(0)
        widths = _pad_widths(module)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        low, high = widths[-2::-2], widths[::-2]  # per axis, first axis first
        size = [s + a + b for s, a, b in zip(x.shape[2:], low, high, strict=True)]
        out = [
            (s - d * (k - 1) - 1) // st + 1
            for s, d, k, st in zip(size, dilation, kernel, stride, strict=True)
        ]
        self.count += x.shape[0] * math.prod(out)
        channels = x.shape[1]
        # the shifted path holds the input and two copies of it; a sample too big for that
        # goes by im2col, which can cut a sample into pieces
        shifted = all(s == 1 for s in stride) and 3 * channels * math.prod(size) <= CHUNK_ELEMENTS
        if shifted:
            samples = CHUNK_ELEMENTS // (3 * channels * math.prod(size))
            plan = _shift_plan(tuple(kernel), tuple(dilation), tuple(size))
            sums = self.pending.get(plan)
            if sums is None:
                per_group = channels // self.groups
                shape = (plan.atoms, self.groups, per_group, per_group)
                sums = self.pending[plan] = x.new_zeros(shape, dtype=torch.float64)
        else:
            samples = max(1, CHUNK_ELEMENTS // (math.prod(out) * channels * math.prod(kernel)))
        for n in range(0, x.shape[0], samples):
            part = F.pad(x[n : n + samples].float(), widths, mode=mode)  # what the conv sees
            if shifted:
                self._add_shifted(part, plan, sums)
            else:
                self._add_patches(part, kernel, dilation, stride, out)

    def _add_patches(self, x, kernel, dilation, stride, out) -> None:
        """Im2col: unfold the patches (a view), copy a piece at a time, multiply."""
        total = self._sums(x.device)
        windows = x
        for axis, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True)):
            windows = windows.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]
        dims = len(kernel)
        # [N, C, O..., K...] -> [N, O..., C, K...]: rows of channel-major patches
        windows = windows.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
        per_line = x.shape[0] * math.prod(out[1:]) * x.shape[1] * math.prod(kernel)
        lines = max(1, CHUNK_ELEMENTS // per_line)  # of the first output axis
        for o in range(0, out[0], lines):
            piece = self.scratch.copy(0, windows[:, o : o + lines])
            piece = piece.view(-1, self.groups, self.cols)
            total += _gram(piece, piece)

    def _add_shifted(self, x: torch.Tensor, plan: _ShiftPlan, sums: torch.Tensor) -> None:
        """Add the atoms of ``plan`` (stride 1) over padded input ``x`` to ``sums``."""
        g, per_group = self.groups, x.shape[1] // self.groups
        # [C, S0, N, S1...]: a run of axis-0 positions is then one view of contiguous rows
        # per channel, so axis-0 shifts copy nothing; other shifts copy a slab each
        xt = self.scratch.copy(0, x.movedim(0, 2))

        def slab(rest: tuple[slice, ...], slot: int) -> torch.Tensor:  # [G, C/G, S0, rows]
            part = xt[(slice(None), slice(None), slice(None), *rest)]
            if not part.is_contiguous():  # one copy, not one by each product of a thin slab
                part = self.scratch.copy(slot, part)
            return part.view(g, per_group, xt.shape[1], -1)

        # float32, added to the float64 sums at the end
        products = self.scratch.take(3, sums.shape, x.device)
        here_rest, here = None, None
        for rest, other_rest, atoms in plan.groups:
            if rest != here_rest:
                here_rest, here = rest, slab(rest, 1)
            there = here if other_rest == rest else slab(other_rest, 2)
            for a, b, index in atoms:
                left = here[:, :, a].reshape(g, per_group, -1)
                right = there[:, :, b].reshape(g, per_group, -1)
                torch.bmm(left, right.transpose(1, 2), out=products[index])
        sums += products

    def result(self) -> LayerStats:
        total = self.total
        for plan, sums in self.pending.items():
            assembled = plan.assemble(sums).reshape(self.groups, self.cols, self.cols)
            total = assembled if total is None else total + assembled
        hessian = (total / self.count).cpu().numpy()
        return LayerStats(hessian=hessian, count=self.count, groups=self.groups)


class _Scratch:
    """Float32 buffers reused from call to call: fresh memory for every copy of a large
    slab made those copies 5 times slower (the pages are faulted in anew each time)."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape, device: torch.device) -> torch.Tensor:
        """An uninitialized float32 tensor of ``shape`` in buffer ``slot``."""
        size = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < size or buffer.device != device:
            buffer = self.buffers[slot] = torch.empty(size, device=device)
        return buffer[:size].view(shape)

    def copy(self, slot: int, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous float32 copy of ``tensor`` in buffer ``slot``."""
        return self.take(slot, tensor.shape, tensor.device).copy_(tensor)


def _gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Float64 ``left[:, g]^T right[:, g]`` for each group g of float32 rows [R, G, *]."""
    product = torch.bmm(left.permute(1, 2, 0), right.transpose(0, 1))
    return product.double()


def _pad_widths(module: nn.Module) -> list[int]:
    """The padding of a conv in F.pad's order (last axis first, low side then high)."""
    kernel, dilation, padding = module.kernel_size, module.dilation, module.padding
    if padding == "valid":
        pairs = [(0, 0)] * len(kernel)
    elif padding == "same":  # as torch pads: the odd pixel of an even total goes high
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in padding]
    return [w for pair in reversed(pairs) for w in pair]


_Slices = tuple[slice, ...]


@dataclass(frozen=True, eq=False)
class _ShiftPlan:
    """How a stride-1 conv's Hessian is summed from products of shifted inputs, never
    forming its patches (for a 3x3 kernel, 13 products of the input with itself instead of
    one of patches 9 times as wide: about 6 times fewer operations).

    Block (k, k') of the Hessian (kernel positions k, k') is the sum over input positions
    u in window(k), the box of positions that kernel position k meets, of
    ``x(u) x(u + (k' - k) * dilation)^T``. Cutting every axis at every window's ends splits
    the input into boxes, each inside whole windows; a block is then a sum of per-box
    products ("atoms", one per box and offset), each shared by every pair of kernel positions
    with that offset. Only pairs with k <= k' are summed; the others are their transposes.
    """

    # atoms grouped by the slices on axes 1.. of the box and of its partner, each atom as
    # (slice of the box on axis 0, of the partner on axis 0, atom index)
    groups: tuple[tuple[_Slices, _Slices, tuple[tuple[slice, slice, int], ...]], ...]
    atoms: int
    positions: int  # of the kernel
    pairs: tuple[tuple[int, int, torch.Tensor], ...]  # (k, k', atoms summed into the block)

    def assemble(self, sums: torch.Tensor) -> torch.Tensor:
        """The Hessian [G, C, K, C, K] (channel-major columns) from the atom sums
        [atoms, G, C, C]."""
        g, c = sums.shape[1:3]
        out = sums.new_zeros((g, c, self.positions, c, self.positions))
        for k, k2, atoms in self.pairs:
            block = sums.index_select(0, atoms.to(sums.device)).sum(0)
            out[:, :, k, :, k2] = block
            out[:, :, k2, :, k] = block.transpose(1, 2)
        return out


@functools.lru_cache(maxsize=128)
def _shift_plan(
    kernel: tuple[int, ...], dilation: tuple[int, ...], size: tuple[int, ...]
) -> _ShiftPlan:
    """The plan for a padded input of spatial ``size``."""
    axes = []  # per axis: (start, stop, kernel positions whose window holds it)
    for k, d, s in zip(kernel, dilation, size, strict=True):
        out = s - d * (k - 1)
        starts = [i * d for i in range(k)]
        cuts = sorted({*starts, *(a + out for a in starts)})
        holders = [
            (lo, hi, tuple(i for i, a in enumerate(starts) if a <= lo and hi <= a + out))
            for lo, hi in itertools.pairwise(cuts)
        ]
        axes.append([piece for piece in holders if piece[2]])
    flat = np.arange(math.prod(kernel)).reshape(kernel)
    pair_atoms: dict[tuple[int, int], list[int]] = {}
    groups: dict[tuple, list] = {}
    atoms = 0
    for box in itertools.product(*axes):
        offsets: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for first in itertools.product(*(holders for _, _, holders in box)):
            for second in itertools.product(*(range(k) for k in kernel)):
                if flat[second] >= flat[first]:
                    delta = tuple(b - a for a, b in zip(first, second, strict=True))
                    offsets.setdefault(delta, []).append((int(flat[first]), int(flat[second])))
        for delta, pairs in sorted(offsets.items()):
            for pair in pairs:
                pair_atoms.setdefault(pair, []).append(atoms)
            here = [(lo, hi) for lo, hi, _ in box]
            moved = [
                (lo + e * d, hi + e * d)
                for (lo, hi), e, d in zip(here, delta, dilation, strict=True)
            ]
            key = (tuple(here[1:]), tuple(moved[1:]))  # ranges: slices are unhashable
            groups.setdefault(key, []).append((slice(*here[0]), slice(*moved[0]), atoms))
            atoms += 1
    return _ShiftPlan(
        groups=tuple(
            (_slices(rest), _slices(other), tuple(found))
            for (rest, other), found in sorted(groups.items())  # a box's groups in a row
        ),
        atoms=atoms,
        positions=int(flat.size),
        pairs=tuple((k, k2, torch.tensor(a)) for (k, k2), a in sorted(pair_atoms.items())),
    )


def _slices(ranges: tuple[tuple[int, int], ...]) -> _Slices:
    return tuple(slice(lo, hi) for lo, hi in ranges)
