"""`medfuse fuse` / `register` end to end on real images."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import fields

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    EXAMPLES,
    assert_one_line_error,
    shared_path,
    with_file_size_limit,
    write_fcsv,
)
from scipy.spatial.transform import Rotation

from medfuse_cli import read_image, write_image
from medfuse_cli.fusion import CLASSIC_RULES
from medfuse_cli.pipeline import FuseOptions, fuse_pair
from medfuse_cli.register import register

T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"


def _misaligned(path, tmp_path, angles=(8, -6, 5), shift=(7, -5, 8)):
    """The volume with its header moved by a known rigid transform R (RAS)."""
    image = read_image(path)
    rigid = np.eye(4)
    rigid[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    rigid[:3, 3] = shift
    image.affine = rigid @ image.affine
    image.nifti_geometry = None
    out = tmp_path / f"moved_{path.name}"
    write_image(image, out)
    return out, rigid


def _tre(fixed, transform, rigid) -> float:
    """Mean target registration error (mm) over brain voxels of FIXED."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    pts = np.argwhere(fixed.data > 0.3 * fixed.data.max())[::10]
    world = lps @ fixed.affine @ np.c_[pts, np.ones(len(pts))].T
    true = (lps @ rigid @ lps @ world)[:3].T
    est = np.array([transform.TransformPoint(tuple(p)) for p in world[:3].T])
    return float(np.linalg.norm(est - true, axis=1).mean())


def test_a_frame_of_a_4d_input_is_fused_registered_and_batched(tmp_path, cli):
    """fuse, register and batch take --frame / --mean-frames for a 4D input (a dynamic PET): before, they
    refused it with advice to use those options, which they did not have. eval points to convert."""
    pet = nib.load(PET)
    data = np.asarray(pet.dataobj, dtype=np.float32)
    frames = [data, data[::-1], np.roll(data, 9, axis=1)]  # three frames that fuse differently
    dynamic = tmp_path / "in" / "dyn_pet.nii.gz"
    dynamic.parent.mkdir()
    nib.save(nib.Nifti1Image(np.stack(frames, axis=-1), pet.affine), dynamic)
    for name, volume in (("f1", frames[1]), ("mean", np.mean(frames, axis=0, dtype=np.float32))):
        nib.save(nib.Nifti1Image(volume, pet.affine), tmp_path / f"{name}_pet.nii.gz")
    fused = {}
    for name, args in (("f1", ["--frame", "1"]), ("mean", ["--mean-frames"])):
        for src in (dynamic, tmp_path / f"{name}_pet.nii.gz"):
            out = tmp_path / f"{name}_{src.name}"
            res = cli("fuse", T1, src, "-o", out, "-m", "mean", "--no-metrics", *args)
            assert res.exit_code == 0, res.stderr
            fused[out.name] = np.asarray(nib.load(out).dataobj)
        np.testing.assert_array_equal(fused[f"{name}_dyn_pet.nii.gz"], fused[f"{name}_{name}_pet.nii.gz"])
    assert not np.array_equal(fused["f1_dyn_pet.nii.gz"], fused["mean_dyn_pet.nii.gz"])
    report = json.loads((tmp_path / "f1_dyn_pet.json").read_text())
    assert report["parameters"]["frame"] == 1 and report["inputs"]["moving"]["notes"] == ["4D, 3 frames: frame 1 (0-based)"]
    res = cli("fuse", T1, dynamic, "-o", tmp_path / "none.nii.gz")
    assert res.exit_code == 2 and "--frame N (0..2)" in res.stderr and not (tmp_path / "none.nii.gz").exists()
    assert cli("fuse", T1, dynamic, "-o", tmp_path / "x.nii.gz", "--frame", "3").exit_code == 5
    res = cli("register", T1, dynamic, "-o", tmp_path / "reg.nii.gz", "--frame", "1", "--report", tmp_path / "reg.json")
    assert res.exit_code == 0, res.stderr
    np.testing.assert_allclose(nib.load(tmp_path / "reg.nii.gz").get_fdata(), frames[1], rtol=1e-6)
    assert json.loads((tmp_path / "reg.json").read_text())["parameters"]["frame"] == 1
    shutil.copy(T1, tmp_path / "in" / "dyn_mri.nii.gz")
    res = cli("batch", tmp_path / "in", "-o", tmp_path / "batch", "--engine", "sequential", "--frame", "1",
              "-m", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "batch" / "dyn.nii.gz").dataobj),
                                  fused["f1_dyn_pet.nii.gz"])
    res = cli("eval", "--fixed", T1, "--moving", dynamic, tmp_path / "f1_dyn_pet.nii.gz")
    assert res.exit_code == 2 and "medfuse convert" in res.stderr


def test_a_volume_for_a_slice_format_is_refused_before_the_work(tmp_path, cli, monkeypatch):
    """A volume pair written as PNG / TIFF is refused once FIXED is read, before registration and fusion
    (before: after them, 30 s into a DICOM pair), and so is a DICOM series on a PNG slice's grid."""
    from medfuse_cli import pipeline

    def never(*args, **kwargs):
        raise AssertionError("registered before the output's format was checked")

    monkeypatch.setattr(pipeline, "register", never)
    for name in ("fused.png", "fused.tif"):
        res = cli("fuse", T1, PET, "-o", tmp_path / "out" / name, "-t", "rigid")
        assert res.exit_code == 5 and "a 91x109x91 volume cannot be written as" in res.stderr, res.stderr
        res = cli("register", T1, PET, "-o", tmp_path / "out" / name, "-t", "rigid")
        assert res.exit_code == 5 and "a 91x109x91 volume cannot be written as" in res.stderr, res.stderr
    folder = shared_path("harvard", "mri-ct")
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", tmp_path / "out" / "series", "-t", "rigid")
    assert res.exit_code == 6 and "needs a place in space" in res.stderr
    res = cli("convert", folder / "02004_mri.png", "-o", tmp_path / "out" / "series")
    assert res.exit_code == 6 and "needs a place in space" in res.stderr
    assert not (tmp_path / "out").exists()
    # the grid decides, not the written image's source: a PNG registered onto a NIfTI slice is a series
    monkeypatch.undo()
    assert cli("convert", folder / "02004_mri.png", "-o", tmp_path / "mri.nii.gz").exit_code == 0
    res = cli("register", tmp_path / "mri.nii.gz", folder / "02004_ct.png", "-o", tmp_path / "reg", "-t", "none")
    assert res.exit_code == 0, res.stderr
    assert read_image(tmp_path / "reg").shape == (256, 256, 1) and len(list((tmp_path / "reg").glob("*.dcm"))) == 1


def test_window_options_say_when_the_method_does_not_use_them(tmp_path, cli):
    """--patch / --overlap only shape dcfb3d's sliding window: another method says it ignores them.
    --device likewise chooses where the networks run: a classic rule asked for cuda said nothing."""
    for name, args in (("set", ["--patch", "16"]), ("overlap", ["--overlap", "0.5"]), ("default", []),
                       ("cuda", ["--device", "cuda"])):
        res = cli("fuse", T1, PET, "-o", tmp_path / f"{name}.nii.gz", "-m", "mean", "--no-metrics", *args)
        assert res.exit_code == 0, res.stderr
        warnings = json.loads((tmp_path / f"{name}.json").read_text())["warnings"]
        assert bool([w for w in warnings if w.startswith("--patch and --overlap")]) == (name in ("set", "overlap"))
        assert bool([w for w in warnings if w.startswith("--device cuda runs the networks")]) == (name == "cuda")


def test_ct_window_takes_an_unnamed_moving_as_ct_and_says_when_unused(tmp_path, cli):
    """--ct-window makes a MOVING of unknown modality a CT (not the PET assumed without it), and warns
    when neither input is a CT, where it would otherwise be silently ignored."""
    res = cli("fuse", T1, PET, "-o", tmp_path / "pet.nii.gz", "--ct-window", "brain", "-m", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "pet.json").read_text())
    assert [w for w in report["warnings"] if w.startswith("--ct-window windows a CT") and "not used" in w]
    assert report["normalisation"]["moving"]["rule"].startswith("percentiles")
    ct = tmp_path / "scan.nii.gz"  # a real CT whose name says nothing of its modality
    ct.write_bytes(shared_path("volumes", "clinical_ct_mni_2mm", "scct.nii.gz").read_bytes())
    for window, modality in ((None, "PT"), ("40,400", "CT")):
        out = tmp_path / f"ct_{modality}.nii.gz"
        res = cli("fuse", T1, ct, "-o", out, "-m", "mean", "--no-metrics", *(["--ct-window", window] if window else []))
        assert res.exit_code == 0, res.stderr
        report = json.loads((tmp_path / f"ct_{modality}.json").read_text())
        assert report["inputs"]["moving"]["modality"] == modality
        assert report["inputs"]["moving"]["modality_source"] == "assumed"
        assert not [w for w in report["warnings"] if "not used" in w]
    assert [w for w in report["warnings"] if "assumed CT (--ct-window given)" in w]
    assert (report["normalisation"]["moving"]["lo"], report["normalisation"]["moving"]["hi"]) == (-160.0, 240.0)


