"""The ``medfuse`` command line: parses options, calls the library, maps errors to exit codes."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import EXIT_CODES, MedfuseError

app = typer.Typer(
    name="medfuse",
    help=(
        "Fuse multimodal medical images (MRI with CT, PET or SPECT) in the MRI's exact geometry.\n\n"
        "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command -----------------------------------------------------
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print details of every step.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show a full traceback on errors (for bug reports).")]
# Path parameters use readable=False: medfuse checks readability itself (one line, exit 3)
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output file if it exists.")]
Series = Annotated[
    str | None,
    typer.Option(
        "--series",
        help="DICOM input with several series: take this one (SeriesInstanceUID, SeriesNumber or "
        "SeriesDescription). 'medfuse info' lists them.",
    ),
]
Frame = Annotated[
    int | None,
    typer.Option("--frame", min=0, help="4D input: take this frame (0-based)."),
]
MeanFrames = Annotated[bool, typer.Option("--mean-frames", help="4D input: average all frames.")]
PairFrame = Annotated[
    int | None,
    typer.Option("--frame", min=0, help="4D FIXED or MOVING (a dynamic PET, an fMRI): take this frame (0-based) of "
                 "each 4D input; 3D inputs are taken as they are. Without it (or --mean-frames) a 4D input is refused."),
]
PairMeanFrames = Annotated[bool, typer.Option("--mean-frames", help="4D FIXED or MOVING: average the frames of each 4D input.")]
Suv = Annotated[
    bool,
    typer.Option(
        "--suv",
        help="DICOM PET in Bq/ml: convert to body-weight SUV (needs patient weight, injected dose, "
        "half-life and injection time in the header).",
    ),
]


THIRD_PARTY_LOGGERS = ("nibabel", "pydicom", "highdicom", "PIL", "tifffile", "py.warnings")


def _log_level(quiet: bool, verbose: bool) -> int:
    return logging.ERROR if quiet else (logging.DEBUG if verbose else logging.WARNING)


def _setup_logging(quiet: bool, verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    from .caselog import CaseFormatter

    level = _log_level(quiet, verbose)
    handler = RichHandler(
        console=Console(stderr=True), show_time=False, show_path=False, markup=False, rich_tracebacks=False
    )
    handler.setFormatter(CaseFormatter("%(message)s"))  # a batch case's lines tagged with its id
    handler.setLevel(level)
    root = logging.getLogger("medfuse_cli")
    root.handlers[:] = [handler]
    root.setLevel(min(level, logging.WARNING))  # warnings still reach the report with --quiet
    root.propagate = False
    # libraries' own messages about damaged headers (nibabel "fixes", pydicom VR lookups) and
    # Python warnings: shown (from WARNING up) with --verbose only, so a refused input stays one line
    logging.captureWarnings(True)
    for name in THIRD_PARTY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
        lib.propagate = False


def _fail(message: str, code: int) -> None:
    first_line = " ".join(message.split())
    sys.stderr.write(f"medfuse: error: {first_line}\n")
    raise typer.Exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``kill``), raised where the program is so that it cleans up as
    for Ctrl-C: no output without its report, no temporary files."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def _run(debug: bool, quiet: bool, verbose: bool, body: Callable[[], Any]) -> Any:
    """Run a command body; every failure becomes one line on stderr and a documented exit code."""
    import signal
    import threading

    _setup_logging(quiet, verbose)
    main = threading.current_thread() is threading.main_thread()  # only it may take signals
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        return body()
    except typer.Exit:
        raise
    except MedfuseError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except _Terminated:
        _fail("terminated (SIGTERM)", 143)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except MemoryError:
        if debug:
            traceback.print_exc()
        _fail("out of memory", 10)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", 1)
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _frames(frame: int | None, mean_frames: bool) -> Any:
    from .io import FrameChoice

    return FrameChoice(frame=frame, mean=mean_frames)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fuse multimodal medical images in the anatomical image's exact geometry."""


