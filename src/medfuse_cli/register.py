"""Registration of MOVING onto FIXED and resampling onto FIXED's grid (SimpleITK).

Multi-resolution Mattes mutual information on intensities clipped to their 0.5-99.5 percentiles,
rigid and then optionally affine, with a fixed sampling seed, fixed parameter scales and one
thread, so the same inputs give the same result bit for bit. Two starts go through the coarse
levels, the headers' alignment and the centres of mass (moments, when they are more than
``SAME_START_MM`` apart); the finest level continues from the one with the higher mutual
information. A start given by the user (a transform file, or a fit to paired landmarks) replaces
both. SimpleITK works in LPS+; :func:`medfuse_cli.io.itk.to_sitk` converts.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GeometryError, InputNotFoundError, InvalidInputError
from .image import Image
from .io.itk import LPS, native_stderr_dropped, to_sitk
from .io.raster import RASTER_FORMATS
from .landmarks import LandmarkFit, fit_landmarks
from .parallel import interruptible, itk_threads

log = logging.getLogger(__name__)

SHRINK = (4, 2, 1)  # multi-resolution levels, coarse to fine
MIN_VOXELS = 4  # ITK's recursive Gaussian smoothing of the pyramid needs 4 voxels along every axis
SAMPLING = (0.25, 0.15, 0.1)  # fraction of FIXED's voxels (regular grid) seen by the metric per level
MIN_STEP = 2e-3  # optimiser stops when its step (scaled units, about mm) falls below this
MAX_ROTATION = 20.0  # degrees; a larger rotation is reported as suspect (a wrong optimum, or no shared anatomy)
COARSE, FINE = (0, 1), (2,)  # levels every start goes through; the level only the chosen one does
SAME_START_MM = 10.0  # centres of mass closer than this to the headers' alignment are not a second start
LANDMARK_DRIFT_MM = 10.0  # registration moving the landmarks this much further from their fit is reported
MAX_NESTING = 8  # composites of one transform deeper than this are SimpleITK wrapping a type it has no class for
LANDMARK_FIT_MM = 10.0  # landmarks that fit a rigid motion only this badly (RMS) are reported: picks out of order
START_DRIFT_MM = 20.0  # registration moving FIXED's centre this far from where a .tfm start put it is reported


class TransformKind(str, enum.Enum):
    AUTO = "auto"  # rigid, unless both images share one grid (then taken as aligned)
    RIGID = "rigid"
    AFFINE = "affine"
    NONE = "none"


@dataclass
class Registration:
    """Outcome of :func:`register`: the transform (FIXED point -> MOVING point, LPS) and its quality."""

    transform: object  # SimpleITK.Transform
    kind: str
    skipped: str | None = None
    mi_before: float | None = None
    mi_after: float | None = None
    start: str | None = None  # "header", "moments", "--initial-transform" or "--landmarks": where it started
    starts_mi: dict[str, float] = field(default_factory=dict)  # each start's MI after the coarse levels
    warnings: list[str] = field(default_factory=list)
    landmarks: dict | None = None  # with --landmarks: their count, files and RMS distances (fit, result)
    start_shift_mm: float | None = None  # from a given start: how far the result moved FIXED's centre from it

    def summary(self) -> dict:
        params = self.transform.GetParameters()  # type: ignore[attr-defined]
        return {
            "kind": self.kind,
            "skipped": self.skipped,
            "mattes_mi_before": self.mi_before,
            "mattes_mi_after": self.mi_after,
            "start": self.start,
            "starts_mattes_mi_coarse": dict(self.starts_mi),  # smoothed, shrunk images: not on the scale of the two above
            "rotation_deg": None if self.skipped else rotation_degrees(self.transform),
            "parameters": [float(p) for p in params],
            "landmarks": self.landmarks,
            "start_shift_mm": self.start_shift_mm,
            "warnings": list(self.warnings),
        }


@dataclass
class GivenStart:
    """A registration start given by the user: the transform (FIXED point -> MOVING point, LPS) and the
    option it came from; with ``--landmarks``, their fit too."""

    transform: object
    option: str
    fit: LandmarkFit | None = None
    planar: bool = False  # a 2D transform file, read as the 3D transform that leaves z alone: for slices only


def given_start(initial_transform: str | os.PathLike[str] | None, landmarks: Sequence[str] | None,
                rigid: bool) -> GivenStart | None:
    """The start from ``--initial-transform`` or ``--landmarks FIXED_POINTS MOVING_POINTS`` (one at
    most); with ``rigid``, a transform file must be rigid (a rigid registration starts from it)."""
    if initial_transform is not None and landmarks:
        raise InvalidInputError("give --initial-transform or --landmarks, not both")
    if initial_transform is not None:
        transform, planar = read_transform(initial_transform, rigid=rigid)
        return GivenStart(transform, "--initial-transform", planar=planar)
    if landmarks:
        if len(landmarks) != 2:
            raise InvalidInputError("--landmarks takes two files: FIXED's points, then MOVING's")
        fit = fit_landmarks(*landmarks)
        return GivenStart(fit.transform, "--landmarks", fit)
    return None


def _in_plane(image, flat: bool):
    """A one-slice SimpleITK volume as a 2D image in its plane (the volume itself unless ``flat``);
    only for slices whose plane is the LPS x-y plane (PNG, TIFF, axial 2D NIfTI)."""
    if not flat:
        return image
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    if image.GetSize()[2] != 1 or not (np.allclose(d[2, :2], 0, atol=1e-6) and np.allclose(d[:2, 2], 0, atol=1e-6)):
        raise GeometryError("2D slices are registered in the x-y plane only; this slice lies in another plane: "
                            "use --transform none")
    return image[:, :, 0]


def _in_space(transform):
    """A 2D transform of the x-y plane as the 3D transform that leaves z alone (FIXED -> MOVING, LPS)."""
    import SimpleITK as sitk

    matrix = np.eye(3)
    matrix[:2, :2] = np.asarray(transform.GetMatrix(), float).reshape(2, 2)
    centre, shift = [*transform.GetCenter(), 0.0], [*transform.GetTranslation(), 0.0]
    if isinstance(transform, sitk.Euler2DTransform):
        out = sitk.Euler3DTransform()
        out.SetCenter(centre)
        out.SetRotation(0.0, 0.0, transform.GetAngle())
    else:
        out = sitk.AffineTransform(3)
        out.SetCenter(centre)
        out.SetMatrix([float(v) for v in matrix.ravel()])
    out.SetTranslation(shift)
    return out


def _world_corners(image: Image) -> np.ndarray:
    sh = np.array(image.shape) - 1
    idx = np.array([[i, j, k, 1] for i in (0, sh[0]) for j in (0, sh[1]) for k in (0, sh[2])], float).T
    return (image.affine @ idx)[:3].T


def _mapped_corners(image: Image, transform=None) -> np.ndarray:
    """``image``'s corners in RAS world mm, mapped by ``transform`` (SimpleITK, LPS) when given."""
    a = _world_corners(image)
    if transform is None:
        return a
    return np.array([transform.TransformPoint(tuple(float(v) for v in LPS @ p)) for p in a]) @ LPS


