"""Shipped weights: safetensors files checked against the sha256 in their model card (no pickles)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import MedfuseError


def shipped_folder() -> Path:
    """Where the shipped weights are: ``MEDFUSE_WEIGHTS`` when set; else ``medfuse_cli/weights`` in an
    installed package (``pip install .`` or a wheel copies the repository's ``weights/`` there); else
    the repository's ``weights/`` (a source checkout or an editable install)."""
    if os.environ.get("MEDFUSE_WEIGHTS"):
        return Path(os.environ["MEDFUSE_WEIGHTS"])
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "weights"
    return packaged if packaged.is_dir() else here.parents[3] / "weights"


WEIGHTS_DIR = shipped_folder()


class WeightsError(MedfuseError):
    """Model weights missing, or not matching their model card."""

    exit_code = 8


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(name: str, folder: Path | None = None) -> Path:
    return (folder or WEIGHTS_DIR) / f"{name}.json"


CARD_FIELDS = {"name": str, "weights": str, "sha256": str, "tasks": list, "parameters": int}  # in every card


def read_card(path: Path) -> dict[str, Any]:
    """A model card: a JSON object with at least :data:`CARD_FIELDS`; else :class:`WeightsError`."""
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path.name}: not a readable model card ({exc})") from None
    if not isinstance(card, dict):
        raise WeightsError(f"{path.name}: not a readable model card (no JSON object)")
    bad = [k for k, kind in CARD_FIELDS.items() if not isinstance(card.get(k), kind)]
    if bad:
        raise WeightsError(f"{path.name}: not a readable model card (no valid {', '.join(bad)})")
    return card


def list_cards(folder: Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every model card in the weights folder (each ``*.json`` there), and what is wrong: an
    unreadable card, or no such folder."""
    folder = folder or WEIGHTS_DIR
    if not folder.is_dir():
        return [], [f"no weights folder {folder}" + (" (MEDFUSE_WEIGHTS)" if os.environ.get("MEDFUSE_WEIGHTS") else "")]
    cards, problems = [], []
    for p in sorted(folder.glob("*.json")):
        try:
            cards.append({**read_card(p), "_card": str(p)})
        except WeightsError as exc:
            problems.append(str(exc))
    return cards, problems


def load_checked(name: str, folder: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict and model card of ``name``; the file's sha256 must match the card, and only
    safetensors are ever read (a pickle, even with a matching sha256, is refused unopened)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, card = checked_file(name, folder)
    try:
        return load_file(str(weights)), card
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{weights.name}: not a readable safetensors file ({exc})") from None


def check_cards(cards: list[dict[str, Any]]) -> list[str]:
    """Hash each card's weights file (:func:`checked_file`); sets each card's ``check`` to ``ok`` or
    the error, and returns the errors."""
    failed = []
    for card in cards:
        try:
            checked_file(Path(card["_card"]).stem, Path(card["_card"]).parent)
            card["check"] = "ok"
        except WeightsError as exc:
            card["check"] = str(exc)
            failed.append(str(exc))
    return failed


def checked_file(name: str, folder: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The weights file of ``name`` and its model card, once the file's sha256 matches the card."""
    card_file = card_path(name, folder)
    if not card_file.is_file():
        raise WeightsError(f"no model card {card_file}; 'medfuse models' lists the installed models")
    card = read_card(card_file)
    weights_name, expected = card["weights"], card["sha256"]
    if Path(weights_name).name != weights_name or not weights_name.endswith(".safetensors"):
        raise WeightsError(f"{card_file.name}: weights must be a .safetensors file beside the card, not {weights_name!r}")
    weights = card_file.parent / weights_name
    if not weights.is_file():
        raise WeightsError(f"{weights} is missing (model card {card_file.name})")
    digest = sha256(weights)
    if digest != expected:
        raise WeightsError(f"{weights.name}: sha256 {digest[:12]}... does not match its model card "
                           f"({expected[:12]}...); the file is damaged or was replaced")
    return weights, card
