"""DICOM output: a new derived series on FIXED's geometry, read back by pydicom, SimpleITK and medfuse."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import EXAMPLES, shared_path

from medfuse_cli import read_image
from medfuse_cli.io.dicom import group_series, scan

MR = EXAMPLES / "dicom" / "mr_t1_xa30.zip"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"


def _corners(affine: np.ndarray, shape) -> np.ndarray:
    """World (RAS) corners of a grid, sorted (readers may order the slices either way)."""
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return np.array(sorted(map(tuple, np.round((affine @ idx.T).T[:, :3], 6))))


def _sitk_corners(img) -> np.ndarray:
    n = img.GetSize()
    pts = [np.array(img.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])) * [-1, -1, 1]
           for i in (0, n[0] - 1) for j in (0, n[1] - 1) for k in (0, n[2] - 1)]
    return np.array(sorted(map(tuple, np.round(pts, 6))))


@pytest.fixture(scope="module")
def fused_series(tmp_path_factory):
    """The bundled MR series fused with the SPM PET, written as DICOM and as NIfTI."""
    from typer.testing import CliRunner

    from medfuse_cli.cli import app

    tmp = tmp_path_factory.mktemp("dicom_out")
    runner = CliRunner()
    args = [str(MR), str(PET), "--method", "mean", "--no-metrics"]
    res = runner.invoke(app, ["fuse", *args, "-o", str(tmp / "series")], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["fuse", *args, "-o", str(tmp / "fused.nii.gz")], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    return tmp


def test_series_is_new_derived_and_in_the_fixed_study(fused_series):
    header = next(iter(group_series(scan(MR)).values()))[0].header
    files = sorted((fused_series / "series").glob("*.dcm"))
    fixed = read_image(MR)
    assert len(files) == fixed.shape[2]
    ds = [pydicom.dcmread(f) for f in files]
    assert {d.SeriesInstanceUID for d in ds} != {header.SeriesInstanceUID}
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    assert len({d.SOPInstanceUID for d in ds}) == len(ds)
    for d in ds:
        assert d.StudyInstanceUID == header.StudyInstanceUID
        assert d.FrameOfReferenceUID == header.FrameOfReferenceUID
        assert list(d.ImageType) == ["DERIVED", "SECONDARY"]
        assert d.ContentQualification == "RESEARCH"
        assert "method mean" in d.DerivationDescription
        assert header.SeriesInstanceUID in [i.SeriesInstanceUID for i in d.ReferencedSeriesSequence]
        assert d.PatientID == header.PatientID
        assert float(d.WindowWidth) > 0


def test_geometry_reads_back_with_pydicom_simpleitk_and_medfuse(fused_series, cli, tmp_path):
    fixed = read_image(MR)
    want = _corners(fixed.affine, fixed.shape)
    # medfuse (convert to NIfTI)
    res = cli("convert", fused_series / "series", "-o", tmp_path / "back.nii.gz")
    assert res.exit_code == 0, res.stderr
    back = nib.load(tmp_path / "back.nii.gz")
    assert back.shape == fixed.shape
    np.testing.assert_allclose(_corners(back.affine, back.shape), want, atol=1e-3)
    # SimpleITK (LPS)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(fused_series / "series")))
    img = reader.Execute()
    assert img.GetSize() == fixed.shape
    np.testing.assert_allclose(_sitk_corners(img), want, atol=1e-3)
    # the values: the NIfTI output of the same fusion, up to the 12-bit mapping
    nii = np.asarray(nib.load(fused_series / "fused.nii.gz").dataobj, np.float64)
    assert np.corrcoef(nii.ravel(), np.asarray(back.dataobj, np.float64).ravel())[0, 1] > 0.9999
    # pydicom: every file's position is FIXED's slice position
    ds = sorted((pydicom.dcmread(f) for f in (fused_series / "series").glob("*.dcm")), key=lambda d: d.InstanceNumber)
    for k, d in enumerate(ds):
        pos = (fixed.affine @ [0, 0, k, 1])[:3] * [-1, -1, 1]
        np.testing.assert_allclose([float(v) for v in d.ImagePositionPatient], pos, atol=1e-3)


DCM2NIIX = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(DCM2NIIX is None, reason="needs dcm2niix (pip package dcm2niix, in the test extras)")
def test_dcm2niix_places_the_series_on_fixed(fused_series, tmp_path):
    """dcm2niix, the converter most pipelines start from, puts every voxel of the derived series where
    FIXED has it: the same world corners and, voxel for voxel, the values of the NIfTI output."""
    out = subprocess.run([DCM2NIIX, "-o", str(tmp_path), "-f", "back", "-z", "n", str(fused_series / "series")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Patient Position" not in out.stdout + out.stderr  # FIXED's (HFS) is copied
    back = nib.load(tmp_path / "back.nii")
    fixed = read_image(MR)
    assert back.shape == fixed.shape
    np.testing.assert_allclose(_corners(back.affine, back.shape), _corners(fixed.affine, fixed.shape), atol=1e-3)
    mine = nib.as_closest_canonical(nib.load(fused_series / "fused.nii.gz"))
    theirs = nib.as_closest_canonical(back)
    np.testing.assert_allclose(theirs.affine, mine.affine, atol=1e-3)
    r = np.corrcoef(np.asarray(mine.dataobj, np.float64).ravel(), np.asarray(theirs.dataobj, np.float64).ravel())
    assert r[0, 1] > 0.9999


MARKERS = {"PatientName": "Zorblat^Quinnexa", "PatientID": "MRK-7Q3XZ-ID", "PatientBirthDate": "19010203"}


def _marked_series(folder, **extra):
    """The bundled MR series with known marker strings as the patient's identity (and ``extra``)."""
    import zipfile

    folder.mkdir()
    with zipfile.ZipFile(MR) as zf:
        for i, name in enumerate(n for n in zf.namelist() if not n.endswith("/")):
            with zf.open(name) as fh:
                ds = pydicom.dcmread(fh)
            for key, value in {**MARKERS, **extra}.items():
                setattr(ds, key, value)
            ds.save_as(folder / f"{i:04d}.dcm")
    return folder


