"""Batch throughput on the Harvard pairs: sequential engine vs dask LocalCluster with 1 and 2 workers,
and one ``dask worker`` started apart (``--scheduler``, as on a cluster).

Each configuration fuses the same pairs into a fresh folder (the laplacian rule, the default when
the table was measured, and the other default options, metrics on) and the wall time includes starting the cluster. Prints cases per second and the
speed-up of 2 workers over 1, measured in one run. Needs ../shared/data.

    python benchmarks/batch_throughput.py            # all 622 pairs
    python benchmarks/batch_throughput.py --limit 100
"""

from __future__ import annotations

import argparse
import csv
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from medfuse_cli.batch import run_batch

HARVARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "harvard"


@contextmanager
def _scheduler_and_worker() -> Iterator[str]:
    """A ``dask scheduler`` and one ``dask worker --nthreads 1`` started as a user would (dask's
    defaults, e.g. its MALLOC_TRIM_THRESHOLD_), for ``--scheduler``; the wall time starts after them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address, dask = f"tcp://127.0.0.1:{port}", Path(sys.executable).with_name("dask")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              **quiet)]
    try:
        time.sleep(3)
        procs.append(subprocess.Popen([str(dask), "worker", address, "--nthreads", "1", "--no-dashboard", "--host",
                                       "127.0.0.1"], **quiet))
        time.sleep(5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="only the first N pairs (a manifest is written)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = HARVARD
        if args.limit:
            pairs = sorted(HARVARD.rglob("*_mri.png"))[: args.limit]
            source = Path(tmp) / "manifest.csv"
            with open(source, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["id", "fixed", "moving", "output"])
                for mri in pairs:
                    other = next(mri.parent.glob(mri.name.replace("_mri.png", "_[cps]*.png")))
                    w.writerow([f"{mri.parent.name}-{mri.name[:5]}", mri, other, f"{mri.parent.name}/{mri.name[:5]}.png"])
        results = {}
        for name, engine, workers in (("sequential", "sequential", None), ("dask, 1 worker", "dask", 1),
                                      ("dask, 2 workers", "dask", 2), ("dask worker", "dask", 1)):
            with _scheduler_and_worker() if name == "dask worker" else nullcontext() as scheduler:
                t0 = time.perf_counter()
                res = run_batch(source, Path(tmp) / name.replace(" ", "_").replace(",", ""), {"method": "laplacian"},
                                engine=engine, workers=workers, scheduler=scheduler)
                wall = time.perf_counter() - t0
            n = len(res.rows)
            assert not res.failed, res.failed[:3]
            results[name] = n / wall
            print(f"{name:16} {n} cases in {wall:7.1f} s: {n / wall:6.2f} cases/s", flush=True)
    print(f"speed-up, 2 workers over 1: {results['dask, 2 workers'] / results['dask, 1 worker']:.2f}x")


if __name__ == "__main__":
    main()
