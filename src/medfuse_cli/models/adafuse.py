"""AdaFuse, scaled to a CPU: per-modality encoders, spatial + Fourier cross-attention fusion
(CAF) at each coarse scale, a decoder with skip connections (after Gu et al., AdaFuse, 2023).

Facts kept from the paper and its official code (``../shared/notes/METHODS.md`` A.1): two
encoders (not shared) with four scales; at each fused scale a spatial CAF on the feature maps, a
frequency CAF on their log-amplitude spectra (``log(1 + |fftshift(fft2(x))|)``, brought back with
``|ifft2(ifftshift(.))|``) and a third CAF that fuses the two branches; CAF = patch tokens, a
transformer block per input, then *exchanged* attention (each input's attention map re-weights
the other's values), averaged, un-patched and added to both inputs. What we changed for 2 CPU
cores: ~3.0 M parameters instead of ~540 M (channels 16/32/48/64, 64-dim tokens, one block per
input, patches sized so each scale has (H/16)x(W/16) tokens), full resolution fused by a 1x1
convolution instead of a CAF, and a residual head ``F = (A + B)/2 + h`` whose last layer starts
at zero, so training starts from the mean rule. A task embedding (CT / PET / SPECT) lets one
model serve the three pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("mri-ct", "mri-pet", "mri-spect")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.GELU(),
    )


class Encoder(nn.Module):
    """Four scales: full, 1/2, 1/4, 1/8 resolution."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        chans = (1, *widths)
        self.blocks = nn.ModuleList(_block(chans[i], chans[i + 1]) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.avg_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats


class TokenBlock(nn.Module):
    """Pre-norm self-attention + MLP on tokens; also returns its last q, k, v for the exchange."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        n, length, dim = t.shape
        qkv = self.qkv(self.norm3(t)).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (n, heads, tokens, dim/heads)


class CAF(nn.Module):
    """Cross-attention fusion of two C-channel maps by exchanging attention maps."""

    def __init__(self, channels: int, patch: int, dim: int = 64, heads: int = 4, exchange: bool = True) -> None:
        super().__init__()
        self.patch, self.exchange = patch, exchange
        self.embed1 = nn.Conv2d(channels, dim, patch, stride=patch)
        self.embed2 = nn.Conv2d(channels, dim, patch, stride=patch)
        self.block1, self.block2 = TokenBlock(dim, heads), TokenBlock(dim, heads)
        self.proj1, self.proj2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.unpatch = nn.ConvTranspose2d(dim, channels, patch, stride=patch)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x1.shape
        t1 = self.embed1(x1).flatten(2).transpose(1, 2)
        t2 = self.embed2(x2).flatten(2).transpose(1, 2)
        q1, k1, v1 = self.block1(t1)
        q2, k2, v2 = self.block2(t2)
        if self.exchange:  # A1 re-weights the other input's values, and vice versa
            y1 = F.scaled_dot_product_attention(q1, k1, v2)
            y2 = F.scaled_dot_product_attention(q2, k2, v1)
        else:  # ablation: plain self-attention per input
            y1 = F.scaled_dot_product_attention(q1, k1, v1)
            y2 = F.scaled_dot_product_attention(q2, k2, v2)

        def merge(y):
            return y.transpose(1, 2).reshape(n, -1, y.shape[1] * y.shape[3])

        y = (self.proj1(merge(y1)) + self.proj2(merge(y2))) / 2
        y = y.transpose(1, 2).reshape(n, -1, h // self.patch, w // self.patch)
        return x1 + x2 + self.unpatch(y)


def log_amplitude(x: torch.Tensor) -> torch.Tensor:
    """log(1 + |fftshift(fft2(x))|): the phase is discarded, as in AdaFuse."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))
    return torch.log1p(spec.abs())


def back_to_space(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho").abs()


class ScaleFusion(nn.Module):
    """Spatial CAF, frequency CAF and a CAF of the two branches (one scale)."""

    def __init__(self, channels: int, patch: int, frequency: bool = True, exchange: bool = True) -> None:
        super().__init__()
        self.frequency = frequency
        self.spatial = CAF(channels, patch, exchange=exchange)
        if frequency:
            self.spectral = CAF(channels, patch, exchange=exchange)
            self.final = CAF(channels, patch, exchange=exchange)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = self.spatial(a, b)
        if not self.frequency:
            return s
        f = back_to_space(self.spectral(log_amplitude(a), log_amplitude(b)))
        return self.final(s, f)


class AdaFuse(nn.Module):
    """Two images (N,1,H,W) in [0,1] and a task index (N,) -> fused (N,1,H,W) in [0,1].

    H and W must be multiples of 16 (:func:`medfuse_cli.models.infer.fuse_stack` pads).
    """

    multiple = 16
    cpu_pixels_per_forward = 1 << 17  # e.g. 8 slices of 128x128, 2 of 256x256 (infer.slice_batch)

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64), frequency: bool = True, exchange: bool = True,
                 gate: bool = False) -> None:
        super().__init__()
        self.config = {"widths": list(widths), "frequency": frequency, "exchange": exchange, "gate": gate}
        self.enc_a, self.enc_b = Encoder(widths), Encoder(widths)
        self.task = nn.Embedding(len(TASKS), widths[-1])
        self.fuse0 = nn.Conv2d(2 * widths[0], widths[0], 1)
        # patch = 16 / 2**scale keeps (H/16)x(W/16) tokens at every fused scale
        self.fusions = nn.ModuleList(
            ScaleFusion(c, 16 // 2**i, frequency, exchange) for i, c in enumerate(widths) if i > 0
        )
        ups = []
        for i in range(len(widths) - 1, 0, -1):
            ups.append(_block(widths[i] + widths[i - 1], widths[i - 1]))
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # gate: a per-pixel weight w = sigmoid(g) so that F = w A + (1 - w) B + h; g starts at zero
        # (F starts as the mean rule, and a gated fine-tune starts as its ungated parent)
        self.gate = nn.Conv2d(widths[0], 1, 3, padding=1) if gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        fa, fb = self.enc_a(a), self.enc_b(b)
        fused = [self.fuse0(torch.cat([fa[0], fb[0]], 1))]
        fused += [m(x, y) for m, x, y in zip(self.fusions, fa[1:], fb[1:])]
        x = fused[-1] + self.task(task)[:, :, None, None]
        for up, skip in zip(self.ups, reversed(fused[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], 1))
        base = (a + b) / 2 if self.gate is None else b + torch.sigmoid(self.gate(x)) * (a - b)
        return (base + self.head(x)).clamp(0, 1)
