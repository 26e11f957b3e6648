"""Frozen-model features of a whole loader, and the helpers and input checks every protocol shares.

- ``compute_features``: one batch's features: "cls" (DINO's k-NN feature), "last4_cls" (DINO's ViT-S/T
  probe) or "cls+avgpool" (DINO's ViT-B probe).
- ``extract_features``: the features of every batch of a loader, mixed precision on GPU, gathered across
  processes in dataset order, optionally cached as safetensors (a cache for other weights, another kind or
  another dataset size is refused, never reused).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attention import run_model
from ..families import normalised_cls_feature, token_layout
from ..models import final_norm

logger = logging.getLogger(__name__)

FeatureKind = Literal["cls", "last4_cls", "cls+avgpool"]
FEATURE_KINDS: tuple[str, ...] = ("cls", "last4_cls", "cls+avgpool")
_CACHE_FORMAT = "attndistill_hf.features.v1"


# --------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------


def check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown feature kind {kind!r}; choose one of {FEATURE_KINDS}.")


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def evaluation_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA by default (as the published runs evaluate in mixed precision), else full precision.

    An explicit ``dtype`` forces autocast with it on any device; ``torch.float32`` turns it off.
    """
    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        else:
            return contextlib.nullcontext()
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pixel_values, labels or None)`` of a batch given as a dict, an (images, labels) pair or a tensor."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(f"Batch dict has no 'pixel_values' (keys: {sorted(batch)}).")
        labels = batch.get("labels", batch.get("label"))
        return batch["pixel_values"], labels
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("Empty batch.")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"Cannot read pixel values from a batch of type {type(batch).__name__}.")


def compute_features(model: nn.Module, pixel_values: torch.Tensor, kind: FeatureKind = "cls") -> torch.Tensor:
    """Features of one batch (no grad handling, no autocast: callers decide), shape [B, D_kind].

    - "cls": final CLS token after the final LayerNorm (DINO's k-NN feature; CLIP: after post_layernorm).
    - "last4_cls": CLS of each of the last 4 blocks, each through the final LayerNorm, concatenated
      (DINO's linear-probe feature for ViT-S/T), 4 x hidden.
    - "cls+avgpool": final CLS concatenated with the mean of the final patch tokens, every other token
      (CLS, registers, distillation or detection tokens) excluded (DINO's ViT-B probe feature), 2 x hidden.
    """
    check_kind(kind)
    if kind == "last4_cls":
        outputs = run_model(model, pixel_values, output_hidden_states=True)
        hidden_states = getattr(outputs, "hidden_states", None)
        num_layers = getattr(model.config, "num_hidden_layers", None)
        if not hidden_states:
            raise ValueError(
                f"{type(model).__name__} returned no hidden states with output_hidden_states=True; "
                "'last4_cls' needs the output of every block."
            )
        if len(hidden_states) < 4 or (num_layers is not None and num_layers < 4):
            raise ValueError(
                f"'last4_cls' needs at least 4 transformer blocks; {type(model).__name__} has "
                f"{num_layers if num_layers is not None else len(hidden_states)}."
            )
        norm = final_norm(model)
        return torch.cat([norm(state[:, 0]) for state in hidden_states[-4:]], dim=-1)
    outputs = run_model(model, pixel_values)
    cls = normalised_cls_feature(model, outputs)
    if kind == "cls":
        return cls
    tokens = outputs.last_hidden_state
    patches = tokens[:, token_layout(model).patch_slice(tokens.shape[1])]
    if patches.shape[1] == 0:
        raise ValueError(f"Model output has {tokens.shape[1]} tokens and no patch tokens among them.")
    return torch.cat([cls, patches.mean(dim=1)], dim=-1)


