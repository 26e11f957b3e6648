"""Capturing the last block's CLS-query attention of Hugging Face vision transformers.

AttnDistill needs one thing from each model's attention: the softmax row of the CLS query against all
keys in the last block, ``[batch, heads, 1 + num_patches]``. Asking transformers for it
(``output_attentions=True``) forces eager attention in *every* block and materialises ``B x H x N^2``
maps per layer, which costs most of the step at ViT-S/8 scale. Instead, every block runs on the
model's fast backend (sdpa / flash) and two forward hooks on the last block's query and key
projections keep their outputs; the CLS row is then recomputed from them at ``B x H x N`` cost.

Key layout of the returned maps: CLS key first, then the patches in raster order. Models with extra
prefix tokens (DeiT's distillation token, DINOv2 registers) have those keys dropped and each row
renormalised to sum to 1, so every family yields the same layout and the loss can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .models import final_norm, forward_kwargs, num_prefix_tokens

# Projection names used by transformers' ViT-family attention modules, newest layout first.
_PROJECTION_NAMES = (("q_proj", "k_proj"), ("query", "key"))
_CAPTURE_ATTRIBUTE = "_attndistill_cls_capture"


@dataclass
class AttentionSite:
    """The last attention block of a model and what is needed to recompute its CLS row."""

    module: nn.Module
    query: nn.Linear
    key: nn.Linear
    num_heads: int
    head_dim: int
    scaling: float


@dataclass
class _Capture:
    """Forward hooks on the last block's q/k projections (and, on request, the final norm's input);
    outputs are kept until read once."""

    site: AttentionSite
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    slots: set[str] = field(default_factory=lambda: {"query", "key"})


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


def _has_cls_token(model: nn.Module) -> bool:
    embeddings = getattr(model, "embeddings", None)
    if embeddings is None and hasattr(model, "base_model") and model.base_model is not model:
        embeddings = getattr(model.base_model, "embeddings", None)
    return isinstance(getattr(embeddings, "cls_token", None), torch.Tensor)


def find_last_attention(model: nn.Module) -> AttentionSite:
    """Locate the last self-attention block by structure (not by module path).

    An attention block is a module holding two ``nn.Linear`` projections named like transformers'
    ViT families do (``q_proj``/``k_proj``, or ``query``/``key`` in older layouts). Modules are
    registered in execution order for these encoders, so the last such module is the last block.
    """
    model = unwrap_model(model)
    name = type(model).__name__
    if not _has_cls_token(model):
        raise TypeError(
            f"{name} has no CLS token (embeddings.cls_token); AttnDistill needs a ViT-family encoder with a "
            "CLS token, such as ViTModel, DeiTModel, ViTMAEModel or Dinov2Model."
        )
    if "ForPreTraining" in name or "Decoder" in name:
        raise TypeError(f"{name} contains a decoder; pass its encoder (e.g. model.vit) instead.")
    site: AttentionSite | None = None
    for module in model.modules():
        for query_name, key_name in _PROJECTION_NAMES:
            query, key = getattr(module, query_name, None), getattr(module, key_name, None)
            if isinstance(query, nn.Linear) and isinstance(key, nn.Linear):
                site = _make_site(module, query, key, model)
                break
    if site is None:
        raise TypeError(
            f"{name} has no attention block with query/key projections (q_proj/k_proj or query/key); "
            "supported: ViTModel, DeiTModel, ViTMAEModel, Dinov2Model and Dinov2WithRegistersModel."
        )
    return site


def _make_site(module: nn.Module, query: nn.Linear, key: nn.Linear, model: nn.Module) -> AttentionSite:
    config = getattr(model, "config", None)
    num_heads = getattr(module, "num_attention_heads", None) or getattr(config, "num_attention_heads", None)
    if num_heads is None:
        raise TypeError(f"Cannot tell the number of attention heads of {type(model).__name__}.")
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    head_dim = int(head_dim or query.out_features // num_heads)
    scaling = float(getattr(module, "scaling", head_dim**-0.5))
    return AttentionSite(module, query, key, int(num_heads), head_dim, scaling)


def _keep_output(capture: _Capture, slot: str) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        capture.outputs[slot] = output

    return hook


def _keep_input(capture: _Capture, slot: str) -> Any:
    def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        capture.outputs[slot] = inputs[0]

    return hook


def install_attention_capture(model: nn.Module) -> _Capture:
    """Install the q/k hooks once per model; they stay for later calls.

    Call it before ``torch.compile``: installed inside compiled code, the hooks cause a graph break
    and are re-installed on every step (a recompile each time). ``last_cls_attention`` calls it lazily.
    """
    plain = unwrap_model(model)
    capture = plain.__dict__.get(_CAPTURE_ATTRIBUTE)
    if capture is None:
        capture = _Capture(find_last_attention(plain))
        capture.handles = [
            capture.site.query.register_forward_hook(_keep_output(capture, "query")),
            capture.site.key.register_forward_hook(_keep_output(capture, "key")),
        ]
        # Plain attribute, not a submodule: it must not appear in state dicts or parameter lists.
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
        capture.handles.append(final_norm(plain).register_forward_pre_hook(_keep_input(capture, "tokens")))
        capture.slots.add("tokens")
    return capture


def last_block_tokens(model: nn.Module) -> torch.Tensor:
    """The last block's output tokens ``[B, T, D]`` (before the final norm) of the model's latest forward pass.

    Also releases what else that pass captured (q/k outputs not read by :func:`last_cls_attention`).
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


