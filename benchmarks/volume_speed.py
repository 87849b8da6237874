"""End-to-end 3D fusion on 2 CPU cores: seconds and peak memory, and how they grow with volume size.

FIXED is the MNI ICBM152 2009a T1 (197x233x189, 1 mm); MOVING is the SPM PET template (2 mm,
the same MNI space on another grid). Every run is one ``medfuse fuse FIXED MOVING -o OUT
--method M --no-metrics`` process (read, rigid registration, resampling, normalisation, fusion,
writing), so its peak resident memory is measured alone (its ``VmHWM``). Growth with size: the
same T1 resampled to 2, 1.5, 1 and 0.8 mm (about 0.9, 2.6, 8.7 and 17 million voxels).

    python benchmarks/volume_speed.py [--methods dcfb3d,laplacian] [--sizes 2,1.5,1,0.8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from common import run_measured
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
T1 = ROOT.parent / "shared" / "data" / "volumes" / "nilearn_mni152_2009a_1mm" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
PET = ROOT / "examples" / "spm12" / "OldNorm_PET.nii.gz"


def resampled_t1(mm: float, folder: Path) -> Path:
    """The 1 mm T1 on an isotropic ``mm`` grid covering the same field of view."""
    if mm == 1.0:
        return T1
    img = nib.load(T1)
    zoom = 1.0 / mm
    data = ndimage.zoom(np.asarray(img.dataobj, np.float32), zoom, order=1)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * mm
    out = folder / f"t1_{mm:g}mm.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), out)
    return out


def run_once(fixed: Path, method: str, out: Path, extra: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one fuse process."""
    cmd = [sys.executable, "-m", "medfuse_cli", "fuse", str(fixed), str(PET), "-o", str(out), "--method", method,
           "--no-metrics", "--overwrite", "--quiet", *extra]
    seconds, gib, _ = run_measured(cmd, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return seconds, gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dcfb3d,adafuse,laplacian")
    parser.add_argument("--sizes", default="2,1.5,1,0.8", help="voxel sizes (mm) of the FIXED T1")
    parser.add_argument("--patch", default="96")
    args = parser.parse_args()
    if not T1.is_file():
        raise SystemExit(f"needs {T1}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'size':>12s} {'voxels':>11s} " + " ".join(f"{m + ' s':>14s} {m + ' GiB':>14s}" for m in args.methods.split(",")))
        for mm in (float(s) for s in args.sizes.split(",")):
            fixed = resampled_t1(mm, folder)
            shape = nib.load(fixed).shape
            line = f"{'x'.join(map(str, shape)):>12s} {int(np.prod(shape)):>11,d} "
            for m in args.methods.split(","):
                s, gib = run_once(fixed, m, folder / "out.nii.gz", ["--patch", args.patch])
                line += f"{s:14.1f} {gib:14.2f} "
            print(line, flush=True)


if __name__ == "__main__":
    main()
