"""A small UNet-style ε-prediction model for low-resolution images (the bundled 8×8 digits model).

The architecture follows the DDPM UNet of Ho et al. (2020) (their ``diffusion_tf/models/unet.py``)
scaled down: a sinusoidal time embedding ("Attention is all you need" §3.5, as used by DDPM)
fed through a 2-layer MLP and added to every residual block; residual blocks
GroupNorm → SiLU → conv3×3, twice, with a 1×1 skip where channels change; strided-conv
downsampling, nearest-neighbour upsampling + conv3×3, skip connections concatenated on the way
up. No self-attention: at 8×8 / 4×4 / 2×2 resolution two 3×3 convolutions per block already
see most of the image, and the model has to train on one CPU thread in minutes.

Class-conditional option (``num_classes=K``): a learned label embedding
``nn.Embedding(K, 4·ch)`` added to the time embedding, ``emb = temb_mlp(t) + label_emb(y)``, as
guided-diffusion's ``UNetModel`` (``emb = emb + self.label_emb(y)``) and Sehwag et al.'s
minimal-diffusion do. With ``num_classes=None`` (the default) the module is exactly the
unconditional one: same parameters, same state_dict keys, same outputs (the bundled digits
checkpoint loads unchanged).

Call convention (docs/design.md §3): ``model(x, t) -> eps`` (``model(x, t, y)`` when
class-conditional) with x float (B, C, H, W) in the sampler's [-1, 1] space, t a LongTensor
(B,) (or a scalar) of DDPM timesteps in [0, T) and y a LongTensor (B,) of labels in [0, K).
H and W must be divisible by 2 ** (len(ch_mult) - 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, shape (B,) -> (B, dim).

    emb[:, i] = sin(t / max_period^(i / half)), emb[:, half + i] = cos(...), i < half = dim // 2
    (DDPM ``get_timestep_embedding``; an odd ``dim`` gets a zero last column).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 (+ time embedding) → GroupNorm → SiLU → dropout → conv3×3, + skip."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Small DDPM-style UNet ε-model.

    Args:
        in_channels: image channels C.
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per resolution level (each level after the first
            halves H and W).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        dropout: dropout inside residual blocks (training only), in [0, 1).
        num_classes: None (unconditional, the default) or K >= 1: class-conditional, a learned
            ``label_emb = nn.Embedding(K, 4·ch)`` added to the time embedding; ``forward``
            then needs y.

    Shapes: x (B, C, H, W), t (B,) long, y (B,) long in [0, K) or None -> (B, C, H, W).
    """

    def __init__(self, in_channels: int = 1, ch: int = 32, ch_mult=(1, 2, 2), num_res_blocks: int = 1,
                 dropout: float = 0.0, num_classes: int | None = None):
        super().__init__()
        if in_channels < 1 or ch < 1 or num_res_blocks < 1 or len(ch_mult) < 1:
            raise ValueError("in_channels, ch, num_res_blocks must be >= 1 and ch_mult non-empty")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")
        self.in_channels = in_channels
        self.ch = ch
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.num_classes = num_classes
        temb = ch * 4
        self.temb_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        if num_classes is not None:   # (no attribute otherwise: the unconditional state_dict is unchanged)
            self.label_emb = nn.Embedding(num_classes, temb)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        chans = [ch]
        cur = ch
        for level, mult in enumerate(self.ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, temb, dropout))
                cur = ch * mult
                chans.append(cur)
            if level != len(self.ch_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                chans.append(cur)
        self.mid1 = ResBlock(cur, cur, temb, dropout)
        self.mid2 = ResBlock(cur, cur, temb, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + chans.pop(), ch * mult, temb, dropout))
                cur = ch * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)
        # Zero-initialised output conv (as DDPM): the untrained model predicts ε = 0.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """ε-prediction (B, C, H, W) of x (B, C, H, W) in [-1, 1] at timesteps t (B,) or a
        scalar, given labels y (B,) long in [0, K) when the model is class-conditional
        (ValueError naming y if it is missing, given to an unconditional model, not integer,
        of another length or out of range)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        div = 2 ** (len(self.ch_mult) - 1)
        if x.shape[2] % div or x.shape[3] % div:
            raise ValueError(f"x's H and W must be divisible by {div}, got {tuple(x.shape[2:])}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.temb_mlp(timestep_embedding(t, self.ch).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(self._labels(y, x.shape[0], x.device)).to(emb.dtype)
        elif y is not None:
            raise ValueError("y was given but this UNet is unconditional (num_classes=None); "
                             "build it with num_classes=K to condition on labels")
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = self.mid2(self.mid1(h, emb), emb)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _labels(self, y, batch: int, device) -> torch.Tensor:
        """y as a long (B,) tensor on ``device``, checked (the range check reads y's values: it is
        skipped while torch.compile traces or a CUDA graph is captured, where it cannot run)."""
        k = self.num_classes
        if y is None:
            raise ValueError(f"y is required: this UNet is class-conditional (num_classes={k}); "
                             "pass labels (B,) long in [0, num_classes)")
        y = torch.as_tensor(y, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.dim() == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},) like x's batch, got {tuple(y.shape)}")
        capturing = y.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing and batch:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"y: labels must lie in [0, {k}) (num_classes={k}), found labels "
                                 f"in [{lo}, {hi}]")
        return y.long()
