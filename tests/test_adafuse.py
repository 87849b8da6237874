"""AdaFuse: shapes, determinism, training lowers the loss, exact resume, checked weights, fuse."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import shared_path

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
    common = dict(data=str(data), task="mri-ct", steps=4, batch=2, crop=64, checkpoint_every=2, val_limit=2,
                  threads=1)
    straight = train(TrainConfig(out=str(tmp_path / "a"), name="m", **common))
    # interrupt after step 2 (a checkpoint was just written), then resume to step 4

    def stop(step, parts):
        if step == 2:
            raise KeyboardInterrupt

    cfg = TrainConfig(out=str(tmp_path / "b"), name="m", **common)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=stop)
    assert not (tmp_path / "b" / "m.safetensors").exists()
    resumed = train(cfg, resume=True)
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
    assert asdict(TrainConfig(data="x"))["recipe"] == "medfuse"


@pytest.fixture
def shipped():
    from medfuse_cli.models.weights import card_path

    if not card_path("adafuse").is_file():
        pytest.skip("weights/adafuse.json not installed")
    return card_path("adafuse")


def test_fuse_with_the_shipped_adafuse(shipped, tmp_path, cli):
    import nibabel as nib
    from conftest import EXAMPLES
    from PIL import Image

    folder = shared_path("harvard", "mri-spect")
    out = tmp_path / "f.png"
    res = cli("fuse", folder / "03008_mri.png", folder / "03008_spect.png", "-o", out, "--method", "adafuse",
              "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["method"] == "adafuse"
    assert report["metrics"]["values"]["SSIM_worst"] > 0.5
    # a volume, slice by slice, through --method auto
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    vol = tmp_path / "v.nii.gz"
    res = cli("fuse", t1, pet, "-o", vol, "--method", "auto", "--no-metrics")
    assert res.exit_code == 0, res.stderr
    np.testing.assert_array_equal(nib.load(vol).affine, nib.load(t1).affine)
    assert nib.load(vol).shape == nib.load(t1).shape
    assert "adafuse (from auto)" in json.loads((tmp_path / "v.json").read_text())["method"]


def test_tampered_shipped_weights_are_refused(shipped, tmp_path, cli, monkeypatch):
    import shutil

    from medfuse_cli.models import infer, weights

    card = json.loads(shipped.read_text())
    shutil.copy(shipped, tmp_path / shipped.name)
    raw = bytearray((shipped.parent / card["weights"]).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / card["weights"]).write_bytes(bytes(raw))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    infer.load_model.cache_clear()
    folder = shared_path("harvard", "mri-ct")
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", tmp_path / "x.png", "--method", "adafuse")
    infer.load_model.cache_clear()
    assert res.exit_code == 8 and "sha256" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = AdaFuse().eval()
    a, b = np.random.default_rng(1).random((2, 2, 96, 96), dtype=np.float32)
    cpu = fuse_stack(model, a, b, "mri-ct")
    gpu = fuse_stack(model.to("cuda"), a, b, "mri-ct", device=torch.device("cuda"))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
