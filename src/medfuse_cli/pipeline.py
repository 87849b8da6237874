"""``fuse_pair``: read -> register -> resample -> normalise -> fuse -> map back -> write -> report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import GeometryError, InvalidInputError, OutputError
from .fusion import NETWORKS, VOLUME_NETWORKS, check_fits, fuse, resolve_method
from .image import Image, Modality
from .intensity import (
    check_colormap,
    colourised,
    parse_ct_window,
    rgb_to_ycbcr,
    usable,
    window_for,
    ycbcr_to_rgb,
)
from .io import FrameChoice, check_format_fits, check_output, read_image, write_image
from .io.atomic import (
    atomic_write_bytes,
    check_distinct,
    check_writable,
    missing_folders,
    undone_on_failure,
)
from .io.raster import RASTER_FORMATS
from .memory import Plan, peak, plan
from .parallel import cpu_threads, itk_threads
from .register import (
    TRANSFORM_SUFFIXES,
    Registration,
    given_start,
    register,
    resample_to,
    transform_suffixes,
    unsheared,
)

log = logging.getLogger(__name__)



TASK_OF_MODALITY = {Modality.CT: "mri-ct", Modality.PT: "mri-pet", Modality.NM: "mri-spect"}


def network_roles(fixed: Modality, moving: Modality) -> tuple[bool, str | None]:
    """Whether the MRI is MOVING (the networks take the MRI first, whichever input gives the grid)
    and the task: None when the pair is not an MRI with a CT, PET or SPECT, which no network learnt."""
    if fixed is Modality.MR and moving in TASK_OF_MODALITY:
        return False, TASK_OF_MODALITY[moving]
    if moving is Modality.MR and fixed in TASK_OF_MODALITY:
        return True, TASK_OF_MODALITY[fixed]
    return False, None


@dataclass
class FuseOptions:
    """Every parameter of one fusion; recorded in the report."""

    method: str = "auto"
    transform: str = "auto"
    initial_transform: str | None = None  # ITK transform file: the registration's start (with "none": the result)
    landmarks: list[str] | None = None  # FIXED's and MOVING's landmark files: their rigid fit is the start instead
    fixed_modality: str | None = None
    moving_modality: str | None = None
    ct_window: str | None = None
    fixed_series: str | None = None
    moving_series: str | None = None
    frame: int | None = None  # of each 4D input (a dynamic PET, an fMRI)
    mean_frames: bool = False  # each 4D input: the mean of its frames
    seed: int = 0
    metrics: bool = True
    device: str = "auto"
    threads: int = 0  # CPU threads for the networks, the metrics and ITK's resampling (0: the defaults)
    anonymize: bool = False  # DICOM output: no patient identity, new study UIDs
    patch: int = 96  # volume networks: sliding-window side, voxels
    overlap: float = 0.25  # volume networks: overlap of neighbouring windows (fraction)
    max_memory: str = "auto"  # "auto" (what is available) or a size such as "4G"
    colormap: str | None = None  # show a grey MOVING (PET, SPECT, CT) in this matplotlib colour map: colour output

    def __post_init__(self) -> None:
        from .memory import parse_size

        parse_size(self.max_memory)
        resolve_method(self.method)
        from .models.checks import check_device_name, check_window

        check_window(self.patch, self.overlap)
        check_device_name(self.device)
        if self.threads < 0:
            raise InvalidInputError(f"--threads {self.threads}: must be 0 (torch's default) or more")
        if self.transform not in ("auto", "rigid", "affine", "none"):
            raise InvalidInputError(f"unknown transform {self.transform!r}; choose auto, rigid, affine or none")
        self._start = given_start(self.initial_transform, self.landmarks, rigid=self.transform != "none")
        parse_ct_window(self.ct_window)
        self.frames()
        if self.colormap is not None:
            check_colormap(self.colormap)
        for m in (self.fixed_modality, self.moving_modality):
            if m is not None:
                try:
                    Modality.parse(m)
                except ValueError as exc:
                    raise InvalidInputError(str(exc)) from None

    def frames(self) -> FrameChoice:
        """What to take from a 4D FIXED or MOVING (both, when both are 4D)."""
        return FrameChoice(frame=self.frame, mean=self.mean_frames)

    def start(self):
        """The registration's start given by --initial-transform or --landmarks, if any (read once, when
        the options are made, before any image)."""
        return self._start


@dataclass
class FuseResult:
    fused: Image
    moving_on_fixed: Image
    registration: Registration
    report: dict[str, Any] = field(default_factory=dict)


Stage = Callable[..., None]  # stage(name) as a step starts; stage(name, done, total) as a long one goes on


def _load(path: str | os.PathLike[str] | Image, series: str | None, frames: FrameChoice) -> Image:
    return path if isinstance(path, Image) else read_image(path, series=series, frames=frames)


def _load_pair(fixed: str | os.PathLike[str] | Image, moving: str | os.PathLike[str] | Image,
               options: FuseOptions) -> tuple[Image, Image]:
    """FIXED and MOVING; one DICOM study given as both (with no series chosen) gives its MR series as
    FIXED and its CT, PET or SPECT series as MOVING."""
    same = not isinstance(fixed, Image) and not isinstance(moving, Image) and Path(fixed) == Path(moving)
    study = same and (Path(fixed).is_dir() or Path(fixed).suffix.lower() == ".zip" and Path(fixed).is_file())
    fixed_series, moving_series = options.fixed_series, options.moving_series
    if study and fixed_series is None and moving_series is None:
        from .io.dicom import study_series_pair

        fixed_series, moving_series = study_series_pair(Path(fixed))
    return _load(fixed, fixed_series, options.frames()), _load(moving, moving_series, options.frames())


def _modality_source(image: Image) -> str:
    """Where an image's modality came from, before any option or assumption."""
    if image.modality is Modality.OT:
        return "unknown"
    return "dicom header" if image.provenance.format == "dicom" else "file name"


