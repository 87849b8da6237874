"""CSV tables people write by hand or save from a spreadsheet (batch manifests, ``splits.csv``): read
as Excel saves them too: UTF-8 with or without a byte-order mark or UTF-16 ("Unicode text"), comma,
semicolon or tab separators, spaces around values."""

from __future__ import annotations

import codecs
import csv
from collections.abc import Sequence
from pathlib import Path

from .errors import InputNotFoundError, InvalidInputError, os_reason


def read_table(path: Path, required: Sequence[str], needs: str = "") -> list[dict[str, str]]:
    """The rows of ``path`` (blank lines skipped), each with a value in every ``required`` column;
    ``needs`` describes the table's columns in the error when one is missing."""
    try:
        raw = path.read_bytes()
        utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # Excel's "Unicode text"
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not a UTF-8 or UTF-16 text table") from None
    except OSError as exc:
        raise InputNotFoundError(f"{path}: cannot read it ({os_reason(exc)})") from None
    lines = text.splitlines()
    delimiter = max(",;\t", key=(lines[0] if lines else "").count)  # what the header is separated by
    reader = csv.DictReader(lines, delimiter=delimiter, skipinitialspace=True)
    names = [(n or "").strip() for n in reader.fieldnames or []]
    missing = [c for c in required if c not in names]
    if missing:
        found = ", ".join(n for n in names if n) or "none"
        raise InvalidInputError(f"{path}: no column {', '.join(missing)} (columns found: {found})"
                                + (f"; {needs}" if needs else ""))
    rows = []
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        empty = [c for c in required if not row.get(c)]
        if empty:
            raise InvalidInputError(f"{path}: line {reader.line_num}: no {', '.join(empty)}")
        rows.append(row)
    return rows