@app.command()
def convert(
    input: Annotated[
        Path, typer.Argument(readable=False, metavar="INPUT", help="NIfTI (.nii, .nii.gz, .hdr/.img), NRRD or MetaImage file, DICOM folder / zip / file, or PNG / TIFF / JPEG / BMP slice.", show_default=False)
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", readable=False, help="Output file: .nii.gz, .nii, .nrrd, .mha, .png, .tif or .tiff (missing parent folders are created).", show_default=False),
    ],
    series: Series = None,
    frame: Frame = None,
    mean_frames: MeanFrames = False,
    suv: Suv = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Convert a DICOM series, NIfTI, NRRD, MetaImage or raster slice to NIfTI, NRRD or MetaImage (or PNG/TIFF for one slice).

    DICOM slices are sorted along the slice normal and rescaled slice by slice; gantry tilt and
    uneven spacing are resampled onto a regular grid (with a warning). The output is written
    atomically and never replaces an existing file without --overwrite.
    """

    def body() -> None:
        from .io import check_format_fits, check_output, read_image, write_image

        check_output(output, overwrite, inputs=[input])
        image = read_image(input, series=series, frames=_frames(frame, mean_frames), suv=suv)
        check_format_fits(output, image)
        write_image(image, output, overwrite=overwrite)
        logging.getLogger("medfuse_cli").info("wrote %s: %r", output, image)
        if not quiet:
            typer.echo(f"{output}  {'x'.join(map(str, image.shape))}  {image.orientation}  {image.modality.value}")

    _run(debug, quiet, verbose, body)


@app.command()
def info(
    input: Annotated[
        Path, typer.Argument(readable=False, metavar="INPUT", help="NIfTI (.nii, .nii.gz, .hdr/.img), NRRD or MetaImage file, DICOM folder / zip / file, or PNG / TIFF / JPEG / BMP slice.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    series: Series = None,
    frame: Frame = None,
    mean_frames: MeanFrames = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Show what an input holds: series, modality, shape, spacing, orientation, intensities, units.

    A DICOM input with several series lists every series. No patient names, IDs or dates are shown.
    """

    def body() -> None:
        from .info import describe_path

        described = describe_path(input, series=series, frames=_frames(frame, mean_frames))
        if as_json:
            typer.echo(json.dumps(described, indent=2))
            return
        from rich.table import Table

        for item in described:
            table = Table(title=f"{item['source']}" + (f" series {item['series_number']}" if item["series_uid"] else ""))
            table.add_column("field", style="bold")
            table.add_column("value")
            for key in ("series_uid", "series_description", "format", "modality", "shape", "dtype", "color",
                        "spacing_mm", "orientation", "origin_mm_ras", "units", "min", "max", "mean",
                        "non_finite_voxels"):
                value = item.get(key)
                if value is None:
                    continue
                if isinstance(value, float):
                    value = f"{value:.6g}"
                table.add_row(key, str(value))
            for note in item["notes"]:
                table.add_row("note", note)
            _print_table(table)

    _run(debug, quiet, verbose, body)


Method = Annotated[
    str,
    typer.Option("--method", "-m", help="Fusion method: a classic rule (mean, max, laplacian: pyramid with max-abs details and mean base, wavelet: db2, 3 levels, gff: guided filtering fusion), a trained 2D network, slice by slice for volumes (adafuse: spatial + Fourier cross-attention; dran: dilated residual attention autoencoder with its fixed fusion rule), the 3D network for volumes (dcfb3d: deformable cross-attention, sliding window; see --patch, --overlap) or auto, the default (adafuse when its weights are installed and the pair is an MRI with a CT, PET or SPECT, for volumes too, where it scored higher than dcfb3d on the held-out volumes; else laplacian). The networks take the MRI first whichever input is FIXED."),
]
Device = Annotated[str, typer.Option("--device", help="Where networks run: auto (the first CUDA device when present, else the CPU), cpu, cuda or cuda:N. On CUDA: float16 mixed precision; out of GPU memory falls back to smaller windows, then the CPU, with a warning.")]
Threads = Annotated[int, typer.Option("--threads", min=0, help="CPU threads for the networks, the report's metrics and ITK's resampling (0: torch's and ITK's defaults; OMP_NUM_THREADS or all cores for the metrics, of which at most 6 run at once). Registration always runs on one thread (the same result every run).")]
Patch = Annotated[int, typer.Option("--patch", help="Volume networks (dcfb3d): side of the sliding window in voxels (rounded up to a multiple of 8); memory grows with its cube.")]
MaxMemory = Annotated[str, typer.Option("--max-memory", help="Memory one fusion may use: a size (4G, 800M) or auto (what is available now, within any cgroup limit). Before the heavy steps medfuse estimates the need and, if it is over, uses smaller network windows or slice batches, then skips the report's metrics (with a warning); if even that does not fit it stops with exit 10. The report records the limit, the estimate and the measured peak.")]
Overlap = Annotated[float, typer.Option("--overlap", help="Volume networks (dcfb3d): overlap of neighbouring windows, 0 to below 1; windows are blended with Gaussian weights.")]
Transform = Annotated[
    str,
    typer.Option("--transform", "-t", help="Registration: auto (rigid, but none when both inputs share one grid, e.g. templates in one space or PNG/TIFF slices of one size: taken as aligned), rigid or affine (rigid then affine; also on one grid, for images resampled to one grid but not aligned), or none. 2D slices are registered in their plane; one NIfTI/DICOM slice as FIXED with a volume is aligned from the headers (auto = none)."),
]
FixedModality = Annotated[
    str | None, typer.Option("--fixed-modality", help="Modality of FIXED (MR, CT, PT/PET, NM/SPECT) when the header or file name does not say; default assumed MR.")
]
MovingModality = Annotated[
    str | None, typer.Option("--moving-modality", help="Modality of MOVING (MR, CT, PT/PET, NM/SPECT) when the header or file name does not say; default assumed PT (CT with --ct-window).")
]
CtWindow = Annotated[
    str | None, typer.Option("--ct-window", help="CT intensity window: brain (L40 W80), bone (L600 W2800) or LEVEL,WIDTH in HU. A greyscale MOVING of unknown modality is then taken as CT; unused (with a warning) when neither input is a CT. Default: 0.5-99.5 percentile window.")
]
Colormap = Annotated[str | None, typer.Option("--colormap", help="Show a greyscale MOVING (PET, SPECT or CT) in this colour map over its window (hot, inferno, jet, ... any matplotlib name), as PET and SPECT are read: its luminance is fused with FIXED and its colour put back, so the output is RGB (NIfTI RGB24, PNG, DICOM RGB). Default: greyscale output.", show_default=False)]
FixedSeries = Annotated[str | None, typer.Option("--fixed-series", help="FIXED is DICOM with several series: take this one (UID, number or description).")]
MovingSeries = Annotated[str | None, typer.Option("--moving-series", help="MOVING is DICOM with several series: take this one (UID, number or description).")]
InitialTransform = Annotated[Path | None, typer.Option("--initial-transform", readable=False, help="Start the registration from this rigid transform (ITK .tfm / .txt / .h5 / .hdf5 / .mat, LPS, FIXED point -> MOVING point, as register --save-transform and SimpleITK write it) instead of the headers and the centres of mass; with --transform none, apply it as it is (rigid or affine; for 2D slices, also a 2D transform of their plane). For scans in different frames of reference.")]
Landmarks = Annotated[tuple[Path, Path] | None, typer.Option("--landmarks", readable=False, metavar="FIXED_POINTS MOVING_POINTS", help="Start the registration from the rigid fit of paired landmarks: the same anatomical points, in the same order, picked on FIXED and on MOVING (3D Slicer .fcsv / .mrk.json, or a CSV with columns r,a,s (RAS+) or l,p,s (LPS+), world mm). One point gives a shift, three or more a rotation too. With --transform none the fit is applied as it is. The summary line and the report give the points' RMS distance after the fit and after registration; a warning says when registration moved them 10 mm further. For scans in different frames of reference.", show_default=False)]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the registration's metric sampling (same inputs + seed = same output bit for bit).")]
FixedArg = Annotated[Path, typer.Argument(readable=False, metavar="FIXED", help="Anatomical reference (normally the MRI): NIfTI (.nii, .nii.gz, .hdr/.img), NRRD/MetaImage, DICOM folder/zip/file, PNG/TIFF (or JPEG/BMP). The output lives on its grid.", show_default=False)]
MovingArg = Annotated[Path, typer.Argument(readable=False, metavar="MOVING", help="The other modality (CT, PET, SPECT): NIfTI (.nii, .nii.gz, .hdr/.img), NRRD/MetaImage, DICOM folder/zip/file, PNG/TIFF or JPEG/BMP (RGB pseudo-colour allowed).", show_default=False)]


def _registration_line(summary: dict) -> str:
    if summary["skipped"]:
        return f"registration skipped ({summary['skipped']})"
    points = summary.get("landmarks")
    points = f", landmarks {points['rms_mm']:.1f} mm RMS (fit {points['fit_rms_mm']:.1f})" if points else ""
    if summary["kind"] == "none":
        return f"transform of {summary['start']} applied{points}"
    return (f"{summary['kind']} registration, Mattes MI {summary['mattes_mi_before']:.3f} -> "
            f"{summary['mattes_mi_after']:.3f}, rotation {summary['rotation_deg']:.1f} deg{points}")


@contextlib.contextmanager
def _stages(quiet: bool) -> Iterator[Callable[..., None] | None]:
    """A stage callback for a terminal (nothing otherwise): the step with a spinner and its time, and
    for a network's slices or windows a bar with done/total and the time left."""
    bar = _progress(quiet, "{task.description}", "{task.fields[count]}", stages=True)
    if bar is None:
        yield None
        return
    task = bar.add_task("starting", total=None, count="")

    def stage(name: str, done: int | None = None, total: int | None = None) -> None:
        if done is None:
            bar.reset(task, description=name, total=None, count="")
        else:
            bar.update(task, description=name, completed=done, total=total, count=f"{done}/{total}")

    with bar:
        yield stage


@app.command()
def fuse(
    fixed: FixedArg,
    moving: MovingArg,
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, help="Fused image: .nii.gz / .nii / .nrrd / .mha (3D or 2D), .png / .tif (2D), or a folder (a path without extension): a new derived DICOM series. Missing parent folders are created.", show_default=False)],
    method: Method = "auto",
    transform: Transform = "auto",
    initial_transform: InitialTransform = None,
    landmarks: Landmarks = None,
    fixed_modality: FixedModality = None,
    moving_modality: MovingModality = None,
    ct_window: CtWindow = None,
    colormap: Colormap = None,
    report: Annotated[Path | None, typer.Option("--report", readable=False, help="JSON report path (default: beside the output, OUT.json); - prints it on standard output instead of the summary line.")] = None,
    figure: Annotated[Path | None, typer.Option("--figure", readable=False, help="Also write a figure: FIXED, MOVING, fused and an overlay, middle slice of each plane, in physical proportions; PNG, PDF, SVG or JPEG by the name's suffix (.png, .pdf, .svg, .jpg).")] = None,
    fixed_series: FixedSeries = None,
    moving_series: MovingSeries = None,
    frame: PairFrame = None,
    mean_frames: PairMeanFrames = False,
    seed: Seed = 0,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Score the fusion with medfuse eval's metrics (in the report and the summary line).")] = True,
    device: Device = "auto",
    threads: Threads = 0,
    patch: Patch = 96,
    overlap: Overlap = 0.25,
    max_memory: MaxMemory = "auto",
    anonymize: Annotated[bool, typer.Option("--anonymize", help="DICOM output: leave out patient name, ID, birth date and sex and the study's date, ID and accession number; new study UIDs.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Fuse MOVING (CT / PET / SPECT) into FIXED (MRI): register, resample, normalise, fuse, write, report.

    The output has FIXED's grid and geometry exactly. Colour PET/SPECT is fused through YCbCr
    (luminance fused, chroma kept), giving a colour output. A JSON report is written beside the output.
    """

    def body() -> None:
        from .io.atomic import is_stdout
        from .pipeline import FuseOptions, fuse_pair

        options = FuseOptions(method=method, transform=transform,
                              initial_transform=None if initial_transform is None else str(initial_transform),
                              landmarks=[str(p) for p in landmarks] if landmarks else None,
                              fixed_modality=fixed_modality,
                              moving_modality=moving_modality, ct_window=ct_window, colormap=colormap,
                              fixed_series=fixed_series, moving_series=moving_series, frame=frame,
                              mean_frames=mean_frames, seed=seed, metrics=metrics, device=device, patch=patch, overlap=overlap,
                              anonymize=anonymize, threads=threads, max_memory=max_memory)
        with _stages(quiet) as stage:
            result = fuse_pair(fixed, moving, output, options, report=report, figure=figure,
                               overwrite=overwrite, stage=stage)
        if not quiet and not is_stdout(report):
            how = _registration_line(result.report["registration"])
            scores = ""
            if "metrics" in result.report:
                v = result.report["metrics"]["values"]
                scores = f"  SSIM {v['SSIM']:.3f} (worst {v['SSIM_worst']:.3f})  Qabf {v['Qabf']:.3f}  MI {v['MI']:.2f} bits"
            typer.echo(f"{output}  {result.report['method']}  {how}{scores}  {result.report['timings']['total_s']:.1f} s")

    _run(debug, quiet, verbose, body)


@app.command()
def register(
    fixed: FixedArg,
    moving: MovingArg,
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, help="MOVING resampled onto FIXED's grid: .nii.gz / .nii / .nrrd / .mha, .png / .tif (2D), or a folder (a path without extension): a new derived DICOM series. Missing parent folders are created.", show_default=False)],
    transform: Transform = "auto",
    initial_transform: InitialTransform = None,
    landmarks: Landmarks = None,
    save_transform: Annotated[Path | None, typer.Option("--save-transform", readable=False, help="Also save the transform (ITK .tfm, .txt, .h5, .hdf5 or .mat, by the name's suffix; LPS, FIXED point -> MOVING point).")] = None,
    report: Annotated[Path | None, typer.Option("--report", readable=False, help="Also write a JSON report: inputs, parameters, registration (Mattes MI before and after, rotation, the start chosen, landmark distances), timings, memory and every warning; - prints it on standard output instead of the summary line.", show_default=False)] = None,
    fixed_series: FixedSeries = None,
    moving_series: MovingSeries = None,
    frame: PairFrame = None,
    mean_frames: PairMeanFrames = False,
    seed: Seed = 0,
    max_memory: Annotated[str, typer.Option("--max-memory", help="Memory the registration may use: a size (4G, 800M) or auto (what is available now, within any cgroup limit). Estimated from FIXED's grid after reading; over it, exit 10 before registering.")] = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Register MOVING onto FIXED and write MOVING resampled on FIXED's grid (the fuse step alone)."""

    def body() -> None:
        from .io.atomic import is_stdout
        from .pipeline import register_pair

        with _stages(quiet) as stage:
            reg = register_pair(fixed, moving, output, transform=transform, save_transform=save_transform,
                                fixed_series=fixed_series, moving_series=moving_series, seed=seed,
                                overwrite=overwrite, initial_transform=initial_transform, landmarks=landmarks,
                                stage=stage, report=report, max_memory=max_memory, frame=frame,
                                mean_frames=mean_frames)
        if not quiet and not is_stdout(report):
            typer.echo(f"{output}  {_registration_line(reg.summary())}")

    _run(debug, quiet, verbose, body)

_EVAL_FORMAT = {"EN": 3, "SD": 2, "SF": 2, "AG": 2, "PSNR": 2}


def _eval_tables(means: dict, quiet: bool) -> None:
    """One Rich table per modality pair: methods as rows, the best value of each column marked *."""
    from rich.table import Table

    from .evaluate import best_per_column
    from .metrics import METRICS

    if quiet:
        return
    for group, methods in means.items():
        n = max(v["n"] for v in methods.values())
        table = Table(title=f"{group} ({n} pair{'s' if n != 1 else ''}; * = best)", title_justify="left")
        table.add_column("method", style="bold")
        table.add_column("n", justify="right")
        for k in METRICS:
            table.add_column(k, justify="right")
        best = best_per_column(methods) if len(methods) > 1 else {k: set() for k in METRICS}
        for method, v in methods.items():
            cells = []
            for k in METRICS:
                text = f"{v[k]:.{_EVAL_FORMAT.get(k, 3)}f}"
                cells.append(f"[bold green]{text}*[/]" if method in best[k] else text)
            table.add_row(method, str(v["n"]), *cells)
        _print_table(table)


@app.command("eval")
def eval_(
    fused: Annotated[list[Path] | None, typer.Argument(readable=False, metavar="FUSED", help="Fused images of the pair given by --fixed/--moving (one row each).", show_default=False)] = None,
    fixed: Annotated[Path | None, typer.Option("--fixed", readable=False, help="Source A (the MRI) of one pair.", show_default=False)] = None,
    moving: Annotated[Path | None, typer.Option("--moving", readable=False, help="Source B (CT/PET/SPECT) of one pair, on FIXED's grid.", show_default=False)] = None,
    pairs: Annotated[Path | None, typer.Option("--pairs", readable=False, help="Folder of pairs named ID_mri.png + ID_ct/pet/spect.png (searched recursively, as ../shared/data/harvard).", show_default=False)] = None,
    fused_dirs: Annotated[list[Path] | None, typer.Option("--fused", readable=False, help="With --pairs: a folder of fused images named ID.png (one method per folder; repeat to compare).", show_default=False)] = None,
    split: Annotated[str | None, typer.Option("--split", help="With --pairs: only the pairs of this split in PAIRS/splits.csv (columns pair_id, split), e.g. val.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", readable=False, help="Write per-image and mean values, with the conventions, as JSON (- : on standard output, instead of the tables).")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", readable=False, help="Write per-image rows and mean rows as CSV (- : on standard output, instead of the tables).")] = None,
    max_memory: Annotated[str, typer.Option("--max-memory", help="Memory scoring may use: a size (4G, 800M) or auto (what is available now, within any cgroup limit). A pair whose metrics would need more (about 35 bytes per voxel and 0.25 GiB, plus up to 0.35 GiB per metric thread; -v prints the estimate) runs fewer metric threads, or is refused before scoring, exit 10 (with --pairs: its row).")] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=0, help="Fused images scored at once (threads; the filters run in parallel; a pair's sources are read once); with fewer images than workers, the spare ones compute an image's metrics at once. Each image's --max-memory check counts every worker. 0: small images (up to 2^20 voxels, e.g. 2D slices; judged by the first pair's FIXED) one per core at once (OMP_NUM_THREADS or all cores), larger ones one at a time, its metrics on that many threads (at most 6; fewer if the memory is short).")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Score fused images: PSNR, SSIM, MI and EN, SD, SF, AG, FMI, Qabf, VIF, SCD, CC.

    Give one pair (`--fixed A --moving B FUSED...`) or folders (`--pairs DIR --fused DIR [--fused DIR...]`).
    Conventions: greyscale 0..255 (colour as Y of full-range BT.601 YCbCr; 8-bit slices as stored,
    other images by their 0.5-99.5 percentile window); MI = MI(A,F) + MI(B,F) in bits (256 bins);
    SSIM = mean of SSIM(A,F) and SSIM(B,F), Gaussian window 11, sigma 1.5, L = 255, with SSIM_A,
    SSIM_B and SSIM_worst (the lower) beside it; PSNR = 10 log10(255^2 / mean of the two MSEs);
    VIF = VIF(A,F) + VIF(B,F); CC = mean of the two correlations; SCD = corr(F-B, A) + corr(F-A, B).
    Volumes must share one grid (in any axis order); Qabf, VIF and FMI are pooled over axial slices.
    With --pairs, an image that cannot be read or scored is a row with its error (in --json/--csv),
    the others are still scored, and the exit code is 7; a missing fused image is only warned of.
    """

    def body() -> None:
        from .errors import InvalidInputError
        from .evaluate import (
            evaluate_cases,
            failures,
            find_cases,
            single_pair_cases,
            summarise,
            to_csv,
            to_json,
        )
        from .io import read_image
        from .io.atomic import (
            atomic_write_bytes,
            check_distinct,
            check_writable,
            is_stdout,
        )
        from .memory import parse_size

        if pairs is not None:
            if fused and not (fixed or moving) and fused_dirs:  # `--fused A B`: B is no fused folder
                raise InvalidInputError(f"with --pairs, give each fused folder its own --fused (--fused "
                                        f"{fused_dirs[-1]} --fused {fused[0]}); FUSED images go with --fixed/--moving")
            if fixed or moving or fused:
                raise InvalidInputError("give either --pairs/--fused or --fixed/--moving FUSED..., not both")
            if not fused_dirs:
                raise InvalidInputError("--pairs needs at least one --fused folder")
            cases, methods = find_cases(pairs, fused_dirs, split)
        else:
            if fixed is None or moving is None:
                raise InvalidInputError("give --fixed and --moving with FUSED images, or --pairs with --fused folders")
            if fused_dirs or split:
                raise InvalidInputError("--fused and --split go with --pairs")
            cases, methods = single_pair_cases(fixed, moving, fused or [])
        inputs = [p for p in (pairs, fixed, moving, *(fused or []), *(fused_dirs or [])) if p is not None]
        parse_size(max_memory)  # a bad value is a usage error, not an error on every row
        check_distinct({"--json": json_out, "--csv": csv_out})
        for out in (json_out, csv_out):
            if out is not None:
                check_writable(out, overwrite, inputs)
        rows = _with_progress(len(cases) * len(methods), quiet, "scoring",
                              lambda tick: evaluate_cases(cases, methods, read_image, tick, keep_going=pairs is not None,
                                                           max_memory=max_memory, workers=workers))
        means = summarise(rows)
        if json_out is not None:
            from .report import write_report

            write_report(to_json(rows, means), json_out, overwrite=overwrite)
        if csv_out is not None:
            atomic_write_bytes(csv_out, to_csv(rows, means).encode("utf-8", "surrogateescape"), overwrite)
        _eval_tables(means, quiet or is_stdout(json_out) or is_stdout(csv_out))
        failed = failures(rows)
        if failed:
            written = ["standard output" if is_stdout(o) else str(o) for o in (json_out, csv_out) if o]
            _fail(failed + (f"; every row is in {' and '.join(written)}" if written else ""), 7)

    _run(debug, quiet, verbose, body)


def _progress(quiet: bool, label: str, *extra: str, stages: bool = False) -> Any:
    """A Rich progress bar on stderr (label, bar, done/total, extra columns, elapsed, ETA), or None
    when quiet or not on a terminal. ``stages``: a transient bar led by a spinner, whose extra
    columns replace done/total (a stage may have no total)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return None
    head = (SpinnerColumn(),) if stages else ()
    count = () if stages else (MofNCompleteColumn(),)
    return Progress(*head, TextColumn(label), BarColumn(), *count, *(TextColumn(e) for e in extra),
                    TimeElapsedColumn(), *(() if stages else (TextColumn("ETA"),)), TimeRemainingColumn(),
                    console=console, transient=stages)


def _with_progress(total: int, quiet: bool, label: str, work: Callable[[Callable[[], None] | None], Any]) -> Any:
    """Run ``work(tick)`` under a Rich progress bar on a terminal (``tick`` is None otherwise)."""
    bar = _progress(quiet or total < 2, label)
    if bar is None:
        return work(None)
    with bar:
        task = bar.add_task(label, total=total)
        return work(lambda: bar.advance(task))


@app.command()
def batch(
    source: Annotated[Path, typer.Argument(readable=False, metavar="IN", help="Folder of pairs (ID_mri + ID_ct/pet/spect; CASE_0000 + CASE_0001, their modalities from an nnU-Net dataset.json of the folder or its parent, which must name more channels: the MR is fused with each CT/PET/SPECT; or one sub-folder per case) or a CSV manifest id,fixed,moving[,output][,fixed_modality,moving_modality].", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--output", "-o", readable=False, help="Output folder (created if missing): fused images, one JSON report each, summary.csv.", show_default=False)],
    method: Method = "auto",
    transform: Transform = "auto",
    fixed_modality: FixedModality = None,
    moving_modality: MovingModality = None,
    ct_window: CtWindow = None,
    colormap: Colormap = None,
    fixed_series: FixedSeries = None,
    moving_series: MovingSeries = None,
    frame: PairFrame = None,
    mean_frames: PairMeanFrames = False,
    seed: Seed = 0,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Score every case with medfuse eval's metrics (report and summary.csv).")] = True,
    device: Device = "auto",
    patch: Patch = 96,
    overlap: Overlap = 0.25,
    max_memory: MaxMemory = "auto",
    dicom: Annotated[bool, typer.Option("--dicom", help="Write every fused volume as a new derived DICOM series folder OUT_DIR/CASE (as fuse -o FOLDER); results of PNG/TIFF slices stay PNG; one NIfTI slice or single-frame DICOM file as FIXED gives a series of one image.")] = False,
    anonymize: Annotated[bool, typer.Option("--anonymize", help="DICOM output: leave out the patient's identity (as fuse --anonymize).")] = False,
    figures: Annotated[bool, typer.Option("--figures", help="Also write ID_figure.png beside each output (as fuse --figure).")] = False,
    engine: Annotated[str, typer.Option("--engine", help="dask (a dask.distributed LocalCluster, or --scheduler) or sequential (one case after another in this process, each on every core: see --threads).")] = "dask",
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="LocalCluster worker processes (one case at a time each, on its share of the cores: see --threads). Default: one per core this process may use (its CPU affinity, e.g. a Slurm job's cores).")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Submit to an existing dask scheduler, e.g. tcp://10.0.0.5:8786 (workers must see the same paths).")] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for each case: the networks, the metrics and ITK's resampling. 0: the cores this process may use (OMP_NUM_THREADS, else its CPU affinity) shared among the cases that run at once: all of them with --engine sequential, cores / workers for the LocalCluster; with --scheduler, the worker's OMP_NUM_THREADS (dask's nanny sets 1) shared among its threads. Not part of a case's fingerprint: a re-run with other threads skips complete cases.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Redo cases that are already complete.")] = False,
    case_timeout: Annotated[float | None, typer.Option("--case-timeout", min=0.1, help="Stop a case after this many seconds (it then runs in its own process, ~1 s extra per case).")] = None,
    part: Annotated[str | None, typer.Option("--part", help="Run only part K of N of the cases (K/N, counted from 1: every N-th case by id from the K-th), so the N tasks of a job array can share OUT_DIR; 'slurm' takes K and N from the Slurm array task. Each part writes summary.part-K-of-N.csv; a run without --part afterwards finds every case complete and writes summary.csv.", show_default=False)] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Fuse many pairs: resumable, on dask.distributed from one laptop to a cluster.

    Every case writes its fused image and its JSON report (atomically; the report last) and
    `summary.csv` lists every case (status, seconds, metrics, error). A re-run skips cases whose
    output and report are complete and were made with the same inputs and options (`--force`
    redoes them); a killed run loses nothing finished. A failing case never stops the others;
    the exit code is 7 when some failed.
    """

    def body() -> None:
        from .batch import parse_part, run_batch

        share = None if part is None else parse_part(part)
        options = {"method": method, "transform": transform, "fixed_modality": fixed_modality,
                       "moving_modality": moving_modality, "ct_window": ct_window, "colormap": colormap,
                       "fixed_series": fixed_series, "moving_series": moving_series, "frame": frame,
                       "mean_frames": mean_frames, "seed": seed,
                       "metrics": metrics, "device": device,
                       "patch": patch, "overlap": overlap, "figures": figures, "dicom": dicom, "anonymize": anonymize,
                       "max_memory": max_memory, "threads": threads}
        result = _batch_with_progress(
            quiet, lambda on_start, on_done: run_batch(
                source, out_dir, options, engine=engine, workers=workers, scheduler=scheduler, force=force,
                case_timeout=case_timeout, on_start=on_start, on_done=on_done, part=share,
                log_level=_log_level(quiet, verbose)))
        if not quiet:
            _batch_table(result)
        if result.failed:
            _fail(f"{len(result.failed)} of {len(result.rows)} cases failed; see {result.summary}", 7)

    _run(debug, quiet, verbose, body)


def _batch_with_progress(quiet: bool, work: Callable[..., Any]) -> Any:
    bar = _progress(quiet, "fusing")
    if bar is None:
        return work(None, None)
    with bar:
        task = bar.add_task("fusing", total=None)

        def on_start(total: int, done: int) -> None:
            bar.reset(task, total=total, completed=done)

        return work(on_start, lambda row: bar.advance(task))


def _batch_table(result: Any) -> None:
    from collections import Counter

    from rich.table import Table

    counts = Counter(r["status"] for r in result.rows)
    share = "" if result.part is None else f"part {result.part.index} of {result.part.count}: "
    typer.echo(f"pairing rule: {result.rule}; {share}{len(result.rows)} cases"
               + ("" if result.part is None else f" of {result.total}") + ": "
               + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; summary: {result.summary}")
    for line in result.unpaired:
        typer.echo(f"not paired: {line}")
    scored = [r for r in result.rows if isinstance(r.get("SSIM"), float)]
    if scored:
        keys = ("seconds", "SSIM", "SSIM_worst", "Qabf", "VIF", "MI", "PSNR")
        summary = Table(title=f"mean over {len(scored)} fused cases", title_justify="left")
        for k in keys:
            summary.add_column(k, justify="right")
        summary.add_row(*(f"{sum(float(r.get(k) or 0) for r in scored) / len(scored):.3f}" for k in keys))
        _print_table(summary)
    if result.failed:
        table = Table(title="failed cases", title_justify="left")
        table.add_column("id")
        table.add_column("status")
        table.add_column("reason")
        for r in sorted(result.failed, key=lambda r: r["id"]):
            table.add_row(r["id"], r["status"], r.get("error", ""))
        _print_table(table)


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", readable=False, help="2D networks: folder of pairs with splits.csv (e.g. ../shared/data/harvard); trains on 'train', validates on 'val'. dcfb3d: the volumes folder (../shared/data/volumes); trains on its training pairs, validates on the held-out ones.", show_default=False)],
    model: Annotated[str, typer.Option("--model", help="Network to train: adafuse (learns to fuse 2D pairs), dran (2D autoencoder on single images, fixed fusion rule) or dcfb3d (learns to fuse 3D patches).")] = "adafuse",
    task: Annotated[str, typer.Option("--task", help="mri-ct, mri-pet, mri-spect (2D only), or all (one model for every pair).")] = "all",
    out: Annotated[Path, typer.Option("--out", readable=False, help="Folder for NAME.safetensors, the model card NAME.json and the checkpoint.")] = Path("weights"),
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: the model).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps (cosine learning-rate decay over them).")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch", min=0, help="Pairs (3D: patches) per step; 0: 8 for 2D networks, 2 for dcfb3d.")] = 0,
    crop: Annotated[int, typer.Option("--crop", min=0, help="Random crop side (2D: multiple of 16, default 128; dcfb3d: 3D patch side, multiple of 8, default 48); 0: the default.")] = 0,
    init: Annotated[str | None, typer.Option("--init", help="Fine-tune: start from this installed model (name) or .safetensors file; the card records it.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW); default 1e-3, or 3e-4 with --init (a fine-tune: larger first steps undo much of the parent's training).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of weights, batches and augmentation.")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 2,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")] = 50,
    val_every: Annotated[int, typer.Option("--val-every", min=0, help="Steps between validations (0: only at the end).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/NAME.checkpoint.safetensors.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start afresh, replacing OUT/NAME.safetensors, its card and its checkpoint when they exist (otherwise an existing model is refused before training, exit 6: e.g. the shipped weights).")] = False,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Loss. AdaFuse and dcfb3d: balanced (default; SSIM to each source + worst source + survival against pixel max + texture + intensity + Qabf), medfuse (no survival term), asfe (AdaFuse authors' successor recipe, 2D only), dc2fusion (DCFB-3D's official LNCC + SSIM + L1, MRI weighted 2:1) or constrained (Qabf, with each task's mean SSIM and worst-source SSIM in the batch held above the mean / max rules' as hinges). DRAN: recon (default; MSE + Sobel + SSIM), recon-grad, recon-mse, recon-fuse (recon + the balanced loss of the pair fused through the card's rule), recon-fuse-vif (and a VIF term).", show_default=False)] = None,
    loss_weight: Annotated[list[str] | None, typer.Option("--loss-weight", help="Override one weight of the recipe, KEY=VALUE (repeatable), e.g. margin=0.01 or qabf=6; the card records it.", show_default=False)] = None,
    rule: Annotated[str, typer.Option("--rule", help="DRAN fusion rule stored in the card: l1 (per-pixel L1-norm weights, the shipped model's), sfnn (the paper's softmax + nuclear norm, one weight per image) or mean. Default: the --init model's rule, else l1.", show_default=False)] = "",
    channels: Annotated[int, typer.Option("--channels", min=4, help="DRAN feature channels.")] = 32,
    no_frequency: Annotated[bool, typer.Option("--no-frequency", help="Ablation: drop the Fourier branch.")] = False,
    no_exchange: Annotated[bool, typer.Option("--no-exchange", help="Ablation: self-attention instead of exchanged attention.")] = False,
    gate: Annotated[bool, typer.Option("--gate", help="AdaFuse: a per-pixel source weight in the head, F = w A + (1 - w) B + h (starts at w = 1/2, so a fine-tune with --init starts as its parent).")] = False,
    widths: Annotated[str | None, typer.Option("--widths", help="Channels per scale, comma-separated (AdaFuse: four, default 16,32,48,64; dcfb3d: three, default 8,16,32).", show_default=False)] = None,
    depth: Annotated[int, typer.Option("--depth", min=0, help="dcfb3d: DCFB blocks (each applied both ways with shared weights).")] = 2,
    no_deformable: Annotated[bool, typer.Option("--no-deformable", help="dcfb3d ablation: no learned offsets (plain cross-attention).")] = False,
    direct: Annotated[int, typer.Option("--direct", min=0, help="dcfb3d: channels of a full-resolution path from the raw intensities of both sources to the head (0: none; its output starts at zero, so a fine-tune with --init starts as its parent).")] = 0,
    task_embedding: Annotated[bool, typer.Option("--task-embedding", help="dcfb3d: condition the network on the task (MRI with CT, PET or SPECT) by an embedding at the bottleneck (starts at zero, so a fine-tune with --init starts as its parent).")] = False,
    slabs: Annotated[Path | None, typer.Option("--slabs", readable=False, help="dcfb3d: also train, every other step, on stacks of the train slices of this Harvard folder (runs of at least --slab-depth neighbouring slices of one case).", show_default=False)] = None,
    slab_depth: Annotated[int, typer.Option("--slab-depth", min=16, help="dcfb3d with --slabs: slices per slab patch, a multiple of 8 (at least 16: the 3D SSIM window is 11 deep).")] = 16,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Train a fusion network (adafuse, dran, dcfb3d) and write safetensors weights plus a model card (with sha256 and validation metrics).

    Checkpoints every --checkpoint-every steps; --resume continues exactly where a run stopped.
    """

    def body() -> None:
        from .train import TASKS, TrainConfig, train

        try:
            width_list = [int(w) for w in widths.split(",")] if widths else []
        except ValueError:
            _fail(f"--widths {widths!r}: give whole numbers separated by commas, e.g. 12,24,48", 2)
        weights_over: dict[str, float] = {}
        for item in loss_weight or []:
            key, _, value = item.partition("=")
            try:
                if not key.strip():
                    raise ValueError
                weights_over[key.strip()] = float(value)
            except ValueError:
                _fail(f"--loss-weight {item!r}: give KEY=NUMBER, e.g. margin=0.01", 2)
        cfg = TrainConfig(data=str(data), out=str(out), name=name or model, model=model, task=task, steps=steps,
                          batch=batch_size, crop=crop, lr=lr, seed=seed, threads=threads,
                          checkpoint_every=checkpoint_every, val_every=val_every, recipe=recipe or "",
                          frequency=not no_frequency, exchange=not no_exchange, gate=gate, init=init or "", rule=rule,
                          channels=channels, depth=depth, deformable=not no_deformable, direct=direct,
                          tasks=len(TASKS) if task_embedding else 0,
                          slabs=str(slabs) if slabs else "", slab_depth=slab_depth,
                          widths=width_list, loss_weights=weights_over)
        card = _train_with_progress(quiet, steps, lambda cb: train(cfg, resume=resume, progress=cb, overwrite=overwrite))
        if not quiet:
            typer.echo(f"wrote {out / card['weights']} ({card['parameters']:,} parameters, "
                       f"{card['training_seconds'] / 60:.1f} min) and {out / (card['name'] + '.json')}")
            for t, v in card["validation"].items():
                typer.echo(f"  val {t}: SSIM {v['SSIM']:.3f} (worst {v['SSIM_worst']:.3f})  Qabf {v['Qabf']:.3f}  "
                           f"VIF {v['VIF']:.3f}  MI {v['MI']:.3f}")

    _run(debug, quiet, verbose, body)


def _train_with_progress(quiet: bool, total: int, work: Callable[..., Any]) -> Any:
    """A Rich bar with the loss on a terminal; a log line every 25 steps otherwise."""
    if quiet:
        return work(None)
    bar = _progress(quiet, "training", "{task.fields[loss]}")
    if bar is None:
        def line(step: int, parts: dict) -> None:
            if step % 25 == 0 or step == total or "val" in parts:
                text = " ".join(f"{k} {v:.4f}" for k, v in parts.items() if isinstance(v, float))
                sys.stderr.write(f"step {step}/{total} {text}{' val ' + json.dumps(parts['val']) if 'val' in parts else ''}\n")
                sys.stderr.flush()
        return work(line)
    with bar:
        task = bar.add_task("train", total=total, loss="")

        def update(step: int, parts: dict) -> None:
            bar.update(task, completed=step, loss=f"loss {parts['loss']:.4f}")

        return work(update)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the model cards as JSON.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Also verify every weights file against the sha256 of its model card (as every load does); exit 8 when one is missing or does not match.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """List the installed fusion models (weights/ with model cards) and the classic rules."""

    def body() -> None:
        from .fusion import CLASSIC_RULES
        from .models.weights import WEIGHTS_DIR, WeightsError, check_cards, list_cards

        cards, problems = list_cards()
        for problem in problems:  # a card that cannot be read lists no model: say so
            logging.getLogger("medfuse_cli").warning("%s", problem)
        failed = problems + check_cards(cards) if check else []
        if as_json:
            typer.echo(json.dumps(cards, indent=2))
        elif not (quiet and check):  # -q --check: errors only, for scripts
            _print_models(cards, check, WEIGHTS_DIR, CLASSIC_RULES)
        if failed:
            raise WeightsError(f"{len(failed)} of {len(cards) + len(problems)} models failed the check; {failed[0]}")

    _run(debug, quiet, verbose, body)


def _print_models(cards: list[dict], check: bool, folder: Path, rules: Sequence[str]) -> None:
    """The table of ``medfuse models``."""
    from rich.table import Table

    table = Table(title=f"models ({folder})", title_justify="left")
    for col in ("method", "kind", "tasks", "parameters", "val (held-out for volumes) SSIM / worst / Qabf", "sha256",
                *(("check",) if check else ())):
        table.add_column(col)
    for c in cards:
        val = "; ".join(f"{t.removeprefix('mri-')} {v['SSIM']:.3f}/{v['SSIM_worst']:.3f}/{v['Qabf']:.3f}"
                        for t, v in c.get("validation", {}).items())
        rule = c.get("architecture", {}).get("rule")
        kind = f"network {c.get('model', c['name'])}" + (f", {rule} rule" if rule else "")
        kind += ", volumes" if c.get("model") == "dcfb3d" else ""
        table.add_row(c["name"], kind, ", ".join(c["tasks"]), f"{c['parameters']:,}", val, c["sha256"][:12],
                      *((c["check"] if c["check"] == "ok" else "FAILED",) if check else ()))
    for rule in rules:
        table.add_row(rule, "classic rule", "any", "0", "", "", *(("",) if check else ()))
    if cards:
        from .models.infer import device_summary

        table.caption, table.caption_justify = device_summary(), "left"
    else:
        table.caption = (f"no trained networks in {folder}: --method auto uses the laplacian rule "
                         "(MEDFUSE_WEIGHTS names the folder of the model cards)")
        table.caption_justify = "left"
    _print_table(table)


def _print_table(table: Any) -> None:
    """Print a Rich table; off a terminal (pipes, logs) wide enough that it is not squeezed, and
    without the spaces Rich pads its lines with."""
    from rich.console import Console

    console = Console()
    if console.is_terminal:
        console.print(table)
        return
    console = Console(width=240)
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
