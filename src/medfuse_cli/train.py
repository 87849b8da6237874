"""``medfuse train``: train a 2D fusion network on folders of registered pairs (Harvard layout).

AdaFuse learns to fuse pairs (``fusion_loss``); DRAN learns to reconstruct single images, both
sources of every pair (``reconstruction_loss``), and fuses with its fixed rule only at validation.

Train only on the ``train`` rows of ``splits.csv``; validation uses the ``val`` rows. A run
writes a checkpoint (safetensors: weights, Adam state, step and RNG state; no pickles) every
``checkpoint_every`` steps and resumes from it with ``resume=True`` bit for bit. At the end it
writes ``NAME.safetensors`` and the model card ``NAME.json`` (architecture, parameter count, data,
recipe, validation metrics beside the classic rules, sha256, training time).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import InvalidInputError
from .models.adafuse import TASKS, AdaFuse
from .models.dran import DRAN

DEFAULT_RECIPE = {"adafuse": "balanced", "dran": "recon"}

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str = "weights"
    name: str = "adafuse"
    model: str = "adafuse"
    task: str = "all"
    steps: int = 2000
    batch: int = 8
    crop: int = 128
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 50
    val_every: int = 0  # 0: only at the end
    recipe: str = ""  # "": the model's default (DEFAULT_RECIPE)
    frequency: bool = True  # AdaFuse
    exchange: bool = True  # AdaFuse
    widths: list[int] = field(default_factory=lambda: [16, 32, 48, 64])  # AdaFuse
    channels: int = 32  # DRAN
    rule: str = "sfnn"  # DRAN fusion rule
    val_limit: int = 0  # validate on the first N val pairs only (0: all; for quick runs and tests)
    baselines: bool = True  # score the classic rules on the same val pairs for the model card
    init: str = ""  # fine-tune: start from this installed model (name in the weights folder) or .safetensors file
    loss_weights: dict[str, float] = field(default_factory=dict)  # override the recipe's term weights


def load_split(data: Path, split: str, task: str) -> list[dict[str, Any]]:
    """Pairs of one split as float32 [0,1] arrays (rows, cols): MRI and the other's luminance."""
    from .evaluate import find_cases, metric_array
    from .io import read_image

    if task != "all" and task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; choose {', '.join(TASKS)} or all")
    cases, _ = find_cases(data, [], split)
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


def build_model(model: str, arch: dict[str, Any]) -> AdaFuse | DRAN:
    """A network from its name and architecture (a model card's ``architecture``)."""
    if model == "dran":
        return DRAN(channels=arch.get("channels", 32), rule=arch.get("rule", "sfnn"))
    if model == "adafuse":
        return AdaFuse(widths=tuple(arch.get("widths", (16, 32, 48, 64))), frequency=arch.get("frequency", True),
                       exchange=arch.get("exchange", True))
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


def _save_checkpoint(path: Path, model, opt, step: int, gen: torch.Generator, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, (p, st) in enumerate(opt.state.items()):
        del p
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng"] = gen.get_state()
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"step": str(step), "config": json.dumps(asdict(cfg))})
    tmp.replace(path)


def _load_checkpoint(path: Path, model, opt, gen: torch.Generator) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = list(model.parameters())
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = st
    gen.set_state(tensors["rng"])
    return int(meta["step"])


@torch.inference_mode()
def predict(model: AdaFuse | DRAN, a: np.ndarray, b: np.ndarray, task: str) -> np.ndarray:
    """Fuse one (rows, cols) pair in [0, 1] (padded to the model's multiple)."""
    from .models.infer import fuse_stack

    return fuse_stack(model, a[None], b[None], task)[0]