@pytest.mark.parametrize("method", list(CLASSIC_RULES))
def test_example_fusion_keeps_fixed_geometry(method, tmp_path, cli):
    out = tmp_path / f"{method}.nii.gz"
    res = cli("fuse", T1, PET, "-o", out, "--method", method, "--no-metrics")  # report metrics: test_eval
    assert res.exit_code == 0, res.stderr
    fused, fixed = nib.load(out), nib.load(T1)
    assert fused.shape == fixed.shape
    np.testing.assert_array_equal(fused.affine, fixed.affine)
    np.testing.assert_array_equal(fused.header.get_sform(), fixed.header.get_sform())
    np.testing.assert_array_equal(fused.header.get_qform(), fixed.header.get_qform())
    report = json.loads((tmp_path / f"{method}.json").read_text())
    assert report["parameters"]["method"] == method and report["registration"]["skipped"]
    data = fused.get_fdata()
    assert np.isfinite(data).all() and data.std() > 0
    # the fused image keeps structure of both sources
    t1, pet = read_image(T1).data.ravel(), read_image(PET).data.ravel()
    assert np.corrcoef(data.ravel(), t1)[0, 1] > 0.5 and np.corrcoef(data.ravel(), pet)[0, 1] > 0.5


def test_rigid_registration_recovers_a_known_misalignment(tmp_path):
    fixed = read_image(T1)
    moved_path, rigid = _misaligned(shared_path("volumes", "spm12_mni_2mm", "OldNorm_T2.nii.gz"), tmp_path)
    reg = register(fixed, read_image(moved_path), "rigid")
    assert reg.mi_after > reg.mi_before
    assert _tre(fixed, reg.transform, rigid) < 1.0  # half a 2 mm voxel
    assert abs(reg.summary()["rotation_deg"] - 11.4) < 1.0 and reg.warnings == []  # (8, -6, 5) degrees: 11.4


def _mask_centroid_lps(path) -> np.ndarray:
    image = read_image(path)
    idx = np.argwhere(image.data > 0)
    return (image.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].mean(1) * [-1, -1, 1]


@pytest.mark.parametrize("fixed_name, moving_name, tolerance", [("MR_T1", "CT", 4.0), ("CT", "PET", 10.0)])
def test_registration_keeps_scans_that_share_a_frame_of_reference(fixed_name, moving_name, tolerance):
    """The IBSI patient's MR, CT and PET are cropped differently but share one world space (their
    tumour masks' centroids agree to 0.2 mm). Starting only from the centres of mass, registration
    moved them 44 and 86 mm apart; the headers' start keeps them within a few mm (PET voxels: 5.5 mm)."""
    folder = shared_path("volumes", "ibsi_sts002_ct_mr_pet")
    reg = register(read_image(folder / f"{fixed_name}_image.nii.gz"), read_image(folder / f"{moving_name}_image.nii.gz"))
    tumour = reg.transform.TransformPoint(tuple(_mask_centroid_lps(folder / f"{fixed_name}_mask.nii.gz")))
    assert np.linalg.norm(np.array(tumour) - _mask_centroid_lps(folder / f"{moving_name}_mask.nii.gz")) < tolerance
    summary = reg.summary()
    assert summary["start"] == "header" and summary["starts_mattes_mi_coarse"]["header"] > summary["starts_mattes_mi_coarse"]["moments"]


def test_registration_metric_sees_fixed_no_finer_than_half_of_moving():
    """A 0.39 mm MR against a 4.7 mm PET: the metric's FIXED is smoothed onto a 2.34 mm grid over the
    same world box (40x fewer voxels); a 2 mm pair keeps its grid."""
    from medfuse_cli.register import _no_finer_than, to_sitk

    mr = to_sitk(read_image(shared_path("volumes", "tcia_sts001_mr_t1", "STS_001_MR_T1_AXIAL_SE.nii.gz")))
    coarse = _no_finer_than(mr, 4.6875 / 2)
    np.testing.assert_allclose(coarse.GetSpacing(), (2.34375, 2.34375, mr.GetSpacing()[2]))
    assert coarse.GetSize() == (85, 85, 40) and mr.GetSize() == (512, 512, 40)
    assert coarse.GetOrigin() == mr.GetOrigin() and coarse.GetDirection() == mr.GetDirection()
    t1 = to_sitk(read_image(T1))
    assert _no_finer_than(t1, 1.0) is t1


def test_a_large_rotation_is_reported(tmp_path):
    """Found rotations above 20 degrees are reported as suspect (here a real one of 35)."""
    moved_path, _ = _misaligned(shared_path("volumes", "spm12_mni_2mm", "OldNorm_T2.nii.gz"), tmp_path, (35, 0, 0), (0, 0, 0))
    reg = register(read_image(T1), read_image(moved_path), "rigid")
    assert abs(reg.summary()["rotation_deg"] - 35) < 2
    assert any("rotated MOVING by 35 degrees" in w and "--transform none" in w for w in reg.warnings)


def test_fusion_with_registration_is_deterministic(tmp_path, cli):
    moved, _ = _misaligned(PET, tmp_path)
    outs = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for out in outs:
        assert cli("fuse", T1, moved, "-o", out, "--transform", "affine").exit_code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["registration"]["mattes_mi_after"] > report["registration"]["mattes_mi_before"]
    assert nib.load(outs[0]).shape == (91, 109, 91)


def test_register_command_writes_moving_on_fixed_grid(tmp_path, cli):
    moved, _ = _misaligned(PET, tmp_path)
    out, tfm, rep = tmp_path / "reg.nii.gz", tmp_path / "t.tfm", tmp_path / "reg_report.json"
    res = cli("register", T1, moved, "-o", out, "--save-transform", tfm, "--report", rep)
    assert res.exit_code == 0, res.stderr
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(T1).affine)
    assert "Euler3DTransform" in tfm.read_text()
    assert "rigid registration, Mattes MI" in res.stdout and "rotation 11." in res.stdout  # (8, -6, 5) degrees
    # the report (register had none): what fuse's says of the registration, the inputs and the timings
    report = json.loads(rep.read_text())
    assert report["output"] == "reg.nii.gz" and report["parameters"]["transform"] == "auto"
    assert report["registration"]["kind"] == "rigid" and 11 < report["registration"]["rotation_deg"] < 12
    assert report["inputs"]["moving"]["shape"] == list(read_image(moved).data.shape)
    assert report["timings"]["register_s"] > 0 and isinstance(report["warnings"], list)
    # registered PET agrees with the original, aligned PET
    assert np.corrcoef(nib.load(out).get_fdata().ravel(), read_image(PET).data.ravel())[0, 1] > 0.97
    # the saved transform, applied as it is, gives the same resampled PET
    again = tmp_path / "again.nii.gz"
    res = cli("register", T1, moved, "-o", again, "--transform", "none", "--initial-transform", tfm, "--report", "-")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["registration"]["start"] == "--initial-transform"  # the report, not the line
    np.testing.assert_allclose(nib.load(again).get_fdata(), nib.load(out).get_fdata(), atol=1e-3)
    res = cli("register", T1, moved, "-o", tmp_path / "x.nii.gz", "--report", tmp_path / "x.nii.gz")
    assert_one_line_error(res, 6)
    # the format follows the suffix; one ITK cannot write (an internal error after the registration)
    # or read back (no suffix) is refused before any work
    h5 = tmp_path / "t.h5"
    assert cli("register", T1, moved, "-o", tmp_path / "h5.nii.gz", "--save-transform", h5).exit_code == 0
    assert h5.read_bytes().startswith(b"\x89HDF")
    # an upper-case suffix (T.MAT): written, and read back although ITK knows only lower-case ones
    mat = tmp_path / "T.MAT"
    assert cli("register", T1, moved, "-o", tmp_path / "mat.nii.gz", "--save-transform", mat).exit_code == 0
    res = cli("register", T1, moved, "-o", tmp_path / "again_mat.nii.gz", "--transform", "none", "--initial-transform", mat)
    assert res.exit_code == 0, res.stderr
    np.testing.assert_allclose(nib.load(tmp_path / "again_mat.nii.gz").get_fdata(), nib.load(out).get_fdata(), atol=1e-3)
    for name in ("t.json", "t"):
        res = cli("register", T1, moved, "-o", tmp_path / "x.nii.gz", "--save-transform", tmp_path / name)
        assert_one_line_error(res, 6)
        assert "name it .tfm, .txt, .h5, .hdf5 or .mat" in res.stderr
        assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / name).exists()


