"""medfuse: multimodal medical image fusion in the anatomical image's exact geometry."""

from __future__ import annotations

__version__ = "0.1.0"

from .image import Image, Modality
from .io import read_image, write_image

__all__ = ["Image", "Modality", "__version__", "read_image", "write_image"]
