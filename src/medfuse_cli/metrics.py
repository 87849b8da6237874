"""Fusion quality metrics with one stated set of conventions (numpy/scipy, vectorised).

A and B are the sources (A = FIXED, normally the MRI; B = CT/PET/SPECT), F the fused image, all
greyscale float arrays on a 0..255 scale of one shape: ``(rows, cols)`` for a slice,
``(slices, rows, cols)`` for a volume. Conventions (the same as ``../shared/notes/PEERS.md``):

- **EN** entropy of F, bits, 256 bins of round(F) clipped to 0..255. **SD** population std of F.
- **SF** sqrt of the sum over axes of the mean squared first difference (2D: sqrt(RF^2 + CF^2)).
- **AG** forward differences on the grid cropped by one voxel per axis,
  mean of sqrt(sum of squared differences / number of axes).
- **MI** MI(A,F) + MI(B,F), bits, 256x256 joint histogram of rounded values.
- **FMI** fast FMI of raw pixels (Haghighat & Razian 2014), 3x3 windows, mean over windows of
  (FMI(A,F) + FMI(B,F)) / 2.
- **Qabf** Xydeas-Petrovic: 3x3 Sobel, zero padding, L=1, Tg=0.9994, kg=-15, Dg=0.5,
  Ta=0.9879, ka=-22, Da=0.8, angle atan(Sy/Sx) (pi/2 where Sx=0).
- **VIF** VIF(A,F) + VIF(B,F): pixel-domain VIFP (Sheikh & Bovik), 4 scales, Gaussian window
  N=2^(5-s)+1 with sigma N/5, valid filtering, dyadic down-sampling, sigma_n^2 = 2.
- **SCD** corr(F-B, A) + corr(F-A, B). **CC** mean of corr(A,F) and corr(B,F) (Pearson; a
  correlation with a constant image is defined as 0).
- **SSIM** mean of SSIM(A,F) and SSIM(B,F) (also reported apart, and the worse of the two):
  Wang et al. 2004, Gaussian sigma 1.5 truncated to 11 taps per axis (a 3D window for volumes),
  K1=0.01, K2=0.03, L=255, population (co)variances, mean over the region 5 voxels in from
  every border. A slab of fewer than 11 slices: the mean of the 2D SSIM of its slices.
- **PSNR** 10 log10(255^2 / mean of MSE(A,F) and MSE(B,F)); a perfect match is reported as 100 dB.

Qabf, VIF and FMI are 2D by definition; for volumes they are pooled over the axial slices
(sums of numerators and denominators, or of window values, over all slices). FMI of a volume
with more than 2^20 windows uses the windows on a regular in-plane grid (every k-th row and
column) so that a 1 mm brain takes seconds. A volume is scored slab by slab (about
:data:`SLAB_VOXELS` voxels each; SSIM's slabs with the window's radius of neighbouring slices), with
the same values as in one piece, so that memory beyond the three float64 arrays stays bounded.
:func:`compute` may run the metrics in threads (each slab-wise as above): the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from .errors import GeometryError, InvalidInputError
from .parallel import thread_map

METRICS = ("EN", "SD", "SF", "AG", "MI", "FMI", "Qabf", "VIF", "SCD", "CC", "SSIM", "SSIM_A", "SSIM_B", "SSIM_worst", "PSNR")
PSNR_PERFECT = 100.0
FMI_MAX_WINDOWS = 2**20
SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5 -> an 11-tap window
SLAB_VOXELS = 2**22  # a volume's metrics work on slabs of slices of about this many voxels


def _slab_step(shape: tuple[int, ...], halo: int) -> int:
    return max(1, 2 * halo, SLAB_VOXELS // max(1, math.prod(shape[1:])) - 2 * halo)


def largest_slab(shape: tuple[int, ...]) -> int:
    """Voxels of the largest block the filter-based metrics hold at once for an array of this
    (metric layout) shape: SSIM's slab with its halo; a 2D image whole."""
    if len(shape) == 2:
        return math.prod(shape)
    return min(shape[0], _slab_step(shape, SSIM_RADIUS) + 2 * SSIM_RADIUS) * math.prod(shape[1:])


