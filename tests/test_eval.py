"""`medfuse eval` end to end: one pair, folders of pairs, volumes, bad input; `fuse --report` metrics."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import EXAMPLES, shared_path

from medfuse_cli.metrics import HEAVY_METRICS, METRICS
from medfuse_cli.parallel import cpu_threads

T1 = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"
PET = EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
PAIRS = [("mri-pet", "25015", "pet"), ("mri-pet", "25016", "pet"), ("mri-ct", "02004", "ct")]


@pytest.fixture(scope="module")
def harvard_subset(tmp_path_factory):
    """Three Harvard pairs in their sub-folders, fused with mean and max by `medfuse fuse`."""
    from typer.testing import CliRunner

    from medfuse_cli.cli import app

    root = tmp_path_factory.mktemp("eval")
    for folder, pid, other in PAIRS:
        (root / "pairs" / folder).mkdir(parents=True, exist_ok=True)
        for kind in ("mri", other):
            src = shared_path("harvard", folder, f"{pid}_{kind}.png")
            (root / "pairs" / folder / src.name).symlink_to(src)
        for method in ("mean", "max"):
            out = root / method / folder / f"{pid}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            res = CliRunner().invoke(app, ["fuse", str(root / "pairs" / folder / f"{pid}_mri.png"),
                                           str(root / "pairs" / folder / f"{pid}_{other}.png"), "-o", str(out),
                                           "--method", method, "-q"])
            assert res.exit_code == 0, res.output
    return root


def test_folders_of_pairs_give_a_table_json_and_csv(harvard_subset, cli):
    root = harvard_subset
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "mean", "--fused", root / "max",
              "--json", root / "e.json", "--csv", root / "e.csv")
    assert res.exit_code == 0, res.stderr
    assert "mri-pet (2 pairs" in res.stdout and "mri-ct (1 pair" in res.stdout
    assert "*" in res.stdout  # best values marked
    report = json.loads((root / "e.json").read_text())
    assert set(report["means"]) == {"mri-pet", "mri-ct"}
    assert report["means"]["mri-pet"]["max"]["n"] == 2
    assert "MI(A,F) + MI(B,F), bits" in report["conventions"]["MI"]
    rows = list(csv.DictReader((root / "e.csv").open()))
    per_image = [r for r in rows if not r["id"].startswith("mean")]
    assert len(per_image) == 6 and len(rows) == 6 + 4
    # pixel max keeps more of the sources' edges than the mean (PEERS.md: 0.804 vs 0.437 on PET)
    means = report["means"]["mri-pet"]
    assert means["max"]["Qabf"] > means["mean"]["Qabf"]
    # the fuse report carries the same numbers for its output
    fuse_report = json.loads((root / "max" / "mri-pet" / "25015.json").read_text())
    case = next(c for c in report["cases"] if c["id"] == "25015" and c["method"] == "max")
    for k in METRICS:
        assert fuse_report["metrics"]["values"][k] == pytest.approx(case[k], rel=1e-9, abs=1e-12), k


def test_split_filter_and_missing_fused_images(harvard_subset, tmp_path, cli):
    root = harvard_subset
    (root / "pairs" / "splits.csv").write_text("pair_id,modality_pair,split\n25015,mri-pet,val\n02004,mri-ct,val\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--fused", empty, "--split", "val",
              "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert {c["id"] for c in report["cases"]} == {"25015", "02004"}
    assert "empty" not in report["means"]["mri-pet"]
    assert "missing" in res.stderr
    bad = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--split", "test")
    assert bad.exit_code == 4 and "no such split" in bad.stderr
    # the same table saved by a spreadsheet: byte-order mark, semicolons, CRLF (was "needs columns")
    (root / "pairs" / "splits.csv").write_bytes("\ufeffpair_id;modality_pair;split\r\n25015;mri-pet;val\r\n"
                                                 "02004; mri-ct ;val\r\n".encode("utf-8"))
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--split", "val", "--json",
              tmp_path / "s.json", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert {c["id"] for c in json.loads((tmp_path / "s.json").read_text())["cases"]} == {"25015", "02004"}


def test_one_pair_of_volumes(tmp_path, cli):
    out = tmp_path / "fused.nii.gz"
    assert cli("fuse", T1, PET, "-o", out, "--method", "mean", "-q").exit_code == 0
    res = cli("eval", "--fixed", T1, "--moving", PET, out, T1, "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.stderr
    means = json.loads((tmp_path / "v.json").read_text())["means"]["pair"]
    assert means["OldNorm_T1"]["SSIM_A"] == pytest.approx(1.0)
    # the mean fusion keeps both sources; a copy of the T1 loses the PET
    assert means["fused"]["SSIM_worst"] > means["OldNorm_T1"]["SSIM_worst"]


def test_a_fused_volume_with_nan_voxels_is_one_line(tmp_path, cli):
    """Some NaN voxels, or only NaN (an internal error before: it has no window to take)."""
    import nibabel as nib
    import numpy as np

    t1 = nib.load(T1)
    for name, nan in (("some_nan.nii.gz", np.s_[10:20, 10:20, 10:20]), ("all_nan.nii.gz", np.s_[...])):
        data = t1.get_fdata().astype(np.float32)
        data[nan] = np.nan
        nib.save(nib.Nifti1Image(data, t1.affine), tmp_path / name)
        res = cli("eval", "--fixed", T1, "--moving", PET, tmp_path / name)
        assert res.exit_code == 4 and "NaN/inf values" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_bad_input_gives_one_line_and_an_exit_code(tmp_path, cli):
    mri = shared_path("harvard", "mri-pet", "25015_mri.png")
    pet = shared_path("harvard", "mri-pet", "25015_pet.png")
    cases = [
        (("eval", "--fixed", T1, "--moving", PET), 4, "at least one FUSED"),
        (("eval", "--fixed", mri, "--moving", pet, T1), 5, "FIXED is 2D"),
        (("eval", "--fixed", T1, "--moving", mri, T1), 5, "is 2D"),
        (("eval", "--fixed", mri, "--moving", pet, tmp_path / "nope.png"), 3, "nope.png"),
        (("eval", "--pairs", tmp_path), 4, "--fused"),
        (("eval", "--pairs", tmp_path, "--fused", tmp_path), 3, "no ID_mri"),
        # two folders after one --fused (found by a sweep: "not both", of options never given)
        (("eval", "--pairs", tmp_path, "--fused", tmp_path / "a", tmp_path / "b"), 4,
         f"give each fused folder its own --fused (--fused {tmp_path / 'a'} --fused {tmp_path / 'b'})"),
    ]
    for args, code, text in cases:
        res = cli(*args)
        assert res.exit_code == code, (args, res.stderr)
        assert text in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    json_out = tmp_path / "x.json"
    json_out.write_text("{}")
    res = cli("eval", "--fixed", mri, "--moving", pet, mri, "--json", json_out)
    assert res.exit_code == 6 and json_out.read_text() == "{}"


def test_folders_keep_scoring_past_an_image_that_cannot_be_scored(harvard_subset, tmp_path, cli):
    """A damaged or wrong-sized fused image among many: its row carries the error, the others are
    scored, and the exit code is 7 (before: the first one stopped the run and nothing was written)."""
    import shutil

    import numpy as np
    from PIL import Image as PILImage

    root = harvard_subset
    fused = tmp_path / "max"
    shutil.copytree(root / "max", fused)
    damaged = fused / "mri-pet" / "25015.png"
    damaged.write_bytes(damaged.read_bytes()[:200])
    PILImage.fromarray(np.zeros((128, 128), np.uint8) + 90).save(fused / "mri-ct" / "02004.png")
    res = cli("eval", "--pairs", root / "pairs", "--fused", fused, "--fused", root / "mean",
              "--json", tmp_path / "e.json", "--csv", tmp_path / "e.csv")
    assert res.exit_code == 7, res.stderr
    assert "2 of 6 fused images could not be scored" in " ".join(res.stderr.split())
    assert "mri-pet (2 pairs" in res.stdout  # the table still shows what was scored
    report = json.loads((tmp_path / "e.json").read_text())
    errors = {(c["id"], c["method"]): c.get("error") for c in report["cases"]}
    assert errors[("25015", "max")] and errors[("02004", "max")]
    assert errors[("25016", "max")] is None and errors[("25015", "mean")] is None
    assert report["means"]["mri-pet"]["max"]["n"] == 1 and report["means"]["mri-pet"]["mean"]["n"] == 2
    assert "max" not in report["means"]["mri-ct"]
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert sum(1 for r in rows if r["error"]) == 2
    # an unreadable source fails every method of its pair, not the run
    pairs = tmp_path / "pairs"
    shutil.copytree(root / "pairs", pairs, symlinks=True)
    (pairs / "mri-pet" / "25016_pet.png").unlink()
    (pairs / "mri-pet" / "25016_pet.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = cli("eval", "--pairs", pairs, "--fused", root / "mean", "--json", tmp_path / "s.json")
    assert res.exit_code == 7, res.stderr
    cases = json.loads((tmp_path / "s.json").read_text())["cases"]
    assert [c["id"] for c in cases if c.get("error")] == ["25016"]
    # one pair given by --fixed/--moving still stops at its first error, with that error's code
    mri, pet = pairs / "mri-pet" / "25015_mri.png", pairs / "mri-pet" / "25015_pet.png"
    res = cli("eval", "--fixed", mri, "--moving", pet, damaged)
    assert res.exit_code == 4 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_workers_score_pairs_at_once_with_the_same_rows(harvard_subset, tmp_path, cli, monkeypatch):
    """--workers 2 scores pairs in parallel threads: the same rows in the same order as one pair at a
    time, a pair that cannot be scored still its row; each pair's memory check counts every worker."""
    import shutil
    import threading

    from medfuse_cli.errors import OutOfMemoryError
    from medfuse_cli.memory import check_scoring, resident, scoring_bytes

    root = harvard_subset
    fused = tmp_path / "max"
    shutil.copytree(root / "max", fused)
    (fused / "mri-pet" / "25016.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cases = {}
    for workers in (1, 2):
        res = cli("eval", "--pairs", root / "pairs", "--fused", fused, "--fused", root / "mean",
                  "--workers", workers, "--json", tmp_path / f"{workers}.json")
        assert res.exit_code == 7, res.stderr
        cases[workers] = json.loads((tmp_path / f"{workers}.json").read_text())["cases"]
    assert len(cases[1]) == 6 and cases[2] == cases[1]
    assert [c["id"] for c in cases[2] if c.get("error")] == ["25016"]
    from medfuse_cli import evaluate, read_image

    threads, real = set(), evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: threads.add(threading.current_thread().name) or real(*a, **k))
    found, methods = evaluate.find_cases(root / "pairs", [root / "mean"])
    rows = evaluate.evaluate_cases(found, methods, read_image, keep_going=True, workers=2)
    assert len(rows) == 3 and all("error" not in r for r in rows)
    assert threads and all(name.startswith("medfuse-eval") for name in threads)  # scored off the main thread
    # one pair with several fused images: the images are scored at once too, its sources read once
    one, methods = evaluate.single_pair_cases(root / "pairs" / "mri-pet" / "25015_mri.png",
                                              root / "pairs" / "mri-pet" / "25015_pet.png",
                                              [root / "mean" / "mri-pet" / "25015.png", root / "max" / "mri-pet" / "25015.png"])
    threads.clear()
    reads = []
    counted = lambda p: reads.append(p) or read_image(p)
    rows = evaluate.evaluate_cases(one, methods, counted, workers=2)
    assert threads and all(n.startswith("medfuse-eval") for n in threads) and len(reads) == 2 + 2
    assert rows == evaluate.evaluate_cases(one, methods, read_image) and rows[0]["SSIM"] != rows[1]["SSIM"]
    counts = []  # the memory check counts the workers that can run: one image, one at a time, 2 metrics at once
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: counts.append(a[4:]) or real(*a, **k))
    one[0].fused = {methods[0]: one[0].fused[methods[0]]}
    evaluate.evaluate_cases(one, methods[:1], read_image, workers=2)
    evaluate.evaluate_cases(one, methods[:1], read_image)  # the default: one image, its metrics on every core
    assert counts == [(1, 2), (1, cpu_threads())]
    shape = (256, 256, 1)
    limit = str(int(resident() + 1.5 * scoring_bytes(shape)))
    check_scoring(shape, limit, workers=1)
    with pytest.raises(OutOfMemoryError, match="2 fused images at once"):
        check_scoring(shape, limit, workers=2)


