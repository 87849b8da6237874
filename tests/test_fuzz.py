"""A short coverage-guided fuzz run of every reader (atheris); the long run is in tools/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tools" / "fuzz_readers.py"


def test_fuzzed_inputs_end_in_a_medfuse_error_or_an_image(tmp_path):
    """NIfTI, NIfTI-gz, Analyze / NIfTI pairs, DICOM, PNG, TIFF, NRRD, MetaImage, JPEG, BMP and ImageJ TIFF stacks, and the
    transform (.tfm, .mat) and landmark (.fcsv, .mrk.json, .csv) files of a registration start, in one run: the first
    byte of an input picks the reader."""
    kind = "all"
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    seeds = subprocess.run([sys.executable, FUZZ, "--seeds", kind, corpus], capture_output=True, text=True, check=False)
    assert seeds.returncode == 0, seeds.stderr[-2000:]
    assert any(corpus.iterdir())
    res = subprocess.run(
        [sys.executable, FUZZ, kind, corpus, "-max_total_time=8", "-rss_limit_mb=3072", "-timeout=20",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    found = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-"))]
    assert res.returncode == 0 and not found, f"{found}\n{res.stderr[-3000:]}"
    assert "Done" in res.stderr