def cls_attention_from_qk(
    query: torch.Tensor, key: torch.Tensor, num_heads: int, head_dim: int, scaling: float
) -> torch.Tensor:
    """Softmax of the CLS query against all keys, float32 ``[B, H, T]``, from projection outputs ``[B, T, H*d]``.

    Computed in float32 even under autocast: the row is tiny, and the KL of small probabilities is
    sensitive to the rounding that bf16 logits would add.
    """
    batch, tokens, _ = key.shape
    with torch.autocast(device_type=key.device.type, enabled=False):
        cls_query = query[:, 0].float().reshape(batch, num_heads, head_dim)
        keys = key.float().reshape(batch, tokens, num_heads, head_dim)
        logits = torch.einsum("bhd,bthd->bht", cls_query, keys) * scaling
        return logits.softmax(dim=-1)


def drop_prefix_keys(attention: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Keep the CLS key and the patch keys, dropping extra prefix tokens; renormalise rows to 1."""
    if num_prefix <= 1:
        return attention
    kept = torch.cat([attention[..., :1], attention[..., num_prefix:]], dim=-1)
    return kept / kept.sum(dim=-1, keepdim=True)


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

    Every block runs on the model's own attention backend; only the CLS row of the last block is
    recomputed from the captured query/key projections. Gradients flow through the map when the model
    is trained, and it works under ``no_grad``, autocast and ``torch.compile``.
    Family-specific arguments (MAE's fixed noise, ``interpolate_pos_encoding``) are added automatically;
    ``forward_kwargs`` are passed on to the model and win over those.
    """
    capture = install_attention_capture(model)
    capture.outputs.clear()
    output = run_model(model, pixel_values, **forward_kwargs)
    query, key = capture.outputs.pop("query", None), capture.outputs.pop("key", None)
    if query is None or key is None:
        raise RuntimeError(
            f"The last attention block of {type(unwrap_model(model)).__name__} did not run its query/key "
            "projections during the forward pass; cannot compute the CLS attention."
        )
    site = capture.site
    attention = cls_attention_from_qk(query, key, site.num_heads, site.head_dim, site.scaling)
    return output, drop_prefix_keys(attention, num_prefix_tokens(unwrap_model(model).config))


def eager_last_cls_attention(
    model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[ModelOutput, torch.Tensor]:
    """Reference path: the literal transformers way (eager attention + ``output_attentions=True``).

    The model must have been loaded with ``attn_implementation="eager"``: with sdpa, transformers
    returns an empty attention tuple instead of failing, which this function refuses.
    """
    plain = unwrap_model(model)
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
    attention = attentions[-1][:, :, 0, :].float()
    return output, drop_prefix_keys(attention, num_prefix_tokens(plain.config))