def test_scans_in_different_frames_register_from_an_initial_transform(tmp_path, cli):
    """The IBSI CT with its header moved 800 mm along the table (as a scan from another session
    would be): refused as not overlapping on its own, registered onto the MR (tumour centroids
    within 4 mm) from a rough initial translation 790 mm in a .tfm file."""
    import SimpleITK as sitk

    folder = shared_path("volumes", "ibsi_sts002_ct_mr_pet")
    ct = read_image(folder / "CT_image.nii.gz")
    ct.affine = ct.affine.copy()
    ct.affine[2, 3] += 800.0
    ct.nifti_geometry = None
    far = tmp_path / "ct_far.nii.gz"
    write_image(ct, far)
    mr = folder / "MR_T1_image.nii.gz"
    assert cli("fuse", mr, far, "-o", tmp_path / "refused.nii.gz").exit_code == 5
    rough = sitk.TranslationTransform(3, (0.0, 0.0, 790.0))  # FIXED point -> MOVING point, LPS (z as in RAS)
    tfm = tmp_path / "rough.tfm"
    sitk.WriteTransform(rough, str(tfm))
    out, saved = tmp_path / "ct_on_mr.nii.gz", tmp_path / "found.tfm"
    res = cli("register", mr, far, "-o", out, "--initial-transform", tfm, "--save-transform", saved)
    assert res.exit_code == 0, res.stderr
    found = sitk.ReadTransform(str(saved))
    tumour = np.array(found.TransformPoint(tuple(_mask_centroid_lps(folder / "MR_T1_mask.nii.gz"))))
    assert np.linalg.norm(tumour - _mask_centroid_lps(folder / "CT_mask.nii.gz") - [0, 0, 800]) < 4.0
    res = cli("fuse", mr, far, "-o", tmp_path / "fused.nii.gz", "--initial-transform", tfm, "--no-metrics")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "fused.json").read_text())
    assert report["registration"]["start"] == "--initial-transform"
    assert report["parameters"]["initial_transform"] == str(tfm)


def test_scans_in_different_frames_register_from_landmarks(tmp_path, cli):
    """The IBSI CT with its header turned 15 degrees and moved 800 mm (as a scan from another session
    would be): four landmarks picked on each scan with 2 mm of hand error (a RAS CSV on the MR, a
    Slicer .fcsv in LPS on the CT) start the registration, which ends with the tumours within 4 mm;
    with --transform none the landmark fit is applied as it is."""
    import SimpleITK as sitk

    folder = shared_path("volumes", "ibsi_sts002_ct_mr_pet")
    ct = read_image(folder / "CT_image.nii.gz")
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", (0, 0, 15), degrees=True).as_matrix()
    motion[:3, 3] = (30.0, -20.0, 800.0)
    ct.affine = motion @ ct.affine
    ct.nifti_geometry = None
    far = tmp_path / "ct_far.nii.gz"
    write_image(ct, far)
    mr = folder / "MR_T1_image.nii.gz"
    tumour = _mask_centroid_lps(folder / "MR_T1_mask.nii.gz") * [-1, -1, 1]  # RAS
    fixed = tumour + np.array([[0, 0, 0], [40, 0, 0], [0, 40, 0], [0, 0, 30]])
    moving = (motion @ np.c_[fixed, np.ones(4)].T)[:3].T + np.random.default_rng(0).normal(0, 2, (4, 3))
    on_mr, on_ct = tmp_path / "mr_points.csv", tmp_path / "ct_points.fcsv"
    on_mr.write_text("r,a,s\n" + "".join(f"{x},{y},{z}\n" for x, y, z in fixed))
    write_fcsv(on_ct, moving * [-1, -1, 1])
    truth = (motion @ np.r_[tumour, 1])[:3] * [-1, -1, 1]  # where the tumour is in the moved CT, LPS
    for extra, tolerance in (((), 4.0), (("--transform", "none"), 2.0)):
        saved = tmp_path / "found.tfm"
        res = cli("register", mr, far, "-o", tmp_path / "ct_on_mr.nii.gz", "--landmarks", on_mr, on_ct,
                  "--save-transform", saved, "--overwrite", *extra)
        assert res.exit_code == 0, res.stderr
        assert "landmarks" in res.stdout and "warning" not in res.stderr.lower()
        found = np.array(sitk.ReadTransform(str(saved)).TransformPoint(tuple(tumour * [-1, -1, 1])))
        assert np.linalg.norm(found - truth) < tolerance
    res = cli("fuse", mr, far, "-o", tmp_path / "fused.nii.gz", "--landmarks", on_mr, on_ct, "--no-metrics")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "fused.json").read_text())
    assert report["registration"]["start"] == "--landmarks"
    assert report["parameters"]["landmarks"] == [str(on_mr), str(on_ct)]
    assert set(report["parameters"]) == {f.name for f in fields(FuseOptions)}  # no transform object leaks in
    points = report["registration"]["landmarks"]
    assert points["count"] == 4 and 0.5 < points["fit_rms_mm"] < 5 and points["rms_mm"] < points["fit_rms_mm"] + 5


def test_registration_that_leaves_the_landmarks_is_reported(tmp_path, cli):
    """A landmark placed 25 mm off on the aligned SPM T1 / PET pair: registration finds the true
    alignment, moving the point 25 mm from its partner, and says so, in the report's warnings too
    when --quiet keeps stderr empty."""
    fixed_points, moving_points = tmp_path / "f.csv", tmp_path / "m.csv"
    fixed_points.write_text("r,a,s\n0,0,0\n")
    moving_points.write_text("r,a,s\n0,25,0\n")
    res = cli("fuse", T1, PET, "-o", tmp_path / "f.nii.gz", "--landmarks", fixed_points, moving_points,
              "--no-metrics", "-q")
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == "", res.stderr
    report = json.loads((tmp_path / "f.json").read_text())
    reg = report["registration"]
    assert reg["start"] == "--landmarks" and reg["landmarks"]["fit_rms_mm"] < 1e-6
    assert 20 < reg["landmarks"]["rms_mm"] < 30 and reg["rotation_deg"] < 2
    assert np.linalg.norm(reg["parameters"][3:]) < 3  # the pair is aligned: the translation found is small
    assert any("moved the landmarks" in w and "--transform none" in w for w in reg["warnings"])
    assert report["warnings"] == reg["warnings"]  # every warning of the run, here the registration's only


def test_registration_that_leaves_a_transform_start_is_reported(tmp_path, cli):
    """A .tfm start 25 mm off on the aligned SPM T1 / PET pair: registration finds the true alignment,
    moving FIXED's centre about 25 mm from where the start put it, and says so; a start 3 mm off is
    corrected without a warning."""
    import SimpleITK as sitk

    for offset, warned in ((25.0, True), (3.0, False)):
        tfm = tmp_path / f"off{offset:.0f}.tfm"
        sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, -offset, 0.0)), str(tfm))  # 25 mm anterior
        out = tmp_path / f"off{offset:.0f}.nii.gz"
        res = cli("fuse", T1, PET, "-o", out, "--initial-transform", tfm, "--no-metrics")
        assert res.exit_code == 0, res.stderr
        reg = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())["registration"]
        assert abs(reg["start_shift_mm"] - offset) < 3 and np.linalg.norm(reg["parameters"][3:]) < 3
        assert any("moved FIXED's centre" in w and "--transform none" in w for w in reg["warnings"]) is warned
        assert ("moved FIXED's centre" in res.stderr) is warned


def test_dicom_scans_in_different_frames_of_reference_are_flagged(tmp_path, cli):
    """A brain MR series and a whole-body PET series with different FrameOfReferenceUIDs: the report
    warns that their headers do not relate them; with a start of your own it does not."""
    import SimpleITK as sitk

    pet = shared_path("dicom", "pt_ge_discoveryst_fdg_sts001", "dicom")
    mr = EXAMPLES / "dicom" / "mr_t1_xa30.zip"
    assert read_image(mr).provenance.frame_of_reference_uid != read_image(pet).provenance.frame_of_reference_uid
    res = cli("fuse", mr, pet, "-o", tmp_path / "f.nii.gz", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    warnings = json.loads((tmp_path / "f.json").read_text())["registration"]["warnings"]
    assert any("different frames of reference" in w for w in warnings)
    tfm = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.Euler3DTransform(), str(tfm))
    res = cli("fuse", mr, pet, "-o", tmp_path / "g.nii.gz", "--no-metrics", "--initial-transform", tfm,
              "--transform", "none")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "g.json").read_text())["registration"]["warnings"] == []
    # aligned from the headers alone (--transform none, or one MR slice placed in the PET volume): warned too
    one = tmp_path / "one_slice.dcm"
    with zipfile.ZipFile(mr) as zf:
        one.write_bytes(zf.read(sorted(n for n in zf.namelist() if not n.endswith("/"))[47]))
    for fixed, extra in ((mr, ("--transform", "none")), (one, ())):
        res = cli("fuse", fixed, pet, "-o", tmp_path / "h.nii.gz", "--no-metrics", "--overwrite", "--method", "mean",
                  *extra)
        assert res.exit_code == 0, res.stderr
        warnings = json.loads((tmp_path / "h.json").read_text())["registration"]["warnings"]
        assert any("aligned from the headers alone" in w for w in warnings), fixed


