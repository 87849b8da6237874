"""DICOM series reading against the dcm2niix references in ../shared/data/dicom."""

from __future__ import annotations

import copy
import io
import shutil
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import EXAMPLES, assert_one_line_error, shared_path
from scipy import ndimage

from medfuse_cli import read_image
from medfuse_cli.errors import ChoiceRequiredError, InvalidInputError
from medfuse_cli.io import FrameChoice

MR = ("dicom", "mr_siemens_xa30_t1w")
PET = ("dicom", "pt_ge_discoveryst_fdg_sts001")
CT = ("dicom", "ct_ge_hispeed_head_tilt")
EXAMPLES_MR = EXAMPLES / "dicom" / "mr_t1_xa30.zip"


def _voxel_map(mine: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Signed permutation + integer offset taking my voxel indices to the reference's."""
    m = np.linalg.inv(ref) @ mine
    mapped = np.eye(4)
    mapped[:3, :3] = np.round(m[:3, :3])
    mapped[:3, 3] = np.round(m[:3, 3])
    assert np.allclose(np.abs(mapped[:3, :3]).sum(axis=0), 1), "voxel axes are not a permutation of the reference's"
    return mapped


def _world_error(image, ref_affine: np.ndarray, mapped: np.ndarray) -> float:
    """Largest world distance (mm) between my voxel centres and the reference's, over all corners."""
    sh = np.array(image.shape) - 1
    corners = np.array([[i, j, k, 1] for i in (0, sh[0]) for j in (0, sh[1]) for k in (0, sh[2])]).T
    diff = (ref_affine @ mapped - image.affine) @ corners
    return float(np.linalg.norm(diff[:3], axis=0).max())


def _in_reference_order(image, ref_data: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    idx = np.indices(image.shape).reshape(3, -1)
    ref_idx = (mapped[:3, :3] @ idx + mapped[:3, 3:4]).astype(int)
    assert ref_data.shape == tuple(image.shape[a] for a in np.argmax(np.abs(mapped[:3, :3]), axis=1))
    return ref_data[ref_idx[0], ref_idx[1], ref_idx[2]].reshape(image.shape)


def _check_against(image, ref_path: Path, exact: bool) -> None:
    ref = nib.load(ref_path)
    # dcm2niix's sform and qform can disagree by float32 rounding (PET: 2e-5 mm per slice);
    # the voxel grid must match one of them to 1e-3 mm everywhere.
    errors = []
    for affine in (ref.header.get_sform(), ref.header.get_qform()):
        mapped = _voxel_map(image.affine, affine)
        errors.append(_world_error(image, affine, mapped))
    assert min(errors) < 1e-3, errors
    expected = _in_reference_order(image, np.asarray(ref.dataobj), mapped)
    if exact:
        assert image.data.dtype.kind in "iu"
        np.testing.assert_array_equal(image.data, expected)
    else:
        np.testing.assert_allclose(image.data, expected, rtol=1e-6, atol=1e-6)


def _check_positions(image, folder: Path) -> None:
    """Every slice's ImagePositionPatient is a voxel centre of the volume.

    Within 0.05 mm: the grid step comes from the first two slices (as dcm2niix), positions
    are written with 1e-4 mm rounding that accumulates over ~100 slices, and the PET's table
    positions jitter by a few hundredths of a mm (a misplaced slice would be millimetres off).
    """
    inv = np.linalg.inv(image.affine)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        lps = np.array([float(v) for v in ds.ImagePositionPatient])
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        ijk = (inv @ ras)[:3]
        world_back = image.affine @ np.r_[np.round(ijk), 1]
        assert np.linalg.norm(world_back[:3] - ras[:3]) < 0.05, (f.name, ijk)


def test_mr_matches_dcm2niix_exactly():
    folder = shared_path(*MR, "dicom")
    image = read_image(folder)
    assert image.modality.value == "MR" and image.shape == (128, 128, 96)
    _check_against(image, shared_path(*MR, "reference", "5001_anat-T1w_acq-tfl.nii.gz"), exact=True)
    _check_positions(image, folder)


def test_pet_per_slice_rescale_matches_dcm2niix():
    folder = shared_path(*PET, "dicom")
    slopes = {float(pydicom.dcmread(f, stop_before_pixels=True).RescaleSlope) for f in folder.glob("*.dcm")}
    assert len(slopes) > 100  # the case this test is about: a different slope on each slice
    image = read_image(folder)  # the folder also holds an RTSTRUCT, which must be ignored
    assert image.modality.value == "PT" and image.units == "BQML" and image.shape == (128, 128, 267)
    _check_against(image, shared_path(*PET, "reference", "1_PET_AC.nii.gz"), exact=False)
    _check_positions(image, folder)


def test_pet_suv_uses_weight_dose_and_decay():
    folder = shared_path(*PET, "dicom")
    bq = read_image(folder)
    suv = read_image(folder, suv=True)
    assert suv.units == "SUVbw"
    # FDG 388.777 MBq at 10:35:00, series 11:20:11 (2711 s), half-life 6588 s, 71 kg
    factor = 71000.0 / (3.88777472e8 * 2 ** (-2711 / 6588.0))
    np.testing.assert_allclose(suv.data, bq.data * factor, rtol=1e-5)
    body = suv.data[suv.data > 0.05]
    assert 0.2 < float(np.median(body)) < 3.0  # soft tissue is around SUV 1


def test_tilted_uneven_ct_matches_dcm2niix_tilt_corrected_in_world_space():
    folder = shared_path(*CT, "dicom")
    image = read_image(folder)
    ref = nib.load(shared_path(*CT, "reference", "_2_Tilt_Eq_1.nii.gz"))
    ref_data = np.asarray(ref.dataobj).astype(np.float32)
    # regular orthogonal grid along the slice normal (no shear)
    cols = image.affine[:3, :3] / np.asarray(image.spacing)
    np.testing.assert_allclose(cols.T @ cols, np.eye(3), atol=1e-6)
    # my volume sampled on the reference grid through both affines
    m = np.linalg.inv(image.affine) @ ref.affine
    mine = ndimage.affine_transform(
        image.data.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=ref_data.shape, order=1, cval=-1500
    )
    inside = (mine > -1400) & (ref_data > -1400)
    assert np.corrcoef(mine[inside], ref_data[inside])[0, 1] > 0.99

    def bone_centroid(vol: np.ndarray, affine: np.ndarray) -> np.ndarray:
        idx = np.argwhere(vol > 300)
        w = vol[vol > 300]
        return (affine @ np.r_[(idx * w[:, None]).sum(0) / w.sum(), 1])[:3]

    offset_mm = bone_centroid(image.data.astype(np.float32), image.affine) - bone_centroid(ref_data, ref.affine)
    offset_vox = np.linalg.inv(ref.affine[:3, :3]) @ offset_mm
    assert np.all(np.abs(offset_vox) < 0.5), offset_vox
    # the first acquired slice lies on the output lattice and is kept exactly
    first = pydicom.dcmread(folder / "01.dcm")
    raw = first.pixel_array.astype(np.int32) * int(first.RescaleSlope) + int(first.RescaleIntercept)
    lps = np.array([float(v) for v in first.ImagePositionPatient])
    i0, j0, k0 = np.round(np.linalg.inv(image.affine) @ np.array([-lps[0], -lps[1], lps[2], 1.0]))[:3].astype(int)
    assert k0 == 0
    np.testing.assert_array_equal(image.data[i0 : i0 + 512, j0 : j0 + 512, 0], raw.T)
    assert any("gantry tilt" in s for s in image.provenance.steps)


def _copy_with(folder: Path, dest: Path, edit=None, names=None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.dcm"))
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if edit is not None:
            edit(n, ds)
        ds.save_as(dest / (names(n) if names else f.name))


def test_slices_sorted_by_position_not_instance_number(tmp_path):
    folder = shared_path(*MR, "dicom")
    rng = np.random.default_rng(0)
    perm = rng.permutation(96)

    def scramble(n, ds):
        ds.InstanceNumber = int(perm[n]) + 1

    _copy_with(folder, tmp_path / "s", scramble, names=lambda n: f"img{perm[n]:03d}.dcm")
    a, b = read_image(folder), read_image(tmp_path / "s")
    np.testing.assert_array_equal(a.data, b.data)
    assert np.allclose(a.affine, b.affine, atol=0.02)  # anchor slice may differ: dcm2niix's 1e-4 mm steps


def test_zip_equals_folder_and_non_image_files_are_ignored(tmp_path):
    folder = shared_path(*MR, "dicom")
    mixed = tmp_path / "with_junk"
    shutil.copytree(folder, mixed / "nested" / "deeper")
    (mixed / "DIRFILE").write_bytes(b"\x00" * 300)
    (mixed / "README.txt").write_text("not an image")
    archive = tmp_path / "mr.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.glob("*.dcm")):
            zf.write(f, f"series/{f.name}")
    ref = read_image(folder)
    for path in (mixed, archive):
        other = read_image(path)
        np.testing.assert_array_equal(other.data, ref.data)
        np.testing.assert_array_equal(other.affine, ref.affine)


def test_a_damaged_file_in_a_zip_refuses_the_series(tmp_path, cli):
    """A zip member whose CRC-32 fails (64 bytes damaged) was taken for "not DICOM" and left out: the
    bundled XA30 series read with one slice fewer, its gap resampled with only an "uneven slice
    spacing" warning."""
    archive = tmp_path / "mr.zip"
    shutil.copy(EXAMPLES_MR, archive)
    with zipfile.ZipFile(archive) as zf:
        members = sorted((m for m in zf.infolist() if not m.is_dir()), key=lambda m: m.filename)
    victim = members[len(members) // 2]
    raw = bytearray(archive.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[victim.header_offset + 26:victim.header_offset + 30])
    start = victim.header_offset + 30 + name_len + extra_len  # its data, after its local header
    middle = start + victim.compress_size // 2
    raw[middle:middle + 64] = bytes(b ^ 0x5A for b in raw[middle:middle + 64])
    archive.write_bytes(raw)
    out = tmp_path / "mr.nii.gz"
    res = cli("convert", archive, "-o", out)
    assert_one_line_error(res, 4)
    assert f"{victim.filename}: damaged file in the zip (Bad CRC-32)" in res.stderr and not out.exists()


def test_a_series_with_files_lost_keeps_its_grid_and_says_so(tmp_path, caplog):
    """Three files lost from the bundled XA30 series (2 mm slices): the gaps were resampled onto 97
    slices 1.979 mm apart (the grid's step from the smallest gap, a hair under 2 mm from the headers'
    decimals), so every slice was an interpolation of two; and the warning said only "uneven slice
    spacing". Now the series keeps its own grid (its 93 slices as they are, the 3 lost ones
    interpolated) and the warning says slices seem missing."""
    full = read_image(EXAMPLES_MR)
    with zipfile.ZipFile(EXAMPLES_MR) as zf:
        names = sorted(m.filename for m in zf.infolist() if not m.is_dir())
        lost = {names[30], names[31], names[60]}
        for name in set(names) - lost:
            (tmp_path / "mr").mkdir(exist_ok=True)
            (tmp_path / "mr" / Path(name).name).write_bytes(zf.read(name))
    with caplog.at_level("WARNING"):
        gappy = read_image(tmp_path / "mr")
    assert "3 slice(s) missing from the series?" in caplog.text
    assert gappy.shape == full.shape
    np.testing.assert_allclose(gappy.affine, full.affine, atol=0.02)
    kept = [k for k in range(full.shape[2]) if np.abs(gappy.data[:, :, k].astype(float) - full.data[:, :, k]).max() <= 1]
    assert len(kept) == 93


def test_a_file_copied_twice_is_read_once(tmp_path, cli):
    """``IM.dcm`` and ``IM (1).dcm``, one image (one SOPInstanceUID) twice, as a second copy into one
    folder makes: the series was refused ("positions hold different numbers of slices (1..2)"). The
    copy is left out with a warning, and the series reads as the zip does."""
    folder = tmp_path / "mr"
    with zipfile.ZipFile(EXAMPLES_MR) as zf:
        zf.extractall(folder)
    original = sorted(folder.rglob("*.dcm"))[40]
    shutil.copy(original, original.with_name(original.stem + " (1).dcm"))
    out = tmp_path / "mr.nii.gz"
    res = cli("convert", folder, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert "1 file(s) repeat an image already read" in " ".join(res.stderr.split())
    np.testing.assert_array_equal(read_image(out).data, read_image(EXAMPLES_MR).data)


def test_positions_across_the_slice_plane_are_refused_for_what_they_are(tmp_path, cli):
    """The sagittal XA30 series with its orientation rewritten to axial: its positions step along x,
    within the slices' new plane, so they all sit at one height and the series was taken for one
    position of 4D frames (exit 2, asking for --frame); a real 4D series' frames lie at one point."""
    import pydicom

    folder = tmp_path / "mr"
    with zipfile.ZipFile(EXAMPLES_MR) as zf:
        zf.extractall(folder)
    for f in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(f)
    res = cli("convert", folder, "-o", tmp_path / "mr.nii.gz")
    assert_one_line_error(res, 4)
    assert "positions step along (1.00, " in res.stderr and "normal is (0.00, 0.00, 1.00)" in res.stderr


def test_one_file_of_a_series_given_alone_says_the_series_is_beside_it(tmp_path, caplog):
    """One .dcm of the 96-file XA30 series reads as that one slice (as it should), which a user who
    meant the series would not notice; the warning says its series is beside it. Alone, it is quiet."""
    folder = tmp_path / "mr"
    with zipfile.ZipFile(EXAMPLES_MR) as zf:
        zf.extractall(folder)
    one = sorted(folder.rglob("*.dcm"))[40]
    with caplog.at_level("WARNING"):
        assert read_image(one).shape[2] == 1
    assert f"{one.name} is one slice of a series with 95 more file(s) beside it" in caplog.text
    alone = tmp_path / "alone" / one.name
    alone.parent.mkdir()
    shutil.copy(one, alone)
    (alone.parent / "notes.txt").write_text("not DICOM")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert read_image(alone).shape[2] == 1
    assert "one slice of a series" not in caplog.text


def test_mixed_series_need_series_choice(tmp_path, cli):
    both = tmp_path / "both"
    shutil.copytree(shared_path(*MR, "dicom"), both / "mr")
    shutil.copytree(shared_path(*CT, "dicom"), both / "ct")
    with pytest.raises(ChoiceRequiredError, match="2 series"):
        read_image(both)
    out = tmp_path / "out.nii.gz"
    res = cli("convert", both, "-o", out)
    assert res.exit_code == 2 and "--series" in res.stderr and not out.exists()
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert read_image(both, series="5001").modality.value == "MR"
    assert read_image(both, series="anat-T1w_acq-tfl").shape == (128, 128, 96)
    listing = cli("info", both, "--json")
    assert listing.exit_code == 0 and listing.stdout.count('"series_uid"') == 2


def test_each_header_is_read_once_per_command_until_the_files_change(tmp_path, cli, monkeypatch):
    """A study folder's headers are read once by `info` and by `fuse` to a DICOM series (they were
    read once per series listed, and again for the series read and for the output's references)."""
    from medfuse_cli.io import dicom

    both = tmp_path / "both"
    shutil.copytree(shared_path(*MR, "dicom"), both / "mr")
    shutil.copytree(shared_path(*PET, "dicom"), both / "pet")
    n_files = sum(1 for f in both.rglob("*") if f.is_file())
    reads = []
    real = dicom._read_header
    monkeypatch.setattr(dicom, "_read_header", lambda name, opener: reads.append(name) or real(name, opener))
    listing = cli("info", both, "--json")
    assert listing.exit_code == 0 and listing.stdout.count('"series_uid"') == 2
    assert len(reads) == n_files
    reads.clear()
    res = cli("fuse", both / "mr", both / "pet", "-o", tmp_path / "fused", "-t", "none", "-m", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert len(reads) == n_files  # each file of the two series once, though the output refers to both
    assert read_image(both / "mr").shape == (128, 128, 96) and len(reads) == n_files
    (both / "mr" / min(p.name for p in (both / "mr").iterdir())).unlink()  # a file removed: scanned again
    assert read_image(both / "mr").shape == (128, 128, 95)
    assert len(reads) == n_files + 95


def test_corrupt_dicom_is_refused(tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(shared_path(*MR, "dicom"), bad)
    victim = sorted(bad.glob("*.dcm"))[40]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size - 5000])  # truncated pixel data
    with pytest.raises(InvalidInputError, match="corrupt"):
        read_image(bad)
    out = tmp_path / "o.nii.gz"
    res = cli("convert", bad, "-o", out)
    assert res.exit_code == 4 and not out.exists() and "Traceback" not in res.stderr


def test_repeated_positions_are_frames(tmp_path):
    """Two frames per position (a dynamic series): refused without --frame, chosen with it."""
    folder = shared_path(*MR, "dicom")
    dest = tmp_path / "dyn"

    def later(n, ds):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.AcquisitionTime = "235959.000000"
        ds.InstanceNumber = int(ds.InstanceNumber) + 1000
        ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()

    _copy_with(folder, dest)
    _copy_with(folder, dest, later, names=lambda n: f"late_{n:03d}.dcm")
    with pytest.raises(ChoiceRequiredError, match="--frame"):
        read_image(dest)
    base = read_image(folder)
    np.testing.assert_array_equal(read_image(dest, frames=FrameChoice(frame=0)).data, base.data)
    second = read_image(dest, frames=FrameChoice(frame=1))
    np.testing.assert_array_equal(second.data, base.data + 1)
    assert second.provenance.steps == ["4D, 2 frames: frame 1 (0-based)"]  # in fuse's report and info
    np.testing.assert_allclose(read_image(dest, frames=FrameChoice(mean=True)).data, base.data + 0.5)


def test_nm_multiframe_tomo(tmp_path):
    """An NM (SPECT) multi-frame object built from real PET slices: frames along the normal."""
    folder = shared_path(*PET, "dicom")
    files = sorted(folder.glob("*.dcm"))[:20]  # instance 1..20, z descending
    slices = [pydicom.dcmread(f) for f in files][::-1]  # ascending z: frame i at ipp0 + i*step*normal
    frames = np.stack([s.pixel_array for s in slices])
    ds = copy.deepcopy(slices[0])
    ds.Modality = "NM"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = len(slices)
    ds.SpacingBetweenSlices = "3.27"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    det = pydicom.Dataset()
    det.ImageOrientationPatient = slices[0].ImageOrientationPatient
    det.ImagePositionPatient = slices[0].ImagePositionPatient
    ds.DetectorInformationSequence = pydicom.Sequence([det])
    del ds.ImagePositionPatient
    ds.PixelData = frames.astype(slices[0].pixel_array.dtype).tobytes()
    path = tmp_path / "nm.dcm"
    ds.save_as(path, enforce_file_format=False)
    image = read_image(path)
    assert image.modality.value == "NM" and image.shape == (128, 128, 20)
    np.testing.assert_array_equal(image.data, frames.transpose(2, 1, 0))
    top = np.array([float(v) for v in slices[-1].ImagePositionPatient])
    np.testing.assert_allclose(image.affine @ [0, 0, 19, 1], [-top[0], -top[1], top[2], 1], atol=1e-3)


def test_palette_colour_pet_is_read_as_its_colours(tmp_path):
    """A colour-mapped PET series (PALETTE COLOR: indices into a colour table) reads as the RGB the table
    gives, on the grid of the same indices stored as greyscale."""
    folder = shared_path(*PET, "dicom")
    files = [f for f in sorted(folder.glob("*.dcm")) if pydicom.dcmread(f, stop_before_pixels=True).Modality == "PT"]
    peak = max(float(ds.pixel_array.max()) * float(ds.RescaleSlope) for ds in map(pydicom.dcmread, files))
    ramp = np.linspace(0.0, 1.0, 256)
    lut = np.rint(65535 * np.stack([np.clip(3 * ramp, 0, 1), np.clip(3 * ramp - 1, 0, 1),
                                    np.clip(3 * ramp - 2, 0, 1)])).astype(np.uint16)  # a "hot" table
    for kind in ("grey", "palette"):
        (tmp_path / kind).mkdir()
        for f in files:
            ds = pydicom.dcmread(f)
            real = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            ds.PixelData = np.clip(np.rint(255 * real / peak), 0, 255).astype(np.uint8).tobytes()
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):
                ds.pop(tag, None)
            if kind == "palette":
                ds.PhotometricInterpretation = "PALETTE COLOR"
                for colour, table in zip(("Red", "Green", "Blue"), lut, strict=True):
                    ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
                    ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", table.tobytes())
            ds.save_as(tmp_path / kind / f.name)
    grey, palette = read_image(tmp_path / "grey"), read_image(tmp_path / "palette")
    assert palette.is_color and palette.data.dtype == np.uint8 and palette.shape == grey.shape
    np.testing.assert_allclose(palette.affine, grey.affine, atol=1e-6)
    expected = np.rint(lut.T[grey.data.astype(np.int64)] / 257.0)
    np.testing.assert_array_equal(palette.data, expected)
    assert 0 < palette.data[..., 0].mean() < 255 and palette.data[..., 2].max() > 0  # a real image, not flat


def _compressed_copy(source: Path, dest: Path, syntax: str) -> None:
    """The bundled MR series re-encoded by GDCM in another transfer syntax (a PACS export's)."""
    import gdcm

    dest.mkdir()
    with zipfile.ZipFile(source) as z:
        for name in sorted(z.namelist()):
            raw = dest / (Path(name).name + ".raw")
            raw.write_bytes(z.read(name))
            reader = gdcm.ImageReader()
            reader.SetFileName(str(raw))
            assert reader.Read()
            change = gdcm.ImageChangeTransferSyntax()
            change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
            change.SetInput(reader.GetImage())
            assert change.Change()
            writer = gdcm.ImageWriter()
            writer.SetFileName(str(dest / Path(name).name))
            writer.SetFile(reader.GetFile())
            writer.SetImage(change.GetOutput())
            assert writer.Write()
            raw.unlink()


def test_jpeg_lossless_series_reads_as_the_uncompressed_one(tmp_path):
    source = EXAMPLES_MR
    _compressed_copy(source, tmp_path / "jll", "JPEGLosslessProcess14_1")
    assert "Lossless" in pydicom.dcmread(next((tmp_path / "jll").iterdir())).file_meta.TransferSyntaxUID.name
    plain, packed = read_image(source), read_image(tmp_path / "jll")
    np.testing.assert_array_equal(packed.data, plain.data)
    np.testing.assert_array_equal(packed.affine, plain.affine)


def test_a_series_no_decoder_reads_is_named_as_such(tmp_path, cli):
    _compressed_copy(EXAMPLES_MR, tmp_path / "jpeg12", "JPEGExtendedProcess2_4")  # lossy 12-bit JPEG
    res = cli("info", tmp_path / "jpeg12")
    assert res.exit_code == 4 and "compressed as 'JPEG Extended" in res.stderr and "Traceback" not in res.stderr


def test_colour_nm_multiframe_tomo(tmp_path):
    """A colour (RGB) NM multi-frame object built from real PET slices reads as a colour volume,
    frame i at ipp0 + i*step*normal, as the greyscale one does, with 8-, 12- or 16-bit channels."""
    folder = shared_path(*PET, "dicom")
    slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))[:12]][::-1]
    grey = np.stack([s.pixel_array * float(s.RescaleSlope) for s in slices])
    level = np.clip(np.rint(255 * grey / grey.max()), 0, 255).astype(np.uint8)
    frames = np.stack([level, 255 - level, level // 2], axis=-1)  # (frames, rows, cols, RGB)
    ds = copy.deepcopy(slices[0])
    ds.Modality, ds.SOPClassUID = "NM", "1.2.840.10008.5.1.4.1.1.20"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames, ds.SpacingBetweenSlices = len(slices), "3.27"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        ds.pop(tag, None)
    det = pydicom.Dataset()
    det.ImageOrientationPatient = slices[0].ImageOrientationPatient
    det.ImagePositionPatient = slices[0].ImagePositionPatient
    ds.DetectorInformationSequence = pydicom.Sequence([det])
    del ds.ImagePositionPatient
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "nm.dcm", enforce_file_format=False)
    image = read_image(tmp_path / "nm.dcm")
    assert image.is_color and image.modality.value == "NM" and image.shape == (128, 128, 12)
    np.testing.assert_array_equal(image.data, frames.transpose(2, 1, 0, 3))
    top = np.array([float(v) for v in slices[-1].ImagePositionPatient])
    np.testing.assert_allclose(image.affine @ [0, 0, 11, 1], [-top[0], -top[1], top[2], 1], atol=1e-3)
    # 16- and 12-bit channels are scaled to 8 bits from their BitsStored (they were clipped at 255)
    for bits in (16, 12):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
        ds.PixelData = np.round(frames * ((2**bits - 1) / 255)).astype("<u2").tobytes()
        ds.save_as(tmp_path / f"nm{bits}.dcm", enforce_file_format=False)
        np.testing.assert_array_equal(read_image(tmp_path / f"nm{bits}.dcm").data, frames.transpose(2, 1, 0, 3))


def test_monochrome1_is_shown_as_a_viewer_shows_it(tmp_path, caplog):
    """MONOCHROME1 (lowest values shown white) was read as stored, so a fused MRI looked inverted
    against the viewer; an MR is now inverted within its range (as ITK reads it), while quantities
    (a CT, PET or SPECT series claiming it) keep their stored values; both with a warning."""
    ref = read_image(EXAMPLES_MR)
    with zipfile.ZipFile(EXAMPLES_MR) as zf:
        blobs = [zf.read(n) for n in sorted(zf.namelist()) if not n.endswith("/")]
    for modality in ("MR", "PT"):
        folder = tmp_path / modality
        folder.mkdir()
        for i, blob in enumerate(blobs):
            ds = pydicom.dcmread(io.BytesIO(blob))
            ds.PhotometricInterpretation, ds.Modality = "MONOCHROME1", modality
            ds.PixelData = (4000 - ds.pixel_array).astype(ds.pixel_array.dtype).tobytes()
            ds.save_as(folder / f"{i:03d}.dcm")
        with caplog.at_level("WARNING"):
            image = read_image(folder)
        if modality == "MR":
            assert image.data.min() == 4000 - ref.data.max()
            np.testing.assert_array_equal(image.data - image.data.min(), ref.data - ref.data.min())
            assert "MONOCHROME1 (lowest values shown white): inverted" in caplog.text
        else:
            np.testing.assert_array_equal(image.data, 4000 - ref.data)
            assert "MONOCHROME1 ignored: a PT series' values are quantities" in caplog.text


def test_contours_instead_of_an_image_are_named(tmp_path, cli):
    """An RTSTRUCT (contours) given as an image says what it is, as a file, in a folder and in a zip."""
    folder = shared_path(*PET, "rtstruct")
    (rt,) = [f for f in folder.iterdir() if f.is_file()]
    with pytest.raises(InvalidInputError, match=f"^{rt.name}: a DICOM RTSTRUCT object, not an image$"):
        read_image(rt)
    with pytest.raises(InvalidInputError, match="no DICOM image found in this folder; .*not images: RTSTRUCT \\(1\\)"):
        read_image(folder)
    with zipfile.ZipFile(tmp_path / "rt.zip", "w") as zf:
        zf.write(rt, rt.name)
        zf.writestr("README.txt", "contours of the tumour")
    res = cli("fuse", tmp_path / "rt.zip", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz", "-o", tmp_path / "f.nii.gz")
    assert res.exit_code == 4 and "not images: RTSTRUCT (1)" in res.stderr and not (tmp_path / "f.nii.gz").exists()
