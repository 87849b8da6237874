"""``medfuse batch``: find the pairs in a folder or CSV manifest and fuse them all, resumably,
sequentially or on dask.distributed (a local cluster or an existing scheduler).

Pairing rules, tried in this order (the first that finds a pair wins):

1. ``benchmark``: ``ID_mri.EXT`` + ``ID_{ct,pet,spect}.EXT`` anywhere below the folder (as in
   the Harvard set); output ``OUT_DIR/SUBFOLDER/ID.png`` (``OUT_DIR/ID.png`` at the top level),
   so ``medfuse eval --pairs IN --fused OUT_DIR`` reads it directly.
2. ``nnunet``: ``CASE_0000.EXT`` (FIXED) + ``CASE_0001.EXT`` (MOVING); output ``OUT_DIR/CASE.EXT``. The
   channels' modalities come from the nnU-Net ``dataset.json`` in the folder or its parent, when there
   is one (channel 0001 is FIXED when it alone is an MR; of more channels, the MR with each CT / PET /
   SPECT it names: cases ``CASE_ct``, ``CASE_pet``, ``CASE_spect`` when there are several).
3. ``subfolders``: one sub-folder per case holding two inputs (NIfTI / PNG / TIFF files or DICOM
   series); the MR one (from DICOM or the file name) is FIXED; or holding the DICOM files of a
   study, whose one MR series is FIXED and one CT / PET / SPECT series MOVING; output
   ``OUT_DIR/CASE.nii.gz``.

A CSV manifest has columns ``id,fixed,moving[,output][,initial_transform][,fixed_landmarks,moving_landmarks]``
``[,fixed_modality,moving_modality]`` (paths relative to the CSV's folder; ``initial_transform``: a
transform file that starts that case's registration, as ``fuse --initial-transform``; the landmark
files start it as ``fuse --landmarks``; the modalities act as ``fuse --fixed-modality`` /
``--moving-modality``, which, given to ``batch``, win).
Each case writes its fused image and then its JSON report (both atomically); a case is complete
when both exist and the report's fingerprint (inputs, options, version) matches, so a re-run skips
it. Stale ``.*.partial`` files left by a killed run are removed at the start.

``--part K/N`` runs every N-th case from the K-th (cases sorted by id), so the N tasks of a job array
can share one output folder; each writes ``summary.part-K-of-N.csv``.
"""

from __future__ import annotations

import csv
import errno
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .caselog import case_log
from .errors import (
    InputNotFoundError,
    InvalidInputError,
    MedfuseError,
    OutputError,
    os_reason,
)
from .io import (
    PAIR_SUFFIXES,
    RASTER_READ_SUFFIXES,
    named_pattern,
    partners,
)
from .io.atomic import check_folder_output
from .io.itk import ITK_SUFFIXES
from .io.raster import is_stack
from .metrics import METRICS
from .parallel import cpu_threads, kept_thread_variables, limited_threads, usable_cores

log = logging.getLogger(__name__)

INPUT_EXT = (*PAIR_SUFFIXES, *ITK_SUFFIXES, ".dcm", ".zip")
BENCH_RE = named_pattern("mri")
NNUNET_RE = named_pattern(r"(?P<ch>\d{4})")
SUMMARY_EVERY_S = 2.0
BATCH_ONLY = ("figures", "dicom", "log_level")  # batch options that are not FuseOptions
NOT_DECISIVE = ("threads", "log_level")  # options that do not change a case's output: a re-run with others skips it
# glibc settings for every case (``mallopt``: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3). dask starts its
# workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's adaptive mmap threshold, so every
# temporary array above 128 KiB is mapped and faulted in afresh: the metrics' many temporaries ran 2.4x
# slower in a worker than in the sequential engine.
WORKER_MALLOC = {-1: 2**27, -3: 2**25}
SUMMARY_FIELDS = ["id", "status", "seconds", "fixed", "moving", "output", "registration", "warnings", *METRICS, "error"]


