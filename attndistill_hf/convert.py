"""Convert original self-supervised ViT checkpoints (DINO, Mugs, iBOT, MAE, timm) to transformers models.

The released teachers are ``.pth`` files in the original layout, often inside a training checkpoint
(``teacher`` / ``student`` / ``state_dict`` / ``model``) and behind ``module.`` / ``backbone.`` prefixes.
:func:`convert_checkpoint` turns one into a ``ViTModel`` (``ViTMAEModel`` for MAE, with masking off),
saved with ``save_pretrained`` (safetensors) next to an image processor config, so that
``AutoModel.from_pretrained(output_dir)`` loads it without remote code.

Nothing is guessed silently: every tensor of the backbone is either mapped or an error, every tensor
outside it is dropped by name and reported, and the saved model is reloaded from disk and compared
with :class:`attndistill_hf.reference_vit.ReferenceViT` (the original architecture) on a random
input. Files are written to a temporary folder first and moved into ``output_dir`` only once that
comparison passes, so a failed conversion never leaves a model that looks usable.

Checkpoints are untrusted input: :func:`load_checkpoint_file` is the only place that reads them, and
it unpickles with ``weights_only=True`` (tensors and plain containers only); a file that needs more is
refused, never executed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    PreTrainedModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .attention import run_model
from .models import LAYER_NORM_EPS, build_image_processor
from .reference_vit import CHECKPOINT_FORMATS, ReferenceViT

logger = logging.getLogger(__name__)

# Standard sizes of the released models: name -> (width, depth, heads).
ARCH_PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
# Head count is not visible in the weights (qkv is one matrix); these widths always use 64-dim heads.
HEADS_BY_WIDTH: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16}

# Nesting keys of training checkpoints, most preferred first. DINO, iBOT and Mugs save both networks;
# the teacher (the momentum average) is the one their papers evaluate and release, so it wins.
NESTING_KEYS: tuple[str, ...] = ("teacher", "model", "state_dict", "student")
# Wrappers in front of the backbone's own names: DDP (``module.``), torch.compile (``_orig_mod.``).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")

# Parameters of one block, in the original layout. ``attn.qkv.bias`` is optional (qkv_bias=False models).
BLOCK_PARAMS: tuple[str, ...] = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)

# Tensors that are not part of the image -> tokens forward, per format, with the reason they go.
# Patterns match the backbone-relative key (after prefixes are stripped).
_DROP_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "dino": (
        (r"head\.", "DINO projection head"),
        (r"mlp\.", "DINO projection head"),
        (r"last_layer\.", "DINO projection head"),
    ),
    "ibot": (
        (r"head\.", "iBOT projection head"),
        (r"mlp\.", "iBOT projection head"),
        (r"last_layer2?\.", "iBOT projection head"),
        (r"masked_embed$", "iBOT mask token (used only when masking patches)"),
    ),
    "mugs": (
        (r"head\.", "Mugs head"),
        (r"(instance_head|local_group_head|group_head)\.", "Mugs supervision heads"),
        (r"mem\.", "Mugs local-group memory"),
        (r"relation_blocks\.", "Mugs relation blocks (local-group branch, not on the image path)"),
    ),
    "mae": (
        (r"mask_token$", "MAE decoder mask token"),
        (r"decoder_", "MAE decoder"),
    ),
    "timm": ((r"head\.", "timm classifier head"),),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, or its tensors do not form a supported ViT."""


class UnsafeCheckpointError(CheckpointError):
    """A ``.pth`` file whose unpickling needs more than tensors and plain containers (so could run code)."""


class ConversionVerificationError(RuntimeError):
    """The converted model, reloaded from disk, does not reproduce the original architecture."""


