"""Capacity check, not a shipped model: can DCFB-3D reach the targets of issue 8 when it is trained
*on the held-out volumes themselves*? If not, the network (not only the template training data) is
the limit. Fine-tunes the installed ``dcfb3d`` on random patches of the held-out pairs with a
recipe, then scores them with the trainer's validation (``medfuse_cli.train.validate``). Needs
../shared/data.

    python benchmarks/dcfb3d_capacity.py --recipe constrained --steps 600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medfuse_cli import volumes
from medfuse_cli.train import (
    TASKS,
    TrainConfig,
    _patch_batch,
    _read_parent,
    _start_from,
    build_model,
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
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    # patches of 32^3: the IBSI volumes are only 36-40 slices deep
    cfg = TrainConfig(data=str(VOLUMES), model="dcfb3d", batch=6, crop=32, steps=args.steps, lr=args.lr,
                      recipe=args.recipe,
                      loss_weights={k: float(v) for k, _, v in (w.partition("=") for w in args.loss_weight)})
    pairs = volumes.load_split(VOLUMES, "held-out")
    state, _, card = _read_parent("dcfb3d")
    arch = card["architecture"]
    model = build_model("dcfb3d", {**arch, "direct": arch.get("direct", 0) if args.direct is None else args.direct,
                                   "tasks": len(TASKS) if args.task_embedding else arch.get("tasks", 0)})
    _start_from(model, state, "dcfb3d")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        train_step(model, opt, cfg, step, *_patch_batch(pairs, cfg, gen))
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save)
    print(f"{args.steps} steps of {args.recipe} on the held-out volumes, {time.perf_counter() - t0:.0f} s\n")
    print("| pair | SSIM | worst | Qabf | VIF |\n|---|--:|--:|--:|--:|")
    for pid, m in validate(model, pairs, by="id").items():
        print(f"| {pid} | {m['SSIM']:.3f} | {m['SSIM_worst']:.3f} | {m['Qabf']:.3f} | {m['VIF']:.3f} |")


if __name__ == "__main__":
    main()