def test_the_default_scores_small_images_one_per_core_and_large_ones_one_at_a_time(harvard_subset, monkeypatch):
    """--workers 0 (the default): 2D slices one per core at once (on one slice the metric threads
    cost more than they save: the 92 val pairs took 10.3 s against 8.8 s with --workers 2); larger
    images one at a time with their metrics on every core. The same rows either way."""
    from medfuse_cli import evaluate, read_image

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    counts, real = [], evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: counts.append(a[4:]) or real(*a, **k))
    found, methods = evaluate.find_cases(harvard_subset / "pairs", [harvard_subset / "mean", harvard_subset / "max"])
    rows = evaluate.evaluate_cases(found, methods, read_image)
    assert len(rows) == 6 and set(counts) == {(2, 1)}  # (images at once, metric threads each)
    counts.clear()
    counts.clear()  # memory for one image only: one at a time, as large images (before: refused, exit 10)
    from medfuse_cli.memory import resident, scoring_bytes

    tight = str(int(resident() + 1.5 * scoring_bytes((256, 256, 1), 2)))
    assert evaluate.evaluate_cases(found, methods, read_image, max_memory=tight) == rows
    assert {c[0] for c in counts} == {1}
    counts.clear()
    monkeypatch.setattr(evaluate, "SMALL_IMAGE_VOXELS", 256 * 256 - 1)  # these slices as large images
    assert evaluate.evaluate_cases(found, methods, read_image) == rows
    assert set(counts) == {(1, 2)}


