"""No patient identity leaks into any output by default: DICOM inputs whose identifying attributes
are marker strings go through every command, and every byte written or printed is searched."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import pydicom
from conftest import EXAMPLES, shared_path

MARKERS = {"PatientName": "MARKERNAME^SECRET", "PatientID": "MARKERID12345", "PatientBirthDate": "19010203",
           "OtherPatientIDs": "MARKEROTHERID", "PatientAddress": "MARKERSTREET 1"}
NEEDLES = [b"MARKERNAME", b"SECRET", b"MARKERID12345", b"19010203", b"MARKEROTHERID", b"MARKERSTREET"]


def _mark(ds: pydicom.Dataset, folder: Path, name: str) -> None:
    for key, value in MARKERS.items():
        setattr(ds, key, value)
    ds.save_as(folder / name)


def _marked_series(tmp_path: Path) -> tuple[Path, Path]:
    mr, ct = tmp_path / "case1" / "mr", tmp_path / "case1" / "ct"
    mr.mkdir(parents=True)
    ct.mkdir()
    with zipfile.ZipFile(EXAMPLES / "dicom" / "mr_t1_xa30.zip") as zf:
        for n in sorted(n for n in zf.namelist() if not n.endswith("/")):
            _mark(pydicom.dcmread(io.BytesIO(zf.read(n))), mr, Path(n).name)
    for f in sorted(shared_path("dicom", "ct_ge_hispeed_head_tilt", "dicom").iterdir()):
        if f.is_file():
            _mark(pydicom.dcmread(f), ct, f.name)
    return mr, ct


def _contents(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw + (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else b"")


def _leaks(blob: bytes) -> list[str]:
    return [n.decode() for n in NEEDLES if n in blob]


def test_no_identity_in_any_output(tmp_path, cli):
    mr, ct = _marked_series(tmp_path / "in")
    out = tmp_path / "out"  # registration kept short: identity does not depend on it
    runs = [
        cli("fuse", mr, ct, "-o", out / "fused.nii.gz", "--figure", out / "fused_figure.png", "--verbose",
            "--transform", "none", "--no-metrics"),  # batch and eval below write the metrics
        cli("fuse", mr, ct, "-o", out / "fused_series", "--anonymize", "--transform", "none", "--verbose",
            "--no-metrics"),
        cli("register", mr, ct, "-o", out / "ct_on_mr.nii.gz", "--save-transform", out / "ct_on_mr.tfm",
            "--transform", "none"),
        cli("eval", "--fixed", mr, "--moving", out / "ct_on_mr.nii.gz", out / "fused.nii.gz",
            "--json", out / "eval.json", "--csv", out / "eval.csv"),
        cli("batch", tmp_path / "in", "-o", out / "batch", "--engine", "sequential", "--figures", "--verbose",
            "--transform", "none"),
        cli("info", out / "fused_series"),
    ]
    for res in runs:
        assert res.exit_code == 0, res.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".gz", ".json", ".png", ".csv", ".tfm", ".dcm"} <= kinds, kinds
    assert len([p for p in files if p.suffix == ".dcm"]) > 50  # the anonymised series
    for p in files:
        assert not _leaks(_contents(p)) and not _leaks(str(p.relative_to(tmp_path)).encode()), p
    printed = "".join(r.stdout + r.stderr for r in runs).encode()
    assert not _leaks(printed)
    # the positive control: the markers are live, and a DICOM series for PACS keeps the identity
    assert cli("fuse", mr, ct, "-o", tmp_path / "for_pacs", "--transform", "none", "--no-metrics").exit_code == 0
    first = min((tmp_path / "for_pacs").iterdir())
    assert str(pydicom.dcmread(first).PatientName) == MARKERS["PatientName"]