def test_bad_initial_transforms_are_one_line(tmp_path, cli):
    import SimpleITK as sitk

    from medfuse_cli.register import to_sitk

    garbage, scaled = tmp_path / "garbage.tfm", tmp_path / "scaled.tfm"
    garbage.write_text("#Insight Transform File V1.0\nnot a transform\n")
    sitk.WriteTransform(sitk.ScaleTransform(3, (1.1, 1.0, 1.0)), str(scaled))
    out = tmp_path / "o.nii.gz"
    for args, code in (((tmp_path / "missing.tfm",), 3), ((tmp_path,), 4), ((garbage,), 4), ((scaled,), 4)):
        assert_one_line_error(cli("fuse", T1, PET, "-o", out, "--initial-transform", *args), code)
    assert not out.exists()
    # a bare 4x4 matrix, as FSL FLIRT writes it (named .mat, as FLIRT names it): refused with the way to convert it
    flirt = tmp_path / "pet2mri.mat"
    flirt.write_text("1  0  0  2.5  \n0  1  0  0  \n0  0  1  0  \n0  0  0  1  \n")
    res = cli("fuse", T1, PET, "-o", out, "--initial-transform", flirt)
    assert_one_line_error(res, 4)
    assert "bare 4x4 matrix" in res.stderr and "c3d_affine_tool -ref FIXED -src MOVING" in res.stderr
    # a start whose bounding box meets MOVING's but whose voxels, turned 45 degrees, miss it entirely:
    # ITK's "no overlap" is one line with exit 5, not an unexpected error
    centre = to_sitk(read_image(T1)).TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in (91, 109, 91)])
    off = tmp_path / "off.tfm"
    sitk.WriteTransform(sitk.Euler3DTransform(centre, 0.0, 0.0, np.pi / 4, (190.0, 190.0, 0.0)), str(off))
    res = cli("fuse", T1, PET, "-o", out, "--initial-transform", off)
    assert_one_line_error(res, 5)
    assert "no overlap" in res.stderr and not out.exists()
    # a scaling transform is applied as it is with --transform none
    assert cli("register", T1, PET, "-o", out, "--initial-transform", scaled, "--transform", "none").exit_code == 0


@pytest.mark.slow
def test_dicom_ct_onto_nifti_mr(tmp_path, cli):
    ct = shared_path("dicom", "ct_ge_hispeed_head_tilt", "dicom")
    out = tmp_path / "ct_on_mr.nii.gz"
    res = cli("fuse", T1, ct, "-o", out, "--ct-window", "brain", "--figure", tmp_path / "f.png")
    assert res.exit_code == 0, res.stderr
    assert nib.load(out).shape == (91, 109, 91)
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(T1).affine)
    report = json.loads((tmp_path / "ct_on_mr.json").read_text())
    assert report["inputs"]["moving"]["modality"] == "CT" and report["inputs"]["moving"]["modality_source"] == "dicom header"