def _slabs(shape: tuple[int, ...], start: int = 0, stop: int | None = None,
           halo: int = 0) -> Iterator[tuple[int, int]]:
    """Runs ``(lo, hi)`` of slices covering ``start:stop`` of axis 0 that, with ``halo`` slices on both
    sides, hold about :data:`SLAB_VOXELS` voxels (at least ``max(1, 2 * halo)`` slices a run, so that
    the halo at most doubles the work): the filter-based metrics work on one slab at a time, so their
    memory does not grow with the volume."""
    stop = shape[0] if stop is None else stop
    step = _slab_step(shape, halo)
    for lo in range(start, stop, step):
        yield lo, min(lo + step, stop)


def _slab_sum(fn: Callable[..., Any], *arrays: np.ndarray, overlap: int = 0) -> Any:
    """Sum of ``fn`` over slabs of ``arrays``' first axis, each with ``overlap`` more rows (for
    differences across slabs): a sum over voxels without whole-volume temporaries."""
    total = 0
    for lo, hi in _slabs(arrays[0].shape, stop=arrays[0].shape[0] - overlap):
        total = total + fn(*(x[lo : hi + overlap] for x in arrays))
    return total


def _hist_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _levels(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.int64).ravel()


def entropy(f: np.ndarray) -> float:
    return _hist_entropy(_slab_sum(lambda z: np.bincount(_levels(z), minlength=256), f))


def mutual_information(x: np.ndarray, y: np.ndarray) -> float:
    """MI in bits from the 256x256 joint histogram of rounded values."""
    joint = _slab_sum(lambda u, v: np.bincount(_levels(u) * 256 + _levels(v), minlength=256 * 256), x, y)
    joint = joint.reshape(256, 256)
    return _hist_entropy(joint.sum(1)) + _hist_entropy(joint.sum(0)) - _hist_entropy(joint)


def spatial_frequency(f: np.ndarray) -> float:
    total = 0.0
    for ax in range(f.ndim):
        def squares(z, ax=ax):
            return float((np.diff(z, axis=ax) ** 2).sum())

        total += _slab_sum(squares, f, overlap=int(ax == 0)) / (f.size // f.shape[ax] * (f.shape[ax] - 1))
    return float(np.sqrt(total))


def average_gradient(f: np.ndarray) -> float:
    def part(z):  # rows lo..hi of the cropped grid from rows lo..hi+1 of f
        core = (slice(0, z.shape[0] - 1), *(slice(0, n - 1) for n in z.shape[1:]))
        sq = sum(np.diff(z, axis=ax)[core] ** 2 for ax in range(z.ndim))
        return float(np.sqrt(sq / z.ndim).sum())

    return _slab_sum(part, f, overlap=1) / math.prod(n - 1 for n in f.shape)


def standard_deviation(f: np.ndarray) -> float:
    """Population standard deviation, from slab sums (no whole-volume temporaries)."""
    mean = _slab_sum(lambda z: float(z.sum()), f) / f.size
    return float(np.sqrt(_slab_sum(lambda z: float(((z - mean) ** 2).sum()), f) / f.size))


def correlation(x: np.ndarray, y: np.ndarray, minus: np.ndarray | None = None) -> float:
    """Pearson correlation of X (or X - ``minus``, formed slab by slab) with Y; 0 when either image
    is constant."""
    if minus is None:
        mx = x.mean()
    else:
        mx = _slab_sum(lambda u, w: float((u - w).sum()), x, minus) / x.size
    my = y.mean()

    def sums(u, v, w=None):
        u, v = (u if w is None else u - w) - mx, v - my
        return np.array([(u * v).sum(), (u * u).sum(), (v * v).sum()])

    sxy, sxx, syy = _slab_sum(sums, *((x, y) if minus is None else (x, y, minus)))
    den = np.sqrt(sxx * syy)
    return float(sxy / den) if den > 0 else 0.0


def too_small(shape: tuple[int, ...]) -> bool:
    """Whether SSIM's window does not fit an array of this (metric layout) shape: every axis needs
    its side, except the slices of a slab thinner than it, which are scored one by one."""
    side = 2 * SSIM_RADIUS + 1
    if len(shape) == 3 and shape[0] < side:
        shape = shape[1:]
    return min(shape) < side


def _ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):
        return ndimage.gaussian_filter(z, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM, Gaussian window (see module docstring), data range 255; a slab of fewer slices
    than the window is scored with 2D windows on each slice. A volume is filtered slab by slab, each
    with the window's radius of neighbouring slices (the same values as the whole volume at once)."""
    side, r = 2 * SSIM_RADIUS + 1, SSIM_RADIUS
    if x.ndim == 3 and x.shape[0] < side <= min(x.shape[1:]):
        return float(np.mean([ssim(a, b) for a, b in zip(x, y, strict=True)]))
    if too_small(x.shape):
        raise GeometryError(f"SSIM needs at least {side} voxels along every axis, got {x.shape}")
    if x.ndim == 2:
        return float(_ssim_map(x, y)[r:-r, r:-r].mean())
    total, count = 0.0, 0
    for lo, hi in _slabs(x.shape, r, x.shape[0] - r, halo=r):
        s = _ssim_map(x[lo - r : hi + r], y[lo - r : hi + r])[r:-r, r:-r, r:-r]
        total, count = total + float(s.sum()), count + s.size
    return total / count


def psnr(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    mse = _slab_sum(lambda u, v, w: float(((u - w) ** 2).sum() + ((v - w) ** 2).sum()), a, b, f) / (2 * f.size)
    return PSNR_PERFECT if mse == 0 else float(min(PSNR_PERFECT, 10 * np.log10(255.0**2 / mse)))


# --- slice-wise (2D by definition) metrics; inputs are (slices, rows, cols) ----------------------


def _correlate2d(x: np.ndarray, kernel: np.ndarray, mode: str = "constant") -> np.ndarray:
    return ndimage.correlate(x, kernel[None], mode=mode, cval=0.0)


_SOBEL_Y = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
_SOBEL_X = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])


