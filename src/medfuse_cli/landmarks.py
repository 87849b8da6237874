"""Paired landmarks: points picked on FIXED and on MOVING, and the rigid transform that fits them.

A start for registration when the headers do not relate the two scans (another session, scanner
or frame of reference). Points are read from 3D Slicer files (``.fcsv``, ``.mrk.json``, which say
their coordinate system) or a CSV whose header names its system: ``r,a,s`` (RAS+, as NIfTI viewers
show it) or ``l,p,s`` (LPS+, ITK and DICOM), as Slicer's control point table writes it too. The
n-th point of one file is paired with the n-th of the other. Points are world coordinates in mm,
returned in LPS (SimpleITK's convention). A point Slicer marks as not placed (a template's unset
point, one marked missing in this scan) reads as NaN, and its pair is left out of the fit, so the
order of the others still pairs them.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputNotFoundError, InvalidInputError

TO_LPS = {"LPS": np.array([1.0, 1.0, 1.0]), "RAS": np.array([-1.0, -1.0, 1.0])}
TO_MM = {"mm": 1.0, "um": 1e-3}  # markups JSON coordinateUnits (UCUM)
PLACED_FCSV = "2"  # Slicer 5's .fcsv position status column (after associatedNodeID): 2 = defined
MIN_SPREAD_MM = 5.0  # three or more points must span at least this much off their best-fitting line
MAX_MM = 1e5  # a coordinate farther from the origin (100 m) is no point in a scanner


@dataclass
class LandmarkFit:
    """The rigid transform (FIXED point -> MOVING point, LPS) fitted to paired landmarks."""

    transform: object  # SimpleITK.Euler3DTransform
    fixed: np.ndarray  # (n, 3) LPS mm
    moving: np.ndarray  # (n, 3) LPS mm
    files: tuple[str, str]
    left_out: tuple[int, ...] = ()  # 1-based numbers of the pairs left out: a point not placed on one side

    def distances_mm(self, transform=None) -> np.ndarray:
        """Distance between each MOVING point and its FIXED partner mapped by ``transform`` (the fit
        itself by default)."""
        transform = transform or self.transform
        mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in self.fixed])
        return np.linalg.norm(mapped - self.moving, axis=1)

    def rms_mm(self, transform=None) -> float:
        """Root-mean-square of :meth:`distances_mm`."""
        return float(np.sqrt(np.mean(self.distances_mm(transform) ** 2)))


def read_points(path: str | os.PathLike[str]) -> np.ndarray:
    """The points of one landmark file, (n, 3) in LPS mm; NaN rows for points not placed."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"--landmarks {path}: a folder, not a file of points")
    if not path.is_file():
        raise InputNotFoundError(f"--landmarks {path}: no such file")
    name = path.name.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
        if name.endswith(".json"):  # .mrk.json
            system, rows = _markups_json(text)
        elif name.endswith(".fcsv"):
            system, rows = _fcsv(text)
        else:
            system, rows = _plain_csv(text)
        if any(len(row) != 3 for row in rows):
            raise ValueError("a point without three coordinates")
        points = np.array(rows, float).reshape(-1, 3)
    except InvalidInputError as exc:
        raise InvalidInputError(f"--landmarks {path}: {exc}") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise InvalidInputError(f"--landmarks {path}: not a landmark file medfuse can read "
                                "(3D Slicer .fcsv / .mrk.json, or a CSV with columns r,a,s or l,p,s)") from None
    placed = ~np.isnan(points).all(axis=1) if len(points) else np.zeros(0, bool)
    if not placed.any():
        raise InvalidInputError(f"--landmarks {path}: no points" + (" placed" if len(points) else ""))
    if not np.isfinite(points[placed]).all():
        raise InvalidInputError(f"--landmarks {path}: a coordinate is not a finite number")
    if np.abs(points[placed]).max() > MAX_MM:
        raise InvalidInputError(f"--landmarks {path}: a coordinate of {np.abs(points[placed]).max():.3g} mm is no "
                                "point in a scanner; give world coordinates in mm")
    return points * TO_LPS[system]


def _system(value: str) -> str:
    value = value.strip().upper()
    system = {"0": "RAS", "1": "LPS"}.get(value, value)  # Slicer before 4.11 wrote 0 (RAS) / 1 (LPS)
    if system not in TO_LPS:
        raise InvalidInputError(f"unknown coordinate system {value!r} (RAS or LPS)")
    return system


def _fcsv(text: str) -> tuple[str, list[list[float]]]:
    """3D Slicer's fiducial CSV: ``# CoordinateSystem = LPS`` (RAS when absent), rows id,x,y,z,...
    (14 columns; Slicer 5 adds the position status, then another, unnamed in the header)."""
    system, rows = "RAS", []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = _system(value)
        elif line.strip():
            fields = next(csv.reader([line]))
            placed = len(fields) < 15 or fields[14].strip() in ("", PLACED_FCSV)
            rows.append([float(v) for v in fields[1:4]] if placed else [np.nan] * 3)
    return system, rows


