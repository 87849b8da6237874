"""The memory guard's estimate beside the measured peak, for every kind of method and three sizes.

Each fusion runs in a fresh process (``medfuse fuse``, metrics on, ``--max-memory auto``) on the
bundled SPM12 T1 + PET templates tiled to larger volumes; the report records the guard's estimate
and the process's measured peak resident memory. A ratio estimate / peak at or above 1 means the
guard is on the safe side.

    python benchmarks/memory_guard.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "spm12"
TILES = [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
METHODS = ["laplacian", "adafuse", "dran", "dcfb3d"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("| size | voxels | method | estimate MiB | peak MiB | estimate / peak | seconds |")
        print("|---|--:|---|--:|--:|--:|--:|")
        for tiles in TILES:
            paths = []
            for name in ("T1", "PET"):
                img = nib.load(str(EXAMPLES / f"OldNorm_{name}.nii.gz"))
                data = np.tile(np.asarray(img.dataobj, dtype=np.float32), tiles)
                paths.append(tmp / f"{name}_{'x'.join(map(str, tiles))}.nii.gz")
                nib.Nifti1Image(data, img.affine).to_filename(paths[-1])
            for method in METHODS:
                out = tmp / f"fused_{method}.nii.gz"
                res = subprocess.run([sys.executable, "-m", "medfuse_cli", "fuse", *map(str, paths), "-o", str(out),
                                      "--method", method, "--overwrite", "-q"], capture_output=True, text=True,
                                     check=False)
                if res.returncode:
                    print(f"| {tiles} | | {method} | failed: {res.stderr.strip()} |")
                    continue
                rep = json.loads(out.with_name(f"fused_{method}.json").read_text())
                mem, shape = rep["memory"], data.shape
                print(f"| {'x'.join(map(str, shape))} | {data.size / 1e6:.1f} M | {method} | "
                      f"{mem['estimate_bytes'] / 2**20:.0f} | {mem['peak_bytes'] / 2**20:.0f} | "
                      f"{mem['estimate_bytes'] / mem['peak_bytes']:.2f} | {rep['timings']['total_s']:.1f} |")


if __name__ == "__main__":
    main()
