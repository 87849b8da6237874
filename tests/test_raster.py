"""PNG / TIFF slices: the Harvard pairs (../shared) and 8/16-bit, grey/RGB round trips."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES, assert_one_line_error, shared_path
from PIL import Image as PILImage

from medfuse_cli import Image, read_image, write_image
from medfuse_cli.errors import GeometryError


def test_harvard_grey_and_pseudocolour_pairs():
    folder = shared_path("harvard", "mri-pet")
    mri = read_image(folder / "25015_mri.png")
    pet = read_image(folder / "25015_pet.png")
    assert mri.shape == (256, 256, 1) and not mri.is_color and mri.modality.value == "MR"
    assert pet.is_color and pet.data.shape == (256, 256, 1, 3) and pet.modality.value == "PT"
    pixels = np.asarray(PILImage.open(folder / "25015_pet.png").convert("RGB"))
    np.testing.assert_array_equal(pet.data[:, :, 0], pixels.swapaxes(0, 1))  # (column, row) order
    assert read_image(shared_path("harvard", "mri-spect") / "03008_spect.png").modality.value == "NM"


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_round_trips(tmp_path, suffix):
    folder = shared_path("harvard", "mri-pet")
    for name in ("25015_mri.png", "25015_pet.png"):
        image = read_image(folder / name)
        out = tmp_path / (name[:-4] + suffix)
        write_image(image, out)
        back = read_image(out)
        np.testing.assert_array_equal(back.data, image.data)
        assert back.data.dtype == np.uint8


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_slices(tmp_path, suffix):
    """A 16-bit slice of a real volume survives PNG and TIFF exactly."""
    vol = read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    raw = np.rint(vol.data[:, :, 45:46] / vol.data.max() * 60000).astype(np.uint16)
    image = Image(raw, np.diag([-1.0, -1.0, 1.0, 1.0]))
    out = tmp_path / ("slice" + suffix)
    write_image(image, out)
    back = read_image(out)
    assert back.data.dtype == np.uint16
    np.testing.assert_array_equal(back.data, raw)


def test_rgb_16_bit_tiff(tmp_path):
    import tifffile

    pet = read_image(shared_path("harvard", "mri-pet") / "25015_pet.png")
    rgb16 = pet.data[:, :, 0].swapaxes(0, 1).astype(np.uint16) * 257
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb")
    image = read_image(path)  # colour is 8-bit (the colour path works on 0..255): x / 257, rounded
    assert image.is_color and image.data.dtype == np.uint8
    np.testing.assert_array_equal(image.data, pet.data)


def test_volume_cannot_be_written_as_png(tmp_path):
    vol = read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    with pytest.raises(GeometryError, match="NIfTI"):
        write_image(vol, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_slice_to_nifti_keeps_the_raster_geometry(tmp_path):
    image = read_image(shared_path("harvard", "mri-ct") / "02004_ct.png")
    write_image(image, tmp_path / "ct.nii.gz")
    back = read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(back.data, image.data)
    assert back.orientation == "LPS" and back.spacing == (1.0, 1.0, 1.0)


def test_jpeg_and_bmp_slices_are_read_never_written(tmp_path, cli, caplog):
    """BMP holds the PNG's pixels exactly, so it fuses to the same bytes; JPEG is read with a warning
    that it is lossy; a damaged JPEG is exit 4 and a .jpg output exit 6."""
    folder = shared_path("harvard", "mri-pet")
    for role in ("mri", "pet"):
        with PILImage.open(folder / f"25015_{role}.png") as im:
            im.save(tmp_path / f"25015_{role}.bmp")
            im.save(tmp_path / f"25015_{role}.jpg", quality=90)
    pet = read_image(folder / "25015_pet.png")
    bmp = read_image(tmp_path / "25015_pet.bmp")
    assert bmp.provenance.format == "bmp" and bmp.modality.value == "PT"
    np.testing.assert_array_equal(bmp.data, pet.data)
    with caplog.at_level("WARNING"):
        jpg = read_image(tmp_path / "25015_pet.jpg")
    assert jpg.is_color and jpg.shape == pet.shape and "lossy" in caplog.text
    assert 0 < np.abs(jpg.data.astype(int) - pet.data).mean() < 5  # close to the PNG, not equal
    for inputs, out in (((folder / "25015_mri.png", folder / "25015_pet.png"), "png.png"),
                        ((tmp_path / "25015_mri.bmp", tmp_path / "25015_pet.bmp"), "bmp.png")):
        assert cli("fuse", *inputs, "-o", tmp_path / out, "--method", "mean", "--no-metrics").exit_code == 0
    assert (tmp_path / "png.png").read_bytes() == (tmp_path / "bmp.png").read_bytes()
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes((tmp_path / "25015_pet.jpg").read_bytes()[:200])
    assert cli("info", damaged).exit_code == 4
    res = cli("fuse", tmp_path / "25015_mri.jpg", tmp_path / "25015_pet.jpg", "-o", tmp_path / "f.jpg")
    assert res.exit_code == 6 and not (tmp_path / "f.jpg").exists()


def test_tiff_stacks_are_volumes(tmp_path, cli, caplog):
    """A multi-page ImageJ TIFF of the SPM T1 / PET reads as the volume it holds (2 mm from its
    unit, spacing and resolution) and fuses as the same voxels in NIfTI do; without a voxel size it
    is 1 mm with a warning; a colour stack is refused (exit 5)."""
    import nibabel as nib
    import tifffile

    tifffile.imwrite(tmp_path / "bare.tif", np.zeros((12, 16, 16), np.uint8) + np.arange(16, dtype=np.uint8))
    with caplog.at_level("WARNING"):
        assert read_image(tmp_path / "bare.tif").spacing == pytest.approx((1.0, 1.0, 1.0))
    assert "no voxel size" in caplog.text  # before cli(), which sets up its own log handlers
    for role, src in (("t1", EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"), ("pet", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz")):
        d = np.asarray(nib.load(src).dataobj, np.float32)
        d = (d / d.max() * 65535).astype(np.uint16)
        tifffile.imwrite(tmp_path / f"stack_{role}.tif", d.transpose(2, 1, 0), imagej=True, resolution=(0.5, 0.5),
                         metadata={"spacing": 2.0, "unit": "mm"})
        nib.save(nib.Nifti1Image(d, np.diag([-2.0, -2.0, 2.0, 1.0])), tmp_path / f"same_{role}.nii.gz")
    stack = read_image(tmp_path / "stack_t1.tif")
    assert stack.shape == (91, 109, 91) and stack.spacing == pytest.approx((2.0, 2.0, 2.0))
    np.testing.assert_array_equal(stack.data, read_image(tmp_path / "same_t1.nii.gz").data)
    for kind in ("stack", "same"):
        res = cli("fuse", tmp_path / f"{kind}_t1.{'tif' if kind == 'stack' else 'nii.gz'}",
                  tmp_path / f"{kind}_pet.{'tif' if kind == 'stack' else 'nii.gz'}", "-o", tmp_path / f"{kind}.nii.gz",
                  "--method", "laplacian", "--no-metrics")
        assert res.exit_code == 0, res.stderr
    fused = [nib.load(tmp_path / f"{kind}.nii.gz") for kind in ("stack", "same")]
    np.testing.assert_array_equal(fused[0].get_fdata(), fused[1].get_fdata())
    np.testing.assert_array_equal(fused[0].affine, fused[1].affine)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for role, other in (("t1", "mri"), ("pet", "pet")):
        (pairs / f"1_{other}.tif").write_bytes((tmp_path / f"stack_{role}.tif").read_bytes())
    res = cli("batch", pairs, "-o", tmp_path / "out", "--engine", "sequential", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert nib.load(tmp_path / "out" / "1.nii.gz").shape == (91, 109, 91)  # a volume: NIfTI, not PNG
    tifffile.imwrite(tmp_path / "colour.tif", np.zeros((12, 16, 16, 3), np.uint8), photometric="rgb")
    assert cli("info", tmp_path / "colour.tif").exit_code == 5


def test_damaged_tiffs_are_refused_not_filled_with_zeros(tmp_path, cli):
    """A TIFF cut short (plain or compressed), an ImageJ stack holding fewer slices than it announces,
    and a page whose strip byte counts are zero (a 197-byte file of the fuzzer claimed 50 M pixels and
    was read as zeros in 8 s) end in one line and exit 4, with nothing written; the intact files read."""
    import tifffile

    t1 = np.asarray(read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").data)
    slab = (t1[:, :, 40:43] / t1.max() * 65535).astype(np.uint16).transpose(2, 1, 0)  # 3 real slices
    tifffile.imwrite(tmp_path / "plain.tif", slab[0])
    tifffile.imwrite(tmp_path / "zlib.tif", slab[0], compression="zlib")
    tifffile.imwrite(tmp_path / "stack.tif", slab, imagej=True, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(tmp_path / "plain.tif") as tif:
        counts = tif.pages[0].tags["StripByteCounts"]
        at, size = counts.valueoffset, counts.valuebytecount
    raw = bytearray((tmp_path / "plain.tif").read_bytes())
    raw[at:at + size] = bytes(size)  # every strip's byte count set to 0
    cases = {"no_pixel_data.tif": (bytes(raw), "holds no pixel data")}
    for name in ("plain.tif", "zlib.tif"):
        assert read_image(tmp_path / name).shape == (91, 109, 1)
        data = (tmp_path / name).read_bytes()
        cases[f"cut_{name}"] = (data[: len(data) * 2 // 3], "truncated")
    assert read_image(tmp_path / "stack.tif").shape == (91, 109, 3)
    data = (tmp_path / "stack.tif").read_bytes()
    cases["cut_stack.tif"] = (data[: len(data) * 2 // 3], "announces 3 images")
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        res = cli("convert", tmp_path / name, "-o", tmp_path / f"{name}.nii.gz")
        assert res.exit_code == 4 and message in res.stderr, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / f"{name}.nii.gz").exists()


# a 217-byte TIFF from the fuzzer: its second "page" is no image, and tifffile iterates such pages
# without end (medfuse hung on it, growing past 1 GB, until pages were visited by index)
ENDLESS_PAGES = ("SUkqAAgAAAAOAAABBAABAAAAEAAAAAEBBAABAAAAkAAAAPoBAwABAAAAEAAAAAMBAwABAAAACAAAAAYBAwABIAAAAQAAAA4BAgBTAAAAtgAAABEB"
                 "BAABAAAAcAEAABUBAwABAAAAAQAAABYBBAABAAAAAQAAABAAAAABAAQAAf/8ABAAAAACAQMAAQAAAAAAAAAAFwAAcAABARUAAAMBAAAAAQAA"
                 "ABYBBAABAAAAAQAAABAAAAABAAQAAf/8ABAAAAACAQMAAQAAAAAAAAAAFwEEAAEAAAAAAg==")


def test_a_tiff_whose_pages_never_end_is_refused_at_once(tmp_path):
    import base64
    import subprocess
    import sys

    path = tmp_path / "endless.tif"
    path.write_bytes(base64.b64decode(ENDLESS_PAGES))
    res = subprocess.run([sys.executable, "-m", "medfuse_cli", "info", str(path)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 4 and "damaged TIFF" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_16_bit_rgb_float_rgb_and_complex_tiffs(tmp_path, cli):
    """A 16-bit RGB TIFF of a Harvard SPECT went through the colour path as if 8-bit (a garbled
    fusion, Qabf 0.01): it is read as 8-bit and fuses as the PNG does. Float RGB is refused (exit 4);
    complex pixels are read as their magnitude, with a warning."""
    import json

    import tifffile
    from conftest import assert_one_line_error

    folder = shared_path("harvard", "mri-spect")
    spect = np.asarray(PILImage.open(folder / "03008_spect.png").convert("RGB"))
    tifffile.imwrite(tmp_path / "spect16.tif", spect.astype(np.uint16) * 257, photometric="rgb")
    for name, moving in (("png", folder / "03008_spect.png"), ("tif16", tmp_path / "spect16.tif")):
        res = cli("fuse", folder / "03008_mri.png", moving, "-o", tmp_path / f"{name}.png", "--method", "mean")
        assert res.exit_code == 0, res.stderr
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "tif16.png")),
                                  np.asarray(PILImage.open(tmp_path / "png.png")))
    scores = [json.loads((tmp_path / f"{n}.json").read_text())["metrics"]["values"] for n in ("png", "tif16")]
    assert scores[0] == scores[1]

    tifffile.imwrite(tmp_path / "float.tif", spect.astype(np.float32) / 255, photometric="rgb")
    assert_one_line_error(cli("info", tmp_path / "float.tif"), 4)

    grey = spect[..., 0].astype(np.float32)
    tifffile.imwrite(tmp_path / "complex.tif", (grey * (0.6 + 0.8j)).astype(np.complex64))
    np.testing.assert_allclose(read_image(tmp_path / "complex.tif").data[:, :, 0], grey.T, rtol=1e-5)


def test_a_slice_is_read_by_its_content_whatever_its_name(tmp_path):
    """A PNG named .tif and a TIFF named .png (exports renamed by hand) read as the files they are
    (before: the .tif one was refused as "not a readable TIFF")."""
    import tifffile

    pet = shared_path("harvard", "mri-pet") / "25015_pet.png"
    mri = shared_path("harvard", "mri-pet") / "25015_mri.png"
    (tmp_path / "pet.tif").write_bytes(pet.read_bytes())
    tifffile.imwrite(tmp_path / "mri.png", np.asarray(PILImage.open(mri)))
    for named, original in ((tmp_path / "pet.tif", pet), (tmp_path / "mri.png", mri)):
        image, expected = read_image(named), read_image(original)
        np.testing.assert_array_equal(image.data, expected.data)
        np.testing.assert_array_equal(image.affine, expected.affine)
    assert read_image(tmp_path / "pet.tif").is_color and read_image(tmp_path / "mri.png").provenance.format == "tiff"


def test_an_inf_pixel_is_written_as_the_brightest(tmp_path, cli):
    """A float slice with an inf pixel written as PNG: the pixel is the range's top, as the DICOM
    writer does (it was cast to an undefined value, 0 here)."""
    import nibabel as nib

    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    values = np.asarray(t1.dataobj)[:, :, 45:46].astype(np.float32) * 200  # 0..156, fits 8 bits
    values[40, 50, 0] = np.inf
    nib.Nifti1Image(values, t1.affine).to_filename(tmp_path / "slice.nii.gz")
    res = cli("convert", tmp_path / "slice.nii.gz", "-o", tmp_path / "slice.png")
    assert res.exit_code == 0, res.stderr
    png = np.asarray(PILImage.open(tmp_path / "slice.png"))
    top = np.rint(values[np.isfinite(values)]).max()
    assert png.max() == top
    assert np.count_nonzero(png == top) == np.count_nonzero(np.rint(values) == top) + 1


def test_planar_rgb_and_grey_alpha_tiffs(tmp_path):
    """An RGB TIFF stored as three planes (PlanarConfiguration 2) and a grey TIFF with an alpha
    channel were refused as "unsupported raster layout (3, 256, 256)" / "(256, 256, 2)"."""
    import tifffile

    folder = shared_path("harvard", "mri-pet")
    pet, mri = read_image(folder / "25015_pet.png"), read_image(folder / "25015_mri.png")
    rgb = pet.data[:, :, 0].swapaxes(0, 1)  # rows, columns, channels
    tifffile.imwrite(tmp_path / "planes.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate")
    grey = mri.data[:, :, 0].T
    alpha = np.where(grey > 0, 255, 0).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey_alpha.tif", np.dstack([grey, alpha]), photometric="minisblack", extrasamples=[2])
    planes = read_image(tmp_path / "planes.tif")
    assert planes.is_color
    np.testing.assert_array_equal(planes.data, pet.data)
    np.testing.assert_array_equal(read_image(tmp_path / "grey_alpha.tif").data, mri.data)


def test_compressed_tiffs_read_as_their_png(tmp_path):
    """LZW (the commonest TIFF compression), PackBits and Deflate TIFFs, as Pillow and most exporters
    write them: LZW was refused ("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"), now a
    dependency. A real Harvard MRI and pseudo-colour PET slice and an ImageJ stack of the SPM T1."""
    import nibabel as nib
    import tifffile

    folder = shared_path("harvard", "mri-pet")
    for kind in ("mri", "pet"):
        png = folder / f"25015_{kind}.png"
        for compression in ("tiff_lzw", "packbits", "tiff_adobe_deflate"):
            path = tmp_path / f"{kind}_{compression}.tif"
            with PILImage.open(png) as im:
                im.save(path, compression=compression)
            np.testing.assert_array_equal(read_image(path).data, read_image(png).data)
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").dataobj.get_unscaled()  # uint8 voxels
    stack = np.ascontiguousarray(t1.transpose(2, 1, 0))  # pages, rows, columns
    tifffile.imwrite(tmp_path / "plain.tif", stack, imagej=True, resolution=(0.5, 0.5), metadata={"spacing": 2.0, "unit": "mm"})
    tifffile.imwrite(tmp_path / "lzw.tif", stack, imagej=True, resolution=(0.5, 0.5), metadata={"spacing": 2.0, "unit": "mm"},
                     compression="lzw")
    plain, lzw = read_image(tmp_path / "plain.tif"), read_image(tmp_path / "lzw.tif")
    np.testing.assert_array_equal(lzw.data, plain.data)
    np.testing.assert_array_equal(lzw.affine, plain.affine)


def test_a_fused_float_slice_of_few_grey_levels_is_scaled_into_png(tmp_path, cli):
    """The SPM T1 and PET slices are floats in 0..1: fused, the slice lies in FIXED's window
    (0.01..0.69). Written as PNG it was rounded to 0 and 1, the image lost without a word; now it
    is scaled linearly to 0..255 with a warning, the NIfTI output's values mapped exactly."""
    import nibabel as nib

    for name in ("T1", "PET"):
        volume = nib.load(EXAMPLES / "spm12" / f"OldNorm_{name}.nii.gz")
        nib.Nifti1Image(np.asarray(volume.dataobj)[:, :, 45:46], volume.affine).to_filename(tmp_path / f"{name}.nii.gz")
    pair = (tmp_path / "T1.nii.gz", tmp_path / "PET.nii.gz", "--method", "mean", "--no-metrics")
    assert cli("fuse", *pair, "-o", tmp_path / "fused.nii.gz").exit_code == 0
    res = cli("fuse", *pair, "-o", tmp_path / "fused.png", "--report", tmp_path / "png.json")
    assert res.exit_code == 0, res.stderr
    assert "too few of 8-bit PNG's grey levels" in " ".join(res.stderr.split())
    fused = np.asarray(nib.load(tmp_path / "fused.nii.gz").dataobj)[:, :, 0]
    png = np.asarray(PILImage.open(tmp_path / "fused.png")).swapaxes(0, 1).astype(float)
    assert len(np.unique(png)) > 200
    expected = (fused - fused.min()) / (fused.max() - fused.min()) * 255
    np.testing.assert_allclose(png, expected, atol=0.51)


