"""The ``medfuse`` command line: parses options, calls the library, maps errors to exit codes."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

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
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output file if it exists.")]
Series = Annotated[
    Optional[str],
    typer.Option(
        "--series",
        help="DICOM input with several series: take this one (SeriesInstanceUID, SeriesNumber or "
        "SeriesDescription). 'medfuse info' lists them.",
    ),
]
Frame = Annotated[
    Optional[int],
    typer.Option("--frame", min=0, help="4D input: take this frame (0-based)."),
]
MeanFrames = Annotated[bool, typer.Option("--mean-frames", help="4D input: average all frames.")]
Suv = Annotated[
    bool,
    typer.Option(
        "--suv",
        help="DICOM PET in Bq/ml: convert to body-weight SUV (needs patient weight, injected dose, "
        "half-life and injection time in the header).",
    ),
]


def _setup_logging(quiet: bool, verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.WARNING)
    handler = RichHandler(
        console=Console(stderr=True), show_time=False, show_path=False, markup=False, rich_tracebacks=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("medfuse_cli")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _fail(message: str, code: int) -> None:
    first_line = " ".join(message.split())
    sys.stderr.write(f"medfuse: error: {first_line}\n")
    raise typer.Exit(code)


def _run(debug: bool, quiet: bool, verbose: bool, body: Callable[[], Any]) -> Any:
    """Run a command body; every failure becomes one line on stderr and a documented exit code."""
    _setup_logging(quiet, verbose)
    try:
        return body()
    except typer.Exit:
        raise
    except MedfuseError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except MemoryError:
        if debug:
            traceback.print_exc()
        _fail("out of memory", 10)
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", 1)


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
        Path, typer.Argument(help="NIfTI file, DICOM folder / zip / file, or PNG / TIFF slice.", show_default=False)
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Output file: .nii.gz, .nii, .png, .tif or .tiff.", show_default=False),
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
    """Convert a DICOM series, NIfTI or raster slice to NIfTI (or PNG/TIFF for one slice).

    DICOM slices are sorted along the slice normal and rescaled slice by slice; gantry tilt and
    uneven spacing are resampled onto a regular grid (with a warning). The output is written
    atomically and never replaces an existing file without --overwrite.
    """

    def body() -> None:
        from .io import check_output, read_image, write_image

        check_output(output, overwrite)
        image = read_image(input, series=series, frames=_frames(frame, mean_frames), suv=suv)
        write_image(image, output, overwrite=overwrite)
        logging.getLogger("medfuse_cli").info("wrote %s: %r", output, image)
        if not quiet:
            typer.echo(f"{output}  {'x'.join(map(str, image.shape))}  {image.orientation}  {image.modality.value}")

    _run(debug, quiet, verbose, body)


@app.command()
def info(
    input: Annotated[
        Path, typer.Argument(help="NIfTI file, DICOM folder / zip / file, or PNG / TIFF slice.", show_default=False)
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
        from rich.console import Console
        from rich.table import Table

        console = Console()
        for item in described:
            table = Table(title=f"{item['source']}" + (f" series {item['series_number']}" if item["series_uid"] else ""))
            table.add_column("field", style="bold")
            table.add_column("value")
            for key in ("series_uid", "series_description", "format", "modality", "shape", "dtype", "color",
                        "spacing_mm", "orientation", "origin_mm_ras", "units", "min", "max", "mean",
                        "non_finite_voxels"):
                value = item[key]
                if value is None:
                    continue
                if isinstance(value, float):
                    value = f"{value:.6g}"
                table.add_row(key, str(value))
            for note in item["notes"]:
                table.add_row("note", note)
            console.print(table)

    _run(debug, quiet, verbose, body)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