def check_overlap(fixed: Image, moving: Image, transform=None) -> None:
    """Refuse pairs whose physical bounding boxes do not intersect (FIXED's mapped by ``transform``,
    a SimpleITK transform FIXED point -> MOVING point in LPS, when given)."""
    a, b = _mapped_corners(fixed, transform), _world_corners(moving)
    lo = np.maximum(a.min(0), b.min(0))
    hi = np.minimum(a.max(0), b.max(0))
    # 2D images are one voxel thick: allow half a voxel of slack on every axis
    slack = 0.5 * np.maximum(np.max(fixed.spacing), np.max(moving.spacing))
    if np.any(hi + slack < lo):
        rasters = [image.provenance.source for image in (fixed, moving) if image.provenance.format in RASTER_FORMATS]
        hint = ("(different frames of reference?); check the inputs" if len(rasters) != 1 else
                f"({rasters[0]} is a PNG/TIFF/JPEG/BMP slice, which has no position in space): give both as PNG/TIFF "
                "slices of one view, or both with their geometry (NIfTI, DICOM)")
        raise GeometryError(f"{fixed.provenance.source} and {moving.provenance.source} do not overlap in space {hint}")


@contextlib.contextmanager
def _one_thread(reg):
    """Run ``reg`` on one thread: ITK's multi-threaded Mattes MI adds its histograms in a
    varying order, so results differ in the last bits from run to run. ITK's "no overlap"
    errors become a :class:`GeometryError`."""
    reg.SetNumberOfThreads(1)
    try:
        with itk_threads(1):
            yield reg
    except RuntimeError as exc:
        if "overlap" not in str(exc):
            raise
        raise GeometryError("registration found no overlap between FIXED and MOVING where it started or went; "
                            "give (or check) --landmarks or --initial-transform, or use --transform none") from None


