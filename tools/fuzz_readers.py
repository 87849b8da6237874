"""Coverage-guided fuzzing of medfuse's image readers with atheris (libFuzzer for Python).

Each input is written to a file of the reader's kind and read with ``read_image``, as
``medfuse`` would read it. A reader may refuse the input with a :class:`MedfuseError` (one line,
a documented exit code); anything else (another exception, a hang, a crash, memory use beyond
libFuzzer's ``-rss_limit_mb``) is a finding, saved by libFuzzer as ``crash-*`` / ``timeout-*`` (with ``slow-unit-*``
inputs) in ``CORPUS_DIR-artifacts/`` unless ``-artifact_prefix`` says where.

    python tools/fuzz_readers.py nifti CORPUS_DIR -max_total_time=600    # a long run
    python tools/fuzz_readers.py all CORPUS_DIR -max_total_time=20       # what the tests run
    python tools/fuzz_readers.py --seeds nifti CORPUS_DIR                 # write seed inputs from examples/

Readers: nifti (.nii), nifti-gz (.nii.gz), analyze (.hdr + .img), dicom (.dcm), png, tiff, nrrd, mha, jpeg, bmp, tiff-stack (ImageJ),
the registration starts users give (tfm and mat: ``--initial-transform`` files, read with ``read_transform``;
fcsv, mrk-json and csv: ``--landmarks`` files, read with ``read_points``), or ``all`` (the first byte of
each input picks the reader: one process, one corpus, what the test suite runs). Seeds come from the bundled
real examples (a cropped SPM12 T1, also as NRRD / MetaImage and as an ImageJ TIFF stack, one slice of the XA30 DICOM
series, PNG / TIFF / JPEG / BMP slices of the T1), and transforms and landmarks as SimpleITK, ANTs and 3D Slicer write them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["medfuse_cli", "nibabel", "pydicom", "PIL", "tifffile"]) \
        if "--seeds" not in sys.argv else contextlib.nullcontext():  # writing seeds needs no coverage
    import nibabel as nib
    import numpy as np
    import tifffile
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401 - instrumented before use

    import medfuse_cli.io.dicom
    import medfuse_cli.io.nifti
    import medfuse_cli.io.raster
    import medfuse_cli.io.stack  # noqa: F401 - instrumented before use
    from medfuse_cli.errors import MedfuseError
    from medfuse_cli.io import read_image
    from medfuse_cli.io.dicom import _SCANS
    from medfuse_cli.landmarks import read_points
    from medfuse_cli.register import read_transform

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = {"nifti": ".nii", "nifti-gz": ".nii.gz", "analyze": ".hdr", "dicom": ".dcm", "png": ".png", "tiff": ".tif", "nrrd": ".nrrd",
          "mha": ".mha", "jpeg": ".jpg", "bmp": ".bmp", "tiff-stack": ".tif", "tfm": ".tfm", "mat": ".mat", "fcsv": ".fcsv",
          "mrk-json": ".mrk.json", "csv": ".csv"}
READERS = {"tfm": read_transform, "mat": read_transform, "fcsv": read_points, "mrk-json": read_points, "csv": read_points}
_WORK = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def _pair_bytes(img) -> bytes:
    """The 348-byte header of a .hdr/.img image followed by its voxels (an SPM .mat is left out)."""
    holders = {name: nib.FileHolder(fileobj=io.BytesIO()) for name, _ in img.files_types}
    img.to_file_map(holders)
    return holders["header"].fileobj.getvalue() + holders["image"].fileobj.getvalue()


def seeds(kind: str) -> dict[str, bytes]:
    """Small real inputs of one kind, made from the bundled examples."""
    t1 = nib.load(str(ROOT / "examples" / "spm12" / "OldNorm_T1.nii.gz"))
    crop = np.asarray(t1.dataobj)[30:46, 40:56, 40:48]
    if kind == "analyze":  # a header and its voxels, written as NAME.hdr + NAME.img by the target
        return {"t1_crop_analyze": _pair_bytes(nib.Spm2AnalyzeImage(crop, t1.affine)),
                "t1_crop_nifti_pair": _pair_bytes(nib.Nifti1Pair(crop, t1.affine))}
    if kind in ("nifti", "nifti-gz"):
        rgb = np.stack([crop, crop // 2, 255 - crop], -1)[:, :, :, None].astype(np.uint8)
        vector = nib.Nifti1Image(rgb, t1.affine)  # 5D, as SimpleITK writes a colour vector image
        vector.header.set_intent("vector")
        pack = (lambda raw: raw) if kind == "nifti" else __import__("gzip").compress
        misnamed = __import__("gzip").compress if kind == "nifti" else (lambda raw: raw)  # read by content, not name
        rgba = np.zeros(crop.shape, [("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
        rgba["R"], rgba["A"] = crop, 255
        frames = np.stack([crop * (0.6 + 0.8j), crop * 1j], -1).astype(np.complex64)  # 4D complex
        return {"t1_crop": pack(nib.Nifti1Image(crop, t1.affine).to_bytes()), "t1_crop_rgb_vector": pack(vector.to_bytes()),
                "t1_crop_rgba32": pack(nib.Nifti1Image(rgba, t1.affine).to_bytes()),
                "t1_crop_complex_4d": pack(nib.Nifti1Image(frames, t1.affine).to_bytes()),
                "t1_crop_nifti2_misnamed": misnamed(nib.Nifti2Image(crop, t1.affine).to_bytes())}
    if kind in ("nrrd", "mha"):
        import SimpleITK as sitk

        with tempfile.TemporaryDirectory() as tmp:
            out = {}
            for packed in (False, True):
                path = Path(tmp) / f"crop{SUFFIX[kind]}"
                sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(crop.T)), str(path), useCompression=packed)
                out[f"t1_crop_{'gz' if packed else 'raw'}"] = path.read_bytes()
            return out
    if kind in ("tfm", "mat"):
        return _transform_seeds(kind)
    if kind in ("fcsv", "mrk-json", "csv"):
        return _landmark_seeds(kind)
    if kind == "dicom":
        with zipfile.ZipFile(ROOT / "examples" / "dicom" / "mr_t1_xa30.zip") as zf:
            name = sorted(n for n in zf.namelist() if not n.endswith("/"))[40]
            raw = zf.read(name)
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(raw))  # a 12-bit RGB crop of the slice, without private tags
        ds.remove_private_tags()
        grey = ds.pixel_array[100:116, 100:116].astype(np.uint16)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 16, 3, "RGB"
        ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 0, 16, 12, 11
        ds.PixelData = np.stack([grey, grey // 2, 4095 - np.minimum(grey, 4095)], -1).astype("<u2").tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        return {"xa30_slice": raw, "xa30_crop_rgb12": buf.getvalue()}
    from PIL import Image as PILImage

    grey = (np.asarray(t1.dataobj)[:, :, 45].astype(np.float32) / max(1, crop.max()) * 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind in ("png", "jpeg", "bmp"):
        PILImage.fromarray(grey).save(buf, format=kind.upper())
    elif kind == "tiff":
        tifffile.imwrite(buf, grey.astype(np.uint16) * 200)
    else:  # an ImageJ stack of the crop's slices, with its voxel size
        tifffile.imwrite(buf, np.ascontiguousarray(crop.T.astype(np.uint16)), imagej=True, resolution=(0.5, 0.5),
                         metadata={"spacing": 2.0, "unit": "mm", "axes": "ZYX"})
    return {f"t1_slice_{kind}": buf.getvalue()}


def _transform_seeds(kind: str) -> dict[str, bytes]:
    """A rigid, a 2D, a composite and an ANTs-style affine (ITK's MatrixOffsetTransformBase) transform."""
    import SimpleITK as sitk
    from scipy.io import savemat

    turn = sitk.Euler3DTransform((0.0, -18.0, 18.0), 0.0, 0.1, -0.15, (4.0, 2.0, -3.0))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, transform in (("euler3d", turn), ("euler2d", sitk.Euler2DTransform((127.5, 127.5), 0.1, (3.0, -2.0))),
                                ("composite", sitk.CompositeTransform([turn, sitk.TranslationTransform(3, (6.0, 0, 0))]))):
            path = Path(tmp) / f"{name}{SUFFIX[kind]}"
            if kind == "tfm" or name != "composite":  # ITK writes no composite as MATLAB
                sitk.WriteTransform(transform, str(path))
                out[name] = path.read_bytes()
        buf = io.BytesIO()
        ants = {"MatrixOffsetTransformBase_double_3_3": np.r_[turn.GetMatrix(), turn.GetTranslation()].reshape(-1, 1),
                "fixed": np.reshape(turn.GetCenter(), (3, 1))}
        if kind == "mat":
            savemat(buf, ants, format="4")
        else:
            buf.write(("#Insight Transform File V1.0\n#Transform 0\nTransform: MatrixOffsetTransformBase_double_3_3\n"
                       f"Parameters: {' '.join(map(str, ants['MatrixOffsetTransformBase_double_3_3'].ravel()))}\n"
                       "FixedParameters: 0 -18 18\n").encode())
        out["ants_affine"] = buf.getvalue()
    return out


def _landmark_seeds(kind: str) -> dict[str, bytes]:
    """Four points as 3D Slicer (markups JSON, a Slicer 5 .fcsv with its status columns, the control
    point table) and a spreadsheet (semicolons, decimal commas) write them, one of them not placed."""
    points = [(10.5, -20.0, 30.0), (50.0, 0.0, 25.0), (-5.0, 40.0, 10.0), (0.0, 0.0, -30.0)]
    if kind == "mrk-json":
        import json

        marks = [{"label": f"F-{i}", "position": list(p), "positionStatus": "undefined" if i == 2 else "defined"}
                 for i, p in enumerate(points)]
        return {"markups": json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                                                    "controlPoints": marks}]}).encode()}
    if kind == "fcsv":
        rows = "".join(f"{i},{x},{y},{z},0,0,0,1,1,1,0,F-{i},,,{0 if i == 2 else 2},0\n" for i, (x, y, z) in enumerate(points))
        return {"slicer5": ("# Markups fiducial file version = 5.2\n# CoordinateSystem = LPS\n"
                            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" + rows).encode()}
    table = "label,l,p,s,defined,selected,visible,locked,description\n" + "".join(
        f"F-{i},{x},{y},{z},{0 if i == 2 else 1},1,1,0,\n" for i, (x, y, z) in enumerate(points))
    sheet = "label;R;A;S\n" + "".join(f"p{i};{x};{y};{z}\n".replace(".", ",") for i, (x, y, z) in enumerate(points))
    return {"control_points": table.encode(), "spreadsheet": sheet.encode()}


def all_seeds() -> dict[str, bytes]:
    """Seeds of every reader for ``all``: one leading byte picks the reader."""
    return {f"{i}_{name}": bytes([i]) + blob for i, kind in enumerate(SUFFIX) for name, blob in seeds(kind).items()}


def target(kind: str):
    kinds = list(SUFFIX)

    def one_input(data: bytes) -> None:
        k = kind
        if kind == "all":
            if not data:
                return
            k, data = kinds[data[0] % len(kinds)], data[1:]
        path = _WORK / f"medfuse-fuzz-{os.getpid()}{SUFFIX[k]}"  # a file, removed after each input
        pair = path.with_suffix(".img") if k == "analyze" else None
        if pair is not None:  # the first 348 bytes are the header, the rest the voxels
            path.write_bytes(data[:348])
            pair.write_bytes(data[348:])
        else:
            path.write_bytes(data)
        _SCANS.clear()  # DICOM headers are kept by file name, size and time: each input is new
        try:
            READERS.get(k, read_image)(path)
        except MedfuseError:
            pass
        finally:
            path.unlink(missing_ok=True)
            if pair is not None:
                pair.unlink(missing_ok=True)

    return one_input


def main() -> None:
    args = sys.argv[1:]
    write_seeds = "--seeds" in args
    args = [a for a in args if a != "--seeds"]
    if not args or args[0] not in (*SUFFIX, "all"):
        sys.exit(f"usage: fuzz_readers.py [--seeds] {{{','.join(SUFFIX)},all}} [CORPUS_DIR] [libFuzzer options]")
    kind = args.pop(0)
    if write_seeds:
        corpus = Path(args[0])
        corpus.mkdir(parents=True, exist_ok=True)
        for name, blob in (all_seeds() if kind == "all" else seeds(kind)).items():
            (corpus / name).write_bytes(blob)
        return
    if args and Path(args[0]).is_dir() and not any(a.startswith("-artifact_prefix=") for a in args):
        found = Path(f"{Path(args[0]).resolve()}-artifacts")
        found.mkdir(exist_ok=True)
        args.append(f"-artifact_prefix={found}/")  # not the working directory, which may be a clone
    atheris.Setup([sys.argv[0], *args], target(kind))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
