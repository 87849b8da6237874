"""The memory guard: a large volume made by tiling a real one fuses under --max-memory (smaller
windows, no metrics), and a limit nothing fits under stops before the heavy work with exit 10."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import EXAMPLES, assert_one_line_error

from medfuse_cli.memory import parse_size, plan

T1, PET = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """The bundled T1 and PET templates tiled 2x2x2: 182x218x182, 7.2 M voxels each."""
    folder = tmp_path_factory.mktemp("tiled")
    paths = []
    for src, name in ((T1, "t1_tiled.nii.gz"), (PET, "pet_tiled.nii.gz")):
        img = nib.load(str(src))
        data = np.tile(np.asarray(img.dataobj, dtype=np.float32), (2, 2, 2))
        nib.Nifti1Image(data, img.affine).to_filename(folder / name)
        paths.append(folder / name)
    return paths


def _fuse(*args: object) -> subprocess.CompletedProcess:
    """A fresh process, so the peak memory in the report is this fusion's alone."""
    return subprocess.run([sys.executable, "-m", "medfuse_cli", "fuse", *map(str, args)], capture_output=True,
                          text=True, timeout=900, check=False)


def test_a_large_tiled_volume_fuses_under_the_limit(tiled, tmp_path):
    limit = "1.1G"
    out = tmp_path / "fused.nii.gz"
    res = _fuse(*tiled, "-o", out, "--method", "dcfb3d", "--max-memory", limit)
    assert res.returncode == 0, res.stderr
    memory = json.loads((tmp_path / "fused.json").read_text())["memory"]
    assert memory["limit_bytes"] == parse_size(limit)
    assert memory["patch"] < 96 and not memory["metrics"]  # both economies were needed
    assert memory["estimate_bytes"] <= memory["limit_bytes"]
    assert memory["peak_bytes"] <= memory["limit_bytes"], memory  # measured, not estimated
    assert "metrics skipped" in res.stderr and "sliding window 64" in res.stderr
    fused = nib.load(out)
    assert fused.shape == (182, 218, 182)
    np.testing.assert_array_equal(fused.affine, nib.load(tiled[0]).affine)


def test_a_limit_nothing_fits_under_stops_before_work(tiled, tmp_path):
    res = _fuse(*tiled, "-o", tmp_path / "fused.nii.gz", "--method", "dcfb3d", "--max-memory", "600M")
    assert res.returncode == 10 and "needs about" in res.stderr and "--max-memory" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_sizes_and_plans():
    assert parse_size("auto") is None
    assert parse_size("4G") == 4 << 30 and parse_size("800M") == 800 << 20 and parse_size("1.5GiB") == 3 << 29
    for bad in ("lots", "-1G", "10K"):
        with pytest.raises(Exception) as exc:
            parse_size(bad)
        assert getattr(exc.value, "exit_code", None) == 4
    roomy = plan((182, 218, 182), "dcfb3d", True, 96, "64G")
    assert (roomy.metrics, roomy.patch, roomy.notes) == (True, 96, [])
    small = plan((256, 256, 1), "adafuse", True, 96, "auto")
    assert small.metrics and small.batch == 1 and small.notes == []  # one slice: one per forward


def test_a_large_dran_slice_is_priced_at_its_measured_peak():
    """A 4096x4096 slice fused by DRAN peaks at 11.3 GiB (measured, in strips; ``benchmarks/memory_guard.py``
    prints the 2048x2048 case); before the strips it peaked at 18.9 GiB, priced at 12.4. The guard must
    price it above its peak: refused under 11 GiB, planned under 16."""
    from medfuse_cli.errors import OutOfMemoryError

    with pytest.raises(OutOfMemoryError):
        plan((4096, 4096, 1), "dran", False, 96, "11G")
    assert plan((4096, 4096, 1), "dran", False, 96, "16G").estimate_bytes > 11.3 * 2**30


def test_cpu_plans_count_the_slices_a_network_really_runs():
    """On the CPU a 2D network runs at most its pixels per forward (``models.infer.slice_batch``):
    the plan budgets that batch, not 8, and says nothing about giving batches up."""
    from medfuse_cli.memory import _estimate

    for method, shape, runs in (("adafuse", (91, 109, 91), 8), ("adafuse", (256, 256, 40), 2),
                                ("dran", (256, 256, 40), 1), ("dran", (91, 109, 91), 1)):
        chosen = plan(shape, method, True, 96, "64G", "cpu")
        assert (chosen.batch, chosen.notes) == (runs, []), (method, shape)
        assert chosen.estimate_bytes < _estimate(shape, method, True, 96, 8) or runs == 8


