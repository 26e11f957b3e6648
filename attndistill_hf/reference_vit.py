"""A small reference implementation of the ViT layout used by the original self-supervised checkpoints.

DINO, Mugs, iBOT, the MAE encoder and timm all store a ViT under the same parameter names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``). The converter (:mod:`attndistill_hf.convert`) loads a checkpoint into
this module with a strict ``load_state_dict`` and runs it side by side with the converted transformers
model: if both give the same CLS token and the same last-layer CLS attention, the conversion is right.
It is written independently of transformers on purpose, so that it checks the conversion instead of
repeating it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .models import LAYER_NORM_EPS, sincos_2d_position_embeddings

CHECKPOINT_FORMATS: tuple[str, ...] = ("dino", "mugs", "ibot", "mae", "timm")


@dataclass
class ReferenceOutput:
    """Final-normed tokens ``[B, 1+N, D]`` and the last block's attention probabilities ``[B, H, 1+N, 1+N]``."""

    tokens: torch.Tensor
    last_attention: torch.Tensor


class ReferenceAttention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection, laid out as ``[3, heads, head_dim]``."""

    def __init__(self, width: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"Width {width} is not divisible by {num_heads} attention heads.")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, head_dim]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        probs = scores.softmax(dim=-1)
        mixed = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(mixed), probs


class ReferenceMlp(nn.Module):
    """Two linear layers around an exact (erf) GELU."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReferenceBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, num_heads: int, hidden: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = ReferenceAttention(width, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = ReferenceMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, probs = self.attn(self.norm1(x))
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return x, probs


class ReferencePatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceViT(nn.Module):
    """The original backbone: CLS token, learned (or MAE's fixed sin-cos) position table, blocks, final norm.

    ``sincos=True`` fills ``pos_embed`` with MAE's fixed 2-D sin-cos table and freezes it; like MAE, the
    table is still a parameter, so it is part of the state dict and of the checkpoint.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        image_size: int,
        *,
        intermediate_size: int | None = None,
        in_channels: int = 3,
        qkv_bias: bool = True,
        sincos: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"Patch size {patch_size} does not divide image size {image_size}.")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        hidden = intermediate_size if intermediate_size is not None else 4 * width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, width), requires_grad=not sincos)
        self.patch_embed = ReferencePatchEmbed(patch_size, in_channels, width)
        self.blocks = nn.ModuleList(ReferenceBlock(width, num_heads, hidden, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            if sincos:
                self.pos_embed.copy_(sincos_2d_position_embeddings(width, self.grid, self.grid).unsqueeze(0))
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """The position table for a ``rows x cols`` patch grid, resampled bicubically when it differs.

        Resampling is by target size (``align_corners=False``), the convention transformers follows with
        ``interpolate_pos_encoding=True``. DINO's own code passes a scale factor offset by 0.1 instead,
        which samples at slightly different points, so conversions are verified at the native size only.
        """
        if rows == self.grid and cols == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        width = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid, self.grid, width).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, width)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> ReferenceOutput:
        rows, cols = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        patches = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        x = x + self.position_table(rows, cols)
        probs = torch.empty(0)
        for block in self.blocks:
            x, probs = block(x)
        return ReferenceOutput(tokens=self.norm(x), last_attention=probs)