def test_workers_stop_at_the_first_error_without_waiting_for_running_pairs():
    """With --workers, an error (or Ctrl-C, raised in the waiting main thread) ends the run at once:
    a pair still being scored does not hold the exit (before: until it finished, a minute on a CT)."""
    import threading

    from medfuse_cli.errors import InvalidInputError
    from medfuse_cli.evaluate import Case
    from medfuse_cli.parallel import thread_map

    release, started = threading.Event(), threading.Event()

    def work(case):
        if case.id == "slow":
            started.set()
            release.wait(60)
            return []
        started.wait(60)
        raise InvalidInputError("broken")

    cases = [Case(id, "g", T1, PET) for id in ("slow", "bad", "more")]
    with pytest.raises(InvalidInputError, match="broken"):
        thread_map(work, cases, workers=2, name="medfuse-test")
    slow = [t for t in threading.enumerate() if t.name.startswith("medfuse-test")]
    assert slow and not release.is_set()  # returned while the slow pair was still being scored
    release.set()


def test_json_and_csv_on_standard_output(harvard_subset, tmp_path, cli, monkeypatch):
    """`--json -` / `--csv -` print on standard output instead of the tables (before: a file named "-")."""
    monkeypatch.chdir(tmp_path)
    root = harvard_subset
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--csv", "-")
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader(res.stdout.splitlines()))
    assert len(rows) == 3 + 2 and "pairs;" not in res.stdout  # per image and means, no table
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--json", "-", "--csv", tmp_path / "e.csv")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["means"]["mri-pet"]["max"]["n"] == 2 and (tmp_path / "e.csv").is_file()
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--json", "-", "--csv", "-")
    assert res.exit_code == 6 and "both go to standard output" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv"]