def _model_fingerprint(model: nn.Module) -> str:
    """A digest of every weight and buffer, so a cache written for other weights is never reused by mistake.

    Hashing is one pass over the weights, negligible next to a pass of the model over a dataset.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def loader_length(dataloader: Iterable[Any]) -> int | None:
    dataset = getattr(dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _load_cache(
    cache_path: Path, kind: str, fingerprint: str, expected: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(cache_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        features, labels = handle.get_tensor("features"), handle.get_tensor("labels")
    problems = []
    if metadata.get("format") != _CACHE_FORMAT:
        problems.append("it was not written by extract_features")
    if metadata.get("kind") != kind:
        problems.append(f"it holds {metadata.get('kind')!r} features, not {kind!r}")
    if metadata.get("model") != fingerprint:
        problems.append("it was computed with different model weights")
    cached_length = metadata.get("dataset_length", "")
    if expected is not None and cached_length and int(cached_length) != expected:
        problems.append(f"it was computed on a dataset of {cached_length} items, this one has {expected}")
    if problems:
        raise ValueError(
            f"Feature cache {cache_path} does not match this request: {'; '.join(problems)}. "
            "Delete it or pass another cache_path."
        )
    return features, labels


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; each submodule gets its own training flag back afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    kind: FeatureKind = "cls",
    accelerator: Any | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``float32 [N, D]`` and labels ``long [N]`` of every batch of ``dataloader``, in dataset order.

    The model runs under ``no_grad`` in whatever train/eval mode the caller set (use eval mode for
    evaluation), with bf16 autocast on CUDA unless ``dtype`` says otherwise. With an ``accelerator`` the
    loader must be one it prepared; each batch is gathered with ``gather_for_metrics`` (duplicates that
    pad the last batch are dropped), so every process gets all features in dataset order. Batches
    without labels give label -1. Images the collator could not decode (its ``skipped_images`` count)
    are left out with a warning on one process; with several processes they would break the gathered
    order, so they raise. With ``cache_path`` the result is saved as safetensors and a later call with
    the same kind, weights and dataset size loads it without running the model; a cache that does not
    match raises instead of being silently reused or overwritten.
    """
    check_kind(kind)
    cache = Path(cache_path) if cache_path is not None else None
    fingerprint = _model_fingerprint(model) if cache is not None else ""
    expected = loader_length(dataloader)
    if cache is not None and cache.is_file():
        logger.info("Loading cached %s features from %s", kind, cache)
        return _load_cache(cache, kind, fingerprint, expected)

    device = accelerator.device if accelerator is not None else model_device(model)
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    is_main = accelerator is None or accelerator.is_local_main_process
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:  # a DataLoader over a stream has no length
        total = None
    skipped = 0
    for batch in tqdm(dataloader, desc=desc, total=total, disable=not (progress and is_main), unit="batch"):
        pixel_values, batch_labels = split_batch(batch)
        batch_skipped = int(batch.get("skipped_images", 0)) if isinstance(batch, Mapping) else 0
        if batch_skipped and accelerator is not None and accelerator.num_processes > 1:
            raise ValueError(
                f"{batch_skipped} image(s) of a batch could not be decoded; with several processes the gathered "
                "features would lose their dataset order. Remove the corrupt images or evaluate on one process."
            )
        skipped += batch_skipped
        if pixel_values.shape[0] == 0:
            continue
        pixel_values = pixel_values.to(device, non_blocking=True)
        if batch_labels is None:
            batch_labels = torch.full((pixel_values.shape[0],), -1, dtype=torch.long)
        batch_labels = torch.as_tensor(batch_labels).to(device=device, dtype=torch.long)
        with evaluation_autocast(device, dtype):
            batch_features = compute_features(model, pixel_values, kind)
        batch_features = batch_features.float()
        if accelerator is not None:
            batch_features, batch_labels = accelerator.gather_for_metrics((batch_features, batch_labels))
        features.append(batch_features.cpu())
        labels.append(batch_labels.cpu())
    if not features:
        raise ValueError("The dataloader yielded no images: nothing to extract features from.")
    if skipped:
        warnings.warn(f"{skipped} image(s) could not be decoded and were left out of the features.", stacklevel=2)
    all_features, all_labels = torch.cat(features), torch.cat(labels)

    if cache is not None and is_main_process(accelerator):
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        metadata = {
            "format": _CACHE_FORMAT,
            "kind": kind,
            "model": fingerprint,
            "num_samples": str(len(all_labels)),
            "dataset_length": "" if expected is None else str(expected),
        }
        save_file({"features": all_features.contiguous(), "labels": all_labels.contiguous()}, str(tmp), metadata)
        os.replace(tmp, cache)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return all_features, all_labels


def is_main_process(accelerator: Any | None) -> bool:
    """True on the process that writes files (the only one without an accelerator)."""
    return accelerator is None or bool(accelerator.is_main_process)


# --------------------------------------------------------------------------------------------------
# Checks shared by k-NN and the linear probe
# --------------------------------------------------------------------------------------------------


def check_features(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} features must be 2-D [N, D], got shape {tuple(features.shape)}.")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} labels must be 1-D with one label per feature row: {tuple(labels.shape)} labels for "
            f"{features.shape[0]} rows."
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name} set is empty.")
    if labels.dtype.is_floating_point:
        raise ValueError(f"{name} labels must be integer class ids, got {labels.dtype}.")
    if labels.min() < 0:
        raise ValueError(f"{name} labels contain negative ids (unlabelled samples?); k-NN needs class ids >= 0.")


def num_classes_of(num_classes: int | None, *labels: torch.Tensor) -> int:
    """``num_classes``, or one more than the largest label. A given count must cover every label: a
    class beyond it could never be predicted, and its samples would count as misses."""
    inferred = max(int(values.max()) for values in labels) + 1
    if num_classes is None:
        return inferred
    if num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but labels go up to {inferred - 1}.")
    return num_classes


# --------------------------------------------------------------------------------------------------
# Features of a train and a test split
# --------------------------------------------------------------------------------------------------


def _cache_file(cache_dir: str | os.PathLike[str] | None, split: str, kind: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / f"{split}-{kind.replace('+', '_')}.safetensors"


def train_test_features(
    model: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    kind: FeatureKind,
    cache_dir: str | os.PathLike[str] | None,
    **extract_kwargs: Any,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of both splits, in eval mode, each cached under ``cache_dir`` when given."""

    def split_features(split: str, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        cache_path = _cache_file(cache_dir, split, kind)
        return extract_features(
            model, loader, kind=kind, cache_path=cache_path, desc=f"{split} features", **extract_kwargs
        )

    with eval_mode(model):
        return split_features("train", train_loader), split_features("test", test_loader)
