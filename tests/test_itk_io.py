"""NRRD and MetaImage in and out (SimpleITK): the same voxels and world geometry as NIfTI and DICOM."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import EXAMPLES, assert_one_line_error

from medfuse_cli import read_image, write_image

T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
MR_ZIP = EXAMPLES / "dicom" / "mr_t1_xa30.zip"


def _corners_lps(img) -> np.ndarray:
    n = img.GetSize()
    return np.array([img.TransformIndexToPhysicalPoint([i, j, k]) for i in (0, n[0] - 1) for j in (0, n[1] - 1)
                     for k in (0, n[2] - 1)])


def _corners_of(image) -> np.ndarray:
    n = image.shape
    idx = np.array([[i, j, k, 1.0] for i in (0, n[0] - 1) for j in (0, n[1] - 1) for k in (0, n[2] - 1)])
    return (image.affine @ idx.T).T[:, :3] * [-1, -1, 1]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".MHA", ".NRRD", ".MHD"])
def test_a_file_itk_converted_reads_as_the_nifti_does(tmp_path, suffix):
    """SimpleITK's own conversion of the NIfTI (its reader, not ours) reads back voxel for voxel,
    also named in upper case (X.MHA was an "unreadable header": ITK chose its reader by lower-case suffixes)."""
    path = tmp_path / f"t1{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(path.with_suffix(suffix.lower())))
    path.with_suffix(suffix.lower()).rename(path)
    a, b = read_image(T1), read_image(path)
    assert b.provenance.format in ("nrrd", "metaimage") and b.modality.value == "MR"
    np.testing.assert_allclose(b.data, a.data, rtol=1e-6)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    assert b.orientation == a.orientation == "LAS"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_written_files_keep_an_oblique_dicom_geometry(tmp_path, suffix):
    mr = read_image(MR_ZIP)
    out = tmp_path / f"mr{suffix}"
    write_image(mr, out)
    itk = sitk.ReadImage(str(out))
    assert itk.GetSize() == mr.shape
    np.testing.assert_allclose(_corners_lps(itk), _corners_of(mr), atol=1e-3)
    back = read_image(out)
    np.testing.assert_array_equal(back.data, mr.data.astype(np.float32))
    np.testing.assert_allclose(back.affine, mr.affine, atol=1e-5)


def test_a_colour_fusion_written_as_nrrd(tmp_path, cli):
    for name in ("f.nrrd", "g.nii.gz"):
        res = cli("fuse", T1, PET, "-o", tmp_path / name, "--method", "mean", "--colormap", "hot", "--no-metrics")
        assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.nrrd", "g.json", "g.nii.gz"]  # OUT.json
    itk = sitk.ReadImage(str(tmp_path / "f.nrrd"))
    assert itk.GetNumberOfComponentsPerPixel() == 3 and itk.GetPixelID() == sitk.sitkVectorUInt8
    nrrd, nifti = read_image(tmp_path / "f.nrrd"), read_image(tmp_path / "g.nii.gz")
    assert nrrd.is_color and nifti.is_color
    np.testing.assert_array_equal(nrrd.data, nifti.data)
    np.testing.assert_allclose(nrrd.affine, read_image(T1).affine, atol=1e-5)


def test_a_truncated_nrrd_is_one_line(tmp_path, cli):
    good = tmp_path / "t1.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(good), useCompression=False)
    raw = good.read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(raw[: len(raw) // 2])
    res = cli("info", tmp_path / "cut.nrrd")
    assert_one_line_error(res, 4)


def test_batch_pairs_nrrd_and_metaimage_files(tmp_path, cli):
    """A case folder of an NRRD MRI and a MetaImage PET, and benchmark-style NRRD pairs, are cases."""
    for layout in ("folders", "pairs"):
        root = tmp_path / layout
        (root / "case1").mkdir(parents=True)
        fixed, moving = ((root / "case1" / "t1.nrrd", root / "case1" / "pet.mha") if layout == "folders"
                         else (root / "a_mri.nrrd", root / "a_pet.nrrd"))
        sitk.WriteImage(sitk.ReadImage(str(T1)), str(fixed))
        sitk.WriteImage(sitk.ReadImage(str(PET)), str(moving))
        res = cli("batch", root, "-o", tmp_path / f"out_{layout}", "--engine", "sequential", "--method", "mean", "-q")
        assert res.exit_code == 0, res.stderr
        out = tmp_path / f"out_{layout}" / ("case1.nii.gz" if layout == "folders" else "a.nii.gz")
        np.testing.assert_allclose(read_image(out).affine, read_image(T1).affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_a_detached_header_reads_only_its_own_data_file(tmp_path, cli, suffix):
    """A header with its voxels in a file beside it reads; one that points anywhere else is refused
    (an untrusted header must not make medfuse read another file into its output)."""
    header = tmp_path / "case" / f"t1{suffix}"
    header.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(header))
    np.testing.assert_allclose(read_image(header).data, read_image(T1).data, rtol=1e-6)
    key = "data file:" if suffix == ".nhdr" else "ElementDataFile ="
    lines = header.read_text(encoding="latin-1").splitlines()
    data_name = next(line.split(key[-1], 1)[1].strip() for line in lines if line.startswith(key))
    secret = tmp_path / "secret.raw"
    secret.write_bytes((tmp_path / "case" / data_name).read_bytes())
    for elsewhere in (str(secret), f"../{secret.name}"):
        evil = header.with_name(f"evil{suffix}")
        evil.write_text("\n".join(f"{key} {elsewhere}" if line.startswith(key) else line for line in lines) + "\n",
                        encoding="latin-1")
        res = cli("info", evil)
        assert_one_line_error(res, 4)
        assert "beside the header" in res.stderr


def test_a_header_that_crashes_itk_is_one_line(tmp_path, cli):
    """Found by fuzzing: an NRRD whose header stops after `space:` (no sizes) kills ITK's reader with a
    segmentation fault; medfuse reads in a child process, so it is one line and exit 4."""
    full = tmp_path / "full.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(full), useCompression=False)
    raw = full.read_bytes()
    end = raw.index(b"space: left-posterior-superior\n") + len(b"space: left-posterior-superior\n")
    (tmp_path / "cut.nrrd").write_bytes(raw[:end] + raw[-3000:])
    res = cli("info", tmp_path / "cut.nrrd")
    assert_one_line_error(res, 4)
    assert "damaged NRRD/MetaImage" in res.stderr


def test_a_reader_that_exits_with_status_3_is_not_taken_for_a_refusal(tmp_path, cli, monkeypatch):
    """ITK's MetaIO can exit the child itself; a status of 3 without medfuse's refusal line must
    still be one line and exit 4 (the child here is made to exit so, as a mangled header did)."""
    from medfuse_cli.io import itk

    path = tmp_path / "t1.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(path))
    monkeypatch.setattr(itk, "_CHILD", "import sys; print('ITK ERROR: garbage'); sys.stderr.write('4 x\\n'); sys.exit(3)")
    res = cli("info", path)
    assert_one_line_error(res, 4)
    assert "damaged NRRD/MetaImage" in res.stderr


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_damaged_compressed_metaimage_data_is_refused(tmp_path, cli, suffix):
    """ITK's MetaImage reader inflates a damaged compressed payload without a word: 64 bytes changed in
    the middle of a real T1 read as values up to 3e38 and NaN (``info`` exit 0, ``convert`` wrote them);
    a header claiming compression over raw voxels read as zeros. Both are refused now; the intact file
    reads as before."""
    path = tmp_path / f"t1{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(path), useCompression=True)
    np.testing.assert_allclose(read_image(path).data, read_image(T1).data, rtol=1e-6)
    data = path if suffix == ".mha" else path.with_suffix(".zraw")
    payload = bytearray(data.read_bytes())
    middle = len(payload) // 2
    payload[middle:middle + 64] = bytes(b ^ 0x5A for b in payload[middle:middle + 64])
    data.write_bytes(payload)
    out = tmp_path / "out.nii.gz"
    assert_one_line_error(cli("convert", path, "-o", out), 4)
    assert not out.exists()
    raw = tmp_path / "raw.mhd"  # raw voxels under a header that says they are compressed
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(raw), useCompression=False)
    raw.write_text(raw.read_text().replace("CompressedData = False", "CompressedData = True"))
    res = cli("info", raw)
    assert_one_line_error(res, 4)
    assert "corrupt compressed data" in res.stderr


def test_vanishing_voxels_are_refused_with_the_file_named(tmp_path, cli):
    """1e-9 mm voxels (a header in the wrong unit, or damaged) were refused by the Image check, whose
    message ("affine is singular") did not say which input."""
    path = tmp_path / "t1.nhdr"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(path), useCompression=False)
    header = path.read_text()
    assert "space directions: (2,0,0) (0,-2,0) (0,0,2)" in header
    path.write_text(header.replace("(2,0,0) (0,-2,0) (0,0,2)", "(2e-9,0,0) (0,-2e-9,0) (0,0,2e-9)"))
    res = cli("info", path)
    assert_one_line_error(res, 5)
    assert "t1.nhdr: invalid spacing" in res.stderr
    tiny = tmp_path / "t1.nii.gz"  # the same in a NIfTI header
    t1 = nib.load(T1)
    nib.save(nib.Nifti1Image(np.asanyarray(t1.dataobj), t1.affine @ np.diag([1e-9, 1e-9, 1e-9, 1])), tiny)
    res = cli("info", tiny)
    assert_one_line_error(res, 5)
    assert "t1.nii.gz: invalid spacing" in res.stderr


def test_nrrd_space_units_are_read_in_mm(tmp_path, caplog):
    """ITK ignores an NRRD header's ``space units``: the SPM T1 described in centimetres read with
    0.2 mm voxels, 10 times too small. Now in mm, as NIfTI's units are; an unknown unit is mm, warned."""
    mm = tmp_path / "t1_mm.nhdr"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(mm), useCompression=False)
    header = mm.read_text()
    cm = header.replace("space directions: (2,0,0) (0,-2,0) (0,0,2)", "space directions: (0.2,0,0) (0,-0.2,0) (0,0,0.2)")
    cm = cm.replace("space origin: (-90,126,-72)", 'space origin: (-9,12.6,-7.2)\nspace units: "cm" "cm" "cm"')
    assert cm.count("0.2,") == 2 and "space units" in cm
    (tmp_path / "t1_cm.nhdr").write_text(cm)
    a, b = read_image(mm), read_image(tmp_path / "t1_cm.nhdr")
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-9)
    np.testing.assert_array_equal(b.data, a.data)
    (tmp_path / "t1_odd.nhdr").write_text(header.replace("space origin:", 'space units: "furlong" "mm" "mm"\nspace origin:'))
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(read_image(tmp_path / "t1_odd.nhdr").affine, a.affine)
    assert "space unit 'furlong' unknown; taken as mm" in caplog.text


