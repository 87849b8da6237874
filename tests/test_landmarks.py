"""Landmark files (3D Slicer .fcsv / .mrk.json, CSV r,a,s / l,p,s) and their rigid fit."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import EXAMPLES, assert_one_line_error, write_fcsv
from scipy.spatial.transform import Rotation

from medfuse_cli.errors import InputNotFoundError, InvalidInputError
from medfuse_cli.landmarks import fit_landmarks, read_points

T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
RAS = np.array([[10.0, -20.0, 30.0], [50.0, 0.0, 25.0], [-5.0, 40.0, 10.0], [0.0, 0.0, -30.0]])
TO_LPS = np.array([-1.0, -1.0, 1.0])


def test_every_format_reads_the_same_points(tmp_path):
    """One set of points written as a RAS CSV, an LPS CSV, a Slicer .fcsv in LPS and in the old
    numeric RAS code, and a Slicer markups JSON: all read as the same LPS points."""
    lps = RAS * TO_LPS
    ras_csv = tmp_path / "ras.csv"
    ras_csv.write_text("label,R,A,S\n" + "".join(f"p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(RAS)))
    lps_csv = tmp_path / "lps.csv"
    lps_csv.write_text("l,p,s\n" + "".join(f"{x},{y},{z}\n" for x, y, z in lps))
    old = tmp_path / "old.fcsv"
    write_fcsv(old, RAS, system="0")  # Slicer before 4.11: 0 = RAS
    markups = tmp_path / "points.mrk.json"
    markups.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"label": f"p{i}", "position": list(p)} for i, p in enumerate(RAS)]}]}))
    for path in (ras_csv, lps_csv, write_fcsv(tmp_path / "new.fcsv", lps), old, markups):
        np.testing.assert_allclose(read_points(path), lps, err_msg=path.name)


def test_the_fit_recovers_a_known_rigid_motion(tmp_path):
    """Points moved by a known rotation and translation (RAS): the fit maps every FIXED point onto
    its partner; one point gives the shift alone."""
    rotation = Rotation.from_euler("xyz", (12, -7, 25), degrees=True).as_matrix()
    moved = RAS @ rotation.T + [4.0, -900.0, 12.0]
    fixed_csv, moving_csv = tmp_path / "f.csv", tmp_path / "m.csv"
    fixed_csv.write_text("r,a,s\n" + "".join(f"{x},{y},{z}\n" for x, y, z in RAS))
    moving_csv.write_text("r,a,s\n" + "".join(f"{x},{y},{z}\n" for x, y, z in moved))
    fit = fit_landmarks(fixed_csv, moving_csv)
    assert fit.rms_mm() < 1e-6
    # the transform works in LPS: a FIXED point not among the landmarks lands where the motion puts it
    probe = np.array([33.0, -12.0, 5.0])
    np.testing.assert_allclose(fit.transform.TransformPoint(tuple(probe * TO_LPS)),
                               (rotation @ probe + [4.0, -900.0, 12.0]) * TO_LPS, atol=1e-6)
    fixed_csv.write_text("r,a,s\n1,2,3\n")
    moving_csv.write_text("r,a,s\n11,-98,3\n")
    shift = fit_landmarks(fixed_csv, moving_csv)
    np.testing.assert_allclose(shift.transform.TransformPoint((0.0, 0.0, 0.0)), (-10.0, 100.0, 0.0), atol=1e-9)


@pytest.mark.parametrize("fixed, moving, message", [
    ("x,y,z\n1,2,3\n", "r,a,s\n1,2,3\n", "would not say which"),
    ("r,a,s\n1,2,3\n4,5,6\n7,8,10\n", "r,a,s\n1,2,3\n", "3 points on FIXED but 1 on MOVING"),
    ("r,a,s\n1,2,3\n40,5,6\n", "r,a,s\n1,2,3\n40,5,6\n", "two points"),
    ("r,a,s\n0,0,0\n10,0,0\n30,0.5,0\n", "r,a,s\n0,0,0\n10,0,0\n30,0.5,0\n", "one line"),
    ("r,a,s\n", "r,a,s\n1,2,3\n", "no points"),
    ("r,a,s\n1,nan,3\n", "r,a,s\n1,2,3\n", "not a finite number"),
    ("r,a,s\n1e300,0,0\n0,1e300,0\n0,0,1e300\n", "r,a,s\n1,0,0\n0,1,0\n0,0,1\n", "no point in a scanner"),
    ("r,a,s\n1,two,3\n", "r,a,s\n1,2,3\n", "not a landmark file"),
])
def test_bad_landmarks_are_refused(tmp_path, fixed, moving, message):
    (tmp_path / "f.csv").write_text(fixed)
    (tmp_path / "m.csv").write_text(moving)
    with pytest.raises(InvalidInputError, match=message):
        fit_landmarks(tmp_path / "f.csv", tmp_path / "m.csv")


def test_points_of_other_than_three_coordinates_are_refused(tmp_path):
    """Three .fcsv rows of two coordinates, or four markups positions of four numbers, hold as many
    numbers as a whole number of 3D points: they are refused, not regrouped into other points."""
    fcsv = tmp_path / "short.fcsv"
    fcsv.write_text("# CoordinateSystem = LPS\n" + "".join(f"F-{i},{i},{2 * i}\n" for i in range(3)))
    markups = tmp_path / "long.mrk.json"
    markups.write_text(json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [
        {"position": [i, 2 * i, 3 * i, 1]} for i in range(3)]}]}))
    for path in (fcsv, markups):
        with pytest.raises(InvalidInputError, match="not a landmark file"):
            read_points(path)


def test_markups_in_different_coordinate_systems_are_refused(tmp_path):
    """A Slicer markups JSON whose markups state different systems (RAS and LPS) is refused, not mixed."""
    markups = tmp_path / "mixed.mrk.json"
    markups.write_text(json.dumps({"markups": [
        {"type": "Fiducial", "coordinateSystem": system, "controlPoints": [{"position": list(p)} for p in RAS[i::2]]}
        for i, system in enumerate(("RAS", "LPS"))]}))
    with pytest.raises(InvalidInputError, match="different coordinate systems"):
        read_points(markups)


def test_points_not_placed_leave_their_pairs_out_and_units_are_read(tmp_path):
    """Slicer files hold points that are not placed: a markups JSON point whose positionStatus is not
    'defined' (a template's unset point, one marked missing), a Slicer 5 .fcsv row whose status column
    is not 2. Their pairs are left out, and the others keep their partners (the fit is exact again);
    a markups JSON in micrometres (coordinateUnits um) reads in mm; an unknown unit is refused."""
    rotation = Rotation.from_euler("xyz", (5, 10, -20), degrees=True).as_matrix()
    moved = RAS @ rotation.T + [3.0, 40.0, -7.0]
    markups = tmp_path / "fixed.mrk.json"
    points = [{"label": f"F-{i}", "position": list(p * 1000), "positionStatus": "defined"} for i, p in enumerate(RAS)]
    points.insert(1, {"label": "unset", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"})
    markups.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                                                "coordinateUnits": "um", "controlPoints": points}]}))
    fcsv = write_fcsv(tmp_path / "moving.fcsv", np.insert(moved * TO_LPS, 1, 0.0, axis=0))
    rows = fcsv.read_text().splitlines()
    status = ["2", "2", "2", "3", "2"]  # the fourth point (RAS[2]) is marked missing on MOVING
    fcsv.write_text("\n".join(rows[:3] + [f"{row},{s},0" for row, s in zip(rows[3:], status)]) + "\n")
    fixed = read_points(markups)
    assert np.isnan(fixed[1]).all() and not np.isnan(np.delete(fixed, 1, axis=0)).any()
    np.testing.assert_allclose(np.delete(fixed, 1, axis=0), RAS * TO_LPS)
    fit = fit_landmarks(markups, fcsv)
    assert fit.left_out == (2, 4) and len(fit.fixed) == 3
    assert fit.rms_mm() < 1e-6
    np.testing.assert_allclose(fit.transform.TransformPoint(tuple(RAS[3] * TO_LPS)),
                               (rotation @ RAS[3] + [3.0, 40.0, -7.0]) * TO_LPS, atol=1e-6)
    markups.write_text(markups.read_text().replace('"um"', '"furlong"'))
    with pytest.raises(InvalidInputError, match="unknown coordinateUnits 'furlong'"):
        read_points(markups)
    unplaced = tmp_path / "unplaced.mrk.json"
    unplaced.write_text(json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [
        {"label": "F-1", "positionStatus": "undefined"}]}]}))
    with pytest.raises(InvalidInputError, match="no points placed"):
        read_points(unplaced)


def test_slicer_control_point_tables_and_spreadsheet_csv_read_the_same_points(tmp_path):
    """3D Slicer's control point table (ExportControlPointsToCSV: label,l,p,s,defined,...; as .tsv
    too), whose 'defined' 0 marks a point not placed, and a spreadsheet's semicolon CSV with decimal
    commas read the same LPS points as a plain CSV."""
    lps = RAS * TO_LPS
    rows = [[f"F-{i}", *map(str, p), "1", "1", "1", "0", ""] for i, p in enumerate(lps)]
    rows.insert(2, ["unset", "0", "0", "0", "0", "1", "1", "0", ""])
    header = ["label", "l", "p", "s", "defined", "selected", "visible", "locked", "description"]
    for name, sep in (("points.csv", ","), ("points.tsv", "\t")):
        table = tmp_path / name
        table.write_text("\n".join(sep.join(row) for row in [header, *rows]) + "\n")
        points = read_points(table)
        assert np.isnan(points[2]).all(), name
        np.testing.assert_allclose(np.delete(points, 2, axis=0), lps, err_msg=name)
    spreadsheet = tmp_path / "excel.csv"
    spreadsheet.write_text("label;R;A;S\n" + "".join(
        f"p{i};" + ";".join(f"{v:.2f}".replace(".", ",") for v in p) + "\n" for i, p in enumerate(RAS + 0.25)))
    np.testing.assert_allclose(read_points(spreadsheet), (RAS + 0.25) * TO_LPS)
    markups = tmp_path / "unset.mrk.json"  # a control point without position or status: not placed
    markups.write_text(json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [
        {"label": "F-1", "position": [1, 2, 3]}, {"label": "F-2"}]}]}))
    np.testing.assert_allclose(read_points(markups), [[1, 2, 3], [np.nan] * 3])


def test_points_left_out_are_warned_of_on_the_command_line(tmp_path, cli):
    """fuse --landmarks with a point unset on MOVING: the warning and the report name it."""
    fixed = tmp_path / "f.csv"
    fixed.write_text("r,a,s\n0,0,0\n30,0,0\n0,30,0\n0,0,30\n")
    moving = tmp_path / "m.mrk.json"
    moving.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"position": [0, 0, 0]}, {"position": [0, 0, 0], "positionStatus": "undefined"},
        {"position": [0, 30, 0]}, {"position": [0, 0, 30]}]}]}))
    out, report = tmp_path / "o.nii.gz", tmp_path / "r.json"
    result = cli("fuse", T1, PET, "-o", out, "--method", "mean", "--transform", "none", "--landmarks", fixed, moving,
                 "--report", report)
    assert result.exit_code == 0, result.stderr
    assert "point 2 not placed on FIXED or MOVING" in " ".join(result.stderr.split())
    landmarks = json.loads(report.read_text())["registration"]["landmarks"]
    assert landmarks["left_out"] == [2] and landmarks["count"] == 3 and landmarks["fit_rms_mm"] < 1e-6


def test_points_out_of_order_are_warned_of(tmp_path, cli):
    """Two points swapped on MOVING (the commonest picking mistake): the fit cannot be rigid, and
    the warning gives its RMS and farthest point and says to check the order; in order, no warning."""
    fixed, moving = tmp_path / "f.csv", tmp_path / "m.csv"
    fixed.write_text("r,a,s\n0,0,0\n40,0,0\n0,40,0\n0,0,40\n")
    out = tmp_path / "o.nii.gz"
    for rows, warned in (("0,0,0\n0,40,0\n40,0,0\n0,0,40\n", True), ("1,0,0\n41,0,0\n1,40,0\n1,0,40\n", False)):
        moving.write_text("r,a,s\n" + rows)
        res = cli("register", T1, PET, "-o", out, "--transform", "none", "--landmarks", fixed, moving, "--overwrite")
        assert res.exit_code == 0, res.stderr
        text = " ".join(res.stderr.split())
        assert ("same points in the same order" in text) == warned, text
        if warned:
            assert re.search(r"only to 20\.0 mm \(RMS\); the farthest, point \d, lies \d+\.\d mm", text), text


def test_landmark_errors_on_the_command_line(tmp_path, cli):
    """Missing file: exit 3; a bad file or --landmarks with --initial-transform: exit 4; one line,
    nothing written."""
    good = tmp_path / "p.csv"
    good.write_text("r,a,s\n0,0,0\n")
    bad = write_fcsv(tmp_path / "bad.fcsv", [(0, 0, 0)], system="XYZ")
    tfm = tmp_path / "t.tfm"
    tfm.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: TranslationTransform_double_3_3\n"
                   "Parameters: 0 0 0\nFixedParameters: \n")
    out = tmp_path / "o.nii.gz"
    for args, code in (((good, tmp_path / "missing.csv"), 3), ((good, bad), 4), ((good, tmp_path), 4),
                       ((good, good, "--initial-transform", tfm), 4)):
        assert_one_line_error(cli("fuse", T1, PET, "-o", out, "--landmarks", *args), code)
    with pytest.raises(InputNotFoundError):
        read_points(tmp_path / "missing.csv")
    assert not out.exists()