def _assign_modality(image: Image, given: str | None, default: Modality, why: str = "") -> str:
    if given is not None:
        image.modality = Modality.parse(given)
        return "option"
    if image.modality is not Modality.OT:
        return _modality_source(image)
    image.modality = default
    log.warning("%s: modality unknown, assumed %s%s", image.provenance.source, default.value, why)
    return "assumed"


def _check_pair(fixed: Image, moving: Image) -> Image:
    """Refuse pairs that cannot be fused (FIXED sheared among them); returns MOVING, spread over FIXED's
    field of view when both are slices without geometry (PNG / TIFF) of different sizes, or resampled
    onto an orthogonal grid when sheared."""
    if fixed.is_color:
        raise InvalidInputError(f"FIXED {fixed.provenance.source} is colour, but FIXED must be the greyscale "
                                f"anatomy: give the MRI first (FIXED) and {fixed.provenance.source} second (MOVING)")
    rasters = {fixed.provenance.format, moving.provenance.format} <= set(RASTER_FORMATS)
    placed = not {fixed.provenance.format, moving.provenance.format} & set(RASTER_FORMATS)  # both in world space
    if fixed.is_2d != moving.is_2d and not (fixed.is_2d and placed):  # a slice in world space may take a volume
        two, three = (fixed, moving) if fixed.is_2d else (moving, fixed)
        hint = ("a slice with a volume works with the slice as FIXED" if placed else
                "a PNG/TIFF/JPEG/BMP slice has no position in space; give it as DICOM or NIfTI")
        raise GeometryError(f"{two.provenance.source} is a 2D slice but {three.provenance.source} is a 3D volume; "
                            f"give two of a kind ({hint})")
    if fixed.data.shape == moving.data.shape and np.array_equal(fixed.affine, moving.affine) \
            and np.array_equal(fixed.data, moving.data):
        log.warning("FIXED and MOVING hold the same image (%s and %s): the fusion can only return it; "
                    "was the other modality meant?", fixed.provenance.source, moving.provenance.source)
    if fixed.is_2d and rasters and fixed.shape != moving.shape:
        return _same_field_of_view(fixed, moving)
    if fixed.is_sheared:
        raise GeometryError(f"FIXED {fixed.provenance.source} has a sheared grid (e.g. an uncorrected gantry tilt), and "
                            "the output lies on FIXED's grid: give its tilt-corrected version (dcm2niix's _Tilt_ file, "
                            "or the DICOM series, which medfuse corrects), or give it as MOVING")
    return unsheared(moving)