@dataclass
class ConversionReport:
    """What a conversion read, dropped, built and measured; printed by the CLI, saved as JSON."""

    source: str
    format: str
    checkpoint_entry: str
    stripped_prefixes: list[str]
    dropped: list[str]
    model_class: str
    width: int
    depth: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    num_channels: int
    qkv_bias: bool
    output_dir: str
    verified: bool = False
    tolerance: float | None = None
    cls_max_abs_diff: float | None = None
    cls_attention_max_abs_diff: float | None = None
    tokens_max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A human-readable multi-line summary."""
        lines = [
            f"source:      {self.source} (format {self.format}, entry {self.checkpoint_entry or '<top level>'})",
            f"prefixes:    {', '.join(self.stripped_prefixes) or 'none'} stripped",
            f"dropped:     {'; '.join(self.dropped) or 'nothing'}",
            f"model:       {self.model_class} width {self.width}, depth {self.depth}, heads {self.num_heads}, "
            f"mlp {self.intermediate_size}, patch {self.patch_size}, image {self.image_size}, "
            f"qkv_bias {self.qkv_bias}",
            f"output:      {self.output_dir}",
        ]
        if self.verified:
            lines.append(
                f"verified:    max |diff| CLS token {self.cls_max_abs_diff:.2e}, last-layer CLS attention "
                f"{self.cls_attention_max_abs_diff:.2e}, all tokens {self.tokens_max_abs_diff:.2e} "
                f"(tolerance {self.tolerance:.0e})"
            )
        else:
            lines.append("verified:    no (verify=False)")
        lines.extend(f"note:        {note}" for note in self.notes)
        return "\n".join(lines)


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint without ever executing code from it.

    ``.safetensors`` files hold tensors only. Anything else is read with ``torch.load(...,
    weights_only=True)``, whose unpickler builds tensors, numbers, strings and containers and refuses
    every other object. ``argparse.Namespace`` is also allowed: DINO / iBOT / Mugs / MAE training
    checkpoints store their arguments in one, and building it only sets attributes (its contents go
    through the same restricted unpickler).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Teacher checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"Teacher checkpoint {str(path)!r} is not a file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"Cannot read teacher checkpoint {str(path)!r} as safetensors: {error}. "
                "The file is truncated, corrupted or not a safetensors file."
            ) from error
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Name what was refused, but not torch's advice to allowlist it: that is what we refuse to do.
        found = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"Unsupported operand \d+", str(error))
        detail = ""
        if found is not None:
            detail = f" (it needs {found.group(1)!r})" if found.re.groups else f" ({found.group(0)})"
        raise UnsafeCheckpointError(
            f"Refusing to load {str(path)!r}: its pickle asks for more than tensors and plain containers{detail}. "
            "Either it is not a weights file, or unpickling it would build arbitrary objects, which can run "
            "code; it is never executed here. If you trust its origin, re-save it in a trusted, isolated "
            "environment as a plain state dict in safetensors format "
            "(safetensors.torch.save_file(state_dict, 'teacher.safetensors')) and convert that file."
        ) from None
    except Exception as error:  # any other failure: a damaged file, reported with its path
        raise CheckpointError(
            f"Cannot read teacher checkpoint {str(path)!r} ({type(error).__name__}: {error}). The file is "
            "truncated, corrupted or not a PyTorch checkpoint."
        ) from error


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(checkpoint: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a (possibly nested) checkpoint and the path of keys that led to it.

    Nesting keys are tried in the order of :data:`NESTING_KEYS`, so a full DINO / iBOT / Mugs training
    checkpoint yields its teacher.
    """
    trail: list[str] = []
    current = checkpoint
    for _ in range(4):
        if _is_tensor_dict(current):
            return dict(current), ".".join(trail)
        if not isinstance(current, Mapping):
            break
        nested = next((k for k in NESTING_KEYS if isinstance(current.get(k), Mapping)), None)
        if nested is None:
            break
        trail.append(nested)
        current = current[nested]
    where = f"under {'.'.join(trail)!r}" if trail else "at the top level"
    if isinstance(current, Mapping):
        non_tensor = sorted(str(k) for k, v in current.items() if not isinstance(v, torch.Tensor))
        found = f"keys {non_tensor[:10]} are not tensors" if non_tensor else "it is empty"
    else:
        found = f"it is a {type(current).__name__}"
    raise CheckpointError(
        f"No state dict found {where}: {found}. Expected a dict of tensors, possibly nested under one of "
        f"{list(NESTING_KEYS)}."
    )


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Remove wrapper prefixes and select the backbone.

    Returns ``(backbone_state, stripped_prefixes, outside_keys)``: when keys carry ``backbone.`` (a
    training wrapper such as DINO's MultiCropWrapper), only those are the backbone and the rest (its
    heads) are returned as ``outside_keys`` to be dropped.
    """
    stripped: list[str] = []
    unwrapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
                    if prefix not in stripped:
                        stripped.append(prefix)
        if key in unwrapped:
            raise CheckpointError(f"Key {key!r} appears twice once wrapper prefixes are removed.")
        unwrapped[key] = value
    if not any(k.startswith("backbone.") for k in unwrapped):
        return unwrapped, stripped, []
    stripped.append("backbone.")
    backbone = {k.removeprefix("backbone."): v for k, v in unwrapped.items() if k.startswith("backbone.")}
    outside = sorted(k for k in unwrapped if not k.startswith("backbone."))
    return backbone, stripped, outside


def group_keys(keys: list[str]) -> list[str]:
    """Compact key listing for messages: a whole block becomes ``blocks.N.*``, other groups ``name.* (k keys)``."""
    by_block: dict[str, list[str]] = {}
    others: dict[str, list[str]] = {}
    for key in sorted(keys):
        match = re.match(r"((?:[a-z_]+\.)?blocks\.\d+)\.", key)
        if match:
            by_block.setdefault(match.group(1), []).append(key)
        else:
            others.setdefault(key.split(".")[0], []).append(key)
    out: list[str] = []
    for block, members in sorted(by_block.items(), key=lambda kv: _natural(kv[0])):
        names = {m[len(block) + 1 :] for m in members}
        if names == set(BLOCK_PARAMS) or names == set(BLOCK_PARAMS) - {"attn.qkv.bias"}:
            out.append(f"{block}.*")  # the whole block
        elif len(members) > 4:
            out.append(f"{block}.* ({len(members)} keys)")
        else:
            out.extend(members)
    for group, members in sorted(others.items()):
        out.append(members[0] if len(members) == 1 else f"{group}.* ({len(members)} keys)")
    return out


def _natural(key: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _drop_non_backbone(state: dict[str, torch.Tensor], format: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the format's heads / decoder / extras; handle timm's ``fc_norm``. Returns (kept, dropped reasons)."""
    rules = _DROP_RULES[format]
    kept: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    for key, value in state.items():
        reason = next((why for pattern, why in rules if re.match(pattern, key)), None)
        if reason is None:
            kept[key] = value
        else:
            dropped.setdefault(reason, []).append(key)
    if any(k.startswith("fc_norm.") for k in kept):
        if "norm.weight" not in kept:
            raise CheckpointError(
                "This is a global-average-pooling model: it has fc_norm.* but no final norm.*, so its CLS token "
                "is never normalised and its features are the mean of the patch tokens. AttnDistill aligns "
                "the final-normed CLS token; use the self-supervised pre-training checkpoint (with norm.weight, "
                "not a fine-tuned global-pool one)."
            )
        for key in [k for k in kept if k.startswith("fc_norm.")]:
            del kept[key]
            dropped.setdefault("pooled-feature norm (fc_norm, not on the CLS path)", []).append(key)
    return kept, [f"{why}: {', '.join(group_keys(keys))}" for why, keys in dropped.items()]


