"""The one in-memory image type every stage takes and returns.

Orientation convention
----------------------
``Image.affine`` maps voxel indices ``(i, j, k)`` to **RAS+ world millimetres**
(+x towards the patient's Right, +y Anterior, +z Superior), the NIfTI / nibabel convention.
Readers convert at the edge (DICOM and SimpleITK are LPS+: x and y negated) and the voxel
array is kept in the order it was stored, so nothing is resampled on reading.

Every image has three spatial axes; a 2D raster is ``(width, height, 1)``. Colour images
carry a trailing RGB axis: ``(X, Y, Z, 3)``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GeometryError

__all__ = ["Image", "Modality", "NiftiGeometry", "Provenance", "axcodes"]


class Modality(str, enum.Enum):
    """Imaging modality, with DICOM's codes."""

    MR = "MR"
    CT = "CT"
    PT = "PT"
    NM = "NM"
    OT = "OT"

    @classmethod
    def parse(cls, value: str | Modality | None) -> Modality:
        """Coerce a user or header string (``MRI``, ``PET``, ``SPECT`` ...) to a modality.

        >>> Modality.parse("spect")
        <Modality.NM: 'NM'>
        """
        if isinstance(value, Modality):
            return value
        if value is None:
            return cls.OT
        key = str(value).strip().upper()
        aliases = {"MRI": "MR", "PET": "PT", "SPECT": "NM", "UNKNOWN": "OT", "": "OT"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; use one of {valid}, MRI, PET, SPECT") from None


@dataclass(frozen=True)
class NiftiGeometry:
    """The raw geometry fields of a NIfTI header, kept so a write reproduces them exactly."""

    sform: tuple[tuple[float, ...], ...]
    sform_code: int
    quatern: tuple[float, float, float]
    qoffset: tuple[float, float, float]
    pixdim: tuple[float, ...]
    qform_code: int
    affine: tuple[tuple[float, ...], ...]
    units: str = "mm"  # the header's spatial unit (the affine above is in mm whatever it is)


@dataclass
class Provenance:
    """Where an image came from, without patient identifiers (file base names only)."""

    source: str
    format: str
    series_uid: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    steps: list[str] = field(default_factory=list)
    frame_of_reference_uid: str | None = None  # DICOM: scans with different ones have unrelated coordinates

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def axcodes(affine: np.ndarray) -> str:
    """Orientation code of an affine, e.g. ``"RAS"`` or ``"LPS"`` (nearest axes)."""
    import nibabel as nib

    return "".join(c or "?" for c in nib.orientations.aff2axcodes(affine))


@dataclass
class Image:
    """Voxel array + RAS+ affine + modality + provenance.

    Parameters
    ----------
    data
        ``(X, Y, Z)`` or, for colour, ``(X, Y, Z, 3)``.
    affine
        4x4 voxel-to-RAS+ matrix in mm. Required: there is no silent identity.
    modality
        Imaging modality (``Modality.OT`` when unknown).
    units
        Intensity units, e.g. ``"HU"``, ``"BQML"``, ``"SUVbw"``, or ``None``.
    provenance
        Source description.
    nifti_geometry
        Raw NIfTI geometry of the source, used only to write an unchanged grid back bit for bit.

    Examples
    --------
    >>> img = Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    >>> img.spacing
    (2.0, 2.0, 3.0)
    >>> img.orientation
    'RAS'
    """

    data: np.ndarray
    affine: np.ndarray
    modality: Modality = Modality.OT
    units: str | None = None
    provenance: Provenance = field(default_factory=lambda: Provenance("<memory>", "memory"))
    nifti_geometry: NiftiGeometry | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise GeometryError("affine must be a finite 4x4 matrix")
        if not np.allclose(self.affine[3], [0, 0, 0, 1]):
            raise GeometryError("affine's last row must be 0 0 0 1")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise GeometryError("affine is singular (zero voxel size or collinear axes)")
        nd = self.data.ndim
        if not (nd == 3 or (nd == 4 and self.data.shape[3] == 3)):
            raise GeometryError(
                f"image data must be (X, Y, Z) or (X, Y, Z, 3) for colour, got shape {self.data.shape}"
            )
        if min(self.data.shape[:3]) < 1:
            raise GeometryError(f"image has an empty axis: shape {self.data.shape}")
        self.modality = Modality.parse(self.modality)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(int(s) for s in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def is_color(self) -> bool:
        return self.data.ndim == 4

    @property
    def is_2d(self) -> bool:
        return self.shape[2] == 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS+ position of voxel (0, 0, 0) in mm."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS+ directions of the array axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def is_sheared(self) -> bool:
        """True when the array axes are not perpendicular in the world (e.g. an uncorrected gantry tilt)."""
        d = self.direction
        return not np.allclose(d.T @ d, np.eye(3), atol=1e-4)

    @property
    def orientation(self) -> str:
        return axcodes(self.affine)

    def with_data(self, data: np.ndarray, **changes: Any) -> Image:
        """A new image on the same grid with other voxel values (geometry kept exactly)."""
        return dataclasses.replace(self, data=data, affine=self.affine.copy(), **changes)

    def same_grid(self, other: Image, atol: float = 1e-4) -> bool:
        """True when both images have the same spatial shape and (within ``atol`` mm) affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def __repr__(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Image(shape={self.data.shape}, spacing={sp} mm, orientation={self.orientation}, "
            f"modality={self.modality.value}, dtype={self.data.dtype}, source={self.provenance.source!r})"
        )
