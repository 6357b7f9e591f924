"""A zoo of small non-UNet models, each with its own synthetic task, for evaluating qpack.

qpack must serve any PyTorch model, not only the embedded UNet; this module gives it models of
other architectures with their own float checkpoints, calibration and held-out data:

- ``lstm`` (:class:`WordLSTM`): a 2-layer LSTM over 50 frames of 40 frequency bands with a
  Linear head, classifying 12 noisy synthetic spoken "words" (sequences of formant patterns
  with timing jitter, speaker shift, interfering tones and noise). Pairs of words differ only
  in the order of two sounds, so the model must use time order.
- ``conv1d`` (:class:`SignalCNN`): a 1-D CNN with BatchNorm, dilated convolutions and
  depthwise-separable blocks, pooled into a 768-wide Linear head, classifying the modulation
  of 256 complex baseband samples (BPSK, QPSK, 8PSK, 16QAM, PAM4, 2FSK, 4FSK, AM) under
  random symbol rate, timing, phase, frequency offset and noise (-2 to 18 dB SNR).
- ``attn`` (:class:`TinyTransformer`): a 2-layer pre-norm Transformer encoder (token,
  previous-token and position embeddings, ``nn.MultiheadAttention``, LayerNorm, a Linear
  head) classifying 32-token sequences drawn from one of 10 class-specific Markov chains
  that share their unigram statistics, so the model must read token order.

Every model builds with no arguments (a CLI can name one as ``tools/zoo.py:WordLSTM``) and
outputs logits. Every task's ``make_data(split, n=None)`` returns ``(inputs, labels)``
(float32 / int64 tensors) deterministically from fixed seeds that differ per split:
``"train"`` (the training set), ``"calibration"`` (256 examples, e.g. for qpack's allocator)
and ``"heldout"`` (2000 examples, for reporting). Examples are generated in fixed chunks of
:data:`CHUNK`, each from its own seed, so ``make_data(split, k)`` is the first ``k`` examples
of ``make_data(split, n)`` for every ``k <= n``.

Usage::

    import zoo                                        # with tools/ on sys.path
    spec = zoo.ZOO["lstm"]
    model = spec.load()                               # trained float model, eval mode
    x, y = spec.make_data("heldout")
    ref = zoo.predict(model, x)
    q_model = spec.build(); q_model.load_state_dict(dequantized_state, strict=True)
    zoo.output_error(ref, zoo.predict(q_model, x), y)  # mean_abs_dp, top1_agreement, ...

Checkpoints (float32 state_dicts; BatchNorm's ``num_batches_tracked`` stays int64, as
PyTorch makes it) and their training records are ``tools/zoo/<name>.pt`` / ``.json``, written
by ``tools/train_zoo.py``. Data are generated with numpy's PCG64 and are reproducible on one
numpy build; another CPU or numpy version may differ in the last float bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "CALIBRATION_N",
    "CHUNK",
    "HELDOUT_N",
    "SPLITS",
    "ZOO",
    "ZOO_DIR",
    "SignalCNN",
    "Spec",
    "TinyTransformer",
    "WordLSTM",
    "make_evaluator",
    "make_signals",
    "make_tokens",
    "make_words",
    "n_params",
    "output_error",
    "predict",
]

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
SPLITS = ("train", "calibration", "heldout")
CALIBRATION_N = 256
HELDOUT_N = 2000
#: Examples per generated chunk; each chunk has its own seed, so prefixes are stable.
CHUNK = 256
# Per-split seeds, mixed with a per-task key so that no two tasks or splits share a stream.
_SPLIT_SEEDS = {"train": 11, "calibration": 22, "heldout": 33}


def _check_split(split: str, n: int | None, train_n: int) -> int:
    """The example count for ``split`` (its default when ``n`` is None)."""
    defaults = {"train": train_n, "calibration": CALIBRATION_N, "heldout": HELDOUT_N}
    if split not in defaults:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    n = defaults[split] if n is None else int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def _generate(
    task_key: int,
    split: str,
    n: int,
    chunk_fn: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``ceil(n / CHUNK)`` chunks of ``chunk_fn(rng, CHUNK)``, truncated to n.

    Whole chunks are always generated, so an example depends only on (task, split, index).
    """
    xs, ys = [], []
    for c in range(-(-n // CHUNK)):
        rng = np.random.default_rng(np.random.SeedSequence([task_key, _SPLIT_SEEDS[split], c]))
        x, y = chunk_fn(rng, CHUNK)
        xs.append(x if x.dtype.kind in "iu" else x.astype(np.float32, copy=False))
        ys.append(y.astype(np.int64, copy=False))
    if not xs:
        x0, _ = chunk_fn(np.random.default_rng(0), 1)  # only for the shape and dtype
        x0 = x0 if x0.dtype.kind in "iu" else x0.astype(np.float32)
        return torch.from_numpy(x0[:0].copy()), torch.zeros(0, dtype=torch.int64)
    x = np.concatenate(xs)[:n]
    y = np.concatenate(ys)[:n]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit std per example (over all but the first axis)."""
    axes = tuple(range(1, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    return x / (x.std(axis=axes, keepdims=True) + 1e-6)


# ====================================================================== words (LSTM)

WORDS_KEY = 7101
N_FRAMES = 50
N_BANDS = 40
N_WORDS = 12
_N_PHONES = 10
_MAX_PHONES = 5  # phones per word
_MAX_FORMANTS = 3
_MAX_WORD_FRAMES = 44.0
# Per-example noise std, log-uniform (clean peaks are ~1): sets how many examples are
# too noisy to classify, i.e. the accuracy ceiling.
_WORDS_NOISE = (0.15, 1.4)


@functools.lru_cache(maxsize=1)
def _words_lexicon() -> tuple[np.ndarray, ...]:
    """The fixed task: phone formants and the 12 words' phone sequences and durations.

    Words 0-5 are random; 6-8 are words 0-2 with two adjacent phones swapped (distinguishable
    only by order) and 9-11 are words 3-5 with one phone replaced.
    """
    rng = np.random.default_rng(np.random.SeedSequence([WORDS_KEY, 0]))
    k = rng.integers(2, _MAX_FORMANTS + 1, _N_PHONES)
    centers = rng.uniform(2.0, N_BANDS - 3.0, (_N_PHONES, _MAX_FORMANTS))
    widths = rng.uniform(0.8, 2.5, (_N_PHONES, _MAX_FORMANTS))
    amps = rng.uniform(0.5, 1.0, (_N_PHONES, _MAX_FORMANTS))
    amps[np.arange(_MAX_FORMANTS)[None, :] >= k[:, None]] = 0.0
    words: list[list[int]] = []
    durs: list[list[float]] = []
    for _ in range(6):
        length = int(rng.integers(3, _MAX_PHONES + 1))
        seq = [int(rng.integers(_N_PHONES))]
        while len(seq) < length:
            p = int(rng.integers(_N_PHONES))
            if p != seq[-1]:
                seq.append(p)
        words.append(seq)
        durs.append(list(rng.uniform(5.0, 9.0, length)))
    for w in range(3):
        seq, dur = list(words[w]), list(durs[w])
        i = int(rng.integers(len(seq) - 1))
        while seq[i] == seq[i + 1]:  # cannot happen (no repeats), kept for safety
            i = (i + 1) % (len(seq) - 1)
        seq[i], seq[i + 1] = seq[i + 1], seq[i]
        dur[i], dur[i + 1] = dur[i + 1], dur[i]
        words.append(seq)
        durs.append(dur)
    for w in range(3, 6):
        seq, dur = list(words[w]), list(durs[w])
        i = int(rng.integers(len(seq)))
        seq[i] = int((seq[i] + 1 + rng.integers(_N_PHONES - 1)) % _N_PHONES)
        words.append(seq)
        durs.append(dur)
    assert len({tuple(w) for w in words}) == N_WORDS
    phones = np.full((N_WORDS, _MAX_PHONES), -1, dtype=np.int64)
    dur_arr = np.zeros((N_WORDS, _MAX_PHONES))
    for w, (seq, dur) in enumerate(zip(words, durs, strict=True)):
        phones[w, : len(seq)] = seq
        dur_arr[w, : len(dur)] = dur
    return centers, widths, amps, phones, dur_arr


def _words_chunk(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``m`` spectrogram-like examples [m, N_FRAMES, N_BANDS] and their word labels."""
    centers, widths, amps, phones, nominal = _words_lexicon()
    y = rng.integers(0, N_WORDS, m)
    ph = phones[y]
    valid = ph >= 0
    # Timing: a speaking rate per example, jitter per phone, then a random start.
    rate = rng.uniform(0.75, 1.3, (m, 1))
    dur = nominal[y] * rate * rng.uniform(0.75, 1.25, (m, _MAX_PHONES)) * valid
    dur *= np.minimum(1.0, _MAX_WORD_FRAMES / dur.sum(axis=1, keepdims=True))
    total = dur.sum(axis=1)
    start = rng.uniform(1.0, N_FRAMES - 1.0 - total)
    ends = start[:, None] + np.cumsum(dur, axis=1)
    begins = ends - dur
    t = np.arange(N_FRAMES)[None, :, None] + 0.5
    tau = rng.uniform(0.4, 1.2, (m, 1, 1))  # coarticulation: soft phone boundaries
    weight = _sigmoid((t - begins[:, None, :]) / tau) - _sigmoid((t - ends[:, None, :]) / tau)
    weight *= valid[:, None, :]
    # Spectra: each phone's formants, moved by a per-speaker band shift and width scale.
    idx = np.where(valid, ph, 0)
    shift = rng.uniform(-1.5, 1.5, (m, 1, 1))
    c = centers[idx] + shift  # [m, phones, formants]
    wd = widths[idx] * rng.uniform(0.8, 1.25, (m, 1, 1))
    a = amps[idx] * rng.uniform(0.7, 1.3, (m, _MAX_PHONES, _MAX_FORMANTS))
    f = np.arange(N_BANDS, dtype=np.float64)
    spec = (a[..., None] * np.exp(-0.5 * ((f - c[..., None]) / wd[..., None]) ** 2)).sum(axis=2)
    x = np.einsum("mti,mif->mtf", weight, spec)
    x *= 1.0 + 0.15 * rng.standard_normal((m, N_FRAMES, 1))  # loudness flutter
    # Interference: a steady tone at a random band in 40% of the examples.
    tone = rng.random(m) < 0.4
    band = rng.uniform(0, N_BANDS, m)
    level = rng.uniform(0.2, 0.8, m) * tone
    x += (level[:, None] * np.exp(-0.5 * (f[None, :] - band[:, None]) ** 2))[:, None, :]
    lo, hi = _WORDS_NOISE
    sigma = np.exp(rng.uniform(math.log(lo), math.log(hi), (m, 1, 1)))
    x += sigma * rng.standard_normal((m, N_FRAMES, N_BANDS))
    return _standardize(x), y


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def make_words(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-spotting data: inputs float32 [n, 50, 40] (frames x bands), labels int64 in 0-11."""
    n = _check_split(split, n, ZOO["lstm"].train_n)
    return _generate(WORDS_KEY, split, n, _words_chunk)


class WordLSTM(nn.Module):
    """2-layer LSTM (40 -> 192 -> 192) over the frames, mean-pooled, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_BANDS, 192, num_layers=2, batch_first=True)
        self.head = nn.Linear(192, N_WORDS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 12] of inputs [N, frames, 40]."""
        out, _ = self.lstm(x)
        return self.head(out.mean(dim=1))


# ====================================================================== signals (1-D CNN)

SIGNALS_KEY = 7202
SIGNAL_LEN = 256
MODULATIONS = ("bpsk", "qpsk", "8psk", "16qam", "pam4", "2fsk", "4fsk", "am")
_SNR_DB = (-2.0, 18.0)
# Pulse-shaping filter (a short Hann window), fixed so shaping vectorizes over the batch.
_PULSE = np.hanning(7)[1:-1] / np.hanning(7)[1:-1].sum()


@functools.lru_cache(maxsize=1)
def _constellations() -> np.ndarray:
    """[8, 16] complex symbol tables (FSK rows: frequency deviations), indexed by symbol."""
    k = np.arange(16)
    table = np.zeros((len(MODULATIONS), 16), dtype=np.complex128)
    table[0] = np.where(k % 2 == 0, 1.0, -1.0)
    table[1] = np.exp(1j * (np.pi / 4 + np.pi / 2 * (k % 4)))
    table[2] = np.exp(2j * np.pi * (k % 8) / 8)
    levels = np.array([-3.0, -1.0, 1.0, 3.0])
    table[3] = (levels[k % 4] + 1j * levels[k // 4]) / math.sqrt(10.0)
    table[4] = levels[k % 4] / math.sqrt(5.0)
    table[5] = np.where(k % 2 == 0, 1.0, -1.0)
    table[6] = levels[k % 4] / 3.0
    return table


def _shape_pulses(x: np.ndarray) -> np.ndarray:
    """Filter each row of x with :data:`_PULSE` ('same' length, edge-padded)."""
    half = len(_PULSE) // 2
    padded = np.pad(x, ((0, 0), (half, half)), mode="edge")
    out = np.zeros_like(x)
    for i, h in enumerate(_PULSE):
        out += h * padded[:, i : i + x.shape[1]]
    return out


def _signals_chunk(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``m`` I/Q examples [m, 2, SIGNAL_LEN] and their modulation labels."""
    y = rng.integers(0, len(MODULATIONS), m)
    t = np.arange(SIGNAL_LEN, dtype=np.float64)
    sps = rng.uniform(4.0, 9.0, (m, 1))  # samples per symbol
    offset = rng.uniform(0.0, 1.0, (m, 1)) * sps
    sym_idx = np.floor((t[None, :] + offset) / sps).astype(np.int64)  # [m, L]
    symbols = rng.integers(0, 16, (m, SIGNAL_LEN // 4 + 4))
    sym = np.take_along_axis(symbols, sym_idx, axis=1)
    value = _constellations()[y[:, None], sym]  # [m, L]
    linear = _shape_pulses(value.real) + 1j * _shape_pulses(value.imag)
    # FSK: continuous phase, Gaussian-ish smoothed frequency; modulation index 0.5-1.
    h = rng.uniform(0.5, 1.0, (m, 1))
    freq = _shape_pulses(value.real) * h / (2.0 * sps)
    fsk = np.exp(2j * np.pi * np.cumsum(freq, axis=1))
    # AM: carrier plus a smooth random message.
    fm = rng.uniform(0.003, 0.03, (m, 3, 1))
    msg = (
        rng.uniform(0.3, 1.0, (m, 3, 1))
        * np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi, (m, 3, 1)))
    ).sum(axis=1)
    msg /= np.abs(msg).max(axis=1, keepdims=True) + 1e-9
    am = 1.0 + rng.uniform(0.3, 0.9, (m, 1)) * msg
    kind = np.array([0, 0, 0, 0, 0, 1, 1, 2])[y][:, None]
    s = np.where(kind == 0, linear, np.where(kind == 1, fsk, am))
    s /= np.sqrt(np.mean(np.abs(s) ** 2, axis=1, keepdims=True))
    # Channel: phase, small carrier-frequency offset, white noise at a random SNR.
    phase = rng.uniform(0, 2 * np.pi, (m, 1)) + 2 * np.pi * rng.uniform(-2e-3, 2e-3, (m, 1)) * t
    s = s * np.exp(1j * phase)
    snr = rng.uniform(*_SNR_DB, (m, 1))
    noise_std = np.sqrt(10.0 ** (-snr / 10.0) / 2.0)
    s = s + noise_std * (
        rng.standard_normal((m, SIGNAL_LEN)) + 1j * rng.standard_normal((m, SIGNAL_LEN))
    )
    x = np.stack([s.real, s.imag], axis=1)
    return x / np.sqrt(np.mean(x**2, axis=(1, 2), keepdims=True)), y


def make_signals(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Modulation data: inputs float32 [n, 2, 256] (I and Q), labels int64 in 0-7."""
    n = _check_split(split, n, ZOO["conv1d"].train_n)
    return _generate(SIGNALS_KEY, split, n, _signals_chunk)


def _conv_bn(cin: int, cout: int, k: int, **kw: Any) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, k, bias=False, **kw), nn.BatchNorm1d(cout), nn.ReLU()]


class SignalCNN(nn.Module):
    """1-D CNN: strided and dilated Conv1d+BatchNorm+ReLU, two depthwise-separable blocks
    (Conv1d with groups=channels, then 1x1), mean/max/std pooling over time to 768 features,
    and a 768 -> 256 -> 8 Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(2, 64, 7, padding=3, stride=2),
            *_conv_bn(64, 96, 5, padding=2, stride=2),
            *_conv_bn(96, 128, 3, padding=2, dilation=2),
            *_conv_bn(128, 128, 3, padding=4, dilation=4),
            *_conv_bn(128, 128, 7, padding=3, groups=128),  # depthwise
            *_conv_bn(128, 256, 1),  # pointwise
            *_conv_bn(256, 256, 5, padding=2, stride=2, groups=256),
            *_conv_bn(256, 256, 1),
        )
        self.head = nn.Sequential(nn.Linear(768, 256), nn.ReLU(), nn.Linear(256, len(MODULATIONS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 8] of inputs [N, 2, length]."""
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2), h.std(dim=2)], dim=1)
        return self.head(pooled)


# ====================================================================== tokens (attention)

TOKENS_KEY = 7303
VOCAB = 48
SEQ_LEN = 32
N_CHAINS = 10
_N_PERMS = 12
# Each class mixes the same 12 permutation matrices with its own weights: a uniform share of
# 1 - _CHAIN_MIX plus _CHAIN_MIX times Dirichlet(1) weights. This sets how often 32 tokens are
# ambiguous: the Bayes-optimal classifier (which knows the chains) is right ~95% of the time.
_CHAIN_MIX = 0.9


@functools.lru_cache(maxsize=1)
def _chains() -> tuple[np.ndarray, np.ndarray]:
    """Start distribution [VOCAB] and per-class transition matrices [10, VOCAB, VOCAB].

    Every class's matrix is doubly stochastic (a mixture of permutation matrices), so every
    class has the uniform stationary distribution: token counts alone say little about the
    class; which token follows which does, and every transition is possible in every class.
    """
    rng = np.random.default_rng(np.random.SeedSequence([TOKENS_KEY, 0]))
    eye = np.eye(VOCAB)
    perms = np.stack([eye[rng.permutation(VOCAB)] for _ in range(_N_PERMS)])
    weights = (1.0 - _CHAIN_MIX) / _N_PERMS + _CHAIN_MIX * rng.dirichlet(
        np.ones(_N_PERMS), N_CHAINS
    )
    return np.full(VOCAB, 1.0 / VOCAB), np.einsum("ck,kij->cij", weights, perms)


def _tokens_chunk(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``m`` token-id sequences [m, SEQ_LEN] and their chain labels."""
    start, trans = _chains()
    y = rng.integers(0, N_CHAINS, m)
    cdf = np.cumsum(trans, axis=2)
    cdf[..., -1] = 1.0
    tok = np.empty((m, SEQ_LEN), dtype=np.int64)
    tok[:, 0] = rng.choice(VOCAB, size=m, p=start)
    u = rng.random((m, SEQ_LEN))
    for i in range(1, SEQ_LEN):
        rows = cdf[y, tok[:, i - 1]]  # [m, VOCAB]
        tok[:, i] = np.minimum((rows < u[:, i : i + 1]).sum(axis=1), VOCAB - 1)
    return tok, y


def make_tokens(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Markov-chain data: inputs int64 token ids [n, 32] in 0-47, labels int64 in 0-9."""
    n = _check_split(split, n, ZOO["attn"].train_n)
    return _generate(TOKENS_KEY, split, n, _tokens_chunk)


class TinyTransformer(nn.Module):
    """Token embeddings plus a token-shift embedding of the previous token (as in RWKV) and
    learned positions (dim 128), 2 pre-norm Transformer encoder layers (4 heads, FFN 512),
    final LayerNorm, mean pooling and a Linear head.

    The token shift lets each position see its bigram directly; without it the attention
    must first learn to find the previous position, which takes far longer than the ~4 min
    training budget on this task.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128)
        self.prev = nn.Embedding(VOCAB + 1, 128)  # index VOCAB: no previous token
        self.pos = nn.Parameter(torch.zeros(1, SEQ_LEN, 128))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            128, 4, dim_feedforward=512, dropout=0.0, batch_first=True, norm_first=True
        )
        # enable_nested_tensor only matters for padding masks, which this model never uses.
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, N_CHAINS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] of token ids [N, length <= 32]."""
        x = x.long()
        prev = torch.cat([torch.full_like(x[:, :1], VOCAB), x[:, :-1]], dim=1)
        h = self.embed(x) + self.prev(prev) + self.pos[:, : x.shape[1]]
        return self.head(self.norm(self.encoder(h)).mean(dim=1))


# ====================================================================== registry


class Spec(NamedTuple):
    """One zoo entry: model class, task data, and training settings.

    (A NamedTuple rather than a dataclass: it needs no ``sys.modules`` entry, so this file
    also works when loaded by path under any module name.)
    """

    name: str
    model: type[nn.Module]
    data: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    classes: tuple[str, ...]
    task: str
    train_n: int
    epochs: int
    batch: int
    lr: float

    @property
    def checkpoint(self) -> Path:
        """``tools/zoo/<name>.pt``: the trained float32 state_dict."""
        return ZOO_DIR / f"{self.name}.pt"

    @property
    def record(self) -> Path:
        """``tools/zoo/<name>.json``: the training record."""
        return ZOO_DIR / f"{self.name}.json"

    @property
    def target(self) -> str:
        """The model as a CLI would name it: ``tools/zoo.py:ClassName``."""
        return f"tools/zoo.py:{self.model.__name__}"

    def make_data(self, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of ``split``; see the module docstring."""
        return self.data(split, n)

    def build(self) -> nn.Module:
        """A freshly initialized model (seed torch first for a reproducible init)."""
        return self.model()

    def load(self, path: str | Path | None = None) -> nn.Module:
        """The model with the trained weights (or ``path``) loaded strictly, in eval mode."""
        state = torch.load(path or self.checkpoint, map_location="cpu", weights_only=True)
        model = self.build()
        model.load_state_dict(state, strict=True)
        return model.eval()


ZOO: dict[str, Spec] = {
    "lstm": Spec(
        name="lstm",
        model=WordLSTM,
        data=make_words,
        classes=tuple(f"word{i}" for i in range(N_WORDS)),
        task="12 noisy synthetic spoken words: [50 frames, 40 bands] -> word",
        train_n=20_000,
        epochs=5,
        batch=64,
        lr=2e-3,
    ),
    "conv1d": Spec(
        name="conv1d",
        model=SignalCNN,
        data=make_signals,
        classes=MODULATIONS,
        task="modulation of 256 noisy I/Q samples (8 classes, -2..18 dB SNR)",
        train_n=20_000,
        epochs=4,
        batch=64,
        lr=2e-3,
    ),
    "attn": Spec(
        name="attn",
        model=TinyTransformer,
        data=make_tokens,
        classes=tuple(f"chain{i}" for i in range(N_CHAINS)),
        task="which of 10 Markov chains (same unigram statistics) drew 32 tokens",
        train_n=32_000,
        epochs=4,
        batch=64,
        lr=1e-3,
    ),
}


# ====================================================================== evaluation


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) on ``inputs``, in batches."""
    model.eval()
    return torch.cat([model(b) for b in inputs.split(batch)]) if len(inputs) else torch.zeros(0)


def output_error(
    ref_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """How far a quantized model's outputs are from the float model's.

    ``mean_abs_dp`` (the primary metric, like the UNet's mean |sigmoid p - p_float|): mean over
    examples and classes of |softmax(q) - softmax(ref)|; ``max_abs_dp``; ``top1_agreement``:
    fraction of examples whose argmax matches the float model's; with ``labels``, also
    ``accuracy`` (of q) and ``float_accuracy`` (of ref).
    """
    ref = torch.as_tensor(ref_logits).double()
    q = torch.as_tensor(q_logits).double()
    if ref.shape != q.shape or ref.ndim != 2:
        raise ValueError(f"logits must have equal [N, classes] shapes, got {ref.shape}, {q.shape}")
    dp = (q.softmax(dim=1) - ref.softmax(dim=1)).abs()
    top_ref, top_q = ref.argmax(dim=1), q.argmax(dim=1)
    out = {
        "n": len(ref),
        "mean_abs_dp": float(dp.mean()),
        "max_abs_dp": float(dp.max()) if dp.numel() else 0.0,
        "top1_agreement": float((top_ref == top_q).double().mean()),
    }
    if labels is not None:
        labels = torch.as_tensor(labels)
        out["accuracy"] = float((top_q == labels).double().mean())
        out["float_accuracy"] = float((top_ref == labels).double().mean())
    return out


def make_evaluator(
    name: str, state_dict: Mapping[str, Any], inputs: torch.Tensor, batch: int = 500
) -> Callable[[Mapping[str, Any]], float]:
    """A distortion measure for ``qpack.allocate(evaluate=...)``: the mean squared difference
    of the zoo model's softmax outputs on ``inputs`` between ``state_dict`` and the same
    weights with some tensors replaced (``{name: array}``). Squared differences add up across
    layers, which the allocator assumes."""
    model = ZOO[name].build()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    tensors = model.state_dict(keep_vars=True)  # parameters and buffers, sharing storage
    reference = predict(model, inputs, batch).softmax(dim=1)

    def evaluate(replaced: Mapping[str, Any]) -> float:
        saved = {}
        with torch.no_grad():
            try:
                for key, value in replaced.items():
                    saved[key] = tensors[key].detach().clone()
                    new = torch.as_tensor(np.asarray(value), dtype=tensors[key].dtype)
                    tensors[key].copy_(new.reshape(tensors[key].shape))
                probs = predict(model, inputs, batch).softmax(dim=1)
                return float(((probs - reference) ** 2).mean())
            finally:
                for key, value in saved.items():
                    tensors[key].copy_(value)

    return evaluate


def n_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