def test_anonymize_leaves_no_patient_identity(tmp_path, cli):
    marked = _marked_series(tmp_path / "mr")
    res = cli("fuse", marked, PET, "-o", tmp_path / "kept", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    kept = pydicom.dcmread(next((tmp_path / "kept").glob("*.dcm")))
    assert kept.PatientID == MARKERS["PatientID"]  # without --anonymize the identity is the study's
    res = cli("fuse", marked, PET, "-o", tmp_path / "anon", "--method", "mean", "--no-metrics", "--anonymize")
    assert res.exit_code == 0, res.stderr
    outputs = [*(tmp_path / "anon").glob("*.dcm"), tmp_path / "anon.json"]
    for path in outputs:
        raw = path.read_bytes()
        for m in (*MARKERS.values(), "Zorblat", "Quinnexa"):
            assert m.encode() not in raw, (m, path.name)
        assert m not in res.stderr and m not in res.stdout
    d = pydicom.dcmread(next((tmp_path / "anon").glob("*.dcm")))
    assert d.PatientIdentityRemoved == "YES" and d.StudyInstanceUID != kept.StudyInstanceUID
    assert not d.get("PatientBirthDate")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (Debian package dicom3tools)")
def test_dciodvfy_finds_no_errors(fused_series):
    f = min((fused_series / "series").glob("*.dcm"))
    out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_dicom_output_of_2d_slices_is_refused_before_work(tmp_path, cli):
    folder = shared_path("harvard", "mri-ct")
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", tmp_path / "out", "--method", "mean")
    assert res.exit_code == 6 and "needs a place in space, which a PNG slice has not" in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()


def test_colour_results_are_an_rgb_series(tmp_path):
    from medfuse_cli.image import Image
    from medfuse_cli.io import write_image

    t1, pet = read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"), read_image(PET)
    rgb = np.stack([t1.data, pet.data, (t1.data + pet.data) / 2], -1)
    rgb = np.clip(rgb / rgb.max() * 255, 0, 255).astype(np.uint8)
    write_image(Image(rgb, t1.affine), tmp_path / "rgb")
    files = sorted((tmp_path / "rgb").glob("*.dcm"))
    assert len(files) == t1.shape[2]
    d = pydicom.dcmread(files[40])
    assert d.PhotometricInterpretation == "RGB" and d.SamplesPerPixel == 3
    np.testing.assert_array_equal(d.pixel_array, rgb[:, :, int(d.InstanceNumber) - 1].transpose(1, 0, 2))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "rgb")))
    img = reader.Execute()
    assert img.GetSize() == t1.shape and img.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(_sitk_corners(img), _corners(t1.affine, t1.shape), atol=1e-3)
    # medfuse reads its own colour series back (info, convert, eval): the same voxels on the same grid
    back = read_image(tmp_path / "rgb")
    assert back.is_color and back.data.dtype == np.uint8
    canonical = [nib.as_closest_canonical(nib.Nifti1Image(d, np.round(a, 3))) for d, a in ((back.data, back.affine),
                                                                                         (rgb, t1.affine))]
    np.testing.assert_allclose(canonical[0].affine, canonical[1].affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(canonical[0].dataobj), np.asanyarray(canonical[1].dataobj))