def _same_field_of_view(fixed: Image, moving: Image) -> Image:
    """MOVING's pixels spread over FIXED's field of view: two slices without geometry, of different
    sizes, are taken to show the same field (a PET exported at 128x128 beside a 256x256 MRI)."""
    (fw, fh), (mw, mh) = fixed.shape[:2], moving.shape[:2]
    scale = np.array([fw / mw, fh / mh])
    if abs(scale[0] / scale[1] - 1.0) > 0.01:
        raise GeometryError(f"2D slices without geometry differ in shape: {fixed.provenance.source} is {fw}x{fh}, "
                            f"{moving.provenance.source} is {mw}x{mh}; crop or pad one to the other's aspect ratio")
    log.warning("%s (%dx%d) and %s (%dx%d) carry no geometry: taken to show the same field of view",
                fixed.provenance.source, fw, fh, moving.provenance.source, mw, mh)
    to_fixed = np.diag([scale[0], scale[1], 1.0, 1.0])
    to_fixed[:2, 3] = (scale - 1.0) / 2.0  # pixel edges meet: MOVING's pixel i covers FIXED's i*s .. (i+1)*s
    return replace(moving, affine=fixed.affine @ to_fixed)


def _describe(image: Image, modality_source: str) -> dict[str, Any]:
    return {
        "file": image.provenance.source,
        "format": image.provenance.format,
        "series_description": image.provenance.series_description,
        "modality": image.modality.value,
        "modality_source": modality_source,
        "shape": list(image.data.shape),
        "spacing_mm": [round(s, 6) for s in image.spacing],
        "orientation": image.orientation,
        "units": image.units,
        "notes": list(image.provenance.steps),
    }


def fuse_images(fixed: Image, moving: Image, options: FuseOptions,
                stage: Stage | None = None) -> tuple[Image, Image, Registration, dict]:
    """The pure part of the pipeline on in-memory images (no files); ``stage`` hears of each step
    and of a network's progress. ``options.threads`` > 0 also caps ITK's threads (resampling)."""

    with itk_threads(options.threads):
        return _fuse_images(fixed, moving, options, stage or (lambda *args: None))