def test_a_png_with_a_slice_placed_in_space_says_why_they_do_not_meet(tmp_path, cli):
    """A NIfTI slice of the SPM T1 (18 mm above the origin) with a PNG of the PET slice (no position:
    pixels on the z = 0 plane) do not overlap; the refusal (exit 5) says the PNG has no position
    and what to give instead, where it asked about frames of reference."""
    import nibabel as nib

    to_slice_45 = np.eye(4)
    to_slice_45[2, 3] = 45
    for name in ("T1", "PET"):
        volume = nib.load(EXAMPLES / "spm12" / f"OldNorm_{name}.nii.gz")
        nib.Nifti1Image(np.asarray(volume.dataobj)[:, :, 45:46], volume.affine @ to_slice_45).to_filename(
            tmp_path / f"{name}.nii.gz")
    assert cli("convert", tmp_path / "PET.nii.gz", "-o", tmp_path / "pet.png").exit_code == 0
    for pair in ((tmp_path / "T1.nii.gz", tmp_path / "pet.png"), (tmp_path / "pet.png", tmp_path / "T1.nii.gz")):
        res = cli("fuse", *pair, "-o", tmp_path / "f.nii.gz", "--method", "mean")
        assert_one_line_error(res, 5)
        assert "pet.png is a PNG/TIFF/JPEG/BMP slice, which has no position in space" in res.stderr
        assert "frames of reference" not in res.stderr and not (tmp_path / "f.nii.gz").exists()
