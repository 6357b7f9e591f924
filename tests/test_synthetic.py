"""Tests of the synthetic borehole-patch generator and the dice/IoU metric."""

from __future__ import annotations

import numpy as np
import pytest

from qpack.demo.synthetic import HELDOUT_SEED, PATCH_SIZE, dice_iou, make_patches

N = 400


@pytest.fixture(scope="module")
def patches() -> tuple[np.ndarray, np.ndarray]:
    return make_patches(N, 123)


def test_shapes_and_dtypes(patches: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = patches
    assert x.shape == y.shape == (N, 1, PATCH_SIZE, PATCH_SIZE)
    assert x.dtype == y.dtype == np.float32
    assert np.isfinite(x).all()


def test_labels_binary(patches: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = patches
    assert set(np.unique(y)) == {0.0, 1.0}


def test_deterministic_by_seed(patches: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = patches
    x2, y2 = make_patches(N, 123)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_different_seeds_differ(patches: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = patches
    x2, y2 = make_patches(N, 124)
    assert not np.array_equal(x, x2)
    assert not np.array_equal(y, y2)
    assert HELDOUT_SEED == 1_000_000


def test_groove_counts_vary(patches: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = patches
    has_groove = y.reshape(N, -1).any(axis=1)
    assert 0.1 < has_groove.mean() < 0.95  # both empty patches and patches with grooves
    frac = y.mean()
    assert 0.01 < frac < 0.15  # grooves are thin


def test_grooves_are_thin_and_dark(patches: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = patches
    # Widest labelled run in any row stays small (<= 3 px per groove, two grooves may touch).
    assert y.sum(axis=-1).max() <= 7
    assert x[y == 1].mean() < x[y == 0].mean()


def test_grooves_wrap_around_azimuth(patches: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = patches
    wraps = (y[:, 0, :, 0] > 0) & (y[:, 0, :, -1] > 0)
    assert wraps.any(axis=1).sum() >= 3


def test_background_is_zero_mean_small_amplitude(patches: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = patches
    assert abs(x.mean()) < 1e-4
    empty = ~y.reshape(N, -1).any(axis=1)
    bg = x[empty]
    np.testing.assert_allclose(bg.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    std = bg.std(axis=(1, 2, 3))
    assert 0.005 < np.median(std) < 0.1


def test_background_is_periodic_left_right(patches: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = patches
    empty = ~y.reshape(N, -1).any(axis=1)
    bg = x[empty, 0]
    seam = np.abs(bg[:, :, 0] - bg[:, :, -1]).mean()
    inner = np.abs(bg[:, :, 1:] - bg[:, :, :-1]).mean()
    assert seam < 1.3 * inner  # the seam is as smooth as any other column step


def test_dice_iou_perfect_and_empty() -> None:
    _, y = make_patches(50, 7)
    assert dice_iou(y, y) == (1.0, 1.0)
    assert dice_iou(np.zeros_like(y), y) == (0.0, 0.0)
    empty = np.zeros((2, 1, 4, 4), dtype=np.float32)
    assert dice_iou(empty, empty) == (1.0, 1.0)  # no positives anywhere: no division by zero


def test_dice_iou_partial() -> None:
    label = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=np.float32)
    prob = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.0, 0.0, 0.0], dtype=np.float32)
    dice, iou = dice_iou(prob, label)  # tp=2, fp=1, fn=2
    assert dice == pytest.approx(4 / 7)
    assert iou == pytest.approx(2 / 5)
    dice, _ = dice_iou(prob, label, threshold=0.15)  # tp=3, fp=1, fn=1
    assert dice == pytest.approx(6 / 8)
