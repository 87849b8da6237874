"""Bad input of every kind, made on the fly from the bundled real examples: each ends in one line
on stderr, a documented exit code and no output at all."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import EXAMPLES, assert_one_line_error, shared_path

from medfuse_cli.errors import EXIT_CODES

T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
MR_ZIP = EXAMPLES / "dicom" / "mr_t1_xa30.zip"


def _nii() -> bytes:
    return gzip.decompress(T1.read_bytes())


def _patched(raw: bytes, offset: int, fmt: str, *values: float) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


def _dicom_files() -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(MR_ZIP) as zf:
        return [(n, zf.read(n)) for n in sorted(zf.namelist()) if not n.endswith("/")]


def _dicom_series(folder: Path, edit=None, files: list[tuple[str, bytes]] | None = None) -> Path:
    """The example MR series as a folder; ``edit(ds, i)`` changes each dataset before saving."""
    folder.mkdir()
    for i, (name, blob) in enumerate(files or _dicom_files()):
        if edit is None:
            (folder / Path(name).name).write_bytes(blob)
            continue
        ds = pydicom.dcmread(io.BytesIO(blob))
        edit(ds, i)
        ds.save_as(folder / Path(name).name)
    return folder


def _bitflip(raw: bytes, start: int, stop: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = bytearray(raw)
    for pos in rng.integers(start, stop, 24):
        buf[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


# (file name, bytes) -> exit code of `medfuse convert`
NIFTI_CASES = {
    "truncated_header.nii": (lambda: _nii()[:200], 4),
    "truncated_voxels.nii": (lambda: _nii()[: len(_nii()) // 2], 4),
    "truncated.nii.gz": (lambda: T1.read_bytes()[: T1.stat().st_size // 2], 4),
    "wrong_magic.nii": (lambda: _nii()[:344] + b"xyz\0" + _nii()[348:], 4),
    "absurd_dims.nii": (lambda: _patched(_nii(), 40, "<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1), 4),
    "zero_dim.nii": (lambda: _patched(_nii(), 40, "<8h", 3, 91, 0, 91, 1, 1, 1, 1), 4),
    "negative_dim.nii": (lambda: _patched(_nii(), 40, "<8h", 3, 91, -5, 91, 1, 1, 1, 1), 4),
    "bad_datatype.nii": (lambda: _patched(_nii(), 70, "<h", 1234), 4),
    "absurd_vox_offset.nii": (lambda: _patched(_nii(), 108, "<f", 3e18), 4),
    "gzip_of_garbage.nii.gz": (lambda: gzip.compress(os.urandom(5000)), 4),
    "not_gzip.nii.gz": (lambda: b"\x1f\x8b" + os.urandom(3000), 4),
    "empty.nii": (lambda: b"", 4),
}


@pytest.mark.parametrize("name", list(NIFTI_CASES))
def test_damaged_nifti(name, tmp_path, cli):
    make, code = NIFTI_CASES[name]
    src = tmp_path / name
    src.write_bytes(make())
    out = tmp_path / "out" / "o.nii.gz"
    assert_one_line_error(cli("convert", src, "-o", out), code)
    assert_one_line_error(cli("fuse", T1, src, "-o", out), code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", range(6))
def test_bit_flipped_nifti_header_never_crashes(seed, tmp_path, cli):
    src = tmp_path / "flipped.nii"
    src.write_bytes(_bitflip(_nii(), 0, 348, seed))
    out = tmp_path / "o.nii.gz"
    res = cli("convert", src, "-o", out)
    if res.exit_code == 0:  # a flip in an unused field: a valid image
        assert out.is_file()
    else:
        assert_one_line_error(res, res.exit_code)
        assert res.exit_code in EXIT_CODES and res.exit_code != 1 and not out.exists()


def _bad_dicom(kind: str, folder: Path) -> Path:
    files = _dicom_files()
    if kind == "truncated_file":
        name, blob = files[10]
        files[10] = (name, blob[: len(blob) // 3])
        return _dicom_series(folder, files=files)
    if kind == "wrong_magic":
        return _dicom_series(folder, files=[(n, b[:128] + b"XXXX" + b[132:]) for n, b in files[:3]])
    if kind == "bit_flipped_pixels":
        name, blob = files[5]
        files[5] = (name, _bitflip(blob, len(blob) - 4000, len(blob), 1)[:-7])
        return _dicom_series(folder, files=files)
    if kind == "absurd_size":
        def edit(ds, i):
            ds.Rows, ds.Columns = 65535, 65535
        return _dicom_series(folder, edit, files[:4])
    if kind == "zero_rows":
        def edit(ds, i):
            ds.Rows = 0
        return _dicom_series(folder, edit, files[:4])
    if kind == "mixed_series":
        def edit(ds, i):
            if i % 2:
                ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        return _dicom_series(folder, edit, files[:6])
    if kind == "no_geometry":
        def edit(ds, i):
            del ds.ImagePositionPatient
        return _dicom_series(folder, edit, files[:4])
    if kind == "not_a_transfer_syntax":  # found by fuzzing: the error's own handling raised (exit 1)
        def edit(ds, i):
            ds.file_meta.TransferSyntaxUID = "0.2.840.10008.1.2.1"
        return _dicom_series(folder, edit, files[:4])
    if kind in ("two_row_counts", "empty_rows"):  # found by fuzzing: int() of a list or of None (exit 1)
        def edit(ds, i):
            ds["Rows"] = pydicom.DataElement("Rows", "US", [ds.Rows, ds.Rows] if kind == "two_row_counts" else None)
        return _dicom_series(folder, edit, files[:4])
    if kind in ("zero_spacing", "zero_orientation"):  # found by a sweep: exit 5 "affine is singular", exit 2 "4D"
        def edit(ds, i):
            if kind == "zero_spacing":
                ds.PixelSpacing = [0, 0]
            else:
                ds.ImageOrientationPatient = [0] * 6
        return _dicom_series(folder, edit, files[:4])
    if kind == "no_pixels":  # found by a sweep: called "corrupt or undecodable pixel data"
        def edit(ds, i):
            if i == 2:
                del ds.PixelData
        return _dicom_series(folder, edit, files[:4])
    if kind == "many_series":  # found by a sweep: all of them listed in the one-line error
        def edit(ds, i):
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        return _dicom_series(folder, edit, files[:13])
    raise AssertionError(kind)


DICOM_CASES = {"truncated_file": 4, "wrong_magic": 4, "bit_flipped_pixels": 4, "absurd_size": 4, "zero_rows": 4,
               "mixed_series": 2, "no_geometry": 4, "not_a_transfer_syntax": 4,
               "two_row_counts": 4, "empty_rows": 4, "zero_spacing": 4, "zero_orientation": 4, "many_series": 2,
               "no_pixels": 4}
DICOM_SAYS = {"zero_spacing": "PixelSpacing [0.0, 0.0] is not positive",
              "zero_orientation": "ImageOrientationPatient [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] is not two unit vectors",
              "many_series": "holds 13 series; choose one with --series: ",
              "no_pixels": ": an image header without pixel data"}


@pytest.mark.parametrize("kind", list(DICOM_CASES))
def test_damaged_dicom_series(kind, tmp_path, cli):
    src = _bad_dicom(kind, tmp_path / "series")
    out = tmp_path / "out" / "o.nii.gz"
    res = cli("convert", src, "-o", out)
    assert_one_line_error(res, DICOM_CASES[kind])
    assert DICOM_SAYS.get(kind, "") in res.stderr
    if kind == "many_series":  # ten listed, and how many more
        assert res.stderr.count("(1 files)") == 10 and "; and 3 more (`medfuse info` on the input" in res.stderr
    assert not (tmp_path / "out").exists()


def _slices(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two real 2D slices (the T1 and PET templates' axial slice 45) and a smaller one."""
    from PIL import Image as PILImage

    paths = []
    for src, name, size in ((T1, "t1.png", None), (PET, "pet.png", None), (T1, "small_t1.png", (40, 40))):
        data = np.asarray(__import__("nibabel").load(str(src)).dataobj)[:, :, 45].astype(np.float32)
        im = PILImage.fromarray((data / data.max() * 255).astype(np.uint8))
        (im.resize(size) if size else im).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths[0], paths[1], paths[2]


