"""An installed wheel (``pip install .``, not only ``pip install -e .``) carries the code and the
shipped weights, and finds the weights where it was installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT

from medfuse_cli.models import weights

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_under_src_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert found and found <= listed, found - listed
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["medfuse_cli.weights"] == "weights"


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the repository (nothing is written into the checkout)."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (>= 68)")
    src = tmp_path / "repo"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src" / "medfuse_cli", src / "src" / "medfuse_cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(weights.WEIGHTS_DIR, src / "weights")
    (src / "weights" / "adafuse.checkpoint.safetensors").write_bytes(b"a training checkpoint")
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(dist), str(src)], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = dist.glob("medfuse-*.whl")
    return wheel


def test_a_wheel_carries_the_weights_and_finds_them(tmp_path):
    cards = sorted(p.name for p in weights.WEIGHTS_DIR.glob("*.json"))
    if not cards:
        pytest.skip("no shipped weights installed")
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    modules = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "medfuse_cli").rglob("*.py")}
    assert modules <= names, modules - names
    for card in cards:
        assert f"medfuse_cli/weights/{card}" in names
        assert f"medfuse_cli/weights/{json.loads((weights.WEIGHTS_DIR / card).read_text())['weights']}" in names
    assert "medfuse_cli/weights/adafuse.checkpoint.safetensors" not in names  # training state stays out

    # the unpacked wheel first on the path, as site-packages is for a regular install
    env = {k: v for k, v in os.environ.items() if k != "MEDFUSE_WEIGHTS"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    probe = ("import medfuse_cli.models.weights as w; cards, problems = w.list_cards(); "
             "print(w.WEIGHTS_DIR, len(cards), not w.check_cards(cards) and not problems)")
    res = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    folder, count, ok = res.stdout.split()
    assert Path(folder) == tmp_path / "site" / "medfuse_cli" / "weights"
    assert int(count) == len(cards) and ok == "True"  # every card found, every sha256 matches


def test_auto_without_weights_says_so(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "none")
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    res = cli("fuse", t1, pet, "-o", tmp_path / "f.nii.gz", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["method"] == "laplacian (from auto)"
    assert any("no AdaFuse model card" in w and str(tmp_path / "none") in w for w in report["warnings"])
    listing = cli("models")
    assert "no trained networks in" in listing.stdout
