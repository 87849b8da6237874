"""What to take from a 4D (multi-frame) input."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ChoiceRequiredError, GeometryError


@dataclass(frozen=True)
class FrameChoice:
    """``frame``: 0-based index of the frame to take; ``mean``: average all frames; ``offered``: whether
    the command has ``--frame`` / ``--mean-frames`` (else a 4D input's error points to ``convert``)."""

    frame: int | None = None
    mean: bool = False
    offered: bool = True

    def __post_init__(self) -> None:
        if self.frame is not None and self.mean:
            raise ChoiceRequiredError("give either --frame or --mean-frames, not both")

    def select(self, n_frames: int, name: str) -> int | None:
        """The frame index to take (``None`` means: average them)."""
        if self.mean:
            return None
        if self.frame is None:
            how = (f"choose one with --frame N (0..{n_frames - 1}) or average them with --mean-frames" if self.offered
                   else f"take one first: medfuse convert {name} -o OUT --frame N (0..{n_frames - 1}) or --mean-frames")
            raise ChoiceRequiredError(f"{name} is 4D with {n_frames} frames; {how}")
        if not 0 <= self.frame < n_frames:
            raise GeometryError(f"{name}: --frame {self.frame} is out of range 0..{n_frames - 1}")
        return self.frame

    @staticmethod
    def note(index: int | None, n_frames: int) -> str:
        """What was taken from a 4D input, for its provenance (reports, ``info``)."""
        return f"4D, {n_frames} frames: " + ("the mean of all" if index is None else f"frame {index} (0-based)")
