"""AdaFuse: shapes, determinism, training lowers the loss, exact resume, checked weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path, straight_and_resumed

from medfuse_cli.models.adafuse import AdaFuse
from medfuse_cli.models.infer import fuse_stack
from medfuse_cli.models.losses import fusion_loss
from medfuse_cli.models.weights import WeightsError, load_checked
from medfuse_cli.train import TrainConfig, load_split, train


def test_shapes_padding_and_determinism():
    torch.manual_seed(0)
    model = AdaFuse().eval()
    a, b = np.random.default_rng(0).random((2, 3, 100, 120), dtype=np.float32)
    out1 = fuse_stack(model, a, b, "mri-pet", batch=2)
    out2 = fuse_stack(model, a, b, "mri-pet", batch=3)
    assert out1.shape == (3, 100, 120) and out1.dtype == np.float32
    np.testing.assert_array_equal(out1, out2)
    # an untrained model is the mean rule (zero-initialised head)
    np.testing.assert_allclose(out1, (a + b) / 2, atol=1e-6)


def test_a_few_training_steps_lower_the_loss_on_real_pairs():
    pairs = load_split(shared_path("harvard"), "train", "mri-pet")[:4]
    a = torch.from_numpy(np.stack([p["a"][64:128, 64:128] for p in pairs]))[:, None]
    b = torch.from_numpy(np.stack([p["b"][64:128, 64:128] for p in pairs]))[:, None]
    t = torch.ones(4, dtype=torch.long)
    torch.manual_seed(0)
    model = AdaFuse()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, _ = fusion_loss(a, b, model(a, b, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < losses[0] - 0.02, losses


def test_resume_continues_exactly_and_weights_are_checked(tmp_path):
    data = shared_path("harvard")
    common = {"data": str(data), "task": "mri-ct", "steps": 4, "batch": 2, "crop": 64, "checkpoint_every": 2, "val_limit": 2,
                  "threads": 1}
    straight, resumed = straight_and_resumed(tmp_path, **common)
    sa, _ = load_checked("m", tmp_path / "a")
    sb, _ = load_checked("m", tmp_path / "b")
    assert straight["parameters"] == resumed["parameters"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    # the card's sha256 guards the file
    weights = tmp_path / "a" / "m.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="sha256"):
        load_checked("m", tmp_path / "a")
    assert straight["recipe"]["recipe"] == "balanced"
    # resuming with other options, or from a damaged checkpoint, is refused (was an internal error
    # loading the state dict, or a silent change of task half-way)
    from medfuse_cli.errors import InvalidInputError

    ckpt = tmp_path / "b" / "m.checkpoint.safetensors"
    for change, why in (({"task": "mri-pet"}, "task 'mri-ct', now 'mri-pet'"), ({"model": "dran"}, "model 'adafuse', now 'dran'")):
        with pytest.raises(InvalidInputError, match=why):
            train(TrainConfig(out=str(tmp_path / "b"), name="m", **{**common, **change}), resume=True, overwrite=True)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(InvalidInputError, match="not a readable checkpoint"):
        train(TrainConfig(out=str(tmp_path / "b"), name="m", **common), resume=True, overwrite=True)


def test_fine_tune_starts_from_given_weights_and_records_them(tmp_path):
    from medfuse_cli.errors import InvalidInputError, OutputError
    from medfuse_cli.models.weights import sha256

    common = {"data": str(shared_path("harvard")), "task": "mri-pet", "batch": 2, "crop": 64, "val_limit": 1, "threads": 1,
                  "baselines": False}
    base = train(TrainConfig(out=str(tmp_path / "base"), name="m", steps=2, **common))
    parent = tmp_path / "base" / "m.safetensors"
    # zero learning rate: the fine-tune's output is its starting point, bit for bit
    tuned = train(TrainConfig(out=str(tmp_path / "ft"), name="m", steps=1, lr=0.0, init=str(parent), **common))
    st_parent, _ = load_checked("m", tmp_path / "base")
    st_tuned, _ = load_checked("m", tmp_path / "ft")
    for k in st_parent:
        torch.testing.assert_close(st_tuned[k], st_parent[k], rtol=0, atol=0)
    assert tuned["fine_tuned_from"] == {"weights": "m.safetensors", "sha256": sha256(parent)}
    assert base["fine_tuned_from"] is None
    # weights of another network, or a damaged file: one clear error, nothing written
    with pytest.raises(InvalidInputError, match="do not fit"):
        train(TrainConfig(out=str(tmp_path / "x"), name="d", model="dran", steps=1, init=str(parent), **common))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(parent.read_bytes()[:100])
    with pytest.raises(InvalidInputError, match="not a readable safetensors"):
        train(TrainConfig(out=str(tmp_path / "y"), name="m", steps=1, init=str(bad), **common))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a model of that name in --out (e.g. the shipped weights) is kept unless --overwrite
    before = parent.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        train(TrainConfig(out=str(tmp_path / "base"), name="m", steps=1, **common))
    assert parent.read_bytes() == before
    again = train(TrainConfig(out=str(tmp_path / "base"), name="m", steps=1, lr=0.0, **common), overwrite=True)
    assert again["sha256"] == sha256(parent) and parent.read_bytes() != before


def test_survival_term_is_zero_for_pixel_max_and_high_for_a_copy():
    pair = load_split(shared_path("harvard"), "val", "mri-spect")[0]
    a = torch.from_numpy(pair["a"])[None, None]
    b = torch.from_numpy(pair["b"])[None, None]
    weights = {"margin": 0.0}
    _, at_max = fusion_loss(a, b, torch.maximum(a, b), "balanced", weights)
    _, copy = fusion_loss(a, b, a.clone(), "balanced", weights)
    assert at_max["surv"] == pytest.approx(0.0, abs=1e-6)
    assert copy["surv"] > 0.2  # the SPECT is lost in a copy of the MRI


def test_a_gated_fine_tune_starts_as_its_ungated_parent(tmp_path):
    """--gate adds a zero-initialised weight map: F = w A + (1 - w) B + h with w = 1/2 at the start."""
    from safetensors.torch import save_file

    from medfuse_cli.train import _read_parent, _start_from

    torch.manual_seed(0)
    parent = AdaFuse(widths=(8, 8, 8, 8))
    torch.nn.init.normal_(parent.head.weight, std=0.05)  # a parent that is not the mean rule
    save_file(parent.state_dict(), str(tmp_path / "p.safetensors"))
    child = AdaFuse(widths=(8, 8, 8, 8), gate=True)
    _start_from(child, _read_parent(str(tmp_path / "p.safetensors"))[0], "p.safetensors")
    a, b = torch.rand(2, 2, 1, 32, 32)
    t = torch.tensor([0, 2])
    with torch.inference_mode():
        torch.testing.assert_close(child(a, b, t), parent.eval()(a, b, t), rtol=0, atol=1e-6)
        # the gate decides between the sources: a large logit gives A, a small one B (head at zero)
        torch.nn.init.zeros_(child.head.weight)
        torch.nn.init.constant_(child.gate.bias, 30.0)
        torch.testing.assert_close(child(a, b, t), a)
        torch.nn.init.constant_(child.gate.bias, -30.0)
        torch.testing.assert_close(child(a, b, t), b)
    assert child.config["gate"] is True and parent.config["gate"] is False


def test_differentiable_losses_agree_with_the_eval_metrics_on_real_pairs():
    """The loss's SSIM, Qabf and VIF are the metrics of ``medfuse eval`` (up to their hard cases)."""
    from medfuse_cli import metrics
    from medfuse_cli.models.losses import qabf, ssim, vif

    for p in load_split(shared_path("harvard"), "val", "mri-spect")[:2]:
        a, b = p["a"], p["b"]
        f = np.maximum(a, b)
        t = lambda x: torch.from_numpy(x)[None, None]
        ref = metrics.compute(a * 255, b * 255, f * 255)
        assert float(vif(t(a), t(f)) + vif(t(b), t(f))) == pytest.approx(ref["VIF"], abs=1e-4)
        assert float(qabf(t(a), t(b), t(f))) == pytest.approx(ref["Qabf"], abs=2e-3)
        assert float(ssim(t(a), t(f)) + ssim(t(b), t(f))) / 2 == pytest.approx(ref["SSIM"], abs=1e-3)
        f_t = t(f).requires_grad_()
        vif(t(a), f_t).sum().backward()
        assert torch.isfinite(f_t.grad).all() and f_t.grad.abs().sum() > 0


