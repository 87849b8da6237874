"""Helpers shared by the benchmark scripts: timing, the standard test pairs, measured child processes."""

from __future__ import annotations

import os
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


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; its seconds, peak resident memory (GiB, this process alone) and stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return seconds, usage.ru_maxrss / 2**20, out  # ru_maxrss is KiB on Linux