def test_scoring_that_would_not_fit_in_memory_is_refused(harvard_subset, tmp_path, cli):
    """--max-memory: a pair whose metrics would need more is refused before scoring (exit 10; with
    --pairs its row, exit 7), where the metrics' float64 arrays could have been killed by the system."""
    out = tmp_path / "fused.nii.gz"
    assert cli("fuse", T1, PET, "-o", out, "--method", "mean", "-q", "--no-metrics").exit_code == 0
    res = cli("eval", "--fixed", T1, "--moving", PET, out, "--max-memory", "256M")
    assert res.exit_code == 10 and "scoring 91x109x91 voxels needs about" in res.stderr, res.stderr
    # -v prints the estimate beside the limit (benchmarks/memory_guard.py reads it), also when it fits
    res = cli("eval", "--fixed", T1, "--moving", PET, out, "--max-memory", "64G", "-v")
    found = re.search(r"scoring91x109x91voxelson(\d+)thread\(s\):estimate\d+MiB,limit65536MiB", "".join(res.stderr.split()))
    assert res.exit_code == 0 and found, res.stderr
    assert int(found[1]) == min(cpu_threads(), HEAVY_METRICS)  # by default one image, its metrics on every core
    root = harvard_subset
    assert cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--max-memory", "64G", "-q").exit_code == 0
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--max-memory", "256M",
              "--json", tmp_path / "e.json")
    assert res.exit_code == 7, res.stderr
    cases = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert len(cases) == 3 and all("needs about" in c["error"] for c in cases)
    res = cli("eval", "--pairs", root / "pairs", "--fused", root / "max", "--max-memory", "lots")
    assert res.exit_code == 4 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_fused_volumes_in_another_voxel_order_are_scored_on_fixed_grid(tmp_path, cli):
    """A fused volume written as a DICOM series reads back in its slices' order (the third axis
    reversed against the LAS T1) and a reoriented NIfTI holds the same voxels in RAS order: both were
    "another position/orientation" (exit 5); they are FIXED's grid and score as the original does.
    `eval --pairs` finds the DICOM folder ID/ as `batch --dicom` and `fuse -o ID` write it."""
    import nibabel as nib
    import numpy as np

    pairs, fused = tmp_path / "pairs", tmp_path / "fused"
    pairs.mkdir()
    crop = np.s_[15:75, 20:90, 20:60]  # a third of the T1 / PET pair: a quicker test
    mri, pet = pairs / "spm_mri.nii.gz", pairs / "spm_pet.nii.gz"
    nib.save(nib.load(T1).slicer[crop], mri)
    nib.save(nib.load(PET).slicer[crop], pet)
    nii = tmp_path / "nii" / "spm.nii.gz"
    for out in (fused / "spm", nii):
        assert cli("fuse", mri, pet, "-o", out, "--method", "mean", "-q", "--no-metrics").exit_code == 0
    canonical = tmp_path / "ras" / "spm.nii.gz"
    canonical.parent.mkdir()
    nib.save(nib.as_closest_canonical(nib.load(nii)), canonical)
    assert not np.allclose(nib.load(canonical).affine, nib.load(mri).affine)  # RAS, not the T1's LAS
    res = cli("eval", "--pairs", pairs, "--fused", fused, "--fused", nii.parent, "--fused", canonical.parent,
              "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.stderr
    means = json.loads((tmp_path / "e.json").read_text())["means"]["mri-pet"]
    assert means["fused"]["n"] == means["ras"]["n"] == 1
    for k in METRICS:
        assert means["ras"][k] == pytest.approx(means["nii"][k], rel=1e-9, abs=1e-12), k
    for k in ("SSIM", "SSIM_worst", "Qabf", "PSNR"):  # the series stores rounded integers
        assert means["fused"][k] == pytest.approx(means["nii"][k], rel=2e-3), k
    # a volume one voxel off FIXED's grid is still refused
    img = nib.load(nii)
    shifted = img.affine.copy()
    shifted[2, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), tmp_path / "off.nii.gz")
    res = cli("eval", "--fixed", mri, "--moving", pet, tmp_path / "off.nii.gz")
    assert res.exit_code == 5 and "another position/orientation" in res.stderr, res.stderr