@dataclass
class ViTArchitecture:
    """The hyper-parameters of a backbone, as read from its tensors (and the head count given or looked up)."""

    width: int
    depth: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    num_channels: int
    qkv_bias: bool


def _shape(tensor: torch.Tensor | None) -> list[int] | None:
    return None if tensor is None else list(tensor.shape)


def infer_architecture(
    state: Mapping[str, torch.Tensor],
    *,
    arch: str | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> ViTArchitecture:
    """Read width, depth, MLP size, patch and image size from the tensors; check overrides against them.

    Raises :class:`CheckpointError` listing every missing key, unexpected key and wrong shape.
    """
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if required not in state:
            present = group_keys(list(state))[:12]
            raise CheckpointError(
                f"missing: {required}; this is not a ViT backbone in the DINO/MAE/timm layout "
                f"(found: {', '.join(present) or 'no tensors'})."
            )
    cls_token, pos_embed, proj = state["cls_token"], state["pos_embed"], state["patch_embed.proj.weight"]
    if cls_token.dim() != 3 or cls_token.shape[:2] != (1, 1):
        raise CheckpointError(f"cls_token has shape {_shape(cls_token)}, expected [1, 1, width].")
    width = int(cls_token.shape[-1])
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(
            f"patch_embed.proj.weight has shape {_shape(proj)}, expected [width, channels, patch, patch]."
        )
    inferred_patch, num_channels = int(proj.shape[-1]), int(proj.shape[1])
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(f"pos_embed has shape {_shape(pos_embed)}, expected [1, 1 + patches, width].")
    num_patches = int(pos_embed.shape[1]) - 1
    grid = math.isqrt(max(num_patches, 0))
    if grid * grid != num_patches or grid == 0:
        raise CheckpointError(
            f"pos_embed has {pos_embed.shape[1]} rows: expected 1 (CLS) + a square number of patches. "
            "Checkpoints without a CLS position row or with extra tokens (registers, distillation) are not "
            "supported."
        )
    inferred_image = grid * inferred_patch

    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    depth = block_ids[-1] + 1 if block_ids else 0
    if depth == 0:
        raise CheckpointError("missing: blocks.0.* (the checkpoint has no transformer blocks).")
    fc1 = next((state[f"blocks.{i}.mlp.fc1.weight"] for i in block_ids if f"blocks.{i}.mlp.fc1.weight" in state), None)
    intermediate = int(fc1.shape[0]) if fc1 is not None else 4 * width
    qkv_bias = any(k.endswith("attn.qkv.bias") for k in state)

    problems: list[str] = []
    if arch is not None:
        if arch not in ARCH_PRESETS:
            raise ValueError(f"Unknown arch {arch!r}; choose one of {sorted(ARCH_PRESETS)}.")
        preset_width, preset_depth, preset_heads = ARCH_PRESETS[arch]
        if preset_width != width:
            problems.append(f"width mismatch: checkpoint has width {width} (cls_token), {arch} has {preset_width}")
        if preset_depth != depth:
            problems.append(f"depth mismatch: checkpoint has {depth} blocks, {arch} has {preset_depth}")
        if preset_depth > depth:
            problems.append(f"missing: blocks.{depth}.* to blocks.{preset_depth - 1}.*")
        num_heads = num_heads if num_heads is not None else preset_heads
    if patch_size is not None and patch_size != inferred_patch:
        problems.append(
            f"patch size mismatch: patch_embed.proj.weight has kernel {inferred_patch}, patch_size={patch_size} given"
        )
    if image_size is not None and image_size != inferred_image:
        problems.append(
            f"image size mismatch: pos_embed covers a {grid}x{grid} grid of {inferred_patch}-pixel patches "
            f"({inferred_image} pixels), image_size={image_size} given. Convert at the native size; the model runs "
            "at other sizes with interpolate_pos_encoding=True"
        )
    if num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(width)
        if num_heads is None:
            raise CheckpointError(
                f"Cannot infer the number of attention heads for width {width} (known widths: "
                f"{sorted(HEADS_BY_WIDTH)}); pass num_heads (--num_heads N) or arch (--arch NAME)."
            )
    if width % num_heads:
        problems.append(f"width {width} is not divisible by num_heads={num_heads}")

    expected: dict[str, list[int]] = {
        "cls_token": [1, 1, width],
        "pos_embed": [1, 1 + num_patches, width],
        "patch_embed.proj.weight": [width, num_channels, inferred_patch, inferred_patch],
        "patch_embed.proj.bias": [width],
        "norm.weight": [width],
        "norm.bias": [width],
    }
    block_shapes = {
        "norm1.weight": [width],
        "norm1.bias": [width],
        "attn.qkv.weight": [3 * width, width],
        "attn.qkv.bias": [3 * width],
        "attn.proj.weight": [width, width],
        "attn.proj.bias": [width],
        "norm2.weight": [width],
        "norm2.bias": [width],
        "mlp.fc1.weight": [intermediate, width],
        "mlp.fc1.bias": [intermediate],
        "mlp.fc2.weight": [width, intermediate],
        "mlp.fc2.bias": [width],
    }
    for i in range(depth):
        for name, shape in block_shapes.items():
            if name == "attn.qkv.bias" and not qkv_bias:
                continue
            expected[f"blocks.{i}.{name}"] = shape

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} has {_shape(state[k])}, expected {shape}"
        for k, shape in expected.items()
        if k in state and list(state[k].shape) != shape
    ]
    if missing:
        problems.append(f"missing: {', '.join(group_keys(missing))}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(group_keys(unexpected))}")
    if mismatched:
        problems.append(
            f"width mismatch (width {width} from cls_token, MLP {intermediate} from blocks.{block_ids[0]}.mlp.fc1): "
            + "; ".join(mismatched[:8])
            + (f"; and {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        )
    if problems:
        raise CheckpointError("Checkpoint does not match a ViT backbone:\n  - " + "\n  - ".join(problems))
    return ViTArchitecture(
        width, depth, num_heads, intermediate, inferred_patch, inferred_image, num_channels, qkv_bias
    )


def _hf_state_dict(state: Mapping[str, torch.Tensor], arch: ViTArchitecture) -> dict[str, torch.Tensor]:
    """Rename to the transformers ViT / ViTMAE layout and split the fused ``qkv`` into q, k, v.

    The fused output is ordered ``[q | k | v]``, each ``[heads * head_dim]`` head-major, which is the
    order transformers' separate projections reshape to.
    """
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(arch.depth):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].chunk(3, dim=0)
        out.update({dst + "attention.q_proj.weight": q, dst + "attention.k_proj.weight": k})
        out[dst + "attention.v_proj.weight"] = v
        if arch.qkv_bias:
            qb, kb, vb = state[src + "attn.qkv.bias"].chunk(3, dim=0)
            out.update({dst + "attention.q_proj.bias": qb, dst + "attention.k_proj.bias": kb})
            out[dst + "attention.v_proj.bias"] = vb
        for original, renamed in (
            ("norm1", "layernorm_before"),
            ("attn.proj", "attention.o_proj"),
            ("norm2", "layernorm_after"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            out[f"{dst}{renamed}.weight"] = state[f"{src}{original}.weight"]
            out[f"{dst}{renamed}.bias"] = state[f"{src}{original}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _build_hf_model(format: str, arch: ViTArchitecture) -> PreTrainedModel:
    common: dict[str, Any] = {
        "hidden_size": arch.width,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.intermediate_size,
        "hidden_act": "gelu",  # exact (erf) GELU, as in all these checkpoints
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.num_channels,
        "qkv_bias": arch.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if format == "mae":
        # A teacher must see every patch: saved with mask_ratio 0 so that it loads that way.
        return ViTMAEModel(ViTMAEConfig(**common, mask_ratio=0.0))
    return ViTModel(ViTConfig(**common), add_pooling_layer=False)


def _verify(
    reference: ReferenceViT, model_dir: Path, format: str, num_channels: int, image_size: int, tolerance: float
) -> tuple[PreTrainedModel, dict[str, float]]:
    """Reload ``model_dir`` with ``AutoModel`` (eager attention) and compare it with the reference forward."""
    reloaded, info = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", output_loading_info=True)
    # AutoModel builds ViTModel with a pooler that DINO-style backbones never had; nothing else may be missing.
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ConversionVerificationError(
            f"Reloading the converted model did not restore every weight: missing {missing}, unexpected "
            f"{unexpected}, mismatched {mismatched}. The installed transformers names ViT parameters differently "
            "from what this converter writes."
        )
    if format == "mae" and reloaded.config.mask_ratio != 0:
        raise ConversionVerificationError(f"Reloaded MAE model has mask_ratio={reloaded.config.mask_ratio}, not 0.")
    reloaded.eval()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, num_channels, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected = reference(pixels)
        output = run_model(reloaded, pixels, output_attentions=True)
    attentions = output.attentions
    if not attentions:
        raise ConversionVerificationError(
            "The reloaded model returned no attention maps with output_attentions=True; it must run with "
            "attn_implementation='eager' for verification."
        )
    tokens = output.last_hidden_state
    diffs = {
        "cls": (tokens[:, 0] - expected.tokens[:, 0]).abs().max().item(),
        "cls_attention": (attentions[-1][:, :, 0].float() - expected.last_attention[:, :, 0]).abs().max().item(),
        "tokens": (tokens - expected.tokens).abs().max().item(),
    }
    return reloaded, diffs


def convert_checkpoint_with_report(
    path: str | os.PathLike[str],
    format: str,
    output_dir: str | os.PathLike[str],
    *,
    arch: str | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> tuple[PreTrainedModel, ConversionReport]:
    """:func:`convert_checkpoint`, also returning the :class:`ConversionReport`."""
    if format not in CHECKPOINT_FORMATS:
        raise ValueError(f"Unknown checkpoint format {format!r}; choose one of {list(CHECKPOINT_FORMATS)}.")
    path, output_dir = Path(path), Path(output_dir)
    checkpoint = load_checkpoint_file(path)
    state, entry = find_state_dict(checkpoint)
    backbone, prefixes, outside = strip_prefixes(state)
    backbone, dropped = _drop_non_backbone(backbone, format)
    if outside:
        dropped.insert(0, f"outside the backbone (training-wrapper heads): {', '.join(group_keys(outside))}")
    notes: list[str] = []
    if entry.endswith("student"):
        notes.append("converted the student network: the checkpoint holds no teacher")
    non_float = sorted(k for k, v in backbone.items() if not v.is_floating_point())
    if non_float:
        raise CheckpointError(f"Backbone tensors {non_float[:8]} are not floating point; expected weights.")
    if any(v.dtype != torch.float32 for v in backbone.values()):
        notes.append("weights cast to float32")
    backbone = {k: v.float() for k, v in backbone.items()}

    spec = infer_architecture(backbone, arch=arch, patch_size=patch_size, image_size=image_size, num_heads=num_heads)
    model = _build_hf_model(format, spec)
    model.load_state_dict(_hf_state_dict(backbone, spec), strict=True)
    model.eval()

    report = ConversionReport(
        source=path.name,
        format=format,
        checkpoint_entry=entry,
        stripped_prefixes=prefixes,
        dropped=dropped,
        model_class=type(model).__name__,
        width=spec.width,
        depth=spec.depth,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        patch_size=spec.patch_size,
        image_size=spec.image_size,
        num_channels=spec.num_channels,
        qkv_bias=spec.qkv_bias,
        output_dir=str(output_dir),
        notes=notes,
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        # ImageNet normalisation at the native size, as these models were trained.
        processor = build_image_processor(spec.image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        processor.save_pretrained(str(staging))
        result: PreTrainedModel = model
        if verify:
            reference = ReferenceViT(
                spec.width,
                spec.depth,
                spec.num_heads,
                spec.patch_size,
                spec.image_size,
                intermediate_size=spec.intermediate_size,
                in_channels=spec.num_channels,
                qkv_bias=spec.qkv_bias,
                sincos=format == "mae",
            )
            reference.load_state_dict(backbone, strict=True)
            reference.eval()
            result, diffs = _verify(reference, staging, format, spec.num_channels, spec.image_size, tolerance)
            report.verified = True
            report.tolerance = tolerance
            report.cls_max_abs_diff = diffs["cls"]
            report.cls_attention_max_abs_diff = diffs["cls_attention"]
            report.tokens_max_abs_diff = diffs["tokens"]
            if diffs["cls"] > tolerance or diffs["cls_attention"] > tolerance:
                raise ConversionVerificationError(
                    f"Converted model differs from the original architecture: max |diff| of the CLS token "
                    f"{diffs['cls']:.3e}, of the last-layer CLS attention {diffs['cls_attention']:.3e} "
                    f"(tolerance {tolerance:.0e}). Nothing was written to {str(output_dir)!r}."
                )
            result.set_attn_implementation("sdpa")
        (staging / "conversion_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        output_dir.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Converted teacher checkpoint:\n%s", report.summary())
    return result, report


def convert_checkpoint(
    path: str | os.PathLike[str],
    format: str,
    output_dir: str | os.PathLike[str],
    *,
    arch: str | None = None,
    patch_size: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> PreTrainedModel:
    """Convert an original ViT checkpoint and save it as a transformers model in ``output_dir``.

    ``format`` is one of ``dino``, ``mugs``, ``ibot`` (-> ``ViTModel``), ``mae`` (-> ``ViTMAEModel`` with
    ``mask_ratio=0``) or ``timm`` (-> ``ViTModel``). Width, depth, MLP size, patch and image size come
    from the tensors; heads from ``num_heads``, the ``arch`` preset or the standard widths
    (:data:`HEADS_BY_WIDTH`). ``arch`` / ``patch_size`` / ``image_size`` are checked against the tensors.

    With ``verify`` (the default) the saved model is reloaded with ``AutoModel`` and run against
    :class:`~attndistill_hf.reference_vit.ReferenceViT` on a random input at the native size; a CLS
    token or last-layer CLS attention differing by more than ``tolerance`` raises
    :class:`ConversionVerificationError` and nothing is written. Returns the verified model as
    reloaded from disk (on sdpa attention), or the in-memory model when ``verify=False``. The report
    is logged and written to ``output_dir/conversion_report.json``.
    """
    model, _ = convert_checkpoint_with_report(
        path,
        format,
        output_dir,
        arch=arch,
        patch_size=patch_size,
        image_size=image_size,
        num_heads=num_heads,
        verify=verify,
        tolerance=tolerance,
    )
    return model