def _edges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sx, sy = _correlate2d(x, _SOBEL_X), _correlate2d(x, _SOBEL_Y)
    g = np.sqrt(sx * sx + sy * sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(sx == 0, np.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return g, angle


def _edge_preservation(g_s, a_s, g_f, a_f) -> np.ndarray:
    big, small = np.maximum(g_s, g_f), np.minimum(g_s, g_f)
    ratio = np.divide(small, big, out=np.zeros_like(big), where=big > 0)
    orient = 1 - np.abs(a_s - a_f) / (np.pi / 2)
    q_g = 0.9994 / (1 + np.exp(-15 * (ratio - 0.5)))
    q_a = 0.9879 / (1 + np.exp(-22 * (orient - 0.8)))
    return q_g * q_a


def _pooled(terms: Callable[..., tuple[float, float]], *arrays: np.ndarray) -> float:
    """Numerator / denominator of a slice-wise metric, each summed over slabs of slices."""
    num = den = 0.0
    for lo, hi in _slabs(arrays[0].shape):
        n, d = terms(*(x[lo:hi] for x in arrays))
        num, den = num + n, den + d
    return num / den if den > 0 else 0.0


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    return _pooled(_qabf_terms, a, b, f)


def _qabf_terms(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    (ga, aa), (gb, ab), (gf, af) = _edges(a), _edges(b), _edges(f)
    num = 0.0
    for g, angle in ((ga, aa), (gb, ab)):  # weighted by the source's edge strength: only its edges count
        edge = g > 0
        num += float((_edge_preservation(g[edge], angle[edge], gf[edge], af[edge]) * g[edge]).sum())
    return num, float((ga + gb).sum())


def _gaussian_taps(n: int) -> np.ndarray:
    """1D factor of the normalised n x n Gaussian window with sigma n/5 (the window is separable)."""
    ax = np.arange(n) - (n - 1) / 2
    g = np.exp(-(ax**2) / (2 * (n / 5.0) ** 2))
    return g / g.sum()


def _valid_blur(z: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """In-plane separable correlation of ``(slices, rows, cols)``, 'valid' region only."""
    h = len(taps) // 2
    z = ndimage.correlate1d(z, taps, axis=1, mode="constant")
    z = ndimage.correlate1d(z, taps, axis=2, mode="constant")
    return z[:, h : z.shape[1] - h, h : z.shape[2] - h]


def _vif_terms(ref: np.ndarray, dist: np.ndarray) -> tuple[float, float]:
    sigma_n2, eps = 2.0, 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        taps = _gaussian_taps(n)

        def valid(z, taps=taps):
            return _valid_blur(z, taps)

        if scale > 1:
            ref, dist = valid(ref)[:, ::2, ::2], valid(dist)[:, ::2, ::2]
        if min(ref.shape[1:]) < n:
            break
        mu1, mu2 = valid(ref), valid(dist)
        s1 = np.maximum(valid(ref * ref) - mu1 * mu1, 0)
        s2 = np.maximum(valid(dist * dist) - mu2 * mu2, 0)
        s12 = valid(ref * dist) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g[low1], sv[low1], s1[low1] = 0, s2[low1], 0
        low2 = s2 < eps
        g[low2], sv[low2] = 0, 0
        neg = g < 0
        sv[neg], g[neg] = s2[neg], 0
        sv = np.maximum(sv, eps)
        num += float(np.log10(1 + g * g * s1 / (sv + sigma_n2)).sum())
        den += float(np.log10(1 + s1 / sigma_n2).sum())
    return num, den


def vif(ref: np.ndarray, dist: np.ndarray) -> float:
    return _pooled(_vif_terms, ref, dist)


def _window_fmi(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Fast-FMI of raw pixels for windows ``(n, l)`` (column-major flattened).

    The joint pdf mixes the product of the two window pdfs with Frechet's upper (or, for a
    negative correlation, lower) bound so that it has their Pearson correlation (Nelsen).
    Windows equal to the source score 1; uncorrelated windows have MI 0 and score 0.
    """

    def pdf(w):
        across = np.ascontiguousarray(w.T)  # min/max of short rows: 5x faster across the windows (exact)
        lo, hi = across.min(0)[:, None], across.max(0)[:, None]
        span = hi - lo
        u = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 1.0)
        return u / u.sum(1, keepdims=True)

    def ent(p):
        return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1)

    out = np.where(np.all(s == f, axis=1), 1.0, 0.0)
    todo = np.flatnonzero(out == 0)  # every step below works row by row: only on the windows left
    if not len(todo):
        return out
    s, f = s[todo], f[todo]
    ps, pf = pdf(s), pdf(f)
    ds, df = ps - ps.mean(1, keepdims=True), pf - pf.mean(1, keepdims=True)
    cov = (ds * df).sum(1)
    idx = np.arange(1, s.shape[1] + 1, dtype=np.float64)

    def sd(p):  # row sums, not BLAS (whose matrix-vector sums change with the number of rows)
        return np.sqrt(np.maximum((p * idx**2).sum(1) - (p * idx).sum(1) ** 2, 0))

    sd_prod = sd(ps) * sd(pf)
    live = (cov != 0) & (sd_prod > 0)
    if not live.any():
        return out
    ps, pf, ds, df, cov, sd_prod = ps[live], pf[live], ds[live], df[live], cov[live], sd_prod[live]
    c = cov / np.sqrt((ds * ds).sum(1) * (df * df).sum(1))
    fi, sj = np.cumsum(pf, 1)[:, :, None], np.cumsum(ps, 1)[:, None, :]  # fused index i, source j
    bound = np.minimum(fi, sj)
    negative = np.flatnonzero(c < 0)
    if len(negative):  # Frechet's lower bound where the windows are anti-correlated
        bound[negative] = np.maximum(fi[negative] + sj[negative] - 1, 0)
    weight = (c * sd_prod / (bound - fi * sj).sum((1, 2)))[:, None, None]
    cell = bound.copy()  # the joint CDF's cell masses: differences along i, then along j
    cell[:, 1:, :] -= bound[:, :-1, :]
    cell[:, :, 1:] -= cell[:, :, :-1].copy()
    joint = cell  # weight * cell + (1 - weight) * pf ps^T, in place
    joint *= weight
    product = pf[:, :, None] * ps[:, None, :]
    product *= 1 - weight
    joint += product
    h_joint = -(joint * np.log2(np.where(joint != 0, np.abs(joint), 1.0))).sum((1, 2))
    hs, hf = ent(ps), ent(pf)
    mi = hs + hf - h_joint
    with np.errstate(invalid="ignore", divide="ignore"):
        out[todo[live]] = np.nan_to_num(np.where(mi == 0, 0.0, 2 * mi / (hs + hf)))
    return out


_Windows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _fmi_windows(a: np.ndarray, b: np.ndarray, f: np.ndarray, window: int = 3) -> _Windows:
    """The ``(n, window**2)`` windows FMI scores in A, B and F (column-major inside a window): every
    window of a slice, or for a stack with more than :data:`FMI_MAX_WINDOWS` windows those on a
    regular in-plane grid (every k-th row and column), so that a 1 mm brain takes seconds."""
    n = a.shape[0] * (a.shape[1] - window + 1) * (a.shape[2] - window + 1)
    step = max(1, int(np.ceil(np.sqrt(n / FMI_MAX_WINDOWS))))

    def windows(x):  # (slices, r, c, w, w) -> (n, w*w)
        v = sliding_window_view(x, (window, window), axis=(1, 2))[:, ::step, ::step]
        return v.swapaxes(-1, -2).reshape(-1, window * window)

    return windows(a), windows(b), windows(f)


def _fmi_sums(w: _Windows, part: int, parts: int, chunk: int = 2048) -> list[float]:
    """(FMI(A,F) + FMI(B,F)) / 2 summed over each chunk of ``chunk`` windows, for the ``part``-th of
    ``parts`` runs of consecutive chunks."""
    wa, wb, wf = w
    starts = range(0, len(wf), chunk)
    per = -(-len(starts) // parts)
    out = []
    for i in starts[part * per : (part + 1) * per]:
        sl = slice(i, i + chunk)
        out.append(float((_window_fmi(wa[sl], wf[sl]) + _window_fmi(wb[sl], wf[sl])).sum()) / 2)
    return out


def fmi(a: np.ndarray, b: np.ndarray, f: np.ndarray, window: int = 3, threads: int = 1) -> float:
    """Mean over windows of (FMI(A,F) + FMI(B,F)) / 2, raw pixels (windows: :func:`_fmi_windows`);
    ``threads`` runs of windows at once, their sums added in the windows' order (the same value)."""
    w = _fmi_windows(a, b, f, window)
    parts = max(1, threads)
    total = 0.0
    for sums in thread_map(lambda k: _fmi_sums(w, k, parts), list(range(parts)), parts, name="medfuse-fmi"):
        for s in sums:
            total += s
    return total / len(w[2]) if len(w[2]) else 0.0


# --- all at once -----------------------------------------------------------------------------


def check_triplet(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> None:
    if not (a.shape == b.shape == f.shape):
        raise GeometryError(f"sizes differ: sources {a.shape} and {b.shape}, fused {f.shape}")
    for name, x in (("source A", a), ("source B", b), ("fused image", f)):
        if not np.all(np.isfinite(x)):
            raise InvalidInputError(f"{name} has NaN/inf values; metrics are undefined")


HEAVY_METRICS = 6  # SSIM and VIF for each source, Qabf, FMI: the jobs that take the time


def compute(a: np.ndarray, b: np.ndarray, f: np.ndarray, threads: int = 1) -> dict[str, float]:
    """Every metric of :data:`METRICS` for sources A, B and fused F (0..255 greyscale); ``threads``
    metrics at once, at most :data:`HEAVY_METRICS` (the same values: each is computed as with one
    thread)."""
    a, b, f = (np.asarray(x, dtype=np.float64) for x in (a, b, f))
    check_triplet(a, b, f)
    threads = max(1, min(threads, HEAVY_METRICS))
    s3 = (lambda x: x[None]) if f.ndim == 2 else (lambda x: x)
    fmi_value = fmi(s3(a), s3(b), s3(f), threads=threads)  # the longest job on small images
    jobs: dict[str, Callable[[], float]] = {  # the heavy ones first, so that the threads end together
        "SSIM_A": lambda: ssim(a, f),
        "SSIM_B": lambda: ssim(b, f),
        "VIF_A": lambda: vif(s3(a), s3(f)),
        "VIF_B": lambda: vif(s3(b), s3(f)),
        "Qabf": lambda: qabf(s3(a), s3(b), s3(f)),
        "EN": lambda: entropy(f),
        "SD": lambda: standard_deviation(f),
        "SCD": lambda: correlation(f, a, minus=b) + correlation(f, b, minus=a),
        "SF": lambda: spatial_frequency(f),
        "AG": lambda: average_gradient(f),
        "MI": lambda: mutual_information(a, f) + mutual_information(b, f),
        "CC": lambda: (correlation(a, f) + correlation(b, f)) / 2,
        "PSNR": lambda: psnr(a, b, f),
    }
    v = dict(zip(jobs, thread_map(lambda job: job(), list(jobs.values()), threads, name="medfuse-metrics"), strict=True))
    sa, sb = v["SSIM_A"], v["SSIM_B"]
    return {
        "EN": v["EN"], "SD": v["SD"], "SF": v["SF"], "AG": v["AG"], "MI": v["MI"],
        "FMI": fmi_value,
        "Qabf": v["Qabf"], "VIF": v["VIF_A"] + v["VIF_B"], "SCD": v["SCD"], "CC": v["CC"],
        "SSIM": (sa + sb) / 2, "SSIM_A": sa, "SSIM_B": sb, "SSIM_worst": min(sa, sb), "PSNR": v["PSNR"],
    }
