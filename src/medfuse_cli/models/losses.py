"""Training losses for the fusion networks (torch, images in [0, 1]).

``fusion_loss`` keeps both sources and their edges:

- SSIM to each source (Gaussian 11 / 1.5, as the metric) and, weighted apart, the *worse* of the
  two, so the network cannot win by copying the source with more structure (PEERS.md: losses
  built from the metrics alone learned to copy the MRI);
- a texture term: Sobel magnitude of F close to the larger of the sources' magnitudes (keeps the
  strongest edge of either source, what pixel max does well on Qabf);
- an intensity term: F close to max(A, B) (keeps bright PET/SPECT uptake and bone);
- 1 - a differentiable Qabf (Xydeas-Petrovic with the standard constants);
- survival: a hinge that asks each source to survive in F (SSIM) at least as well as it survives
  in pixel max, plus a margin (target (1) of PEERS.md as a per-crop training constraint).

The AdaFuse successor's recipe (L2 to the mean image, structure tensor, SSIM to each source;
METHODS.md A.1.3) is available as ``recipe="asfe"`` for the ablation (2D only); DCFB-3D's official
loss (local NCC + SSIM + L1 to each source, MRI weighted 2 : 1; A.2.3) as ``recipe="dc2fusion"``.

Every term works on 2D batches (N, 1, H, W) and on volumes (N, 1, D, H, W): SSIM and LNCC with 3D
windows, the Sobel terms and Qabf on the axial slices (as ``medfuse eval`` scores volumes).

``RECIPES`` holds the weights of the terms. ``medfuse`` (no survival term) trained the first
shipped model; with it validation Qabf kept rising after step 1000 while SSIM to the SPECT fell
below pixel max's, the MRI's edges winning over the other source's content. ``balanced`` adds the
survival term (x10, margin 0.02) and weighs mean SSIM x2 and Qabf x3; it fine-tuned the shipped model.
``constrained`` (:func:`constrained_loss`) maximises Qabf alone, with the targets of PEERS.md as
hinges on each task's crops in the batch (the objective of ``benchmarks/feasibility.py``, learned).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
_SOBEL_Y = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])


def _gauss(device: torch.device) -> torch.Tensor:
    ax = torch.arange(11, dtype=torch.float32, device=device) - 5
    g = torch.exp(-(ax**2) / (2 * 1.5**2))
    return g / g.sum()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Valid Gaussian filtering (11 taps, sigma 1.5) along every spatial axis of (N, 1, ...)."""
    g = _gauss(x.device)
    nd = x.ndim - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    for axis in range(nd):
        shape = [1, 1] + [11 if i == axis else 1 for i in range(nd)]
        x = conv(x, g.view(shape))
    return x


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image (N,) of (N, 1, H, W) or (N, 1, D, H, W), Gaussian 11 / 1.5 (a 3D window for
    volumes, as the metric), valid region, data range 1."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _blur(x), _blur(y)
    vx = _blur(x * x) - mx * mx
    vy = _blur(y * y) - my * my
    cxy = _blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def slices(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, D, H, W) volumes as (N * D, 1, H, W) axial slices; 2D batches unchanged."""
    return x if x.ndim == 4 else x.transpose(1, 2).reshape(-1, 1, *x.shape[-2:])


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-plane Sobel responses (of every axial slice for volumes), valid region only.

    Zero padding (as the metric pads whole images, whose border is background) would put a false
    edge around every training crop, whose border lies inside the body: on 48^3 patches that ring
    carried 40% of Qabf's edge weight, on 64^2 crops 20%, on 128^2 crops 9%."""
    x = slices(x)
    kx = _SOBEL_X.to(x)[None, None]
    ky = _SOBEL_Y.to(x)[None, None]
    return F.conv2d(x, kx), F.conv2d(x, ky)