def test_metric_threads_are_planned_within_the_limit(tmp_path, cli, monkeypatch):
    """The report's metrics run --threads at once (at most 6): each thread prices one more slab, and
    under a limit that fits one but not two the plan keeps the metrics on one thread instead of
    giving anything else up; eval's check likewise."""
    from medfuse_cli.memory import _estimate, check_scoring, resident, scoring_bytes
    from medfuse_cli.parallel import cpu_threads

    shape = (182, 218, 182)
    assert scoring_bytes(shape, 2) > scoring_bytes(shape, 1) and scoring_bytes(shape, 6) == scoring_bytes(shape, 9)
    assert plan(shape, "laplacian", True, 96, "64G", threads=4).metric_threads == 4
    one, two = _estimate(shape, "laplacian", True, 96, 8, 1), _estimate(shape, "laplacian", True, 96, 8, 2)
    tight = plan(shape, "laplacian", True, 96, str((one + two) // 2), threads=2)
    assert (tight.metrics, tight.metric_threads, tight.notes) == (True, 1, [])
    limit = str(int(resident() + (scoring_bytes(shape, 1) + scoring_bytes(shape, 2)) / 2))
    assert check_scoring(shape, limit, threads=2) == 1
    assert check_scoring(shape, "64G", threads=3) == 3 and check_scoring(shape, "64G", threads=64) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert (cpu_threads(0), cpu_threads(3)) == (1, 3)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(0) >= 1
    # fuse --threads: the report says how many ran, and the values do not depend on it
    reports = {}
    for threads in (1, 2):
        res = cli("fuse", T1, PET, "-o", tmp_path / f"{threads}.nii.gz", "--method", "laplacian", "--threads", threads)
        assert res.exit_code == 0, res.stderr
        reports[threads] = json.loads((tmp_path / f"{threads}.json").read_text())
    assert [reports[t]["memory"]["metric_threads"] for t in (1, 2)] == [1, 2]
    assert reports[1]["metrics"]["values"] == reports[2]["metrics"]["values"]


def test_bad_max_memory_is_one_line(cli, tmp_path):
    assert_one_line_error(cli("fuse", T1, PET, "-o", tmp_path / "o.nii.gz", "--max-memory", "plenty"), 4)
    assert not list(tmp_path.iterdir())


def test_a_volume_larger_than_the_memory_is_refused_from_its_header(cli, tmp_path, monkeypatch):
    """Checked before any voxel is read (here: a header claiming 400 M voxels, 1 GiB available)."""
    from medfuse_cli import memory

    img = nib.load(str(T1))
    header = img.header.copy()
    header.set_data_shape((1000, 1000, 400))
    big = tmp_path / "big.nii"
    big.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)  # the voxels are never reached
    monkeypatch.setattr(memory, "available", lambda: 1 << 30)
    res = cli("convert", big, "-o", tmp_path / "o.nii.gz")
    assert_one_line_error(res, 10)
    assert "needs about 3.0 GiB" in res.stderr and not (tmp_path / "o.nii.gz").exists()


def test_2d_networks_get_smaller_slice_batches_before_losing_the_metrics():
    """A 128x128x2000 volume with AdaFuse (8 slices per forward on the CPU) under a limit that fits
    batches of 2 slices but not 8: neither batches of 8 nor the metrics fit, and the plan says what
    it gave up."""
    from medfuse_cli.memory import _estimate

    shape = (128, 128, 2000)
    low, high = _estimate(shape, "adafuse", False, 96, 2), _estimate(shape, "adafuse", False, 96, 8)
    limit = (low + high) // 2
    assert high - low > 60 << 20  # batches of 8 would not fit, with room for the resident memory to move
    chosen = plan(shape, "adafuse", True, 96, str(limit))
    assert (chosen.batch, chosen.metrics) == (2, False)
    assert any("batches of 2 slices" in n for n in chosen.notes) and chosen.estimate_bytes <= limit


def test_register_checks_its_memory_before_registering(cli, tmp_path):
    """register had no memory plan: a FIXED too large for the memory ran until the system killed it.
    Now it stops before registering (exit 10), and its report records the limit, estimate and peak."""
    res = cli("register", T1, PET, "-o", tmp_path / "o.nii.gz", "--max-memory", "256M", "--report", tmp_path / "r.json")
    assert_one_line_error(res, 10)
    assert "this registration needs about" in res.stderr and not list(tmp_path.iterdir())
    assert_one_line_error(cli("register", T1, PET, "-o", tmp_path / "o.nii.gz", "--max-memory", "plenty"), 4)
    res = cli("register", T1, PET, "-o", tmp_path / "o.nii.gz", "--max-memory", "64G", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.stderr
    memory = json.loads((tmp_path / "r.json").read_text())["memory"]
    assert memory["limit_bytes"] == parse_size("64G") and 0 < memory["estimate_bytes"] < memory["limit_bytes"]