def _mattes_method():
    """Mattes MI, 32 bins, linear interpolation, image gradients by central differences at the
    sample points (ITK's default gradient images cost more than the whole optimisation)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _mattes(fixed, moving, transform) -> float:
    reg = _mattes_method()
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInitialTransform(transform, inPlace=False)
    with _one_thread(reg):
        return -float(interruptible(lambda: reg.MetricEvaluate(fixed, moving)))


TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")  # what ITK writes and reads back (by the suffix)


def transform_suffixes() -> str:
    """``.tfm, .txt, .h5, .hdf5 or .mat``, for messages."""
    return ", ".join(TRANSFORM_SUFFIXES[:-1]) + " or " + TRANSFORM_SUFFIXES[-1]


def read_transform(path: str | os.PathLike[str], rigid: bool = False) -> tuple[Any, bool]:
    """A rigid or affine transform saved by ITK / SimpleITK (``.tfm``, ``.txt``, ``.h5``, ``.mat``;
    LPS, FIXED point -> MOVING point, as ``medfuse register --save-transform`` writes it), and whether
    it was 2D (one of the x-y plane, as a SimpleITK registration of two PNG slices gives: returned as
    the 3D transform that leaves z alone); with ``rigid``, refused unless it is rigid (a registration
    must start from it)."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"--initial-transform {path}: a folder, not a transform file")
    if not path.is_file():
        raise InputNotFoundError(f"--initial-transform {path}: no such file")
    _check_parameter_counts(path)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            name = str(path)
            if path.suffix != path.suffix.lower():  # ITK picks its reader by the suffix, lower case only (T.MAT)
                name = shutil.copyfile(path, Path(tmp) / f"t{path.suffix.lower()}")
            with native_stderr_dropped():  # HDF5 prints its whole error stack for a damaged .h5
                transform = sitk.ReadTransform(str(name)).Downcast()
    except (RuntimeError, UnicodeDecodeError):  # ITK's message may quote the file's bytes, which are not UTF-8
        raise InvalidInputError(f"--initial-transform {path}: not a transform file ITK can read "
                                f"({transform_suffixes()}){_plain_matrix_hint(path)}") from None
    try:
        transform = _unwrapped(transform, path)
        if isinstance(transform, sitk.CompositeTransform) and _linear(transform, path):
            transform = _flattened(transform)
    except RuntimeError:  # SimpleITK cannot hand out a part (a 4D composite inside)
        raise InvalidInputError(f"--initial-transform {path}: holds transforms SimpleITK cannot take apart; "
                                "not a rigid or affine transform") from None
    planar = transform.GetDimension() == 2
    if isinstance(transform, sitk.TranslationTransform):
        shift = (*transform.GetOffset(), 0.0)[:3]
        transform = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.0, shift)
    if not hasattr(transform, "GetMatrix") or transform.GetDimension() not in (2, 3):
        raise InvalidInputError(f"--initial-transform {path}: {transform.GetName()} is not a rigid or affine transform")
    if transform.GetDimension() == 2:
        transform = _in_space(transform)
    if rigid:
        _rigid_start(transform)
    return transform, planar


_PARAMETERS = {  # how many parameters ITK's linear transform types take, by dimension
    "TranslationTransform": lambda d: d, "ScaleTransform": lambda d: d, "AffineTransform": lambda d: d * (d + 1),
    "MatrixOffsetTransformBase": lambda d: d * (d + 1), "Euler2DTransform": lambda d: 3, "Rigid2DTransform": lambda d: 3,
    "Similarity2DTransform": lambda d: 4, "Euler3DTransform": lambda d: 6, "VersorRigid3DTransform": lambda d: 6,
    "VersorTransform": lambda d: 3, "Similarity3DTransform": lambda d: 7, "ScaleVersor3DTransform": lambda d: 9,
    "ComposeScaleSkewVersor3DTransform": lambda d: 12, "ScaleSkewVersor3DTransform": lambda d: 15}


def _matlab_v4_sizes(raw: bytes) -> dict[str, int] | None:
    """The variables of a MATLAB version 4 file (ITK's and ANTs' .mat) and their numbers of values,
    or None unless it is one, whole: checked here because ITK's reader corrupted the heap on stray
    bytes and SciPy's spun for ever on a header of 4 billion columns."""
    for order, types in (("<", (0, 10)), (">", (1000, 1010))):  # double or single, either byte order
        sizes, at = {}, 0
        while at + 20 <= len(raw):
            kind, rows, columns, imaginary, length = struct.unpack_from(f"{order}5i", raw, at)
            name = raw[at + 20: at + 20 + length - 1]
            count = rows * columns
            end = at + 20 + length + count * (8 if kind % 100 == 0 else 4)
            if kind not in types or min(rows, columns) < 0 or imaginary or not 1 < length <= 64 or end > len(raw) \
                    or not re.fullmatch(rb"\w+", name):
                break
            sizes[name.decode()] = count
            at = end
        else:
            if sizes and at == len(raw):
                return sizes
    return None


def _linear_kind(kind: str) -> re.Match | None:
    """``kind`` (``Euler3DTransform_double_3_3``) split into type and dimension, when it is one of
    :data:`_PARAMETERS`."""
    match = re.fullmatch(r"(\w+?)_(?:double|float)_([23])_[23]", kind)
    return match if match and match[1] in _PARAMETERS else None


