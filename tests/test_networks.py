"""The shipped networks: fuse real pairs and volumes, weights checked at load, CUDA when present."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import EXAMPLES, shared_path
from PIL import Image

from medfuse_cli.fusion import NETWORKS, VOLUME_NETWORKS, model_name
from medfuse_cli.models import infer, weights
from medfuse_cli.models.infer import fuse_stack, load_model


def _shipped(network: str, task: str = "mri-ct"):
    name = model_name(network, task)
    if not weights.card_path(name).is_file():
        pytest.skip(f"weights/{name}.json not installed")
    return weights.card_path(name)


SLICE_NETWORKS = [n for n in NETWORKS if n not in VOLUME_NETWORKS]


@pytest.mark.parametrize("network", SLICE_NETWORKS)
def test_fuse_a_real_colour_pair_and_a_volume(network, tmp_path, cli):
    card = json.loads(_shipped(network, "mri-spect").read_text())
    folder = shared_path("harvard", "mri-spect")
    out = tmp_path / "f.png"
    res = cli("fuse", folder / "03008_mri.png", folder / "03008_spect.png", "-o", out, "--method", network,
              "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["method"] == network
    assert report["model"] == {"name": card["name"], "task": "mri-spect", "sha256": card["sha256"]}
    assert report["device"].startswith("cpu, ") and report["device"].endswith(("thread", "threads"))
    assert report["libraries"]["torch"] == torch.__version__
    assert report["metrics"]["values"]["SSIM_worst"] > 0.5
    # a volume, slice by slice, in FIXED's geometry
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    vol = tmp_path / "v.nii.gz"
    res = cli("fuse", t1, pet, "-o", vol, "--method", network, "--no-metrics")
    assert res.exit_code == 0, res.stderr
    # 91x109 slices: AdaFuse batches 8 of them per forward on the CPU, DRAN one (models.infer.slice_batch)
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["slices_per_forward"] == (8 if network == "adafuse" else 1)
    assert report["memory"]["batch"] == report["slices_per_forward"]  # the memory plan budgets what runs
    np.testing.assert_array_equal(nib.load(vol).affine, nib.load(t1).affine)
    assert nib.load(vol).shape == nib.load(t1).shape


def test_auto_picks_adafuse_for_2d(tmp_path, cli):
    _shipped("adafuse")
    folder = shared_path("harvard", "mri-pet")
    res = cli("fuse", folder / "25015_mri.png", folder / "25015_pet.png", "-o", tmp_path / "a.png", "--method", "auto",
              "--no-metrics")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "a.json").read_text())["method"] == "adafuse (from auto)"


def test_the_mri_goes_first_whichever_input_gives_the_grid(tmp_path, cli):
    """A CT given as FIXED and its MRI as MOVING: the network still takes the MRI as its first input,
    so the fused slice is the one of the usual order, on the CT's grid."""
    _shipped("adafuse")
    folder = shared_path("harvard", "mri-ct")
    mri, ct = folder / "02004_mri.png", folder / "02004_ct.png"
    for name, pair in (("usual", (mri, ct)), ("swapped", (ct, mri))):
        res = cli("fuse", *pair, "-o", tmp_path / f"{name}.png", "--method", "adafuse", "--no-metrics")
        assert res.exit_code == 0, res.stderr
    with Image.open(tmp_path / "usual.png") as u, Image.open(tmp_path / "swapped.png") as s:
        np.testing.assert_array_equal(np.asarray(u), np.asarray(s))
    assert [json.loads((tmp_path / f"{n}.json").read_text())["mri_input"] for n in ("usual", "swapped")] == \
        ["FIXED", "MOVING"]


def test_each_step_and_every_batch_of_slices_is_reported(tmp_path):
    """fuse_pair tells its stage callback each step in order, and a network's progress through the
    slices (the CLI draws these as a spinner and a bar)."""
    from medfuse_cli.pipeline import FuseOptions, fuse_pair

    _shipped("adafuse")
    heard = []
    fuse_pair(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz",
              tmp_path / "f.nii.gz", FuseOptions(method="adafuse"), stage=lambda *args: heard.append(args))
    steps = [h[0] for h in heard if len(h) == 1]
    assert steps == ["reading", "registering", "resampling and normalising", "fusing (adafuse)", "scoring", "writing"]
    counts = [h[1:] for h in heard if len(h) == 3]
    assert counts[-1] == (91, 91) and all(d == min(8 * k, 91) for k, (d, _) in enumerate(counts, 1))