def validate(model: AdaFuse | DRAN, pairs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per task on full validation images (0..255, as medfuse eval)."""
    from .metrics import compute

    model.eval()
    per_task: dict[str, list[dict]] = {}
    for p in pairs:
        f = predict(model, p["a"], p["b"], p["task"])
        per_task.setdefault(p["task"], []).append(compute(p["a"] * 255.0, p["b"] * 255.0, f * 255.0))
    model.train()
    return _task_means(per_task)


def _task_means(per_task: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {t: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for t, rows in per_task.items()}


def classic_baselines(pairs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """The classic rules scored the same way, for the model card."""
    from .fusion import CLASSIC_RULES, fuse_classic
    from .metrics import compute

    out: dict[str, dict[str, dict[str, float]]] = {}
    for rule in CLASSIC_RULES:
        per_task: dict[str, list[dict]] = {}
        for p in pairs:
            f = fuse_classic(rule, p["a"], p["b"])
            per_task.setdefault(p["task"], []).append(compute(p["a"] * 255.0, p["b"] * 255.0, f * 255.0))
        out[rule] = _task_means(per_task)
    return out


def train(cfg: TrainConfig, resume: bool = False, progress: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a training; returns the model card."""
    from .models.dran import RULES
    from .models.losses import RECIPES, RECON_RECIPES, fusion_loss, reconstruction_loss

    if cfg.model not in DEFAULT_RECIPE:
        raise InvalidInputError(f"unknown model {cfg.model!r}; trainable: {', '.join(DEFAULT_RECIPE)}")
    if cfg.crop % 16:
        raise InvalidInputError(f"crop {cfg.crop}: must be a multiple of 16")
    if cfg.rule not in RULES:
        raise InvalidInputError(f"unknown DRAN rule {cfg.rule!r}; choose {', '.join(RULES)}")
    cfg.recipe = cfg.recipe or DEFAULT_RECIPE[cfg.model]
    recipes = RECON_RECIPES if cfg.model == "dran" else RECIPES
    if cfg.recipe not in recipes:
        raise InvalidInputError(f"recipe {cfg.recipe!r} does not train {cfg.model}; choose {', '.join(recipes)}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    data, out = Path(cfg.data), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"{cfg.name}.checkpoint.safetensors"
    train_pairs = load_split(data, "train", cfg.task)
    val_pairs = load_split(data, "val", cfg.task)
    if cfg.val_limit:
        val_pairs = val_pairs[: cfg.val_limit]
    model = build_model(cfg.model, asdict(cfg))
    parent = _init_from(model, cfg.init) if cfg.init else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        step = _load_checkpoint(ckpt, model, opt, gen)
        log.warning("resumed from %s at step %d", ckpt, step)
    elif ckpt.is_file():
        raise InvalidInputError(f"{ckpt} exists: use --resume to continue it, or remove it to start again")
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    model.train()
    while step < cfg.steps:
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        a, b, t = _batch(train_pairs, cfg, gen)
        if cfg.model == "dran":
            x = torch.cat([a, b])
            loss, parts = reconstruction_loss(x, model.reconstruct(x), cfg.recipe, cfg.loss_weights)
        else:
            loss, parts = fusion_loss(a, b, model(a, b, t), cfg.recipe, cfg.loss_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, model, opt, step, gen, cfg)
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            v = validate(model, val_pairs)
            history.append({"step": step, **{t: {k: v[t][k] for k in ("SSIM", "SSIM_worst", "Qabf")} for t in v}})
            parts["val"] = history[-1]
        if progress:
            progress(step, parts)
    elapsed = time.perf_counter() - t_start
    return finish(model, cfg, val_pairs, train_pairs, elapsed, history, parent)


def _init_from(model: AdaFuse | DRAN, init: str) -> dict[str, Any]:
    """Load the starting weights of a fine-tune; returns what the card records of the parent."""
    from .models.weights import load_checked, sha256

    path = Path(init)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise InvalidInputError(f"--init {init}: no such file")
        try:
            state = load_file(str(path))
        except SafetensorError as exc:
            raise InvalidInputError(f"--init {init}: not a readable safetensors file ({exc})") from None
        parent = {"weights": path.name, "sha256": sha256(path)}
    else:
        state, card = load_checked(init)
        parent = {"name": card["name"], "weights": card["weights"], "sha256": card["sha256"],
                  "training_seconds": card.get("training_seconds")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidInputError(f"--init {init}: its weights do not fit this architecture ({str(exc).splitlines()[0]})") from None
    return parent


def finish(model: AdaFuse | DRAN, cfg: TrainConfig, val_pairs, train_pairs, seconds: float, history,
           parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the weights and the model card."""
    from safetensors.torch import save_file

    from .models.weights import sha256

    out = Path(cfg.out)
    weights = out / f"{cfg.name}.safetensors"
    tmp = weights.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"config": json.dumps(model.config)})
    tmp.replace(weights)
    card = {
        "name": cfg.name,
        "model": cfg.model,
        "weights": weights.name,
        "sha256": sha256(weights),
        "medfuse_version": __version__,
        "architecture": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tasks": list(TASKS) if cfg.task == "all" else [cfg.task],
        "data": {"folder": Path(cfg.data).name, "split": "splits.csv train (val for validation only)",
                 "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)},
        "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "name")},
        "training_seconds": round(seconds, 1),
        "fine_tuned_from": parent,
        "total_training_seconds": round(seconds + ((parent or {}).get("training_seconds") or 0), 1),
        "validation": validate(model, val_pairs),
        "classic_rules_on_val": classic_baselines(val_pairs) if cfg.baselines else None,
        "history": history,
        "metric_conventions": "medfuse eval (PEERS.md); sources and output as float 0..255 luminance",
    }
    from .io.atomic import atomic_write_bytes

    atomic_write_bytes(out / f"{cfg.name}.json", (json.dumps(card, indent=2) + "\n").encode(), overwrite=True)
    return card
