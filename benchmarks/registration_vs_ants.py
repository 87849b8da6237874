"""Rigid registration: medfuse (SimpleITK) vs ANTsPy ``Rigid`` on the SPM 2 mm templates.

T1 is FIXED; PET, Transm and T2 are MOVING, their headers moved by known rigid transforms.
Prints the mean target registration error over brain voxels and the wall time of each tool,
measured side by side in one run. Needs ../shared/data and `pip install antspyx`.

    python benchmarks/registration_vs_ants.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from medfuse_cli import read_image, write_image
from medfuse_cli.register import register

SPM = Path(__file__).resolve().parents[2] / "shared" / "data" / "volumes" / "spm12_mni_2mm"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
CASES = [((8, -6, 5), (7, -5, 8)), ((-10, 4, -7), (-6, 9, 5))]


def brain_points(fixed) -> np.ndarray:
    pts = np.argwhere(fixed.data > 0.3 * fixed.data.max())[::5]
    return (fixed.affine @ np.c_[pts, np.ones(len(pts))].T)  # RAS, homogeneous


def main() -> None:
    try:
        import ants
    except ImportError:
        sys.exit("needs antspyx: pip install antspyx")
    fixed_path = SPM / "OldNorm_T1.nii.gz"
    fixed = read_image(fixed_path)
    world = brain_points(fixed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("OldNorm_PET", "OldNorm_Transm", "OldNorm_T2"):
            for angles, shift in CASES:
                moving = read_image(SPM / f"{name}.nii.gz")
                rigid = np.eye(4)
                rigid[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
                rigid[:3, 3] = shift
                moving.affine = rigid @ moving.affine
                moving.nifti_geometry = None
                moved_path = Path(tmp) / f"{name}.nii.gz"
                write_image(moving, moved_path, overwrite=True)
                true = (rigid @ world)[:3].T  # where each fixed point's content now lies (RAS)

                moved = read_image(moved_path)
                t0 = time.perf_counter()
                reg = register(fixed, moved, "rigid")
                t_ours = time.perf_counter() - t0
                lps_pts = (LPS @ world)[:3].T
                ours = np.array([reg.transform.TransformPoint(tuple(p)) for p in lps_pts]) * [-1, -1, 1]

                f_ants, m_ants = ants.image_read(str(fixed_path)), ants.image_read(str(moved_path))
                t0 = time.perf_counter()
                out = ants.registration(fixed=f_ants, moving=m_ants, type_of_transform="Rigid", random_seed=1)
                t_ants = time.perf_counter() - t0
                import pandas as pd

                df = pd.DataFrame(lps_pts * [1, 1, 1], columns=["x", "y", "z"])
                # ANTs points are LPS; fwdtransforms map fixed -> moving for points with the inverse list
                mapped = ants.apply_transforms_to_points(3, df, out["fwdtransforms"], whichtoinvert=[False])
                theirs = mapped[["x", "y", "z"]].to_numpy() * [-1, -1, 1]
                rows.append((name, angles, shift, np.linalg.norm(ours - true, axis=1).mean(), t_ours,
                             np.linalg.norm(theirs - true, axis=1).mean(), t_ants))
    print(f"{'moving':16} {'rotation deg':>14} {'shift mm':>12} {'TRE medfuse':>12} {'s':>6} {'TRE ANTsPy':>11} {'s':>6}")
    for name, a, s, e1, t1, e2, t2 in rows:
        print(f"{name:16} {a!s:>14} {s!s:>12} {e1:12.3f} {t1:6.2f} {e2:11.3f} {t2:6.2f}")
    arr = np.array([r[3:] for r in rows], float)
    print(f"{'mean':44} {arr[:, 0].mean():12.3f} {arr[:, 1].mean():6.2f} {arr[:, 2].mean():11.3f} {arr[:, 3].mean():6.2f}")
    print(f"time ratio ANTsPy / medfuse: {arr[:, 3].sum() / arr[:, 1].sum():.2f}")


if __name__ == "__main__":
    main()