def test_metaimage_distance_units_are_read_in_mm(tmp_path, caplog):
    """ITK ignores a MetaImage's ``DistanceUnits`` as it does NRRD's space units: the SPM T1
    described in cm read 10 times too small. Now in mm; MetaIO's '?' (unknown) is mm, unwarned;
    an unknown unit is mm, warned once."""
    mhd = tmp_path / "t1.mhd"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(mhd), useCompression=False)
    header = mhd.read_text()
    cm = header.replace("Offset = -90 126 -72", "Offset = -9 12.6 -7.2").replace(
        "ElementSpacing = 2 2 2", "DistanceUnits = cm\nElementSpacing = 0.2 0.2 0.2")
    assert cm.count("0.2") == 3
    (tmp_path / "cm.mhd").write_text(cm)
    a, b = read_image(mhd), read_image(tmp_path / "cm.mhd")
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-9)
    for unit, warned in (("?", False), ("mm", False), ("furlong", True)):
        (tmp_path / "u.mhd").write_text(header.replace("ElementSpacing", f"DistanceUnits = {unit}\nElementSpacing"))
        caplog.clear()
        with caplog.at_level("WARNING"):
            np.testing.assert_array_equal(read_image(tmp_path / "u.mhd").affine, a.affine)
        assert caplog.text.count("unknown; taken as mm") == warned, (unit, caplog.text)


