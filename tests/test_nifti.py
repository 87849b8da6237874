"""NIfTI reading and writing on the real volumes in ../shared/data/volumes."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import EXAMPLES, SHARED, assert_one_line_error, shared_path

from medfuse_cli import read_image, write_image
from medfuse_cli.errors import ChoiceRequiredError, InvalidInputError
from medfuse_cli.io import FrameChoice

VOLUMES = sorted((SHARED / "volumes").glob("*/*.nii.gz")) if SHARED.exists() else []


def _header_fields(path):
    h = nib.load(path).header
    return (int(h["sform_code"]), int(h["qform_code"]))


@pytest.mark.parametrize("path", VOLUMES or [pytest.param(None, marks=pytest.mark.skip("needs ../shared"))],
                         ids=lambda p: p.name if p else "none")
def test_round_trip_is_identical(path, tmp_path):
    image = read_image(path)
    out = tmp_path / "copy.nii.gz"
    write_image(image, out)
    back = read_image(out)
    np.testing.assert_array_equal(back.data, image.data)
    assert back.data.dtype == image.data.dtype
    np.testing.assert_array_equal(back.affine, image.affine)
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)
    assert _header_fields(out) == _header_fields(path)
    np.testing.assert_allclose(image.data, nib.load(path).get_fdata(), rtol=1e-6, atol=1e-6)


def test_scl_slope_and_x_flip_are_honoured():
    path = shared_path("volumes", "spm12_mni_2mm", "OldNorm_T1.nii.gz")
    raw = nib.load(path)
    slope = float(raw.dataobj.slope)
    assert slope != 1.0
    image = read_image(path)
    np.testing.assert_allclose(image.data, np.asarray(raw.dataobj.get_unscaled()) * slope, rtol=1e-6)
    assert image.orientation == "LAS" and image.affine[0, 0] < 0


def test_qform_only_volume_uses_qform():
    path = shared_path("volumes", "ibsi_sts002_ct_mr_pet", "PET_image.nii.gz")
    h = nib.load(path).header
    assert int(h["sform_code"]) == 0
    np.testing.assert_allclose(read_image(path).affine, h.get_qform(), atol=1e-6)


def test_big_endian_reads_the_same_values(tmp_path):
    src = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    img = nib.load(src)
    data = np.asarray(img.dataobj.get_unscaled())
    big = nib.Nifti1Image(data.astype(">u1"), img.affine, header=img.header.as_byteswapped(">"))
    big.header.set_slope_inter(img.dataobj.slope, img.dataobj.inter)
    path = tmp_path / "big.nii"
    big.to_filename(path)
    assert nib.load(path).header.endianness == ">"
    a, b = read_image(src), read_image(path)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.affine, b.affine)
    out = tmp_path / "back.nii"
    write_image(b, out)
    np.testing.assert_array_equal(read_image(out).data, a.data)


def _four_d(tmp_path):
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    pet = nib.load(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz")
    data = np.stack([t1.get_fdata(dtype=np.float32), pet.get_fdata(dtype=np.float32)], axis=3)
    path = tmp_path / "two_frames.nii.gz"
    nib.Nifti1Image(data, t1.affine).to_filename(path)
    return path, data


def test_4d_needs_a_frame_choice(tmp_path, cli):
    path, data = _four_d(tmp_path)
    with pytest.raises(ChoiceRequiredError, match="--frame"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, frames=FrameChoice(frame=1)).data, data[..., 1])
    np.testing.assert_allclose(read_image(path, frames=FrameChoice(mean=True)).data, data.mean(axis=3), rtol=1e-6)
    out = tmp_path / "x.nii.gz"
    res = cli("convert", path, "-o", out)
    assert res.exit_code == 2 and "--frame" in res.stderr and not out.exists()
    assert cli("convert", path, "-o", out, "--frame", "1").exit_code == 0
    assert cli("convert", path, "-o", tmp_path / "y.nii.gz", "--frame", "7").exit_code == 5
    # info describes a 4D input (before: refused it) by the mean of its frames, or the frame asked for
    res = cli("info", path, "--json")
    assert res.exit_code == 0, res.stderr
    (item,) = json.loads(res.stdout)
    n = data.shape[3]
    assert item["notes"] == [f"4D, {n} frames: the mean of all"] and item["shape"] == list(data.shape[:3])
    assert item["mean"] == pytest.approx(float(data.mean()), rel=1e-5)
    (item,) = json.loads(cli("info", path, "--json", "--frame", "1").stdout)
    assert item["notes"] == [f"4D, {n} frames: frame 1 (0-based)"]
    assert item["max"] == pytest.approx(float(data[..., 1].max()), rel=1e-6)


def test_truncated_gzip_is_refused(tmp_path, cli):
    whole = (EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidInputError):
        read_image(bad)
    out = tmp_path / "o.nii.gz"
    res = cli("convert", bad, "-o", out)
    assert res.exit_code == 4 and not out.exists() and "Traceback" not in res.stderr
    assert not list(tmp_path.glob(".*partial"))


def test_damaged_gzip_is_refused(tmp_path, cli):
    """nibabel reads a .nii.gz only up to its voxels' end, so gzip's checksum, after them, was never
    checked: 64 bytes damaged in the middle of the SPM T1 read without a word, 73% of its voxels wrong.
    A pair's damaged .img.gz is refused too (nibabel reads that one to its end); two concatenated gzip
    members (as ``cat a.gz b.gz`` makes) read as one, as gzip reads them."""
    whole = bytearray((EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").read_bytes())
    middle = len(whole) // 2
    whole[middle:middle + 64] = bytes(b ^ 0x5A for b in whole[middle:middle + 64])
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(whole)
    out = tmp_path / "o.nii.gz"
    res = cli("convert", bad, "-o", out)
    assert_one_line_error(res, 4)
    assert "bad.nii.gz: corrupt compressed data" in res.stderr and not out.exists()
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    expected = read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").data
    pair = tmp_path / "pair.img.gz"
    nib.save(nib.Nifti1Pair(np.asanyarray(t1.dataobj), t1.affine, t1.header), pair)
    np.testing.assert_array_equal(read_image(tmp_path / "pair.hdr.gz").data, expected)
    raw = bytearray(pair.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0x5A for b in raw[len(raw) // 2:len(raw) // 2 + 64])
    pair.write_bytes(raw)
    with pytest.raises(InvalidInputError, match=r"pair\.(img|hdr)\.gz: .*corrupt"):
        read_image(tmp_path / "pair.hdr.gz")
    plain = gzip.decompress((EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").read_bytes())
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:]))
    np.testing.assert_array_equal(read_image(members).data, expected)


def test_plain_nii_and_gz_extension_decide_compression(tmp_path):
    image = read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    write_image(image, tmp_path / "a.nii")
    write_image(image, tmp_path / "a.nii.gz")
    write_image(image, tmp_path / "B.NII.GZ")  # any case: an upper-case .GZ was written uncompressed
    assert (tmp_path / "a.nii").read_bytes()[344:348] == b"n+1\0"
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes())[344:348] == b"n+1\0"
    assert gzip.decompress((tmp_path / "B.NII.GZ").read_bytes())[344:348] == b"n+1\0"
    assert nib.load(tmp_path / "B.NII.GZ").shape == image.shape


def test_a_nifti_is_read_by_its_content_whatever_its_name_says_of_gzip(tmp_path, cli):
    """A plain NIfTI named .nii.gz (a file inflated without being renamed), a gzip one named .nii,
    NIfTI-1 and NIfTI-2, and NIfTIs of other names, read as FSL and ITK read them; nibabel goes by the
    name ("is not a gzip file", "cannot work out file type") and all were refused. The damaged-gzip
    check follows the content too."""
    source = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
    expected = read_image(source)
    t1 = nib.load(source)
    nifti2 = nib.Nifti2Image(np.asanyarray(t1.dataobj), t1.affine)
    nifti2.header.set_qform(t1.affine, code=1)
    nifti2.header.set_sform(t1.affine, code=2)
    blobs = {"plain.nii.gz": gzip.decompress(source.read_bytes()), "packed.nii": source.read_bytes(),
             "two.nii.gz": nifti2.to_bytes(), "two.nii": gzip.compress(nifti2.to_bytes()),
             # names that say nothing: the reader takes them for NIfTI by their content, nibabel refused them
             "t1_scan": source.read_bytes(), "t1.bin": gzip.decompress(source.read_bytes())}
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
        image = read_image(tmp_path / name)
        np.testing.assert_array_equal(image.data, expected.data, err_msg=name)
        np.testing.assert_array_equal(image.affine, expected.affine, err_msg=name)
    res = cli("fuse", tmp_path / "plain.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz", "-o", tmp_path / "f.nii",
              "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert np.array_equal(nib.load(tmp_path / "f.nii").affine, t1.affine)
    damaged = bytearray(source.read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 64] = bytes(64)
    (tmp_path / "damaged.nii").write_bytes(damaged)
    with pytest.raises(InvalidInputError, match="damaged.nii: corrupt compressed data"):
        read_image(tmp_path / "damaged.nii")
    (tmp_path / "neither.nii.gz").write_bytes(b"\x00" * 400)
    with pytest.raises(InvalidInputError, match="neither.nii.gz: not a readable NIfTI"):
        read_image(tmp_path / "neither.nii.gz")


def test_a_header_without_position_is_read_with_a_warning(tmp_path, caplog):
    """sform and qform codes 0 (ANALYZE-style): the voxels get nibabel's default grid and the user is
    told that only registration can place the volume; a normal header says nothing."""
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    bare = nib.Nifti1Image(np.asarray(t1.dataobj, np.float32), None)
    bare.header.set_zooms((2.0, 2.0, 2.0))
    bare.set_sform(None, code=0)
    bare.set_qform(None, code=0)
    nib.save(bare, tmp_path / "bare.nii.gz")
    with caplog.at_level("WARNING"):
        read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
        assert not caplog.records
        image = read_image(tmp_path / "bare.nii.gz")
    assert image.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert [r.getMessage() for r in caplog.records if "no position or orientation" in r.getMessage()]


def test_an_sform_and_qform_that_disagree_are_warned_of(tmp_path, caplog):
    """The SPM T1 with its qform turned by 5 degrees (sform kept): medfuse follows the sform, says the
    two forms place the image up to tens of mm apart, and writes both back unchanged; the same file
    with agreeing forms says nothing."""
    from medfuse_cli.io.nifti import FORMS_APART_MM

    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    img = nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine)
    img.set_sform(t1.affine, code=2)
    img.set_qform(t1.affine, code=1)
    nib.save(img, tmp_path / "agree.nii.gz")
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(np.radians(5)), -np.sin(np.radians(5))], [np.sin(np.radians(5)), np.cos(np.radians(5))]]
    img.set_qform(turn @ t1.affine, code=1)
    nib.save(img, tmp_path / "differ.nii.gz")
    with caplog.at_level("WARNING"):
        agree = read_image(tmp_path / "agree.nii.gz")
        assert not caplog.records
        differ = read_image(tmp_path / "differ.nii.gz")
    messages = [r.getMessage() for r in caplog.records if "sform and qform place" in r.getMessage()]
    assert len(messages) == 1 and float(messages[0].split("up to ")[1].split(" mm")[0]) > 10 * FORMS_APART_MM
    np.testing.assert_array_equal(differ.affine, agree.affine)  # the sform
    write_image(differ, tmp_path / "out.nii.gz")
    back = nib.load(tmp_path / "out.nii.gz").header
    np.testing.assert_allclose(back.get_qform(), turn @ t1.affine, atol=1e-4)
    np.testing.assert_allclose(back.get_sform(), t1.affine, atol=1e-4)


def test_a_qform_that_is_no_rotation_is_warned_of(tmp_path, caplog):
    """Found by fuzzing: a valid sform beside a qform whose quaternion is longer than 1 made the
    sform/qform comparison raise (exit 1, internal error); now the sform is followed with a warning."""
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    header = t1.header.copy()
    header["qform_code"], header["quatern_c"] = 1, 1.004
    nib.Nifti1Image(np.asarray(t1.dataobj), None, header).to_filename(tmp_path / "badq.nii.gz")
    with caplog.at_level("WARNING"):
        image = read_image(tmp_path / "badq.nii.gz")
    assert any("qform is not a rotation" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(image.affine, t1.affine, atol=1e-6)

def test_a_header_in_metres_is_read_in_mm_and_written_back_in_metres(tmp_path, cli):
    """The SPM T1 saved with its geometry in metres (xyzt_units): medfuse used the numbers as mm,
    1000 times too small, where SimpleITK scales them; now it reads it in mm, fuses it with the PET
    (in mm) as the mm file, and writes FIXED's header back as it was, in metres."""
    import SimpleITK as sitk

    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    metres = t1.affine.copy()
    metres[:3] /= 1000
    img = nib.Nifti1Image(np.asarray(t1.dataobj), metres)
    img.header.set_xyzt_units("meter", "sec")
    nib.save(img, tmp_path / "t1_m.nii.gz")
    image = read_image(tmp_path / "t1_m.nii.gz")
    np.testing.assert_allclose(image.affine, t1.affine, atol=1e-4)
    invalid = nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine)
    invalid.header["xyzt_units"] = 7  # no unit has code 7: nibabel's get_xyzt_units raises (the fuzzer found it)
    nib.save(invalid, tmp_path / "t1_bad_unit.nii.gz")
    assert read_image(tmp_path / "t1_bad_unit.nii.gz").spacing == pytest.approx((2.0, 2.0, 2.0))
    pet = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    for name in ("t1_m.nii.gz", "t1_mm.nii.gz"):
        if name == "t1_mm.nii.gz":
            nib.save(t1, tmp_path / name)
        res = cli("fuse", tmp_path / name, pet, "-o", tmp_path / f"fused_{name}", "--method", "mean", "--no-metrics")
        assert res.exit_code == 0, res.stderr
    out = nib.load(tmp_path / "fused_t1_m.nii.gz")
    assert out.header.get_xyzt_units()[0] == "meter"
    np.testing.assert_allclose(out.affine, metres, atol=1e-7)
    np.testing.assert_array_equal(out.get_fdata(), nib.load(tmp_path / "fused_t1_mm.nii.gz").get_fdata())
    back = sitk.ReadImage(str(tmp_path / "fused_t1_m.nii.gz"))
    np.testing.assert_allclose(back.GetSpacing(), (2.0, 2.0, 2.0), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), sitk.ReadImage(str(pet)).GetOrigin(), atol=1e-3)