def test_pairs_no_network_learnt_get_a_rule_from_auto_and_a_warning_otherwise(tmp_path, cli):
    """Without an MRI on one side (here the SPM T1 declared a CT, with the PET), auto picks the
    laplacian rule; asking for a network fuses with a warning."""
    _shipped("adafuse")
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    for method, expected, first in (("auto", "laplacian (from auto)", None), ("adafuse", "adafuse", "FIXED")):
        out = tmp_path / f"{method}.nii.gz"
        res = cli("fuse", t1, pet, "-o", out, "--method", method, "--fixed-modality", "CT", "--no-metrics")
        assert res.exit_code == 0, res.stderr
        report = json.loads((tmp_path / f"{method}.json").read_text())
        assert report["method"] == expected and report["mri_input"] == first
        warned = [w for w in report["warnings"] if "trained on MRI with CT, PET or SPECT" in w]
        assert len(warned) == (method == "adafuse"), report["warnings"]


@pytest.mark.parametrize("network", NETWORKS)
def test_tampered_shipped_weights_are_refused(network, tmp_path, cli, monkeypatch):
    shipped = _shipped(network)
    card = json.loads(shipped.read_text())
    shutil.copy(shipped, tmp_path / shipped.name)
    raw = bytearray((shipped.parent / card["weights"]).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / card["weights"]).write_bytes(bytes(raw))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    infer.load_model.cache_clear()
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    res = cli("fuse", t1, pet, "-o", tmp_path / "x.nii.gz", "--method", network, "--transform", "none")
    infer.load_model.cache_clear()
    assert res.exit_code == 8 and "sha256" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_per_task_model_is_preferred(tmp_path, monkeypatch):
    shipped = _shipped("adafuse")
    card = json.loads(shipped.read_text())
    shutil.copy(shipped.parent / card["weights"], tmp_path / card["weights"])
    (tmp_path / "adafuse-mri-pet.json").write_text(json.dumps({**card, "name": "adafuse-mri-pet"}))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    assert model_name("adafuse", "mri-pet") == "adafuse-mri-pet"
    assert model_name("adafuse", "mri-ct") == "adafuse"  # no adafuse.json here: the fallback name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("network", SLICE_NETWORKS)
def test_cuda_matches_cpu(network):
    _shipped(network)
    model = load_model(model_name(network, "mri-ct"), "cpu")
    a, b = np.random.default_rng(1).random((2, 2, 96, 96), dtype=np.float32)
    cpu = fuse_stack(model, a, b, "mri-ct")
    gpu = fuse_stack(load_model(model_name(network, "mri-ct"), "cuda"), a, b, "mri-ct", device=torch.device("cuda"))
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)  # float16 mixed precision on CUDA


