"""`medfuse batch`: pairing rules, failures, timeouts, resume after SIGKILL, a real dask scheduler."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
from conftest import (
    EXAMPLES,
    assert_one_line_error,
    padded_lines,
    shared_path,
    write_localizer,
)

from medfuse_cli import read_image
from medfuse_cli.batch import discover
from medfuse_cli.errors import InputNotFoundError

T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
MEDFUSE = [sys.executable, "-m", "medfuse_cli"]


def _harvard_pairs(dest: Path, folder: str, n: int) -> list[str]:
    """Symlink the first n pairs of a Harvard folder into dest; returns their IDs."""
    src = shared_path("harvard", folder)
    other = folder.split("-")[1]
    ids = sorted(p.name.split("_")[0] for p in src.glob("*_mri.png"))[:n]
    dest.mkdir(parents=True, exist_ok=True)
    for pid in ids:
        for kind in ("mri", other):
            (dest / f"{pid}_{kind}.png").symlink_to(src / f"{pid}_{kind}.png")
    return ids


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def test_mixed_good_and_bad_cases(tmp_path, cli):
    pairs = tmp_path / "in"
    good = _harvard_pairs(pairs, "mri-pet", 3)
    (pairs / "90001_mri.png").write_text("not a png")  # corrupt
    shutil.copy(pairs / f"{good[0]}_pet.png", pairs / "90001_pet.png")
    from PIL import Image

    Image.new("L", (256, 256), 40).save(pairs / "90002_mri.png")  # constant
    shutil.copy(pairs / f"{good[0]}_pet.png", pairs / "90002_pet.png")
    Image.open(pairs / f"{good[1]}_mri.png").resize((128, 96)).save(pairs / "90003_ct.png")  # aspect differs
    shutil.copy(pairs / f"{good[1]}_mri.png", pairs / "90003_mri.png")
    (pairs / "90004_mri.png").symlink_to(pairs / f"{good[2]}_mri.png")  # no partner
    out = tmp_path / "out"
    res = cli("batch", pairs, "-o", out, "--engine", "sequential", "--method", "max")
    assert res.exit_code == 7, res.stderr
    assert "3 of 6 cases failed" in res.stderr
    assert "90004_mri.png: no CT/PET/SPECT partner" in res.stdout and not padded_lines(res.stdout)
    rows = _summary(out)
    assert {i for i, r in rows.items() if r["status"] == "done"} == set(good)
    assert "not a readable" in rows["90001"]["error"] or "PNG" in rows["90001"]["error"]
    assert "constant" in rows["90002"]["error"]
    assert "differ" in rows["90003"]["error"] or "size" in rows["90003"]["error"]
    for pid in good:
        assert (out / f"{pid}.png").is_file() and (out / f"{pid}.json").is_file()
        assert float(rows[pid]["SSIM_worst"]) > 0.4
    assert not list(out.glob("9000*.png"))
    # the outputs are where `medfuse eval` looks for them
    ev = cli("eval", "--pairs", pairs, "--fused", out)
    assert ev.exit_code == 0 and "mri-pet (3 pairs" in ev.stdout and not padded_lines(ev.stdout)


def test_manifest_initial_transforms_per_case(tmp_path, cli):
    """A manifest's initial_transform column, or its fixed_landmarks and moving_landmarks columns,
    start that case's registration: the IBSI CT with its header moved 800 mm along the table
    registers onto the MR from a rough 790 mm start or from one pair of points 795 mm apart, and
    fails (no overlap) without either, while the batch goes on. summary.csv lists each case's
    warnings."""
    import SimpleITK as sitk

    from medfuse_cli import read_image, write_image

    folder = shared_path("volumes", "ibsi_sts002_ct_mr_pet")
    ct = read_image(folder / "CT_image.nii.gz")
    ct.affine = ct.affine.copy()
    ct.affine[2, 3] += 800.0
    ct.nifti_geometry = None
    write_image(ct, tmp_path / "ct_far.nii.gz")
    (tmp_path / "mr.nii.gz").symlink_to(folder / "MR_T1_image.nii.gz")
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, 0.0, 790.0)), str(tmp_path / "rough.tfm"))
    (tmp_path / "on_mr.csv").write_text("r,a,s\n0,0,0\n")
    (tmp_path / "on_ct.csv").write_text("r,a,s\n0,0,795\n")
    (tmp_path / "a.nii.gz").symlink_to(T1)  # names that say no modality: assumed, with a warning
    (tmp_path / "b.nii.gz").symlink_to(PET)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,fixed,moving,initial_transform,fixed_landmarks,moving_landmarks\n"
                        "with,mr.nii.gz,ct_far.nii.gz,rough.tfm,,\nwithout,mr.nii.gz,ct_far.nii.gz,,,\n"
                        "points,mr.nii.gz,ct_far.nii.gz,,on_mr.csv,on_ct.csv\nplain,a.nii.gz,b.nii.gz,,,\n")
    out = tmp_path / "out"
    res = cli("batch", manifest, "-o", out, "--engine", "sequential", "--no-metrics")
    assert res.exit_code == 7
    rows = _summary(out)
    assert rows["with"]["status"] == "done" and rows["without"]["status"] == "failed"
    assert "do not overlap" in rows["without"]["error"]
    assert json.loads((out / "with.json").read_text())["registration"]["start"] == "--initial-transform"
    assert rows["points"]["status"] == "done"
    points = json.loads((out / "points.json").read_text())["registration"]
    assert points["start"] == "--landmarks" and points["landmarks"]["rms_mm"] < 10  # moved 800, given 795
    # a case's warnings are in summary.csv, where a cluster run is read (workers' logs are not)
    assert "modality unknown, assumed MR" in rows["plain"]["warnings"] and rows["with"]["warnings"] == ""


def test_pairing_rules_manifest_and_timeout(tmp_path, cli):
    # nnU-Net naming: CASE_0000 (FIXED) + CASE_0001 (MOVING)
    nn = tmp_path / "nn"
    nn.mkdir()
    (nn / "brain_0000.nii.gz").symlink_to(T1)
    (nn / "brain_0001.nii.gz").symlink_to(PET)
    cases, rule, _ = discover(nn, tmp_path / "o")
    assert rule == "nnunet" and cases[0].fixed.endswith("brain_0000.nii.gz")
    # one sub-folder per case: the MR (by file name) is FIXED
    sub = tmp_path / "sub" / "case1"
    sub.mkdir(parents=True)
    (sub / "pet.nii.gz").symlink_to(PET)
    (sub / "t1.nii.gz").symlink_to(T1)
    cases, rule, _ = discover(tmp_path / "sub", tmp_path / "o")
    assert rule == "subfolders" and cases[0].fixed.endswith("t1.nii.gz") and cases[0].output.endswith("case1.nii.gz")
    # a CSV manifest with relative paths
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,fixed,moving,output\nspm,nn/brain_0000.nii.gz,nn/brain_0001.nii.gz,spm_fused.nii.gz\n")
    out = tmp_path / "out"
    res = cli("batch", manifest, "-o", out, "--engine", "sequential", "--no-metrics", "--figures")
    assert res.exit_code == 0, res.stderr
    assert (out / "spm_fused.nii.gz").is_file() and _summary(out)["spm"]["status"] == "done"
    assert (out / "spm_fused_figure.png").stat().st_size > 10_000
    # a case over --case-timeout is stopped, reported, and leaves no output
    res = cli("batch", nn, "-o", tmp_path / "slow", "--engine", "sequential", "--case-timeout", "0.5")
    assert res.exit_code == 7
    row = _summary(tmp_path / "slow")["brain"]
    assert row["status"] == "timeout" and "--case-timeout" in row["error"]
    assert not (tmp_path / "slow" / "brain.nii.gz").exists()


def test_cases_whose_reports_or_figures_would_collide_are_refused(tmp_path, cli):
    """a.png and a.tif would share the report a.json; with --figures, b's output a_figure.png is a's figure."""
    manifest = tmp_path / "m.csv"
    for second, other_id, extra in (("a.tif", "b", ()), ("a_figure.png", "b", ("--figures",)),
                                    ("a.png", "a", ())):  # the last: one id twice
        manifest.write_text(f"id,fixed,moving,output\na,{T1},{PET},a.png\n{other_id},{T1},{PET},{second}\n")
        res = cli("batch", manifest, "-o", tmp_path / "out", "--engine", "sequential", *extra)
        assert_one_line_error(res, 4)
        assert f"cases a and {other_id} would both write" in res.stderr and not (tmp_path / "out").exists()
    # without --figures no figure is written, so an output named like one is no collision
    from medfuse_cli.batch import discover

    manifest.write_text(f"id,fixed,moving,output\na,{T1},{PET},a.png\nb,{T1},{PET},a_figure.png\n")
    cases, _, _ = discover(manifest, tmp_path / "out")
    assert [Path(c.output).name for c in cases] == ["a.png", "a_figure.png"]


def test_a_manifest_saved_by_a_spreadsheet(tmp_path, cli):
    """Excel's "CSV UTF-8" (byte-order mark, CRLF), semicolons, tabs in UTF-16 and spaces after the
    commas were all "a manifest needs the columns id,fixed,moving"; a short row was an internal error."""
    rows = [("id", "fixed", "moving"), ("spm", str(T1), str(PET))]
    for name, text, encoding in (("bom.csv", "\ufeff" + "".join(",".join(r) + "\r\n" for r in rows), "utf-8"),
                                 ("semi.csv", "".join(";".join(r) + "\n" for r in rows), "utf-8"),
                                 ("spaces.csv", "".join(", ".join(r) + "\n" for r in rows), "utf-8"),
                                 ("tabs.csv", "".join("\t".join(r) + "\r\n" for r in rows), "utf-16")):
        (tmp_path / name).write_bytes(text.encode(encoding))
        cases, rule, _ = discover(tmp_path / name, tmp_path / "out")
        assert rule == "manifest" and [(c.id, c.fixed, c.moving) for c in cases] == [("spm", str(T1), str(PET))], name
    (tmp_path / "short.csv").write_text(f"id,fixed,moving\nspm,{T1},{PET}\nb,{T1}\n")
    res = cli("batch", tmp_path / "short.csv", "-o", tmp_path / "out")
    assert_one_line_error(res, 4)
    assert "short.csv: line 3: no moving" in res.stderr and not (tmp_path / "out").exists()
    (tmp_path / "other.csv").write_text("case;mri;pet\n")
    res = cli("batch", tmp_path / "other.csv", "-o", tmp_path / "out")
    assert_one_line_error(res, 4)
    assert "columns found: case, mri, pet" in res.stderr


def test_folders_of_hdr_img_pairs(tmp_path, cli):
    """Analyze / NIfTI .hdr + .img pairs were found only through a CSV manifest; every folder rule
    now names a pair by its .hdr (its .img goes with it) and the case fuses in FIXED's geometry."""
    import numpy as np

    def pair(src: Path, dest: Path) -> None:
        image = nib.load(src)
        nib.Nifti1Pair(np.asarray(image.dataobj), image.affine).to_filename(dest)

    for name, partner in (("bench/s1_mri.hdr", "bench/s1_pet.hdr"), ("nn/b_0000.hdr", "nn/b_0001.hdr"),
                          ("sub/c1/t1.hdr", "sub/c1/pet.hdr")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pair(T1, tmp_path / name)
        pair(PET, tmp_path / partner)
    for folder, expected in (("bench", "benchmark"), ("nn", "nnunet"), ("sub", "subfolders")):
        cases, rule, unpaired = discover(tmp_path / folder, tmp_path / "o")
        assert (rule, len(cases), unpaired) == (expected, 1, []), (folder, unpaired)
        assert cases[0].fixed.endswith(("_mri.hdr", "_0000.hdr", "t1.hdr")) and cases[0].output.endswith(".nii.gz")
    from medfuse_cli.evaluate import find_cases

    assert [c.fixed.name for c in find_cases(tmp_path / "bench", [])[0]] == ["s1_mri.hdr"]  # eval --pairs too
    res = cli("batch", tmp_path / "sub", "-o", tmp_path / "out", "--engine", "sequential", "--method", "mean",
              "--no-metrics")
    assert res.exit_code == 0, res.stderr
    np.testing.assert_allclose(nib.load(tmp_path / "out" / "c1.nii.gz").affine, nib.load(T1).affine, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_existing_dask_scheduler_and_worker(tmp_path, cli):
    pairs = tmp_path / "in"
    ids = _harvard_pairs(pairs, "mri-spect", 4)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = Path(sys.executable).with_name("dask")
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2)
        procs.append(subprocess.Popen([str(dask), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "900M"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from dask.distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        res = cli("batch", pairs, "-o", tmp_path / "dask", "--scheduler", address, "--method", "wavelet")
        assert res.exit_code == 0, res.stderr
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert cli("batch", pairs, "-o", tmp_path / "seq", "--engine", "sequential", "--method", "wavelet").exit_code == 0
    for pid in ids:
        assert (tmp_path / "dask" / f"{pid}.png").read_bytes() == (tmp_path / "seq" / f"{pid}.png").read_bytes()
        assert _summary(tmp_path / "dask")[pid]["status"] == "done"
        # --max-memory auto inside a worker: at most 90% of the worker's own limit, not the machine's
        memory = json.loads((tmp_path / "dask" / f"{pid}.json").read_text())["memory"]
        limit = memory["limit_bytes"]
        assert limit <= 0.9 * 900 * 2**20
        assert memory["metric_threads"] == 1  # one worker, one core: the metrics one at a time too
        seq_limit = json.loads((tmp_path / "seq" / f"{pid}.json").read_text())["memory"]["limit_bytes"]
        assert seq_limit > limit  # the sequential engine's auto: what the machine has free


def test_sigkill_part_way_then_resume(tmp_path, cli):
    pairs = tmp_path / "in"
    ids = _harvard_pairs(pairs, "mri-pet", 16)
    out = tmp_path / "out"
    proc = subprocess.Popen([*MEDFUSE, "batch", str(pairs), "-o", str(out), "--workers", "2", "-q"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.json"))) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 4 <= len(finished) < len(ids), "the kill should land part-way"
    res = cli("batch", pairs, "-o", out, "--engine", "sequential")
    assert res.exit_code == 0, res.stderr
    rows = _summary(out)
    for pid, mtime in finished.items():
        assert rows[pid]["status"] == "skipped" and (out / f"{pid}.json").stat().st_mtime_ns == mtime
    assert {r["status"] for i, r in rows.items() if i not in finished} == {"done"}
    assert not list(out.rglob("*.partial"))
    clean = tmp_path / "clean"
    assert cli("batch", pairs, "-o", clean, "--engine", "sequential").exit_code == 0
    for pid in ids:
        assert (out / f"{pid}.png").read_bytes() == (clean / f"{pid}.png").read_bytes(), pid


def test_fuse_options_reach_every_case(tmp_path, cli):
    pairs = tmp_path / "in"
    _harvard_pairs(pairs, "mri-ct", 1)
    bad = cli("batch", pairs, "-o", tmp_path / "o1", "--engine", "sequential", "--device", "tpu")
    assert bad.exit_code == 4 and "device" in bad.stderr
    res = cli("batch", pairs, "-o", tmp_path / "o2", "--engine", "sequential", "--method", "mean", "--device", "cpu",
              "--no-metrics")
    assert res.exit_code == 0, res.stderr
    import json

    report = json.loads(next((tmp_path / "o2").glob("*.json")).read_text())
    assert report["parameters"]["device"] == "cpu" and report["parameters"]["method"] == "mean"
    assert "metrics" not in report


def test_dicom_series_outputs_with_anonymize_and_resume(tmp_path, cli):
    import shutil

    import pydicom
    from conftest import EXAMPLES

    case = tmp_path / "in" / "c1"
    case.mkdir(parents=True)
    shutil.copy(EXAMPLES / "dicom" / "mr_t1_xa30.zip", case / "mr_t1_xa30.zip")
    shutil.copy(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz", case / "OldNorm_PET.nii.gz")
    args = ("batch", tmp_path / "in", "-o", tmp_path / "out", "--engine", "sequential", "--method", "mean",
            "--no-metrics", "--dicom", "--anonymize")
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    files = sorted((tmp_path / "out" / "c1").glob("*.dcm"))
    assert len(files) > 10
    d = pydicom.dcmread(files[0])
    assert d.PatientIdentityRemoved == "YES" and list(d.ImageType) == ["DERIVED", "SECONDARY"]
    left = tmp_path / "out" / ".c2.abc123.partial"  # an unfinished series of a killed run
    (left / "x").mkdir(parents=True)
    again = cli(*args)
    assert again.exit_code == 0, again.stderr
    assert not left.exists()
    with open(tmp_path / "out" / "summary.csv") as fh:
        assert "skipped" in fh.read()  # the complete series is not redone


def test_dicom_outputs_of_one_slice_cases_are_series_of_one_image(tmp_path, cli):
    """With --dicom, a case whose FIXED is one NIfTI slice or one DICOM file (placed in a PET volume)
    is a DICOM series of one image on that slice's grid (before: left as NIfTI, and before that, failed)."""
    import zipfile

    import numpy as np

    for case in ("slice", "dicom_slice", "volume"):
        (tmp_path / "in" / case).mkdir(parents=True)
        (tmp_path / "in" / case / "pet.nii.gz").symlink_to(PET)
    nib.save(nib.load(T1).slicer[:, :, 44:45], tmp_path / "in" / "slice" / "t1.nii.gz")
    with zipfile.ZipFile(EXAMPLES / "dicom" / "mr_t1_xa30.zip") as zf:  # one single-frame MR file
        name = sorted(n for n in zf.namelist() if not n.endswith("/"))[47]
        (tmp_path / "in" / "dicom_slice" / "mr.dcm").write_bytes(zf.read(name))
    (tmp_path / "in" / "volume" / "t1.nii.gz").symlink_to(T1)
    res = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--engine", "sequential", "--dicom", "--method", "mean",
              "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert {r["status"] for r in _summary(tmp_path / "out").values()} == {"done"}
    for case, fixed, shape in (("slice", "t1.nii.gz", (91, 109, 1)), ("dicom_slice", "mr.dcm", (128, 128, 1))):
        assert [f.name for f in (tmp_path / "out" / case).iterdir()] == ["IM00001.dcm"]
        fused = read_image(tmp_path / "out" / case)
        assert fused.shape == shape
        grid = read_image(tmp_path / "in" / case / fixed).affine  # its pixels where FIXED's are; one slice has no
        np.testing.assert_allclose(fused.affine[:, [0, 1, 3]], grid[:, [0, 1, 3]], atol=1e-4)  # slice direction:
        np.testing.assert_allclose(np.abs(fused.affine[:, 2]), np.abs(grid[:, 2]), atol=1e-4)  # DICOM's row x column
    assert len(list((tmp_path / "out" / "volume").glob("*.dcm"))) == 91


def test_two_batches_into_one_folder_do_not_collide(tmp_path, cli):
    pairs = tmp_path / "in"
    pairs.mkdir()
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    for i in range(3):
        (pairs / f"case{i}_0000.nii.gz").symlink_to(t1)
        (pairs / f"case{i}_0001.nii.gz").symlink_to(pet)
    out = tmp_path / "out"
    first = subprocess.Popen([*MEDFUSE, "batch", str(pairs), "-o", str(out), "--engine", "sequential", "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".medfuse-batch.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and "pid" not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.01)  # until the first run holds the lock (it then fuses 3 cases, several seconds each)
    assert first.poll() is None, "the first run should still be busy"
    res = cli("batch", pairs, "-o", out, "--engine", "sequential")
    assert res.exit_code == 6 and "another medfuse batch (pid" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("medfuse: error: ")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = _summary(out)
    assert sorted(rows) == ["case0", "case1", "case2"] and {r["status"] for r in rows.values()} == {"done"}
    assert not list(out.rglob("*.partial"))
    for i in range(3):
        assert nib.load(out / f"case{i}.nii.gz").shape == (91, 109, 91)
    res = cli("batch", pairs, "-o", out, "--engine", "sequential")  # the lock went with the first run
    assert res.exit_code == 0 and {r["status"] for r in _summary(out).values()} == {"skipped"}


def test_local_cluster_workers_share_the_free_memory(monkeypatch):
    """Each of N local workers gets 1/N of the memory free now (dask's default: 1/N of the total); N
    defaults to the cores the process may use."""
    import dask.distributed

    from medfuse_cli import batch, memory

    seen = {}

    class Stop(Exception):
        pass

    def fake_cluster(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(dask.distributed, "LocalCluster", fake_cluster)
    monkeypatch.setattr(memory, "available", lambda: 8 << 30)
    with pytest.raises(Stop):
        batch._run_dask([object()] * 3, {}, 2, None, None, lambda row: None)
    assert seen["n_workers"] == 2 and seen["memory_limit"] == 4 << 30
    # by default one worker per core this process may use (a Slurm job's 1 of the node's 64), not per core of the node
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    with pytest.raises(Stop):
        batch._run_dask([object()] * 3, {}, None, None, None, lambda row: None)
    assert seen["n_workers"] == 1 and seen["memory_limit"] == 8 << 30


def test_cases_run_on_their_share_of_the_cores(tmp_path, cli, monkeypatch):
    """Every case ran on one thread, even the sequential engine's (one case at a time) and a
    LocalCluster with fewer workers than cores; the sequential engine also left OMP_NUM_THREADS=1 and
    torch on one thread in its process. Now a case gets the cores shared among the cases that run
    at once, and the process's settings come back; the threads are not part of the fingerprint."""
    import torch

    pairs = tmp_path / "in"
    _harvard_pairs(pairs, "mri-pet", 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # dask's LocalCluster sets it to 1 in this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 cores, as a job's
    torch_before = torch.get_num_threads()

    def threads_of(out):
        reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        assert len(reports) == 2
        return {(r["memory"]["metric_threads"], r["device"]) for r in reports}

    seq = cli("batch", pairs, "-o", tmp_path / "seq", "--engine", "sequential", "--method", "dran")
    assert seq.exit_code == 0, seq.stderr
    assert threads_of(tmp_path / "seq") == {(2, "cpu, 2 threads")}
    assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == torch_before
    local = cli("batch", pairs, "-o", tmp_path / "local", "--workers", "1", "--method", "dran")
    assert local.exit_code == 0, local.stderr
    assert threads_of(tmp_path / "local") == {(2, "cpu, 2 threads")}  # one worker: both cores
    assert "OMP_NUM_THREADS" not in os.environ  # as before dask's LocalCluster set it to 1 here
    again = cli("batch", pairs, "-o", tmp_path / "local", "--workers", "1", "--method", "dran", "--threads", "1")
    assert again.exit_code == 0 and {r["status"] for r in _summary(tmp_path / "local").values()} == {"skipped"}
    one = cli("batch", pairs, "-o", tmp_path / "one", "--engine", "sequential", "--method", "dran", "--threads", "1")
    assert one.exit_code == 0 and threads_of(tmp_path / "one") == {(1, "cpu, 1 thread")}
    for p in (tmp_path / "seq").glob("*.png"):  # the same fused image, whatever the threads
        assert p.read_bytes() == (tmp_path / "one" / p.name).read_bytes()


def test_a_dask_worker_shares_its_cores_among_its_threads(monkeypatch):
    import distributed

    from medfuse_cli.batch import case_threads

    class Worker:
        class state:  # as distributed.Worker.state
            nthreads = 2

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert case_threads() == 8 and case_threads(3) == 3  # not in a worker: all of them; given: as given
    monkeypatch.setattr(distributed, "get_worker", lambda: Worker())
    assert case_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as dask's nanny starts a worker
    assert case_threads() == 1


def test_cases_at_once_in_one_worker_keep_their_thread_settings_until_the_last_ends(monkeypatch):
    """A dask worker with several threads runs cases at once, each inside ``limited_threads``: the
    first case to end put the process's settings back under the others (ITK's default and
    OMP_NUM_THREADS went back to the process's mid-case). Now the last one to end restores them."""
    import threading

    import SimpleITK as sitk

    from medfuse_cli.parallel import limited_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    itk_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with limited_threads(3):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with limited_threads(3):
            second_in.set()
            first_out.wait(10)
            seen.append((os.environ.get("OMP_NUM_THREADS"), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))

    runs = [threading.Thread(target=f) for f in (first, second)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)
    assert seen == [("3", 3)]  # the second case still has its settings after the first ended
    assert "OMP_NUM_THREADS" not in os.environ and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == itk_before


MAPPED_ARRAYS = """
import ctypes, sys
import numpy as np
from medfuse_cli import batch

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
keep, counts = [], []
for step in ("before", "after"):
    if step == "after":
        batch.run_case({"id": "x", "fixed": "missing", "moving": "missing", "output": sys.argv[1]}, {}, "fp")
    start = libc.mallinfo2().hblks
    keep += [np.ones(2**17) for _ in range(20)]  # 1 MiB each
    counts.append(libc.mallinfo2().hblks - start)
print(*counts)
"""


def test_every_case_keeps_glibc_from_mapping_each_temporary_array(tmp_path):
    """dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold
    at 128 KiB: every temporary array above it was mapped and faulted in afresh, and the metrics ran
    2.4x slower in a worker than in the sequential engine. Before, only the LocalCluster's workers
    were started with other settings; now every case sets them (mallopt), so that workers started by
    anyone (``dask worker`` on another machine) get them too: arrays of 1 MiB come from the heap."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc 2.33 or later")
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", MAPPED_ARRAYS, str(tmp_path / "o.nii.gz")], capture_output=True,
                         text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["20", "0"]  # mapped one by one as a dask worker starts, none after a case


def test_job_array_parts_share_one_output_folder(tmp_path, cli):
    """Two parts of one batch (as two tasks of a job array) fuse disjoint halves into one folder, each
    with its own summary; while a part runs, its twin, a whole run and parts of another count are
    refused, but the other part runs; a part clears only its own leftovers; a whole run afterwards
    finds every case complete and writes summary.csv."""
    from medfuse_cli.batch import Part, exclusive

    pairs, out = tmp_path / "in", tmp_path / "out"
    ids = _harvard_pairs(pairs, "mri-pet", 5)
    args = ("batch", pairs, "-o", out, "--engine", "sequential", "--method", "mean", "--no-metrics")
    seen = {}
    for k in (1, 2):
        res = cli(*args, "--part", f"{k}/2")
        assert res.exit_code == 0, res.stderr
        assert f"part {k} of 2: {3 if k == 1 else 2} cases of 5" in res.stdout
        with open(out / f"summary.part-{k}-of-2.csv", newline="") as fh:
            seen[k] = {r["id"]: r["status"] for r in csv.DictReader(fh)}
    assert seen[1].keys().isdisjoint(seen[2]) and sorted({**seen[1], **seen[2]}) == ids
    assert set(seen[1].values()) == set(seen[2].values()) == {"done"} and not (out / "summary.csv").exists()
    mine, theirs = (out / f".{next(iter(seen[k]))}.png.x1y2z3.partial" for k in (1, 2))
    with exclusive(out, Part(1, 2)):  # part 1 is running
        mine.write_bytes(b"half")
        for extra, held in (((("--part", "1/2"), "--part 1/2")), (((), "parts of one run")),
                            ((("--part", "1/3"), "another count than 3"))):
            res = cli(*args, *extra)
            assert res.exit_code == 6 and held in res.stderr, (extra, res.stderr)
        theirs.write_bytes(b"half")
        res = cli(*args, "--part", "2/2", "--force")
        assert res.exit_code == 0, res.stderr
        assert mine.exists() and not theirs.exists()  # part 2 cleared its own leftover only
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert not mine.exists()
    assert sorted(_summary(out)) == ids and {r["status"] for r in _summary(out).values()} == {"skipped"}


@pytest.mark.parametrize("spec, env, expected", [
    ("2/4", {}, (2, 4)),
    (" 4 / 4 ", {}, (4, 4)),
    ("slurm", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"}, (1, 3)),
    ("slurm", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "3",
               "SLURM_ARRAY_TASK_STEP": "2"}, (3, 3)),
    ("0/4", {}, "counts from 1"),
    ("5/4", {}, "counts from 1"),
    ("1/0", {}, "counts from 1"),
    ("half", {}, "give K/N"),
    ("slurm", {"SLURM_ARRAY_TASK_ID": "3"}, "not inside a Slurm job array"),
    ("slurm", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}, "consecutive"),
])
def test_part_specs(spec, env, expected):
    from medfuse_cli.batch import parse_part
    from medfuse_cli.errors import InvalidInputError

    if isinstance(expected, str):
        with pytest.raises(InvalidInputError, match=expected):
            parse_part(spec, env)
    else:
        part = parse_part(spec, env)
        assert (part.index, part.count) == expected


def test_parts_are_disjoint_and_cover_every_case():
    from medfuse_cli.batch import BatchCase, Part

    cases = [BatchCase(f"c{i:02d}", "f", "m", f"o{i}") for i in (7, 3, 11, 0, 5, 9, 2)]
    parts = [Part(k, 3).select(cases) for k in (1, 2, 3)]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cases)
    assert [len(p) for p in parts] == [3, 2, 2]


def test_a_file_system_without_locks_warns_instead_of_refusing(tmp_path, monkeypatch, caplog):
    """flock failing with ENOSYS (a cluster file system mounted without locks) is not "another batch
    is running": the run goes on, with a warning."""
    import errno
    import fcntl

    from medfuse_cli.batch import exclusive

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with exclusive(tmp_path):
        ran = True
    assert ran and "no file locking on the file system" in caplog.text


def test_case_folders_of_dicom_files_pair_their_mr_and_pet_series(tmp_path, cli):
    """A case folder holding the DICOM files of an MR, a PET and a localizer series side by side (as a
    PACS exports a study) is one case: the MR series is FIXED, the PET series MOVING, the localizer left
    out; a folder with the MR alone is listed as not paired, with its series."""
    import zipfile

    pet = shared_path("dicom", "pt_ge_discoveryst_fdg_sts001", "dicom")
    study, mr_only = tmp_path / "in" / "study1", tmp_path / "in" / "study2"
    for folder in (study, mr_only):
        zipfile.ZipFile(EXAMPLES / "dicom" / "mr_t1_xa30.zip").extractall(folder)
    write_localizer(study)  # an MR series too, but a scout: left out
    for f in sorted(pet.glob("*.dcm")):
        (study / f"pet_{f.name}").symlink_to(f)
    cases, rule, unpaired = discover(tmp_path / "in", tmp_path / "out")
    assert rule == "subfolders" and [c.id for c in cases] == ["study1"]
    assert cases[0].fixed == cases[0].moving == str(study) and cases[0].fixed_series != cases[0].moving_series
    assert len(unpaired) == 1 and unpaired[0].startswith("study2: DICOM files of 1 MR and 0 CT/PET/SPECT series")
    res = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--engine", "sequential", "--method", "mean",
              "--no-metrics", "--transform", "none")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "study1.json").read_text())
    assert (report["inputs"]["fixed"]["modality"], report["inputs"]["moving"]["modality"]) == ("MR", "PT")
    assert nib.load(tmp_path / "out" / "study1.nii.gz").shape == read_image(EXAMPLES / "dicom" / "mr_t1_xa30.zip").shape
    # fuse takes the same study as FIXED and MOVING: its MR series and its PET series
    res = cli("fuse", study, study, "-o", tmp_path / "one.nii.gz", "--method", "mean", "--no-metrics",
              "--transform", "none")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "one.json").read_text())
    assert (report["inputs"]["fixed"]["modality"], report["inputs"]["moving"]["modality"]) == ("MR", "PT")
    res = cli("fuse", mr_only, mr_only, "-o", tmp_path / "two.nii.gz")
    assert res.exit_code == 2 and "1 MR and 0 CT/PET/SPECT series" in res.stderr
    missing = tmp_path / "missing.zip"
    assert cli("fuse", missing, missing, "-o", tmp_path / "three.nii.gz").exit_code == 3


def test_case_folders_of_series_named_by_number_pair_by_their_headers_alone(tmp_path, monkeypatch):
    """A case folder of two DICOM series whose names say nothing (as PACS exports name them) pairs by
    the series' headers; finding the cases reads no pixels (before, both series were read whole)."""
    import zipfile

    from medfuse_cli.io import dicom

    case = tmp_path / "in" / "case1"
    zipfile.ZipFile(EXAMPLES / "dicom" / "mr_t1_xa30.zip").extractall(case / "2")
    (case / "1").mkdir()
    for f in sorted(shared_path("dicom", "pt_ge_discoveryst_fdg_sts001", "dicom").glob("*.dcm")):
        (case / "1" / f.name).symlink_to(f)

    def no_pixels(entry):
        raise AssertionError(f"pixels of {entry.name} read while finding the cases")

    monkeypatch.setattr(dicom, "_pixels", no_pixels)
    cases, rule, unpaired = discover(tmp_path / "in", tmp_path / "out")
    assert rule == "subfolders" and not unpaired
    assert [(c.id, Path(c.fixed).name, Path(c.moving).name) for c in cases] == [("case1", "2", "1")]


def test_a_changed_dicom_folder_is_not_taken_as_complete(tmp_path):
    """A case whose input is a folder (a DICOM series or study) gets a new fingerprint when a file is
    added to it or changed, so a re-run redoes it; an untouched folder keeps its fingerprint."""
    from medfuse_cli.batch import BatchCase, fingerprint

    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.dcm").write_bytes(b"x" * 10)
    case = BatchCase("c", str(folder), str(folder), str(tmp_path / "c.nii.gz"))
    first = fingerprint(case, {})
    assert fingerprint(case, {}) == first
    (folder / "b.dcm").write_bytes(b"y")
    second = fingerprint(case, {})
    assert second != first
    (folder / "b.dcm").write_bytes(b"yy")
    assert fingerprint(case, {}) != second


def test_dask_workers_print_case_messages_at_the_batch_level(tmp_path):
    """A case's warnings carry the case id, from a dask worker or the sequential engine, and a worker's
    follow --quiet / --verbose (before: bare lines, even with --quiet); summary.csv keeps them."""
    pairs = tmp_path / "in"
    pairs.mkdir()
    for case in ("alpha", "beta"):  # nnU-Net names: modality unknown, a warning for each input
        (pairs / f"{case}_0000.nii.gz").symlink_to(T1)
        (pairs / f"{case}_0001.nii.gz").symlink_to(PET)
    runs = {}
    for level in ("-q", None, "-v", "sequential"):
        out = tmp_path / f"out{level}"
        args = ["--engine", "sequential"] if level == "sequential" else ["--workers", "1", *([level] if level else [])]
        proc = subprocess.run([*MEDFUSE, "batch", str(pairs), "-o", str(out), "-m", "mean", "--no-metrics", *args],
                              check=False, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "modality unknown" in _summary(out)["alpha"]["warnings"]
        runs[level] = proc.stderr
    assert "modality unknown" not in runs["-q"]
    for level in (None, "-v", "sequential"):  # the same tagged lines from the batch's own process
        lines = [line.rstrip() for line in runs[level].splitlines() if "modality unknown" in line]
        assert sorted(lines) == sorted(f"WARNING  {case}: {case}_000{i}.nii.gz: modality unknown, assumed {m}"
                                       for case in ("alpha", "beta") for i, m in ((0, "MR"), (1, "PT")))
    assert "INFO  alpha: registration skipped" in runs["-v"] and "INFO" not in runs[None]


def test_a_pair_whose_two_files_differ_in_format_is_found(tmp_path, cli):
    """``ID_mri.png`` with ``ID_pet.tif``, ``ID_mri.nii.gz`` with ``ID_pet.nii``: the partner was looked
    for with the MRI's own suffix only, so such pairs were listed as having no partner and left out
    (of `batch` and of `eval --pairs` alike)."""
    from PIL import Image

    pairs = tmp_path / "in"
    pid = _harvard_pairs(pairs, "mri-pet", 1)[0]
    Image.open(pairs / f"{pid}_pet.png").save(pairs / f"{pid}_pet.tif")
    (pairs / f"{pid}_pet.png").unlink()
    shutil.copy(T1, pairs / "spm_mri.nii.gz")
    nib.save(nib.load(str(PET)), str(pairs / "spm_pet.nii"))
    shutil.copy(T1, pairs / "two_mri.nii.gz")  # two partners: which one is meant cannot be told
    shutil.copy(PET, pairs / "two_pet.nii.gz")
    nib.save(nib.load(str(PET)), str(pairs / "two_ct.nii"))
    out = tmp_path / "out"
    res = cli("batch", pairs, "-o", out, "--engine", "sequential", "--method", "mean")
    assert res.exit_code == 0, res.stderr
    assert "two_mri.nii.gz: several CT/PET/SPECT partner" in res.stdout
    rows = _summary(out)
    assert {i: r["status"] for i, r in rows.items()} == {pid: "done", "spm": "done"}
    assert rows[pid]["moving"].endswith("_pet.tif") and rows["spm"]["moving"].endswith("spm_pet.nii")
    ev = cli("eval", "--pairs", pairs, "--fused", out, "--json", tmp_path / "scores.json")
    assert ev.exit_code == 0, ev.stderr
    scored = json.loads((tmp_path / "scores.json").read_text())
    assert sorted(c["id"] for c in scored["cases"]) == sorted([pid, "spm"])


def test_nnunet_channels_take_their_modalities_from_dataset_json(tmp_path, cli):
    """nnU-Net's ``dataset.json`` names its channels (``channel_names``; ``modality`` in v1). Without
    reading it, a CT in channel 0000 and an MRI in 0001 were fused as FIXED "MR" and MOVING "PT" (both
    assumed, with a warning): the MRI's roles swapped and the PET weights used for a CT."""
    src = shared_path("harvard", "mri-ct")
    pid = min(p.name.split("_")[0] for p in src.glob("*_mri.png"))
    images = tmp_path / "Dataset001_Brain" / "imagesTs"
    images.mkdir(parents=True)
    (images / "c_0000.png").symlink_to(src / f"{pid}_ct.png")
    (images / "c_0001.png").symlink_to(src / f"{pid}_mri.png")
    (images.parent / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "T2"},
                                                            "labels": {"background": 0}, "file_ending": ".png"}))
    out = tmp_path / "out"
    res = cli("batch", images, "-o", out, "--engine", "sequential", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "c.json").read_text())
    assert report["inputs"]["fixed"]["file"] == "c_0001.png"  # the MRI is FIXED
    assert (report["inputs"]["fixed"]["modality"], report["inputs"]["moving"]["modality"]) == ("MR", "CT")
    assert report["warnings"] == []
    assert report["batch"]["modalities_from"] == str(images.parent / "dataset.json")
    # nnU-Net v1 names them under "modality"; a name that says nothing (here "noNorm") stays unknown
    (images.parent / "dataset.json").write_text(json.dumps({"modality": {"0": "noNorm", "1": "MRI"}}))
    case = discover(images, tmp_path / "o")[0][0]
    assert case.fixed.endswith("c_0001.png") and (case.fixed_modality, case.moving_modality) == ("MR", None)
    # a dataset.json that cannot be read is refused (before, a warning, and the channels guessed as MR and PET)
    for broken in ("{not json", '{"channel_names": {"zero": "CT", "1": "T2"}}', '["CT", "T2"]'):
        (images.parent / "dataset.json").write_text(broken)
        res = cli("batch", images, "-o", tmp_path / "o", "--engine", "sequential")
        assert_one_line_error(res, 4)
        assert "dataset.json: unreadable" in res.stderr and not (tmp_path / "o" / "c.png").exists()


def test_nnunet_cases_of_more_channels_pair_the_mr_with_each_other_modality(tmp_path, cli):
    """With more than two channels, dataset.json says which are MR and which CT / PET / SPECT; before,
    channels from 0002 on were ignored without a word (a BraTS case was fused as FLAIR with T1)."""
    src = shared_path("harvard", "mri-pet")
    pid = min(p.name.split("_")[0] for p in src.glob("*_mri.png"))
    images = tmp_path / "imagesTs"
    images.mkdir()
    for ch, name in (("0000", "mri"), ("0001", "mri"), ("0002", "pet")):
        (images / f"c_{ch}.png").symlink_to(src / f"{pid}_{name}.png")
    (images / "d_0000.png").symlink_to(src / f"{pid}_mri.png")  # a case with one channel
    dataset = tmp_path / "dataset.json"

    def left_out(names: dict[str, str] | None) -> str:
        dataset.unlink(missing_ok=True)
        if names is not None:
            dataset.write_text(json.dumps({"channel_names": names}))
        with pytest.raises(InputNotFoundError) as err:
            discover(images, tmp_path / "o")
        return str(err.value)

    assert "not paired: c: 3 channel(s) (0000, 0001, 0002); needs channels 0000 and 0001, or a dataset.json naming more" \
        in left_out(None)
    assert "(and 1 more)" in left_out(None)
    brats = left_out({"0": "FLAIR", "1": "T1w", "2": "T2w"})
    assert "0000 MR, 0001 MR, 0002 MR in dataset.json; no CT/PET/SPECT to pair" in brats
    assert "c: 3 channel(s) (0000, 0001, 0002), but dataset.json names 0000, 0001, 0002, 0003" in left_out(
        {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"})
    assert "two of one modality" in left_out({"0": "MR", "1": "PET", "2": "FDG-PET"})
    assert "no MR" in left_out({"0": "CT", "1": "noNorm", "2": "PET"})
    dataset.write_text(json.dumps({"channel_names": {"0": "T1", "1": "CT", "2": "PET"}}))
    several = {c.id: (Path(c.fixed).name, Path(c.moving).name, Path(c.output).name, c.moving_modality)
               for c in discover(images, tmp_path / "o")[0]}
    assert several == {"c_ct": ("c_0000.png", "c_0001.png", "c_ct.png", "CT"),
                       "c_pet": ("c_0000.png", "c_0002.png", "c_pet.png", "PT")}

    dataset.write_text(json.dumps({"channel_names": {"0": "FLAIR", "1": "T1", "2": "FDG-PET"}}))
    out = tmp_path / "out"
    res = cli("batch", images, "-o", out, "--engine", "sequential", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert "not paired: d: 1 channel(s) (0000), but dataset.json names 0000, 0001, 0002" in res.stdout
    report = json.loads((out / "c.json").read_text())
    assert (report["inputs"]["fixed"]["file"], report["inputs"]["moving"]["file"]) == ("c_0000.png", "c_0002.png")
    assert (report["inputs"]["fixed"]["modality"], report["inputs"]["moving"]["modality"]) == ("MR", "PT")


def test_manifest_modality_columns(tmp_path, cli):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,fixed,moving,fixed_modality,moving_modality\nspm,{T1},{PET},,SPECT\n")
    out = tmp_path / "out"
    res = cli("batch", manifest, "-o", out, "--engine", "sequential", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "spm.json").read_text())
    assert report["inputs"]["moving"]["modality"] == "NM"
    assert report["batch"]["modalities_from"] == str(manifest)
    # the command's option wins over the column
    res = cli("batch", manifest, "-o", out, "--engine", "sequential", "--method", "mean", "--no-metrics",
              "--moving-modality", "PET")
    assert res.exit_code == 0, res.stderr
    report = json.loads((out / "spm.json").read_text())
    assert report["inputs"]["moving"]["modality"] == "PT" and "modalities_from" not in report["batch"]
    manifest.write_text(f"id,fixed,moving,moving_modality\nspm,{T1},{PET},XRAY\n")
    res = cli("batch", manifest, "-o", tmp_path / "bad", "--engine", "sequential")
    assert_one_line_error(res, 4)
    assert "case 'spm': moving_modality: unknown modality 'XRAY'" in res.stderr
