"""Teachers and students: loading, student presets, and the per-family forward arguments.

Every vision-transformer family in transformers has its own forward quirks (MAE masks and shuffles
patches, ViT needs ``interpolate_pos_encoding`` for other resolutions, DINOv2 interpolates by itself).
``forward_kwargs`` hides them so that the rest of the library calls every model the same way.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPVisionModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    MetaClip2VisionModel,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTImageProcessor,
    ViTMAEModel,
    ViTModel,
)
from transformers.image_utils import PILImageResampling

from .checkpoints import unsafe_weights_error
from .data.transforms import image_stats
from .families import FAMILIES, configured_image_size, model_class_name, patch_size

# LayerNorm eps of the published ViTs, their students and the projector (not PyTorch's default 1e-5).
LAYER_NORM_EPS = 1e-6

# Students of the paper (method.md, "Configurations in the paper"), all ViT with learnable position
# embeddings unless the teacher uses sin-cos (MAE ablations).
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "vit-tiny-patch16": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "patch_size": 16},
    "vit-tiny-6heads-patch16": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "patch_size": 16,
    },
    # Patch 32 with the teacher's 6 heads: the ablation's pure case (b) (patch grids differ, heads do not).
    "vit-tiny-6heads-patch32": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "patch_size": 32,
    },
    "vit-tiny-8layers-patch16": {
        "hidden_size": 192,
        "num_hidden_layers": 8,
        "num_attention_heads": 3,
        "patch_size": 16,
    },
    "vit-small-patch16": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 16},
    "vit-small-8layers-patch16": {
        "hidden_size": 384,
        "num_hidden_layers": 8,
        "num_attention_heads": 6,
        "patch_size": 16,
    },
    "vit-base-patch16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16},
    # Not paper architectures: the students of the CPU demo and the small-scale ablation (32 px
    # Fashion-MNIST, recipes/demo.py and recipes/ablation.py), small enough to train in minutes.
    "vit-mini-patch4": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 4},
    "vit-mini-2heads-patch4": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 4},
    "vit-mini-patch8": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 8},
    "vit-mini-2heads-patch8": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 8},
    # DINOv3 architecture (exported as DINOv3ViTModel): RoPE instead of position embeddings, 4 registers
    # between the CLS token and the patches, LayerScale, key without bias; widths of DINOv3's ViT-B / S / T.
    "dinov3-vitb16": {
        "architecture": "dinov3_vit",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "patch_size": 16,
    },
    "dinov3-vits16": {
        "architecture": "dinov3_vit",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "patch_size": 16,
    },
    "dinov3-vitt16": {
        "architecture": "dinov3_vit",
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 3,
        "patch_size": 16,
    },
    "dinov3-mini-patch4": {
        "architecture": "dinov3_vit",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "patch_size": 4,
    },
}
DINOV3_REGISTERS = 4


def student_config(
    preset: str,
    *,
    image_size: int = 224,
    patch_size: int | None = None,
    num_channels: int = 3,
    **overrides: Any,
) -> ViTConfig | DINOv3ViTConfig:
    """The config of a named student preset (``DINOv3ViTConfig`` for the dinov3-* presets, else ``ViTConfig``),
    with image/patch size and any field overridden."""
    if preset not in STUDENT_PRESETS:
        raise ValueError(f"Unknown student preset {preset!r}; choose one of {sorted(STUDENT_PRESETS)}.")
    fields: dict[str, Any] = dict(STUDENT_PRESETS[preset])
    if patch_size is not None:
        fields["patch_size"] = patch_size
    if image_size % fields["patch_size"] != 0:
        raise ValueError(
            f"Student patch size {fields['patch_size']} does not divide image size {image_size}: "
            "choose a patch size that divides the image size."
        )
    fields["intermediate_size"] = 4 * fields["hidden_size"]
    fields.update(image_size=image_size, num_channels=num_channels)
    if fields.pop("architecture", "vit") == "dinov3_vit":
        # DINOv3's own LayerNorm eps (1e-5) and biases. Its training-time RoPE augmentation (random rescale
        # of the patch coordinates) is off: the student must see the view the teacher sees.
        fields.update(num_register_tokens=DINOV3_REGISTERS, pos_embed_rescale=None)
        fields.update(overrides)
        return DINOv3ViTConfig(**fields)
    # DINO-style ViTs (and the published students) use LayerNorm eps 1e-6 and qkv bias.
    fields.update(layer_norm_eps=LAYER_NORM_EPS, qkv_bias=True)
    fields.update(overrides)
    return ViTConfig(**fields)


def build_student(
    preset: str | None = None,
    *,
    config: PretrainedConfig | None = None,
    sincos_position_embeddings: bool = False,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
    **config_kwargs: Any,
) -> ViTModel | DINOv3ViTModel:
    """A randomly initialised student: a ``ViTModel`` without pooler (unused parameters break DDP), or a
    ``DINOv3ViTModel`` for the ``dinov3-*`` presets and DINOv3 configs.

    ``sincos_position_embeddings`` replaces the learnable table by fixed 2-D sin-cos embeddings (as
    the paper's MAE ablations do) and freezes it; the values are stored in the checkpoint, so the
    exported model is a plain ViTModel. DINOv3 students have no table (RoPE) and refuse it.
    """
    if config is None:
        if preset is None:
            raise ValueError("build_student needs a preset name or a config.")
        config = student_config(preset, **config_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    if isinstance(config, DINOv3ViTConfig):
        if sincos_position_embeddings:
            raise ValueError(
                "A DINOv3 student has no position-embedding table (it uses RoPE): sin-cos embeddings do not apply."
            )
        return DINOv3ViTModel(config)
    model = ViTModel(config, add_pooling_layer=False)
    if sincos_position_embeddings:
        grid = config.image_size // config.patch_size
        table = sincos_2d_position_embeddings(config.hidden_size, grid, grid)
        with torch.no_grad():
            model.embeddings.position_embeddings.copy_(table.unsqueeze(0))
        model.embeddings.position_embeddings.requires_grad_(False)
    return model


def sincos_2d_position_embeddings(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings with a zero row for CLS, shape [1 + h*w, dim] (MAE's layout)."""
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # MAE encodes the width coordinate in the first half and the height coordinate in the second.
    table = torch.cat([encode(xs), encode(ys)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()


class TeacherLoadError(ValueError):
    """The teacher (or a model to evaluate) could not be read: missing, corrupt or not a transformers model."""


def check_model_location(name_or_path: str, role: str = "teacher") -> str:
    """``name_or_path`` with ``~`` expanded; a TeacherLoadError when it can only be a local folder and is none.

    A Hub id is ``name`` or ``namespace/name``: anything absolute, relative (``./``, ``../``, ``~``) or
    deeper is a path, and a missing one is reported as such rather than as a malformed Hub id.
    """
    path = os.path.expanduser(name_or_path)
    is_path = os.path.isabs(path) or name_or_path.startswith(("./", "../", "~")) or path.count("/") > 1
    if is_path and not os.path.isdir(path):
        raise TeacherLoadError(
            f"The {role} directory {name_or_path!r} does not exist. Give a folder written by save_pretrained "
            "(convert original .pth checkpoints with recipes/convert_teacher.py) or a Hub id."
        )
    return path


VISION_TOWERS: dict[str, type[PreTrainedModel]] = {"clip": CLIPVisionModel, "metaclip_2": MetaClip2VisionModel}


def load_teacher(
    name_or_path: str | PreTrainedModel,
    *,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    role: str = "teacher",
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a frozen teacher (Hub id or local dir) on the fast attention backend, in eval mode.

    MAE encoders get ``mask_ratio = 0``: a teacher must see every patch. ``role`` names the model in
    error messages (the evaluation recipes load students with this too).

    A teacher whose only weights are pickled (``pytorch_model.bin``, no safetensors) loads when the pickle
    holds tensors and plain containers: transformers unpickles it with ``torch.load(weights_only=True)``.
    One that asks for anything else is refused before any of it runs, with an
    :class:`~attndistill_hf.checkpoints.UnsafePickleError` that says how to convert it to safetensors.
    """
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path
    else:
        name_or_path = check_model_location(name_or_path, role)
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            if getattr(config, "model_type", None) == "vit_mae":
                config.mask_ratio = 0.0
            # CLIP-style checkpoints hold text and vision towers: the teacher is the vision tower.
            tower = VISION_TOWERS.get(getattr(config, "model_type", None))
            model = (tower or AutoModel).from_pretrained(
                name_or_path,
                **({} if tower else {"config": config}),
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
        except pickle.UnpicklingError:
            # transformers' weights_only unpickler refused the file; its message advises lifting that guard.
            raise unsafe_weights_error(name_or_path, role) from None
        except (OSError, ValueError, SafetensorError) as error:
            raise TeacherLoadError(
                f"Cannot load the {role} {name_or_path!r}: {error}\n"
                "Give a Hub id (with network access and, for gated repos, a login) or a local directory "
                "written by save_pretrained; convert original .pth checkpoints with recipes/convert_teacher.py."
            ) from error
    if isinstance(model, ViTMAEModel) and model.config.mask_ratio != 0:
        raise ValueError(
            f"MAE teacher has mask_ratio={model.config.mask_ratio}; a teacher must see every patch. "
            "Set model.config.mask_ratio = 0.0 (load_teacher does this for paths and Hub ids)."
        )
    model.requires_grad_(False)
    return model.eval()


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names of ``AttnDistillConfig.teacher_dtype``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype.")
    return dtype


def cast_teacher(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """``model`` with its weights in ``dtype``, exactly as ``from_pretrained(..., dtype=dtype)`` loads them.

    ``model.to(dtype)`` is not that: it also rounds the buffers a model computes for itself and never
    saves (DINOv3's RoPE frequencies), which ``from_pretrained`` keeps in their own precision, and the
    positions of every patch would move. Those non-persistent buffers keep their dtype here.
    """
    saved = set(model.state_dict())
    computed = {name: buffer for name, buffer in model.named_buffers() if name not in saved}
    model.to(dtype)
    for name, buffer in computed.items():
        module_name, _, attribute = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(attribute, buffer, persistent=False)
    return model


def teacher_in_precision(teacher: str | PreTrainedModel, dtype_name: str) -> PreTrainedModel:
    """The frozen teacher with its weights in ``dtype_name`` (``--teacher_dtype``), as ``from_pretrained`` loads them.

    A Hub id or folder is loaded in that precision. A model passed in float32 is cast down in place
    (:func:`cast_teacher`: the trainer owns its teacher, and a copy of a 7B would not fit); one already in a
    lower or other half precision is refused, since casting cannot give back the weights it rounded.
    """
    dtype = torch_dtype(dtype_name)
    if not isinstance(teacher, PreTrainedModel):
        return load_teacher(teacher, dtype=dtype)
    current = next(teacher.parameters()).dtype
    if current != dtype and current != torch.float32:
        held = str(current).removeprefix("torch.")
        raise ValueError(
            f"The teacher's weights are in {held} and --teacher_dtype is {dtype_name}: set --teacher_dtype {held}, "
            "or pass the teacher in float32 (or by its name)."
        )
    return cast_teacher(load_teacher(teacher), dtype)


def load_run_teacher(
    name_or_path: str, dtype_name: str, *, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, tuple[float, float, float], tuple[float, float, float]]:
    """A run's teacher, loaded in ``dtype_name`` (``--teacher_dtype``), and the normalisation it takes
    (from its image processor; ImageNet's when it ships none).

    It loads on transformers' default attention backend (sdpa for every supported family): a class
    without sdpa (a CNN, say) then loads and the pair check refuses it as no ViT-family encoder, instead
    of the load failing with advice to pass ``attn_implementation``, which no recipe has.
    """
    teacher = load_teacher(
        name_or_path, attn_implementation=None, trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype_name)
    )
    mean, std = image_stats(load_image_processor(name_or_path, trust_remote_code=trust_remote_code))
    return teacher, mean, std


def build_image_processor(image_size: int, mean: Sequence[float], std: Sequence[float]) -> ViTImageProcessor:
    """The image processor saved with every model this library writes: bicubic resize to ``image_size``
    squared, then normalisation with the model's ``mean`` / ``std`` (one value per RGB channel)."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(mean),
        image_std=list(std),
    )


def load_image_processor(name_or_path: str, *, trust_remote_code: bool = False) -> Any | None:
    """The image processor saved with a model, or None when it has none (ImageNet statistics apply)."""
    try:
        return AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):  # no preprocessor_config.json
        return None


def forward_kwargs(model: PreTrainedModel, pixel_values: torch.Tensor) -> dict[str, Any]:
    """Extra forward arguments that make ``model(pixel_values, **kwargs)`` see every patch, in raster order.

    - Families that interpolate their position embeddings only on request (ViT, DeiT, ViTMAE, ViTMSN,
      CLIP, BEiT), at a resolution other than the configured one: ``interpolate_pos_encoding``.
    - ViTMAE: a fixed, increasing ``noise`` so the (mask-free) shuffle is the identity permutation.
    - DINOv2 and YOLOS interpolate by themselves, DINOv3 uses RoPE: no such flag.
    """
    kwargs: dict[str, Any] = {}
    model_type = getattr(model.config, "model_type", "")
    family = FAMILIES.get(model_class_name(model))
    if (
        family is not None
        and family.interpolates_on_request
        and tuple(pixel_values.shape[-2:]) != configured_image_size(model)
    ):
        kwargs["interpolate_pos_encoding"] = True
    if model_type == "vit_mae":
        if model.config.mask_ratio != 0:
            raise ValueError(
                f"{type(model).__name__} has mask_ratio={model.config.mask_ratio}: masking must be off "
                "(config.mask_ratio = 0.0) to use it as a teacher or feature extractor."
            )
        patch = model.config.patch_size
        num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        kwargs["noise"] = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32).expand(
            pixel_values.shape[0], -1
        )
    return kwargs


def patch_grid(model: nn.Module, image_size: tuple[int, int] | int | None = None) -> tuple[int, int]:
    """The (rows, cols) patch grid of ``model`` at ``image_size`` (its configured size by default)."""
    if image_size is None:
        height, width = configured_image_size(model)
    elif isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    patch_h, patch_w = patch_size(model)
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"Patch size {(patch_h, patch_w)} does not divide image size {(height, width)} of "
            f"{type(model).__name__}; the patch grid must tile the image."
        )
    return height // patch_h, width // patch_w


def cls_token(tokens: torch.Tensor) -> torch.Tensor:
    """The CLS token ``[B, D]`` of a student's token sequence ``[B, T, D]`` (first, before any register).

    It is as normalised as ``tokens``: the trainer passes the last block's tokens *before* the final
    LayerNorm, as the published code reads them. A model's normalised CLS feature (what the k-NN evaluates
    and the teacher's target) is :func:`~attndistill_hf.families.normalised_cls_feature`.
    """
    return tokens[:, 0]


def final_norm(model: nn.Module) -> nn.Module:
    """The model's final LayerNorm (``layernorm`` in ViT / DeiT / ViTMAE / DINOv2; ``norm`` elsewhere)."""
    for name in ("layernorm", "norm", "post_layernorm"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(model).__name__} has no final norm attribute (layernorm / norm / post_layernorm).")


def square_side(num_tokens: int) -> int:
    """Side of a square grid of ``num_tokens`` patches, or a ValueError when it is not a square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} patch tokens do not form a square grid; pass the grid explicitly (rows, cols).")
    return side