def test_dicom_ct_onto_nifti_mr_without_registration(tmp_path, cli):
    ct = shared_path("dicom", "ct_ge_hispeed_head_tilt", "dicom")
    for method in CLASSIC_RULES:
        out = tmp_path / f"{method}.nii.gz"
        res = cli("fuse", T1, ct, "-o", out, "--transform", "none", "--method", method, "--ct-window", "brain",
                  "--no-metrics")  # geometry and normalisation are what this checks
        assert res.exit_code == 0, res.stderr
        np.testing.assert_array_equal(nib.load(out).affine, nib.load(T1).affine)
        assert nib.load(out).shape == (91, 109, 91)
    report = json.loads((tmp_path / "wavelet.json").read_text())
    assert not [w for w in report["warnings"] if "Hounsfield" in w]
    assert report["libraries"]["numpy"] == np.__version__ and report["libraries"]["SimpleITK"]
    image = read_image(ct)
    write_image(image.with_data(image.data + 1024), tmp_path / "raw_ct.nii.gz")  # stored values, no intercept
    res = cli("fuse", T1, tmp_path / "raw_ct.nii.gz", "-o", tmp_path / "raw.nii.gz", "--transform", "none",
              "--method", "mean", "--ct-window", "brain", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert [w for w in json.loads((tmp_path / "raw.json").read_text())["warnings"] if "Hounsfield" in w]
    assert report["normalisation"]["moving"]["lo"] == 0.0  # brain window: 40 - 80/2 HU
    assert report["normalisation"]["moving"]["hi"] == 80.0
    assert report["normalisation"]["fixed"]["rule"].startswith("percentiles")


@pytest.mark.parametrize("method", list(CLASSIC_RULES))
def test_harvard_mri_pet_gives_a_colour_png(method, tmp_path):
    folder = shared_path("harvard", "mri-pet")
    out = tmp_path / "fused.png"
    result = fuse_pair(folder / "25015_mri.png", folder / "25015_pet.png", out, FuseOptions(method=method))
    from PIL import Image as PILImage

    png = PILImage.open(out)
    assert png.size == (256, 256) and png.mode == "RGB"
    # the chroma of the PET survives; the MRI's structure is there
    fused_rgb = np.asarray(png).astype(float)
    pet_rgb = np.asarray(PILImage.open(folder / "25015_pet.png").convert("RGB")).astype(float)
    mri = np.asarray(PILImage.open(folder / "25015_mri.png")).astype(float)
    chroma = lambda rgb: rgb[..., 2] - rgb[..., 0]
    assert np.corrcoef(chroma(fused_rgb).ravel(), chroma(pet_rgb).ravel())[0, 1] > 0.8
    y = 0.299 * fused_rgb[..., 0] + 0.587 * fused_rgb[..., 1] + 0.114 * fused_rgb[..., 2]
    assert np.corrcoef(y.ravel(), mri.ravel())[0, 1] > 0.6
    assert result.report["colour"]


def test_the_same_image_twice_is_warned_of(tmp_path, cli):
    """`fuse T1 T1` (a slip for `fuse T1 PET`) fused the MRI with itself without a word."""
    for moving, warned in ((T1, True), (PET, False)):
        stem = moving.name.split(".")[0]
        res = cli("fuse", T1, moving, "-o", tmp_path / f"{stem}.nii.gz", "--method", "mean", "--no-metrics")
        assert res.exit_code == 0, res.stderr
        report = json.loads((tmp_path / f"{stem}.json").read_text())
        assert any("hold the same image" in w for w in report["warnings"]) is warned
        assert ("hold the same image" in " ".join(res.stderr.split())) is warned


def test_bad_pairs(tmp_path, cli):
    mri_png = shared_path("harvard", "mri-pet", "25015_mri.png")
    out = tmp_path / "o.nii.gz"

    def refused(code, *args):
        res = cli("fuse", *args, "-o", out)
        assert res.exit_code == code, (args, res.exit_code, res.stderr)
        errors = [line for line in res.stderr.splitlines() if line.startswith("medfuse: error: ")]
        assert len(errors) == 1 and "Traceback" not in res.stderr  # warnings may come before it
        assert not out.exists() and not (tmp_path / "o.json").exists()

    refused(5, T1, shared_path("volumes", "ibsi_sts002_ct_mr_pet", "PET_image.nii.gz"))  # no overlap
    refused(5, mri_png, T1)  # 2D with 3D
    small = tmp_path / "small.png"
    from PIL import Image as PILImage

    PILImage.open(mri_png).resize((128, 100)).save(small)
    refused(5, mri_png, small)  # 2D slices without geometry, of another aspect ratio
    image = read_image(PET)
    inf = image.with_data(image.data.astype(np.float32))
    inf.data[40, 40, 40] = np.inf
    write_image(inf, tmp_path / "inf.nii.gz")
    refused(4, T1, tmp_path / "inf.nii.gz")
    write_image(image.with_data(np.full(image.shape, 3.0, np.float32)), tmp_path / "flat.nii.gz")
    refused(4, T1, tmp_path / "flat.nii.gz")
    refused(4, T1, PET, "--method", "nonsense")
    refused(4, T1, PET, "--ct-window", "wide")
    assert cli("fuse", T1, PET, "-o", out).exit_code == 0
    res = cli("fuse", T1, PET, "-o", out)  # exists
    assert res.exit_code == 6


def test_figure_and_8_bit_registration_output(tmp_path, cli):
    folder = shared_path("harvard", "mri-ct")
    fig = tmp_path / "fig.png"
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", tmp_path / "f.png", "--figure", fig)
    assert res.exit_code == 0, res.stderr
    from PIL import Image as PILImage

    assert PILImage.open(fig).size[0] > 600  # four panels side by side
    out = tmp_path / "ct_on_mri.png"
    assert cli("register", folder / "02004_mri.png", folder / "02004_ct.png", "-o", out).exit_code == 0
    np.testing.assert_array_equal(np.asarray(PILImage.open(out)), np.asarray(PILImage.open(folder / "02004_ct.png")))


def test_the_report_on_standard_output(tmp_path, cli, monkeypatch):
    """`--report -` prints the JSON report instead of the summary line (before: a file named "-")."""
    monkeypatch.chdir(tmp_path)
    folder = shared_path("harvard", "mri-ct")
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", "f.png", "--method", "max",
              "--report", "-")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["output"] == "f.png" and report["metrics"]["values"]["Qabf"] > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]  # no f.json, no "-"
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", "-", "--report", "r.json")
    assert_one_line_error(res, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_a_figure_is_written_in_the_format_its_name_asks_for(tmp_path, cli):
    """--figure f.pdf wrote PNG bytes into f.pdf; now PDF/SVG/JPEG as named (no dates: same bytes
    every run), and a name of no figure format is refused before any work."""
    magic = {"f.pdf": b"%PDF", "f.svg": b"<?xml", "f.jpg": b"\xff\xd8\xff", "f.png": b"\x89PNG"}
    for name, start in magic.items():
        for run in (1, 2):
            res = cli("fuse", T1, PET, "-o", tmp_path / "o.nii.gz", "--method", "mean", "--no-metrics",
                      "--figure", tmp_path / name, "--overwrite")
            assert res.exit_code == 0, res.stderr
            data = (tmp_path / name).read_bytes()
            assert data.startswith(start), (name, data[:8])
            if run == 1:
                first = data
        assert data == first, name
    for name in ("f.gif", "f"):
        res = cli("fuse", T1, PET, "-o", tmp_path / "p.nii.gz", "--figure", tmp_path / name)
        assert_one_line_error(res, 6)
        assert not (tmp_path / "p.nii.gz").exists() and not (tmp_path / name).exists()


def test_figure_panels_keep_physical_proportions():
    """A real MR with 5.2 mm slices under 0.39 mm pixels: the coronal and sagittal panels are drawn
    13.3 times taller per row than wide, whatever the order of the voxel axes on disk."""
    from dataclasses import replace

    from medfuse_cli.report import _aspect, _canonical, _planes

    mr = read_image(shared_path("volumes", "tcia_sts001_mr_t1", "STS_001_MR_T1_AXIAL_SE.nii.gz"))
    # the same world image stored slice-first (voxel axes z, x, y)
    perm = (2, 0, 1)
    stored = replace(mr, data=np.transpose(mr.data, perm), affine=mr.affine[:, [*perm, 3]])
    for image in (mr, stored):
        _, spacing = _canonical(image)
        aspects = {name: _aspect(spacing, sel) for name, sel, _ in _planes(image)}
        assert aspects["axial"] == pytest.approx(1.0, rel=1e-6)
        assert aspects["coronal"] == pytest.approx(5.2 / 0.390625, rel=1e-4)
        assert aspects["sagittal"] == pytest.approx(5.2 / 0.390625, rel=1e-4)


def test_guided_filter_limits():
    from medfuse_cli.fusion.classic import _box, guided_filter

    rng = np.random.default_rng(0)
    guide, p = rng.random((64, 64)), rng.random((64, 64))
    # tiny eps and p == guide: the filter keeps the guide (edge preserving)
    np.testing.assert_allclose(guided_filter(guide, guide, 3, 1e-9, (0, 1)), guide, atol=1e-5)
    # huge eps: no steering left, the filter is the box mean of p's box mean
    np.testing.assert_allclose(guided_filter(p, guide, 3, 1e6, (0, 1)), _box(_box(p, 3, (0, 1)), 3, (0, 1)), atol=1e-5)


def test_gff_keeps_the_salient_source_on_real_pet():
    """gff follows the source with more local detail: the MRI's texture and the PET's uptake."""
    folder = shared_path("harvard", "mri-pet")
    from medfuse_cli.evaluate import metric_array
    from medfuse_cli.metrics import compute

    a = metric_array(read_image(folder / "25015_mri.png")) / 255.0
    b = metric_array(read_image(folder / "25015_pet.png")) / 255.0
    from medfuse_cli.fusion import fuse_classic

    scores = {m: compute(a * 255, b * 255, fuse_classic(m, a, b) * 255) for m in ("mean", "gff")}
    # the published gff behaviour (PEERS.md): far more edge transfer than the mean, MRI-leaning
    assert scores["gff"]["Qabf"] > scores["mean"]["Qabf"] + 0.2
    assert scores["gff"]["SSIM_A"] > scores["mean"]["SSIM_A"]


def test_classic_rules_never_import_torch(tmp_path):
    """torch costs ~0.18 GiB and seconds of start-up; a classic-rule fusion must not load it."""
    import subprocess
    import sys

    code = ("import sys; from medfuse_cli.pipeline import FuseOptions, fuse_pair; "
            f"fuse_pair({str(T1)!r}, {str(PET)!r}, {str(tmp_path / 'f.nii.gz')!r}, FuseOptions(method='laplacian')); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_api_callers_still_see_warnings_on_stderr(tmp_path):
    """A script that sets up no logging gets a fusion's warnings on stderr (Python's last resort), as
    well as in the report, though the report's collector is a handler of its own."""
    import subprocess
    import sys

    (tmp_path / "a.nii.gz").symlink_to(T1)  # a name that says no modality: assumed MR, with a warning
    script = ("from medfuse_cli.pipeline import FuseOptions, fuse_pair; "
              f"r = fuse_pair({str(tmp_path / 'a.nii.gz')!r}, {str(PET)!r}, {str(tmp_path / 'f.nii.gz')!r}, "
              "FuseOptions(metrics=False)); print(r.report['warnings'])")
    res = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "modality unknown, assumed MR" in res.stderr and "modality unknown, assumed MR" in res.stdout


def test_a_colour_map_shows_a_grey_pet_in_colour(tmp_path, cli):
    """--colormap hot: MOVING's luminance is fused and its colour (Cb/Cr of the PET through the map)
    put back, so the NIfTI output is RGB on FIXED's grid; bad maps, an MR or a colour MOVING are refused."""
    import nibabel as nib

    from medfuse_cli.intensity import colourised, rgb_to_ycbcr, window_for

    out = tmp_path / "c.nii.gz"
    res = cli("fuse", T1, PET, "-o", out, "--colormap", "hot", "--method", "mean")
    assert res.exit_code == 0, res.stderr
    written, fixed = nib.load(out), nib.load(T1)
    assert written.get_data_dtype().names == ("R", "G", "B") and written.shape == fixed.shape
    np.testing.assert_array_equal(written.affine, fixed.affine)
    rgb = np.asarray(written.dataobj)
    rgb = np.stack([rgb["R"], rgb["G"], rgb["B"]], axis=-1).astype(np.float32)
    pet = read_image(PET)
    _, cb, cr = rgb_to_ycbcr(rgb)
    _, pet_cb, pet_cr = rgb_to_ycbcr(colourised(pet, window_for(pet), "hot").data)
    assert np.median(np.abs(cb - pet_cb)) < 1 and np.median(np.abs(cr - pet_cr)) < 1  # the PET's colour
    report = json.loads((tmp_path / "c.json").read_text())
    assert "hot colour map" in report["colour"] and report["parameters"]["colormap"] == "hot"
    back = read_image(out)  # medfuse reads its RGB NIfTI back (info, convert, eval)
    assert back.is_color and back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, rgb.astype(np.uint8))
    assert cli("info", out).exit_code == 0
    assert report["metrics"]["values"]["SSIM_worst"] > 0.5
    spect = shared_path("harvard", "mri-spect")
    for args, message in (((T1, PET, "--colormap", "nope"), "unknown colour map"),
                          ((PET, T1, "--colormap", "hot"), "is an MR"),
                          ((spect / "03008_mri.png", spect / "03008_spect.png", "--colormap", "hot"), "already colour")):
        bad = cli("fuse", *args, "-o", tmp_path / "bad.nii.gz")
        assert_one_line_error(bad, 4)
        assert message in bad.stderr
    assert not (tmp_path / "bad.nii.gz").exists()


def test_slices_of_different_sizes_are_taken_to_show_one_field(tmp_path, cli):
    """A 128x128 export of a real PET slice beside its 256x256 MRI is spread over the MRI's field of
    view (warned) and fuses as the full-size PET does; the output is on the MRI's grid."""
    from PIL import Image as PILImage

    folder = shared_path("harvard", "mri-pet")
    mri, pet = folder / "25015_mri.png", folder / "25015_pet.png"
    small = tmp_path / "25015_pet.png"
    PILImage.open(pet).resize((128, 128), PILImage.BOX).save(small)
    res = cli("fuse", mri, small, "-o", tmp_path / "small.png", "--method", "mean", "--transform", "none")
    assert res.exit_code == 0, res.stderr
    assert "taken to show the same field of view" in res.stderr
    warnings = json.loads((tmp_path / "small.json").read_text())["warnings"]
    assert any("taken to show the same field of view" in w for w in warnings)  # the report keeps the assumption
    assert cli("fuse", mri, pet, "-o", tmp_path / "full.png", "--method", "mean").exit_code == 0
    a, b = (np.asarray(PILImage.open(tmp_path / n).convert("L"), float) for n in ("small.png", "full.png"))
    assert a.shape == b.shape == (256, 256)
    diff = np.abs(a - b)
    assert diff.mean() < 2.0  # the same placement: only the PET's lost resolution differs
    shifted = np.abs(a[:, 2:] - b[:, :-2]).mean()  # a placement 2 pixels off is much further away
    assert shifted > 2 * diff.mean()


def test_a_rotated_shifted_smaller_slice_is_registered_in_its_plane(tmp_path):
    """2D rigid registration: a real MRI slice rotated by 6 degrees, shifted and exported at half size
    is brought back onto the original (a rotation about the slice normal only)."""
    from PIL import Image as PILImage

    from medfuse_cli.pipeline import _check_pair
    from medfuse_cli.register import resample_to, rotation_degrees

    mri = shared_path("harvard", "mri-pet", "25015_mri.png")
    moved = tmp_path / "25015_t2.png"
    PILImage.open(mri).rotate(6, translate=(5, -4), resample=PILImage.BILINEAR).resize((128, 128), PILImage.BOX).save(moved)
    fixed = read_image(mri)
    moving = _check_pair(fixed, read_image(moved))
    reg = register(fixed, moving, "rigid")
    assert reg.skipped is None and reg.mi_after > reg.mi_before
    assert abs(rotation_degrees(reg.transform) - 6.0) < 0.7
    matrix = np.asarray(reg.transform.GetMatrix()).reshape(3, 3)
    assert np.allclose(matrix[2], [0, 0, 1]) and reg.transform.GetTranslation()[2] == 0.0
    before = resample_to(moving, fixed)
    after = resample_to(moving, fixed, reg.transform)
    inside = fixed.data > 0.1 * fixed.data.max()
    err = [float(np.abs(m.data - fixed.data)[inside].mean()) for m in (before, after)]
    assert err[1] < 0.4 * err[0]


def test_slices_of_one_size_are_taken_as_aligned_unless_rigid_is_asked(tmp_path, cli):
    """--transform auto (the default) takes two PNG slices of one size as aligned; --transform rigid
    registers them anyway (a real MRI slice and the same slice turned by 5 degrees)."""
    from PIL import Image as PILImage

    mri = shared_path("harvard", "mri-ct", "34010_mri.png")
    turned = tmp_path / "34010_t1.png"
    PILImage.open(mri).rotate(5, resample=PILImage.BILINEAR).save(turned)
    for transform, out in (("auto", "a.png"), ("rigid", "r.png")):
        res = cli("fuse", mri, turned, "-o", tmp_path / out, "--transform", transform, "--method", "mean")
        assert res.exit_code == 0, res.stderr
    auto = json.loads((tmp_path / "a.json").read_text())["registration"]
    rigid = json.loads((tmp_path / "r.json").read_text())["registration"]
    assert auto["skipped"] == "inputs share one grid" and auto["kind"] == "auto"
    assert rigid["skipped"] is None and rigid["kind"] == "rigid" and abs(rigid["rotation_deg"] - 5.0) < 0.5


def test_a_slab_fuses_and_one_too_thin_to_register_is_refused(tmp_path, cli):
    """A 3-slice slab of the SPM pair fuses on its grid with metrics; a 2-slice slab cannot be
    registered (ITK's pyramid needs 4 voxels per axis): one line, exit 5, not a crash."""
    t1, pet = nib.load(T1), nib.load(PET)
    for n in (3, 2):
        affine = t1.affine.copy()
        affine[:3, 3] = t1.affine[:3, :3] @ [0, 0, 40] + t1.affine[:3, 3]
        nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, np.float32)[:, :, 40:40 + n], affine), tmp_path / f"t1_{n}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(pet.dataobj, np.float32)[:, :, 40:40 + n], affine), tmp_path / f"pet_{n}.nii.gz")
    res = cli("fuse", tmp_path / "t1_3.nii.gz", tmp_path / "pet_3.nii.gz", "-o", tmp_path / "f.nii.gz", "--method", "mean")
    assert res.exit_code == 0, res.stderr
    assert np.array_equal(nib.load(tmp_path / "f.nii.gz").affine, nib.load(tmp_path / "t1_3.nii.gz").affine)
    assert 0 < json.loads((tmp_path / "f.json").read_text())["metrics"]["values"]["SSIM"] < 1
    assert_one_line_error(cli("fuse", tmp_path / "t1_2.nii.gz", tmp_path / "pet_2.nii.gz", "-o", tmp_path / "g.nii.gz",
                              "--transform", "rigid"), 5)


