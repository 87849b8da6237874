"""What an input holds: series, modality, shape, spacing, orientation, intensities (no PHI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import MedfuseError
from .image import Image
from .io import FrameChoice, read_image


def describe_image(image: Image) -> dict[str, Any]:
    """A JSON-ready summary of an image (no patient identifiers)."""
    values = image.data
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    prov = image.provenance
    return {
        "source": prov.source,
        "format": prov.format,
        "series_uid": prov.series_uid,
        "series_number": prov.series_number,
        "series_description": prov.series_description,
        "modality": image.modality.value,
        "shape": list(image.shape),
        "color": image.is_color,
        "dtype": str(values.dtype),
        "spacing_mm": [round(s, 6) for s in image.spacing],
        "origin_mm_ras": [round(o, 6) for o in image.origin],
        "orientation": image.orientation,
        "affine_ras": [[round(float(v), 6) for v in row] for row in image.affine],
        "units": image.units,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
        "non_finite_voxels": int(values.size - finite.size),
        "notes": list(prov.steps),
    }


def describe_path(path: Path, series: str | None = None, frames: FrameChoice | None = None) -> list[dict[str, Any]]:
    """One summary per image series at ``path`` (every series of a DICOM input unless ``series``); a 4D
    input is described by the mean of its frames unless ``frames`` chooses one (a note says which)."""
    if frames is None or (frames.frame is None and not frames.mean):
        frames = FrameChoice(mean=True)
    is_dicom = path.is_dir() or path.suffix.lower() in (".zip", ".dcm")
    if is_dicom and series is None and path.exists():
        from .io.dicom import list_series

        found = list_series(path)
        if len(found) > 1:
            return [_describe_series(path, s, frames) for s in found]
    return [describe_image(read_image(path, series=series, frames=frames))]


def _describe_series(path: Path, info: Any, frames: FrameChoice | None) -> dict[str, Any]:
    """One series of a DICOM input that holds several; one that is not a volume (a localizer's three
    planes, say) is listed with the reason instead of failing the whole listing."""
    try:
        summary = describe_image(read_image(path, series=info.uid, frames=frames))
    except MedfuseError as exc:
        summary = {"source": path.name, "format": "dicom", "series_uid": info.uid, "series_number": info.number,
                   "series_description": info.description or None, "modality": info.modality,
                   "notes": [f"not readable as one volume: {exc}"], "error": str(exc)}
    if info.localizer:
        summary["notes"] = ["a localizer (scout) series", *summary["notes"]]
    return summary
