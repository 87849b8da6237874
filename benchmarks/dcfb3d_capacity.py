"""Capacity check, not a shipped model: can DCFB-3D reach the targets of issue 8 when it is trained
*on the held-out volumes themselves*? If not, the network (not only the template training data) is
the limit. Fine-tunes the installed ``dcfb3d`` on random patches of the held-out pairs with a
recipe, then scores them with the trainer's validation (``medfuse_cli.train.validate``). Needs
../shared/data.

    python benchmarks/dcfb3d_capacity.py --recipe constrained --steps 600
    python benchmarks/dcfb3d_capacity.py --from-max --whole --steps 240      # whole volumes, from pixel max
    python benchmarks/dcfb3d_capacity.py --from-max --whole --only PET_image --steps 90
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medfuse_cli import volumes
from medfuse_cli.models.dcfb3d import DIRECT_GAIN
from medfuse_cli.models.losses import fusion_loss
from medfuse_cli.train import (
    TASKS,
    TrainConfig,
    _patch_batch,
    _read_parent,
    _start_from,
    build_model,
    descend,
    train_step,
    validate,
)

VOLUMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "volumes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="constrained")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--direct", type=int, help="a full-resolution path of this many channels (default: the model's)")
    parser.add_argument("--task-embedding", action="store_true", help="add a task embedding (if the model has none)")
    parser.add_argument("--loss-weight", action="append", default=[], help="KEY=VALUE, as medfuse train")
    parser.add_argument("--save", help="write the trained weights to this .safetensors file")
    parser.add_argument("--from-max", action="store_true",
                        help="start at pixel max: the direct path's last layer zeroed, its pull g set to 1")
    parser.add_argument("--whole", action="store_true",
                        help="train on whole volumes, one per step (the loss is then the metric's own objective)")
    parser.add_argument("--only", default="", help="train on the held-out pairs whose id contains this only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    # patches of 32^3: the IBSI volumes are only 36-40 slices deep
    cfg = TrainConfig(data=str(VOLUMES), model="dcfb3d", batch=6, crop=32, steps=args.steps, lr=args.lr,
                      recipe=args.recipe,
                      loss_weights={k: float(v) for k, _, v in (w.partition("=") for w in args.loss_weight)})
    pairs = volumes.load_split(VOLUMES, "held-out")
    train_pairs = [p for p in pairs if args.only in p["id"]]
    if not train_pairs:
        parser.error(f"--only {args.only}: no held-out pair; they are {', '.join(p['id'] for p in pairs)}")
    state, _, card = _read_parent("dcfb3d")
    arch = card["architecture"]
    direct = arch.get("direct", 0) if args.direct is None else args.direct
    model = build_model("dcfb3d", {**arch, "direct": direct,
                                   "tasks": len(TASKS) if args.task_embedding else arch.get("tasks", 0)})
    # a direct path of another width starts fresh (at zero, as a fine-tune adding one does)
    _start_from(model, {k: v for k, v in state.items()
                        if direct == arch.get("direct", 0) or not k.startswith("direct.")}, "dcfb3d")
    if args.from_max:
        if model.direct is None:
            parser.error("--from-max needs a direct path (--direct N)")
        with torch.no_grad():
            model.direct[-1].weight.zero_()
            model.direct[-1].bias.zero_()
            model.direct[-1].bias[2] = 1.0 / DIRECT_GAIN  # g = 1: F = max(A, B)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        if args.whole:
            whole_volume_step(model, opt, cfg, step, train_pairs[step % len(train_pairs)])
        else:
            train_step(model, opt, cfg, step, *_patch_batch(train_pairs, cfg, gen))
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save)
    what = ("whole volumes" if args.whole else "patches") + (f" of {args.only}" if args.only else "")
    print(f"{args.steps} steps of {args.recipe} on held-out {what}, {time.perf_counter() - t0:.0f} s\n")
    print("| pair | SSIM | worst | Qabf | VIF |\n|---|--:|--:|--:|--:|")
    for pid, m in validate(model, pairs, by="id").items():
        print(f"| {pid} | {m['SSIM']:.3f} | {m['SSIM_worst']:.3f} | {m['Qabf']:.3f} | {m['VIF']:.3f} |")


def whole_volume_step(model, opt, cfg: TrainConfig, step: int, pair: dict) -> None:
    """One step on a whole volume (padded to the model's multiple, the loss on the volume itself,
    clipped to [0, 1] as inference clips)."""
    a, b = (torch.from_numpy(pair[k])[None, None] for k in "ab")
    pad = [p for n in reversed(a.shape[2:]) for p in (0, -n % model.multiple)]
    crop = (..., *(slice(0, n) for n in a.shape[2:]))
    f = model(F.pad(a, pad), F.pad(b, pad), torch.tensor([TASKS.index(pair["task"])]))[crop].clamp(0, 1)
    descend(model, opt, cfg, step, fusion_loss(a, b, f, cfg.recipe, cfg.loss_weights)[0])


if __name__ == "__main__":
    main()