def _markups_json(text: str) -> tuple[str, list[list[float]]]:
    """3D Slicer's markups JSON: every control point of every markup, in order."""
    doc = json.loads(text)
    system, rows = None, []
    for markup in doc["markups"]:
        this = _system(markup.get("coordinateSystem", "LPS"))  # Slicer writes LPS unless told otherwise
        if system not in (None, this):
            raise InvalidInputError("markups in different coordinate systems")
        system = this
        units = markup.get("coordinateUnits", "mm")
        units = units[0] if isinstance(units, list) and units else units  # or a code: ["mm", "UCUM", "millimeter"]
        if units not in TO_MM:
            raise InvalidInputError(f"unknown coordinateUnits {units!r} (mm or um)")
        for point in markup.get("controlPoints", []):
            placed = point.get("positionStatus", "defined" if "position" in point else "undefined") == "defined"
            rows.append([float(v) * TO_MM[units] for v in point["position"]] if placed else [np.nan] * 3)
    return system or "LPS", rows


def _plain_csv(text: str) -> tuple[str, list[list[float]]]:
    """A CSV whose header has the columns r,a,s (RAS+) or l,p,s (LPS+), other columns ignored; also
    tab-separated (3D Slicer's control point table as .tsv), or semicolon-separated with decimal
    commas (spreadsheets in many locales). A column ``defined`` of 0 marks a point not placed (Slicer's
    control point table, ExportControlPointsToCSV)."""
    lines = text.splitlines()
    header = next((line for line in lines if line.strip()), "")
    delimiter = max(",\t;", key=lambda d: len(header.split(d)))
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}
    number = (lambda v: float(v.replace(",", "."))) if delimiter == ";" else float
    defined = columns.get("defined")
    for system, names in (("RAS", "ras"), ("LPS", "lps")):
        if all(n in columns for n in names):
            return system, [[number(row[columns[n]]) for n in names]
                            if defined is None or row[defined].strip().lower() not in ("0", "false") else [np.nan] * 3
                            for row in reader]
    raise InvalidInputError("a CSV of landmarks needs a header with the columns r,a,s (RAS+, as NIfTI viewers "
                            "show it) or l,p,s (LPS+, as ITK and DICOM); x,y,z would not say which")


def fit_landmarks(fixed_file: str | os.PathLike[str], moving_file: str | os.PathLike[str]) -> LandmarkFit:
    """The rigid transform that best maps FIXED's landmarks onto MOVING's (least squares): a
    translation for one pair of points, a rotation and translation for three or more."""
    import SimpleITK as sitk

    fixed, moving = read_points(fixed_file), read_points(moving_file)
    files = (str(fixed_file), str(moving_file))
    if len(fixed) != len(moving):
        raise InvalidInputError(f"--landmarks: {len(fixed)} points on FIXED but {len(moving)} on MOVING; "
                                "give the same points, in the same order, on both")
    both = ~(np.isnan(fixed).any(axis=1) | np.isnan(moving).any(axis=1))
    left_out = tuple(int(i) + 1 for i in np.flatnonzero(~both))
    fixed, moving = fixed[both], moving[both]
    unplaced = f" ({len(fixed)} placed on both)" if left_out else ""
    if len(fixed) == 0:
        raise InvalidInputError("--landmarks: no point is placed on both FIXED and MOVING")
    if len(fixed) == 2:
        raise InvalidInputError(f"--landmarks: two points{unplaced} leave the rotation about their line open; "
                                "give one point (a shift) or three or more not on one line")
    if len(fixed) == 1:
        transform = sitk.Euler3DTransform()
        transform.SetCenter(tuple(float(v) for v in fixed[0]))
        transform.SetTranslation(tuple(float(v) for v in moving[0] - fixed[0]))
        return LandmarkFit(transform, fixed, moving, files, left_out)
    for points, side in ((fixed, "FIXED"), (moving, "MOVING")):
        spread = np.linalg.svd(points - points.mean(0), compute_uv=False)
        if spread[1] < MIN_SPREAD_MM:
            raise InvalidInputError(f"--landmarks: the points{unplaced} on {side} lie (nearly) on one line, which "
                                    "leaves a rotation open; add a point away from it")
    versor = sitk.LandmarkBasedTransformInitializer(
        sitk.VersorRigid3DTransform(), [float(v) for v in fixed.ravel()], [float(v) for v in moving.ravel()])
    transform = sitk.Euler3DTransform()
    transform.SetCenter(versor.GetCenter())
    transform.SetMatrix(versor.GetMatrix())
    transform.SetTranslation(versor.GetTranslation())
    return LandmarkFit(transform, fixed, moving, files, left_out)
