"""The memory guard's estimate beside the measured peak, for every kind of method and three sizes,
and for the 2D networks on single large slices (a real Harvard pair resized; skipped without ../shared).

Each fusion runs in a fresh process (``medfuse fuse``, metrics on, ``--max-memory auto``) on the
bundled SPM12 T1 + PET templates tiled to larger volumes; the report records the guard's estimate
and the process's measured peak resident memory. A ratio estimate / peak at or above 1 means the
guard is on the safe side. A second table does the same for ``medfuse eval`` (its check before
scoring a pair, printed with ``-v``) on larger tilings, where the metrics work slab by slab.

    python benchmarks/memory_guard.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "spm12"
TILES = [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
METHODS = ["laplacian", "adafuse", "dran", "dcfb3d"]
SLICE_SIZES = [1024, 2048]  # single large 2D slices (scanned films, microscopy-sized exports); needs ../shared
HARVARD_PET = Path(__file__).resolve().parents[2] / "shared" / "data" / "harvard" / "mri-pet"
EVAL_TILES = [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 3)]
# medfuse eval in this process, then its own peak resident memory on stderr
EVAL_WITH_PEAK = """import sys
from medfuse_cli.cli import main
from medfuse_cli.memory import peak
sys.argv = ["medfuse", *sys.argv[1:]]
try:
    main()
finally:
    print(f"peak {peak()}", file=sys.stderr)
"""


def _tiled(tmp: Path, tiles: tuple[int, int, int]) -> list[Path]:
    """The T1 and PET templates tiled, and their mean as a fused image, as NIfTI files."""
    paths, arrays = [], []
    for name in ("T1", "PET"):
        img = nib.load(str(EXAMPLES / f"OldNorm_{name}.nii.gz"))
        arrays.append(np.tile(np.asarray(img.dataobj, dtype=np.float32), tiles))
        paths.append(tmp / f"{name}_{'x'.join(map(str, tiles))}.nii.gz")
        nib.Nifti1Image(arrays[-1], img.affine).to_filename(paths[-1])
    paths.append(tmp / "mean.nii.gz")
    nib.Nifti1Image((arrays[0] + arrays[1]) / 2, img.affine).to_filename(paths[-1])
    return paths


def _fuse_row(paths: list[Path], out: Path, method: str, size: str, voxels: int) -> None:
    """``medfuse fuse`` in a fresh process; prints a table row of its report's estimate and peak."""
    res = subprocess.run([sys.executable, "-m", "medfuse_cli", "fuse", *map(str, paths), "-o", str(out),
                          "--method", method, "--overwrite", "-q"], capture_output=True, text=True, check=False)
    if res.returncode:
        print(f"| {size} | | {method} | failed: {res.stderr.strip()} |")
        return
    rep = json.loads(out.with_name(out.name.split(".")[0] + ".json").read_text())
    mem = rep["memory"]
    print(f"| {size} | {voxels / 1e6:.1f} M | {method} | {mem['estimate_bytes'] / 2**20:.0f} | "
          f"{mem['peak_bytes'] / 2**20:.0f} | {mem['estimate_bytes'] / mem['peak_bytes']:.2f} | "
          f"{rep['timings']['total_s']:.1f} |")


def _slices(tmp: Path, size: int) -> list[Path]:
    """A real Harvard MRI-PET pair (colour PET) resized to ``size`` x ``size`` (bicubic), as PNG files."""
    from PIL import Image as PILImage

    paths = []
    for name in ("mri", "pet"):
        paths.append(tmp / f"{size}_{name}.png")
        PILImage.open(HARVARD_PET / f"25015_{name}.png").resize((size, size), PILImage.BICUBIC).save(paths[-1])
    return paths


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("| size | voxels | method | estimate MiB | peak MiB | estimate / peak | seconds |")
        print("|---|--:|---|--:|--:|--:|--:|")
        for tiles in TILES:
            paths = _tiled(tmp, tiles)[:2]
            shape = nib.load(str(paths[0])).shape
            for method in METHODS:
                _fuse_row(paths, tmp / f"fused_{method}.nii.gz", method, "x".join(map(str, shape)), int(np.prod(shape)))

        print()
        print("| slice | pixels | method | estimate MiB | peak MiB | estimate / peak | seconds |")
        print("|---|--:|---|--:|--:|--:|--:|")
        for size in SLICE_SIZES if HARVARD_PET.is_dir() else ():
            paths = _slices(tmp, size)
            for method in ("laplacian", "adafuse", "dran"):
                _fuse_row(paths, tmp / f"fused_{method}.png", method, f"{size}x{size}", size * size)

        print()
        print("| eval: size | voxels | estimate MiB | peak MiB | estimate / peak | seconds |")
        print("|---|--:|--:|--:|--:|--:|")
        for tiles in EVAL_TILES:
            t1, pet, fused = _tiled(tmp, tiles)
            env = {**os.environ, "COLUMNS": "400"}  # one log line per message
            start = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", EVAL_WITH_PEAK, "eval", "--fixed", str(t1), "--moving",
                                  str(pet), str(fused), "-v"],
                                 capture_output=True, text=True, check=False, env=env)
            seconds = time.perf_counter() - start
            estimate = re.search(r"estimate (\d+) MiB", res.stderr)
            peak = re.search(r"^peak (\d+)", res.stderr, re.MULTILINE)
            shape = nib.load(str(t1)).shape
            if res.returncode or not (estimate and peak):
                print(f"| {'x'.join(map(str, shape))} | | failed: {res.stderr.strip()[-300:]} |")
                continue
            est, top = int(estimate[1]), int(peak[1]) / 2**20
            print(f"| {'x'.join(map(str, shape))} | {np.prod(shape) / 1e6:.1f} M | {est} | {top:.0f} | "
                  f"{est / top:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
