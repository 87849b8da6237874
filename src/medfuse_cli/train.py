"""``medfuse train``: train a fusion network on registered pairs.

AdaFuse learns to fuse 2D pairs (``fusion_loss``); DRAN learns to reconstruct single images, both
sources of every pair (``reconstruction_loss``), and fuses with its fixed rule only at validation.
DCFB-3D learns to fuse random 3D patches of the volume pairs of :mod:`medfuse_cli.volumes`
(``fusion_loss`` on volumes) and is validated on the held-out volumes by sliding window.

2D networks train only on the ``train`` rows of ``splits.csv`` (Harvard layout); validation uses
the ``val`` rows. A run
writes a checkpoint (safetensors: weights, Adam state, step and RNG state; no pickles) every
``checkpoint_every`` steps and resumes from it with ``resume=True`` bit for bit. At the end it
writes ``NAME.safetensors`` and the model card ``NAME.json`` (architecture, parameter count, data,
recipe, validation metrics beside the classic rules, sha256, training time).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import InputNotFoundError, InvalidInputError, OutputError, os_reason
from .io.atomic import check_folder_output
from .models.adafuse import TASKS, AdaFuse
from .models.dcfb3d import DCFB3D
from .models.dran import DRAN

DEFAULT_RECIPE = {"adafuse": "balanced", "dran": "recon", "dcfb3d": "balanced"}
DEFAULT_CROP = {"adafuse": 128, "dran": 128, "dcfb3d": 48}  # crop side (3D: patch side)
DEFAULT_BATCH = {"adafuse": 8, "dran": 8, "dcfb3d": 2}
DEFAULT_RULE = "l1"  # DRAN: the shipped card's rule (sfnn picks one source per image; README)
# TrainConfig fields that only some networks have: (the option that sets it, those networks)
MODEL_OPTIONS = {
    "frequency": ("--no-frequency", ("adafuse",)), "exchange": ("--no-exchange", ("adafuse",)),
    "gate": ("--gate", ("adafuse",)), "widths": ("--widths", ("adafuse", "dcfb3d")),
    "depth": ("--depth", ("dcfb3d",)), "deformable": ("--no-deformable", ("dcfb3d",)),
    "direct": ("--direct", ("dcfb3d",)), "tasks": ("--task-embedding", ("dcfb3d",)),
    "slabs": ("--slabs", ("dcfb3d",)), "slab_depth": ("--slab-depth", ("dcfb3d",)),
    "channels": ("--channels", ("dran",)), "rule": ("--rule", ("dran",)),
}
VOLUME_TASKS = ("mri-ct", "mri-pet")

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str = "weights"
    name: str = "adafuse"
    model: str = "adafuse"
    task: str = "all"
    steps: int = 2000
    batch: int = 0  # 0: the model's default (DEFAULT_BATCH)
    crop: int = 0  # 0: the model's default (DEFAULT_CROP)
    lr: float | None = None  # None: 1e-3, or 3e-4 for a fine-tune (--init), whose larger first steps undo the parent
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 50
    val_every: int = 0  # 0: only at the end
    recipe: str = ""  # "": the model's default (DEFAULT_RECIPE)
    frequency: bool = True  # AdaFuse
    exchange: bool = True  # AdaFuse
    gate: bool = False  # AdaFuse: per-pixel source weight in the head (F = w A + (1 - w) B + h)
    widths: list[int] = field(default_factory=list)  # AdaFuse / DCFB-3D channels per scale ([]: the model's default)
    depth: int = 2  # DCFB-3D: DCFB blocks (each applied both ways)
    deformable: bool = True  # DCFB-3D: learned offsets (False: ablation)
    direct: int = 0  # DCFB-3D: channels of a full-resolution path on the raw sources (0: none)
    tasks: int = 0  # DCFB-3D: entries of a task embedding (0: none; 3: TASKS)
    slabs: str = ""  # DCFB-3D: also train on stacks of this Harvard folder's train slices (every other step)
    slab_depth: int = 16  # DCFB-3D: slices per slab patch (and the shortest run of slices used)
    channels: int = 32  # DRAN
    rule: str = ""  # DRAN fusion rule ("": the parent's for a fine-tune, else DEFAULT_RULE)
    val_limit: int = 0  # validate on the first N val pairs only (0: all; for quick runs and tests)
    baselines: bool = True  # score the classic rules on the same val pairs for the model card
    init: str = ""  # fine-tune: start from this installed model (name in the weights folder) or .safetensors file
    loss_weights: dict[str, float] = field(default_factory=dict)  # override the recipe's term weights

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 3e-4 if self.init else 1e-3


def load_split(data: Path, split: str, task: str) -> list[dict[str, Any]]:
    """Pairs of one split as float32 [0,1] arrays (rows, cols): MRI and the other's luminance."""
    from .evaluate import find_cases, metric_array
    from .io import read_image

    if task != "all" and task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; choose {', '.join(TASKS)} or all")
    cases, _ = find_cases(data, [], split, option="--data")
    out = []
    for c in cases:
        if task != "all" and c.group != task:
            continue
        if c.group not in TASKS:
            continue
        a = metric_array(read_image(c.fixed)) / 255.0
        b = metric_array(read_image(c.moving)) / 255.0
        out.append({"id": c.id, "task": c.group, "a": a.astype(np.float32), "b": b.astype(np.float32)})
    if not out:
        raise InvalidInputError(f"{data}: no {split} pairs for task {task}")
    return out


