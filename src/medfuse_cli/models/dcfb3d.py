"""DCFB-3D, scaled to a CPU: volumetric fusion with deformable cross feature blend blocks
(after Liu et al., "Three-dimensional medical image fusion with deformable cross-attention",
official code "DC2Fusion"; facts in METHODS.md A.2).

Kept from the paper and its code: two 3D token streams (MRI and the other modality) meeting in
deformable cross feature blend (DCFB) blocks, where learned offsets (predicted from both streams,
bounded by ``tanh``) warp the *other* stream before a window cross-attention, a depthwise
convolution branch on both streams runs beside the attention, and an MLP follows; mutual learning:
every block updates the MRI stream from the other and then the other stream from the updated
MRI, with the **same weights** both ways; a decoder with skip connections; an unsupervised loss.

What we changed for 2 CPU cores, deliberately:

- convolutional encoders (full, 1/2, 1/4 resolution, 8/16/32 channels) instead of a Swin
  encoder at 96-768 channels; the DCFB blocks run at 1/4 resolution (~0.2 M parameters in all);
- the attention takes its keys *and values* from the warped other stream and uses softmax (the
  official code keeps the values of the stream itself and drops the softmax, see METHODS.md);
- offsets are in voxels of the 1/4 grid (at most ``offset_range``), not fractions of the patch,
  so that a voxel's output does not depend on where a sliding window happens to cut;
- per-voxel channel LayerNorm everywhere (no batch or instance statistics, for the same reason);
- the head predicts a per-voxel weight ``w`` and a residual ``r``: ``F = w A + (1 - w) B + r``.
  It starts at zero, so training starts from the mean rule; the official head decodes two
  channels merged by a fixed L1-norm rule;
- optionally (``direct``) a small full-resolution path from the raw intensities of both sources
  (and the decoder's features) adds to the head's ``w`` and ``r`` and moves F toward pixel max by a
  per-voxel ``g``: ``F' = F + g (max(A, B) - F)``. Every other feature passes a per-voxel
  LayerNorm, which keeps a voxel's pattern but not its level, so the head could not tell which
  source is brighter *here*; and a sharp choice (a logit of +-10) is out of reach of Adam's
  bounded steps from a zero start, so the path's outputs are scaled by ``DIRECT_GAIN``. Its last
  layer starts at zero, so a fine-tune of a model without it starts exactly as its parent;
- optionally (``tasks``) a task embedding (MRI with CT / PET / SPECT, as AdaFuse has) added at the
  bottleneck, starting at zero: one network serves pairs that want different fusions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIRECT_GAIN = 8.0  # scale of the direct path's outputs (see the module docstring)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every voxel of (N, C, D, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), ChannelNorm(cout), nn.GELU())


class Encoder(nn.Module):
    """Features at full, 1/2 and 1/4 resolution."""

    def __init__(self, widths: tuple[int, int, int]) -> None:
        super().__init__()
        c0, c1, c2 = widths
        self.s0 = _conv_block(1, c0)
        self.s1 = nn.Sequential(nn.Conv3d(c0, c1, 2, stride=2), ChannelNorm(c1), nn.GELU(), _conv_block(c1, c1))
        self.s2 = nn.Sequential(nn.Conv3d(c1, c2, 2, stride=2), ChannelNorm(c2), nn.GELU())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        e0 = self.s0(x)
        e1 = self.s1(e0)
        return [e0, e1, self.s2(e1)]


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(N, C, D, H, W) -> (N * windows, w^3, C)."""
    n, c, d, h, wd = x.shape
    x = x.reshape(n, c, d // w, w, h // w, w, wd // w, w)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, w**3, c)


def _unwindows(t: torch.Tensor, shape: torch.Size, w: int) -> torch.Tensor:
    n, c, d, h, wd = shape
    t = t.reshape(n, d // w, h // w, wd // w, w, w, w, c)
    return t.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(n, c, d, h, wd)


def warp(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Trilinear sampling of ``x`` at every voxel moved by ``offsets`` (N, 3, D, H, W) in voxels (z, y, x)."""
    d, h, w = x.shape[2:]
    zs, ys, xs = (torch.arange(s, dtype=x.dtype, device=x.device) for s in (d, h, w))
    base = torch.stack(torch.meshgrid(zs, ys, xs, indexing="ij"))[None]  # (1, 3, D, H, W)
    pos = base + offsets
    scale = torch.tensor([max(s - 1, 1) for s in (d, h, w)], dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    norm = pos / scale * 2 - 1
    grid = norm.flip(1).permute(0, 2, 3, 4, 1)  # grid_sample wants (x, y, z) last
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class DCFB(nn.Module):
    """Deformable cross feature blend: ``x`` gathers from ``other`` warped by learned offsets."""

    def __init__(self, dim: int, heads: int = 4, window: int = 2, offset_range: float = 2.0) -> None:
        super().__init__()
        self.heads, self.window, self.offset_range = heads, window, offset_range
        self.norm_x, self.norm_o = ChannelNorm(dim), ChannelNorm(dim)
        self.offsets = nn.Sequential(
            nn.Conv3d(2 * dim, 2 * dim, 1), nn.Conv3d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim),
            ChannelNorm(2 * dim), nn.GELU(), nn.Conv3d(2 * dim, 3, 1),
        )
        nn.init.zeros_(self.offsets[-1].weight)
        nn.init.zeros_(self.offsets[-1].bias)
        self.q = nn.Conv3d(dim, dim, 1)
        self.kv = nn.Conv3d(dim, 2 * dim, 1)
        self.local = nn.Sequential(
            nn.Conv3d(2 * dim, dim, 3, padding=1, groups=dim), ChannelNorm(dim), nn.GELU(), nn.Conv3d(dim, dim, 1),
        )
        self.gate = nn.Sequential(nn.Conv3d(dim, max(dim // 8, 1), 1), nn.GELU(), nn.Conv3d(max(dim // 8, 1), 1, 1))
        self.proj = nn.Conv3d(2 * dim, dim, 1)
        self.norm_mlp = ChannelNorm(dim)
        self.mlp = nn.Sequential(nn.Conv3d(dim, 2 * dim, 1), nn.GELU(), nn.Conv3d(2 * dim, dim, 1))

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        xn, on = self.norm_x(x), self.norm_o(other)
        off = torch.tanh(self.offsets(torch.cat([xn, on], 1))) * self.offset_range
        warped = warp(on, off)
        n, c = x.shape[:2]
        hd = c // self.heads
        q = _windows(self.q(xn), self.window)
        k, v = (_windows(t, self.window) for t in self.kv(warped).chunk(2, 1))

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], self.heads, hd).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        att = _unwindows(att.transpose(1, 2).reshape(q.shape), x.shape, self.window)
        pairs = torch.stack([xn, warped], 2).reshape(n, 2 * c, *x.shape[2:])  # x_c beside warped_c per group
        local = self.local(pairs)
        local = local * torch.sigmoid(self.gate(att))  # spatial interaction: attention gates the conv branch
        x = x + self.proj(torch.cat([att, local], 1))
        return x + self.mlp(self.norm_mlp(x))


class DCFB3D(nn.Module):
    """Two 3D encoders, ``depth`` shared-weight DCFB blocks applied both ways, a decoder."""

    dims = 3

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32), depth: int = 2, heads: int = 4,
                 window: int = 2, offset_range: float = 2.0, deformable: bool = True, direct: int = 0,
                 tasks: int = 0) -> None:
        super().__init__()
        c0, c1, c2 = widths
        self.config = {"widths": list(widths), "depth": depth, "heads": heads, "window": window,
                       "offset_range": offset_range, "deformable": deformable, "direct": direct,
                       "tasks": tasks}
        self.multiple = 4 * window
        self.enc_a, self.enc_b = Encoder(widths), Encoder(widths)
        self.blocks = nn.ModuleList(
            DCFB(c2, heads, window, offset_range if deformable else 0.0) for _ in range(depth)
        )
        self.merge = nn.Conv3d(2 * c2, c2, 1)
        self.task = nn.Embedding(tasks, c2) if tasks else None
        if self.task is not None:
            nn.init.zeros_(self.task.weight)
        self.up1 = nn.ConvTranspose3d(c2, c1, 2, stride=2)
        self.dec1 = _conv_block(3 * c1, c1)
        self.up0 = nn.ConvTranspose3d(c1, c0, 2, stride=2)
        self.dec0 = _conv_block(3 * c0, c0)
        self.head = nn.Conv3d(c0, 2, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # ``direct`` channels: a full-resolution path on the raw sources, added to the head
        self.direct = nn.Sequential(
            nn.Conv3d(2 + c0, direct, 3, padding=1), nn.GELU(), nn.Conv3d(direct, direct, 3, padding=1), nn.GELU(),
            nn.Conv3d(direct, 3, 1),
        ) if direct else None
        if self.direct is not None:
            nn.init.zeros_(self.direct[-1].weight)
            nn.init.zeros_(self.direct[-1].bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse (N, 1, D, H, W) volumes in [0, 1] (sides multiples of :attr:`multiple`); ``task`` (N,)
        indexes ``adafuse.TASKS``, needed by (only) a model with a task embedding."""
        (a0, a1, a2), (b0, b1, b2) = self.enc_a(a), self.enc_b(b)
        for block in self.blocks:  # mutual learning: the same block, both directions
            a2 = block(a2, b2)
            b2 = block(b2, a2)
        y = self.merge(torch.cat([a2, b2], 1))
        if self.task is not None:
            if task is None:
                raise ValueError("this DCFB-3D has a task embedding: give the task of each pair")
            y = y + self.task(task)[:, :, None, None, None]
        y = self.dec1(torch.cat([self.up1(y), a1, b1], 1))
        y = self.dec0(torch.cat([self.up0(y), a0, b0], 1))
        w, r = self.head(y).chunk(2, 1)
        if self.direct is None:
            w = torch.sigmoid(w)
            return w * a + (1 - w) * b + r
        dw, dr, g = (DIRECT_GAIN * self.direct(torch.cat([a, b, y], 1))).chunk(3, 1)
        w = torch.sigmoid(w + dw)
        f = w * a + (1 - w) * b + r + dr
        return f + g * (torch.maximum(a, b) - f)
