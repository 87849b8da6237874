"""Weights are only ever safetensors, checked against their model card; nothing is unpickled."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT, assert_one_line_error, padded_lines

from medfuse_cli.models import infer, weights

T1, PET = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
UNSAFE = re.compile(r"\btorch\.load\(|\btorch\.jit\.load\(|\bimport pickle\b|\bpickle\.loads?\(|\bjoblib\b|"
                    r"\bdill\b|\bcloudpickle\b|allow_pickle\s*=\s*True|weights_only\s*=\s*False")


def test_no_code_path_can_unpickle():
    """The product, its tools and benchmarks never call a pickle loader (tests may build one)."""
    files = [p for d in ("src", "tools", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert not hits, hits
    assert UNSAFE.search("state = torch.load(path)") and UNSAFE.search("np.load(f, allow_pickle=True)")


class _Payload:
    """A pickle that would leave a marker file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A copy of the shipped AdaFuse card in a private weights folder; returns (folder, card)."""
    shipped = weights.WEIGHTS_DIR / "adafuse.json"
    if not shipped.is_file():
        pytest.skip("needs the shipped weights/")
    folder = tmp_path / "weights"
    folder.mkdir()
    card = json.loads(shipped.read_text())
    shutil.copy(shipped.parent / card["weights"], folder / card["weights"])
    monkeypatch.setattr(weights, "WEIGHTS_DIR", folder)
    infer.load_model.cache_clear()
    yield folder, card
    infer.load_model.cache_clear()


def _write_card(folder: Path, card: dict) -> None:
    (folder / "adafuse.json").write_text(json.dumps(card))


def _refused(cli, tmp_path, code: int = 8) -> str:
    out = tmp_path / "x.nii.gz"
    res = cli("fuse", T1, PET, "-o", out, "--method", "adafuse", "--transform", "none")
    assert_one_line_error(res, code)
    assert not out.exists() and not (tmp_path / "x.json").exists()
    return res.stderr


def test_truncated_weights_are_refused_with_or_without_a_matching_card(installed, tmp_path, cli):
    folder, card = installed
    path = folder / card["weights"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _write_card(folder, card)
    assert "sha256" in _refused(cli, tmp_path)
    _write_card(folder, {**card, "sha256": weights.sha256(path)})  # a card rewritten to match
    assert "not a readable safetensors file" in _refused(cli, tmp_path)


def test_a_pickle_with_a_matching_sha256_is_never_unpickled(installed, tmp_path, cli):
    folder, card = installed
    marker = tmp_path / "marker.txt"
    path = folder / card["weights"]
    path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    _write_card(folder, {**card, "sha256": weights.sha256(path)})
    assert "not a readable safetensors file" in _refused(cli, tmp_path)
    assert not marker.exists()
    assert pickle.loads(path.read_bytes()) and marker.exists()  # the positive control: it was live


@pytest.mark.parametrize("change", ["not json", {"weights": "../../elsewhere.safetensors"},
                                    {"weights": "adafuse.pt"}, {"sha256": None}, {"architecture": {"widths": [8]}}])
def test_damaged_model_cards_are_refused(change, installed, tmp_path, cli):
    folder, card = installed
    if isinstance(change, str):
        (folder / "adafuse.json").write_text(change)
    else:
        _write_card(folder, {k: v for k, v in {**card, **change}.items() if v is not None})
    _refused(cli, tmp_path)


def test_models_lists_the_shipped_cards_and_where_networks_run(cli, monkeypatch):
    """`medfuse models` names every shipped network with its card's sha256 and the classic rules, and
    says where --device auto runs and on which torch build (with a simulated GPU too); --json gives
    the cards themselves."""
    import torch

    from medfuse_cli.fusion import CLASSIC_RULES

    cards = {p.stem: json.loads(p.read_text()) for p in (ROOT / "weights").glob("*.json")}
    assert {"adafuse", "dran", "dcfb3d"} <= set(cards)
    res = cli("models")
    assert res.exit_code == 0, res.stderr
    for name, card in cards.items():
        assert re.search(rf"{name}\s.*{card['sha256'][:12]}", res.stdout), name
    assert all(re.search(rf"^\W*{rule}\s.*classic rule", res.stdout, re.MULTILINE) for rule in CLASSIC_RULES)
    assert f"torch {torch.__version__}" in res.stdout
    expected = "CUDA device 0" if torch.cuda.is_available() else "--device auto: the CPU"
    assert expected in res.stdout
    assert not padded_lines(res.stdout)
    listed = json.loads(cli("models", "--json").stdout)
    assert {c["name"]: c["sha256"] for c in listed} == {n: c["sha256"] for n, c in cards.items()}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Simulated GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device auto: CUDA device 0, Simulated GPU" in cli("models").stdout


def test_models_check_verifies_every_weights_file(installed, cli):
    """`medfuse models --check` hashes each weights file against its card: ok, then exit 8 naming the
    damaged file (with -q, that one line only); --json carries each card's result."""
    folder, card = installed
    _write_card(folder, card)
    res = cli("models", "--check")
    assert res.exit_code == 0, res.stderr
    assert re.search(rf"adafuse\s.*{card['sha256'][:12]}\W+ok", res.stdout)
    with open(folder / card["weights"], "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    res = cli("models", "--check", "-q")
    assert_one_line_error(res, 8)
    assert res.stdout == "" and card["weights"] in res.stderr and "does not match" in res.stderr
    listed = json.loads(cli("models", "--check", "--json").stdout)
    assert "does not match" in listed[0]["check"]
    assert cli("models").exit_code == 0  # without --check, listing does not hash


@pytest.mark.parametrize("text", ["{bad", "null", "[1, 2]", '{"name": "dran", "weights": "dran.safetensors", "sha256": "0"}'])
def test_a_card_that_cannot_be_read_is_named_not_skipped(text, installed, cli, monkeypatch):
    """A broken card next to a good one: `models` listed the good one and left the broken one out
    without a word (`--check` passed), or failed with an internal error (a card without tasks, or
    JSON null); now it warns, --check fails with exit 8 naming it, and loading it is exit 8."""
    folder, card = installed
    _write_card(folder, card)
    (folder / "dran.json").write_text(text)
    res = cli("models")
    assert res.exit_code == 0 and "adafuse" in res.stdout
    assert "dran.json:notareadablemodelcard" in "".join(res.stderr.split())
    res = cli("models", "--check", "-q")
    assert_one_line_error(res, 8)
    assert "1 of 2 models failed the check; dran.json: not a readable model card" in res.stderr
    out = folder.parent / "x.nii.gz"
    assert_one_line_error(cli("fuse", T1, PET, "-o", out, "--method", "dran", "--transform", "none"), 8)
    assert not out.exists()


def test_a_weights_folder_that_is_not_there_is_named(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("MEDFUSE_WEIGHTS", str(tmp_path / "nowhere"))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "nowhere")
    res = cli("models")
    assert res.exit_code == 0 and "mean" in res.stdout  # the classic rules are still there
    squeezed = "".join(res.stderr.split())  # the log wraps long lines anywhere, even inside a path
    assert "".join(f"no weights folder {tmp_path / 'nowhere'} (MEDFUSE_WEIGHTS)".split()) in squeezed
    assert_one_line_error(cli("models", "--check", "-q"), 8)