def test_a_simpleitk_vector_nifti_is_read_as_colour(tmp_path, cli):
    """SimpleITK writes a vector image as a 5D NIfTI (x, y, z, 1, components; intent VECTOR): an
    8- or 16-bit RGB(A) one is read as colour, as from NRRD; other vectors are refused in one line."""
    import SimpleITK as sitk
    from conftest import assert_one_line_error

    pet = sitk.ReadImage(str(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"))
    grey = np.nan_to_num(sitk.GetArrayFromImage(pet).astype(np.float32))
    grey = np.round((grey - grey.min()) / (grey.max() - grey.min()) * 255)
    rgb = np.stack([grey, grey // 2, 255 - grey], -1).astype(np.uint8)
    vec = sitk.GetImageFromArray(rgb, isVector=True)
    vec.CopyInformation(pet)
    sitk.WriteImage(vec, str(tmp_path / "rgb.nii.gz"))
    sitk.WriteImage(vec, str(tmp_path / "rgb.nrrd"))
    assert nib.load(tmp_path / "rgb.nii.gz").header["dim"][0] == 5  # what SimpleITK wrote

    image, via_nrrd = read_image(tmp_path / "rgb.nii.gz"), read_image(tmp_path / "rgb.nrrd")
    assert image.is_color and image.data.shape == (91, 109, 91, 3)
    np.testing.assert_array_equal(image.data, via_nrrd.data)
    np.testing.assert_allclose(image.affine, via_nrrd.affine, atol=1e-4)
    np.testing.assert_array_equal(image.data[..., 1], np.transpose(rgb[..., 1], (2, 1, 0)))
    raw = bytearray(gzip.decompress((tmp_path / "rgb.nii.gz").read_bytes()))
    raw[112:120] = np.array([2.0, 1.0], "<f4").tobytes()  # an scl_slope / scl_inter: not for colour
    (tmp_path / "slope.nii").write_bytes(bytes(raw))
    scaled = read_image(tmp_path / "slope.nii")
    assert scaled.data.dtype == np.uint8
    np.testing.assert_array_equal(scaled.data, image.data)

    rgba = sitk.GetImageFromArray(np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], -1), isVector=True)
    rgba.CopyInformation(pet)
    for suffix in (".nii.gz", ".nrrd"):  # alpha dropped, as for PNG
        sitk.WriteImage(rgba, str(tmp_path / f"rgba{suffix}"))
        np.testing.assert_array_equal(read_image(tmp_path / f"rgba{suffix}").data, image.data)
    deep = sitk.GetImageFromArray(rgb.astype(np.uint16) * 257, isVector=True)  # 16-bit: read as 8-bit
    deep.CopyInformation(pet)
    for suffix in (".nii.gz", ".nrrd"):
        sitk.WriteImage(deep, str(tmp_path / f"rgb16{suffix}"))
        np.testing.assert_array_equal(read_image(tmp_path / f"rgb16{suffix}").data, image.data)

    # a displacement field (3 float components) is not colour, in either format (NRRD took it as colour)
    field = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    for suffix in (".nii.gz", ".nrrd"):
        sitk.WriteImage(field, str(tmp_path / f"field{suffix}"))
        assert_one_line_error(res := cli("info", tmp_path / f"field{suffix}"), 4)
        assert "3 float32 components per voxel" in res.stderr


def test_rgba32_and_complex_voxels(tmp_path, caplog):
    """NIfTI's RGBA32 datatype ended in an internal error (exit 1): it is colour, alpha dropped.
    Complex voxels (some MR reconstructions) were cut to their real part: now their magnitude, with
    a warning, for one frame or the mean of all."""
    from medfuse_cli.io.nifti import RGBA32

    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    grey = np.nan_to_num(np.asarray(t1.dataobj, dtype=np.float32))
    rgba = np.zeros(grey.shape, RGBA32)
    rgba["R"], rgba["G"], rgba["B"], rgba["A"] = grey * 255, grey * 100, 255 - grey * 255, 7
    nib.Nifti1Image(rgba, t1.affine).to_filename(tmp_path / "rgba.nii.gz")
    colour = read_image(tmp_path / "rgba.nii.gz")
    assert colour.is_color
    np.testing.assert_array_equal(colour.data, np.stack([rgba[c] for c in "RGB"], -1))
    # found by fuzzing: an scl_slope on RGB voxels, which nibabel tries to apply and fails (exit 1)
    raw = bytearray(nib.Nifti1Image(rgba, t1.affine).to_bytes())
    raw[112:120] = np.array([2.0, 1.0], "<f4").tobytes()  # scl_slope, scl_inter
    (tmp_path / "slope.nii").write_bytes(bytes(raw))
    assert nib.load(tmp_path / "slope.nii").dataobj.slope == 2.0
    np.testing.assert_array_equal(read_image(tmp_path / "slope.nii").data, colour.data)

    turns = np.stack([grey * (0.6 + 0.8j), grey * (0.8 - 0.6j)], -1).astype(np.complex64)  # both of magnitude grey
    nib.Nifti1Image(turns, t1.affine).to_filename(tmp_path / "complex.nii.gz")
    with caplog.at_level("WARNING"):
        for frames in (FrameChoice(frame=1), FrameChoice(mean=True)):
            image = read_image(tmp_path / "complex.nii.gz", frames=frames)
            np.testing.assert_allclose(image.data, grey, atol=1e-5)
    assert sum("magnitude" in r.getMessage() for r in caplog.records) == 2


def test_nifti_pairs_and_analyze_hdr_img(tmp_path, cli, caplog):
    """.hdr/.img files (NIfTI-1 pairs, and Analyze 7.5 as SPM wrote it) were 'not a recognised
    image'. A pair reads as its .nii.gz does, by either name; SPM's Analyze with its .mat keeps the
    affine; Analyze without one is read as LAS with a warning; a short .img is refused (exit 4)."""
    from conftest import assert_one_line_error

    source = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    pet = nib.load(source)
    reference = read_image(source)
    voxels = np.asarray(pet.dataobj).astype(np.int16)
    nib.Nifti1Pair(np.asarray(pet.dataobj), pet.affine).to_filename(tmp_path / "pair.hdr")
    nib.Spm2AnalyzeImage(voxels, pet.affine).to_filename(tmp_path / "spm.img")  # + spm.mat
    nib.AnalyzeImage(voxels, pet.affine).to_filename(tmp_path / "plain.hdr")
    assert (tmp_path / "spm.mat").is_file()

    with caplog.at_level("WARNING"):
        for name in ("pair.hdr", "pair.img", "spm.hdr"):
            image = read_image(tmp_path / name)
            np.testing.assert_allclose(image.affine, reference.affine, atol=1e-5)
            np.testing.assert_allclose(image.data, reference.data if name.startswith("pair") else voxels, atol=1e-6)
        assert not [r for r in caplog.records if "orientation" in r.getMessage()]
        plain = read_image(tmp_path / "plain.img")
    assert any("Analyze 7.5 header gives no orientation" in r.getMessage() for r in caplog.records)
    assert plain.orientation == "LAS"
    np.testing.assert_array_equal(plain.data, voxels)

    res = cli("fuse", tmp_path / "spm.hdr", EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", "-o", tmp_path / "f.nii.gz",
              "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    out = nib.load(tmp_path / "f.nii.gz")
    np.testing.assert_allclose(out.affine, reference.affine, atol=1e-5)
    assert int(out.header["sform_code"]) > 0

    (tmp_path / "pair.img").write_bytes((tmp_path / "pair.img").read_bytes()[:1000])
    assert_one_line_error(cli("info", tmp_path / "pair.hdr"), 4)
    # found by fuzzing: a negative step along a 4th axis made nibabel's conversion raise (exit 1)
    header = bytearray((tmp_path / "plain.hdr").read_bytes())
    header[40:42], header[48:50] = np.array([4], "<i2").tobytes(), np.array([1], "<i2").tobytes()  # dims: x,y,z,1
    header[92:96] = np.array([-1.0], "<f4").tobytes()  # pixdim[4], the 4th axis's step
    (tmp_path / "plain.hdr").write_bytes(bytes(header))
    assert_one_line_error(cli("info", tmp_path / "plain.hdr"), 4)
