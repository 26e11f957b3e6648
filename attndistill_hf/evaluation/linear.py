"""DINO's evaluation protocols for any teacher or student: weighted k-NN, linear probe, semi-supervised probe.

The paper reports k-NN and linear-probe top-1 measured as DINO measures them (method.md, "Evaluation
protocol"). This module works on models and dataloaders (or on already extracted features), so it is
independent of how data is loaded; the recipes in ``recipes/`` wire it to the dataset sources.

- ``extract_features``: frozen-model features of a whole loader ("cls", "last4_cls", "cls+avgpool"),
  mixed precision on GPU, gathered across processes in dataset order, optionally cached (safetensors).
- ``knn_accuracy``: DINO's weighted k-NN (cosine similarity, votes exp(sim / T)), chunked over the test set.
- ``train_linear_probe`` (cached features, no augmentation) and ``train_linear_probe_on_images`` (frozen
  backbone, augmentation from the loader: ``probe_train_transform``) share one SGD + cosine training loop
  with an optional lr sweep trained as parallel heads; ``probe_feature_kind`` picks DINO's probe feature
  for a model; ``balanced_label_subset`` gives the 1% / 10% semi-supervised label splits.
- ``KNNEvaluationCallback``: k-NN top-1 during ``Trainer`` training, logged as ``eval_knn_top1``.
- ``run_knn_eval`` / ``run_linear_eval``: the complete evaluations the recipes (and the demo) run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..attention import run_model, unwrap_model
from ..data.sources import DataArguments, count_examples
from ..data.transforms import image_stats
from ..families import cls_feature, token_layout
from ..hub import EvalRecord, add_eval_records, records_from_results
from ..models import final_norm, load_image_processor, load_teacher

logger = logging.getLogger(__name__)

FeatureKind = Literal["cls", "last4_cls", "cls+avgpool"]
FEATURE_KINDS: tuple[str, ...] = ("cls", "last4_cls", "cls+avgpool")
# "auto": the linear-probe feature DINO uses for the model's width (see probe_feature_kind).
ProbeFeatureKind = Literal["auto", "cls", "last4_cls", "cls+avgpool"]
# DINO's linear probe: CLS + average-pooled patch tokens from ViT-B's width on, the last 4 CLS below.
_AVGPOOL_MIN_HIDDEN_SIZE = 768
DEFAULT_KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
# Elements of one [chunk, num_train] similarity block when chunk_size is automatic: 2**27 float32 values
# (512 MiB), i.e. about 100 test images per chunk against ImageNet's 1.28M train features, as DINO does.
_KNN_SIMILARITY_BUDGET = 2**27
_CACHE_FORMAT = "attndistill_hf.features.v1"


# --------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown feature kind {kind!r}; choose one of {FEATURE_KINDS}.")


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
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
    _check_kind(kind)
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
    cls = cls_feature(model, outputs)
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


def _dataset_length(dataloader: Iterable[Any]) -> int | None:
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
    _check_kind(kind)
    cache = Path(cache_path) if cache_path is not None else None
    fingerprint = _model_fingerprint(model) if cache is not None else ""
    expected = _dataset_length(dataloader)
    if cache is not None and cache.is_file():
        logger.info("Loading cached %s features from %s", kind, cache)
        return _load_cache(cache, kind, fingerprint, expected)

    device = accelerator.device if accelerator is not None else _model_device(model)
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
        with _autocast(device, dtype):
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
# Weighted k-NN
# --------------------------------------------------------------------------------------------------


def _check_features(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
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


def _class_count(num_classes: int | None, *labels: torch.Tensor) -> int:
    """``num_classes``, or one more than the largest label. A given count must cover every label: a
    class beyond it could never be predicted, and its samples would count as misses."""
    inferred = max(int(values.max()) for values in labels) + 1
    if num_classes is None:
        return inferred
    if num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but labels go up to {inferred - 1}.")
    return num_classes


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KNN_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """DINO's weighted k-NN: ``{k: {"top1": %, "top5": %}}`` for each k.

    Features are L2-normalised; each test feature's k most cosine-similar train features vote for their
    class with weight ``exp(sim / temperature)``; all classes are ranked by summed votes (DINO sorts the
    whole vote vector, so when fewer than 5 classes got votes, classes without votes fill the remaining
    ranks). Top-1 is the first ranked class, top-5 counts a hit in the first ``min(5, k)``, as DINO does.
    DINO leaves the order of equal votes to an unstable sort; here it is the class index (a stable sort),
    so results do not depend on the device. A k larger than the train set is clipped
    (with a warning); results stay keyed by the requested k. Test features are processed in chunks of
    ``chunk_size`` rows (automatic: about 512 MiB of similarities) so ImageNet-size sets fit in memory;
    computation happens on ``train_features``' device.
    """
    _check_features(train_features, train_labels, "train")
    _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Train features have dimension {train_features.shape[1]}, test features {test_features.shape[1]}."
        )
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_train = train.shape[0]
    num_classes = _class_count(num_classes, train_labels, test_labels)

    effective = {}
    for k in ks:
        k = int(k)
        if k > num_train:
            warnings.warn(f"k={k} is larger than the {num_train} train features; using k={num_train}.", stacklevel=2)
        effective[k] = min(k, num_train)
    max_k = max(effective.values())
    if chunk_size is None:
        chunk_size = max(1, _KNN_SIMILARITY_BUDGET // num_train)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")

    top1 = dict.fromkeys(effective, 0)
    top5 = dict.fromkeys(effective, 0)
    num_test = test_features.shape[0]
    starts = range(0, num_test, chunk_size)
    for start in tqdm(starts, desc="k-NN", disable=not progress, unit="chunk"):
        queries = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        targets = test_labels[start : start + chunk_size].to(device=device, dtype=torch.long)
        similarity = queries @ train.T
        sims, indices = similarity.topk(max_k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[indices]
        weights = (sims / temperature).exp()
        for k, k_eff in effective.items():
            votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            ranked = votes.sort(dim=1, descending=True, stable=True).indices[:, : min(5, k_eff)]
            hits = ranked == targets[:, None]
            top1[k] += int(hits[:, 0].sum())
            top5[k] += int(hits.any(dim=1).sum())
    return {k: {"top1": 100.0 * top1[k] / num_test, "top5": 100.0 * top5[k] / num_test} for k in effective}


# --------------------------------------------------------------------------------------------------
# Semi-supervised label subsets
# --------------------------------------------------------------------------------------------------


def balanced_label_subset(labels: torch.Tensor | Sequence[int], fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded, per-class ``fraction`` of the samples (at least one per class).

    Each class keeps ``max(1, round(fraction * count))`` of its samples, so the 1% / 10% splits have the
    class balance of the full set and no class disappears.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}.")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    generator = torch.Generator().manual_seed(seed)
    # Group indices by class with one stable sort (ImageNet: 1.28M labels, 1000 classes).
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    chosen = []
    for members in torch.split(order, counts.tolist()):
        count = max(1, round(fraction * members.numel()))
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:count]])
    return torch.sort(torch.cat(chosen)).values


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


def probe_feature_kind(kind: str, config: Any) -> FeatureKind:
    """The linear-probe feature: ``kind`` itself, or for "auto" DINO's choice for the model's width.

    DINO probes ViT-S/T on the CLS tokens of the last 4 blocks ("last4_cls") and ViT-B on the last
    block's CLS + average-pooled patch tokens ("cls+avgpool"); "auto" gives "cls+avgpool" when
    ``config.hidden_size`` >= 768 and "last4_cls" below.
    """
    if kind != "auto":
        _check_kind(kind)
        return cast(FeatureKind, kind)
    hidden_size = getattr(config, "hidden_size", None)
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
        raise ValueError(
            f"Cannot choose the probe feature automatically: the model config has no integer hidden_size "
            f"(got {hidden_size!r}). Pick one of {FEATURE_KINDS} explicitly (--feature_kind)."
        )
    return "cls+avgpool" if hidden_size >= _AVGPOOL_MIN_HIDDEN_SIZE else "last4_cls"


@dataclass
class LinearProbeConfig:
    """DINO's linear evaluation: SGD momentum 0.9, weight decay 0, per-epoch cosine to 0, lr 1e-3 x batch / 256.

    ``lr_sweep`` trains one head per base lr in parallel on the same batches (scaled by batch / 256 like
    ``base_lr``) and reports the best: the lr sweep of DINO-style linear evaluations at the cost of one
    backbone pass. ``label_fraction`` keeps
    a balanced, seeded fraction of the training labels (semi-supervised 1% / 10%).

    The reported accuracy is the final epoch's. With ``eval_every`` > 0 the heads are also scored on
    the test set every that many epochs, and the best (epoch, lr) is reported beside it as
    ``best_epoch``: the number DINO's linear evaluation prints, chosen on the test set itself.
    """

    epochs: int = 100
    batch_size: int = 256
    base_lr: float = 1e-3
    lr: float | None = None
    lr_sweep: tuple[float, ...] | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_fraction: float | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = True
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 (final epoch only) or positive, got {self.eval_every}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.lr is not None and self.lr_sweep:
            raise ValueError("Give either lr (one absolute learning rate) or lr_sweep (base lrs), not both.")
        rates = [self.base_lr] if self.lr is None else [self.lr]
        rates += list(self.lr_sweep or [])
        if any(rate <= 0 for rate in rates):
            raise ValueError(f"Learning rates must be positive, got {rates}.")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}.")
        if self.lr_sweep is not None:
            self.lr_sweep = tuple(float(rate) for rate in self.lr_sweep)

    def learning_rates(self) -> list[float]:
        """The absolute learning rate of each head."""
        if self.lr is not None:
            return [self.lr]
        bases = list(self.lr_sweep) if self.lr_sweep else [self.base_lr]
        return [base * self.batch_size / 256 for base in bases]


def _make_heads(dim: int, num_classes: int, count: int, device: torch.device, seed: int) -> nn.ModuleList:
    """Linear heads initialised as DINO's linear classifier: weights N(0, 0.01), zero bias."""
    generator = torch.Generator().manual_seed(seed)
    heads = nn.ModuleList()
    for _ in range(count):
        head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
            head.bias.zero_()
        heads.append(head)
    return heads.to(device)


