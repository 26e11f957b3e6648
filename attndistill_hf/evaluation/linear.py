"""DINO's linear probe on frozen features, and the balanced label subsets of the semi-supervised probe.

``train_linear_probe`` (cached features, no augmentation) and ``train_linear_probe_on_images`` (frozen
backbone, augmentation from the loader: ``probe_train_transform``) share one SGD + cosine training loop
with an optional lr sweep trained as parallel heads; ``probe_feature_kind`` picks DINO's probe feature for
a model; ``balanced_label_subset`` gives the 1% / 10% semi-supervised label splits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..validation import POSITIVE, POSITIVE_INT, Bound, check_fields, check_value
from .features import (
    FEATURE_KINDS,
    FeatureKind,
    check_features,
    check_kind,
    compute_features,
    eval_mode,
    evaluation_autocast,
    extract_features,
    loader_length,
    model_device,
    num_classes_of,
    split_batch,
)

ProbeFeatureKind = Literal["auto", "cls", "last4_cls", "cls+avgpool"]
# A share of the labelled samples: some, at most all.
_FRACTION = Bound(above=0, maximum=1)
# The ranges of LinearProbeConfig's numeric fields (the learning rates are checked by which of them applies).
_PROBE_BOUNDS: dict[str, Bound] = {
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "eval_every": Bound(integer=True, minimum=0, text="0 (the final epoch only) or a positive integer"),
    "label_fraction": replace(_FRACTION, optional=True),
}
# DINO's linear probe: CLS + average-pooled patch tokens from ViT-B's width on, the last 4 CLS below.
_AVGPOOL_MIN_HIDDEN_SIZE = 768


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
    check_value("fraction", fraction, _FRACTION)
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
        check_kind(kind)
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
        check_fields(self, _PROBE_BOUNDS, prefix="")
        if self.lr is not None and self.lr_sweep:
            raise ValueError("Give either lr (one absolute learning rate) or lr_sweep (base lrs), not both.")
        if self.lr is None:
            check_value("base_lr", self.base_lr, POSITIVE)
        else:
            check_value("lr", self.lr, POSITIVE)
        if self.lr_sweep:
            check_value("lr_sweep", list(self.lr_sweep), POSITIVE)
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
    num_test: int,
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
        "num_test": num_test,
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

    Returns ``{"top1", "top5", "lr", "per_lr": {lr: {"top1", "top5"}}, "num_train", "num_test", ...}`` with the best
    head's test accuracy (percent). ``config.label_fraction`` trains on a balanced label subset.
    """
    config = config or LinearProbeConfig()
    check_features(train_features, train_labels, "train")
    check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Train features have dimension {train_features.shape[1]}, test features {test_features.shape[1]}."
        )
    num_classes = num_classes_of(num_classes, train_labels, test_labels)
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
    return _probe_report(history, config, num_train, test_features.shape[0], train_features.shape[1], num_classes)


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
    check_kind(kind)
    device = model_device(model)
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
        num_classes = num_classes_of(num_classes, *known)

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
                with torch.no_grad(), evaluation_autocast(device, dtype):
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
        num_train = loader_length(train_loader) or -1
        return _probe_report(history, config, num_train, test_features.shape[0], dim, num_classes)
