"""The vision-transformer families the library distills from and into, and the facts it needs of each.

AttnDistill reads three things from a model: the last block's CLS-query attention, the CLS feature
and the patch grid. Every family lays its tokens out differently (DeiT's distillation token, DINOv2 /
DINOv3 registers after the CLS token, YOLOS detection tokens after the patches), names its CLS
parameter differently (CLIP's ``class_embedding``) and normalises its CLS feature differently
(CLIP's ``post_layernorm``). Each supported family is listed here once, and it is listed only when
its last attention can be captured exactly (tests compare every family with its eager ground truth).
Anything else is refused by :func:`family_of` with its class name and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


class UnsupportedModelError(TypeError):
    """The model is not a ViT-family encoder whose last CLS attention this library can capture exactly."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the CLS token and the patch tokens sit in a sequence of ``num_tokens``.

    ``leading`` tokens come before the patches (CLS first, then registers or a distillation token),
    ``trailing`` after them (YOLOS detection tokens). Every other token is neither CLS nor patch.
    """

    leading: int
    trailing: int = 0
    cls_index: int = 0

    def patch_slice(self, num_tokens: int) -> slice:
        return slice(self.leading, num_tokens - self.trailing)

    @property
    def extra_tokens(self) -> bool:
        return self.leading > 1 or self.trailing > 0


@dataclass(frozen=True)
class InputGeometry:
    """What a model's patch embedding takes: image channels, one patch and the configured image, (height, width)."""

    channels: int
    patch: tuple[int, int]
    image: tuple[int, int]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _config_geometry(model: nn.Module) -> InputGeometry:
    config = model.config
    return InputGeometry(int(config.num_channels), _pair(config.patch_size), _pair(config.image_size))


def _timm_geometry(model: nn.Module) -> InputGeometry:
    embed = model.timm_model.patch_embed
    return InputGeometry(int(embed.proj.in_channels), _pair(embed.patch_size), _pair(embed.img_size))


@dataclass(frozen=True)
class Family:
    """One supported model class and how the library reads it."""

    model_class: str
    # "interface": the attention modules call transformers' AttentionInterface (captured at the backend);
    # "timm": timm's ``Attention`` (captured from its normalised q/k, see attention.py).
    capture: Literal["interface", "timm"]
    attention_class: str
    layout: Callable[[nn.Module], TokenLayout]
    # The teacher's CLS feature: "last_hidden_state" (already through the final norm) or "pooler_output"
    # (CLIP: post_layernorm of the CLS token; last_hidden_state is not normalised there).
    feature: Literal["last_hidden_state", "pooler_output"] = "last_hidden_state"
    # Accepts ``interpolate_pos_encoding`` for resolutions other than the configured one.
    interpolates_on_request: bool = False
    # A reason to refuse an instance of a supported class (a configuration the library cannot read exactly).
    refuse: Callable[[nn.Module], str | None] = lambda _model: None
    # Channels, patch and configured image size: the config's fields, or where the model keeps them.
    geometry: Callable[[nn.Module], InputGeometry] = _config_geometry


def _cls_only(_model: nn.Module) -> TokenLayout:
    return TokenLayout(leading=1)


def _registers(model: nn.Module) -> TokenLayout:
    return TokenLayout(leading=1 + int(getattr(model.config, "num_register_tokens", 0) or 0))


def _timm_layout(model: nn.Module) -> TokenLayout:
    return TokenLayout(leading=int(model.timm_model.num_prefix_tokens))


def _refuse_mean_pooling(model: nn.Module) -> str | None:
    if getattr(model.config, "use_mean_pooling", False):
        return (
            "use_mean_pooling=True: its normalised feature is the mean of the patch tokens and its CLS token is "
            "never normalised, so there is no normalised CLS feature to align with"
        )
    return None


def _refuse_timm(model: nn.Module) -> str | None:
    timm_model = getattr(model, "timm_model", None)
    try:
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return "timm is not installed (pip install 'attndistill_hf[timm]')"
    if type(timm_model) is not VisionTransformer:
        return f"it wraps timm's {type(timm_model).__name__}; only timm's VisionTransformer is supported"
    if getattr(timm_model, "cls_token", None) is None:
        return "its VisionTransformer has no class token (class_token=False)"
    blocks = list(timm_model.blocks)
    if not blocks or type(getattr(blocks[-1], "attn", None)) is not Attention:
        kind = type(getattr(blocks[-1], "attn", None)).__name__ if blocks else "nothing"
        return f"its last block's attention is {kind}, not timm's Attention (its logits cannot be reproduced)"
    if isinstance(timm_model.norm, nn.Identity):
        return f"global_pool={timm_model.global_pool!r} normalises the pooled feature, not the CLS token"
    return None


