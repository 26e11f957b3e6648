"""A small reference implementation of the ViT layout used by the original self-supervised checkpoints.

DINO, Mugs, iBOT, the MAE encoder and timm all store a ViT under the same parameter names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``). The converter (:mod:`attndistill_hf.convert`) loads a checkpoint into
this module with a strict ``load_state_dict`` and runs it side by side with the converted transformers
model: if both give the same CLS token and the same last-layer CLS attention, the conversion is right.
It is written independently of transformers on purpose, so that it checks the conversion instead of
repeating it.

It is also how the tests write checkpoints in the original layouts (:func:`make_reference_checkpoint`),
with random weights, nested and prefixed the way the released files are.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from .models import LAYER_NORM_EPS, sincos_2d_position_embeddings

CheckpointFormat = Literal["dino", "mugs", "ibot", "mae", "timm"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("dino", "mugs", "ibot", "mae", "timm")
WRAPS: tuple[str | None, ...] = (None, "teacher", "student", "state_dict", "model")
PREFIXES: tuple[str, ...] = ("", "module.", "backbone.", "module.backbone.")


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


def _head_keys(format: str, width: int) -> dict[str, torch.Tensor]:
    """Parameters that the released checkpoints carry next to the backbone (heads, decoders, memories).

    They have the original names and plausible shapes; the converter must drop every one of them.
    Keys starting with ``backbone.`` live inside the backbone's own namespace (Mugs' relation block,
    iBOT's mask token); the others sit beside it in the training wrapper.
    """
    hidden, bottleneck, out = 4 * width, 16, 32
    if format in ("dino", "ibot"):
        keys = {
            "head.mlp.0.weight": torch.randn(hidden, width),
            "head.mlp.0.bias": torch.randn(hidden),
            "head.mlp.2.weight": torch.randn(hidden, hidden),
            "head.mlp.2.bias": torch.randn(hidden),
            "head.mlp.4.weight": torch.randn(bottleneck, hidden),
            "head.mlp.4.bias": torch.randn(bottleneck),
            "head.last_layer.weight_g": torch.ones(out, 1),
            "head.last_layer.weight_v": torch.randn(out, bottleneck),
        }
        if format == "ibot":
            keys["head.last_layer2.weight_g"] = torch.ones(out, 1)
            keys["head.last_layer2.weight_v"] = torch.randn(out, bottleneck)
            keys["backbone.masked_embed"] = torch.zeros(1, width)
        return keys
    if format == "mugs":
        relation = ReferenceBlock(width, 2, 4 * width).state_dict()
        keys = {f"backbone.relation_blocks.0.{k}": v for k, v in relation.items()}
        keys.update(
            {
                "instance_head.projector.0.weight": torch.randn(hidden, width),
                "group_head.last_layer.weight_g": torch.ones(out, 1),
                "group_head.last_layer.weight_v": torch.randn(out, bottleneck),
                "mem.block.queue_q": torch.randn(8, width),
            }
        )
        return keys
    if format == "mae":
        decoder = 2 * width
        keys = {
            "mask_token": torch.zeros(1, 1, decoder),
            "decoder_embed.weight": torch.randn(decoder, width),
            "decoder_embed.bias": torch.randn(decoder),
            "decoder_pos_embed": torch.randn(1, 5, decoder),
            "decoder_norm.weight": torch.ones(decoder),
            "decoder_norm.bias": torch.zeros(decoder),
            "decoder_pred.weight": torch.randn(48, decoder),
            "decoder_pred.bias": torch.zeros(48),
        }
        decoder_block = ReferenceBlock(decoder, 2, 2 * decoder).state_dict()
        keys.update({f"decoder_blocks.0.{k}": v for k, v in decoder_block.items()})
        return keys
    if format == "timm":
        return {"head.weight": torch.randn(10, width), "head.bias": torch.zeros(10)}
    raise ValueError(f"Unknown checkpoint format {format!r}; choose one of {CHECKPOINT_FORMATS}.")


def make_reference_checkpoint(
    path: str | Path,
    format: str,
    *,
    width: int = 64,
    depth: int = 2,
    num_heads: int = 2,
    patch_size: int = 8,
    image_size: int = 32,
    wrap: str | None = None,
    prefix: str = "",
    with_head: bool = True,
    seed: int = 0,
) -> ReferenceViT:
    """Write a random-weight checkpoint in ``format``'s original layout to ``path``; return its backbone.

    - ``wrap``: ``None`` writes the flat state dict (as the released backbone files are); ``"teacher"``
      writes a full training checkpoint (``teacher`` and a *different* ``student`` with a ``module.``
      prefix, ``epoch``, ``args``, ``optimizer``), so a converter that picks the student is caught;
      ``"student"``, ``"state_dict"`` and ``"model"`` nest the state dict under that key.
    - ``prefix``: prepended to the backbone keys (``"module."``, ``"backbone."``, ``"module.backbone."``);
      head keys get only the part before ``backbone.``, as a DDP-wrapped training wrapper saves them.
    - ``with_head``: also write the format's heads / decoder / extra modules (see ``_head_keys``).
    - A ``.safetensors`` path writes a flat safetensors file (``wrap`` must be ``None``).

    The returned :class:`ReferenceViT` (eval mode) holds the weights written as the backbone.
    """
    if format not in CHECKPOINT_FORMATS:
        raise ValueError(f"Unknown checkpoint format {format!r}; choose one of {CHECKPOINT_FORMATS}.")
    if wrap not in WRAPS:
        raise ValueError(f"Unknown wrap {wrap!r}; choose one of {WRAPS}.")
    if prefix not in PREFIXES:
        raise ValueError(f"Unknown prefix {prefix!r}; choose one of {PREFIXES}.")
    path = Path(path)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ReferenceViT(width, depth, num_heads, patch_size, image_size, sincos=format == "mae")
        # Random (not default) LayerNorm and bias values so that every parameter is exercised.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
                elif name.endswith(".bias"):
                    param.copy_(0.1 * torch.randn_like(param))
        heads = _head_keys(format, width) if with_head else {}
        other = ReferenceViT(width, depth, num_heads, patch_size, image_size, sincos=format == "mae")
    finally:
        torch.random.set_rng_state(generator_state)

    outer = prefix[: prefix.index("backbone.")] if "backbone." in prefix else prefix

    def layout(backbone: nn.Module, key_prefix: str, wrapper_prefix: str) -> dict[str, torch.Tensor]:
        state = {key_prefix + k: v.detach().clone() for k, v in backbone.state_dict().items()}
        for key, value in heads.items():
            if key.startswith("backbone."):
                state[key_prefix + key.removeprefix("backbone.")] = value.clone()
            else:
                state[wrapper_prefix + key] = value.clone()
        return state

    state = layout(model, prefix, outer)
    if path.suffix == ".safetensors":
        if wrap is not None:
            raise ValueError("A safetensors file holds one flat state dict: use wrap=None.")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return model.eval()

    args = argparse.Namespace(arch="vit", patch_size=patch_size, out_dim=32, lr=5e-4)
    if wrap is None:
        payload: object = state
    elif wrap == "teacher":
        student_prefix = "module." + prefix.removeprefix("module.")
        student_outer = "module." + outer.removeprefix("module.")
        payload = {
            "student": layout(other, student_prefix, student_outer),
            "teacher": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
            "epoch": 100,
            "args": args,
        }
    elif wrap == "model":
        payload = {"model": state, "epoch": 100, "args": args}
    else:
        payload = {wrap: state}
    torch.save(payload, path)
    return model.eval()