@dataclass
class BatchCase:
    id: str
    fixed: str
    moving: str
    output: str
    initial_transform: str | None = None  # a manifest's optional column: this case's registration start
    landmarks: list[str] | None = None  # optional columns fixed_landmarks, moving_landmarks: as fuse --landmarks
    fixed_series: str | None = None  # a case folder of DICOM files: FIXED's and MOVING's series in it
    moving_series: str | None = None
    fixed_modality: str | None = None  # nnU-Net's dataset.json or a manifest's columns: as fuse --fixed-modality
    moving_modality: str | None = None
    modalities_from: str | None = None  # the file that gave them (recorded in the case's report)

    @property
    def report(self) -> Path:
        from .pipeline import report_beside

        return report_beside(Path(self.output))

    @property
    def figure(self) -> Path:
        """Where --figures puts this case's figure."""
        return self.report.with_name(self.report.stem + "_figure.png")


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` (from 1) of a batch's cases, for the tasks of a job array."""

    index: int
    count: int

    @property
    def tag(self) -> str:
        return f"part-{self.index}-of-{self.count}"

    def select(self, cases: list[BatchCase]) -> list[BatchCase]:
        """Every ``count``-th case from the ``index``-th, in the order of their ids: the parts are disjoint
        and together hold every case, however the folder was listed."""
        return sorted(cases, key=lambda c: (c.id, c.output))[self.index - 1 :: self.count]


SLURM_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


def parse_part(spec: str, env: dict[str, str] | None = None) -> Part:
    """``K/N`` (part K of N, counted from 1) or ``slurm`` (K and N of this Slurm array task: its
    offset from the array's first task, in steps, and the number of tasks)."""
    env = dict(os.environ) if env is None else env
    if spec.strip().lower() == "slurm":
        try:
            task, first, count = (int(env[k]) for k in SLURM_ARRAY)
            step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        except (KeyError, ValueError):
            raise InvalidInputError("--part slurm: not inside a Slurm job array (SLURM_ARRAY_TASK_ID, "
                                    "SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT are not all set)") from None
        offset, rest = divmod(task - first, max(step, 1))
        if rest or not 0 <= offset < count:
            raise InvalidInputError(f"--part slurm: task {task} of an array from {first} in steps of {step} with "
                                    f"{count} tasks is not one of {count} parts; use consecutive tasks "
                                    "(sbatch --array=1-N) or give --part K/N")
        return Part(offset + 1, count)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise InvalidInputError(f"--part {spec!r}: give K/N (part K of N, counted from 1) or slurm")
    index, count = int(m[1]), int(m[2])
    if not 1 <= index <= count:
        raise InvalidInputError(f"--part {spec.strip()}: K counts from 1 to N (for a job array numbered from 0, "
                                "use --part slurm)")
    return Part(index, count)


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _as_folder(output: str) -> str:
    """A NIfTI output path as a DICOM series folder (the name without its extension)."""
    for suffix in (".nii.gz", ".nii"):
        if output.lower().endswith(suffix):
            return output[: -len(suffix)]
    return output


def _output_ext(fixed: Path) -> str:
    return ".png" if fixed.suffix.lower() in RASTER_READ_SUFFIXES and not is_stack(fixed) else ".nii.gz"


def _benchmark(root: Path, out: Path) -> tuple[list[BatchCase], list[str]]:
    cases, unpaired = [], []
    for mri in sorted(root.rglob("*_mri.*")):
        m = BENCH_RE.match(mri.name)
        if not m:
            continue
        found = partners(mri, m["id"], m["ext"])
        if len(found) != 1:
            unpaired.append(f"{mri}: {'no' if not found else 'several'} CT/PET/SPECT partner")
            continue
        rel = mri.parent.relative_to(root)
        cases.append(BatchCase(m["id"], str(mri), str(found[0][1]), str(out / rel / f"{m['id']}{_output_ext(mri)}")))
    return cases, unpaired


def _nnunet_channels(root: Path) -> tuple[Path | None, dict[str, str | None]]:
    """The ``dataset.json`` in ``root`` or its parent (an nnU-Net dataset's ``imagesTr`` / ``imagesTs``)
    and the modality of each channel it names (``"0000"`` -> ``"MR"``): its ``channel_names``
    (``modality`` in nnU-Net v1) read as :func:`io.guess_modality` reads a name (``T2``, ``CT``,
    ``FDG-PET``); None where a name says no modality. No file: ``(None, {})``; one not readable is refused."""
    from .image import Modality
    from .io import guess_modality

    for path in (root / "dataset.json", root.parent / "dataset.json"):
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            names = meta.get("channel_names") or meta.get("modality") or {}
            named = {f"{int(ch):04d}": guess_modality(str(name)) for ch, name in names.items()}
        except (OSError, ValueError, AttributeError) as exc:  # guessing instead could fuse a CT as the MRI
            raise InvalidInputError(f"{path}: unreadable ({str(exc)[:120]}), and the channels' modalities come from "
                                    "it; mend it, or list the pairs in a manifest") from None
        return path, {ch: None if m is Modality.OT else m.value for ch, m in named.items()}
    return None, {}


NNUNET_TAGS = {"CT": "ct", "PT": "pet", "NM": "spect"}  # a case's id suffix when its MRI pairs with several


def _nnunet_pick(chans: list[str], mods: dict[str, str | None]) -> list[tuple[str, str, str]] | str:
    """FIXED's and MOVING's channels among a case's (sorted), with the case id's suffix, or why none can
    be chosen. Two channels: the first is FIXED unless only the second is an MR. More: the MR (the
    first of several) with each CT / PET / SPECT that ``dataset.json`` names, one case each
    (``CASE_ct``, ``CASE_pet``, ``CASE_spect`` when there are several)."""
    listed = f"{len(chans)} channel(s) ({', '.join(chans)})"
    if mods and chans != sorted(mods):
        return f"{listed}, but dataset.json names {', '.join(sorted(mods))}"
    if chans == ["0000", "0001"]:
        first, second = chans
        return [(second, first, "") if mods.get(second) == "MR" and mods.get(first) != "MR" else (first, second, "")]
    if not mods:
        return f"{listed}; needs channels 0000 and 0001, or a dataset.json naming more; or list the pairs to fuse in a manifest"
    mr = [c for c in chans if mods.get(c) == "MR"]
    other = [c for c in chans if mods.get(c) in NNUNET_TAGS]
    kinds = [mods[c] for c in other]
    if mr and other and len(set(kinds)) == len(kinds):
        return [(mr[0], c, f"_{NNUNET_TAGS[mods[c]]}" if len(other) > 1 else "") for c in other]  # type: ignore[index]
    said = ", ".join(f"{c} {mods.get(c) or 'unknown'}" for c in chans)
    why = "no MR" if not mr else "no CT/PET/SPECT" if not other else "two of one modality"
    return f"{listed}: {said} in dataset.json; {why} to pair; list the pairs to fuse in a manifest"


def _nnunet(root: Path, out: Path) -> tuple[list[BatchCase], list[str]]:
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(root.iterdir()):
        m = NNUNET_RE.match(p.name)
        if m:
            found.setdefault(m["id"], {})[m["ch"]] = p
    source, mods = _nnunet_channels(root) if found else (None, {})
    cases, unpaired = [], []
    for cid, chans in found.items():
        picked = _nnunet_pick(sorted(chans), mods)
        if isinstance(picked, str):
            unpaired.append(f"{cid}: {picked}")
            continue
        for fixed_ch, moving_ch, tag in picked:
            fixed, moving = chans[fixed_ch], chans[moving_ch]
            fixed_mod, moving_mod = mods.get(fixed_ch), mods.get(moving_ch)
            cases.append(BatchCase(f"{cid}{tag}", str(fixed), str(moving), str(out / f"{cid}{tag}{_output_ext(fixed)}"),
                                   fixed_modality=fixed_mod, moving_modality=moving_mod,
                                   modalities_from=str(source) if source and (fixed_mod or moving_mod) else None))
    return cases, unpaired


def _is_input(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(INPUT_EXT) or path.suffix == ""


def _maybe_dicom(path: Path) -> bool:
    """A file that may be DICOM: not NIfTI, PNG, TIFF or a zip."""
    return not path.name.lower().endswith((*PAIR_SUFFIXES, *ITK_SUFFIXES, ".zip"))


def _dicom_series_pair(sub: Path, series_given: bool) -> tuple[str | None, str | None] | str:
    """FIXED's and MOVING's series in a case folder of DICOM files (:func:`io.dicom.study_series_pair`);
    with --fixed-series / --moving-series given, those choose in every case. Otherwise why the folder
    cannot be paired."""
    from .io.dicom import study_series_pair

    if series_given:
        return None, None
    try:
        return study_series_pair(sub)
    except MedfuseError as exc:
        return str(exc)


def _subfolders(root: Path, out: Path, series_given: bool = False) -> tuple[list[BatchCase], list[str]]:
    from .image import Modality
    from .io import read_modality

    cases, unpaired = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        inputs = [p for p in sorted(sub.iterdir()) if not p.name.startswith(".") and _is_input(p)]
        if len(inputs) != 2 and inputs and all(p.is_file() and _maybe_dicom(p) for p in inputs):
            found = _dicom_series_pair(sub, series_given)
            if isinstance(found, str):
                unpaired.append(f"{sub.name}: {found}")
            else:
                cases.append(BatchCase(sub.name, str(sub), str(sub), str(out / f"{sub.name}.nii.gz"),
                                       fixed_series=found[0], moving_series=found[1]))
            continue
        if len(inputs) != 2:
            unpaired.append(f"{sub.name}: {len(inputs)} inputs, needs exactly 2")
            continue
        mods = []
        for p in inputs:
            try:
                mods.append(read_modality(p))  # a DICOM input's headers, never its pixels
            except (MedfuseError, OSError) as exc:
                unpaired.append(f"{sub.name}: {p.name} unreadable ({exc})")
                break
        else:
            mr = [i for i, m in enumerate(mods) if m is Modality.MR]
            if len(mr) != 1:
                unpaired.append(f"{sub.name}: cannot tell which input is the MRI (modalities {[m.value for m in mods]})")
                continue
            fixed, moving = inputs[mr[0]], inputs[1 - mr[0]]
            cases.append(BatchCase(sub.name, str(fixed), str(moving), str(out / f"{sub.name}.nii.gz")))
    return cases, unpaired


def _manifest(path: Path, out: Path) -> tuple[list[BatchCase], list[str]]:
    from .tables import read_table

    rows = read_table(path, ("id", "fixed", "moving"), "a manifest has the columns id,fixed,moving[,output]"
                      "[,initial_transform][,fixed_landmarks,moving_landmarks][,fixed_modality,moving_modality]")
    if not rows:
        raise InvalidInputError(f"{path}: no cases in the manifest")
    cases, problems = [], []
    for r in rows:
        fixed, moving = (_abs(path.parent / r[k]) for k in ("fixed", "moving"))
        output = r.get("output") or f"{r['id']}{_output_ext(fixed)}"
        target = _abs(out / output)
        if Path(output).is_absolute() or out not in target.parents:
            raise InvalidInputError(f"{path.name}: case {r['id']!r}: output {output!r} is not inside the output "
                                    "folder; give a relative path without '..'")
        initial = r.get("initial_transform") or None
        points = [r.get(k) or "" for k in ("fixed_landmarks", "moving_landmarks")]
        if any(points) and not all(points):
            raise InvalidInputError(f"{path.name}: case {r['id']!r}: give both fixed_landmarks and moving_landmarks")
        cases.append(BatchCase(r["id"], str(fixed), str(moving), str(target),
                               str(_abs(path.parent / initial)) if initial else None,
                               [str(_abs(path.parent / p)) for p in points] if all(points) else None,
                               fixed_modality=_manifest_modality(path, r, "fixed_modality"),
                               moving_modality=_manifest_modality(path, r, "moving_modality"),
                               modalities_from=str(path) if r.get("fixed_modality") or r.get("moving_modality")
                               else None))
    return cases, problems


def _manifest_modality(path: Path, row: dict[str, str], column: str) -> str | None:
    from .image import Modality

    given = row.get(column) or None
    try:
        return None if given is None else Modality.parse(given).value
    except ValueError as exc:
        raise InvalidInputError(f"{path.name}: case {row['id']!r}: {column}: {exc}") from None


def discover(source: Path, out: Path, dicom: bool = False, series_given: bool = False,
             figures: bool = False) -> tuple[list[BatchCase], str, list[str]]:
    """The cases of a folder or manifest, the pairing rule that matched, and what was not paired.
    ``dicom``: volumes are written as DICOM series folders (``OUT_DIR/CASE``) instead of NIfTI;
    ``series_given``: --fixed-series / --moving-series choose the series in case folders of DICOM files;
    ``figures``: each case writes its figure too (no case may write another's)."""
    check_folder_output(out, "--output")
    if not source.exists():
        raise InputNotFoundError(f"{source}: no such folder or manifest")
    out = _abs(out)
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise InvalidInputError(f"{source}: give a folder or a CSV manifest (id,fixed,moving[,output])")
        cases, problems = _manifest(source, out)
        rule = "manifest"
    else:
        source = _abs(source)
        if out == source or source in out.parents:
            raise OutputError(f"output folder {out} is inside the input folder {source}; a re-run would read "
                              "the results as inputs: write them elsewhere")
        left: list[str] = []
        for rule, finder in (("benchmark", _benchmark), ("nnunet", _nnunet),
                             ("subfolders", functools.partial(_subfolders, series_given=series_given))):
            cases, problems = finder(source, out)
            if cases:
                break
            left += problems
        else:
            why = f"; not paired: {left[0]}" + (f" (and {len(left) - 1} more)" if len(left) > 1 else "") if left else ""
            raise InputNotFoundError(
                f"{source}: no pairs found (ID_mri + ID_ct/pet/spect, CASE_0000 + CASE_0001, or one sub-folder per case)"
                + why
            )
    if dicom:
        cases = [replace(c, output=_as_folder(c.output)) for c in cases]
    written: dict[str, int] = {}  # every file a case writes (output, report, figure) -> its case's index
    for i, c in enumerate(cases):
        for path in (c.output, c.report, *([c.figure] if figures else [])):
            other = written.setdefault(os.path.abspath(path), i)
            if other != i:
                raise InvalidInputError(f"{source}: cases {cases[other].id} and {c.id} would both write {path}; "
                                        "give them outputs of different names (a manifest's output column)")
    inputs = {os.path.abspath(p): c.id for c in cases for p in (c.fixed, c.moving)}
    for c in cases:
        if os.path.abspath(c.output) in inputs:
            raise OutputError(f"{source}: case {c.id} would write {c.output}, an input of case "
                              f"{inputs[os.path.abspath(c.output)]}; give it another output")
    return cases, rule, problems


def fingerprint(case: BatchCase, options: dict[str, Any]) -> str:
    """Hash of what determines a case's output: inputs (path, size, mtime; for a DICOM folder its
    files' count, total size and latest mtime), options (but not :data:`NOT_DECISIVE`), version."""

    def stat(p: str) -> list[Any]:
        path = Path(p)
        if path.is_file():
            s = path.stat()
            return [p, s.st_size, s.st_mtime_ns]
        if path.is_dir():
            files = [f.stat() for f in path.rglob("*") if f.is_file()]
            return [p, len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]
        return [p]

    decisive = {k: v for k, v in options.items() if k not in NOT_DECISIVE}
    blob = json.dumps({"fixed": stat(case.fixed), "moving": stat(case.moving), "options": decisive,
                       "version": __version__}, sort_keys=True)
    for given in [case.initial_transform, *(case.landmarks or [])]:
        if given:
            blob += json.dumps(stat(given))
    for per_case in ([case.fixed_series, case.moving_series], [case.fixed_modality, case.moving_modality]):
        if any(per_case):
            blob += json.dumps(per_case)
    return hashlib.sha256(blob.encode()).hexdigest()


def _report_of(case: BatchCase) -> dict[str, Any] | None:
    try:
        return json.loads(case.report.read_text())
    except (OSError, ValueError):
        return None


def is_complete(case: BatchCase, fp: str) -> bool:
    report = _report_of(case)
    return bool(report and Path(case.output).exists() and report.get("batch", {}).get("fingerprint") == fp)


def _tune_malloc() -> None:
    """:data:`WORKER_MALLOC` in this process (glibc only; elsewhere nothing changes): set at run time,
    so that workers started by anyone, such as ``dask worker`` on another machine, get them."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param, value in WORKER_MALLOC.items():
        mallopt(param, value)


def case_threads(given: int = 0) -> int:
    """Threads for one case: ``given`` when positive; else this process's (:func:`cpu_threads`),
    shared among the tasks its dask worker runs at once, when it is one (a worker that dask's nanny
    started has ``OMP_NUM_THREADS`` 1)."""
    if given > 0:
        return given
    try:
        from distributed import get_worker

        share = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):  # not in a dask worker (or one of another make)
        share = 1
    return max(1, cpu_threads() // max(1, share))


def run_case(case: dict[str, str | None], options: dict[str, Any], fp: str, timeout: float | None = None) -> dict[str, Any]:
    """Fuse one case (in this process, or in a child process killed after ``timeout`` s).

    Never raises: returns a summary row with ``status`` done / failed / timeout.
    """
    from .memory import worker_budget

    t0 = time.perf_counter()
    row: dict[str, Any] = {"id": case["id"], "fixed": case["fixed"], "moving": case["moving"], "output": case["output"]}
    options = {**options, "max_memory": worker_budget(options.get("max_memory", "auto")),
               "threads": case_threads(options.get("threads", 0))}
    if timeout:
        payload = json.dumps({"case": case, "options": options, "fp": fp})
        try:
            proc = subprocess.run([sys.executable, "-m", "medfuse_cli.batch"], input=payload, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {**row, "status": "timeout", "seconds": round(time.perf_counter() - t0, 3),
                    "error": f"stopped after --case-timeout {timeout:g} s"}
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {**row, "status": "failed", "seconds": round(time.perf_counter() - t0, 3),
                    "error": f"worker process exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    _tune_malloc()
    from .pipeline import FuseOptions, fuse_pair

    with limited_threads(options["threads"]), case_log(case["id"], options.get("log_level")):
        try:
            Path(case["output"]).parent.mkdir(parents=True, exist_ok=True)
            opts = {k: v for k, v in options.items() if k not in BATCH_ONLY}
            for key in ("initial_transform", "landmarks", "fixed_series", "moving_series"):
                if case.get(key):
                    opts[key] = case[key]
            extra: dict[str, Any] = {"id": case["id"], "fingerprint": fp}
            for key in ("fixed_modality", "moving_modality"):  # --fixed-modality / --moving-modality win
                if not opts.get(key) and case.get(key):
                    opts[key] = case[key]
                    extra["modalities_from"] = case.get("modalities_from")
            figure = BatchCase(**case).figure if options.get("figures") else None
            result = fuse_pair(case["fixed"], case["moving"], case["output"], FuseOptions(**opts), figure=figure,
                               overwrite=True,
                               report_extra={"batch": extra})
            row.update(status="done", **_row_from_report(result.report))
        except MedfuseError as exc:
            row.update(status="failed", error=" ".join(str(exc).split()))
        except MemoryError:
            row.update(status="failed", error="out of memory")
        except Exception as exc:  # noqa: BLE001 - one bad case must never stop the batch
            row.update(status="failed", error=f"unexpected {type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _row_from_report(report: dict[str, Any]) -> dict[str, Any]:
    reg = report.get("registration", {})
    values = report.get("metrics", {}).get("values", {})
    how = f"skipped: {reg['skipped']}" if reg.get("skipped") else reg.get("kind", "")
    return {"registration": how, "warnings": " | ".join(report.get("warnings", [])),
            **{k: values[k] for k in METRICS if k in values}}


@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    rule: str
    unpaired: list[str]
    summary: Path
    part: Part | None = None
    total: int = 0  # cases found, in every part

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] in ("failed", "timeout")]


def clean_partials(out: Path, cases: list[BatchCase] | None = None) -> int:
    """Remove ``.NAME.XXXX.partial`` temporaries a killed run left behind: every one below ``out``, or
    only those of ``cases`` (a part leaves the other parts' work in progress alone)."""
    if cases is None:
        found = list(out.rglob(".*.partial")) if out.is_dir() else []
    else:
        found = []
        for c in cases:
            folder = Path(c.output).parent
            for name in (Path(c.output).name, c.report.name, c.figure.name):
                found += folder.glob(f".{glob.escape(name)}.*.partial")
    for p in found:
        if p.is_dir():  # an unfinished DICOM series
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(found)


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    from .io.atomic import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.DictWriter(buf, SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in sorted(rows, key=lambda r: r["id"]):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"), overwrite=True)  # file names as on disk


def run_batch(
    source: Path,
    out: Path,
    options: dict[str, Any],
    engine: str = "dask",
    workers: int | None = None,
    scheduler: str | None = None,
    force: bool = False,
    case_timeout: float | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    part: Part | None = None,
    log_level: int = logging.WARNING,
) -> BatchResult:
    """Fuse every case (with ``part``, that part's); finished rows are reported through ``on_done``
    as they complete. ``log_level``: what the dask workers print of each case's messages.

    ``summary.csv`` in ``out`` (``summary.part-K-of-N.csv`` for a part) is rewritten (atomically) at
    most every few seconds while cases finish and at the end; the reports beside the outputs are
    what a re-run trusts.
    """
    from .pipeline import FuseOptions

    FuseOptions(**{k: v for k, v in options.items() if k not in BATCH_ONLY})  # validate before any work
    if engine not in ("dask", "sequential"):
        raise InvalidInputError(f"unknown engine {engine!r}; choose dask or sequential")
    cases, rule, unpaired = discover(source, out, dicom=bool(options.get("dicom")),
                                     series_given=bool(options.get("fixed_series") or options.get("moving_series")),
                                     figures=bool(options.get("figures")))
    total = len(cases)
    if part is not None:
        cases = part.select(cases)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, part):
        removed = clean_partials(out, None if part is None else cases)
        if removed:
            log.warning("removed %d partial files left by an interrupted run", removed)
        summary = out / ("summary.csv" if part is None else f"summary.{part.tag}.csv")
        rows = _run_locked(cases, summary, {**options, "log_level": log_level}, engine, workers, scheduler, force,
                           case_timeout, on_start, on_done)
    return BatchResult(rows, rule, unpaired, summary, part, total)


LOCK_NAME = ".medfuse-batch.lock"


@contextmanager
def exclusive(out: Path, part: Part | None = None) -> Iterator[None]:
    """Hold the locks of a run into ``out`` until it ends: a whole run holds ``OUT_DIR/.medfuse-batch.lock``
    alone; a part shares it with the other parts and holds ``.medfuse-batch.part-K-of-N.lock`` alone.
    A run that would collide (a second whole run, a whole run beside parts, the same part twice, or
    parts of another N) stops with exit 6 instead of removing the other's unfinished files. The locks
    are ``flock``s, so the operating system releases them when a run dies, however it dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        log.warning("no file locking on this system: do not run two batches into %s at once", out)
        yield
        return
    holder = f"pid {os.getpid()} on {socket.gethostname()}" + ("" if part is None else f", --part {part.index}/{part.count}")
    with _flock(out / LOCK_NAME, fcntl, shared=part is not None, holder=holder):
        if part is None:
            yield
            return
        with _flock(out / f".medfuse-batch.{part.tag}.lock", fcntl, shared=False, holder=holder):
            for other in out.glob(".medfuse-batch.part-*-of-*.lock"):
                if not other.name.endswith(f"-of-{part.count}.lock"):
                    with _flock(other, fcntl, shared=True, holder=holder, why=f"parts of another count than {part.count}"):
                        pass
            yield


@contextmanager
def _flock(path: Path, fcntl: Any, shared: bool, holder: str, why: str = "") -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (shared or alone) or stop with exit 6 naming its holder; an
    exclusive holder writes ``holder`` into the file while it holds it. On a file system without
    locks (some cluster file systems) a warning, and no lock."""
    try:
        fh = open(path, "a+")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {os_reason(exc)}") from None
    with fh:
        locked = True
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                fh.seek(0)
                who = fh.read().strip() or "parts of one run with --part"
                raise OutputError(f"another medfuse batch ({who}) is writing to {path.parent}"
                                  f"{'; ' + why if why else ''}; wait for it or choose another output folder") from None
            log.warning("no file locking on the file system of %s (%s): do not run two batches into it at once",
                        path.parent, exc.strerror)
            locked = False
        if locked and not shared:
            fh.seek(0)
            fh.truncate()
            fh.write(holder + "\n")
            fh.flush()
        try:
            yield
        finally:
            if locked and not shared:
                fh.seek(0)
                fh.truncate()


def _run_locked(
    cases: list[BatchCase],
    summary: Path,
    options: dict[str, Any],
    engine: str,
    workers: int | None,
    scheduler: str | None,
    force: bool,
    case_timeout: float | None,
    on_start: Callable[[int, int], None] | None,
    on_done: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    todo: list[tuple[BatchCase, str]] = []
    for case in cases:
        fp = fingerprint(case, options)
        if not force and is_complete(case, fp):
            rows.append({**asdict(case), "status": "skipped", "seconds": 0.0, **_row_from_report(_report_of(case) or {})})
        else:
            todo.append((case, fp))
    if on_start:
        on_start(len(cases), len(rows))

    last_write = [0.0]

    def finish(row: dict[str, Any]) -> None:
        rows.append(row)
        if time.monotonic() - last_write[0] > SUMMARY_EVERY_S:
            write_summary(rows, summary)
            last_write[0] = time.monotonic()
        if on_done:
            on_done(row)

    write_summary(rows, summary)
    if engine == "sequential" or not todo:
        here = {k: v for k, v in options.items() if k != "log_level"}  # this process shows its own messages
        for case, fp in todo:
            finish(run_case(asdict(case), here, fp, case_timeout))
    else:
        _run_dask(todo, options, workers, scheduler, case_timeout, finish)
    write_summary(rows, summary)
    return rows


def _run_dask(todo, options, workers, scheduler, case_timeout, finish) -> None:
    with kept_thread_variables():
        _run_on_dask(todo, options, workers, scheduler, case_timeout, finish)


def _run_on_dask(todo, options, workers, scheduler, case_timeout, finish) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise InvalidInputError("the dask engine needs dask.distributed: pip install 'dask[distributed]'") from None
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise InputNotFoundError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    else:
        from .memory import available

        n = workers or min(usable_cores(), len(todo))
        # each case a share of the cores, counted before dask sets OMP_NUM_THREADS=1 here for its workers
        options = {**options, "threads": options.get("threads") or max(1, cpu_threads() // n)}
        # each worker's share of the memory free now (dask's default shares the total); workers log only
        # critical messages (a worker's heartbeat racing the cluster's shutdown printed a traceback; a
        # case's failure is in its row, a lost worker fails its case)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.CRITICAL, memory_limit=available() // n)
        client = Client(cluster)
    try:
        futures = {client.submit(run_case, asdict(c), options, fp, case_timeout, key=f"medfuse-{c.id}-{fp[:16]}",
                                 pure=False): c for c, fp in todo}
        for future in as_completed(futures):
            try:
                finish(future.result())
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its case, not the batch
                finish({**asdict(futures[future]), "status": "failed", "error": f"worker lost: {exc}"})
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _child() -> None:
    """``python -m medfuse_cli.batch``: run one case from JSON on stdin (for --case-timeout)."""
    job = json.loads(sys.stdin.read())
    print(json.dumps(run_case(job["case"], job["options"], job["fp"])))


if __name__ == "__main__":
    _child()
