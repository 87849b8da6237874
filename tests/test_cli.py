"""The command line: help, version, exit codes, one-line errors, no partial output, no PHI."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import (
    EXAMPLES,
    assert_one_line_error,
    padded_lines,
    shared_path,
    write_localizer,
)

from medfuse_cli import __version__, read_image

MR_ZIP = EXAMPLES / "dicom" / "mr_t1_xa30.zip"
T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"


def test_version_and_help(cli):
    assert cli("--version").stdout.strip() == f"medfuse {__version__}"
    for command in ("convert", "info"):
        res = cli(command, "--help")
        assert res.exit_code == 0 and "--debug" in res.stdout and "--series" in res.stdout
    top = cli("--help")
    assert "Exit codes" in top.stdout and "convert" in top.stdout and "info" in top.stdout
    # arguments are named as the help texts and README name them (FIXED, MOVING...), not fixed, moving
    for command, names in (("fuse", ("FIXED", "MOVING")), ("register", ("FIXED", "MOVING")), ("convert", ("INPUT",)),
                           ("info", ("INPUT",)), ("eval", ("FUSED",)), ("batch", ("IN",))):
        panel = cli(command, "--help").stdout.split("Arguments")[1].split("Options")[0].split()
        assert all(name in panel and name.lower() not in panel for name in names), command
    assert "Missing argument 'FIXED'" in cli("fuse").stderr


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "medfuse_cli", "--version"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and __version__ in res.stdout


def test_convert_example_dicom_zip(tmp_path, cli):
    out = tmp_path / "sub" / "mr.nii.gz"
    res = cli("convert", MR_ZIP, "-o", out)
    assert res.exit_code == 0, res.stderr
    img = nib.load(out)
    assert img.shape == (128, 128, 96) and img.get_data_dtype() == np.int16
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    # NIfTI stores float32: a DICOM-derived affine survives to float32 precision
    np.testing.assert_allclose(img.affine, read_image(MR_ZIP).affine, rtol=0, atol=2e-5)
    assert_one_line_error(cli("convert", MR_ZIP, "-o", out), 6)  # exists
    assert cli("convert", MR_ZIP, "-o", out, "--overwrite").exit_code == 0
    assert [p.name for p in out.parent.iterdir()] == ["mr.nii.gz"]  # no temporary files left


def test_bad_inputs_give_one_line_and_no_output(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.nii.gz"
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not an image\n" * 30)
    fake_png = tmp_path / "fake.png"
    fake_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    only_text = tmp_path / "textdir"
    only_text.mkdir()
    (only_text / "a.txt").write_text("hello")
    cases = [
        ((tmp_path / "missing.nii.gz",), 3),
        ((empty,), 4),
        ((junk,), 4),
        ((fake_png,), 4),
        ((only_text,), 4),
    ]
    for (src,), code in cases:
        assert_one_line_error(cli("convert", src, "-o", out), code)
        assert not out.exists()
    assert_one_line_error(cli("convert", T1, "-o", tmp_path / "x.png"), 5)
    assert_one_line_error(cli("convert", T1, "-o", tmp_path / "x.mhd"), 6)  # two-file MetaImage: not written
    for name, why in (("x.jpg", ".jpg is read, never written"), ("x.hdr", ".hdr is read, never written"),
                      ("x.xyz", "unknown output format")):
        res = cli("convert", T1, "-o", tmp_path / name)
        assert_one_line_error(res, 6)
        assert why in res.stderr
    assert_one_line_error(cli("convert", T1, "-o", junk / "inside_a_file.nii.gz"), 6)
    assert_one_line_error(cli("convert", T1, "-o", tmp_path), 6)
    res = cli("convert", T1, "-o", "-")  # was written as a DICOM series in a folder named "-"
    assert_one_line_error(res, 6)
    assert "an image cannot go to standard output" in res.stderr
    assert_one_line_error(cli("convert", T1, "-o", tmp_path / "s.nii.gz", "--suv"), 4)
    assert_one_line_error(cli("info", tmp_path / "missing"), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fake.png", "notes.txt", "textdir"]


def test_result_folders_named_dash_are_refused(tmp_path, monkeypatch, cli):
    """`batch -o -` and `train --out -` made a folder named "-" (standard output for reports and
    tables): refused, exit 6, nothing written."""
    monkeypatch.chdir(tmp_path)
    pet = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    (tmp_path / "m.csv").write_text(f"id,fixed,moving\nspm,{T1},{pet}\n")
    for args in (("batch", "m.csv", "-o", "-", "--engine", "sequential"),
                 ("train", "--model", "adafuse", "--data", tmp_path, "--out", "-", "--steps", "1")):
        res = cli(*args)
        assert_one_line_error(res, 6)
        assert "cannot go to standard output" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_two_outputs_of_one_command_may_not_be_one_file(tmp_path, cli):
    """Even with --overwrite, the second output written would replace the first (the fused image
    by its report): refused before any work, nothing written, the earlier file kept."""
    pet = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    kept = tmp_path / "kept.nii.gz"
    kept.write_bytes(b"an earlier result")
    for args in (("fuse", T1, pet, "-o", kept, "--report", kept),
                 ("fuse", T1, pet, "-o", kept, "--figure", tmp_path / "kept.json"),  # the default report's name
                 ("fuse", T1, pet, "-o", tmp_path / "series", "--report", tmp_path / "series" / "r.json"),
                 ("register", T1, pet, "-o", kept, "--save-transform", kept),
                 ("eval", "--fixed", T1, "--moving", pet, pet, "--json", kept, "--csv", tmp_path / "." / kept.name)):
        assert_one_line_error(cli(*args, "--overwrite"), 6)
        assert kept.read_bytes() == b"an earlier result"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.nii.gz"]


def test_debug_shows_the_traceback(tmp_path, cli):
    res = cli("convert", tmp_path / "missing.nii", "-o", tmp_path / "o.nii", "--debug")
    assert res.exit_code == 3 and "Traceback" in res.stderr


def test_info_reports_geometry(cli):
    res = cli("info", T1, "--json")
    assert res.exit_code == 0
    (item,) = json.loads(res.stdout)
    assert item["shape"] == [91, 109, 91] and item["orientation"] == "LAS"
    assert item["spacing_mm"] == [2.0, 2.0, 2.0] and item["modality"] == "MR"
    table = cli("info", MR_ZIP)
    assert table.exit_code == 0 and "anat-T1w_acq-tfl" in table.stdout and "PIR" in table.stdout
    assert not padded_lines(table.stdout)


def test_info_lists_a_study_whose_localizer_is_no_volume(tmp_path, cli):
    """A study folder with a localizer (three planes in one series) beside the MR series: info lists
    both, the localizer with the reason it is not one volume, instead of failing the whole listing."""
    import zipfile

    zipfile.ZipFile(MR_ZIP).extractall(tmp_path / "study")
    scout = write_localizer(tmp_path / "study")
    res = cli("info", tmp_path / "study", "--json")
    assert res.exit_code == 0, res.stderr
    items = {item["series_uid"]: item for item in json.loads(res.stdout)}
    assert len(items) == 2 and "different orientations" in items[scout]["error"]
    assert items[scout]["notes"][0] == "a localizer (scout) series"
    (mr,) = (item for uid, item in items.items() if uid != scout)
    assert mr["shape"] == list(read_image(MR_ZIP).shape) and "error" not in mr
    assert cli("info", tmp_path / "study").exit_code == 0  # the table too
    # the study as FIXED needs no --fixed-series: a localizer is never the series to fuse
    res = cli("convert", tmp_path / "study", "-o", tmp_path / "mr.nii.gz")
    assert res.exit_code == 0, res.stderr
    assert nib.load(tmp_path / "mr.nii.gz").shape == read_image(MR_ZIP).shape


def test_no_patient_identifiers_in_outputs(tmp_path, cli):
    src = shared_path("dicom", "pt_ge_discoveryst_fdg_sts001", "dicom")
    marked = tmp_path / "marked"
    marked.mkdir()
    for f in sorted(src.glob("*.dcm"))[:40]:
        ds = pydicom.dcmread(f)
        ds.PatientName = "MARKERNAME^SECRET"
        ds.PatientID = "MARKERID12345"
        ds.PatientBirthDate = "19010203"
        ds.save_as(marked / f.name)
    out = tmp_path / "pet.nii.gz"
    res_convert = cli("convert", marked, "-o", out, "--verbose", "--suv")
    res_info = cli("info", marked, "--json")
    res_table = cli("info", marked)
    assert res_convert.exit_code == res_info.exit_code == res_table.exit_code == 0
    text = "".join(r.stdout + r.stderr for r in (res_convert, res_info, res_table))
    raw = gzip.decompress(out.read_bytes())
    assert read_image(out).data.max() < 100  # SUV, not Bq/ml
    for marker in ("MARKERNAME", "SECRET", "MARKERID12345", "19010203"):
        assert marker not in text and marker.encode() not in raw


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder(tmp_path, cli):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert_one_line_error(cli("convert", T1, "-o", ro / "x.nii.gz"), 6)


def test_verbose_shows_library_warnings_not_their_debug_log(cli):
    """pydicom logs every element it reads at DEBUG; --verbose must not flood stderr with it."""
    res = cli("info", MR_ZIP, "--verbose")
    assert res.exit_code == 0, res.stderr
    assert len(res.stderr.splitlines()) < 50, res.stderr[:500]


def test_a_terminal_sees_each_stage_and_the_slices_done(tmp_path, cli, monkeypatch):
    """On a terminal (forced here) fuse shows its stages and a network's slice count; --quiet shows none."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    t1, pet = T1, EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    res = cli("fuse", t1, pet, "-o", tmp_path / "a.nii.gz", "--method", "adafuse", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", res.stderr)
    assert "reading" in shown and "fusing (adafuse)" in shown and re.search(r" [1-9][0-9]*/91 ", shown)
    res = cli("fuse", t1, pet, "-o", tmp_path / "b.nii.gz", "--method", "adafuse", "--no-metrics", "--quiet")
    assert res.exit_code == 0 and "fusing" not in res.stderr