FAMILIES: dict[str, Family] = {
    family.model_class: family
    for family in (
        Family("ViTModel", "interface", "ViTAttention", _cls_only, interpolates_on_request=True),
        Family(
            "DeiTModel", "interface", "DeiTAttention", lambda _m: TokenLayout(leading=2), interpolates_on_request=True
        ),
        # Masking (mask_ratio > 0) is refused where MAE models are loaded and run (models.py).
        Family("ViTMAEModel", "interface", "ViTMAEAttention", _cls_only, interpolates_on_request=True),
        Family("ViTMSNModel", "interface", "ViTMSNAttention", _cls_only, interpolates_on_request=True),
        Family("Dinov2Model", "interface", "Dinov2Attention", _cls_only),
        Family("Dinov2WithRegistersModel", "interface", "Dinov2WithRegistersAttention", _registers),
        Family("DINOv3ViTModel", "interface", "DINOv3ViTAttention", _registers),
        Family(
            "CLIPVisionModel",
            "interface",
            "CLIPAttention",
            _cls_only,
            feature="pooler_output",
            interpolates_on_request=True,
        ),
        Family(
            "MetaClip2VisionModel",
            "interface",
            "MetaClip2Attention",
            _cls_only,
            feature="pooler_output",
            interpolates_on_request=True,
        ),
        Family(
            "BeitModel",
            "interface",
            "BeitAttention",
            _cls_only,
            interpolates_on_request=True,
            refuse=_refuse_mean_pooling,
        ),
        # q/k RMS norms after the projections (use_qk_norm); like BEiT, mean pooling leaves the CLS unnormalised.
        Family("InternVLVisionModel", "interface", "InternVLVisionAttention", _cls_only, refuse=_refuse_mean_pooling),
        # RoPE, q/k norms, grouped keys in some layers, registers; the final RMS norm normalises the CLS.
        Family("Sapiens2Model", "interface", "Sapiens2Attention", _registers),
        Family(
            "YolosModel",
            "interface",
            "YolosSelfAttention",
            lambda model: TokenLayout(leading=1, trailing=int(model.config.num_detection_tokens)),
        ),
        Family("TimmWrapperModel", "timm", "Attention", _timm_layout, refuse=_refuse_timm, geometry=_timm_geometry),
    )
}

# Classes users bring that cannot be captured exactly, with the reason.
KNOWN_REFUSALS: dict[str, str] = {
    "Data2VecVisionModel": (
        "its attention code bypasses transformers' AttentionInterface (its own self-attention classes compute "
        "the relative position bias inside), so the softmax input cannot be observed"
    ),
    "SiglipVisionModel": "it has no CLS token (SigLIP pools with an attention head)",
    "Siglip2VisionModel": "it has no CLS token (SigLIP pools with an attention head)",
    "IJepaModel": "it has no CLS token (I-JEPA encodes patch tokens only)",
    "CLIPModel": "it is the text + vision model: load its vision tower (CLIPVisionModel) instead",
    "MetaClip2Model": "it is the text + vision model: load its vision tower (MetaClip2VisionModel) instead",
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP / FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config")
        ):
            model = model.module
        else:
            return model


def model_class_name(model: nn.Module) -> str:
    """The name of ``model``'s own class, also once FSDP2's ``fully_shard`` has swapped in its ``FSDP<Class>``
    subclass (a sharded teacher is still the model it was)."""
    if isinstance(model, FSDPModule):
        return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__
    return type(model).__name__


def family_of(model: nn.Module) -> Family:
    """The family of ``model``, or an :class:`UnsupportedModelError` naming its class and the reason."""
    model = unwrap_model(model)
    name = model_class_name(model)
    family = FAMILIES.get(name)
    if family is None:
        reason = KNOWN_REFUSALS.get(name)
        if reason is None and ("ForPreTraining" in name or "Decoder" in name):
            reason = "it contains a decoder; pass its encoder (e.g. model.vit) instead"
        if reason is None:
            reason = (
                "it is not a ViT-family encoder whose last CLS attention this library reproduces exactly; supported: "
                + ", ".join(sorted(FAMILIES))
            )
        raise UnsupportedModelError(f"{name} is not supported: {reason}.")
    reason = family.refuse(model)
    if reason is not None:
        raise UnsupportedModelError(f"{name} is not supported: {reason}.")
    return family


def token_layout(model: nn.Module) -> TokenLayout:
    """Where CLS and patches sit in ``model``'s token sequence."""
    model = unwrap_model(model)
    return family_of(model).layout(model)


def normalised_cls_feature(model: nn.Module, output: Any) -> torch.Tensor:
    """The model's CLS feature ``[B, D]`` after its final norm (CLIP: the pooled output), from its forward
    output: what DINO's k-NN evaluates and the teacher's target in the projector alignment."""
    model = unwrap_model(model)
    family = family_of(model)
    if family.feature == "pooler_output":
        return output.pooler_output
    return output.last_hidden_state[:, family.layout(model).cls_index]


def input_geometry(model: nn.Module) -> InputGeometry:
    """The channels, patch size and configured image size of ``model`` (a supported family)."""
    model = unwrap_model(model)
    return family_of(model).geometry(model)


def patch_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) of one patch."""
    return input_geometry(model).patch


def configured_image_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) the model was configured for."""
    return input_geometry(model).image