def _train_heads(
    dim: int,
    num_classes: int,
    epoch_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    config: LinearProbeConfig,
    device: torch.device,
    score: Callable[[nn.ModuleList], list[dict[str, float]]],
) -> list[tuple[int, list[dict[str, float]]]]:
    """The one training loop of both probe paths: heads for every lr, SGD, cosine stepped per epoch.

    Returns ``(epoch, score(heads))`` for every ``config.eval_every``-th epoch and always the last one.
    """
    lrs = config.learning_rates()
    heads = _make_heads(dim, num_classes, len(lrs), device, config.seed)
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(heads, lrs, strict=True)],
        lr=lrs[0],
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=0.0)
    heads.train()
    history: list[tuple[int, list[dict[str, float]]]] = []
    bar = tqdm(range(config.epochs), desc="linear probe", unit="epoch", disable=not config.progress)
    for epoch in bar:
        total, count = 0.0, 0
        for features, labels in epoch_batches(epoch):
            features = features.to(device).float()
            labels = labels.to(device=device, dtype=torch.long)
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(
                    f"Training labels must be class ids in [0, {num_classes}); got {labels.min()}..{labels.max()}. "
                    "Pass num_classes when the test set does not contain every class."
                )
            # Heads are independent, so the summed loss gives each head exactly its own gradient.
            loss = sum(F.cross_entropy(head(features), labels) for head in heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * labels.shape[0]
            count += labels.shape[0]
        if count == 0:
            raise ValueError("The probe's training data yielded no batches.")
        scheduler.step()
        bar.set_postfix(loss=total / count / len(heads))
        last = epoch + 1 == config.epochs
        if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            history.append((epoch + 1, score(heads)))
            heads.train()
    return history


@torch.no_grad()
def _score_heads(
    heads: nn.ModuleList, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096
) -> list[dict[str, float]]:
    device = next(heads.parameters()).device
    heads.eval()
    top1 = [0] * len(heads)
    top5 = [0] * len(heads)
    for start in range(0, features.shape[0], batch):
        x = features[start : start + batch].to(device).float()
        y = labels[start : start + batch].to(device=device, dtype=torch.long)
        for i, head in enumerate(heads):
            logits = head(x)
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = ranked == y[:, None]
            top1[i] += int(hits[:, 0].sum())
            top5[i] += int(hits.any(dim=1).sum())
    n = features.shape[0]
    return [{"top1": 100.0 * a / n, "top5": 100.0 * b / n} for a, b in zip(top1, top5, strict=True)]


def _probe_report(
    history: list[tuple[int, list[dict[str, float]]]],
    config: LinearProbeConfig,
    num_train: int,
    dim: int,
    num_classes: int,
) -> dict[str, Any]:
    """The final epoch's best head, and DINO's best over the scored epochs and heads."""
    lrs = config.learning_rates()
    scores = history[-1][1]
    best = max(range(len(scores)), key=lambda i: scores[i]["top1"])
    # max() keeps the first of equal scores: the earliest epoch, then the first lr.
    epoch, head, epoch_score = max(
        ((epoch, i, score) for epoch, epoch_scores in history for i, score in enumerate(epoch_scores)),
        key=lambda item: item[2]["top1"],
    )
    return {
        "top1": scores[best]["top1"],
        "top5": scores[best]["top5"],
        "lr": lrs[best],
        "per_lr": {f"{lr:g}": score for lr, score in zip(lrs, scores, strict=True)},
        "best_epoch": {**epoch_score, "lr": lrs[head], "epoch": epoch},
        "num_train": num_train,
        "feature_dim": dim,
        "num_classes": num_classes,
        "label_fraction": config.label_fraction,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
    }


def _probe_device(config: LinearProbeConfig, fallback: torch.device) -> torch.device:
    return torch.device(config.device) if config.device is not None else fallback


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: LinearProbeConfig | None = None,
    *,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Linear probe on pre-extracted features (the fast path: no augmentation).

    Returns ``{"top1", "top5", "lr", "per_lr": {lr: {"top1", "top5"}}, "num_train", ...}`` with the best
    head's test accuracy (percent). ``config.label_fraction`` trains on a balanced label subset.
    """
    config = config or LinearProbeConfig()
    _check_features(train_features, train_labels, "train")
    _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Train features have dimension {train_features.shape[1]}, test features {test_features.shape[1]}."
        )
    num_classes = _class_count(num_classes, train_labels, test_labels)
    if config.label_fraction is not None:
        keep = balanced_label_subset(train_labels, config.label_fraction, config.seed)
        train_features, train_labels = train_features[keep], train_labels[keep]
    device = _probe_device(config, train_features.device)
    train_features = train_features.to(device).float()
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_train = train_features.shape[0]
    generator = torch.Generator().manual_seed(config.seed)

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(num_train, generator=generator).to(device)
        for start in range(0, num_train, config.batch_size):
            index = order[start : start + config.batch_size]
            yield train_features[index], train_labels[index]

    history = _train_heads(
        train_features.shape[1],
        num_classes,
        epoch_batches,
        config,
        device,
        lambda heads: _score_heads(heads, test_features, test_labels),
    )
    return _probe_report(history, config, num_train, train_features.shape[1], num_classes)


def _subset_loader(loader: DataLoader, indices: torch.Tensor, seed: int) -> DataLoader:
    """The same loader over a subset of its dataset (shuffled, seeded): the semi-supervised training set."""
    if not hasattr(loader, "dataset") or not hasattr(loader.dataset, "__getitem__"):
        raise ValueError("label_fraction on images needs a map-style dataset (not streaming) to take a subset of.")
    return DataLoader(
        Subset(loader.dataset, indices.tolist()),
        batch_size=loader.batch_size,
        shuffle=True,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


def train_linear_probe_on_images(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: Iterable[Any],
    kind: FeatureKind = "last4_cls",
    config: LinearProbeConfig | None = None,
    *,
    train_labels: torch.Tensor | Sequence[int] | None = None,
    num_classes: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Linear probe through a frozen backbone (the faithful path): features are recomputed every epoch.

    Augmentation is whatever ``train_loader``'s transform does (DINO's: ``probe_train_transform``); the backbone
    runs in eval mode without gradients, as in DINO's linear evaluation. ``test_loader`` should use the
    eval preprocessing. With ``config.label_fraction`` the loader's dataset is subset per class; its
    labels come from ``train_labels`` (one per dataset item). Single process.
    """
    config = config or LinearProbeConfig()
    _check_kind(kind)
    device = _model_device(model)
    probe_device = _probe_device(config, device)
    with eval_mode(model):
        if config.label_fraction is not None:
            if train_labels is None:
                raise ValueError("label_fraction on images needs train_labels (one label per dataset item).")
            keep = balanced_label_subset(torch.as_tensor(train_labels), config.label_fraction, config.seed)
            train_loader = _subset_loader(train_loader, keep, config.seed)

        # The test features come first: they also give the feature width without drawing a training batch.
        test_features, test_labels = extract_features(
            model, test_loader, kind=kind, dtype=dtype, progress=config.progress, desc="test features"
        )
        dim = test_features.shape[1]
        known = [test_labels] if train_labels is None else [test_labels, torch.as_tensor(train_labels)]
        num_classes = _class_count(num_classes, *known)

        def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            for batch in train_loader:
                pixel_values, labels = split_batch(batch)
                if labels is None:
                    raise ValueError("The probe's training loader yields batches without labels.")
                if pixel_values.shape[0] == 0:  # every image of the batch failed to decode
                    continue
                with torch.no_grad(), _autocast(device, dtype):
                    features = compute_features(model, pixel_values.to(device, non_blocking=True), kind)
                yield features.float(), torch.as_tensor(labels)

        history = _train_heads(
            dim,
            num_classes,
            epoch_batches,
            config,
            probe_device,
            lambda heads: _score_heads(heads, test_features, test_labels),
        )
        num_train = _dataset_length(train_loader) or -1
        return _probe_report(history, config, num_train, dim, num_classes)


# --------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------


def default_feature_model(model: nn.Module) -> nn.Module:
    """The backbone to evaluate inside a training wrapper: unwraps DDP / compile and a ``student`` attribute."""
    model = unwrap_model(model)
    student = getattr(model, "student", None)
    if isinstance(student, nn.Module) and hasattr(student, "config"):
        return student
    return model


class KNNEvaluationCallback(TrainerCallback):
    """k-NN top-1 of the model being trained, every ``every_n_steps`` steps and at the end of training.

    Logged as ``eval_knn_top1`` (configurable) so training curves show it next to the loss. Attach with
    ``callback.attach(trainer)``: values then go through ``trainer.log`` (``state.log_history`` plus every
    reporting integration). Added with ``Trainer(callbacks=[...])`` alone, the callback has no trainer and
    appends ``{"eval_knn_top1", "epoch", "step"}`` to ``state.log_history`` itself (the history saved in
    checkpoints and ``trainer_state.json``). The model's train/eval modes are restored afterwards.

    ``train_labels`` / ``test_labels`` replace the labels of the loaders (for loaders that yield only
    pixels). Each process evaluates on the full loaders unless an ``accelerator`` that prepared them is
    given, in which case features are gathered across processes.
    """

    def __init__(
        self,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any],
        *,
        every_n_steps: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        kind: FeatureKind = "cls",
        train_labels: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
        num_classes: int | None = None,
        at_train_end: bool = True,
        metric_name: str = "eval_knn_top1",
        feature_model: Callable[[nn.Module], nn.Module] = default_feature_model,
        accelerator: Any | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps}.")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}.")
        _check_kind(kind)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.every_n_steps, self.k, self.temperature, self.kind = every_n_steps, k, temperature, kind
        self.train_labels, self.test_labels, self.num_classes = train_labels, test_labels, num_classes
        self.at_train_end, self.metric_name = at_train_end, metric_name
        self.feature_model, self.accelerator, self.dtype, self.progress = feature_model, accelerator, dtype, progress
        self.trainer: Any | None = None
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None

    def attach(self, trainer: Any) -> KNNEvaluationCallback:
        """Register with ``trainer`` and log through ``trainer.log`` (reaches TensorBoard, W&B, ...)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def evaluate(self, model: nn.Module) -> float:
        """k-NN top-1 (percent) of ``model`` (unwrapped with ``feature_model``) on the held-out loaders."""
        backbone = self.feature_model(model)
        (train_features, train_labels), (test_features, test_labels) = _train_test_features(
            backbone,
            self.train_loader,
            self.test_loader,
            self.kind,
            None,  # the model changes between evaluations: nothing to cache
            accelerator=self.accelerator,
            dtype=self.dtype,
            progress=self.progress,
        )
        if self.train_labels is not None:
            train_labels = torch.as_tensor(self.train_labels)
        if self.test_labels is not None:
            test_labels = torch.as_tensor(self.test_labels)
        for name, labels in (("train", train_labels), ("test", test_labels)):
            if labels.numel() and labels.min() < 0:
                raise ValueError(
                    f"The k-NN {name} loader yields no labels; give {name}_labels= to KNNEvaluationCallback."
                )
        result = knn_accuracy(
            train_features,
            train_labels,
            test_features,
            test_labels,
            ks=(self.k,),
            temperature=self.temperature,
            num_classes=self.num_classes,
        )
        return result[self.k]["top1"]

    def _log(self, state: TrainerState, control: TrainerControl, model: nn.Module | None) -> None:
        if model is None:
            raise ValueError("KNNEvaluationCallback received no model from the Trainer.")
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        value = self.evaluate(model)
        self.history.append({self.metric_name: value, "step": state.global_step})
        if self.trainer is not None:
            # trainer.log runs the on_log event, whose handler clears control.should_log; keep the flags
            # other callbacks set for this step (e.g. the regular loss logging) intact.
            flags = (control.should_log, control.should_evaluate, control.should_save)
            self.trainer.log({self.metric_name: value})
            control.should_log, control.should_evaluate, control.should_save = flags
        else:
            entry: dict[str, float] = {self.metric_name: value}
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            state.log_history.append({**entry, "step": state.global_step})
        logger.info("step %d: %s = %.2f", state.global_step, self.metric_name, value)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.every_n_steps and state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            self._log(state, control, kwargs.get("model"))
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.at_train_end:
            self._log(state, control, kwargs.get("model"))
        return control


# --------------------------------------------------------------------------------------------------
# Complete evaluations (used by the recipes and the demo)
# --------------------------------------------------------------------------------------------------


PRECISIONS: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


@dataclass
class EvalArguments:
    """The model to evaluate and how to run it (shared by ``recipes/eval_knn.py`` and ``recipes/eval_linear.py``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model directory or Hub id to evaluate (teacher or student; any AutoModel vision backbone)."},
    )
    feature_kind: str | None = field(
        default=None,
        metadata={
            "help": "Features: 'cls' (final CLS, DINO's k-NN), 'last4_cls' (CLS of the last 4 blocks, each through "
            "the final norm: DINO's ViT-S/T probe) or 'cls+avgpool' (CLS + mean patch token: ViT-B probe). "
            "Unset: 'cls' for k-NN; for the linear probe DINO's choice for the model ('auto'): 'cls+avgpool' "
            "when its hidden_size is 768 or more (ViT-B), else 'last4_cls'. The results record the kind used."
        },
    )
    batch_size: int = field(default=256, metadata={"help": "Images per forward pass (and per probe SGD step)."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes decoding images."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results to this JSON file."})
    feature_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache extracted features here (safetensors) and reuse them on the next run with the same "
            "model, feature kind and dataset size."
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention backend to load the model with ('sdpa', 'eager', ...)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository (only for repositories you trust)."}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "Autocast precision: 'auto' (bf16 on GPU, fp32 on CPU), 'bf16', 'fp16' or 'fp32'."},
    )
    num_classes: int | None = field(
        default=None,
        metadata={"help": "Number of classes; read from the label column's ClassLabel feature or the labels if unset."},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    add_to_card: bool = field(
        default=False,
        metadata={
            "help": "Add the results to the model card (README.md) of --model_name_or_path, a local folder written "
            "by recipes/distill.py; an earlier result of the same evaluation is replaced."
        },
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required: the model directory or Hub id to evaluate.")
        if self.add_to_card and not (Path(self.model_name_or_path) / "README.md").is_file():
            raise ValueError(
                f"--add_to_card needs a local model folder with a model card; {self.model_name_or_path!r} has no "
                "README.md. Evaluate the output folder of recipes/distill.py, or drop --add_to_card."
            )
        if self.feature_kind is not None:
            _check_kind(self.feature_kind)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}.")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers cannot be negative, got {self.num_workers}.")

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


