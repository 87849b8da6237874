"""Helpers shared by the benchmark scripts: timing, the standard test pairs, measured child processes."""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HARVARD_PET = ROOT.parent / "shared" / "data" / "harvard" / "mri-pet"
SPM = ROOT / "examples" / "spm12"


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Mean seconds of ``fn()`` over ``repeat`` calls, after one call that is not counted."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def network_timing_args(description: str, networks: str, repeat: int) -> argparse.Namespace:
    """``--threads`` (torch's CPU threads, set here), ``--networks`` and ``--repeat`` of the scripts
    that time networks."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--networks", default=networks)
    parser.add_argument("--repeat", type=int, default=repeat)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def harvard_pair() -> tuple[np.ndarray, np.ndarray]:
    """A real 256x256 MRI-PET pair (PET luminance) in [0, 1]; random arrays without ../shared."""
    from medfuse_cli import read_image

    if HARVARD_PET.is_dir():
        a = read_image(HARVARD_PET / "25015_mri.png").data[:, :, 0].T / 255.0
        b = read_image(HARVARD_PET / "25015_pet.png").data[:, :, 0, 0].T / 255.0
    else:
        a, b = np.random.default_rng(0).random((2, 256, 256))
    return a.astype(np.float32), b.astype(np.float32)


def spm_volumes() -> tuple[np.ndarray, np.ndarray]:
    """The bundled SPM T1 + PET pair, normalised as ``medfuse fuse`` does, ``(z, y, x)``."""
    from medfuse_cli.volumes import VolumePair, load_pair

    return load_pair(VolumePair("t1+pet", "mri-pet", SPM / "OldNorm_T1.nii.gz", SPM / "OldNorm_PET.nii.gz"))


def _vm_hwm(pid: int) -> int:
    """The high-water resident memory (KiB) of a running process's own address space, else 0."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except (OSError, ValueError):
        return 0


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; its seconds, peak resident memory (GiB, this process alone) and stdout.

    The peak is the child's ``VmHWM``, polled every 10 ms until it exits (it only grows). Not
    ``ru_maxrss``: Linux carries the parent's high-water mark into a child across fork and exec,
    so a child of this (torch-importing) script would be charged for the script's memory too.
    """
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))
    reader.start()
    hwm = 0
    while proc.poll() is None:
        hwm = max(hwm, _vm_hwm(proc.pid))
        time.sleep(0.01)
    reader.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return seconds, hwm / 2**20, "".join(chunks)