def test_unknown_spacing_and_origin_are_warned_of(tmp_path, caplog):
    """NRRD allows ``nan`` for a spacing or origin not known; ITK reads it as 1 mm or 0 without a word
    (a MetaImage ``Offset = nan`` too). The values stay ITK's; the warning says they were made up."""
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(tmp_path / "t1.nhdr"), useCompression=False)
    header = (tmp_path / "t1.nhdr").read_text()
    spacings = header.replace("space: left-posterior-superior\n", "").replace(
        "space directions: (2,0,0) (0,-2,0) (0,0,2)", "spacings: 2 2 nan")
    cases = {"spacings.nhdr": (spacings.replace("space origin: (-90,126,-72)\n", ""), "spacings '2 2 nan'; read as 1 mm"),
             "origin.nhdr": (header.replace("(-90,126,-72)", "(nan,nan,nan)"), "space origin '(nan,nan,nan)'; read as 0")}
    for name, (text, said) in cases.items():
        assert text != header
        (tmp_path / name).write_text(text)
        caplog.clear()
        with caplog.at_level("WARNING"):
            read_image(tmp_path / name)
        assert f"{name}: unknown value in {said}" in caplog.text
    mha = tmp_path / "t1.mha"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(mha), useCompression=False)
    blob = mha.read_bytes()
    offset = re.search(rb"Offset = [^\n]+", blob)[0]
    mha.write_bytes(blob.replace(offset, b"Offset = nan 0 0".ljust(len(offset))))
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_image(mha)
    assert "t1.mha: unknown value in Offset 'nan 0 0'; read as 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_image(tmp_path / "t1.nhdr")
    assert "unknown value" not in caplog.text and "not spatial" not in caplog.text
    # an axis said not to be spatial ("none"): slices 1 mm apart, as ITK reads it, with a warning
    (tmp_path / "flat.nhdr").write_text(header.replace("(0,0,2)", "none"))
    with caplog.at_level("WARNING"):
        assert read_image(tmp_path / "flat.nhdr").spacing[2] == pytest.approx(1.0)
    assert "an axis that is not spatial, read as slices 1 mm apart" in caplog.text


