"""Classic pixel/voxel fusion rules on normalised [0, 1] arrays, in 2D and 3D.

- ``mean``: average; ``max``: maximum.
- ``laplacian``: Laplacian pyramid (4 levels), max-abs detail coefficients, mean base.
- ``wavelet``: discrete wavelet transform (PyWavelets, db2, 3 levels), mean approximation,
  max-abs details.
- ``gff``: guided filtering fusion (Li, Kang & Hu 2013): base / detail layers from a 31-wide mean
  filter, binary weight maps from the larger Gaussian-smoothed |Laplacian| saliency, refined by a
  guided filter with the source as guide (r 45, eps 0.3 for the base; r 7, eps 1e-6 for the detail).

Only axes longer than one voxel are decomposed, so a 2D slice ``(X, Y, 1)`` is fused in 2D.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage


def _axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i, s in enumerate(shape) if s > 1)


def _down(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    sigma = [1.0 if i in axes else 0.0 for i in range(x.ndim)]
    blurred = ndimage.gaussian_filter(x, sigma, mode="reflect")
    return blurred[tuple(slice(None, None, 2) if i in axes else slice(None) for i in range(x.ndim))]


def _up(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    factors = [t / s for t, s in zip(shape, x.shape, strict=True)]
    out = ndimage.zoom(x, factors, order=1, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, s) for s in shape)]


def _max_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(np.abs(a) >= np.abs(b), a, b)


def laplacian(a: np.ndarray, b: np.ndarray, levels: int = 4) -> np.ndarray:
    axes = _axes(a.shape)
    levels = max(1, min(levels, int(np.log2(min(a.shape[i] for i in axes))) - 1))

    def pyramid(x: np.ndarray) -> list[np.ndarray]:
        out, cur = [], x
        for _ in range(levels):
            nxt = _down(cur, axes)
            out.append(cur - _up(nxt, cur.shape))
            cur = nxt
        return out + [cur]

    pa, pb = pyramid(a), pyramid(b)
    fused = 0.5 * (pa[-1] + pb[-1])
    for da, db in zip(reversed(pa[:-1]), reversed(pb[:-1]), strict=True):
        fused = _up(fused, da.shape) + _max_abs(da, db)
    return fused


def wavelet(a: np.ndarray, b: np.ndarray, wavelet_name: str = "db2", levels: int = 3) -> np.ndarray:
    import pywt

    axes = _axes(a.shape)
    ca = pywt.wavedecn(a, wavelet_name, level=levels, axes=axes, mode="symmetric")
    cb = pywt.wavedecn(b, wavelet_name, level=levels, axes=axes, mode="symmetric")
    fused = [0.5 * (ca[0] + cb[0])]
    for da, db in zip(ca[1:], cb[1:], strict=True):
        fused.append({k: _max_abs(da[k], db[k]) for k in da})
    out = pywt.waverecn(fused, wavelet_name, axes=axes, mode="symmetric")
    return out[tuple(slice(0, s) for s in a.shape)]


def _box(x: np.ndarray, radius: int, axes: tuple[int, ...]) -> np.ndarray:
    size = [2 * radius + 1 if i in axes else 1 for i in range(x.ndim)]
    return ndimage.uniform_filter(x, size, mode="reflect")


def guided_filter(p: np.ndarray, guide: np.ndarray, radius: int, eps: float, axes: tuple[int, ...]) -> np.ndarray:
    """He et al.'s guided filter of ``p`` steered by ``guide`` (box windows over ``axes``)."""
    mean_i, mean_p = _box(guide, radius, axes), _box(p, radius, axes)
    var_i = _box(guide * guide, radius, axes) - mean_i * mean_i
    cov = _box(guide * p, radius, axes) - mean_i * mean_p
    coef = cov / (var_i + eps)
    offset = mean_p - coef * mean_i
    return _box(coef, radius, axes) * guide + _box(offset, radius, axes)


def gff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = _axes(a.shape)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    base = [_box(x, 15, axes) for x in (a64, b64)]
    sigma = [5.0 if i in axes else 0.0 for i in range(a.ndim)]

    def saliency(x: np.ndarray) -> np.ndarray:
        lap = sum(ndimage.correlate1d(x, [1.0, -2.0, 1.0], axis=i, mode="reflect") for i in axes)
        return ndimage.gaussian_filter(np.abs(lap), sigma, truncate=1.0, mode="reflect")

    pa = (saliency(a64) >= saliency(b64)).astype(np.float64)
    fused = np.zeros_like(a64)
    for (radius, eps), layers in (((45, 0.3), base), ((7, 1e-6), [a64 - base[0], b64 - base[1]])):
        wa = np.clip(guided_filter(pa, a64, radius, eps, axes), 0.0, 1.0)
        wb = np.clip(guided_filter(1.0 - pa, b64, radius, eps, axes), 0.0, 1.0)
        total = wa + wb
        empty = total < 1e-12
        wa, wb, total = np.where(empty, 0.5, wa), np.where(empty, 0.5, wb), np.where(empty, 1.0, total)
        fused += (wa * layers[0] + wb * layers[1]) / total
    return fused


CLASSIC_RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mean": lambda a, b: 0.5 * (a + b),
    "max": np.maximum,
    "laplacian": laplacian,
    "wavelet": wavelet,
    "gff": gff,
}


def fuse_classic(method: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fuse two normalised arrays of one shape with a classic rule; result clipped to [0, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    rule = CLASSIC_RULES[method]
    return np.clip(rule(a.astype(np.float32), b.astype(np.float32)), 0.0, 1.0).astype(np.float32)