def _nifti_like(tmp_path: Path, name: str, data: np.ndarray, shift_mm: float = 0.0) -> Path:
    import nibabel as nib

    ref = nib.load(str(PET))
    affine = ref.affine.copy()
    affine[:3, 3] += shift_mm
    nib.Nifti1Image(data, affine).to_filename(tmp_path / name)
    return tmp_path / name


def test_unusable_pairs_and_values(tmp_path, cli):
    import nibabel as nib

    pet = np.asarray(nib.load(str(PET)).dataobj).astype(np.float32)
    t1_png, pet_png, small_png = _slices(tmp_path)
    inf = pet.copy()
    inf[10, 10, 10] = np.inf
    cases = [
        ((T1, _nifti_like(tmp_path, "nan_pet.nii.gz", np.full_like(pet, np.nan))), 4),
        ((T1, _nifti_like(tmp_path, "inf_pet.nii.gz", inf)), 4),
        ((T1, _nifti_like(tmp_path, "flat_pet.nii.gz", np.full_like(pet, 7.0))), 4),
        ((T1, _nifti_like(tmp_path, "far_pet.nii.gz", pet, shift_mm=5000.0)), 5),  # no overlap
        ((T1, _nifti_like(tmp_path, "4d_pet.nii.gz", np.stack([pet, pet], axis=3))), 2),  # which frame?
        ((t1_png, T1), 5),  # 2D with 3D
        ((T1, pet_png), 5),
        ((t1_png, small_png), 5),  # 2D of different sizes
        ((T1, PET, "--method", "nonsense"), 4),
    ]
    out = tmp_path / "out" / "fused.nii.gz"
    for args, code in cases:
        assert_one_line_error(cli("fuse", *args, "-o", out), code)
        assert not (tmp_path / "out").exists(), args
    assert cli("fuse", t1_png, pet_png, "-o", tmp_path / "ok.png").exit_code == 0  # the positive control
    # a colour PET given first (the inputs swapped): refused, and the message says which goes where
    from PIL import Image as PILImage

    grey = np.asarray(PILImage.open(pet_png))
    PILImage.fromarray(np.stack([grey, grey // 2, 255 - grey], -1).astype(np.uint8)).save(tmp_path / "pet_rgb.png")
    res = cli("fuse", tmp_path / "pet_rgb.png", t1_png, "-o", out)
    assert_one_line_error(res, 4)
    assert "give the MRI first (FIXED) and pet_rgb.png second (MOVING)" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("crop, scale", [(4, 1.0), (5, 1.0), (91, 0.01)])
def test_a_fixed_a_few_moving_voxels_wide_registers(crop, scale, tmp_path, cli):
    """A FIXED cropped to a few voxels, or whose voxels are tiny beside MOVING's, registers: the
    registration pyramid used to shrink it to one constant voxel (ITK failed, "unexpected error")."""
    import nibabel as nib

    ref = nib.load(str(T1))
    affine = ref.affine @ np.diag([scale, scale, scale, 1.0])
    affine[:3, 3] = ref.affine[:3, :3] @ [40, 50, 40] + ref.affine[:3, 3]
    data = np.asarray(ref.dataobj)[40:40 + crop, 50:50 + crop, 40:40 + crop]
    nib.Nifti1Image(data, affine).to_filename(tmp_path / "small_t1.nii.gz")
    out = tmp_path / "fused.nii.gz"
    res = cli("fuse", tmp_path / "small_t1.nii.gz", PET, "-o", out, "-m", "mean", "-t", "rigid", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    fused = nib.load(str(out))
    assert fused.shape == data.shape and np.allclose(fused.affine, affine)


def test_unreadable_input_and_read_only_output_without_root(tmp_path, cli, monkeypatch):
    """The permission checks, simulated so that they also run as root (root reads everything)."""
    real_access = os.access
    locked = {str(tmp_path / "locked"), str(T1)}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) in locked else real_access(p, mode, **kw))
    (tmp_path / "locked").mkdir()
    assert_one_line_error(cli("convert", T1, "-o", tmp_path / "o.nii.gz"), 3)
    assert_one_line_error(cli("convert", PET, "-o", tmp_path / "locked" / "o.nii.gz"), 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes everything")
def test_unreadable_input_file(tmp_path, cli):
    src = tmp_path / "t1.nii.gz"
    src.write_bytes(T1.read_bytes())
    src.chmod(0)
    assert_one_line_error(cli("convert", src, "-o", tmp_path / "o.nii.gz"), 3)


def test_output_inside_an_input_folder_is_refused(tmp_path, cli):
    series = _dicom_series(tmp_path / "series")
    before = sorted(p.name for p in series.iterdir())
    for out in (series / "fused.nii.gz", series / "sub" / "fused", series):
        assert_one_line_error(cli("convert", series, "-o", out, "--overwrite"), 6)
        assert_one_line_error(cli("fuse", series, PET, "-o", out, "--overwrite"), 6)
    assert sorted(p.name for p in series.iterdir()) == before
    pairs = tmp_path / "pairs"
    (pairs / "case1").mkdir(parents=True)
    for src in (T1, PET):
        (pairs / "case1" / src.name).write_bytes(src.read_bytes())
    assert_one_line_error(cli("batch", pairs, "-o", pairs / "fused", "--engine", "sequential"), 6)
    assert sorted(p.name for p in pairs.iterdir()) == ["case1"]


def test_nan_outside_a_mask_is_background(tmp_path, cli):
    """SPM and others write NaN outside a mask: those voxels fuse as the lowest finite value, and
    the report says so."""
    import json

    import nibabel as nib

    pet = np.asarray(nib.load(str(PET)).dataobj).astype(np.float32)
    masked = np.where(pet > 0.2 * pet.max(), pet, np.nan).astype(np.float32)
    filled = np.where(np.isnan(masked), np.nanmin(masked), masked).astype(np.float32)
    nan_pet = _nifti_like(tmp_path, "nan_pet.nii.gz", masked)
    filled_pet = _nifti_like(tmp_path, "filled_pet.nii.gz", filled)
    for src, out in ((nan_pet, "a.nii.gz"), (filled_pet, "b.nii.gz")):
        assert cli("fuse", T1, src, "-o", tmp_path / out, "--method", "mean").exit_code == 0
    a = np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj)
    assert np.isfinite(a).all()
    assert np.array_equal(a, np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj))
    report = json.loads((tmp_path / "a.json").read_text())
    assert any(f"{int(np.isnan(masked).sum())} NaN voxels" in w for w in report["warnings"]), report["warnings"]
    # eval takes the NaN source as fuse did: the same scores as the report's
    res = cli("eval", "--fixed", T1, "--moving", nan_pet, tmp_path / "a.nii.gz", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.stderr
    scored = json.loads((tmp_path / "e.json").read_text())
    row = scored["cases"][0]
    assert row["SSIM"] == pytest.approx(report["metrics"]["values"]["SSIM"], abs=1e-9)


def test_an_input_file_is_never_the_output_even_with_overwrite(tmp_path, cli):
    fixed, moving = tmp_path / "t1.nii.gz", tmp_path / "pet.nii.gz"
    fixed.write_bytes(T1.read_bytes())
    moving.write_bytes(PET.read_bytes())
    link = tmp_path / "link.nii.gz"
    link.symlink_to(moving)
    for out in (moving, fixed, link, tmp_path / "sub" / ".." / "pet.nii.gz"):
        assert_one_line_error(cli("fuse", fixed, moving, "-o", out, "--overwrite", "--method", "mean"), 6)
        assert_one_line_error(cli("register", fixed, moving, "-o", out, "--overwrite"), 6)
    assert_one_line_error(cli("fuse", fixed, moving, "-o", tmp_path / "f.nii.gz", "--report", moving,
                              "--overwrite", "--method", "mean"), 6)
    assert_one_line_error(cli("convert", moving, "-o", moving, "--overwrite"), 6)
    assert_one_line_error(cli("eval", "--fixed", fixed, "--moving", moving, fixed, "--csv", moving,
                              "--overwrite"), 6)
    assert fixed.read_bytes() == T1.read_bytes() and moving.read_bytes() == PET.read_bytes()


@pytest.mark.parametrize("output", ["../escaped.nii.gz", "sub/../../escaped.nii.gz", "/tmp/absolute.nii.gz"])
def test_manifest_outputs_must_stay_in_the_output_folder(output, tmp_path, cli):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,fixed,moving,output\nc1,{T1},{PET},{output}\n")
    out = tmp_path / "out"
    assert_one_line_error(cli("batch", manifest, "-o", out, "--engine", "sequential"), 4)
    assert not out.exists() and not (tmp_path / "escaped.nii.gz").exists()
    assert not Path("/tmp/absolute.nii.gz").exists()


def test_a_manifest_case_may_not_overwrite_another_cases_input(tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "t1.nii.gz"
    kept.write_bytes(T1.read_bytes())
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,fixed,moving,output\nc1,{kept},{PET},f1.nii.gz\nc2,{T1},{PET},t1.nii.gz\n")
    res = cli("batch", manifest, "-o", out, "--engine", "sequential", "--method", "mean")
    assert_one_line_error(res, 6)
    assert "an input of case c1" in res.stderr
    assert kept.read_bytes() == T1.read_bytes() and sorted(p.name for p in out.iterdir()) == ["t1.nii.gz"]


def _medfuse(*args: object) -> subprocess.CompletedProcess:
    """Run the real ``medfuse`` process (file names as bytes reach it exactly as on disk)."""
    argv = [sys.executable, "-m", "medfuse_cli", *(os.fsencode(a) if isinstance(a, (str, Path)) else a for a in args)]
    return subprocess.run(argv, capture_output=True, timeout=600, check=False)


def test_non_utf8_file_names(tmp_path):
    raw = os.fsdecode(b"caf\xe9_\xff")  # Latin-1 bytes: not UTF-8
    case = tmp_path / "in" / f"{raw}case"
    case.mkdir(parents=True)
    src = case / f"{raw}_t1.nii.gz"
    src.write_bytes(T1.read_bytes())
    (case / f"{raw}_pet.nii.gz").write_bytes(PET.read_bytes())
    out = tmp_path / f"{raw}_fused.nii.gz"
    res = _medfuse("fuse", src, PET, "-o", out)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and (tmp_path / f"{raw}_fused.json").is_file()
    table = tmp_path / f"{raw}_eval.csv"
    res = _medfuse("eval", "--fixed", src, "--moving", PET, out, "--csv", table, "--quiet")
    assert res.returncode == 0, res.stderr
    assert os.fsencode(out.name) in table.read_bytes()  # the name as on disk, not mangled
    res = _medfuse("convert", tmp_path / f"{raw}_missing.nii.gz", "-o", tmp_path / "x.nii.gz")
    assert res.returncode == 3 and res.stderr.count(b"\n") == 1 and res.stderr.startswith(b"medfuse: error: ")
    res = _medfuse("batch", tmp_path / "in", "-o", tmp_path / "batch", "--engine", "sequential", "--quiet")
    assert res.returncode == 0, res.stderr
    summary = (tmp_path / "batch" / "summary.csv").read_bytes()
    assert os.fsencode(src) in summary and b",done," in summary
    assert (tmp_path / "batch" / f"{raw}case.nii.gz").is_file()


def test_very_long_file_names(tmp_path, cli):
    long_in = tmp_path / ("t1_" + "x" * 240 + ".nii.gz")
    long_in.write_bytes(T1.read_bytes())
    assert cli("convert", long_in, "-o", tmp_path / "fine.nii.gz").exit_code == 0
    before = set(tmp_path.iterdir())
    for name in ("f" * 250 + ".nii.gz", "d" * 250):  # a file, a DICOM series folder
        assert_one_line_error(cli("fuse", T1, PET, "-o", tmp_path / name), 6)
    assert set(tmp_path.iterdir()) == before


def test_manifest_landmarks_come_in_pairs(tmp_path, cli):
    """A manifest case with FIXED's landmarks but not MOVING's is refused before any work."""
    (tmp_path / "points.csv").write_text("r,a,s\n0,0,0\n")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,fixed,moving,fixed_landmarks,moving_landmarks\nc1,{T1},{PET},points.csv,\n")
    out = tmp_path / "out"
    res = cli("batch", manifest, "-o", out, "--engine", "sequential")
    assert_one_line_error(res, 4)
    assert "give both fixed_landmarks and moving_landmarks" in res.stderr and not out.exists()


def test_a_folder_or_zip_of_other_images_names_them(tmp_path, cli):
    """A folder or zip given as a DICOM series that holds a NIfTI instead: exit 4, and the line says
    which file to give; an empty folder just says no DICOM was found."""
    folder = tmp_path / "nifti_folder"
    folder.mkdir()
    (folder / PET.name).write_bytes(PET.read_bytes())
    with zipfile.ZipFile(tmp_path / "nifti.zip", "w") as zf:
        zf.write(PET, PET.name)
    (tmp_path / "empty").mkdir()
    res = cli("info", folder)
    assert_one_line_error(res, 4)
    assert str(folder / PET.name) in res.stderr
    res = cli("fuse", T1, tmp_path / "nifti.zip", "-o", tmp_path / "f.nii.gz")
    assert_one_line_error(res, 4)
    assert "unzip it" in res.stderr and PET.name in res.stderr
    res = cli("info", tmp_path / "empty")
    assert_one_line_error(res, 4)
    assert "other image" not in res.stderr


@pytest.mark.parametrize("size, code", [(3, 5), (1, 4), (4, 0)])
def test_a_moving_slice_a_few_pixels_wide(size, code, tmp_path, cli):
    """A MOVING slice 2 or 3 pixels wide beside a 256-pixel FIXED (same aspect, so taken to show the
    same field of view) ended in ITK's internal error or, at 2 pixels, a registration that never
    returned; a one-pixel colour slice (constant, yet its channels differ) reached ITK too. Now: a
    slice under 4 pixels is not registered (one line, exit 5), a constant colour slice is refused
    as constant (exit 4), and 4 pixels register."""
    from PIL import Image as PILImage

    folder = shared_path("harvard", "mri-pet")
    PILImage.open(folder / "25015_pet.png").resize((size, size)).save(tmp_path / "small_pet.png")
    out = tmp_path / "out" / "fused.png"
    res = cli("fuse", folder / "25015_mri.png", tmp_path / "small_pet.png", "-o", out, "-m", "mean", "-t", "rigid", "-q")
    if code:
        assert_one_line_error(res, code)
        assert not (tmp_path / "out").exists()
        assert ("voxels thin; registering a slice needs at least 4" if size > 1 else "is constant (every voxel is colour") in res.stderr
    else:
        assert res.exit_code == 0, res.stderr
        assert PILImage.open(out).size == (256, 256)
