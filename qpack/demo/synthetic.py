"""Synthetic unrolled borehole-wall patches with thin corrosion grooves (numpy only).

Each patch is 36x36 (rows = depth, columns = azimuth, which wraps around): a zero-mean textured
background (smooth low-frequency texture plus fine noise, periodic left-right) with 0-2 thin dark
grooves, 1-3 px wide, vertical or slightly slanted, full or partial height, possibly crossing the
left/right edge. The label is the groove pixels. Groove contrast varies from clearly visible to
well below the texture, so a model can learn the task without solving it perfectly.

Generation is deterministic from ``seed``. Seeds >= ``HELDOUT_SEED`` (1_000_000) are reserved for
held-out evaluation; training must draw its batches from seeds below it.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CALIBRATION_PATCHES",
    "CALIBRATION_SEED",
    "HELDOUT_SEED",
    "PATCH_SIZE",
    "dice_iou",
    "make_patches",
]

HELDOUT_SEED = 1_000_000
#: Seed of the default calibration patches for ``qpack pack --max-size`` (sensitivity
#: measurement): below the held-out range and above any training step's seed.
CALIBRATION_SEED = 999_000
#: How many calibration patches: enough to rank layers by sensitivity, few enough to keep
#: the ~40 forward passes of an allocation to seconds on two cores.
CALIBRATION_PATCHES = 64
PATCH_SIZE = 36
# Patches are built in chunks to bound peak memory; fixed so output depends only on (n, seed).
_CHUNK = 2048
# Probabilities of 0, 1 and 2 grooves in a patch.
_GROOVE_COUNT_P = (0.3, 0.45, 0.25)
# Highest texture wavenumbers kept (per 72 rows, per 36 columns); the spectrum is negligible above.
_KY_MAX = 24
_KX_MAX = 12


def _texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-std smooth random fields [n, 36, 36], periodic in columns only.

    A sum of low-frequency Fourier modes on a 72-row period, of which 36 rows are kept, so it
    wraps left-right but not top-bottom. The Gaussian spectrum is separable, so the sum is two
    small batched matmuls. A random per-patch anisotropy sometimes stretches blobs vertically,
    giving groove-like streaks that the model must learn to ignore.
    """
    s = PATCH_SIZE
    ky = np.arange(-_KY_MAX, _KY_MAX + 1, dtype=np.float32)  # waves per 72 rows
    kx = np.arange(0, _KX_MAX + 1, dtype=np.float32)  # waves per 36 columns
    cutoff = rng.uniform(2.0, 5.0, size=(n, 1, 1)).astype(np.float32)
    sy = rng.uniform(0.3, 1.5, size=(n, 1, 1)).astype(np.float32)  # <1: vertical streaks
    amp_y = np.exp(-0.5 * (ky[None, :, None] / (2 * sy * cutoff)) ** 2)  # [n, ky, 1]
    amp_x = np.exp(-0.5 * (kx[None, None, :] / cutoff) ** 2)  # [n, 1, kx]
    shape = (n, ky.size, kx.size)
    coef = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(
        shape, dtype=np.float32
    )
    coef *= amp_y * amp_x
    coef[:, _KY_MAX, 0] = 0.0  # no DC term
    rows = np.arange(s, dtype=np.float32)
    basis_y = np.exp(2j * np.pi * rows[:, None] * ky[None, :] / (2 * s)).astype(np.complex64)
    basis_x = np.exp(2j * np.pi * kx[:, None] * rows[None, :] / s).astype(np.complex64)
    field = ((basis_y @ coef) @ basis_x).real
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / (field.std(axis=(1, 2), keepdims=True) + 1e-12)


def _grooves(rng: np.random.Generator, n: int, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groove darkening [n, 36, 36] (>= 0, to subtract) and their binary mask.

    ``noise`` [n] is each patch's background level, which groove depth is scaled against.
    """
    s = PATCH_SIZE
    # float32 throughout: this is the hot loop, and float64 would double its memory traffic.
    rows = np.arange(s, dtype=np.float32)[None, :, None]
    cols = np.arange(s, dtype=np.float32)[None, None, :]
    count = rng.choice(3, size=n, p=_GROOVE_COUNT_P)
    dark = np.zeros((n, s, s), dtype=np.float32)
    mask = np.zeros((n, s, s), dtype=bool)
    for k in range(2):
        active = count > k
        centre = rng.uniform(0, s, size=(n, 1, 1)).astype(np.float32)
        half = rng.uniform(0.5, 1.5, size=(n, 1, 1)).astype(np.float32)  # half width
        # Half vertical, half slanted by up to ~17 degrees.
        slope = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(-0.3, 0.3, size=n))
        slope = slope.astype(np.float32)[:, None, None]
        full = rng.random(n) < 0.6
        length = np.where(full, s, rng.integers(8, s + 1, size=n))
        top = np.where(full, 0, rng.integers(0, s - length + 1))
        # Contrast relative to the background: log-uniform, from faint to obvious.
        depth = noise * np.exp(rng.uniform(np.log(0.35), np.log(3.0), size=n))
        depth = depth.astype(np.float32)[:, None, None]
        # Depth fades and swells along the groove so parts of it are fainter.
        period = rng.uniform(12, 48, size=(n, 1, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
        wobble = 1.0 + 0.4 * np.sin(2 * np.pi * rows / period + phase)

        col_c = centre + slope * (rows - s / 2)
        dist = np.abs((cols - col_c + s / 2) % s - s / 2)  # wrapped column distance
        in_rows = (rows >= top[:, None, None]) & (rows < (top + length)[:, None, None])
        on = active[:, None, None] & in_rows
        # Fraction of each pixel the groove covers (anti-aliased edges, darkening only).
        cover = np.clip(half + 0.5 - dist, 0.0, 1.0) * on
        dark = np.maximum(dark, cover * (wobble * depth))
        mask |= (dist < half) & on
    return dark, mask


def make_patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` patches from ``seed``: ``x`` float32 [n,1,36,36] and labels in {0, 1}."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, 1, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    y = np.empty_like(x)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        tex_amp = np.exp(rng.uniform(np.log(0.01), np.log(0.06), size=m)).astype(np.float32)
        fine_amp = tex_amp * rng.uniform(0.15, 0.5, size=m).astype(np.float32)
        img = tex_amp[:, None, None] * _texture(rng, m)
        fine = rng.standard_normal((m, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
        img += fine_amp[:, None, None] * fine
        dark, mask = _grooves(rng, m, tex_amp)
        img -= dark
        img -= img.mean(axis=(1, 2), keepdims=True)
        x[start : start + m, 0] = img
        y[start : start + m, 0] = mask
    return x, y


def dice_iou(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """Dataset-level dice and IoU of ``prob > threshold`` against binary ``label``.

    Counts are pooled over all pixels of all patches. With no positives in either prediction or
    label the segmentation is trivially perfect and (1.0, 1.0) is returned.
    """
    pred = np.asarray(prob) > threshold
    truth = np.asarray(label) > 0.5
    tp = float(np.count_nonzero(pred & truth))
    fp = float(np.count_nonzero(pred & ~truth))
    fn = float(np.count_nonzero(~pred & truth))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