def test_missing_output_folders_are_created_only_for_a_result(tmp_path, cli):
    """`fuse` creates the missing folders of -o, --report and --figure when it writes them; a run that
    fails (a pair that does not overlap: exit 5, after reading; too little memory: exit 10) creates none."""
    pet = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    made = [tmp_path / "a" / "b" / "fused.nii.gz", tmp_path / "r" / "rep.json", tmp_path / "f" / "fig.png"]
    res = cli("fuse", T1, pet, "-o", made[0], "--report", made[1], "--figure", made[2], "--method", "mean",
              "--no-metrics", "-q")
    assert res.exit_code == 0, res.stderr
    assert all(p.is_file() for p in made)
    img = nib.load(pet)
    far = img.affine.copy()
    far[:3, 3] += 5000.0  # 5 m away from the T1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), tmp_path / "far_pet.nii.gz")
    for moving, extra, code in ((tmp_path / "far_pet.nii.gz", (), 5), (pet, ("--max-memory", "260M"), 10)):
        res = cli("fuse", T1, moving, "-o", tmp_path / "c" / "fused.nii.gz", "--report", tmp_path / "e" / "rep.json",
                  "--figure", tmp_path / "g" / "fig.png", "--method", "mean", *extra)
        assert_one_line_error(res, code)
        assert not [p for p in ("c", "e", "g") if (tmp_path / p).exists()]


def test_ctrl_c_stops_a_long_itk_call_at_once():
    """Python takes Ctrl-C / SIGTERM between its own bytecodes only: during a long ITK call (a
    registration that looped, found with a MOVING slice 2 pixels wide) the command could not be
    stopped short of SIGKILL. ITK's calls now run in a helper thread while the main one waits."""
    script = """
import os, signal, threading
import SimpleITK as sitk
from medfuse_cli.parallel import interruptible, itk_threads
t1 = sitk.ReadImage(r"%s", sitk.sitkFloat32)
done = []
def slow():
    with itk_threads(1):
        sitk.CurvatureAnisotropicDiffusion(t1, 0.0625, 3.0, 1, 15)  # several seconds
    done.append(1)
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    interruptible(slow)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted, ITK done:", bool(done))
""" % (EXAMPLES / "spm12" / "OldNorm_T1.nii.gz")
    res = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "interrupted, ITK done: False", res.stdout + res.stderr
