"""The seed's U-Net: `model(x_t, t) -> eps`. It knows nothing about diffusion.

Layout (defaults give the seed's 54,563,779 parameters):

    3x3 conv -> [level i: blocks_per_level x (ResBlock [+ Attention]), then a
    strided 3x3 conv down, except at the last level] -> middle (Res, Attn, Res)
    -> [level i reversed: blocks_per_level x ResBlock at the level's width, then
    one ResBlock narrowing to the width of level i-1, each on concat(h, skip)
    [+ Attention]; then a transposed 4x4 conv up, except at the first level]
    -> GroupNorm(8), SiLU, 3x3 conv.

The time step enters every residual block through a sinusoidal embedding of
width 4 x channels[0] (Transformer position encoding, as in Ho et al. 2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer steps: (B,) -> (B, dim), [sin | cos]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeEmbedding(nn.Module):
    def __init__(self, base: int, width: int):
        super().__init__()
        self.base = base
        self.lin1 = nn.Linear(base, width)
        self.lin2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.silu(self.lin1(timestep_embedding(t, self.base))))


class ResidualBlock(nn.Module):
    # Submodules are registered in the seed module's order (norm1, conv1, norm2, conv2,
    # skip, time), so the two state dicts list the same tensors in the same order.
    def __init__(self, c_in: int, c_out: int, time_width: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.time = nn.Linear(time_width, c_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual.

    `normalize` (model.attention_norm) decides whether q, k and v are projected
    from GroupNorm(x) or from x itself. The seed's module (labml's `unet.py`)
    creates the GroupNorm and never applies it, so with `normalize=False` this
    computes the seed's function; most later U-Nets (Ho et al.'s, ADM) apply it.
    The norm's parameters exist either way, as in the seed's module, so the
    parameter count (54,563,779 for the seed) does not tell the two apart.
    """

    def __init__(self, channels: int, groups: int, normalize: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.normalize = normalize
        if not normalize:  # held, never used: no gradient (DDP would wait for one)
            self.norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = (self.norm(x) if self.normalize else x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """A residual block, optionally followed by attention."""

    def __init__(self, c_in: int, c_out: int, time_width: int, attention: bool,
                 groups: int, dropout: float, attention_norm: bool):
        super().__init__()
        self.res = ResidualBlock(c_in, c_out, time_width, groups, dropout)
        self.attn = AttentionBlock(c_out, groups, attention_norm) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


class UNet(nn.Module):
    def __init__(self, config: ModelConfig, image_channels: int = 3):
        super().__init__()
        self.config = config
        widths, attn = config.channels, config.attention
        groups, dropout, blocks = config.groups, config.dropout, config.blocks_per_level
        time_width = 4 * widths[0]

        def level(c_in: int, c_out: int, attention: bool) -> Level:
            return Level(c_in, c_out, time_width, attention, groups, dropout,
                         config.attention_norm)

        # The stem before the time embedding: the seed module's order (see ResidualBlock).
        self.stem = nn.Conv2d(image_channels, widths[0], 3, padding=1)
        self.time_embed = TimeEmbedding(widths[0], time_width)

        # Down path; `skips` records the width of every activation kept for the up path.
        self.down = nn.ModuleList()
        skips, width = [widths[0]], widths[0]
        for i, w in enumerate(widths):
            for _ in range(blocks):
                self.down.append(level(width, w, attn[i]))
                width = w
                skips.append(width)
            if i < len(widths) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)

        self.mid = nn.ModuleList([
            level(width, width, True),
            level(width, width, False),
        ])

        # Up path: blocks_per_level blocks at the level's width, then one that
        # narrows to the level below's width; each block eats one skip.
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            below = widths[i - 1] if i > 0 else widths[0]
            for c_out in [widths[i]] * blocks + [below]:
                self.up.append(level(width + skips.pop(), c_out, attn[i]))
                width = c_out
            if i > 0:
                self.up.append(nn.ConvTranspose2d(width, width, 4, stride=2, padding=1))
        assert not skips

        # The seed's final norm has 8 groups whatever model.groups says.
        self.head = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(),
                                  nn.Conv2d(width, image_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embed(t)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, Level) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, Level):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_size: int, image_channels: int = 3) -> float:
    """FLOP of one forward pass on one image (torch's FlopCounterMode, 2 per MAC).

    Attention runs through the math backend here: the fused CPU kernel is not
    counted by FlopCounterMode, the matmuls it decomposes into are.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(1, image_channels, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t)
    return float(counter.get_total_flops())
