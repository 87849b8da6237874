"""The report's metrics one at a time and N at once (``fuse --threads``): seconds, peak memory, and
whether every value is the same.

Each run is one ``medfuse fuse FIXED PET -o OUT --method laplacian --threads N`` process (the
laplacian rule, so that the metrics are most of the work); the report gives the metrics' seconds,
the plan's metric threads and estimate, and the process's peak resident memory. FIXED: the bundled
SPM12 T1 template (91x109x91, 2 mm) and, when ``../shared`` is beside the clone, the MNI 2009a T1
(197x233x189, 1 mm); MOVING: the SPM12 PET template.

    python benchmarks/metrics_threads.py [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPM = ROOT / "examples" / "spm12"
MNI = ROOT.parent / "shared" / "data" / "volumes" / "nilearn_mni152_2009a_1mm" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="metric threads to compare; the first is the reference")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    fixed_images = [SPM / "OldNorm_T1.nii.gz", *([MNI] if MNI.is_file() else [])]
    print("| FIXED | --threads | metric threads | metrics s | speed-up | estimate MiB | peak MiB | same values |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fixed in fixed_images:
            first = None
            for n in counts:
                out = Path(tmp) / f"{n}.nii.gz"
                subprocess.run([sys.executable, "-m", "medfuse_cli", "fuse", str(fixed), str(SPM / "OldNorm_PET.nii.gz"),
                                "-o", str(out), "--method", "laplacian", "--threads", str(n), "--overwrite", "-q"],
                               check=True)
                rep = json.loads(out.with_name(f"{n}.json").read_text())
                first = first or rep
                mem, seconds = rep["memory"], rep["timings"]["metrics_s"]
                same = rep["metrics"]["values"] == first["metrics"]["values"]
                print(f"| {fixed.name} | {n} | {mem['metric_threads']} | {seconds:.2f} | "
                      f"{first['timings']['metrics_s'] / seconds:.2f} | {mem['estimate_bytes'] / 2**20:.0f} | "
                      f"{mem['peak_bytes'] / 2**20:.0f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