def _check_parameter_counts(path: Path) -> None:
    """ITK's text and MATLAB transform readers take any number of parameters for a type and then read
    past them: a hand-written Euler3DTransform of three numbers (a shift, meant) corrupted the heap and
    ended in a crash, after writing an output moved by whatever lay beyond. Count them first (and the
    fixed parameters, the centre, which must not be short either); a text file must be text."""
    suffix = path.suffix.lower()
    blocks: list[list] = []  # [type, number of parameters, number of fixed parameters or None]
    if suffix in (".tfm", ".txt"):
        with open(path, "rb") as handle:
            raw = handle.read(1 << 20)
        if re.search(rb"[^\t\n\r\x20-\x7e]", raw):  # ITK's text parser crashed on stray bytes
            raise InvalidInputError(f"--initial-transform {path}: holds bytes other than ASCII text; not an ITK text "
                                    "transform")
        for line in raw.decode("ascii").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "Transform":
                blocks.append([value, None, None])
            elif key in ("Parameters", "FixedParameters") and blocks:
                try:
                    numbers = [float(v) for v in value.split()]
                except ValueError:
                    numbers = [np.nan]
                if not np.isfinite(numbers).all():
                    raise InvalidInputError(f"--initial-transform {path}: {key} of {blocks[-1][0]} holds other things "
                                            f"than finite numbers: {value[:40]!r}")
                blocks[-1][1 if key == "Parameters" else 2] = len(numbers)
    elif suffix == ".mat":
        sizes = _matlab_v4_sizes(path.read_bytes()[: 1 << 20])
        kinds = [name for name in sizes or () if name != "fixed"]
        if len(kinds) != 1 or "fixed" not in sizes or not _linear_kind(kinds[0]):
            raise InvalidInputError(f"--initial-transform {path}: not a linear transform as ITK and ANTs write .mat "
                                    "(MATLAB version 4: the type's parameters and 'fixed')"
                                    f"{_plain_matrix_hint(path) or '; an SPM .mat holds none'}")
        blocks = [[kinds[0], sizes[kinds[0]], sizes["fixed"]]]
    for kind, count, fixed in blocks:
        match = _linear_kind(kind)
        if match is None:
            continue
        expected, dim = _PARAMETERS[match[1]], int(match[2])
        centre = 0 if match[1] == "TranslationTransform" else dim
        if count != expected(dim) or (fixed or 0) < centre:
            said = f"{count} parameters" if count != expected(dim) else f"{fixed or 0} fixed parameters"
            raise InvalidInputError(f"--initial-transform {path}: {match[1]} takes {expected(dim)} parameters and "
                                    f"{centre} fixed ones (its centre), the file gives {said}")


def _unwrapped(transform, path: Path):
    """``transform`` without the composites of one part around it. A part SimpleITK has no class for
    comes back as such a composite of itself, again and again (ITK's MatrixOffsetTransformBase, the
    type of ANTs' GenericAffine .mat: medfuse looped on it for ever); it is read as the affine transform
    its parameters make (matrix, shift; centre) when they fit one, refused otherwise."""
    import SimpleITK as sitk

    for _ in range(MAX_NESTING):
        if not (isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1):
            return transform
        transform = transform.GetNthTransform(0).Downcast()
    dim, parameters, centre = transform.GetDimension(), transform.GetParameters(), transform.GetFixedParameters()
    if len(parameters) != dim * (dim + 1) or len(centre) != dim:
        raise InvalidInputError(f"--initial-transform {path}: holds a transform SimpleITK has no class for and that is "
                                "not a matrix and a shift")
    affine = sitk.AffineTransform(dim)
    affine.SetFixedParameters(centre)
    affine.SetParameters(parameters)
    return affine


def _linear(transform, path: Path) -> bool:
    """Whether every part of a composite transform is a matrix and a shift."""
    import SimpleITK as sitk

    parts = [_unwrapped(transform.GetNthTransform(i).Downcast(), path) for i in range(transform.GetNumberOfTransforms())]
    return all(_linear(part, path) if isinstance(part, sitk.CompositeTransform) else
               isinstance(part, sitk.TranslationTransform) or hasattr(part, "GetMatrix") for part in parts)


def _flattened(composite):
    """A composite of linear transforms (as ANTs writes its stages uncollapsed, or Slicer a chain) as
    the one affine transform that maps every point as it does."""
    import SimpleITK as sitk

    dim = composite.GetDimension()
    origin = np.asarray(composite.TransformPoint((0.0,) * dim))
    columns = [np.asarray(composite.TransformPoint(tuple(np.eye(dim)[i]))) - origin for i in range(dim)]
    flat = sitk.AffineTransform(dim)
    flat.SetMatrix([float(v) for v in np.stack(columns, axis=1).ravel()])
    flat.SetTranslation([float(v) for v in origin])
    return flat


