"""Checkpoints in the original layouts of the released self-supervised ViTs, with random weights.

The conversion tests write them the way the released files are nested (flat, or under ``teacher`` /
``student`` / ``state_dict`` / ``model``) and prefixed (``module.``, ``backbone.``), with the heads and
decoders the converter must drop, and compare the converted model with the :class:`ReferenceViT` that
holds the same weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from attndistill_hf.reference_vit import CHECKPOINT_FORMATS, ReferenceBlock, ReferenceViT

WRAPS: tuple[str | None, ...] = (None, "teacher", "student", "state_dict", "model")
PREFIXES: tuple[str, ...] = ("", "module.", "backbone.", "module.backbone.")


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
