"""Rigid registration on real patient scans, checked by the tumour drawn on each scan.

* IBSI STS002: MR T1, CT and FDG-PET cropped differently around a thigh sarcoma but in one world
  space (their tumour masks' centroids agree to 0.2 mm), so the right answer is the headers'
  alignment.
* TCIA STS001: an MR T1 of the thigh and a whole-body FDG-PET from another scanner four days later,
  in different frames of reference; the GTV_Mass contours of each series' RTSTRUCT give a rough
  truth (the centroids of two observers' contours, so only errors far above 10 mm mean anything).

Prints, per pair, the distance between where the registration maps FIXED's tumour centroid and
MOVING's tumour centroid, the start it chose, the rotation it found and its warnings. STS001 runs
twice: on its own, and from a translation by the offset between the two contours' centroids
(``--initial-transform``, as a user who located the tumour in both scans would give). Needs
../shared/data.

    python benchmarks/registration_real.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from medfuse_cli import read_image
from medfuse_cli.register import register

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IBSI = DATA / "volumes" / "ibsi_sts002_ct_mr_pet"


def mask_centroid(path: Path) -> np.ndarray:
    """Centroid (LPS mm) of a mask volume's non-zero voxels."""
    image = read_image(path)
    idx = np.argwhere(image.data > 0)
    return (image.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].mean(1) * [-1, -1, 1]


def contour_centroid(path: Path, roi: str = "GTV_Mass") -> np.ndarray:
    """Centroid (LPS mm) of the contour points of one ROI of an RTSTRUCT."""
    ds = pydicom.dcmread(path)
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == roi)
    contours = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)
    return np.concatenate([np.reshape(c.ContourData, (-1, 3)).astype(float) for c in contours.ContourSequence]).mean(0)


def main() -> None:
    cases = [(f"IBSI {f} <- {m}", IBSI / f"{f}_image.nii.gz", IBSI / f"{m}_image.nii.gz",
              mask_centroid(IBSI / f"{f}_mask.nii.gz"), mask_centroid(IBSI / f"{m}_mask.nii.gz"))
             for f, m in (("MR_T1", "PET"), ("MR_T1", "CT"), ("CT", "PET"))]
    mr = DATA / "volumes" / "tcia_sts001_mr_t1"
    pet = DATA / "dicom" / "pt_ge_discoveryst_fdg_sts001"
    cases.append(("TCIA STS001 MR_T1 <- PET (other scanner, other frame)", mr / "STS_001_MR_T1_AXIAL_SE.nii.gz",
                  pet / "dicom", contour_centroid(mr / "RS_STS_001_MR_T1.dcm"),
                  contour_centroid(pet / "rtstruct" / "RS_STS_001_PET.dcm")))
    name, fixed_path, moving_path, c_fixed, c_moving = cases[-1]
    offset = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.0, tuple(float(v) for v in c_moving - c_fixed))
    cases.append((name.replace("(other", "from the contours' offset (other"), fixed_path, moving_path, c_fixed,
                  c_moving, offset))
    print("| pair | tumour before mm | tumour after mm | start | rotation deg | s | warnings |")
    print("|---|--:|--:|---|--:|--:|---|")
    for name, fixed_path, moving_path, c_fixed, c_moving, *initial in cases:
        fixed, moving = read_image(fixed_path), read_image(moving_path)
        t0 = time.perf_counter()
        reg = register(fixed, moving, "rigid", initial=initial[0] if initial else None)
        seconds = time.perf_counter() - t0
        after = np.linalg.norm(np.array(reg.transform.TransformPoint(tuple(c_fixed))) - c_moving)
        summary = reg.summary()
        print(f"| {name} | {np.linalg.norm(c_fixed - c_moving):.1f} | {after:.1f} | {summary['start']} | "
              f"{summary['rotation_deg']:.1f} | {seconds:.1f} | {'; '.join(reg.warnings) or '-'} |")


if __name__ == "__main__":
    main()
