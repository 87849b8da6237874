"""DCFB-3D: shapes, sliding-window inference, geometry of the fused volume, training on real patches."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import EXAMPLES, shared_path, straight_and_resumed

from medfuse_cli import volumes
from medfuse_cli.fusion import AUTO_3D
from medfuse_cli.models import weights
from medfuse_cli.models.dcfb3d import DCFB3D, DIRECT_GAIN, warp
from medfuse_cli.models.infer import load_model, sliding_window
from medfuse_cli.models.losses import fusion_loss

T1, PET = EXAMPLES / "spm12" / "OldNorm_T1.nii.gz", EXAMPLES / "spm12" / "OldNorm_PET.nii.gz"


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """The bundled SPM T1 + PET templates, normalised as ``medfuse fuse`` does, (z, y, x)."""
    p = volumes.VolumePair("t1+pet", "mri-pet", T1, PET)
    return volumes.load_pair(p)


def _model(seed: int = 0) -> DCFB3D:
    """A small DCFB-3D with a non-zero head (a fresh one starts as the mean rule)."""
    torch.manual_seed(seed)
    m = DCFB3D(widths=(4, 8, 16), heads=2)
    torch.nn.init.normal_(m.head.weight, std=0.2)
    return m.eval()


def test_a_fresh_model_is_the_mean_rule_and_shapes_hold(pair):
    a, b = (torch.from_numpy(x[20:44, 30:62, 20:52].copy())[None, None] for x in pair)
    m = DCFB3D(widths=(4, 8, 16), heads=2)
    with torch.inference_mode():
        f = m(a, b)
    assert f.shape == a.shape
    torch.testing.assert_close(f, (a + b) / 2)
    with torch.inference_mode():
        g, h = _model()(a, b), _model()(a, b)
    torch.testing.assert_close(g, h, rtol=0, atol=0)  # deterministic
    assert not torch.allclose(g, f)


def test_warp_with_zero_offsets_is_identity_and_shifts_by_whole_voxels():
    x = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    torch.testing.assert_close(warp(x, torch.zeros(1, 3, 4, 5, 6)), x)
    off = torch.zeros(1, 3, 4, 5, 6)
    off[:, 2] = 1.0  # one voxel along x
    torch.testing.assert_close(warp(x, off)[..., :-1], x[..., 1:])


def test_sliding_window_equals_the_whole_volume_where_both_fit(pair):
    m = _model()
    a, b = (x[10:50, 20:68, 16:64] for x in pair)  # 40 x 48 x 48
    with torch.inference_mode():
        whole = m(torch.from_numpy(a.copy())[None, None], torch.from_numpy(b.copy())[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(sliding_window(m, a, b, patch=48), whole)
    # several overlapping windows: close to the whole volume (what the network adds to the mean
    # rule changes by under a tenth; window borders see less context)
    tiled = sliding_window(m, a, b, patch=32, overlap=0.5)
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).mean() < 0.1 * np.abs(whole - (a + b) / 2).mean()
    # every window is reported as it is done, and reporting changes nothing
    heard = []
    np.testing.assert_array_equal(sliding_window(m, a, b, patch=32, overlap=0.5, progress=lambda *d: heard.append(d)),
                                  tiled)
    assert len(heard) > 1 and heard == [(k, len(heard)) for k in range(1, len(heard) + 1)]
    # odd sizes are padded, never cropped
    odd = sliding_window(m, a[:37, :45, :41], b[:37, :45, :41], patch=24, overlap=0.25)
    assert odd.shape == (37, 45, 41) and np.isfinite(odd).all()


def test_bad_window_options_exit_4(tmp_path, cli):
    res = cli("fuse", T1, PET, "-o", tmp_path / "f.nii.gz", "--method", "dcfb3d", "--overlap", "1.0")
    assert res.exit_code == 4 and "--overlap" in res.stderr
    res = cli("fuse", T1, PET, "-o", tmp_path / "f.nii.gz", "--method", "dcfb3d", "--patch", "4")
    assert res.exit_code == 4 and "--patch" in res.stderr
    assert not (tmp_path / "f.nii.gz").exists()


def test_fuse_dcfb3d_keeps_fixed_geometry(tmp_path, cli):
    if not weights.card_path("dcfb3d").is_file():
        pytest.skip("weights/dcfb3d.json not installed")
    out = tmp_path / "f.nii.gz"
    res = cli("fuse", T1, PET, "-o", out, "--method", "dcfb3d", "--transform", "none", "--patch", "48")
    assert res.exit_code == 0, res.stderr
    fixed, fused = nib.load(T1), nib.load(out)
    np.testing.assert_array_equal(fused.affine, fixed.affine)
    assert fused.shape == fixed.shape
    assert fused.header.get_zooms() == fixed.header.get_zooms()
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["model"]["sha256"] == json.loads(weights.card_path("dcfb3d").read_text())["sha256"]
    v = report["metrics"]["values"]
    assert v["SSIM_worst"] > 0.5 and v["Qabf"] > 0.4
    res = cli("fuse", T1, PET, "-o", tmp_path / "g.nii.gz", "--method", "auto", "--transform", "none", "--no-metrics")
    assert json.loads((tmp_path / "g.json").read_text())["method"] == f"{AUTO_3D} (from auto)"


def test_dcfb3d_refuses_2d_slices(tmp_path, cli):
    folder = shared_path("harvard", "mri-ct")
    res = cli("fuse", folder / "02004_mri.png", folder / "02004_ct.png", "-o", tmp_path / "x.png", "--method", "dcfb3d")
    assert res.exit_code == 4 and "volumes" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_training_steps_lower_the_loss_on_real_patches(pair):
    torch.manual_seed(0)
    m = DCFB3D(widths=(4, 8, 16), heads=2)
    a, b = (torch.from_numpy(np.stack([x[30:54, 40:64, 30:54], x[40:64, 50:74, 40:64]]))[:, None] for x in pair)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, _ = fusion_loss(a, b, m(a, b), "balanced")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # 0.85 here; before the loss's Sobel terms went valid-only, a quarter of the fall was the false
    # edge at the crop border, learnt first
    assert losses[-1] < 0.88 * losses[0]


def test_slabs_are_runs_of_neighbouring_train_slices_of_one_case():
    from medfuse_cli.train import load_split

    slices = load_split(shared_path("harvard"), "train", "mri-spect")
    stacks = volumes.slabs(slices, depth=16)
    by_id = {p["id"]: p for p in slices}
    assert stacks and all(s["task"] == "mri-spect" for s in stacks)
    for s in stacks:
        first, last = (int(i) for i in s["id"].split("-")[-2:])
        assert first // 1000 == last // 1000 and last - first + 1 == len(s["a"]) >= 16
        for k, i in enumerate(range(first, last + 1)):  # every slice of the run, in order
            np.testing.assert_array_equal(s["a"][k], by_id[f"{i:05d}"]["a"])
            np.testing.assert_array_equal(s["b"][k], by_id[f"{i:05d}"]["b"])
    assert volumes.slabs(slices, depth=1000) == []
    # group 9 has a gap after slice 30: its run 9-30 is kept, the short rest is not
    assert "mri-spect-09009-09030" in {s["id"] for s in stacks}
    assert sum(len(s["a"]) for s in stacks) < len(slices)


def test_train_resumes_bit_for_bit_and_writes_a_card(tmp_path, monkeypatch):
    root = shared_path("volumes")
    monkeypatch.setattr(volumes, "TRAIN_MRI", ("spm12_mni_2mm/OldNorm_T1",))
    monkeypatch.setattr(volumes, "TRAIN_OTHER", {"spm12_mni_2mm/OldNorm_PET": "mri-pet"})
    monkeypatch.setattr(volumes, "HELD_OUT", (("spm12_mni_2mm/OldNorm_T2", "spm12_mni_2mm/OldNorm_PET", "mri-pet"),))
    common = {"data": str(root), "model": "dcfb3d", "task": "mri-pet", "steps": 4, "batch": 1, "crop": 24, "widths": [4, 8, 16],
              "checkpoint_every": 2, "baselines": False, "threads": 1, "slabs": str(shared_path("harvard")),
              "slab_depth": 16}
    full, resumed = straight_and_resumed(tmp_path, **common)
    assert resumed["sha256"] == full["sha256"]
    # every other step trains on stacks of the Harvard train slices; the card lists them
    assert "mri-pet-41022-41089" in full["data"]["train"] and "OldNorm_T1+OldNorm_PET" in full["data"]["train"]
    assert full["model"] == "dcfb3d" and full["tasks"] == ["mri-pet"]
    assert full["data"]["held_out"] == ["OldNorm_T2+OldNorm_PET"]
    assert set(full["validation"]) == {"OldNorm_T2+OldNorm_PET"}
    assert not [i for i in full["data"]["train"] if i.startswith(("mri-ct", "mri-spect"))]
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "a")
    load_model.cache_clear()
    assert isinstance(load_model("m"), DCFB3D)
    load_model.cache_clear()
    # a fine-tune of an installed model takes the parent's channels when --widths is not given,
    # and may add a direct path and a task embedding
    from medfuse_cli.train import TrainConfig, train

    tuned = train(TrainConfig(**{**common, "widths": [], "slabs": "", "steps": 1, "lr": 0.0, "init": "m",
                                 "out": str(tmp_path / "a"), "name": "t", "direct": 4, "tasks": 3}))
    assert tuned["architecture"]["widths"] == [4, 8, 16] and tuned["fine_tuned_from"]["name"] == "m"
    assert (tuned["architecture"]["direct"], tuned["architecture"]["tasks"]) == (4, 3)
    # a fine-tune of a fine-tune: the card's total is the whole chain's training time
    again = train(TrainConfig(**{**common, "widths": [], "slabs": "", "steps": 1, "lr": 0.0, "init": "t",
                                 "out": str(tmp_path / "ft"), "name": "u", "baselines": False}))
    assert (again["architecture"]["direct"], again["architecture"]["tasks"]) == (4, 3)  # kept from its parent
    chain = full["training_seconds"] + tuned["training_seconds"] + again["training_seconds"]
    assert again["total_training_seconds"] == pytest.approx(chain, abs=0.2)
    # another network's card: one clear error before anything is written
    from medfuse_cli.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="card is for dcfb3d, not adafuse"):
        train(TrainConfig(data=str(root), model="adafuse", init="m", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(pair):
    m = _model()
    a, b = (x[:40, :48, :48] for x in pair)
    cpu = sliding_window(m, a, b, patch=24, overlap=0.5)
    gpu = sliding_window(m.cuda(), a, b, patch=24, overlap=0.5, device=torch.device("cuda"))
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)  # float16 mixed precision on CUDA


def test_official_loss_weights_the_mri_two_to_one(pair):
    a, b = (torch.from_numpy(x[30:62, 40:72, 30:62].copy())[None, None] for x in pair)
    copy_mri, _ = fusion_loss(a, b, a.clone(), "dc2fusion")
    copy_pet, _ = fusion_loss(a, b, b.clone(), "dc2fusion")
    assert copy_mri < copy_pet  # keeping the MRI costs less than keeping the PET
    even_mri, _ = fusion_loss(a, b, a.clone(), "dc2fusion", {"mri": 1.0, "other": 1.0})
    even_pet, _ = fusion_loss(a, b, b.clone(), "dc2fusion", {"mri": 1.0, "other": 1.0})
    assert copy_pet - copy_mri > even_pet - even_mri + 0.1  # the 2 : 1 weighting is what favours the MRI


def test_no_deformable_ablation_has_no_offsets(pair):
    from medfuse_cli.train import build_model

    m = build_model("dcfb3d", {"widths": [4, 8, 16], "deformable": False})
    assert m.config["deformable"] is False and all(b.offset_range == 0 for b in m.blocks)
    for block in m.blocks:  # whatever the offset network says, nothing is warped
        torch.nn.init.normal_(block.offsets[-1].weight, std=1.0)
    a, b = (torch.from_numpy(x[30:62, 40:72, 30:62].copy())[None, None] for x in pair)
    xa = m.enc_a(a)[2]
    xb = m.enc_b(b)[2]
    block = m.blocks[0]
    off = torch.tanh(block.offsets(torch.cat([block.norm_x(xa), block.norm_o(xb)], 1))) * block.offset_range
    assert off.abs().max() == 0


def test_volume_pairs_need_the_shared_layout(tmp_path):
    from medfuse_cli.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="missing"):
        volumes.pairs(tmp_path, "train")
    with pytest.raises(InvalidInputError, match="split"):
        volumes.pairs(tmp_path, "test")


def test_threads_option_sets_torch_threads(pair):
    from medfuse_cli.fusion import fuse

    if not weights.card_path("adafuse").is_file():
        pytest.skip("weights/adafuse.json not installed")
    before = torch.get_num_threads()
    try:
        a, b = (x[40:43].transpose(2, 1, 0) for x in pair)
        info: dict = {}
        fuse("adafuse", a, b, device="cpu", threads=1, info=info)
        assert torch.get_num_threads() == 1 and info["device"] == "cpu, 1 thread"
    finally:
        torch.set_num_threads(before)


def test_bad_widths_is_one_line_exit_2(tmp_path, cli):
    res = cli("train", "--model", "dcfb3d", "--data", tmp_path, "--widths", "12,x,48")
    assert res.exit_code == 2 and "--widths" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [({"model": "adafuse", "crop": 32}, "--slabs is an option of dcfb3d, not adafuse"),
                                            ({"slab_depth": 8}, "at least 16"),
                                            ({"slab_depth": 1000}, "no run of 1000"),
                                            ({"slabs": "/nonexistent"}, "--slabs /nonexistent: not a folder")])
def test_bad_slab_options_are_one_clear_error(extra, message, tmp_path):
    from medfuse_cli.errors import MedfuseError
    from medfuse_cli.train import TrainConfig, train

    cfg = {"data": str(shared_path("volumes")), "model": "dcfb3d", "task": "mri-pet", "steps": 1, "crop": 24,
           "slabs": str(shared_path("harvard")), "out": str(tmp_path / "out"), **extra}
    with pytest.raises(MedfuseError, match=message):
        train(TrainConfig(**cfg))
    assert not (tmp_path / "out").exists()


def test_constrained_loss_is_qabf_above_the_target_floors(pair):
    from medfuse_cli.models.losses import qabf

    a, b = (torch.from_numpy(x[30:62, 40:72, 30:62].copy())[None, None] for x in pair)
    pix_max = torch.maximum(a, b)
    _, copy = fusion_loss(a, b, a.clone(), "constrained")
    assert copy["worst"] > 0.05  # a copy of the MRI loses the PET: the survival floor pulls
    _, at_max = fusion_loss(a, b, pix_max, "constrained", {"worst_margin": 0.0})
    assert at_max["worst"] == 0.0  # pixel max is its own floor
    assert at_max["q"] == pytest.approx(1 - qabf(a, b, pix_max).item(), abs=1e-6)
    # optimising a free image from the mean: the loss falls and Qabf rises
    f = ((a + b) / 2).clone().requires_grad_(True)
    opt = torch.optim.Adam([f], lr=0.01)
    first = None
    for _ in range(15):
        loss, parts = fusion_loss(a, b, f.clamp(0, 1), "constrained")
        first = first or parts
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["loss"] < first["loss"] - 0.02 and parts["q"] < first["q"]


def test_constrained_floors_hold_per_task_not_across_the_batch(pair):
    a, b = (torch.from_numpy(x[30:62, 40:72, 30:62].copy())[None, None] for x in pair)
    mean = (a + b) / 2
    _, copy = fusion_loss(a, b, a.clone(), "constrained")  # the MRI copy's shortfall on its own
    _, at_mean = fusion_loss(a, b, mean, "constrained")
    assert copy["worst"] > 0.05 and at_mean["worst"] == 0.0  # the mean keeps both sources, above the floor
    a2, b2, f2 = torch.cat([a, a]), torch.cat([b, b]), torch.cat([a, mean])
    _, one_task = fusion_loss(a2, b2, f2, "constrained", groups=torch.tensor([0, 0]))
    _, two_tasks = fusion_loss(a2, b2, f2, "constrained", groups=torch.tensor([0, 2]))
    # one task: the mean's surplus pays for the copy's shortfall; two tasks: it cannot
    assert one_task["worst"] < two_tasks["worst"]
    assert two_tasks["worst"] == pytest.approx(copy["worst"] / 2, rel=1e-5)


def test_loss_weight_option_is_checked(tmp_path, cli):
    bad = cli("train", "--model", "dcfb3d", "--data", str(tmp_path), "--recipe", "constrained",
              "--loss-weight", "margin=lots", "--out", str(tmp_path / "w"))
    assert bad.exit_code == 2 and "KEY=NUMBER" in bad.stderr and not (tmp_path / "w").exists()
    no_key = cli("train", "--model", "dcfb3d", "--data", str(tmp_path), "--loss-weight", "=0.1", "--out", str(tmp_path / "w"))
    assert no_key.exit_code == 2 and "KEY=NUMBER" in no_key.stderr
    unknown = cli("train", "--model", "dcfb3d", "--data", str(shared_path("volumes")), "--recipe", "constrained",
                  "--loss-weight", "texture=2", "--out", str(tmp_path / "w"))
    assert unknown.exit_code == 4 and "'texture': recipe constrained has hinge, margin, qabf, worst_margin" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_direct_path_fine_tune_starts_as_its_parent(pair, tmp_path):
    """--direct adds a full-resolution path on the raw sources whose output starts at zero: a
    fine-tune from a parent without it starts exactly as the parent."""
    from safetensors.torch import save_file

    from medfuse_cli.train import _read_parent, _start_from

    parent = _model()
    save_file(parent.state_dict(), str(tmp_path / "p.safetensors"))
    torch.manual_seed(1)
    child = DCFB3D(widths=(4, 8, 16), heads=2, direct=4).eval()
    _start_from(child, _read_parent(str(tmp_path / "p.safetensors"))[0], "p.safetensors")
    a, b = (torch.from_numpy(x[20:44, 30:62, 20:52].copy())[None, None] for x in pair)
    with torch.inference_mode():
        torch.testing.assert_close(child(a, b), parent(a, b), rtol=0, atol=1e-6)
    assert child.config["direct"] == 4 and parent.config["direct"] == 0
    # the path is part of the forward pass: a large weight logit from it makes F follow A alone
    with torch.inference_mode():
        torch.nn.init.zeros_(child.head.weight)
        torch.nn.init.zeros_(child.head.bias)
        child.direct[-1].bias[0] = 30.0
        torch.testing.assert_close(child(a, b), a)
        # and its third output pulls F to pixel max: g = 1 gives max(A, B) whatever w and r are
        child.direct[-1].bias[2] = 1.0 / DIRECT_GAIN
        torch.testing.assert_close(child(a, b), torch.maximum(a, b))


@pytest.mark.parametrize("model, option, owner", [("adafuse", ["--direct", "16"], "dcfb3d"),
                                                  ("dran", ["--task-embedding"], "dcfb3d"),
                                                  ("adafuse", ["--rule", "sfnn"], "dran"),
                                                  ("dcfb3d", ["--channels", "16"], "dran"),
                                                  ("dran", ["--no-frequency"], "adafuse"),
                                                  ("dran", ["--widths", "8,16,32"], "adafuse and dcfb3d")])
def test_an_option_of_another_network_is_refused(model, option, owner, tmp_path, cli):
    """Options that shape one network are refused for the others, not silently ignored."""
    r = cli("train", "--model", model, "--data", str(tmp_path), *option, "--out", str(tmp_path / "w"))
    assert r.exit_code == 4 and f"{option[0]} is an option of {owner}, not {model}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_task_embedding_conditions_the_fusion_and_every_path_passes_the_task(pair):
    """With --task-embedding the task (MRI with CT / PET / SPECT) changes the fusion; sliding windows
    and the trainer's patches carry it, and a model that needs it refuses to guess."""
    from medfuse_cli.models.adafuse import TASKS
    from medfuse_cli.train import TrainConfig, _patch_batch

    torch.manual_seed(0)
    m = DCFB3D(widths=(4, 8, 16), heads=2, tasks=3).eval()
    torch.nn.init.normal_(m.head.weight, std=0.2)
    torch.nn.init.normal_(m.task.weight, std=1.0)
    a, b = (x[20:44, 30:62, 20:52] for x in pair)
    ct, pet = (sliding_window(m, a, b, task=t) for t in ("mri-ct", "mri-pet"))
    assert np.abs(ct - pet).mean() > 1e-3
    with torch.inference_mode():
        direct = m(*(torch.from_numpy(x.copy())[None, None] for x in (a, b)), torch.tensor([TASKS.index("mri-ct")]))
    np.testing.assert_allclose(ct, direct[0, 0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="task"), torch.inference_mode():
        m(torch.from_numpy(a.copy())[None, None], torch.from_numpy(b.copy())[None, None])
    pairs = [{"task": "mri-ct", "a": pair[0], "b": pair[1]}, {"task": "mri-spect", "a": pair[0], "b": pair[1]}]
    cfg = TrainConfig(data=".", model="dcfb3d", batch=8, crop=16)
    _, _, t = _patch_batch(pairs, cfg, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {TASKS.index("mri-ct"), TASKS.index("mri-spect")}


def test_the_vif_loss_pools_a_volume_s_slices_as_the_metric_does(pair):
    """``--loss-weight vif=...`` trains DCFB-3D too: the loss's VIF of a volume is ``medfuse eval``'s."""
    from medfuse_cli import metrics
    from medfuse_cli.models.losses import vif

    a, b = (x[20:52, 30:78, 20:68].copy() for x in pair)
    f = np.maximum(a, b)
    t = lambda x: torch.from_numpy(x)[None, None]
    ref = metrics.compute(a * 255, b * 255, f * 255)
    assert float(vif(t(a), t(f)) + vif(t(b), t(f))) == pytest.approx(ref["VIF"], abs=1e-4)
    _, parts = fusion_loss(t(a), t(b), t((a + b) / 2), "balanced", {"vif": 1.0})
    assert 0.0 < parts["vif"] < 1.0