def _plain_matrix_hint(path: Path) -> str:
    """For a file that holds only a 4x4 matrix (FSL FLIRT's .mat, a NumPy text dump): what it lacks
    and how to convert it; otherwise nothing."""
    try:
        with open(path, "rb") as handle:
            rows = [line.split() for line in handle.read(4096).decode("ascii").splitlines() if line.strip()]
        if len(rows) != 4 or any(len(row) != 4 for row in rows):
            return ""
        [float(v) for row in rows for v in row]
    except (OSError, UnicodeDecodeError, ValueError):
        return ""
    return ("; it is a bare 4x4 matrix (as FSL FLIRT writes), which does not say its coordinates or direction: "
            "convert one of flirt -in MOVING -ref FIXED with c3d_affine_tool -ref FIXED -src MOVING FILE -fsl2ras "
            "-oitk OUT.txt (Convert3D), or give --landmarks")


def _rigid_start(transform):
    """A rigid ``transform`` as an Euler transform, the start of a rigid optimisation."""
    import SimpleITK as sitk

    matrix = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-4) or np.linalg.det(matrix) < 0:
        raise InvalidInputError("--initial-transform: not a rigid transform (it scales, shears or mirrors); "
                                "use it as it is with --transform none")
    u, _, vt = np.linalg.svd(matrix)  # exactly orthonormal: ITK refuses a matrix rounded in a text file
    start = sitk.Euler3DTransform()
    start.SetCenter(transform.GetCenter())
    start.SetMatrix(tuple((u @ vt).ravel()))
    start.SetTranslation(transform.GetTranslation())
    return start


def _check_flat_start(fixed: Image, moving: Image, kind: TransformKind, initial: GivenStart | None) -> None:
    """Two 2D slices take a given transform only as it is (``--transform none``), and only one that keeps
    FIXED's slice in MOVING's plane (a rotation about the normal, a shift in the plane); a FIXED slice
    placed in a MOVING volume takes any."""
    if initial is not None and initial.planar and not (fixed.is_2d and moving.is_2d):
        raise GeometryError(f"{initial.option} holds a 2D transform, which is for two 2D slices; "
                            "give a 3D one for a volume")
    if initial is None or not moving.is_2d:  # FIXED a slice of MOVING's volume: any transform maps it into it
        return
    if kind is not TransformKind.NONE:
        raise GeometryError("2D slices are registered from their contents only; give --initial-transform or "
                            "--landmarks with --transform none (an in-plane transform, applied as it is)")
    corners = _mapped_corners(fixed, initial.transform)
    k = (np.linalg.inv(moving.affine) @ np.c_[corners, np.ones(len(corners))].T)[2]
    if np.max(np.abs(k)) > 0.5:
        raise GeometryError(f"{initial.option} moves the 2D slice out of its plane (up to "
                            f"{np.max(np.abs(k)) * moving.spacing[2]:.1f} mm); a slice takes only a rotation "
                            "about its normal and a shift within its plane")


def register(fixed: Image, moving: Image, kind: str | TransformKind = "auto", seed: int = 0,
             initial: GivenStart | None = None) -> Registration:
    """Find the transform that maps FIXED's world points into MOVING (SimpleITK convention).

    ``initial`` (from :func:`given_start`) is the only start, and with ``kind`` none the result.
    Otherwise returns an identity transform, marked ``skipped``, when ``kind`` is ``none``, or
    ``auto`` and both images share one grid (``auto`` is ``rigid`` otherwise; ``rigid`` and
    ``affine`` register images on one grid too). A FIXED slice in a MOVING volume is never registered:
    ``auto`` means ``none`` and ``rigid`` / ``affine`` are refused. ``mattes_mi_*`` are SimpleITK's
    Mattes MI (higher is better).
    """
    import SimpleITK as sitk

    kind = TransformKind(kind)
    slice_in_volume = fixed.is_2d and not moving.is_2d
    if slice_in_volume:
        if kind in (TransformKind.RIGID, TransformKind.AFFINE):
            raise GeometryError(f"{fixed.provenance.source} is one slice and {moving.provenance.source} a volume: they are "
                                "aligned from their headers only (no slice-to-volume registration); use --transform auto "
                                "or none, with --initial-transform or --landmarks where the headers need a correction")
        kind = TransformKind.NONE
    _check_flat_start(fixed, moving, kind, initial)
    check_overlap(fixed, moving, None if initial is None else initial.transform)
    if kind is TransformKind.NONE:
        if initial is not None:
            return _with_landmarks(Registration(initial.transform, kind.value, start=initial.option), initial)
        why = "one slice of a volume: aligned from the headers" if slice_in_volume else "--transform none"
        result = Registration(sitk.Transform(3, sitk.sitkIdentity), kind.value, skipped=why)
        if _unrelated_frames(fixed, moving):
            result.warnings.append("FIXED and MOVING are in different frames of reference (DICOM FrameOfReferenceUID): "
                                   "their headers do not relate them, yet they were aligned from the headers alone "
                                   "(no registration); give a start with --landmarks or --initial-transform")
        return result
    if kind is TransformKind.AUTO:
        if fixed.same_grid(moving) and initial is None:
            return Registration(sitk.Transform(3, sitk.sitkIdentity), kind.value, skipped="inputs share one grid")
        kind = TransformKind.RIGID
    flat = fixed.is_2d or moving.is_2d
    axes, what = (2, "slice") if flat else (3, "volume")
    for image in (fixed, moving):
        if min(image.shape[:axes]) < MIN_VOXELS:
            thin = min(image.shape[:axes])
            raise GeometryError(f"{image.provenance.source} is {thin} voxel{'s' if thin > 1 else ''} thin; registering a {what} "
                                f"needs at least {MIN_VOXELS} along every axis (use --transform none for an aligned pair)")
    m = _in_plane(to_sitk(_winsorised(_grey(moving))), flat)
    f = _in_plane(_no_finer_than(to_sitk(_winsorised(_grey(fixed))), min(m.GetSpacing()) / 2), flat)
    dim = f.GetDimension()
    mi_before = _mattes(f, m, sitk.Transform(dim, sitk.sitkIdentity) if initial is None else initial.transform)
    coarse = {name: _optimise(f, m, start, seed, rigid=True, levels=COARSE) for name, start in _starts(f, m, initial)}
    start = max(coarse, key=lambda name: coarse[name][1])
    transform, _ = _optimise(f, m, coarse[start][0], seed, rigid=True, levels=FINE)
    if kind is TransformKind.AFFINE:
        affine = sitk.AffineTransform(dim)
        affine.SetMatrix(transform.GetMatrix())
        affine.SetTranslation(transform.GetTranslation())
        affine.SetCenter(transform.GetCenter())
        transform, _ = _optimise(f, m, affine, seed, rigid=False)
    mi_after = _mattes(f, m, transform)
    if flat:
        transform = _in_space(transform)
    result = Registration(transform, kind.value, mi_before=mi_before, mi_after=mi_after, start=start,
                          starts_mi={name: value for name, (_, value) in coarse.items()})
    result = _with_landmarks(result, initial)
    if initial is not None:
        result.start_shift_mm = round(_shift_at_centre(fixed, initial.transform, transform), 3)
    result.warnings += _suspicions(fixed, moving, result, initial)
    return result