def qabf(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable Qabf per image (N,) on [0, 1] images (edge angles via atan of Sy/Sx); volumes
    pool their axial slices, as the metric does."""

    def edges(x):
        sx, sy = sobel(x)
        g = torch.sqrt(sx * sx + sy * sy + eps)
        sx_safe = torch.where(sx.abs() < eps, torch.full_like(sx, eps), sx)
        return g, torch.atan(sy / sx_safe)

    (ga, aa), (gb, ab), (gf, af) = edges(a), edges(b), edges(f)

    def keep(gs, as_):
        ratio = torch.minimum(gs, gf) / torch.maximum(gs, gf)
        orient = 1 - (as_ - af).abs() / (math.pi / 2)
        return 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5))) * 0.9879 / (1 + torch.exp(-22 * (orient - 0.8)))

    n = a.shape[0]
    num = (keep(ga, aa) * ga + keep(gb, ab) * gb).reshape(n, -1).sum(1)
    return num / (ga + gb).reshape(n, -1).sum(1)


def vif(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Pixel-domain VIF per image (N,) of (N, 1, H, W) in [0, 1], differentiable: the conventions of
    :func:`medfuse_cli.metrics.vif` (0..255 scale, 4 scales, Gaussian n = 2^(5-s)+1, sigma n/5,
    valid filtering, sigma_n^2 = 2), with its hard cases (flat or anti-correlated windows) as
    smooth clamps. Volumes (N, 1, D, H, W) pool the terms of their axial slices, as the metric does."""
    sigma_n2, eps = 2.0, 1e-10
    volumes = ref.shape[0] if ref.ndim == 5 else 0
    ref, dist = slices(ref) * 255.0, slices(dist) * 255.0
    num = den = ref.new_zeros(ref.shape[0])
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        ax = torch.arange(n, dtype=ref.dtype, device=ref.device) - (n - 1) / 2
        g = torch.exp(-(ax**2) / (2 * (n / 5.0) ** 2))
        g = g / g.sum()
        blur = lambda z, g=g, n=n: F.conv2d(F.conv2d(z, g.view(1, 1, n, 1)), g.view(1, 1, 1, n))
        if scale > 1:
            ref, dist = blur(ref)[..., ::2, ::2], blur(dist)[..., ::2, ::2]
        if min(ref.shape[-2:]) < n:
            break
        mu1, mu2 = blur(ref), blur(dist)
        s1 = (blur(ref * ref) - mu1 * mu1).clamp_min(0)
        s2 = (blur(dist * dist) - mu2 * mu2).clamp_min(0)
        s12 = blur(ref * dist) - mu1 * mu2
        gain = (s12 / (s1 + eps)).clamp_min(0)
        sv = (s2 - gain * s12).clamp_min(eps)
        num = num + torch.log10(1 + gain * gain * s1 / (sv + sigma_n2)).flatten(1).sum(1)
        den = den + torch.log10(1 + s1 / sigma_n2).flatten(1).sum(1)
    if volumes:
        num, den = num.reshape(volumes, -1).sum(1), den.reshape(volumes, -1).sum(1)
    return num / den.clamp_min(eps)


def lncc(x: torch.Tensor, y: torch.Tensor, size: int = 3, eps: float = 1e-5) -> torch.Tensor:
    """Local normalised cross-correlation (squared, box windows of ``size``), mean per image (N,)."""
    nd = x.ndim - 2
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    mean = lambda t: pool(t, size, stride=1, padding=size // 2, count_include_pad=False)
    mx, my = mean(x), mean(y)
    cross = mean(x * y) - mx * my
    vx, vy = mean(x * x) - mx * mx, mean(y * y) - my * my
    return (cross * cross / (vx * vy + eps)).flatten(1).mean(1)


RECIPES: dict[str, dict[str, float]] = {
    "medfuse": {"ssim": 1.0, "worst": 1.0, "texture": 2.0, "intensity": 1.0, "qabf": 1.0, "survive": 0.0,
                "margin": 0.0},
    "balanced": {"ssim": 2.0, "worst": 1.0, "texture": 2.0, "intensity": 1.0, "qabf": 3.0, "survive": 10.0,
                 "margin": 0.02},
    "asfe": {},
    "dc2fusion": {"mri": 2.0, "other": 1.0},
    "constrained": {"qabf": 1.0, "hinge": 20.0, "margin": 0.005, "worst_margin": 0.005},
}


def fusion_loss(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, recipe: str = "medfuse",
                weights: dict[str, float] | None = None,
                groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss and its parts (for the progress bar); ``weights`` override the recipe's;
    ``groups`` (N,) the task of each crop (``constrained`` holds its floors per task)."""
    if recipe == "dc2fusion":  # METHODS.md A.2.3: LNCC + SSIM + L1 to each source, MRI weighted 2 : 1
        w = {**RECIPES[recipe], **(weights or {})}
        terms = [(1 - lncc(f, s)) + (1 - ssim(f, s)) + (f - s).abs().flatten(1).mean(1) for s in (a, b)]
        loss = (w["mri"] * terms[0] + w["other"] * terms[1]).mean()
        return loss, {"loss": loss.item(), "mri": terms[0].mean().item(), "other": terms[1].mean().item()}
    if recipe == "asfe":
        content = torch.linalg.vector_norm(f - (a + b) / 2, dim=(1, 2, 3)).mean()

        def tensor(x):
            dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
            dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
            return torch.stack([dx * dx, dx * dy, dy * dy]).sum(2)

        struct = torch.linalg.vector_norm(tensor(f) - tensor(torch.cat([a, b], 1)), dim=(0, 2, 3)).mean()
        s = (2 - ssim(f, a) - ssim(f, b)).mean()
        loss = 0.5 * content + 0.5 * torch.log1p(struct) + s
        return loss, {"loss": loss.item(), "ssim": s.item()}
    if recipe == "constrained":
        return constrained_loss(a, b, f, {**RECIPES[recipe], **(weights or {})}, groups)
    sa, sb = ssim(f, a), ssim(f, b)
    ssim_term = (2 - sa - sb).mean() / 2
    worst = torch.maximum(1 - sa, 1 - sb).mean()
    gfx, gfy = sobel(f)
    gax, gay = sobel(a)
    gbx, gby = sobel(b)
    mag = lambda x, y: torch.sqrt(x * x + y * y + 1e-6)
    texture = (mag(gfx, gfy) - torch.maximum(mag(gax, gay), mag(gbx, gby))).abs().mean()
    intensity = (f - torch.maximum(a, b)).abs().mean()
    q = 1 - qabf(a, b, f).mean()
    # each source kept at least as well as pixel max keeps it (target (1) of PEERS.md, per crop)
    w = {**RECIPES[recipe], **(weights or {})}
    pix_max = torch.maximum(a, b)
    survive = (F.relu(ssim(pix_max, a) + w["margin"] - sa) + F.relu(ssim(pix_max, b) + w["margin"] - sb)).mean()
    loss = (w["ssim"] * ssim_term + w["worst"] * worst + w["texture"] * texture + w["intensity"] * intensity
            + w["qabf"] * q + w["survive"] * survive)
    parts = {"loss": loss.item(), "ssim": ssim_term.item(), "worst": worst.item(), "tex": texture.item(),
             "int": intensity.item(), "q": q.item(), "surv": survive.item()}
    if w.get("vif"):  # information fidelity to both sources (VIF sums the two; it can pass 1 each)
        v = 1 - (vif(a, f) + vif(b, f)).mean() / 2
        loss = loss + w["vif"] * v
        parts.update(loss=loss.item(), vif=v.item())
    return loss, parts


def constrained_loss(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, w: dict[str, float],
                     groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Qabf under the targets as hinges: the worse source's SSIM at least pixel max's, and mean SSIM
    at least the better of the mean and max rules' (+ ``worst_margin``, + ``margin``). The objective of
    ``benchmarks/feasibility.py``, learned: above the floors only Qabf pulls. The targets are means
    per task over whole images, so the floors hold for the mean of each task's crops in the batch,
    not for every crop (per-crop floors pulled every crop toward the mean rule and cost Qabf on the
    held-out volumes) nor for the whole batch (one task's worse source then paid for another's)."""
    sa, sb = ssim(f, a), ssim(f, b)
    with torch.no_grad():
        pix_max, pix_mean = torch.maximum(a, b), (a + b) / 2
        xa, xb = ssim(pix_max, a), ssim(pix_max, b)
        worst_floor = torch.minimum(xa, xb) + w["worst_margin"]
        ssim_floor = torch.maximum((xa + xb) / 2, (ssim(pix_mean, a) + ssim(pix_mean, b)) / 2) + w["margin"]
    q = 1 - qabf(a, b, f).mean()
    groups = torch.zeros_like(sa, dtype=torch.long) if groups is None else groups
    pooled = lambda gap: sum(F.relu(gap[groups == g].mean()) for g in groups.unique()) / len(groups.unique())
    worst = pooled(worst_floor - torch.minimum(sa, sb))
    mean = pooled(ssim_floor - (sa + sb) / 2)
    loss = w["qabf"] * q + w["hinge"] * (worst + mean)
    return loss, {"loss": loss.item(), "q": q.item(), "worst": worst.item(), "ssim": mean.item()}


RECON_RECIPES: dict[str, dict[str, float]] = {
    "recon": {"mse": 1.0, "grad": 0.2, "ssim": 0.2},
    "recon-grad": {"mse": 1.0, "grad": 0.2, "ssim": 0.0},
    "recon-mse": {"mse": 1.0, "grad": 0.0, "ssim": 0.0},
    # fusion-aware: + the ``balanced`` fusion loss of the pair decoded through the fixed rule
    "recon-fuse": {"mse": 1.0, "grad": 0.2, "ssim": 0.2, "fuse": 1.0, "fuse_vif": 0.0},
    "recon-fuse-vif": {"mse": 1.0, "grad": 0.2, "ssim": 0.2, "fuse": 1.0, "fuse_vif": 1.0},
}


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, recipe: str = "recon",
                        weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """DRAN's autoencoder loss: MSE + Sobel gradient term + (1 - SSIM).

    The official code's perceptual term uses ImageNet VGG16 features, which cannot be downloaded
    here; SSIM (the metric's Gaussian window) stands in for it as the structural term.
    """
    w = {**RECON_RECIPES[recipe], **(weights or {})}
    mse = F.mse_loss(y, x)
    (yx, yy), (xx, xy) = sobel(y), sobel(x)
    grad = F.mse_loss(yx.abs(), xx.abs()) + F.mse_loss(yy.abs(), xy.abs())
    s = 1 - ssim(y, x).mean()
    loss = w["mse"] * mse + w["grad"] * grad + w["ssim"] * s
    return loss, {"loss": loss.item(), "mse": mse.item(), "grad": grad.item(), "ssim": s.item()}
