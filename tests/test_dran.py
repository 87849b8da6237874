"""DRAN: shapes, fusion rules, determinism, the autoencoder loss falls on real images, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, shared_path, with_file_size_limit

from medfuse_cli.errors import InvalidInputError
from medfuse_cli.models.dran import DRAN, RULES, fuse_features
from medfuse_cli.models.infer import fuse_stack
from medfuse_cli.models.losses import reconstruction_loss
from medfuse_cli.train import TrainConfig, load_split, train


@pytest.mark.parametrize("rule", RULES)
def test_shapes_padding_and_determinism(rule):
    torch.manual_seed(0)
    model = DRAN(channels=8, rule=rule).eval()
    a, b = np.random.default_rng(0).random((2, 3, 51, 64), dtype=np.float32)
    out1 = fuse_stack(model, a, b, "mri-ct", batch=2)
    out2 = fuse_stack(model, a, b, "mri-ct", batch=3)
    assert out1.shape == (3, 51, 64) and out1.dtype == np.float32
    assert out1.min() >= 0 and out1.max() <= 1
    np.testing.assert_allclose(out1, out2, atol=1e-6)


def test_fusion_rules_on_features():
    rng = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(2, 8, 16, 16, generator=rng), torch.randn(2, 8, 16, 16, generator=rng)
    torch.testing.assert_close(fuse_features(fa, fb, "mean"), (fa + fb) / 2)
    # identical encodings fuse to themselves under every rule
    for rule in RULES:
        torch.testing.assert_close(fuse_features(fa, fa, rule), fa)
    # a blank encoding has no energy: the L1 rule keeps the other one
    torch.testing.assert_close(fuse_features(fa, torch.zeros_like(fa), "l1"), fa)
    # sfnn gives one weight per image, the same at every pixel: the result is a blend of fa and fb
    fused = fuse_features(fa, fb, "sfnn")
    w = ((fused - fb) / (fa - fb))[:, 0]
    assert torch.allclose(w, w.flatten(1)[:, :1, None], atol=1e-4)
    assert ((w > 0) & (w < 1)).all()


def test_a_few_steps_lower_the_reconstruction_loss_on_real_images():
    pairs = load_split(shared_path("harvard"), "train", "mri-spect")[:4]
    x = torch.from_numpy(np.stack([p[k][96:160, 96:160] for p in pairs for k in "ab"]))[:, None]
    torch.manual_seed(0)
    model = DRAN(channels=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss, _ = reconstruction_loss(x, model.reconstruct(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


def test_train_dran_writes_a_card_with_its_rule(tmp_path):
    card = train(TrainConfig(data=str(shared_path("harvard")), out=str(tmp_path), name="d", model="dran",
                             task="mri-ct", steps=3, batch=2, crop=64, channels=8, rule="l1", val_limit=2,
                             threads=1, baselines=False))
    assert card["model"] == "dran" and card["architecture"] == {"channels": 8, "rule": "l1"}
    assert card["recipe"]["recipe"] == "recon" and card["tasks"] == ["mri-ct"]
    assert 0 < card["validation"]["mri-ct"]["SSIM"] <= 1
    with pytest.raises(InvalidInputError, match="does not train dran"):
        train(TrainConfig(data=str(shared_path("harvard")), out=str(tmp_path), name="e", model="dran",
                          recipe="medfuse", steps=1))


def test_a_diverged_or_failed_training_leaves_no_weights_without_a_card(tmp_path, monkeypatch):
    """Too high a --lr trained on NaN weights and wrote them, then failed validating them (exit 4
    with a file of NaN weights and no card); now it stops at the first non-finite step, keeping the
    last checkpoint, and a failure after the weights (the card) takes them away."""
    import medfuse_cli.train as train_module

    common = {"data": str(shared_path("harvard")), "out": str(tmp_path), "name": "d", "model": "dran",
              "task": "mri-ct", "steps": 3, "batch": 2, "crop": 64, "channels": 8, "val_limit": 1, "threads": 1,
              "baselines": False, "checkpoint_every": 1}
    with pytest.raises(InvalidInputError, match="training diverged at step .*lower --lr"):
        train(TrainConfig(**{**common, "lr": 1e30}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.checkpoint.safetensors"]
    with pytest.raises(InvalidInputError, match="--lr inf"):
        train(TrainConfig(**{**common, "lr": float("inf")}), overwrite=True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module, "_write_card", full_disk)
    with pytest.raises(OSError):
        train(TrainConfig(**common), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.checkpoint.safetensors"]


def test_a_checkpoint_the_system_refuses_to_write_is_one_line_and_leaves_nothing(tmp_path):
    """A full disk under `train` (here a file size limit, a real write failure): the checkpoint's
    safetensors write was an "unexpected SafetensorError", exit 1; now one line, exit 6, no file."""
    import os

    if not hasattr(os, "fork"):
        pytest.skip("needs POSIX resource limits")
    res = with_file_size_limit(3000, "train", "--model", "dran", "--data", shared_path("harvard"), "--task", "mri-ct",
                               "--steps", "1", "--batch", "2", "--crop", "64", "--channels", "8", "--out", tmp_path / "t")
    assert_one_line_error(res, 6)
    assert res.stderr == f"medfuse: error: cannot write {tmp_path / 't' / 'dran.checkpoint.safetensors'}: File too large\n"
    assert not list((tmp_path / "t").iterdir())


@pytest.mark.parametrize("args, message", [(("--model", "nope"), "unknown model"), (("--rule", "max"), "unknown DRAN rule"),
                                           (("--crop", "40"), "multiple of 16")])
def test_bad_training_options_fail_in_one_line(args, message, tmp_path, cli):
    res = cli("train", "--model", "dran", "--data", shared_path("harvard"), "--out", tmp_path, "--steps", "1", *args)
    assert res.exit_code == 4 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_bad_data_folder_is_named_by_train_s_own_option(tmp_path, cli):
    """train's --data errors named eval's --pairs (and a --split train never given)."""
    from conftest import assert_one_line_error

    res = cli("train", "--model", "dran", "--data", tmp_path / "missing", "--out", tmp_path, "--steps", "1")
    assert_one_line_error(res, 3)
    assert "--data" in res.stderr and "--pairs" not in res.stderr
    (tmp_path / "pairs").mkdir()
    res = cli("train", "--model", "dran", "--data", tmp_path / "pairs", "--out", tmp_path, "--steps", "1")
    assert_one_line_error(res, 3)
    assert "splits.csv not found: the 'train' split needs it" in res.stderr and "--split" not in res.stderr


def test_fusion_aware_steps_lower_the_fusion_loss_through_the_sfnn_rule():
    """recipe recon-fuse: the fusion loss of the sfnn-fused pair falls; gradients pass the rule."""
    from medfuse_cli.train import dran_loss

    pairs = load_split(shared_path("harvard"), "train", "mri-ct")[:4]
    a = torch.from_numpy(np.stack([p["a"][96:160, 96:160] for p in pairs]))[:, None]
    b = torch.from_numpy(np.stack([p["b"][96:160, 96:160] for p in pairs]))[:, None]
    torch.manual_seed(0)
    model = DRAN(channels=8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss, parts = dran_loss(model, a, b, "recon-fuse")
        opt.zero_grad()
        loss.backward()
        assert model.encoder.stem.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(parts["fuse"])
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
    _, plain = dran_loss(model, a, b, "recon")
    assert "fuse" not in plain
    # recon-fuse-vif adds 1 - mean VIF (sources' VIF summed, halved) to the fusion loss
    from medfuse_cli.models.losses import vif

    _, with_vif = dran_loss(model, a, b, "recon-fuse-vif")
    with torch.no_grad():
        f = model(a, b)
        expected = 1 - float((vif(a, f) + vif(b, f)).mean()) / 2
    assert with_vif["vif"] == pytest.approx(expected, rel=1e-5)
    _, without = dran_loss(model, a, b, "recon-fuse")
    assert with_vif["fuse"] == pytest.approx(without["fuse"] + expected, rel=1e-5)


def test_the_rule_defaults_to_l1_and_a_fine_tune_keeps_its_parent_s(tmp_path, monkeypatch):
    """Without --rule a fresh DRAN gets the shipped card's l1 rule and a fine-tune its parent's rule."""
    common = {"data": str(shared_path("harvard")), "out": str(tmp_path), "model": "dran", "task": "mri-ct",
              "steps": 1, "batch": 2, "crop": 64, "channels": 8, "val_limit": 1, "threads": 1, "baselines": False}
    assert train(TrainConfig(name="fresh", **common))["architecture"]["rule"] == "l1"
    assert train(TrainConfig(name="paper", rule="sfnn", **common))["architecture"]["rule"] == "sfnn"
    monkeypatch.setattr("medfuse_cli.models.weights.WEIGHTS_DIR", tmp_path)
    child = train(TrainConfig(name="child", init="paper", **common))
    assert child["architecture"]["rule"] == "sfnn" and child["fine_tuned_from"]["name"] == "paper"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's ONNX exporter, about its own internals
def test_the_l1_rule_exports_to_onnx_without_nan_in_the_background(tmp_path):
    """Where both encodings are zero (background) the L1 rule weighs them equally; the exported
    graph (torch's ONNX exporter, run by ONNX Runtime when installed) gives the eager output."""
    zeros = torch.zeros(1, 4, 8, 8)
    torch.testing.assert_close(fuse_features(zeros, zeros, "l1"), zeros)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pair = load_split(shared_path("harvard"), "val", "mri-ct")[0]
    a, b = (torch.from_numpy(pair[k][64:128, 64:128].copy())[None, None] for k in "ab")
    a[..., :16, :] = b[..., :16, :] = 0  # a band of background
    torch.manual_seed(0)
    model = DRAN(channels=8, rule="l1").eval()
    with torch.no_grad():
        ref = model(a, b).numpy()
    torch.onnx.export(model, (a, b), str(tmp_path / "dran.onnx"), input_names=["a", "b"], opset_version=18,
                      dynamo=True)
    out = ort.InferenceSession(str(tmp_path / "dran.onnx")).run(None, {"a": a.numpy(), "b": b.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_a_large_slice_in_strips_gives_the_same_fusion(monkeypatch):
    """At inference DRAN encodes and decodes a slice larger than ``STRIP_PIXELS`` in strips of rows with
    ``HALO`` rows of context (a 4096x4096 slice peaked at 18.9 GiB whole, 11.3 GiB in strips): the
    fused slice is the same as the whole slice's, here a real Harvard pair cut into 32-row strips."""
    from PIL import Image as PILImage

    from medfuse_cli.models import dran
    from medfuse_cli.models.infer import load_model

    folder = shared_path("harvard", "mri-pet")
    a, b = (torch.from_numpy(np.asarray(PILImage.open(folder / f"25015_{k}.png").convert("L"), np.float32)[None, None] / 255)
            for k in ("mri", "pet"))
    model = load_model("dran")
    with torch.inference_mode():
        whole = model(a, b)
        monkeypatch.setattr(dran, "STRIP_PIXELS", 32 * 256)
        heights = []
        hook = model.encoder.register_forward_hook(lambda module, args, out: heights.append(args[0].shape[-2]))
        strips = model(a, b)
        hook.remove()
        assert len(heights) == 16 and max(heights) == 32 + 2 * dran.HALO  # 8 strips of each input, with context
        assert dran.in_strips(model.encoder, a).shape == model.encoder(a).shape
    np.testing.assert_allclose(strips.numpy(), whole.numpy(), atol=1e-6)
    assert float(whole.std()) > 0.05
