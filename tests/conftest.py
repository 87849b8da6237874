"""Shared fixtures: the real data in ../shared (skipped when absent) and a CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples"

# Under pytest-xdist (`-n N`) the workers share the cores: give each worker's torch (and the CLI
# processes it starts) its share, not all of them. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is not there (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)}")
    return path


def assert_one_line_error(res: Result, code: int) -> None:
    """A failed command: exit ``code``, exactly one line on stderr, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.stderr)
    assert res.stderr.startswith("medfuse: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def padded_lines(text: str) -> list[str]:
    """Lines of printed output that end in spaces (tables piped to a file or a pipe must not)."""
    return [line for line in text.splitlines() if line.endswith(" ")]


def with_file_size_limit(limit: int, *args: object) -> Result:
    """``medfuse ARGS`` in a process that may not write a file above ``limit`` bytes (RLIMIT_FSIZE;
    SIGXFSZ ignored, so a larger write fails with EFBIG as on a full disk): real write failures."""
    import resource
    import signal
    import subprocess
    import sys

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run([sys.executable, "-m", "medfuse_cli", *map(str, args)], preexec_fn=limited,
                         capture_output=True, text=True, timeout=300, check=False)
    return Result(res.returncode, res.stdout, res.stderr)


@pytest.fixture
def cli():
    """Run ``medfuse ARGS`` in-process; returns exit code, stdout and stderr."""
    from medfuse_cli.cli import app

    runner = CliRunner()

    def run(*args: object) -> Result:
        res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return Result(res.exit_code, res.stdout, res.stderr)

    return run


def straight_and_resumed(tmp_path: Path, **common: object) -> tuple[dict, dict]:
    """Train model ``m`` straight to the end in ``tmp_path/a``; in ``tmp_path/b`` interrupt it right
    after the checkpoint of step 2 (no weights written yet), then resume it. Returns both cards."""
    from medfuse_cli.train import TrainConfig, train

    straight = train(TrainConfig(out=str(tmp_path / "a"), name="m", **common))

    def stop(step: int, parts: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    cfg = TrainConfig(out=str(tmp_path / "b"), name="m", **common)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=stop)
    assert not (tmp_path / "b" / "m.safetensors").exists()
    return straight, train(cfg, resume=True)


def write_fcsv(path, points, system="LPS"):
    """A 3D Slicer .fcsv of ``points`` in ``system`` (LPS, RAS, or the old codes 0 / 1)."""
    lines = ["# Markups fiducial file version = 4.11", f"# CoordinateSystem = {system}",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    lines += [f"vtkMRMLMarkupsFiducialNode_{i},{x},{y},{z},0,0,0,1,1,1,0,F-{i},,"
              for i, (x, y, z) in enumerate(points)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_localizer(folder, source=EXAMPLES / "dicom" / "mr_t1_xa30.zip"):
    """Three slices of the bundled MR series as a localizer (scout) series of their own: ImageType
    LOCALIZER, three orientations (which no single volume can hold)."""
    import io
    import zipfile

    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(zipfile.ZipFile(source).namelist())[40:43]
    uid = generate_uid()
    for i, (name, iop) in enumerate(zip(names, ([1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]),
                                       strict=True)):
        ds = pydicom.dcmread(io.BytesIO(zipfile.ZipFile(source).read(name)))
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = uid, generate_uid(), 1
        ds.SeriesDescription, ds.ImageType, ds.ImageOrientationPatient = "localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"], iop
        ds.save_as(folder / f"localizer{i}.dcm")
    return uid