def test_a_composite_of_linear_transforms_is_applied_as_one(tmp_path, cli):
    """A composite transform file of linear parts (ANTs' stages written uncollapsed, a Slicer chain;
    ITK applies the last part first) is applied as the one affine transform it amounts to: the same
    voxels as that transform written alone, worked out here by hand. It was refused as 'not a 3D
    rigid or affine transform'. A composite with a deformable part is still refused (exit 4)."""
    import SimpleITK as sitk

    centre = np.array([0.0, -18.0, 18.0])
    turn = sitk.Euler3DTransform(tuple(centre), 0.05, 0.0, 0.2, (0.0, 0.0, 0.0))
    shift = sitk.TranslationTransform(3, (6.0, -4.0, 2.0))
    sitk.WriteTransform(sitk.CompositeTransform([turn, shift]), str(tmp_path / "chain.h5"))
    rotation = np.asarray(turn.GetMatrix()).reshape(3, 3)
    alone = sitk.AffineTransform(3)  # turn(shift(x)) = R (x + s - c) + c
    alone.SetMatrix(tuple(rotation.ravel()))
    alone.SetTranslation(tuple(rotation @ (np.array([6.0, -4.0, 2.0]) - centre) + centre))
    sitk.WriteTransform(alone, str(tmp_path / "alone.tfm"))
    for name in ("chain.h5", "alone.tfm"):
        res = cli("register", T1, PET, "-o", tmp_path / f"{name}.nii.gz", "--transform", "none",
                  "--initial-transform", tmp_path / name)
        assert res.exit_code == 0, res.stderr
    np.testing.assert_allclose(read_image(tmp_path / "chain.h5.nii.gz").data, read_image(tmp_path / "alone.tfm.nii.gz").data,
                               atol=1e-5)
    bspline = sitk.BSplineTransformInitializer(sitk.ReadImage(str(T1)), (2, 2, 2))
    sitk.WriteTransform(sitk.CompositeTransform([turn, bspline]), str(tmp_path / "warp.h5"))
    res = cli("register", T1, PET, "-o", tmp_path / "w.nii.gz", "--transform", "none",
              "--initial-transform", tmp_path / "warp.h5")
    assert_one_line_error(res, 4)
    assert "not a rigid or affine transform" in res.stderr