def test_the_loss_sees_a_crop_s_edges_as_the_whole_image_has_them():
    """A crop has no false edge at its border: its Sobel responses are the whole image's, cut out
    (with zero padding, the ring around a 48^3 patch carried 40% of Qabf's edge weight)."""
    from medfuse_cli.models.losses import sobel

    p = load_split(shared_path("harvard"), "val", "mri-pet")[0]
    whole = torch.from_numpy(p["a"])[None, None]
    crop = whole[..., 100:164, 90:154]  # inside the head: the crop's border cuts through tissue
    assert crop.std() > 0.05
    for part, full in zip(sobel(crop), sobel(whole)):
        torch.testing.assert_close(part, full[..., 100:162, 90:152])
    flat = torch.full((1, 1, 8, 16, 16), 0.6)
    assert all(s.abs().max() == 0 for s in sobel(flat))  # volumes: every axial slice, no border ring


@pytest.mark.parametrize("args, lr", [((), 1e-3), (("--init", "adafuse"), 3e-4), (("--init", "adafuse", "--lr", "1e-2"), 1e-2)])
def test_train_learning_rate_defaults_lower_for_a_fine_tune(args, lr, cli, monkeypatch, tmp_path):
    import medfuse_cli.train as train_module

    seen = []

    def fake_train(cfg, resume=False, progress=None, overwrite=False):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", fake_train)
    res = cli("train", "--model", "adafuse", "--data", tmp_path, "--out", tmp_path / "w", *args)
    assert res.exit_code == 130 and seen[0].lr == lr
