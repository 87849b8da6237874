"""Does ``torch.compile`` or ONNX Runtime pay on the CPU? Eager against both, in one run.

For each network: milliseconds per forward (AdaFuse, DRAN: batches of 8 slices of 256x256 from a
real pair; DCFB-3D: one 96^3 window of the bundled T1 + PET), after warm-up; the one-off compile
or export time; and the largest absolute difference from the eager output (outputs in [0, 1]).
ONNX Runtime is optional (``pip install onnxruntime onnx onnxscript``); a network it cannot export
is reported as such.

    python benchmarks/compile_onnx.py [--threads 2] [--networks adafuse,dran,dcfb3d]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import harvard_pair, network_timing_args, spm_volumes, timed


def inputs(name: str) -> tuple[torch.Tensor, ...]:
    if name == "dcfb3d":
        va, vb = spm_volumes()
        z, y, x = (max((s - 96) // 2, 0) for s in va.shape)
        crop = (slice(z, z + 96), slice(y, y + 96), slice(x, x + 96))
        pad = [(0, 96 - n) for n in va[crop].shape]
        a, b = (torch.from_numpy(np.pad(v[crop], pad))[None, None] for v in (va, vb))
        return a, b
    a, b = harvard_pair()
    ta, tb = (torch.from_numpy(np.repeat(v[None, None], 8, axis=0)) for v in (a, b))
    if name == "adafuse":
        return ta, tb, torch.full((8,), 1, dtype=torch.long)  # task: mri-pet
    return ta, tb


def eager_model(name: str) -> torch.nn.Module:
    from medfuse_cli.models.infer import load_model

    return load_model(name, "cpu")


def onnx_session(model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path):
    import onnxruntime as ort

    names = [f"in{i}" for i in range(len(args))]
    torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"], opset_version=18,
                      dynamo=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {n: a.numpy() for n, a in zip(names, args, strict=True)}
    return lambda: sess.run(None, feeds)[0]


def main() -> None:
    args = network_timing_args(__doc__.splitlines()[0], "adafuse,dran,dcfb3d", 5)
    print(f"torch {torch.__version__}, {args.threads} threads\n")
    print("| network | input | eager ms | torch.compile ms (compile s) | compile max diff | ONNX Runtime ms (export s) | ONNX max diff |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for name in args.networks.split(","):
        model, x = eager_model(name), inputs(name)
        with torch.inference_mode():
            ref = model(*x).float().numpy()
            eager = timed(lambda m=model, x=x: m(*x), args.repeat) * 1000
        cells = []
        try:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = compiled(*x).float().numpy()
                first = time.perf_counter() - t0
                ms = timed(lambda c=compiled, x=x: c(*x), args.repeat) * 1000
            cells += [f"{ms:.1f} ({first:.0f})", f"{np.abs(out - ref).max():.1e}"]
        except Exception as exc:  # noqa: BLE001 - report what fails, measure the rest
            cells += [f"failed: {type(exc).__name__}", "-"]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run = onnx_session(model, x, Path(tmp) / f"{name}.onnx")
                export = time.perf_counter() - t0
                out = run()
                ms = timed(run, args.repeat) * 1000
            cells += [f"{ms:.1f} ({export:.0f})", f"{np.abs(out - ref).max():.1e}"]
        except Exception as exc:  # noqa: BLE001
            cells += [f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:80]}", "-"]
        shape = "x".join(map(str, x[0].shape))
        print(f"| {name} | {shape} | {eager:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
