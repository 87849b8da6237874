"""3D training and held-out pairs from ``../shared/data/volumes`` (its README describes each set).

Every pair is an MRI (FIXED) and a PET or CT-like volume (MOVING) in one world space; MOVING is
resampled onto the MRI's grid by its affine (the sets are pre-registered: the SPM templates share
one grid, the MNI 1 mm T1 is the same space on another grid, the IBSI volumes are world-aligned to
0.2 mm) and both are normalised as ``medfuse fuse`` normalises them. Arrays are ``(z, y, x)``.

Held out, never trained on: the IBSI STS002 patient (MR-PET and MR-CT) and the SPM pair
OldNorm_T2 + OldNorm_Transm (the attenuation template, CT-like). canonical_avg152T2 is left out
of training too: it is a near-duplicate of OldNorm_T2 (r 0.98). The TCIA STS001 MR has no
partner registered to it and is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

_SPM, _MNI1, _CT = "spm12_mni_2mm", "nilearn_mni152_2009a_1mm", "clinical_ct_mni_2mm"
TRAIN_MRI = (
    f"{_SPM}/OldNorm_T1", f"{_SPM}/OldNorm_PD", f"{_SPM}/OldNorm_EPI", f"{_SPM}/canonical_avg152T1",
    f"{_SPM}/canonical_avg152PD", f"{_SPM}/canonical_avg305T1", f"{_MNI1}/mni_icbm152_t1_tal_nlin_sym_09a_converted",
)
TRAIN_OTHER = {f"{_SPM}/OldNorm_PET": "mri-pet", f"{_CT}/scct": "mri-ct", f"{_CT}/scct_stripped": "mri-ct"}
HELD_OUT = (
    ("ibsi_sts002_ct_mr_pet/MR_T1_image", "ibsi_sts002_ct_mr_pet/PET_image", "mri-pet"),
    ("ibsi_sts002_ct_mr_pet/MR_T1_image", "ibsi_sts002_ct_mr_pet/CT_image", "mri-ct"),
    (f"{_SPM}/OldNorm_T2", f"{_SPM}/OldNorm_Transm", "mri-ct"),
)


@dataclass(frozen=True)
class VolumePair:
    id: str
    task: str
    fixed: Path
    moving: Path


def pairs(root: Path, split: str) -> list[VolumePair]:
    """The ``train`` or ``held-out`` pairs under ``root`` (a ``volumes`` folder)."""
    if split == "train":
        table = [(m, o, t) for m in TRAIN_MRI for o, t in TRAIN_OTHER.items()]
    elif split == "held-out":
        table = list(HELD_OUT)
    else:
        raise InvalidInputError(f"unknown volume split {split!r}; choose train or held-out")
    out = []
    for m, o, t in table:
        fixed, moving = root / f"{m}.nii.gz", root / f"{o}.nii.gz"
        if not (fixed.is_file() and moving.is_file()):
            raise InvalidInputError(f"{root}: missing {fixed.name if not fixed.is_file() else moving.name} "
                                    "(expected the layout of ../shared/data/volumes)")
        out.append(VolumePair(f"{Path(m).name}+{Path(o).name}", t, fixed, moving))
    return out


def load_pair(pair: VolumePair) -> tuple[np.ndarray, np.ndarray]:
    """MRI and the other volume on the MRI's grid, float32 in [0, 1], ``(z, y, x)``."""
    from .intensity import window_for
    from .io import read_image
    from .register import resample_to

    fixed, moving = read_image(pair.fixed), read_image(pair.moving)
    moved = resample_to(moving, fixed)
    a = window_for(fixed).apply(fixed.data)
    b = window_for(moving).apply(moved.data)
    return (np.ascontiguousarray(a.transpose(2, 1, 0)), np.ascontiguousarray(b.transpose(2, 1, 0)))


def load_split(root: Path, split: str) -> list[dict]:
    """Pairs as the trainer's dicts: ``id``, ``task``, ``a`` (MRI), ``b`` (other)."""
    out = []
    for p in pairs(root, split):
        a, b = load_pair(p)
        out.append({"id": p.id, "task": p.task, "a": a, "b": b})
    return out


def slabs(slices: list[dict], depth: int) -> list[dict]:
    """Stacks of neighbouring 2D pairs (the trainer's dicts of :func:`medfuse_cli.train.load_split`,
    Harvard ids ``group*1000 + slice``): every run of at least ``depth`` consecutive slices of one
    case group becomes one ``(z, y, x)`` pair, so the real patients' slices train a 3D network too."""
    runs: list[list[dict]] = []
    for p in sorted(slices, key=lambda p: (p["task"], int(p["id"]))):
        last = runs[-1][-1] if runs else None
        if last is None or last["task"] != p["task"] or int(last["id"]) + 1 != int(p["id"]):
            runs.append([])
        runs[-1].append(p)
    out = []
    for run in runs:
        if len(run) >= depth:
            out.append({"id": f"{run[0]['task']}-{run[0]['id']}-{run[-1]['id']}", "task": run[0]["task"],
                        "a": np.stack([p["a"] for p in run]), "b": np.stack([p["b"] for p in run])})
    return out
