"""How close a reconstruction is to the records it tries to recover.

Reconstructed rows come in no particular order, so each true record is first matched to a
distinct reconstruction by minimum total distance (the Hungarian algorithm, `scipy`'s
`linear_sum_assignment`). Tabular records are then compared by relative L2 error and per-feature
absolute error (in the model's input units, i.e. after scaling); images by SSIM (Wang, Bovik,
Sheikh & Simoncelli 2004) with a 3×3 uniform window, since 8×8 digits are too small for the
usual 7×7 or 11×11 windows.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.optimize import linear_sum_assignment

__all__ = ["image_quality", "match", "ssim", "tabular_quality"]

_K1, _K2 = 0.01, 0.03


def match(x_true: np.ndarray, x_rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true rows, reconstructed rows) pairing every true record with a distinct reconstruction
    (needs at least as many reconstructions as true records), by least total L2 distance."""
    a = x_true.reshape(x_true.shape[0], -1).astype(np.float64)
    b = x_rec.reshape(x_rec.shape[0], -1).astype(np.float64)
    if b.shape[0] < a.shape[0]:
        raise ValueError(f"{a.shape[0]} records cannot be matched to {b.shape[0]} reconstructions")
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    rows, cols = linear_sum_assignment(cost)
    return rows, cols


def tabular_quality(x_true: np.ndarray, x_rec: np.ndarray) -> dict[str, float]:
    """Median and best relative L2 error ‖x̂ − x‖/‖x‖ over matched records, and the mean
    absolute error per feature."""
    rows, cols = match(x_true, x_rec)
    a = x_true.reshape(x_true.shape[0], -1)[rows].astype(np.float64)
    b = x_rec.reshape(x_rec.shape[0], -1)[cols].astype(np.float64)
    relative = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    return {
        "relative_error": float(np.median(relative)),
        "best_relative_error": float(relative.min()),
        "feature_mae": float(np.abs(b - a).mean()),
    }


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float) -> float:
    """Mean structural similarity of two images of the same (height, width); 1 means equal."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim compares two 2-D images of one shape, got {a.shape}, {b.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mx, my = uniform_filter(x, 3), uniform_filter(y, 3)
    vx = uniform_filter(x * x, 3) - mx * mx
    vy = uniform_filter(y * y, 3) - my * my
    cxy = uniform_filter(x * y, 3) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def image_quality(
    x_true: np.ndarray, x_rec: np.ndarray, image_shape: tuple[int, int, int], *, data_range: float
) -> dict[str, float]:
    """Mean and best SSIM over matched images (channels averaged)."""
    rows, cols = match(x_true, x_rec)
    scores = []
    for i, j in zip(rows, cols, strict=True):
        a = x_true[i].reshape(image_shape)
        b = x_rec[j].reshape(image_shape)
        scores.append(np.mean([ssim(a[c], b[c], data_range=data_range) for c in range(a.shape[0])]))
    return {"ssim": float(np.mean(scores)), "best_ssim": float(np.max(scores))}
