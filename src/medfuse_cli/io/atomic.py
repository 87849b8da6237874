"""Atomic file output: write a temporary file beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import OutputError, os_reason

TEMP_NAME_EXTRA = len("..XXXXXXXX.partial")  # what the temporary ".NAME.XXXXXXXX.partial" adds to NAME
STDOUT = "-"  # a text output (a JSON report, eval's --json / --csv) named "-" goes to standard output


def is_stdout(path: str | os.PathLike[str] | None) -> bool:
    """Whether a text output is standard output (named ``-``)."""
    return path is not None and os.fspath(path) == STDOUT


def check_folder_output(path: str | os.PathLike[str], option: str) -> None:
    """Refuse a folder of results named ``-`` (standard output, for a text output) instead of creating it."""
    if is_stdout(path):
        raise OutputError(f"{option} -: a folder of results cannot go to standard output; give a folder")


def check_name_and_place(path: Path, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse an output name the file system cannot hold (with its temporary name), an output that
    is one of the input files (even with --overwrite), an output inside an input folder (a DICOM
    folder would read it back as part of its series next time), and an output folder holding an input."""
    parent = _existing_parent(path)
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(os.fsencode(path.name))
    if size + TEMP_NAME_EXTRA > name_max:
        raise OutputError(f"output name too long ({size} bytes; at most {name_max - TEMP_NAME_EXTRA} here)")
    target = Path(os.path.abspath(path))
    for src in inputs:
        src = Path(os.path.abspath(src))
        if src.is_dir() and (target == src or src in target.parents):
            raise OutputError(f"output {path} is inside the input folder {src}; write it elsewhere")
        if target in src.parents:  # replacing the folder would delete the input
            raise OutputError(f"output {path} holds the input {src}; write it elsewhere")
        if target == src or (src.is_file() and target.exists() and os.path.samefile(src, target)):
            raise OutputError(f"output {path} is the input {src}; write it elsewhere")


def check_distinct(outputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse two outputs of one command (named by option) that are the same file, or one inside
    the other (a DICOM output folder): the second written would replace or join the first; or two
    that both go to standard output."""
    to_stdout = [option for option, path in outputs.items() if is_stdout(path)]
    if len(to_stdout) > 1:
        raise OutputError(f"{' and '.join(to_stdout)} both go to standard output (-); give all but one a file")
    named = [(option, Path(os.path.realpath(path))) for option, path in outputs.items()
             if path is not None and not is_stdout(path)]
    for i, (first, a) in enumerate(named):
        for second, b in named[i + 1:]:
            if a == b:
                raise OutputError(f"{first} and {second} name the same file {outputs[second]}; give each its own")
            if a in b.parents or b in a.parents:
                outer, inner = (first, second) if a in b.parents else (second, first)
                raise OutputError(f"{inner} {outputs[inner]} is inside the folder of {outer}; write it elsewhere")


def check_writable(path: Path, overwrite: bool, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Fail early (before any work) when ``path`` cannot be written as asked, or is inside one of
    the folders of ``inputs``. Standard output (``-``) can always be written."""
    if is_stdout(path):
        return
    check_name_and_place(path, inputs)
    if path.exists() and path.is_dir():
        raise OutputError(f"output {path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} exists; use --overwrite to replace it")
    parent = _existing_parent(path)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent} (permission denied)")


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create folder under {parent}: it is a file")
    return parent


def missing_folders(*paths: str | os.PathLike[str] | None) -> list[Path]:
    """The folders that writing ``paths`` will create (deepest first): removed again, when empty, by a
    run that fails (:func:`undone_on_failure`, :func:`atomic_write_bytes`)."""
    found: list[Path] = []
    for path in paths:
        if path is None or is_stdout(path):
            continue
        folder = Path(path).absolute().parent
        while not folder.exists() and folder not in found:
            found.append(folder)
            folder = folder.parent
    return sorted(found, key=lambda f: len(f.parts), reverse=True)


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (another writer's files), or gone
            folder.rmdir()


def atomic_write_bytes(path: Path, payload: bytes, overwrite: bool) -> None:
    """Write ``payload`` to ``path`` so that readers only ever see the complete file.

    Without ``overwrite`` an existing file is never replaced, even one that appears while
    writing (the final step is a hard link, which fails if the name exists). ``-`` writes to standard
    output (a reader that stops early, ``| head``, is no error).
    """
    if is_stdout(path):
        import sys

        try:
            sys.stdout.buffer.write(payload)
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return
    path = Path(path)
    check_writable(path, overwrite)
    made = missing_folders(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        _remove_empty(made)
        raise OutputError(f"cannot write {path}: {os_reason(exc)}") from exc
    tmp, done = Path(tmp_name), False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputError(f"output {path} exists; use --overwrite to replace it") from None
            except OSError:  # file systems without hard links: best effort
                if path.exists():
                    raise OutputError(f"output {path} exists; use --overwrite to replace it") from None
                os.replace(tmp, path)
        done = True
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {os_reason(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _remove_empty(made)


@contextlib.contextmanager
def undone_on_failure(written: list[Path | None], folders: Sequence[Path] = ()) -> Iterator[None]:
    """Remove the outputs in ``written`` (files or a DICOM series folder; the list may grow inside) when
    what follows them fails (a full disk for the report, Ctrl-C), so a failed run leaves no image
    without its report; then the ``folders`` the run created (:func:`missing_folders`), when empty."""
    try:
        yield
    except BaseException:
        import shutil

        for path in (p for p in written if p is not None):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink(missing_ok=True)
        _remove_empty(folders)
        raise