def test_an_ants_generic_affine_mat_is_read(tmp_path):
    """ANTs writes its affine (0GenericAffine.mat) as ITK's MatrixOffsetTransformBase, a type
    SimpleITK has no class for: it came back as a composite of itself, and medfuse unwrapped it for
    ever (a hang, found by hand). Now it is the affine transform of its parameters: the same voxels
    as that transform written by SimpleITK. Run in a process with a time limit, so a hang fails."""
    import subprocess
    import sys

    import SimpleITK as sitk
    from scipy.io import savemat

    turn = sitk.Euler3DTransform((0.0, -18.0, 18.0), 0.0, 0.1, -0.15, (4.0, 2.0, -3.0))
    parameters = np.r_[turn.GetMatrix(), turn.GetTranslation()].reshape(-1, 1)
    savemat(tmp_path / "0GenericAffine.mat", {"MatrixOffsetTransformBase_double_3_3": parameters,
                                              "fixed": np.reshape(turn.GetCenter(), (3, 1))}, format="4")
    sitk.WriteTransform(turn, str(tmp_path / "turn.tfm"))
    for name in ("0GenericAffine.mat", "turn.tfm"):
        res = subprocess.run([sys.executable, "-m", "medfuse_cli", "register", str(T1), str(PET), "-o",
                              str(tmp_path / f"{name}.nii.gz"), "--transform", "none", "--initial-transform",
                              str(tmp_path / name)], capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(read_image(tmp_path / "0GenericAffine.mat.nii.gz").data,
                               read_image(tmp_path / "turn.tfm.nii.gz").data, atol=1e-5)


def test_transform_files_of_the_wrong_parameter_count_are_refused(tmp_path):
    """ITK's text and MATLAB transform readers take any number of parameters for a type and read past
    them: a hand-written Euler3DTransform of three numbers (the shift alone, as one might write the
    README's translation) corrupted the heap, and medfuse wrote an output moved by whatever lay beyond,
    then crashed (exit 134). Now each is one line, exit 4, nothing written. In a process of its own,
    so that a crash fails the test instead of the run."""
    import subprocess
    import sys

    from scipy.io import savemat

    header = "#Insight Transform File V1.0\n#Transform 0\n"
    (tmp_path / "short.tfm").write_text(header + "Transform: Euler3DTransform_double_3_3\nParameters: 5 0 0\n"
                                        "FixedParameters: 0 0 0 0\n")
    (tmp_path / "word.tfm").write_text(header + "Transform: Euler2DTransform_double_2_2\nParameters: x0.1 3 4\n"
                                       "FixedParameters: 128 128\n")
    savemat(tmp_path / "short.mat", {"AffineTransform_double_3_3": np.ones((9, 1)), "fixed": np.zeros((3, 1))},
            format="4")
    savemat(tmp_path / "spm.mat", {"M": np.eye(4), "mat": np.eye(4)})  # SPM's .mat beside an image: MATLAB 5
    (tmp_path / "nested.tfm").write_text(header + "Transform: CompositeTransform_double_3_3\n#Transform 1\n"
                                         "Transform: CompositeTransform_double_4_4\n")  # found by fuzzing: exit 1
    import SimpleITK as sitk

    sitk.WriteTransform(sitk.Euler3DTransform(), str(tmp_path / "damaged.h5"))  # its superblock damaged: HDF5
    blob = bytearray((tmp_path / "damaged.h5").read_bytes())  # printed 40 lines of its error stack
    blob[8:40] = bytes(range(32))
    (tmp_path / "damaged.h5").write_bytes(bytes(blob))
    (tmp_path / "centre.tfm").write_text(header + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 "
                                         "5 0 0\nFixedParameters: 0\n")
    (tmp_path / "stray.tfm").write_bytes((header + "Transform: TranslationTransform_double_3_3\nParameters: 5 0 0\n"
                                          "FixedParameters:\n").encode().replace(b"#Transform 0\n", b"#Transform 0\x7f"))
    for name, said in (("short.tfm", "Euler3DTransform takes 6 parameters and 3 fixed ones (its centre), the file gives 3 "),
                       ("centre.tfm", "the file gives 1 fixed parameters"),
                       ("word.tfm", "holds other things than finite numbers"),
                       ("stray.tfm", "holds bytes other than ASCII text"),
                       ("short.mat", "AffineTransform takes 12 parameters and 3 fixed ones (its centre), the file gives 9 "),
                       ("spm.mat", "an SPM .mat holds none"),
                       ("nested.tfm", "holds transforms SimpleITK cannot take apart"),
                       ("damaged.h5", "not a transform file ITK can read")):
        out = tmp_path / f"{name}.nii.gz"
        res = subprocess.run([sys.executable, "-m", "medfuse_cli", "register", str(T1), str(PET), "-o", str(out),
                              "--transform", "none", "--initial-transform", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 4 and said in res.stderr and res.stderr.count("\n") == 1, (name, res.stderr)
        assert not out.exists()


def test_a_slice_takes_a_given_transform_only_in_its_plane(tmp_path, cli):
    """--initial-transform on 2D slices: applied as it is with --transform none when it keeps the
    slice in its plane (a 3 mm shift moves the pixels by 3), refused (exit 5) when it tilts or lifts
    the slice, and refused with rigid, which registers slices from their contents only; a 2D
    transform file is taken as the 3D one that leaves z alone."""
    import SimpleITK as sitk

    mri = shared_path("harvard", "mri-ct", "34010_mri.png")
    ct = shared_path("harvard", "mri-ct", "34010_ct.png")
    transforms = {}
    for name, angles, shift in (("shift", (0, 0, 0), (3, 0, 0)), ("tilt", (0.2, 0, 0), (0, 0, 0)),
                                ("lift", (0, 0, 0), (0, 0, 2))):
        t = sitk.Euler3DTransform()
        t.SetRotation(*angles)
        t.SetTranslation(shift)
        transforms[name] = tmp_path / f"{name}.tfm"
        sitk.WriteTransform(t, str(transforms[name]))
    out = tmp_path / "moved.png"
    res = cli("register", mri, ct, "-o", out, "--transform", "none", "--initial-transform", transforms["shift"])
    assert res.exit_code == 0, res.stderr
    moved, source = read_image(out).data[..., 0], read_image(ct).data[..., 0]
    assert np.array_equal(moved[:-3], source[3:])  # LPS +3 mm along the first array axis
    for name in ("tilt", "lift"):
        assert_one_line_error(cli("register", mri, ct, "-o", tmp_path / "x.png", "--transform", "none",
                                  "--initial-transform", transforms[name]), 5)
    assert_one_line_error(cli("fuse", mri, ct, "-o", tmp_path / "y.png", "--transform", "rigid",
                              "--initial-transform", transforms["shift"]), 5)
    # a 2D transform, as a SimpleITK registration of the two PNGs writes it (pixel (i, j) at (i, j)
    # mm, as medfuse places it in LPS): the 3D transform that leaves z alone, to the bit; it was
    # refused as "not a 3D rigid or affine transform". With volumes it is refused (exit 5).
    turn2d = sitk.Euler2DTransform((127.5, 127.5), 0.1, (3.0, -2.0))
    turn3d = sitk.Euler3DTransform((127.5, 127.5, 0.0), 0.0, 0.0, 0.1, (3.0, -2.0, 0.0))
    for name, t in (("turn2d", turn2d), ("turn3d", turn3d), ("shift2d", sitk.TranslationTransform(2, (3.0, 0.0)))):
        sitk.WriteTransform(t, str(tmp_path / f"{name}.tfm"))
        res = cli("register", mri, ct, "-o", tmp_path / f"{name}.png", "--transform", "none",
                  "--initial-transform", tmp_path / f"{name}.tfm")
        assert res.exit_code == 0, res.stderr
    assert np.array_equal(read_image(tmp_path / "turn2d.png").data, read_image(tmp_path / "turn3d.png").data)
    assert np.array_equal(read_image(tmp_path / "shift2d.png").data, read_image(out).data)
    res = cli("fuse", T1, PET, "-o", tmp_path / "v.nii.gz", "--initial-transform", tmp_path / "turn2d.tfm")
    assert_one_line_error(res, 5)
    assert "2D transform, which is for two 2D slices" in res.stderr


@pytest.mark.parametrize("group, case, other", [("mri-pet", "25015", "pet"), ("mri-spect", "29010", "spect"),
                                               ("mri-ct", "34010", "ct")])
def test_a_turned_half_size_other_modality_slice_is_registered(tmp_path, group, case, other):
    """MRI with a real PET / SPECT / CT slice turned by 6 degrees, shifted and exported at half size:
    the registration turns it back by 6 degrees (within 1) from where it puts the untouched slice
    (whose mutual-information optimum need not be the dataset's alignment)."""
    from PIL import Image as PILImage

    from medfuse_cli.pipeline import _check_pair

    folder = shared_path("harvard", group)
    fixed = read_image(folder / f"{case}_mri.png")
    angles = []
    for turn in (0, 6):
        moved = tmp_path / f"{case}_{other}_{turn}.png"
        PILImage.open(folder / f"{case}_{other}.png").rotate(turn, translate=(5, -4) if turn else (0, 0),
                                                             resample=PILImage.BILINEAR).resize((128, 128), PILImage.BOX).save(moved)
        reg = register(fixed, _check_pair(fixed, read_image(moved)), "rigid")
        angles.append(np.degrees(reg.transform.GetParameters()[2]))  # Euler3D about the slice normal
    assert abs(abs(angles[1] - angles[0]) - 6.0) < 1.0, angles


def test_a_sheared_moving_is_corrected_and_a_sheared_fixed_refused(tmp_path, cli):
    """The SPM PET resampled onto a sheared grid (slices shifted 0.3 voxel each along y, as an
    uncorrected 17-degree gantry tilt stores them) and saved with that grid's affine: as MOVING it
    is resampled onto an orthogonal grid (warned) and lands where the PET lies, within the error of
    two linear interpolations; as FIXED it is refused (exit 5), since the output lies on FIXED's grid.
    Before, both ended in 'sheared affine' (exit 5)."""
    from scipy import ndimage

    pet = read_image(PET)
    shear = np.eye(4)
    shear[1, 2] = 0.3  # voxel y grows by 0.3 per slice
    sheared_affine = pet.affine @ shear
    index = np.linalg.inv(pet.affine) @ sheared_affine  # sheared voxel -> PET voxel
    data = ndimage.affine_transform(pet.data.astype(np.float32), index[:3, :3], offset=index[:3, 3], order=1)
    nib.save(nib.Nifti1Image(data, sheared_affine), tmp_path / "sheared.nii.gz")
    assert read_image(tmp_path / "sheared.nii.gz").is_sheared
    res = cli("register", T1, tmp_path / "sheared.nii.gz", "-o", tmp_path / "back.nii.gz", "--transform", "none")
    assert res.exit_code == 0, res.stderr
    assert "sheared" in res.stderr
    back = nib.load(tmp_path / "back.nii.gz").get_fdata()
    inside = np.zeros(back.shape, bool)
    inside[15:-15, 20:-20, 15:-15] = True  # away from the edges the sheared grid cut off
    # two linear resamplings cost 0.13% of the range; the grid 1 mm off would cost 1%
    assert np.abs(back[inside] - pet.data[inside]).mean() < 0.004 * np.ptp(pet.data)
    res = cli("fuse", tmp_path / "sheared.nii.gz", PET, "-o", tmp_path / "f.nii.gz", "--method", "mean")
    assert res.exit_code == 5 and "sheared grid" in res.stderr


def test_a_sheared_colour_volume_is_resampled_channel_by_channel():
    """A colour (RGB) MOVING on a sheared grid: each channel is resampled as the grey volume is (this
    path used to hand the 4D array to a 3D resampler)."""
    from medfuse_cli.register import unsheared

    pet = read_image(PET)
    affine = pet.affine.copy()
    affine[:3, 2] += 0.3 * affine[:3, 1]  # slices shifted 0.3 voxel each along y
    grey = pet.with_data(pet.data.astype(np.float32))
    grey.affine = affine
    rgb = pet.with_data(np.stack([pet.data, pet.data / 2, np.zeros_like(pet.data)], axis=-1).astype(np.float32))
    rgb.affine = affine
    flat_grey, flat_rgb = unsheared(grey), unsheared(rgb)
    assert flat_rgb.is_color and not flat_rgb.is_sheared
    np.testing.assert_array_equal(flat_rgb.affine, flat_grey.affine)
    np.testing.assert_allclose(flat_rgb.data[..., 0], flat_grey.data, atol=1e-5)
    np.testing.assert_allclose(flat_rgb.data[..., 1], flat_grey.data / 2, atol=1e-5)


def test_an_image_too_small_for_the_metrics_is_fused_without_them(tmp_path, cli):
    """A 9x9 crop of a real pair was refused (exit 5) because the report's SSIM window needs 11
    pixels, though the fusion itself needs no such size; now it is fused and the metrics skipped,
    with a warning in the report. A 12x12 crop is still scored."""
    from PIL import Image as PILImage

    folder = shared_path("harvard", "mri-ct")
    for side in (9, 12):
        for role in ("mri", "ct"):
            with PILImage.open(folder / f"02004_{role}.png") as im:
                im.crop((120, 120, 120 + side, 120 + side)).save(tmp_path / f"{side}_{role}.png")
        res = cli("fuse", tmp_path / f"{side}_mri.png", tmp_path / f"{side}_ct.png", "-o", tmp_path / f"{side}.png",
                  "--method", "mean")
        assert res.exit_code == 0, res.stderr
        report = json.loads((tmp_path / f"{side}.json").read_text())
        assert (report.get("metrics") is None) == (side == 9)
        assert any("too small for the metrics" in w for w in report["warnings"]) == (side == 9)
        with PILImage.open(tmp_path / f"{side}.png") as im:
            assert im.size == (side, side)


def test_one_slice_in_world_space_takes_a_volume(tmp_path, cli):
    """A single slice with a position in space (NIfTI, DICOM) beside a volume was refused as "2D with
    3D"; MOVING is now sampled on the slice's plane from the headers (or a given transform), the
    result lies on the slice's grid, and what cannot work stays a one-line refusal."""
    import SimpleITK as sitk

    slab = tmp_path / "t1_slice.nii.gz"
    nib.save(nib.load(T1).slicer[:, :, 44:45], slab)
    pet = nib.load(PET).get_fdata()
    moved = tmp_path / "pet_on_slice.nii.gz"
    res = cli("register", slab, PET, "-o", moved)
    assert res.exit_code == 0, res.stderr
    np.testing.assert_allclose(nib.load(moved).get_fdata()[:, :, 0], pet[:, :, 44], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(nib.load(moved).affine, nib.load(slab).affine)
    # a given transform, applied as it is: 2 mm up (one PET slice; FIXED point -> MOVING point, LPS)
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, 0.0, 2.0)), str(tmp_path / "up.tfm"))
    res = cli("register", slab, PET, "-o", tmp_path / "up.nii.gz", "--initial-transform", tmp_path / "up.tfm")
    assert res.exit_code == 0, res.stderr
    np.testing.assert_allclose(nib.load(tmp_path / "up.nii.gz").get_fdata()[:, :, 0], pet[:, :, 45], rtol=1e-5, atol=1e-4)

    out = tmp_path / "fused.nii.gz"
    res = cli("fuse", slab, PET, "-o", out, "--method", "laplacian")
    assert res.exit_code == 0, res.stderr
    assert nib.load(out).shape == (91, 109, 1)
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(slab).affine)
    report = json.loads((tmp_path / "fused.json").read_text())
    assert "one slice of a volume" in report["registration"]["skipped"] and report["metrics"]["values"]["SSIM"] > 0.5
    assert_one_line_error(cli("fuse", slab, PET, "-o", tmp_path / "r.nii.gz", "--transform", "rigid"), 5)
    res = cli("fuse", PET, slab, "-o", tmp_path / "r.nii.gz")  # a volume cannot be filled from one slice
    assert_one_line_error(res, 5)
    assert "with the slice as FIXED" in res.stderr and not (tmp_path / "r.nii.gz").exists()