def build_model(model: str, arch: dict[str, Any]) -> AdaFuse | DRAN | DCFB3D:
    """A network from its name and architecture (a model card's ``architecture``)."""
    if model == "dran":
        return DRAN(channels=arch.get("channels", 32), rule=arch.get("rule", "sfnn"))
    if model == "adafuse":
        return AdaFuse(widths=tuple(arch.get("widths") or (16, 32, 48, 64)), frequency=arch.get("frequency", True),
                       exchange=arch.get("exchange", True), gate=arch.get("gate", False))
    if model == "dcfb3d":
        return DCFB3D(widths=tuple(arch.get("widths") or (8, 16, 32)), depth=arch.get("depth", 2),
                      deformable=arch.get("deformable", True), direct=arch.get("direct", 0),
                      tasks=arch.get("tasks", 0))
    raise InvalidInputError(f"unknown model {model!r}; choose {', '.join(DEFAULT_RECIPE)}")


def _batch(pairs: list[dict], cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random pairs, random crops, flips / rot90, mild intensity scaling (same ops on A and B)."""
    idx = torch.randint(len(pairs), (cfg.batch,), generator=gen).tolist()
    a_out, b_out, t_out = [], [], []
    for i in idx:
        p = pairs[i]
        h, w = p["a"].shape
        y = int(torch.randint(h - cfg.crop + 1, (1,), generator=gen))
        x = int(torch.randint(w - cfg.crop + 1, (1,), generator=gen))
        a = torch.from_numpy(p["a"][y : y + cfg.crop, x : x + cfg.crop])
        b = torch.from_numpy(p["b"][y : y + cfg.crop, x : x + cfg.crop])
        k = int(torch.randint(4, (1,), generator=gen))
        flip = bool(torch.randint(2, (1,), generator=gen))
        scale_a, scale_b = (0.85 + 0.3 * torch.rand(2, generator=gen)).tolist()
        a, b = torch.rot90(a, k), torch.rot90(b, k)
        if flip:
            a, b = a.flip(-1), b.flip(-1)
        a_out.append((a * scale_a).clamp(0, 1))
        b_out.append((b * scale_b).clamp(0, 1))
        t_out.append(TASKS.index(p["task"]))
    return torch.stack(a_out)[:, None], torch.stack(b_out)[:, None], torch.tensor(t_out)


def _patch_batch(pairs: list[dict], cfg: TrainConfig, gen: torch.Generator,
                 shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """Random 3D patches of ``shape`` (default a cube of ``crop``; mostly inside the head: up to 4
    draws for one a quarter foreground), flips on every axis, in-plane transposition, mild
    intensity scaling (same ops on A and B)."""
    idx = torch.randint(len(pairs), (cfg.batch,), generator=gen).tolist()
    a_out, b_out, t_out = [], [], []
    shape = shape or (cfg.crop,) * 3
    for i in idx:
        p = pairs[i]
        for _ in range(4):
            z, y, x = (int(torch.randint(n - s + 1, (1,), generator=gen)) for n, s in zip(p["a"].shape, shape))
            sl = tuple(slice(o, o + s) for o, s in zip((z, y, x), shape))
            if (p["a"][sl] > 0.1).mean() > 0.25:
                break
        a, b = torch.from_numpy(p["a"][sl].copy()), torch.from_numpy(p["b"][sl].copy())
        flips = [d for d in range(3) if bool(torch.randint(2, (1,), generator=gen))]
        if flips:
            a, b = a.flip(flips), b.flip(flips)
        if bool(torch.randint(2, (1,), generator=gen)):
            a, b = a.transpose(1, 2), b.transpose(1, 2)
        scale_a, scale_b = (0.85 + 0.3 * torch.rand(2, generator=gen)).tolist()
        a_out.append((a * scale_a).clamp(0, 1))
        b_out.append((b * scale_b).clamp(0, 1))
        t_out.append(TASKS.index(p["task"]))
    return torch.stack(a_out)[:, None], torch.stack(b_out)[:, None], torch.tensor(t_out)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written beside ``path`` and renamed into place; a write that fails (a full
    disk) leaves no file and is an :class:`OutputError` with the system's reason."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = path.with_suffix(".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    except (SafetensorError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        io_error = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(exc).splitlines()[0] if str(exc) else "")
        raise OutputError(f"cannot write {path}: {io_error[1] if io_error else os_reason(exc)}") from None


def _save_checkpoint(path: Path, model, opt, step: int, gen: torch.Generator, cfg: TrainConfig) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, (p, st) in enumerate(opt.state.items()):
        del p
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng"] = gen.get_state()
    _save_tensors(tensors, path, {"step": str(step), "config": json.dumps(asdict(cfg))})


RESUME_MAY_CHANGE = {"data", "out", "name", "steps", "threads", "checkpoint_every", "val_every", "val_limit", "baselines"}


def _load_checkpoint(path: Path, model, opt, gen: torch.Generator, cfg: TrainConfig) -> int:
    """Restore a checkpoint of the same run: every option but :data:`RESUME_MAY_CHANGE` as saved."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        saved = json.loads(meta["config"])
        step = int(meta["step"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"{path}: not a readable checkpoint ({exc}); --overwrite starts again") from None
    now = asdict(cfg)
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        what = "; ".join(f"{k.replace('_', '-')} {saved[k]!r}, now {now[k]!r}" for k in changed[:3])
        raise InvalidInputError(f"--resume: {path.name} was made with other options ({what}); give the same "
                                "options, or --overwrite to start again")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = list(model.parameters())
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = st
    gen.set_state(tensors["rng"])
    return step


@torch.inference_mode()
def predict(model: AdaFuse | DRAN | DCFB3D, a: np.ndarray, b: np.ndarray, task: str) -> np.ndarray:
    """Fuse one (rows, cols) pair, or one (z, y, x) volume pair for 3D models, in [0, 1]."""
    from .models.infer import fuse_stack, sliding_window

    if getattr(model, "dims", 2) == 3:
        return np.clip(sliding_window(model, a, b, task=task), 0.0, 1.0)
    return fuse_stack(model, a[None], b[None], task)[0]


def validate(model: AdaFuse | DRAN | DCFB3D, pairs: list[dict], by: str = "task") -> dict[str, dict[str, float]]:
    """Mean of every metric per task (or per pair: ``by="id"``) on full validation images or
    volumes (0..255, as medfuse eval)."""
    from .metrics import compute

    model.eval()
    per_task: dict[str, list[dict]] = {}
    for p in pairs:
        f = predict(model, p["a"], p["b"], p["task"])
        per_task.setdefault(p[by], []).append(compute(p["a"] * 255.0, p["b"] * 255.0, f * 255.0))
    model.train()
    return _task_means(per_task)


def _task_means(per_task: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {t: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for t, rows in per_task.items()}


def classic_baselines(pairs: list[dict], by: str = "task") -> dict[str, dict[str, dict[str, float]]]:
    """The classic rules scored the same way, for the model card."""
    from .fusion import CLASSIC_RULES, fuse_classic
    from .metrics import compute

    out: dict[str, dict[str, dict[str, float]]] = {}
    for rule in CLASSIC_RULES:
        per_task: dict[str, list[dict]] = {}
        for p in pairs:
            f = fuse_classic(rule, p["a"], p["b"])
            per_task.setdefault(p[by], []).append(compute(p["a"] * 255.0, p["b"] * 255.0, f * 255.0))
        out[rule] = _task_means(per_task)
    return out


def train(cfg: TrainConfig, resume: bool = False, progress: Callable[[int, dict], None] | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a training; returns the model card. An existing model of the same name in
    ``cfg.out`` (weights or card) is refused before any work unless ``overwrite``."""
    from .models.dran import RULES
    from .models.losses import RECIPES, RECON_RECIPES

    if cfg.model not in DEFAULT_RECIPE:
        raise InvalidInputError(f"unknown model {cfg.model!r}; trainable: {', '.join(DEFAULT_RECIPE)}")
    volume = cfg.model == "dcfb3d"
    cfg.crop = cfg.crop or DEFAULT_CROP[cfg.model]
    cfg.batch = cfg.batch or DEFAULT_BATCH[cfg.model]
    if cfg.crop % (8 if volume else 16):
        raise InvalidInputError(f"crop {cfg.crop}: must be a multiple of {8 if volume else 16}")
    defaults = {f.name: f.default for f in fields(TrainConfig)} | {"widths": []}
    for name, (option, models) in MODEL_OPTIONS.items():
        if cfg.model not in models and getattr(cfg, name) != defaults[name]:
            raise InvalidInputError(f"{option} is an option of {' and '.join(models)}, not {cfg.model}")
    parent_state, parent, parent_card = _read_parent(cfg.init) if cfg.init else ({}, None, None)
    if parent_card is not None:  # an installed parent: the same network, its parts unless options add to them
        if parent_card.get("model") != cfg.model:
            raise InvalidInputError(f"--init {cfg.init}: its card is for {parent_card.get('model')}, not {cfg.model}")
        arch = parent_card.get("architecture", {})
        cfg.widths = cfg.widths or list(arch.get("widths") or [])
        cfg.direct, cfg.tasks = cfg.direct or arch.get("direct", 0), cfg.tasks or arch.get("tasks", 0)
        cfg.rule = cfg.rule or arch.get("rule", "")
    if cfg.model == "dran":
        cfg.rule = cfg.rule or DEFAULT_RULE
        if cfg.rule not in RULES:
            raise InvalidInputError(f"unknown DRAN rule {cfg.rule!r}; choose {', '.join(RULES)}")
    if volume and len(cfg.widths) not in (0, 3):
        raise InvalidInputError(f"widths {cfg.widths}: DCFB-3D takes three (full, 1/2, 1/4 resolution)")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise InvalidInputError(f"--lr {cfg.lr}: must be a finite number, 0 or more")
    cfg.recipe = cfg.recipe or DEFAULT_RECIPE[cfg.model]
    recipes = RECON_RECIPES if cfg.model == "dran" else [r for r in RECIPES if not (volume and r == "asfe")]
    if cfg.recipe not in recipes:
        raise InvalidInputError(f"recipe {cfg.recipe!r} does not train {cfg.model}; choose {', '.join(recipes)}")
    terms = set((RECON_RECIPES if cfg.model == "dran" else RECIPES)[cfg.recipe])
    terms |= {"vif"} if cfg.recipe in ("balanced", "medfuse") else set()
    if set(cfg.loss_weights) - terms:
        raise InvalidInputError(f"loss weight {min(set(cfg.loss_weights) - terms)!r}: recipe {cfg.recipe} has "
                                f"{', '.join(sorted(terms)) or 'no weights to change'}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    check_folder_output(cfg.out, "--out")
    data, out = Path(cfg.data), Path(cfg.out)
    ckpt = out / f"{cfg.name}.checkpoint.safetensors"
    existing = [p for p in (out / f"{cfg.name}.safetensors", out / f"{cfg.name}.json") if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} exists (a trained model): give another --name or --out, or --overwrite "
                          "to replace it")
    slab_pairs: list[dict] = []
    if volume:
        from . import volumes

        if cfg.task not in ("all", *VOLUME_TASKS):
            raise InvalidInputError(f"unknown task {cfg.task!r} for volumes; choose {', '.join(VOLUME_TASKS)} or all")
        keep = lambda rows: [r for r in rows if cfg.task in ("all", r["task"])]
        train_pairs = keep(volumes.load_split(data, "train"))
        val_pairs = keep(volumes.load_split(data, "held-out"))
        smallest = min(min(p["a"].shape) for p in train_pairs)
        if smallest < cfg.crop:
            raise InvalidInputError(f"crop {cfg.crop}: a training volume has a side of only {smallest} voxels")
        if cfg.slabs:
            if cfg.slab_depth % 8 or cfg.slab_depth < 16:  # the 3D SSIM window is 11 voxels deep
                raise InvalidInputError(f"slab depth {cfg.slab_depth}: must be a multiple of 8, at least 16")
            if not Path(cfg.slabs).is_dir():
                raise InputNotFoundError(f"--slabs {cfg.slabs}: not a folder")
            slab_pairs = volumes.slabs(load_split(Path(cfg.slabs), "train", cfg.task), cfg.slab_depth)
            if not slab_pairs:
                raise InvalidInputError(f"--slabs {cfg.slabs}: no run of {cfg.slab_depth} neighbouring train slices")
            # in-plane side giving about the voxels of a crop^3 patch, a multiple of 8
            side = min(256, int(math.sqrt(cfg.crop**3 / cfg.slab_depth)) // 8 * 8)
            slab_shape = (cfg.slab_depth, side, side)
    else:
        train_pairs = load_split(data, "train", cfg.task)
        val_pairs = load_split(data, "val", cfg.task)
    if cfg.val_limit:
        val_pairs = val_pairs[: cfg.val_limit]
    model = build_model(cfg.model, asdict(cfg))
    if cfg.init:
        _start_from(model, parent_state, cfg.init)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        step = _load_checkpoint(ckpt, model, opt, gen, cfg)
        log.warning("resumed from %s at step %d", ckpt, step)
    elif ckpt.is_file() and not overwrite:
        raise InvalidInputError(f"{ckpt} exists: use --resume to continue it, or --overwrite (or remove it) to start "
                                "again")
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    model.train()
    while step < cfg.steps:
        if volume and cfg.slabs and step % 2:
            batch = _patch_batch(slab_pairs, cfg, gen, slab_shape)
        else:
            batch = (_patch_batch if volume else _batch)(train_pairs, cfg, gen)
        parts = train_step(model, opt, cfg, step, *batch)
        step += 1
        _check_finite(model, step, parts["loss"], ckpt)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, model, opt, step, gen, cfg)
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            v = validate(model, val_pairs)
            history.append({"step": step, **{t: {k: v[t][k] for k in ("SSIM", "SSIM_worst", "Qabf")} for t in v}})
            parts["val"] = history[-1]
        if progress:
            progress(step, parts)
    elapsed = time.perf_counter() - t_start
    return finish(model, cfg, val_pairs, train_pairs + slab_pairs, elapsed, history, parent)


def _check_finite(model: torch.nn.Module, step: int, loss: float, ckpt: Path) -> None:
    """Stop a run whose loss or weights are no longer finite (too high a --lr), before it checkpoints."""
    if math.isfinite(loss) and all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    kept = f"{ckpt.name} holds the last checkpoint before it" if ckpt.is_file() else "nothing was written"
    raise InvalidInputError(f"training diverged at step {step} (loss {loss:g}, or weights no longer finite): "
                            f"{kept}; lower --lr")


def train_step(model: AdaFuse | DRAN | DCFB3D, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int,
               a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """One optimiser step on a batch: the model's loss, then :func:`descend`."""
    from .models.losses import fusion_loss

    if cfg.model == "dran":
        loss, parts = dran_loss(model, a, b, cfg.recipe, cfg.loss_weights)
    else:
        loss, parts = fusion_loss(a, b, model(a, b, t), cfg.recipe, cfg.loss_weights, groups=t)
    descend(model, opt, cfg, step, loss)
    return parts


def descend(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int,
            loss: torch.Tensor) -> None:
    """Update on ``loss``: cosine learning rate from ``cfg.lr`` over ``cfg.steps``, gradients clipped to 1."""
    for g in opt.param_groups:
        g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def dran_loss(model: DRAN, a: torch.Tensor, b: torch.Tensor, recipe: str = "recon",
              weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """DRAN's training loss: reconstruction of both sources; with a ``fuse`` weight (recipe
    ``recon-fuse``) plus the ``balanced`` fusion loss of the pair fused through the model's rule
    (``recon-fuse-vif``: with a VIF term)."""
    from .models.losses import RECON_RECIPES, fusion_loss, reconstruction_loss

    x = torch.cat([a, b])
    loss, parts = reconstruction_loss(x, model.reconstruct(x), recipe, weights)
    w = {**RECON_RECIPES[recipe], **(weights or {})}
    if w.get("fuse"):
        fuse, fparts = fusion_loss(a, b, model(a, b), "balanced", {"vif": w["fuse_vif"]})
        loss = loss + w["fuse"] * fuse
        parts = {**parts, "loss": loss.item(), **{k: fparts[k] for k in ("surv", "vif") if k in fparts},
                 "fuse": fparts["loss"]}
    return loss, parts


def _read_parent(init: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """The starting weights of a fine-tune (an installed model's name or a .safetensors file), what
    the new card records of the parent, and the parent's own card (None for a bare file)."""
    from .models.weights import load_checked, sha256

    path = Path(init)
    if path.suffix != ".safetensors":
        state, card = load_checked(init)
        return state, {"name": card["name"], "weights": card["weights"], "sha256": card["sha256"],
                       "training_seconds": card.get("training_seconds"),
                       "total_training_seconds": card.get("total_training_seconds", card.get("training_seconds"))}, card
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InvalidInputError(f"--init {init}: no such file")
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise InvalidInputError(f"--init {init}: not a readable safetensors file ({exc})") from None
    return state, {"weights": path.name, "sha256": sha256(path)}, None


def _start_from(model: AdaFuse | DRAN | DCFB3D, state: dict[str, torch.Tensor], init: str) -> None:
    """Load a parent's weights; paths whose output starts at zero (AdaFuse's gate, DCFB-3D's direct
    path and task embedding) may be absent, so the fine-tune starts exactly as its parent."""
    zero_start = ("direct.", "task.") if getattr(model, "dims", 2) == 3 else ("gate.",)
    fresh = {k for k in model.state_dict() if k.startswith(zero_start)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - fresh:
            raise RuntimeError(f"missing {sorted(set(missing) - fresh)[:3]}, unexpected {sorted(unexpected)[:3]}")
    except RuntimeError as exc:
        raise InvalidInputError(f"--init {init}: its weights do not fit this architecture ({str(exc).splitlines()[0]})") from None


def finish(model: AdaFuse | DRAN | DCFB3D, cfg: TrainConfig, val_pairs, train_pairs, seconds: float, history,
           parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate, then write the weights and the model card (the weights go again if the card fails)."""
    from .io.atomic import undone_on_failure

    out = Path(cfg.out)
    volume = getattr(model, "dims", 2) == 3
    by = "id" if volume else "task"
    validation = validate(model, val_pairs, by=by)  # before writing: a failure leaves no weights without a card
    baselines = classic_baselines(val_pairs, by=by) if cfg.baselines else None
    weights = out / f"{cfg.name}.safetensors"
    _save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, weights, {"config": json.dumps(model.config)})
    with undone_on_failure([weights]):
        return _write_card(model, cfg, weights, val_pairs, train_pairs, seconds, history, parent, validation, baselines)


def _write_card(model, cfg: TrainConfig, weights: Path, val_pairs, train_pairs, seconds: float, history,
                parent: dict[str, Any] | None, validation: dict, baselines: dict | None) -> dict[str, Any]:
    from .io.atomic import atomic_write_bytes
    from .models.weights import sha256

    volume = getattr(model, "dims", 2) == 3
    card = {
        "name": cfg.name,
        "model": cfg.model,
        "weights": weights.name,
        "sha256": sha256(weights),
        "medfuse_version": __version__,
        "architecture": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tasks": [cfg.task] if cfg.task != "all" else list(VOLUME_TASKS if volume else TASKS),
        "data": {"folder": Path(cfg.data).name,
                 "split": "medfuse_cli.volumes: train pairs; held-out pairs for validation only" if volume
                 else "splits.csv train (val for validation only)",
                 "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                 **({"slabs": f"{Path(cfg.slabs).name}: splits.csv train slices, runs of >= {cfg.slab_depth} stacked"}
                    if volume and cfg.slabs else {}),
                 **({"train": [p["id"] for p in train_pairs], "held_out": [p["id"] for p in val_pairs]} if volume else {})},
        "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "name")},
        "training_seconds": round(seconds, 1),
        "fine_tuned_from": parent,
        # the whole chain: a parent that was itself a fine-tune brings its own parents' time
        "total_training_seconds": round(seconds + ((parent or {}).get("total_training_seconds")
                                                   or (parent or {}).get("training_seconds") or 0), 1),
        "validation": validation,
        "classic_rules_on_val": baselines,
        "history": history,
        "metric_conventions": "medfuse eval (PEERS.md); sources and output as float 0..255 luminance",
    }
    atomic_write_bytes(weights.with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode(), overwrite=True)
    return card
