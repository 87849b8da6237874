"""Fusion metrics against independent implementations, closed-form cases and the PEERS.md table."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES, shared_path
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import mutual_info_score

from medfuse_cli import metrics as M
from medfuse_cli import read_image
from medfuse_cli.errors import GeometryError, InvalidInputError
from medfuse_cli.evaluate import find_cases, metric_array, score
from medfuse_cli.pipeline import FuseOptions, fuse_images

Q_IDENTICAL = 0.9994 / (1 + np.exp(-15 * 0.5)) * 0.9879 / (1 + np.exp(-22 * 0.2))


def _pair(pair_id="25015", other="pet"):
    folder = shared_path("harvard", f"mri-{other}")
    a = metric_array(read_image(folder / f"{pair_id}_mri.png"))
    b = metric_array(read_image(folder / f"{pair_id}_{other}.png"))
    return a, b


@pytest.fixture(scope="module")
def volumes():
    """The SPM T1 and PET templates (examples/) as 0..255 metric arrays, cropped for speed."""
    a = metric_array(read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"))[20:60, 20:80, 15:75]
    b = metric_array(read_image(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"))[20:60, 20:80, 15:75]
    return a, b


def test_ssim_and_psnr_match_scikit_image_2d():
    a, b = _pair()
    f = np.maximum(a, b)
    ref = structural_similarity(a, f, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert M.ssim(a, f) == pytest.approx(ref, abs=1e-12)
    # PSNR of the mean MSE equals scikit-image's when both sources are the same image
    assert M.psnr(a, a, f) == pytest.approx(peak_signal_noise_ratio(a, f, data_range=255), abs=1e-9)
    mse = (np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2
    assert M.psnr(a, b, f) == pytest.approx(10 * np.log10(255**2 / mse))


def test_ssim_3d_window_matches_scikit_image(volumes):
    a, b = volumes
    f = (a + b) / 2
    ref = structural_similarity(a, f, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert M.ssim(a, f) == pytest.approx(ref, abs=1e-12)


def test_a_slab_thinner_than_the_window_is_scored_slice_by_slice(volumes):
    """Fewer than 11 slices: SSIM is the mean of scikit-image's 2D SSIM of each slice (a 3-slice
    fusion used to end in an error after fusing); thinner in-plane is still an error."""
    a, b = (v[:3] for v in volumes)
    f = (a + b) / 2
    refs = [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=255) for x, y in zip(a, f, strict=True)]
    assert M.ssim(a, f) == pytest.approx(np.mean(refs), abs=1e-12)
    assert np.isfinite(M.compute(a, b, f)["SSIM_worst"])
    with pytest.raises(GeometryError, match="11 voxels"):
        M.ssim(a[:, :10], f[:, :10])


def test_mutual_information_matches_sklearn_in_bits():
    a, b = _pair("03008", "spect")
    f = (a + b) / 2
    for x in (a, b):
        labels_x, labels_f = np.rint(x).astype(int).ravel(), np.clip(np.rint(f), 0, 255).astype(int).ravel()
        assert M.mutual_information(x, f) == pytest.approx(mutual_info_score(labels_x, labels_f) / np.log(2), abs=1e-9)


def _window_nfmi_reference(x: np.ndarray, y: np.ndarray) -> float:
    """One window's normalised MI, written out step by step after Haghighat & Razian's fast-FMI
    (column-major pixels; pdfs from min-max scaled pixels; the joint pdf as a Nelsen mix of the
    pdfs' product and Frechet's upper, or for a negative correlation lower, bound; every non-zero
    joint cell adds the real part of -p log2 p)."""
    if np.array_equal(x, y):
        return 1.0
    pdfs = []
    for v in (x.ravel(order="F"), y.ravel(order="F")):
        v = np.ones_like(v) if v.max() == v.min() else (v - v.min()) / (v.max() - v.min())
        pdfs.append(v / v.sum())
    px, py = pdfs
    n = len(px)
    cx, cy = np.concatenate([[0.0], np.cumsum(px)]), np.concatenate([[0.0], np.cumsum(py)])
    dx, dy = px - px.mean(), py - py.mean()
    c = 0.0 if (dx * dy).sum() == 0 else (dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum())
    idx = np.arange(1, n + 1)
    sdx, sdy = (np.sqrt((idx**2 * p).sum() - (idx * p).sum() ** 2) for p in (px, py))

    def bound(u, v):
        return min(u, v) if c >= 0 else max(u + v - 1, 0.0)

    if (c == 0 and c >= 0) or sdx == 0 or sdy == 0:
        k = 0.0
    else:
        cov = sum(bound(cy[i], cx[j]) - cy[i] * cx[j] for i in range(1, n + 1) for j in range(1, n + 1))
        k = c / (cov / (sdx * sdy))
    h_joint = 0.0
    for i in range(1, n + 1):  # i: the fused window's pixel, j: the source's
        for j in range(1, n + 1):
            mass = bound(cy[i], cx[j]) - bound(cy[i - 1], cx[j]) - bound(cy[i], cx[j - 1]) + bound(cy[i - 1], cx[j - 1])
            p = k * mass + (1 - k) * py[i - 1] * px[j - 1]
            if p != 0:
                h_joint += float(np.real(-p * np.emath.log2(p)))
    hx, hy = (float(-(p[p > 0] * np.log2(p[p > 0])).sum()) for p in (px, py))
    mi = hx + hy - h_joint
    return 0.0 if mi == 0 else 2 * mi / (hx + hy)


def test_fmi_matches_a_window_by_window_transcription():
    """The vectorised FMI equals the algorithm written out window by window, on a real T1 / PET crop
    with a corner of background, for pixel max, a negated mean (negative correlations) and a fusion
    equal to one source in half of the crop."""
    t1 = metric_array(read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"))[8:24, 30:46, 45]
    pet = metric_array(read_image(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"))[8:24, 30:46, 45]
    t1[:5, :5] = pet[:5, :5] = 0  # a corner of background: constant windows, and windows equal to F
    half = np.where(np.arange(16)[:, None] < 8, t1, pet)
    for f in (np.maximum(t1, pet), 255 - (t1 + pet) / 2, half):
        ref = np.mean([(_window_nfmi_reference(t1[r:r + 3, q:q + 3], f[r:r + 3, q:q + 3])
                        + _window_nfmi_reference(pet[r:r + 3, q:q + 3], f[r:r + 3, q:q + 3])) / 2
                       for r in range(14) for q in range(14)])
        assert M.fmi(t1[None], pet[None], f[None]) == pytest.approx(ref, abs=1e-9)


def test_a_window_scores_the_same_bits_whatever_windows_share_its_call():
    """A window's FMI depends on that window alone. Before, the product of the window pdfs with the
    pixel indices went through BLAS, whose matrix-vector sums change with the number of rows: 2 of the
    92 val pairs' FMI moved in the last bit once the windows equal to the source were left out
    before the work (which makes FMI 1.9x faster on a Harvard slice)."""
    t1 = metric_array(read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"))[:, :, 40:46].transpose(2, 0, 1)
    pet = metric_array(read_image(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"))[:, :, 40:46].transpose(2, 0, 1)
    f = np.round((t1 + pet) / 2 + np.random.default_rng(0).normal(0, 3, t1.shape))
    f[:, :, :50] = t1[:, :, :50]  # the fused image equal to the MRI in a part: windows left out
    wa, _, wf = M._fmi_windows(t1, pet, f)
    every = M._window_fmi(wa, wf)
    assert 0.2 < np.mean(every == 1) < 0.8  # the background: windows equal to the source
    rng = np.random.default_rng(1)
    for size in rng.integers(1, len(wf), 30):
        some = np.sort(rng.choice(len(wf), size, replace=False))
        assert np.array_equal(M._window_fmi(wa[some], wf[some]), every[some])


def test_first_order_metrics_on_closed_forms():
    rows, cols = np.mgrid[0:40, 0:50].astype(float)
    ramp = 3 * cols + 4 * rows  # horizontal step 3, vertical step 4
    assert M.spatial_frequency(ramp) == pytest.approx(5.0)
    assert M.average_gradient(ramp) == pytest.approx(np.sqrt((9 + 16) / 2))
    halves = np.where(cols < 25, 10.0, 200.0)
    assert M.entropy(halves) == pytest.approx(1.0)
    assert M.compute(halves, ramp, halves)["SD"] == pytest.approx(95.0)


def test_identical_images_give_the_ideal_values():
    a, _ = _pair()
    r = M.compute(a, a, a)
    assert r["SSIM"] == r["SSIM_worst"] == pytest.approx(1.0)
    assert r["PSNR"] == M.PSNR_PERFECT
    assert r["CC"] == pytest.approx(1.0)
    assert r["FMI"] == 1.0
    assert r["VIF"] == pytest.approx(2.0, abs=1e-6)
    assert r["Qabf"] == pytest.approx(Q_IDENTICAL, abs=1e-3)  # every edge kept exactly
    assert r["MI"] == pytest.approx(2 * M.entropy(a))
    assert r["SCD"] == 0.0  # F - B is constant: its correlation is defined as 0


def test_fused_equal_to_one_source():
    a, b = _pair("02004", "ct")
    r = M.compute(a, b, a)
    assert r["SSIM_A"] == pytest.approx(1.0)
    assert r["SSIM_worst"] == pytest.approx(M.ssim(b, a))
    assert r["VIF"] == pytest.approx(1.0 + M.vif(b[None], a[None]), abs=1e-6)
    assert r["MI"] == pytest.approx(M.entropy(a) + M.mutual_information(b, a))
    assert r["CC"] == pytest.approx((1 + M.correlation(a, b)) / 2)


def test_swapping_the_sources_changes_only_the_per_source_ssim():
    a, b = _pair()
    f = np.maximum(a, b)
    ab, ba = M.compute(a, b, f), M.compute(b, a, f)
    for k in M.METRICS:
        if k in ("SSIM_A", "SSIM_B"):
            continue
        assert ab[k] == pytest.approx(ba[k], rel=1e-9, abs=1e-12), k
    assert (ab["SSIM_A"], ab["SSIM_B"]) == pytest.approx((ba["SSIM_B"], ba["SSIM_A"]))


def test_degenerate_inputs_give_defined_values_or_clear_errors():
    a, b = _pair()
    for f in (np.zeros_like(a), np.full_like(a, 255.0)):
        r = M.compute(a, b, f)
        assert all(np.isfinite(v) for v in r.values())
    const = np.full_like(a, 7.0)
    r = M.compute(const, const, const)
    assert all(np.isfinite(v) for v in r.values())
    assert r["CC"] == 0.0 and r["SSIM"] == pytest.approx(1.0) and r["PSNR"] == M.PSNR_PERFECT
    with pytest.raises(GeometryError, match="sizes differ"):
        M.compute(a, b, a[:-1])
    bad = a.copy()
    bad[3, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        M.compute(a, b, bad)


def test_volume_metrics_are_finite_and_pool_slices(volumes):
    a, b = volumes
    f = np.maximum(a, b)
    r = M.compute(a, b, f)
    assert all(np.isfinite(v) for v in r.values())
    # pooling: the volume's Qabf lies between its best and worst slice
    per_slice = [M.qabf(a[i : i + 1], b[i : i + 1], f[i : i + 1]) for i in range(a.shape[0])]
    assert min(per_slice) <= r["Qabf"] <= max(per_slice)


@pytest.mark.parametrize("slab_slices", [0, 17, 33])
def test_volume_metrics_slab_by_slab_equal_the_whole_volume_at_once(volumes, monkeypatch, slab_slices):
    """SSIM, Qabf, VIF and the voxel sums are computed on slabs of slices so that scoring a large CT
    needs no whole-volume float64 temporaries: every metric is the same as in one piece (SSIM's
    slabs carry the window's radius of neighbours; differences reach across slab borders)."""
    a, b = volumes
    f = np.where(a > b, 0.7 * a + 0.3 * b, b)
    whole = M.compute(a, b, f)
    monkeypatch.setattr(M, "SLAB_VOXELS", slab_slices * a.shape[1] * a.shape[2])
    steps = [hi - lo for lo, hi in M._slabs(a.shape)]
    assert len(steps) == -(-a.shape[0] // max(1, slab_slices)) and sum(steps) == a.shape[0]
    slabbed = M.compute(a, b, f)
    for k in M.METRICS:
        assert slabbed[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-12), k


def test_sd_and_scd_need_no_whole_volume_temporaries_and_keep_their_values(volumes, monkeypatch):
    """SD and SCD's differences are formed slab by slab (before: whole-volume float64 temporaries,
    which two threads could hold beside their slabs): numpy's whole-array values to 1e-12."""
    a, b = volumes
    f = np.where(a > b, 0.7 * a + 0.3 * b, b)
    monkeypatch.setattr(M, "SLAB_VOXELS", 7 * a.shape[1] * a.shape[2])
    assert len(list(M._slabs(a.shape))) > 2
    assert M.standard_deviation(f) == pytest.approx(float(f.std()), rel=1e-12)
    scd = M.correlation(f - b, a) + M.correlation(f - a, b)
    assert M.correlation(f, a, minus=b) + M.correlation(f, b, minus=a) == pytest.approx(scd, rel=1e-12)
    assert M.compute(a, b, f)["SCD"] == pytest.approx(scd, rel=1e-12)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_metrics_computed_at_once_in_threads_equal_one_at_a_time(volumes, monkeypatch, threads):
    """``compute(threads=N)`` runs the metrics (and FMI's windows in N runs) in N threads: every value
    is the same bit for bit as one at a time, on a volume and on one of its slices."""
    import threading

    a, b = volumes
    f = np.where(a > b, 0.7 * a + 0.3 * b, b)
    ones = [M.compute(x, y, z) for x, y, z in ((a, b, f), (a[10], b[10], f[10]))]
    names, real = set(), M.ssim
    monkeypatch.setattr(M, "ssim", lambda *p: names.add(threading.current_thread().name) or real(*p))
    assert [M.compute(x, y, z, threads=threads) for x, y, z in ((a, b, f), (a[10], b[10], f[10]))] == ones
    assert names and all(n.startswith("medfuse-metrics") for n in names)  # computed off the main thread
    assert M.fmi(a, b, f, threads=threads) == M.fmi(a, b, f)


@pytest.mark.parametrize(
    "other, expected",
    [
        # PEERS.md, pixel max on the val pairs (another implementation of the same conventions)
        ("ct", {"EN": 3.413, "SD": 92.37, "SF": 33.45, "AG": 8.99, "MI": 3.929, "Qabf": 0.590, "VIF": 0.577,
                "SCD": 1.618, "CC": 0.749, "SSIM": 0.713, "SSIM_A": 0.655, "SSIM_B": 0.771, "PSNR": 11.92}),
        ("pet", {"EN": 3.889, "SD": 81.50, "SF": 34.25, "AG": 11.98, "MI": 4.146, "Qabf": 0.804, "VIF": 0.988,
                 "SCD": 1.541, "CC": 0.768, "SSIM": 0.752, "SSIM_A": 0.908, "SSIM_B": 0.597, "PSNR": 13.47}),
    ],
)
def test_pixel_max_on_val_pairs_reproduces_the_peers_table(other, expected):
    harvard = shared_path("harvard")
    cases, _ = find_cases(harvard, [], "val")
    rows = []
    for case in (c for c in cases if c.group == f"mri-{other}"):
        fixed, moving = read_image(case.fixed), read_image(case.moving)
        fused, moved, _, _ = fuse_images(fixed, moving, FuseOptions(method="max", metrics=False))
        rows.append(score(fixed, moved, fused))
    for k, v in expected.items():
        mean = np.mean([r[k] for r in rows])
        digits = len(str(v).split(".")[1])
        assert mean == pytest.approx(v, abs=0.6 * 10**-digits), k