def test_threads_option_caps_itk_while_fusing(monkeypatch):
    """--threads N: ITK's resampling ran on every core whatever N was; now on N (then restored)."""
    import SimpleITK as sitk

    from medfuse_cli import pipeline

    seen, real = [], pipeline.resample_to
    monkeypatch.setattr(pipeline, "resample_to", lambda *a, **k: seen.append(
        sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) or real(*a, **k))
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    t1, pet = read_image(T1), read_image(PET)
    for threads in (1, 0):
        pipeline.fuse_images(t1, pet, FuseOptions(method="mean", metrics=False, threads=threads))
    assert seen == [1, before] and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX resource limits")
def test_writes_that_really_fail_leave_nothing_and_say_why_in_one_line(tmp_path):
    """Outputs that the operating system refuses part way (a file size limit: the same EFBIG path as a
    full disk, with no mocking): one line with its reason, exit 6, nothing left behind. A DICOM series
    printed pydicom's traceback text inside its one line (pydicom re-raises the OSError with it), and
    NRRD / MetaImage failed as internal errors."""
    for limit, out in ((64 << 10, tmp_path / "f.nii"), (8000, tmp_path / "series")):
        res = with_file_size_limit(limit, "fuse", T1, PET, "-o", out, "--method", "mean", "--no-metrics")
        assert_one_line_error(res, 6)
        assert res.stderr == f"medfuse: error: cannot write {out}: File too large\n"
        assert not list(tmp_path.iterdir())
    res = with_file_size_limit(100, "eval", "--fixed", T1, "--moving", PET, T1, "--json", tmp_path / "e.json")
    assert_one_line_error(res, 6)
    assert "File too large" in res.stderr and not list(tmp_path.iterdir())
    # NRRD and MetaImage go through ITK, whose failure was an "unexpected RuntimeError" (exit 1) with
    # ITK's own line on stderr before it
    for name, reason in (("c.mha", "File too large"), ("c.nrrd", "failed to write to file")):
        res = with_file_size_limit(20000, "convert", T1, "-o", tmp_path / name)
        assert_one_line_error(res, 6)
        assert res.stderr == f"medfuse: error: cannot write {tmp_path / name}: {reason}\n"
        assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX resource limits")
def test_a_report_that_really_fails_after_the_image_leaves_nothing(tmp_path):
    """The report is written last; when the operating system refuses it (a file size limit between
    the fused slice's size and the report's, no mocking), the image written before it is removed
    too, and the folders made for them: one line, exit 6, only the inputs left (fuse; register with
    its transform file; convert, whose only file fails)."""
    from PIL import Image

    pair = []
    for src, name in ((T1, "crop_mri.png"), (PET, "crop_pet.png")):  # 32x32 crops of the bundled slices
        x = np.asarray(nib.load(src).dataobj)[30:62, 40:72, 45].astype(float)
        Image.fromarray((255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)).save(tmp_path / name)
        pair.append(tmp_path / name)
    out = tmp_path / "out" / "new"
    for args in (("fuse", *pair, "-o", out / "f.png", "--method", "mean", "--no-metrics"),
                 ("register", *pair, "-o", out / "m.png", "--save-transform", out / "t.tfm", "--report", out / "r.json")):
        res = with_file_size_limit(1500, *args)
        assert_one_line_error(res, 6)
        assert "File too large" in res.stderr and ".json" in res.stderr, res.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["crop_mri.png", "crop_pet.png"], args[0]
    res = with_file_size_limit(20000, "convert", T1, "-o", out / "t1.nii")
    assert_one_line_error(res, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop_mri.png", "crop_pet.png"]
    res = with_file_size_limit(1 << 20, "fuse", *pair, "-o", out / "f.png", "--method", "mean", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert 0 < (out / "f.png").stat().st_size < 1500 < (out / "f.json").stat().st_size  # the limit sits between


@pytest.mark.parametrize("failure", ["full disk", "ctrl-c", "sigterm"])
def test_a_report_that_cannot_be_written_takes_the_image_with_it(failure, tmp_path, cli, monkeypatch):
    """The image (and figure) were left behind when the report after them failed (found with a full
    tmpfs) or the run was stopped (Ctrl-C; SIGTERM, a scheduler's time limit, which killed the process
    where it stood): a failed run now leaves no output at all, here and in a DICOM series folder."""
    import signal

    from medfuse_cli import report
    from medfuse_cli.errors import OutputError

    code = {"full disk": 6, "ctrl-c": 130, "sigterm": 143}[failure]
    before = signal.getsignal(signal.SIGTERM)

    def fail(rep, path, overwrite=False):
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        if failure == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(report, "write_report", fail)
    for out in (tmp_path / "f.nii.gz", tmp_path / "series"):
        args = ("fuse", T1, PET, "-o", out, "--method", "mean", "--no-metrics", "--figure", tmp_path / "fig.png")
        assert_one_line_error(cli(*args), code)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], out
    # register: its report after the image and the transform
    res = cli("register", T1, PET, "-o", tmp_path / "moved.nii.gz", "--save-transform", tmp_path / "t.tfm",
              "--report", tmp_path / "r.json")
    assert_one_line_error(res, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # register: the transform file after the image
    from medfuse_cli import pipeline

    monkeypatch.setattr(pipeline, "atomic_write_bytes", lambda path, data, overwrite=False: fail({}, path))
    res = cli("register", T1, PET, "-o", tmp_path / "moved.nii.gz", "--save-transform", tmp_path / "t.tfm")
    assert_one_line_error(res, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone
