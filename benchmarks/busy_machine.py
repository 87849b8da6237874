"""A network's fusion on a free machine and on one where another process keeps a core busy, with
OpenMP's default wait policy, ``OMP_WAIT_POLICY=PASSIVE`` and ``--threads 1``.

torch's CPU threads (OpenMP) spin while they wait for each other; when another program holds a
core, a spinning thread takes turns with it, and every parallel step waits for the slowest. Each
run is one ``medfuse fuse T1 PET -o OUT --method M --no-metrics`` process on the bundled SPM12 pair
(91x109x91); the report gives the fusion step's seconds. The busy core: a Python loop in another
process. Rows alternate between the settings, so that a drift of the machine hits them alike.

    python benchmarks/busy_machine.py [--method adafuse] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPM = ROOT / "examples" / "spm12"
SETTINGS = {  # name -> (environment changes, extra arguments)
    "default": ({}, []),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "--threads 1": ({}, ["--threads", "1"]),
}


def fuse_seconds(method: str, out: Path, env: dict[str, str], extra: list[str]) -> float:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    subprocess.run([sys.executable, "-m", "medfuse_cli", "fuse", str(SPM / "OldNorm_T1.nii.gz"),
                    str(SPM / "OldNorm_PET.nii.gz"), "-o", str(out), "--method", method, "--no-metrics",
                    "--overwrite", "-q", *extra], check=True, env={**environ, **env})
    return json.loads(out.with_suffix("").with_suffix(".json").read_text())["timings"]["fuse_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="adafuse", help="the network to run (adafuse, dran, dcfb3d)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting on each machine state")
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fused.nii.gz"
        for state in ("free", "one core busy"):
            load = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if state != "free" else None)
            try:
                for _ in range(args.repeats):
                    for name, (env, extra) in SETTINGS.items():
                        times.setdefault((state, name), []).append(fuse_seconds(args.method, out, env, extra))
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
    print(f"{args.method}, bundled 91x109x91 pair, {os.cpu_count()} cores: fusion step, seconds per run")
    print("| machine | setting | seconds | vs default on a free machine |")
    print("|---|---|--:|--:|")
    base = min(times[("free", "default")])
    for (state, name), values in times.items():
        print(f"| {state} | {name} | {' / '.join(f'{v:.2f}' for v in values)} | {min(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