def class_count(dataset: Any, label_column: str) -> int | None:
    """Number of classes a ``ClassLabel`` label column declares (None for a plain integer column).

    Declared classes beat the labels seen: a small test subset may miss a class the probe must still output.
    """
    feature = (getattr(dataset, "features", None) or {}).get(label_column)
    return getattr(feature, "num_classes", None)


@dataclass
class EvalSetup:
    """What both evaluation recipes start from: the frozen model, its normalisation, the results' metadata."""

    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    metadata: dict[str, Any]


def load_eval_setup(eval_args: EvalArguments, data_args: DataArguments) -> EvalSetup:
    """Load ``eval_args.model_name_or_path`` frozen in eval mode, with the normalisation it was trained with.

    Loading goes through ``models.load_teacher`` (``AutoModel.from_pretrained``, MAE masking switched
    off), so any teacher or student checkpoint is evaluated the same way. ``metadata`` (model, data
    source, normalisation) heads every results JSON.
    """
    name = eval_args.model_name_or_path
    trust = eval_args.trust_remote_code
    model = load_teacher(name, attn_implementation=eval_args.attn_implementation, trust_remote_code=trust, role="model")
    configured = getattr(model.config, "image_size", None)
    if isinstance(configured, int) and configured != data_args.image_size:
        logger.warning(
            "The model was configured for %d px images and is evaluated at --image_size %d "
            "(position embeddings are interpolated).",
            configured,
            data_args.image_size,
        )
    mean, std = image_stats(load_image_processor(name, trust_remote_code=trust))
    metadata = {
        "model": name,
        "data": {key: value for key, value in asdict(data_args).items() if value is not None},
        "image_mean": list(mean),
        "image_std": list(std),
    }
    return EvalSetup(model, mean, std, metadata)