def test_nrrd_spaces_that_name_no_patient_directions_are_warned_of(tmp_path, caplog):
    """An NRRD whose space names no patient directions (scanner-xyz, 3D-right/left-handed, or a
    volume with no space at all) is read by ITK as LPS without a word, mirrored for a left-handed
    frame; now with a warning. RAS and LAS spaces are converted by ITK and need none."""
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(tmp_path / "t1.nhdr"), useCompression=False)
    header = (tmp_path / "t1.nhdr").read_text()
    lps = read_image(tmp_path / "t1.nhdr")
    named = "space: left-posterior-superior"
    cases = {"scanner-xyz": "space: scanner-xyz", "3d-left-handed": "space: 3D-left-handed",
             "none": "space dimension: 3", "ras": "space: right-anterior-superior", "las": "space: LAS"}
    for name, line in cases.items():
        (tmp_path / f"{name}.nhdr").write_text(header.replace(named, line))
        caplog.clear()
        with caplog.at_level("WARNING"):
            image = read_image(tmp_path / f"{name}.nhdr")
        warned = "names no patient directions: its axes are read as LPS" in caplog.text
        assert warned == (name not in ("ras", "las")), (name, caplog.text)
        assert ("mirrors a left-handed frame" in caplog.text) == (name == "3d-left-handed")
        if warned:  # read as LPS, as ITK and 3D Slicer read it
            np.testing.assert_allclose(image.affine, lps.affine)
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_image(tmp_path / "t1.nhdr")
    assert "patient directions" not in caplog.text


def test_directions_and_voxel_sizes_that_are_not_finite_are_refused(tmp_path, cli):
    """A nan in a MetaImage ElementSpacing or TransformMatrix ended in ITK's bare "(0 0 0)" (exit 4);
    a nan direction in NRRD was read as 1 mm without a word. Now exit 5, naming the field."""
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(tmp_path / "t1.nhdr"), useCompression=False)
    header = (tmp_path / "t1.nhdr").read_text()
    (tmp_path / "d.nhdr").write_text(header.replace("(0,0,2)", "(nan,nan,nan)"))
    mha = tmp_path / "t1.mha"
    sitk.WriteImage(sitk.ReadImage(str(T1)), str(mha), useCompression=False)
    blob = mha.read_bytes()
    matrix = re.search(rb"TransformMatrix = [^\n]+", blob)[0]
    (tmp_path / "m.mha").write_bytes(blob.replace(matrix, b"TransformMatrix = 1 0 0 0 1 0 0 0 nan".ljust(len(matrix))))
    for name, said in (("d.nhdr", "space directions '(2,0,0) (0,-2,0) (nan,nan,nan)'"),
                       ("m.mha", "TransformMatrix '1 0 0 0 1 0 0 0 nan'")):
        res = cli("info", tmp_path / name)
        assert_one_line_error(res, 5)
        assert f"{name}: {said} is not finite: no usable grid" in res.stderr