def test_a_nonstandard_patient_sex_in_fixed_is_left_out(tmp_path, cli):
    marked = _marked_series(tmp_path / "mr", PatientSex="Q")  # not M, F or O: highdicom refuses it
    res = cli("fuse", marked, PET, "-o", tmp_path / "out", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    d = pydicom.dcmread(next((tmp_path / "out").glob("*.dcm")))
    assert not d.get("PatientSex") and d.PatientID == MARKERS["PatientID"]


def test_overwrite_replaces_only_a_series_medfuse_wrote(tmp_path, cli):
    """``-o FOLDER --overwrite`` replaced whatever folder it named, so ``-o results --overwrite`` deleted
    a user's other files there, and the inputs themselves when they lay inside. Now a folder holding
    an input, or any file that is not part of a series medfuse wrote, is refused (exit 6) and kept as
    it is; a series medfuse wrote is still replaced."""
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", PET
    results = tmp_path / "results"
    results.mkdir()
    inputs = [results / t1.name, results / pet.name]
    for src, dst in zip((t1, pet), inputs, strict=True):
        shutil.copy(src, dst)
    res = cli("fuse", *inputs, "-o", results, "--overwrite", "--method", "mean", "--no-metrics")
    assert res.exit_code == 6 and "holds the input" in res.stderr
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in inputs)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    for command in (("fuse", t1, pet), ("convert", t1)):
        res = cli(*command, "-o", notes, "--overwrite", *(("--method", "mean", "--no-metrics") if command[0] == "fuse" else ()))
        assert res.exit_code == 6 and "holding other files (notes.txt)" in res.stderr, res.stderr
        assert [p.name for p in notes.iterdir()] == ["notes.txt"]
    series = tmp_path / "series"
    for _ in range(2):
        res = cli("fuse", t1, pet, "-o", series, "--overwrite", "--method", "mean", "--no-metrics")
        assert res.exit_code == 0, res.stderr
    assert len(list(series.glob("IM*.dcm"))) == read_image(t1).shape[2]


def test_nan_and_inf_voxels_do_not_blank_the_series(tmp_path, cli):
    """A volume with NaN voxels (or one inf) written as DICOM keeps its other voxels: the series used
    to be all zeros (the 12-bit scaling took its range from NaN / inf); NaN becomes the lowest value."""
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    values = np.asarray(t1.dataobj).astype(np.float32)
    damaged = values.copy()
    damaged[::7] = np.nan
    damaged[40, 50, 40] = np.inf
    nib.Nifti1Image(damaged, t1.affine).to_filename(tmp_path / "t1.nii.gz")
    res = cli("convert", tmp_path / "t1.nii.gz", "-o", tmp_path / "series")
    assert res.exit_code == 0, res.stderr
    series = read_image(tmp_path / "series")
    to_series = np.linalg.inv(series.affine) @ t1.affine  # the series' slices run the other way along z
    assert np.allclose(np.abs(to_series[:3, :3]), np.eye(3))
    back = np.flip(series.data, [ax for ax in range(3) if to_series[ax, ax] < 0]).astype(np.float64)
    finite = np.isfinite(damaged)
    assert np.corrcoef(back[finite], values[finite])[0, 1] > 0.999
    assert np.all(back[::7] == back.min()) and back[40, 50, 40] == back.max()
    assert "NaN/inf voxels written as the lowest value" in res.stderr