def card_records(
    results: Mapping[str, Any], data_args: DataArguments, *, bank_limit: int | None = None
) -> list[EvalRecord]:
    """Model-card records of k-NN or linear-probe results on ``data_args``' data.

    A k-NN memory bank drawn as a subset (``bank_limit`` or ``--max_train_samples``) that is smaller than
    the whole train split is named with its size, so that a subset's number never passes for DINO's
    protocol, whose bank is every train image. The whole split's size comes from the files or
    ``--num_train_examples``; when it is unknown, a subset bank is named with its own size.
    """
    records = records_from_results(results, data_args.source_name, data_args.eval_split_name)
    limits = [n for n in (bank_limit, data_args.max_train_samples) if n is not None]
    if "knn" not in results or not limits:
        return records
    bank = results["num_train"]
    whole = count_examples(replace(data_args, max_train_samples=None), "train")
    if whole is not None and bank >= whole:
        return records
    note = f"memory bank: {bank} of {whole} train images" if whole else f"memory bank: {bank} train images"
    return [replace(record, metric_name=f"{record.metric_name}, {note}") for record in records]


def add_results_to_card(eval_args: EvalArguments, data_args: DataArguments, results: Mapping[str, Any]) -> None:
    """With ``--add_to_card``: the results become records of the evaluated folder's model card."""
    if eval_args.add_to_card:
        records = card_records(results, data_args)
        path = add_eval_records(eval_args.model_name_or_path, records)
        logger.info("Added %d result(s) to %s", len(records), path)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (markdown-compatible) of the results."""
    cells = [[str(h) for h in header]] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |" for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _write_json(
    results: Mapping[str, Any], output_json: str | os.PathLike[str] | None, accelerator: Any | None
) -> None:
    if output_json is not None and is_main_process(accelerator):
        path = Path(output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def _cache_file(cache_dir: str | os.PathLike[str] | None, split: str, kind: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / f"{split}-{kind.replace('+', '_')}.safetensors"


def _train_test_features(
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


def run_knn_eval(
    model: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    *,
    kind: FeatureKind = "cls",
    ks: Sequence[int] = DEFAULT_KNN_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    accelerator: Any | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    output_json: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    print_table: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full k-NN evaluation: extract (or load cached) features, weighted k-NN for every k, table + JSON.

    Both loaders should use the eval preprocessing (resize + center crop). The model is put in eval
    mode for the duration and restored afterwards. Returns ``{"knn": {k: {"top1", "top5"}}, ...}`` with
    string keys for k, as written to ``output_json``.
    """
    train, test = _train_test_features(
        model, train_loader, test_loader, kind, cache_dir, accelerator=accelerator, dtype=dtype, progress=progress
    )
    scores = knn_accuracy(*train, *test, ks=ks, temperature=temperature, num_classes=num_classes, progress=progress)
    results: dict[str, Any] = {
        **(extra or {}),
        "protocol": "knn",
        "kind": kind,
        "temperature": temperature,
        "num_train": int(train[0].shape[0]),
        "num_test": int(test[0].shape[0]),
        "feature_dim": int(train[0].shape[1]),
        "knn": {str(k): score for k, score in scores.items()},
    }
    if print_table and is_main_process(accelerator):
        rows = [(k, score["top1"], score["top5"]) for k, score in scores.items()]
        print(format_table(rows, ("k", "top-1 (%)", "top-5 (%)")))
    _write_json(results, output_json, accelerator)
    return results