def _fuse_images(fixed: Image, moving: Image, options: FuseOptions,
                 stage: Stage) -> tuple[Image, Image, Registration, dict]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fixed = usable(fixed, "FIXED")
    moving = usable(moving, "MOVING")
    moving = _check_pair(fixed, moving)
    if options.colormap and (moving.is_color or moving.modality is Modality.MR):
        what = "already colour" if moving.is_color else "an MR; give the MRI as FIXED"
        raise InvalidInputError(f"--colormap colours MOVING (the PET, SPECT or CT), but {moving.provenance.source} is {what}")
    mri_moving, task = network_roles(fixed.modality, moving.modality)
    method = resolve_method(options.method, volume=not fixed.is_2d, learnt_pair=task is not None)
    check_fits(method, volume=not fixed.is_2d)  # before registering
    window = {f.name: f.default for f in fields(FuseOptions) if f.name in ("patch", "overlap")}
    if method not in VOLUME_NETWORKS and any(getattr(options, name) != value for name, value in window.items()):
        log.warning("--patch and --overlap set the sliding window of %s; %s does not use them",
                    ", ".join(VOLUME_NETWORKS), method)
    if method not in NETWORKS and options.device not in ("auto", "cpu"):
        log.warning("--device %s runs the networks; the %s rule runs on the CPU", options.device, method)
    pair = f"FIXED is {fixed.modality.value} and MOVING is {moving.modality.value}"
    if options.ct_window is not None and Modality.CT not in (fixed.modality, moving.modality):
        log.warning("--ct-window windows a CT, but %s: not used (if MOVING is a CT, say so with --moving-modality CT)", pair)
    if task is None:
        if method in NETWORKS:
            task = TASK_OF_MODALITY.get(moving.modality, "mri-pet")
            log.warning("%s was trained on MRI with CT, PET or SPECT, but %s: it takes FIXED as the MRI (task %s); "
                        "a classic rule may suit this pair better", method, pair, task)
        elif options.method == "auto":
            log.info("auto: the networks fuse MRI with CT, PET or SPECT, but %s: using %s", pair, method)
    elif options.method == "auto" and method not in NETWORKS:
        from .models import weights

        log.warning("auto: no AdaFuse model card in %s (MEDFUSE_WEIGHTS names another folder): using the %s rule",
                    weights.WEIGHTS_DIR, method)
    metrics = options.metrics and _scorable(fixed)
    budget = plan(fixed.shape[:3], method, metrics, options.patch, options.max_memory, options.device,
                  cpu_threads(options.threads))
    timings["check_s"] = time.perf_counter() - t0  # the inputs checked, the memory planned (torch loaded)

    t0 = time.perf_counter()
    stage("registering")
    reg = register(fixed, moving, options.transform, seed=options.seed, initial=options.start())
    for w in reg.warnings:
        log.warning("%s", w)
    if reg.skipped:
        log.info("registration skipped: %s", reg.skipped)
    timings["register_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage("resampling and normalising")
    transform = None if reg.skipped else reg.transform
    moved = resample_to(moving, fixed, transform)
    timings["resample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ct_window = parse_ct_window(options.ct_window)
    fwin = window_for(fixed, ct_window)
    a = fwin.apply(fixed.data)
    mwin = window_for(moving, ct_window)
    if options.colormap:
        moved = colourised(moved, mwin, options.colormap)
    if moved.is_color:
        y, cb, cr = rgb_to_ycbcr(moved.data)
        b = y / np.float32(255.0) if options.colormap else mwin.apply(y)
    else:
        b = mwin.apply(moved.data)
    timings["normalise_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ran: dict[str, Any] = {}
    first, second = (b, a) if mri_moving else (a, b)  # the MRI first, as the networks learnt it
    stage(f"fusing ({method})")
    f = fuse(method, first, second, task=task or "mri-pet", device=options.device, patch=budget.patch,
             overlap=options.overlap, threads=options.threads, info=ran, batch=budget.batch,
             progress=lambda done, total: stage(f"fusing ({method})", done, total))
    timings["fuse_s"] = time.perf_counter() - t0

    if moved.is_color:
        data = ycbcr_to_rgb(f * 255.0, cb, cr)
        units = None
    elif fixed.provenance.format in RASTER_FORMATS and fixed.is_2d:
        data = np.clip(np.rint(f * 255.0), 0, 255).astype(np.uint8)
        units = None
    else:
        data = fwin.invert(f)
        units = fixed.units
    fused = Image(
        data=data,
        affine=fixed.affine.copy(),
        modality=fixed.modality,
        units=units,
        provenance=fixed.provenance,
        nifti_geometry=fixed.nifti_geometry,
    )
    details: dict[str, Any] = {
        "timings": timings,
        "normalisation": {
            "fixed": {"lo": fwin.lo, "hi": fwin.hi, "rule": fwin.rule},
            "moving": {"lo": mwin.lo, "hi": mwin.hi, "rule": mwin.rule},
        },
        "colour": (None if not moved.is_color else "YCbCr: Y fused, Cb/Cr of MOVING kept"
                   + (f" (MOVING shown in the {options.colormap} colour map over its window)" if options.colormap else "")),
        "method": method if method == options.method else f"{method} (from {options.method})",
        "model": _model_used(method, task or "mri-pet"),
        "mri_input": "MOVING" if mri_moving else "FIXED" if task else None,
        "device": ran.get("device"),
        "slices_per_forward": ran.get("slices_per_forward"),
        "memory": budget.summary(),
    }
    if budget.metrics:
        t0 = time.perf_counter()
        stage("scoring")
        details["metrics"] = _metrics(fixed, moved, fused, budget.metric_threads)
        timings["metrics_s"] = time.perf_counter() - t0
    return fused, moved, reg, details


def _model_used(method: str, task: str) -> dict[str, Any] | None:
    """Name, task and sha256 of the network weights a fusion used (None for classic rules)."""
    from .fusion import NETWORKS, model_name

    if method not in NETWORKS:
        return None
    from .models.weights import card_path

    card = json.loads(card_path(model_name(method, task)).read_text())
    return {"name": card["name"], "task": task, "sha256": card["sha256"]}


def _library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped this result (torch only when a network ran), so a report
    says what to install to reproduce it."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # installed under another distribution name: ask the module
            return str(getattr(sys.modules.get(name), "__version__", "unknown"))

    names = ["numpy", "scipy", "SimpleITK", "nibabel", "pydicom", *(["torch"] if "torch" in sys.modules else [])]
    return {name: of(name) for name in names}


def _scorable(fixed: Image) -> bool:
    """Whether the metrics' SSIM window fits FIXED's grid; if not, they are skipped with a warning (the
    fusion itself needs no such size)."""
    from .metrics import SSIM_RADIUS, too_small

    x, y, z = fixed.shape[:3]
    if not too_small((y, x) if fixed.is_2d else (z, y, x)):
        return True
    log.warning("%s is too small for the metrics (SSIM's window needs %d voxels a side): metrics skipped",
                "x".join(map(str, fixed.shape[:3])), 2 * SSIM_RADIUS + 1)
    return False


def _metrics(fixed: Image, moved: Image, fused: Image, threads: int = 1) -> dict[str, Any]:
    """``medfuse eval``'s metrics of this fusion (A = FIXED, B = MOVING on FIXED's grid), ``threads``
    metrics at once."""
    from .evaluate import CONVENTIONS, metric_array
    from .metrics import compute

    values = compute(metric_array(fixed), metric_array(moved), metric_array(fused), threads)
    return {"values": values, "A": "FIXED", "B": "MOVING on FIXED's grid", "conventions": CONVENTIONS}


class _Collect(logging.Handler):
    """Keeps the messages of the warnings this thread logs (a fusion's report lists them)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into, self.thread = into, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.into.append(record.getMessage())


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """The warnings medfuse logs in this thread inside the block, as they come. Where nothing set up
    logging (a script calling the API), they still reach stderr, as Python's last resort would send them."""
    seen: list[str] = []
    logger = logging.getLogger("medfuse_cli")
    handlers = [_Collect(seen)] + ([logging.lastResort] if logging.lastResort and not logger.hasHandlers() else [])
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield seen
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


def fuse_pair(
    fixed: str | os.PathLike[str] | Image,
    moving: str | os.PathLike[str] | Image,
    output: str | os.PathLike[str] | None = None,
    options: FuseOptions | None = None,
    report: str | os.PathLike[str] | None = None,
    figure: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    stage: Stage | None = None,
    report_extra: dict[str, Any] | None = None,
) -> FuseResult:
    """Fuse MOVING into FIXED's geometry; optionally write the image, a JSON report and a figure.

    The report goes to ``report`` or, when an output is given, beside it as ``<output>.json``;
    ``report_extra`` is merged into it; its ``warnings`` are every warning logged on the way.
    Outputs are checked before any work and written atomically, the report last.
    """
    with collected_warnings() as seen:
        options = options or FuseOptions()
        stage = stage or (lambda *args: None)
        out_path = Path(output) if output is not None else None
        report_path = Path(report) if report is not None else (report_beside(out_path) if out_path else None)
        check_distinct({"--output": out_path, "--report" if report else "the report beside --output": report_path,
                        "--figure": figure})
        if out_path is not None:
            check_output(out_path, overwrite, inputs=[fixed, moving])
        for extra in (report_path, Path(figure) if figure else None):
            if extra is not None:
                check_writable(extra, overwrite, inputs=[fixed, moving])
        if figure:
            from .report import figure_format

            figure_format(Path(figure))

        started = time.perf_counter()
        stage("reading")
        t0 = time.perf_counter()
        fixed_img, moving_img = _load_pair(fixed, moving, options)
        read_s = time.perf_counter() - t0
        if out_path is not None:
            check_format_fits(out_path, fixed_img)
        fixed_src = _assign_modality(fixed_img, options.fixed_modality, Modality.MR)
        ct = options.ct_window is not None and not moving_img.is_color  # a grey MOVING with a CT window is a CT
        moving_src = _assign_modality(moving_img, options.moving_modality, Modality.CT if ct else Modality.PT,
                                      " (--ct-window given)" if ct else "")

        fused, moved, reg, details = fuse_images(fixed_img, moving_img, options, stage)

        written: list[Path | None] = []  # removed again, with the folders made for them, if a later step fails
        with undone_on_failure(written, missing_folders(out_path, figure, report_path)):
            if out_path is not None:
                stage("writing")
                write_image(fused, out_path, overwrite=overwrite, dicom=_dicom_context(fixed, moving, fixed_img, moving_img, options, details))
                written.append(out_path)
            details["timings"] = {"read_s": read_s, **details["timings"]}
            rep: dict[str, Any] = {
                **_report_head(out_path, fixed_img, fixed_src, moving_img, moving_src),
                "parameters": asdict(options),  # the fields only (not the start read from their files)
                "registration": reg.summary(),
                **details,
                **(report_extra or {}),
                "warnings": seen,  # filled as they come, until the report is written
            }
            rep["timings"]["total_s"] = time.perf_counter() - started
            rep["memory"]["peak_bytes"] = peak()
            result = FuseResult(fused, moved, reg, rep)
            if figure is not None:
                stage("drawing figure")
                from .report import write_figure

                write_figure(fixed_img, moved, fused, Path(figure), overwrite=overwrite)
                written.append(Path(figure))
            if report_path is not None:
                from .report import write_report

                write_report(rep, report_path, overwrite=overwrite)
        return result


def _dicom_context(fixed, moving, fixed_img: Image, moving_img: Image, options: FuseOptions, details: dict):
    """Sources, method and privacy of a DICOM series output."""
    from .io.dicom_write import DicomContext

    model = details.get("model")
    how = f"medfuse {__version__} fusion, method {details['method']}"
    if model:
        how += f", model {model['name']} sha256 {model['sha256'][:16]}"
    is_dicom = fixed_img.provenance.format == "dicom" and not isinstance(fixed, Image)
    return DicomContext(
        fixed=Path(fixed) if is_dicom else None,
        fixed_series=fixed_img.provenance.series_uid,
        moving=Path(moving) if moving_img.provenance.format == "dicom" and not isinstance(moving, Image) else None,
        moving_series=moving_img.provenance.series_uid,
        description=how, anonymize=options.anonymize)


def report_beside(out: Path) -> Path:
    """``OUT.json`` for an output ``OUT.EXT`` of any written format (a DICOM folder: ``OUT.json``)."""
    from .io import NIFTI_SUFFIXES, RASTER_SUFFIXES
    from .io.itk import ITK_OUTPUT_SUFFIXES

    name = out.name
    for suffix in sorted((*NIFTI_SUFFIXES, *RASTER_SUFFIXES, *ITK_OUTPUT_SUFFIXES), key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".json")



def register_pair(
    fixed: str | os.PathLike[str],
    moving: str | os.PathLike[str],
    output: str | os.PathLike[str],
    transform: str = "auto",
    save_transform: str | os.PathLike[str] | None = None,
    fixed_series: str | None = None,
    moving_series: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    initial_transform: str | os.PathLike[str] | None = None,
    landmarks: Sequence[str | os.PathLike[str]] | None = None,
    stage: Stage | None = None,
    report: str | os.PathLike[str] | None = None,
    max_memory: str = "auto",
    frame: int | None = None,
    mean_frames: bool = False,
) -> Registration:
    """Register MOVING onto FIXED, write MOVING on FIXED's grid (and the transform and a JSON report,
    if asked; the report last); ``stage`` hears of each step. Refused (exit 10) before registering
    when it would need more than ``max_memory``."""
    with collected_warnings() as seen:
        started = time.perf_counter()
        stage = stage or (lambda *args: None)
        options = FuseOptions(transform=transform, initial_transform=None if initial_transform is None else str(initial_transform),
                              landmarks=[str(p) for p in landmarks] if landmarks else None, seed=seed,
                              fixed_series=fixed_series, moving_series=moving_series,
                              frame=frame, mean_frames=mean_frames, max_memory=max_memory)  # checks the names, the files and the size
        out_path = Path(output)
        report_path = Path(report) if report is not None else None
        check_distinct({"--output": out_path, "--save-transform": save_transform, "--report": report_path})
        check_output(out_path, overwrite, inputs=[fixed, moving])
        for extra in (Path(save_transform) if save_transform is not None else None, report_path):
            if extra is not None:
                check_writable(extra, overwrite, inputs=[fixed, moving])
        if save_transform is not None and Path(save_transform).suffix.lower() not in TRANSFORM_SUFFIXES:
            raise OutputError(f"--save-transform {Path(save_transform).name}: name it {transform_suffixes()} "
                              "(ITK chooses the format by the suffix)")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        stage("reading")
        fixed_img, moving_img = _load_pair(fixed, moving, options)
        check_format_fits(out_path, fixed_img)
        fixed_img = usable(fixed_img, "FIXED")
        moving_img = usable(moving_img, "MOVING")
        moving_img = _check_pair(fixed_img, moving_img)
        budget = plan(fixed_img.shape[:3], "register", False, options.patch, max_memory)
        timings["read_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        stage("registering")
        reg = register(fixed_img, moving_img, transform, seed=seed, initial=options.start())
        for w in reg.warnings:
            log.warning("%s", w)
        timings["register_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        stage("resampling")
        moved = resample_to(moving_img, fixed_img, None if reg.skipped else reg.transform)
        timings["resample_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        stage("writing")
        written: list[Path | None] = []
        with undone_on_failure(written, missing_folders(out_path, save_transform, report_path)):
            write_image(moved, out_path, overwrite=overwrite)
            written.append(out_path)
            if save_transform is not None:
                _write_transform(reg, Path(save_transform), overwrite)
                written.append(Path(save_transform))
            timings["write_s"] = time.perf_counter() - t0
            timings["total_s"] = time.perf_counter() - started
            if report_path is not None:
                from .report import write_report

                rep = _registration_report(out_path, fixed_img, moving_img, options, reg, timings, budget, seen)
                write_report(rep, report_path, overwrite=overwrite)
    return reg


REGISTRATION_PARAMETERS = ("transform", "initial_transform", "landmarks", "seed", "fixed_series", "moving_series",
                           "frame", "mean_frames", "max_memory")


def _report_head(output: Path | None, fixed: Image, fixed_source: str, moving: Image,
                 moving_source: str) -> dict[str, Any]:
    """The keys the reports of ``fuse`` and ``register`` start with: tool, versions, output, inputs."""
    return {
        "tool": "medfuse",
        "version": __version__,
        "libraries": _library_versions(),
        "output": output.name if output else None,
        "inputs": {"fixed": _describe(fixed, fixed_source), "moving": _describe(moving, moving_source)},
    }


def _registration_report(out_path: Path, fixed: Image, moving: Image, options: FuseOptions, reg: Registration,
                         timings: dict[str, float], budget: Plan, warnings: list[str]) -> dict[str, Any]:
    """The JSON report of ``register``: as ``fuse``'s, without the fusion."""
    return {
        **_report_head(out_path, fixed, _modality_source(fixed), moving, _modality_source(moving)),
        "parameters": {k: v for k, v in asdict(options).items() if k in REGISTRATION_PARAMETERS},
        "registration": reg.summary(),
        "timings": timings,
        "memory": {k: v for k, v in budget.summary().items() if k in ("limit_bytes", "estimate_bytes", "peak_bytes")},
        "warnings": warnings,
    }


def _write_transform(reg: Registration, target: Path, overwrite: bool) -> None:
    """Write the registration's transform atomically (ITK picks the format by the suffix)."""
    import tempfile

    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        tmp_file = Path(tmp) / ("t" + target.suffix.lower())
        try:
            sitk.WriteTransform(reg.transform, str(tmp_file))
        except RuntimeError as exc:
            raise OutputError(f"cannot write the transform {target}: {str(exc).splitlines()[-1]}") from None
        atomic_write_bytes(target, tmp_file.read_bytes(), overwrite)