def _shift_at_centre(fixed: Image, start, result) -> float:
    """How far apart (mm) two transforms map FIXED's centre."""
    centre = LPS @ (fixed.affine @ np.r_[(np.asarray(fixed.data.shape[:3]) - 1) / 2, 1.0])[:3]
    return float(np.linalg.norm(np.subtract(result.TransformPoint(tuple(centre)), start.TransformPoint(tuple(centre)))))


def _with_landmarks(result: Registration, initial: GivenStart | None) -> Registration:
    """``result`` with the landmarks' RMS distances, after their fit and after the registration."""
    if initial is not None and initial.fit is not None:
        fit = initial.fit
        result.landmarks = {"count": len(fit.fixed), "files": list(fit.files), "fit_rms_mm": round(fit.rms_mm(), 3),
                            "rms_mm": round(fit.rms_mm(result.transform), 3)}
        if result.landmarks["fit_rms_mm"] > LANDMARK_FIT_MM:
            distances = fit.distances_mm()
            kept = [i for i in range(1, len(distances) + len(fit.left_out) + 1) if i not in fit.left_out]
            worst = int(np.argmax(distances))
            result.warnings.append(
                f"--landmarks: the points fit a rigid motion only to {result.landmarks['fit_rms_mm']:.1f} mm (RMS); "
                f"the farthest, point {kept[worst]}, lies {distances[worst]:.1f} mm from its partner: check that both "
                "files hold the same points in the same order")
        if fit.left_out:
            result.landmarks["left_out"] = list(fit.left_out)
            numbers = ", ".join(map(str, fit.left_out))
            result.warnings.append(f"--landmarks: point{'s' if len(fit.left_out) > 1 else ''} {numbers} not placed on "
                                   f"FIXED or MOVING (unset or marked missing in the file): left out, the fit uses the "
                                   f"{len(fit.fixed)} placed on both")
    return result