def run_linear_eval(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: Iterable[Any],
    *,
    kind: ProbeFeatureKind = "auto",
    config: LinearProbeConfig | None = None,
    augment: bool = True,
    train_labels: torch.Tensor | Sequence[int] | None = None,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    output_json: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    print_table: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full linear (or semi-supervised) evaluation, as a table and JSON.

    ``augment=True`` is the faithful path (``train_loader`` applies ``probe_train_transform`` and the
    frozen backbone runs every epoch); ``augment=False`` extracts ``train_loader``'s features once
    (cacheable in ``cache_dir``; give it eval preprocessing) and trains on them. ``kind="auto"`` resolves
    with ``probe_feature_kind`` from the model's config; the results' ``"kind"`` is the feature used.
    """
    config = config or LinearProbeConfig()
    feature_kind = probe_feature_kind(kind, getattr(model, "config", None))
    how = "DINO's choice for this model's width" if kind == "auto" else "as requested"
    logger.info("Linear-probe features: %s (%s)", feature_kind, how)
    if augment:
        report = train_linear_probe_on_images(
            model,
            train_loader,
            test_loader,
            feature_kind,
            config,
            train_labels=train_labels,
            num_classes=num_classes,
            dtype=dtype,
        )
    else:
        train, test = _train_test_features(
            model, train_loader, test_loader, feature_kind, cache_dir, dtype=dtype, progress=config.progress
        )
        report = train_linear_probe(*train, *test, config, num_classes=num_classes)
    results: dict[str, Any] = {
        **(extra or {}),
        "protocol": "semi-supervised" if config.label_fraction is not None else "linear",
        "kind": feature_kind,
        "augment": augment,
        **report,
        "config": {key: value for key, value in asdict(config).items() if key != "progress"},
    }
    if print_table:
        rows = [(lr, score["top1"], score["top5"]) for lr, score in report["per_lr"].items()]
        print(format_table(rows, ("lr", "top-1 (%)", "top-5 (%)")))
        best = f"lr {report['lr']:g}, top-1 {report['top1']:.2f}%, top-5 {report['top5']:.2f}%"
        print(f"best ({feature_kind} features): {best}")
        best_epoch = report["best_epoch"]
        print(
            f"best over the scored epochs (DINO's number, chosen on the test set): epoch {best_epoch['epoch']}, "
            f"lr {best_epoch['lr']:g}, top-1 {best_epoch['top1']:.2f}%"
        )
    _write_json(results, output_json, None)
    return results