def test_gpu_out_of_memory_falls_back_to_smaller_sizes_then_the_cpu(caplog):
    calls = []

    def run(device, size):
        calls.append((device.type, size))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return size

    assert infer.on_gpu_memory_error(run, torch.device("cuda"), [96, 48, 8]) == 96
    assert calls == [("cuda", 96), ("cuda", 48), ("cuda", 8), ("cpu", 96)]
    assert "falling back to the CPU" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a CPU run is never retried
        infer.on_gpu_memory_error(lambda d, s: run(torch.device("cuda"), s), torch.device("cpu"), [8])


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "CPU "])
def test_bad_device_names_exit_4(name, tmp_path, cli):
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    res = cli("fuse", t1, pet, "-o", tmp_path / "f.nii.gz", "--device", name)
    assert res.exit_code == 4 and "--device" in res.stderr
    assert not (tmp_path / "f.nii.gz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, cli):
    t1, pet = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"
    res = cli("fuse", t1, pet, "-o", tmp_path / "f.nii.gz", "--method", "adafuse", "--device", "cuda:1",
              "--transform", "none", "--no-metrics")
    assert res.exit_code == 4 and "no CUDA device" in res.stderr
    assert not (tmp_path / "f.nii.gz").exists()


@pytest.mark.parametrize("network", SLICE_NETWORKS)
def test_speed_ups_keep_the_output(network, monkeypatch):
    """Batches of slices, thread counts and channels-last weights change the speed, not the result."""
    from medfuse_cli import read_image
    from medfuse_cli.intensity import window_for

    _shipped(network)
    t1, pet = read_image(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz"), read_image(EXAMPLES / "spm12" / "OldNorm_PET.nii.gz")
    a = window_for(t1).apply(t1.data).transpose(2, 1, 0)[40:46]
    b = window_for(pet).apply(pet.data).transpose(2, 1, 0)[40:46]
    model = load_model(model_name(network, "mri-pet"))
    monkeypatch.setattr(type(model), "cpu_pixels_per_forward", 0)  # batches of 8 on the CPU too
    info: dict = {}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fuse_stack(model, a, b, "mri-pet", batch=1)
        torch.set_num_threads(2)
        batched = fuse_stack(model, a, b, "mri-pet", batch=8, info=info)
    finally:
        torch.set_num_threads(threads)
    assert info["slices_per_forward"] == len(a)
    np.testing.assert_allclose(batched, one, atol=1e-5)
    plain = fuse_stack(load_model(model_name(network, "mri-pet"), channels_last=False), a, b, "mri-pet")
    np.testing.assert_allclose(plain, batched, atol=1e-4)  # channels-last weights


def test_cpu_slice_batches_stay_small_enough_for_the_caches():
    """On the CPU a batch of slices is capped by the network's pixels per forward (larger batches
    ran slower per slice); on a GPU it is not."""
    from medfuse_cli.models.adafuse import AdaFuse
    from medfuse_cli.models.dran import DRAN
    from medfuse_cli.models.infer import slice_batch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    ada, dran = AdaFuse(), DRAN(channels=8)
    assert slice_batch(ada, 96, 112, 8, cpu) == 8  # a 91x109 template slice, padded
    assert slice_batch(ada, 256, 256, 8, cpu) == 2 and slice_batch(ada, 512, 512, 8, cpu) == 1
    assert slice_batch(dran, 96, 112, 8, cpu) == 1 and slice_batch(dran, 256, 256, 8, cpu) == 1
    assert slice_batch(dran, 256, 256, 8, gpu) == slice_batch(ada, 512, 512, 8, gpu) == 8
    assert slice_batch(ada, 96, 112, 2, cpu) == 2  # the memory plan's batch stays the upper bound
    t1 = nib.load(EXAMPLES / "spm12" / "OldNorm_T1.nii.gz").get_fdata(dtype=np.float32)
    a = np.tile(t1[:, :, 40:45].transpose(2, 1, 0) / t1.max(), (1, 3, 3))[:, :256, :256]  # 5 slices of 256x256
    info: dict = {}
    fuse_stack(dran.eval(), a, a, "mri-pet", batch=8, info=info)
    assert info["slices_per_forward"] == 1


def test_auto_says_when_it_picks_cuda(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Simulated GPU")
    with caplog.at_level("WARNING", logger="medfuse_cli"):
        assert str(infer.pick_device("auto")) == "cuda:0"
    assert "using CUDA device 0 (Simulated GPU), float16" in caplog.text
    # the memory plan looks at the device too, silently, and keeps a GPU's batch of 8 for 256x256 slices
    from medfuse_cli.memory import plan

    caplog.clear()
    with caplog.at_level("WARNING", logger="medfuse_cli"):
        assert plan((256, 256, 40), "dran", False, 96, "64G", "auto").batch == 8
    assert "CUDA" not in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(infer.pick_device("auto")) == "cpu"
    assert plan((256, 256, 40), "dran", False, 96, "64G", "auto").batch == 1


@pytest.mark.parametrize("network", SLICE_NETWORKS)
def test_shipped_networks_keep_both_sources_on_val_pairs(network):
    """Target (1) of PEERS.md on every 3rd val pair per modality pair: the worse of SSIM(MRI,F) and
    SSIM(other,F) is, on average, no lower than pixel max's (0.02 slack for the subset). A network
    that copies one source (DRAN with its per-image sfnn rule: CT 0.46 vs 0.66) fails."""
    from medfuse_cli.metrics import ssim
    from medfuse_cli.train import load_split

    pairs = load_split(shared_path("harvard"), "val", "all")
    for task in ("mri-ct", "mri-pet", "mri-spect"):
        subset = [p for p in pairs if p["task"] == task][::3]
        _shipped(network, task)  # skips when not installed
        model = load_model(model_name(network, task))
        worst = {"net": [], "max": []}
        for p in subset:
            a, b = p["a"] * 255.0, p["b"] * 255.0
            fused = fuse_stack(model, p["a"][None], p["b"][None], task)[0] * 255.0
            for key, f in (("net", fused), ("max", np.maximum(a, b))):
                worst[key].append(min(ssim(a, f), ssim(b, f)))
        assert np.mean(worst["net"]) >= np.mean(worst["max"]) - 0.02, (task, np.mean(worst["net"]), np.mean(worst["max"]))