def _starts(f, m, initial) -> list[tuple[str, Any]]:
    """The named starts that go through the coarse levels: the given transform alone; or the headers'
    alignment, right for scans that share a frame of reference however their fields of view differ (a
    PET/CT, a cropped volume), and the centres of mass, for headers far off (ties go to the headers;
    centres of mass within ``SAME_START_MM`` of the headers' alignment would find the same optimum)."""
    import SimpleITK as sitk

    if initial is not None:
        return [(initial.option, _rigid_start(initial.transform))]
    euler = sitk.Euler2DTransform if f.GetDimension() == 2 else sitk.Euler3DTransform
    moments = sitk.CenteredTransformInitializer(f, m, euler(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    header = euler()
    header.SetCenter(moments.GetCenter())
    if np.linalg.norm(moments.GetTranslation()) > SAME_START_MM:
        return [("header", header), ("moments", moments)]
    return [("header", header)]


def _suspicions(fixed: Image, moving: Image, result: Registration, given: GivenStart | None) -> list[str]:
    """Warnings about a registration result a person should check."""
    warnings = []
    if result.landmarks and result.landmarks["rms_mm"] > result.landmarks["fit_rms_mm"] + LANDMARK_DRIFT_MM:
        warnings.append(f"registration moved the landmarks {result.landmarks['rms_mm']:.1f} mm (RMS) from their "
                        f"partners, where their fit left {result.landmarks['fit_rms_mm']:.1f} mm: check the figure "
                        "(--figure); to keep the landmark fit as it is, add --transform none")
    if given is not None and given.fit is None and (result.start_shift_mm or 0.0) > START_DRIFT_MM:
        warnings.append(f"registration moved FIXED's centre {result.start_shift_mm:.1f} mm from where "
                        f"{given.option} put it: check the figure (--figure); to apply your {given.option} as "
                        "it is, add --transform none")
    if result.mi_after is not None and result.mi_before is not None and result.mi_after < result.mi_before - 1e-3:
        warnings.append(f"registration lowered mutual information ({result.mi_before:.3f} -> {result.mi_after:.3f}); "
                        "check the result")
    if given is None and _unrelated_frames(fixed, moving):
        warnings.append(
            "FIXED and MOVING are in different frames of reference (DICOM FrameOfReferenceUID): their headers do "
            "not relate them, so the registration had only their contents to go by; check the figure (--figure), "
            "or give a start with --landmarks or --initial-transform"
        )
    angle = rotation_degrees(result.transform)
    if angle > MAX_ROTATION:
        hint = (f"to apply your {given.option} as it is, add --transform none" if given is not None
                else "if the inputs' headers already align them, use --transform none")
        warnings.append(f"registration rotated MOVING by {angle:.0f} degrees, more than scans of one patient usually "
                        f"differ: check the figure (--figure); {hint}")
    return warnings


def _unrelated_frames(fixed: Image, moving: Image) -> bool:
    """Whether both are DICOM scans in different frames of reference (unrelated coordinates)."""
    frames = {image.provenance.frame_of_reference_uid for image in (fixed, moving)}
    return None not in frames and len(frames) == 2


def rotation_degrees(transform) -> float:
    """Angle of the rotation in a rigid or affine SimpleITK transform (its matrix's nearest rotation)."""
    u, _, vt = np.linalg.svd(np.asarray(transform.GetMatrix(), float).reshape(3, 3))
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def _grey(image: Image) -> Image:
    if not image.is_color:
        return image
    from .intensity import luminance

    return image.with_data(luminance(image.data))


def _no_finer_than(image, spacing: float):
    """FIXED for the metric: smoothed and resampled so that no axis is finer than ``spacing`` mm (half
    of MOVING's finest), when that saves at least half the voxels. A 0.4 mm MR pixel against a 4.7 mm
    PET voxel adds time, not accuracy; the transform is found in world coordinates, so it holds for
    FIXED's own grid."""
    import SimpleITK as sitk

    old = np.array(image.GetSpacing(), float)
    new = np.maximum(old, spacing)
    was = np.array(image.GetSize())
    size = np.maximum(1, np.round(was * old / new)).astype(int)
    # never below MIN_VOXELS along an axis (a FIXED a few MOVING voxels wide): there, coarsened less
    few = size < np.minimum(was, MIN_VOXELS)
    size[few] = np.minimum(was, MIN_VOXELS)[few]
    new[few] = (old * was / size)[few]
    if np.prod(size) > np.prod(was) / 2:
        return image
    variance = [float(v) for v in ((new - old) / 2) ** 2]  # mm^2, only where the grid coarsens
    smooth = sitk.DiscreteGaussian(image, variance, 32, 0.01, True)
    return sitk.Resample(smooth, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [float(v) for v in new], image.GetDirection(), 0.0, sitk.sitkFloat32)


def _winsorised(image: Image) -> Image:
    """Intensities clipped to their 0.5-99.5 percentiles, as ANTs' ``--winsorize-image-intensities``:
    a hot bladder or tumour in a PET, or metal in a CT, would otherwise squeeze the rest of the image
    into one or two of the metric's 32 histogram bins. The window is the normalisation's (without a
    CT window), so registration and fusion see the same range."""
    from .intensity import window_for

    window = window_for(image)
    return image.with_data(np.clip(image.data, window.lo, window.hi).astype(np.float32))


def _optimise(fixed, moving, initial, seed: int, rigid: bool, levels: tuple[int, ...] = (0, 1, 2)):
    """Optimise from ``initial`` through the resolution ``levels`` (indices into ``SHRINK``); returns
    the transform and the metric's last value (higher is better; comparable between runs of the
    same levels, which sample the same points)."""
    import SimpleITK as sitk

    reg = _mattes_method()
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    # a slice has few pixels: the metric sees all of them (a tenth left MRI-PET turns half found)
    share = [1.0 if fixed.GetDimension() == 2 else SAMPLING[i] for i in levels]
    reg.SetMetricSamplingPercentagePerLevel(share, seed + 1)  # ITK's seed 0 = wall clock
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=MIN_STEP, numberOfIterations=100, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6
    )
    # Fixed parameter scales (ITK's estimator samples points at random, which breaks
    # bit-for-bit repeatability): a unit change of a rotation angle or matrix entry moves
    # points by about the image radius r, a translation by 1 mm.
    size = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    radius2 = float((np.linalg.norm(size) / 2) ** 2)
    dim = fixed.GetDimension()
    scales = [radius2] * (dim * (dim - 1) // 2) + [1.0] * dim if rigid else [radius2] * dim * dim + [1.0] * dim
    reg.SetOptimizerScales(scales)
    # a FIXED a few voxels wide keeps two along its longest axis (shrunk to one voxel it is constant,
    # and ITK's metric fails)
    factors = [min(SHRINK[i], max(1, max(fixed.GetSize()) // 2)) for i in levels]
    reg.SetShrinkFactorsPerLevel(factors)
    reg.SetSmoothingSigmasPerLevel([f / 2 if f > 1 else 0.0 for f in factors])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    with _one_thread(reg):
        out = interruptible(lambda: reg.Execute(fixed, moving))
    if isinstance(out, sitk.CompositeTransform) and out.GetNumberOfTransforms() == 1:
        out = out.GetNthTransform(0)
    log.debug("registration stopped: %s", reg.GetOptimizerStopConditionDescription())
    return out, -float(reg.GetMetricValue())


def unsheared(image: Image) -> Image:
    """A sheared volume resampled (linearly) onto the orthogonal grid that covers it: its first two
    axes and spacings, the third along their normal with the slices' own spacing, as dcm2niix
    corrects a gantry tilt. Images that are not sheared come back as they are."""
    if not image.is_sheared:
        return image
    from scipy import ndimage

    lin = image.affine[:3, :3]
    x = lin[:, 0] / np.linalg.norm(lin[:, 0])
    y = lin[:, 1] - (lin[:, 1] @ x) * x
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    z *= np.sign(z @ lin[:, 2])
    axes = np.stack([x, y, z], axis=1)
    spacing = np.array([np.linalg.norm(lin[:, 0]), abs(lin[:, 1] @ y), abs(lin[:, 2] @ z)])
    n = np.array(image.shape[:3]) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
    local = (corners @ lin.T + image.affine[:3, 3]) @ axes  # the corners in the new axes (mm)
    low = local.min(0)
    shape = tuple(int(v) for v in np.ceil((local.max(0) - low) / spacing - 1e-6) + 1)
    out_affine = np.eye(4)
    out_affine[:3, :3] = axes * spacing
    out_affine[:3, 3] = axes @ low
    index = np.linalg.inv(image.affine) @ out_affine  # output voxel -> input voxel
    def resampled(values: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(values.astype(np.float32), index[:3, :3], offset=index[:3, 3],
                                        output_shape=shape, order=1, mode="constant", cval=float(np.min(values)))

    data = (np.stack([resampled(image.data[..., c]) for c in range(3)], axis=-1) if image.is_color
            else resampled(image.data))
    log.warning("%s: its grid is sheared (e.g. an uncorrected gantry tilt): resampled onto an orthogonal grid of "
                "%s voxels of %s mm", image.provenance.source, "x".join(map(str, shape)),
                "x".join(f"{v:.3g}" for v in spacing))
    return Image(data=data, affine=out_affine, modality=image.modality, units=image.units,
                 provenance=image.provenance)


def resample_to(moving: Image, fixed: Image, transform=None, linear: bool = True) -> Image:
    """MOVING's values on FIXED's grid (world mapping through ``transform``, identity if None)."""
    import SimpleITK as sitk

    if moving.same_grid(fixed) and transform is None:
        return moving.with_data(moving.data.copy())
    reference = to_sitk(_grey(fixed) if fixed.is_color else fixed)
    transform = transform or sitk.Transform(3, sitk.sitkIdentity)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    channels = range(3) if moving.is_color else [None]
    outs = []
    for c in channels:
        src = to_sitk(moving, channel=c)
        fill = float(np.min(moving.data if c is None else moving.data[..., c]))
        res = sitk.Resample(src, reference, transform, interp, fill, sitk.sitkFloat32)
        outs.append(sitk.GetArrayFromImage(res).transpose(2, 1, 0))
    data = np.stack(outs, axis=-1) if moving.is_color else outs[0]
    return Image(
        data=data.astype(np.float32),
        affine=fixed.affine.copy(),
        modality=moving.modality,
        units=moving.units,
        provenance=moving.provenance,
        nifti_geometry=fixed.nifti_geometry,
    )
