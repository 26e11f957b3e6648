"""Capturing the last block's CLS-query attention of vision transformers, exactly, at the attention backend.

AttnDistill needs one thing from each model's attention: the softmax row of the CLS query against all
keys in the last block, ``[batch, heads, 1 + num_patches]``. Asking transformers for it
(``output_attentions=True``) forces eager attention in *every* block and materialises ``B x H x N^2``
maps per layer, which costs most of the step at ViT-S/8 scale.

Instead, every block runs on the backend the model was loaded with (sdpa, flash, flex, eager) and
only the last attention module is routed through a thin backend of this library, registered in
transformers' ``AttentionInterface``. It receives exactly what the kernel receives (queries and keys
after RoPE and q/k norms, the additive mask or relative position bias), computes the CLS row from
them at ``B x H x T`` cost, and hands the call on to the model's own kernel unchanged. Reading the
q/k projections instead would be wrong for every model that changes q/k after them (DINOv3's RoPE)
or adds a bias to the logits (BEiT). timm's ``Attention`` does not use that interface: its
normalised q/k (the tensors it hands to its kernel) are read by forward hooks instead.

Key layout of the returned maps: CLS key first, then the patches in raster order. Tokens that are
neither (DeiT's distillation token, registers, YOLOS detection tokens) are dropped by their positions
(``families.TokenLayout``) and each row renormalised to sum to 1, so every family yields the same
layout and the loss can compare them.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .families import TokenLayout, UnsupportedModelError, family_of, input_geometry, unwrap_model
from .models import final_norm, forward_kwargs

# The backend name of the last attention module; every other module keeps the model's own backend.
CAPTURE_BACKEND = "attndistill_cls_capture"
_CAPTURE_ATTRIBUTE = "_attndistill_cls_capture"
# Keyword arguments of the attention interface that this backend reproduces exactly. Anything else
# (softcapping, sliding windows, attention sinks, ...) changes the logits in ways it does not model.
# The output flags only choose what the model returns.
_UNDERSTOOD_KERNEL_ARGUMENTS = frozenset(
    {"dropout", "scaling", "is_causal", "output_attentions", "output_hidden_states", "return_dict"}
)

__all__ = [
    "CAPTURE_BACKEND",
    "AttentionSite",
    "UnsupportedModelError",
    "cls_attention_from_logit_inputs",
    "eager_last_cls_attention",
    "find_last_attention",
    "install_attention_capture",
    "install_last_block_capture",
    "last_block_tokens",
    "last_cls_attention",
    "run_model",
    "select_cls_and_patch_keys",
    "unwrap_model",
    "verify_capture",
]


@dataclass
class AttentionSite:
    """The last attention module of a model, how to capture it and where its CLS and patch tokens are."""

    module: nn.Module
    capture: str  # "interface" or "timm" (see families.Family.capture)
    layout: TokenLayout


@dataclass
class _Capture:
    """What the last attention module's backend (or timm hooks) and the final norm's pre-hook keep.

    Outputs are kept until read once. ``model_config`` is the model's own config: the kernel the
    capture hands on to follows its ``_attn_implementation``, also after ``set_attn_implementation``.
    """

    site: AttentionSite
    model_config: Any = None
    eager_kernel: Callable[..., Any] | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    slots: set[str] = field(default_factory=lambda: {"attention"})
    # (patch grid, attention backend) pairs that verify_capture has proved; a model is probed once per pair.
    verified: set[tuple[tuple[int, int], str | None]] = field(default_factory=set)


def find_last_attention(model: nn.Module) -> AttentionSite:
    """The last attention module of a supported family (by its class, in execution order).

    Raises :class:`~attndistill_hf.families.UnsupportedModelError` for anything the library cannot
    capture exactly, naming the class and the reason.
    """
    model = unwrap_model(model)
    family = family_of(model)
    modules = [module for module in model.modules() if type(module).__name__ == family.attention_class]
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: it has no {family.attention_class} module to capture."
        )
    return AttentionSite(modules[-1], family.capture, family.layout(model))


def cls_attention_from_logit_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    cls_index: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of the CLS query against all keys, float32 ``[B, H, T]``.

    ``query`` ``[B, H, T, d]`` and ``key`` ``[B, H_kv, T, d]`` are what the attention kernel receives
    (keys with fewer heads are repeated, as grouped-query kernels do); ``attention_mask`` is the
    kernel's additive float mask or boolean keep-mask, broadcastable to ``[B, H, T, T]``.
    Computed in float32 even under autocast: the row is tiny, and the KL of small probabilities is
    sensitive to the rounding that bf16 logits would add.
    """
    with torch.autocast(device_type=key.device.type, enabled=False):
        cls_query = query[:, :, cls_index].float()
        keys = key.float()
        if keys.shape[1] != cls_query.shape[1]:
            keys = keys.repeat_interleave(cls_query.shape[1] // keys.shape[1], dim=1)
        logits = torch.einsum("bhd,bhtd->bht", cls_query, keys) * scaling
        if attention_mask is not None:
            mask = (
                attention_mask
                if attention_mask.dim() == 4
                else attention_mask.reshape(1, 1, *attention_mask.shape[-2:])
            )
            row = mask[:, :, cls_index]
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
        return logits.softmax(dim=-1)


def select_cls_and_patch_keys(attention: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Keep the CLS key and the patch keys (in that order), dropping every other token; renormalise to 1."""
    if not layout.extra_tokens and layout.cls_index == 0:
        return attention
    patches = layout.patch_slice(attention.shape[-1])
    kept = torch.cat([attention[..., layout.cls_index : layout.cls_index + 1], attention[..., patches]], dim=-1)
    return kept / kept.sum(dim=-1, keepdim=True)


def _capture_backend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    """The last attention module's backend: keep the CLS row, then run the model's own kernel unchanged."""
    capture: _Capture = module.__dict__[_CAPTURE_ATTRIBUTE]
    unknown = sorted(
        name for name, value in kwargs.items() if name not in _UNDERSTOOD_KERNEL_ARGUMENTS and value is not None
    )
    if unknown or kwargs.get("is_causal") or getattr(module, "is_causal", False):
        raise UnsupportedModelError(
            f"{type(module).__name__} passes {', '.join(unknown) or 'a causal mask'} to its attention kernel; the "
            "CLS attention cannot be reproduced exactly with it."
        )
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise UnsupportedModelError(
            f"{type(module).__name__} passes a {type(attention_mask).__name__} mask to its attention kernel; only "
            "tensor masks can be reproduced exactly."
        )
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5  # what sdpa and transformers' eager kernels use then
    capture.outputs["attention"] = cls_attention_from_logit_inputs(
        query, key, scaling, capture.site.layout.cls_index, attention_mask
    )
    kernel = ALL_ATTENTION_FUNCTIONS.get_interface(capture.model_config._attn_implementation, capture.eager_kernel)
    return kernel(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_BACKEND, _capture_backend)


def _route_through_capture_backend(capture: _Capture, model: nn.Module) -> None:
    module = capture.site.module
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None or not isinstance(getattr(module, "config", None), type(model.config)):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: {type(module).__name__} does not dispatch through "
            "transformers' AttentionInterface."
        )
    capture.model_config = module.config
    capture.eager_kernel = eager
    # The module reads its backend name from its config at every call: a shallow copy of its own,
    # with only that name changed, routes this one module (and no other) through the capture.
    module.config = copy.copy(module.config)
    module.config._attn_implementation_internal = CAPTURE_BACKEND


def _timm_hooks(capture: _Capture) -> list[Any]:
    """timm's ``Attention``: keep its normalised q (``q_norm`` output); the CLS row is computed when
    ``k_norm`` runs. Those are the tensors its kernel (fused sdpa or the explicit softmax) receives."""
    attention = capture.site.module

    def check_arguments(_module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise UnsupportedModelError(
                "timm's Attention got an attention mask or is_causal; the CLS attention cannot be reproduced with it."
            )

    def keep_query(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        capture.outputs["query"] = output

    def compute_row(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        query = capture.outputs.pop("query")
        capture.outputs["attention"] = cls_attention_from_logit_inputs(
            query, output, float(attention.scale), capture.site.layout.cls_index
        )

    return [
        attention.register_forward_pre_hook(check_arguments, with_kwargs=True),
        attention.q_norm.register_forward_hook(keep_query),
        attention.k_norm.register_forward_hook(compute_row),
    ]


def install_attention_capture(model: nn.Module) -> _Capture:
    """Route the last attention module through the capture once per model; it stays for later calls.

    Call it before ``torch.compile`` (the compiled graph then includes the capture from the start);
    ``last_cls_attention`` calls it lazily.
    """
    plain = unwrap_model(model)
    capture = plain.__dict__.get(_CAPTURE_ATTRIBUTE)
    if capture is None:
        capture = _Capture(find_last_attention(plain))
        if capture.site.capture == "interface":
            _route_through_capture_backend(capture, plain)
        else:
            capture.handles = _timm_hooks(capture)
        # Plain attributes, not submodules: they must not appear in state dicts or parameter lists.
        capture.site.module.__dict__[_CAPTURE_ATTRIBUTE] = capture
        plain.__dict__[_CAPTURE_ATTRIBUTE] = capture
    return capture


def install_last_block_capture(model: nn.Module) -> _Capture:
    """Also keep the last block's output tokens: the input of the final norm (a forward pre-hook).

    transformers' own ``output_hidden_states`` would give them too, but its recording enters a lock,
    which breaks a ``torch.compile`` graph. Like :func:`install_attention_capture`, call it before
    compiling; :func:`last_block_tokens` reads the tokens after a forward pass.
    """
    capture = install_attention_capture(model)
    if "tokens" not in capture.slots:
        plain = unwrap_model(model)

        def keep_input(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            capture.outputs["tokens"] = inputs[0]

        capture.handles.append(final_norm(plain).register_forward_pre_hook(keep_input))
        capture.slots.add("tokens")
    return capture


def last_block_tokens(model: nn.Module) -> torch.Tensor:
    """The last block's output tokens ``[B, T, D]`` (before the final norm) of the model's latest forward pass.

    Also releases what else that pass captured (an attention row not read by :func:`last_cls_attention`).
    """
    capture = unwrap_model(model).__dict__.get(_CAPTURE_ATTRIBUTE)
    tokens = capture.outputs.pop("tokens", None) if capture is not None else None
    if capture is not None:
        capture.outputs.clear()
    if tokens is None:
        raise RuntimeError(
            f"No last-block tokens were captured for {type(unwrap_model(model)).__name__}: call "
            "install_last_block_capture(model) before its forward pass."
        )
    return tokens


def run_model(model: nn.Module, pixel_values: torch.Tensor, **extra: Any) -> ModelOutput:
    """``model(pixel_values)`` with its family's forward arguments (see ``models.forward_kwargs``).

    ``model`` may be wrapped (DDP, ``torch.compile``); ``extra`` arguments win over the family's.
    """
    plain = unwrap_model(model)
    kwargs = forward_kwargs(plain, pixel_values) if isinstance(plain, PreTrainedModel) else {}
    kwargs.update(extra)
    return model(pixel_values=pixel_values, **kwargs)


def last_cls_attention(
    model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[ModelOutput, torch.Tensor]:
    """Run ``model`` once; return its output and the last block's CLS attention ``[B, H, 1 + N]`` (float32).

    Every block runs on the model's own attention backend; the CLS row of the last block is computed
    from the queries and keys its kernel receives. Gradients flow through the map when the model is
    trained, and it works under ``no_grad``, autocast and ``torch.compile``. The map is the softmax
    before attention dropout (0 in every published ViT). Family-specific arguments (MAE's fixed noise,
    ``interpolate_pos_encoding``) are added automatically; ``forward_kwargs`` are passed on to the
    model and win over those.
    """
    capture = install_attention_capture(model)
    capture.outputs.pop("attention", None)
    output = run_model(model, pixel_values, **forward_kwargs)
    attention = capture.outputs.pop("attention", None)
    if attention is None:
        raise RuntimeError(
            f"The last attention module of {type(unwrap_model(model)).__name__} did not run during the forward "
            "pass; cannot compute the CLS attention."
        )
    return output, select_cls_and_patch_keys(attention, capture.site.layout)


def verify_capture(model: nn.Module, grid: tuple[int, int]) -> None:
    """One forward pass of a blank image at the ``grid`` of patches, in eval mode and without gradients:
    the capture must see the last attention module's kernel inputs and give a CLS row over ``1 + rows x cols``
    keys. Raises :class:`UnsupportedModelError` otherwise (the pre-flight check of a distillation run).
    A proof holds for the model's grid and attention backend: a second call with both unchanged runs nothing."""
    plain = unwrap_model(model)
    capture = install_attention_capture(plain)
    proof = (tuple(grid), getattr(capture.model_config, "_attn_implementation", None))
    if proof in capture.verified:  # e.g. the teacher of several students, or a recipe's check before the trainer's
        return
    parameter = next(plain.parameters())
    geometry = input_geometry(plain)
    (patch_h, patch_w), channels = geometry.patch, geometry.channels
    pixels = torch.zeros(1, channels, grid[0] * patch_h, grid[1] * patch_w, device=parameter.device)
    was_training = plain.training
    plain.eval()
    try:
        with torch.no_grad():
            _, attention = last_cls_attention(plain, pixels.to(parameter.dtype))
    except RuntimeError as error:
        raise UnsupportedModelError(f"{type(plain).__name__} is not supported: {error}") from None
    finally:
        plain.train(was_training)
    expected = 1 + grid[0] * grid[1]
    if attention.shape[-1] != expected:
        raise UnsupportedModelError(
            f"{type(plain).__name__} is not supported: its last attention has {attention.shape[-1]} CLS and patch "
            f"keys where a {grid[0]}x{grid[1]} patch grid gives {expected}; it has tokens the library cannot place."
        )
    capture.verified.add(proof)


def eager_last_cls_attention(
    model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[ModelOutput, torch.Tensor]:
    """Reference path: the literal way of each library to get attention maps.

    transformers models must have been loaded with ``attn_implementation="eager"`` (with sdpa,
    transformers returns an empty attention tuple instead of failing, which this function refuses);
    they return every layer's full map with ``output_attentions=True``. timm models must have
    ``fused_attn = False`` in every block; the last block's softmax output is read where timm applies
    attention dropout to it.
    """
    plain = unwrap_model(model)
    site = find_last_attention(plain)
    if site.capture == "timm":
        return _timm_eager_last_cls_attention(model, site, pixel_values, **forward_kwargs)
    implementation = getattr(plain.config, "_attn_implementation", None)
    if implementation != "eager":
        raise ValueError(
            f"{type(plain).__name__} uses attn_implementation={implementation!r}; the reference path needs "
            "eager attention: load it with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager')), or use last_cls_attention, which works with any backend."
        )
    output = run_model(model, pixel_values, **{"output_attentions": True, **forward_kwargs})
    attentions = getattr(output, "attentions", None)
    if not attentions:
        raise RuntimeError(
            f"{type(plain).__name__} returned no attention maps although output_attentions=True was passed."
        )
    attention = attentions[-1][:, :, site.layout.cls_index, :].float()
    return output, select_cls_and_patch_keys(attention, site.layout)


def _timm_eager_last_cls_attention(
    model: nn.Module, site: AttentionSite, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[ModelOutput, torch.Tensor]:
    blocks = unwrap_model(model).timm_model.blocks
    if any(block.attn.fused_attn for block in blocks):
        raise ValueError(
            "The timm reference path needs the explicit softmax: set block.attn.fused_attn = False in every block, "
            "or use last_cls_attention, which works with fused attention."
        )
    kept: dict[str, torch.Tensor] = {}
    handle = site.module.attn_drop.register_forward_pre_hook(lambda _m, inputs: kept.update(map=inputs[0]))
    try:
        output = run_model(model, pixel_values, **forward_kwargs)
    finally:
        handle.remove()
    attention = kept["map"][:, :, site.layout.cls_index, :].float()
    return output, select_cls_and_patch_keys(attention, site.layout)
