"""The complete evaluations the recipes (and the demo) run: model loading, k-NN and linear runs, results.

The only part of the evaluation that knows about ``DataArguments``, teacher loading and model cards: the
protocols themselves work on models and loaders.

- ``EvalArguments`` / ``EvalDataArguments`` / ``load_eval_setup``: the model to evaluate, loaded frozen with
  its normalisation, and the data at the model's own image size unless one is given.
- ``run_knn_eval`` / ``run_linear_eval``: features, protocol, a printed table and a results JSON.
- ``card_records`` / ``add_results_to_card``: the results as model-card records.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.sources import DataArguments, count_examples
from ..data.transforms import image_stats
from ..families import UnsupportedModelError, configured_image_size, family_of
from ..hub import EvalRecord, add_eval_records, records_from_results
from ..models import load_image_processor, load_teacher
from ..validation import NON_NEGATIVE_INT, POSITIVE_INT, check_fields
from .features import FeatureKind, check_kind, is_main_process, train_test_features
from .knn import DEFAULT_KNN_KS, knn_accuracy, knn_ks_used
from .linear import (
    LinearProbeConfig,
    ProbeFeatureKind,
    probe_feature_kind,
    train_linear_probe,
    train_linear_probe_on_images,
)

logger = logging.getLogger(__name__)


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
    # transformers' default backend is sdpa for every supported family; a class without sdpa (a CNN, say)
    # then loads, and load_eval_setup refuses it as no ViT-family encoder instead of the load failing with
    # advice about attn_implementation.
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention backend to load the model with ('sdpa', 'eager', ...); unset: transformers' "
            "default (sdpa where the model has it)."
        },
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
            check_kind(self.feature_kind)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}.")
        check_fields(self, {"batch_size": POSITIVE_INT, "num_workers": NON_NEGATIVE_INT})

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


@dataclass
class EvalDataArguments(DataArguments):
    """``DataArguments`` of the evaluation recipes, whose ``--image_size`` defaults to the evaluated model's."""

    image_size: int | None = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Side of the square crop fed to the model, in pixels. Unset: the image size the model is "
            "configured for, so that its position embeddings are used as trained (a size given here that "
            "differs is interpolated, with a warning)."
        },
    )


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
    data_args: DataArguments  # as given, with an unset image size resolved to the model's


def load_eval_setup(eval_args: EvalArguments, data_args: DataArguments) -> EvalSetup:
    """Load ``eval_args.model_name_or_path`` frozen in eval mode, with the normalisation it was trained with.

    Loading goes through ``models.load_teacher`` (``AutoModel.from_pretrained``, MAE masking switched
    off), so any teacher or student checkpoint is evaluated the same way. A model outside the supported
    ViT families is refused here, before any data loads. An unset ``data_args.image_size``
    (:class:`EvalDataArguments`) becomes the model's configured size; the setup's ``data_args`` carry it.
    ``metadata`` (model, data source with the image size used, normalisation) heads every results JSON.
    """
    name = eval_args.model_name_or_path
    trust = eval_args.trust_remote_code
    model = load_teacher(name, attn_implementation=eval_args.attn_implementation, trust_remote_code=trust, role="model")
    try:
        family_of(model)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"Unsupported model: {error}") from None
    height, width = configured_image_size(model)
    if data_args.image_size is None:
        if height != width:
            raise ValueError(
                f"The model is configured for {height}x{width} px images; give the square crop side to evaluate "
                "at with --image_size."
            )
        data_args = replace(data_args, image_size=height)
    elif (height, width) != (data_args.image_size, data_args.image_size):
        logger.warning(
            "The model was configured for %dx%d px images and is evaluated at --image_size %d "
            "(position embeddings are interpolated).",
            height,
            width,
            data_args.image_size,
        )
    mean, std = image_stats(load_image_processor(name, trust_remote_code=trust))
    metadata = {
        "model": name,
        "data": {key: value for key, value in asdict(data_args).items() if value is not None},
        "image_mean": list(mean),
        "image_std": list(std),
    }
    return EvalSetup(model, mean, std, metadata, data_args)


def card_records(
    results: Mapping[str, Any], data_args: DataArguments, *, bank_limit: int | None = None
) -> list[EvalRecord]:
    """Model-card records of k-NN or linear-probe results on ``data_args``' data.

    A k-NN memory bank drawn as a subset (``bank_limit`` or ``--max_train_samples``) that is smaller than
    the whole train split is named with its size, so that a subset's number never passes for DINO's
    protocol, whose bank is every train image; so are the evaluation images when ``--max_eval_samples``
    kept fewer than the whole evaluation split ("evaluated on 500 of 50000 validation images"). The whole
    split's size comes from the files or ``--num_train_examples``; when it is unknown, a subset is named
    with its own size.
    """
    records = records_from_results(results, data_args.source_name, data_args.eval_split_name)
    notes: list[str] = []
    if "knn" in results and (bank_limit is not None or data_args.max_train_samples is not None):
        bank = _part_of_split(results["num_train"], data_args, "train")
        if bank is not None:
            notes.append(f"memory bank: {bank} train images")
    if data_args.max_eval_samples is not None:
        queries = _part_of_split(results["num_test"], data_args, "eval")
        if queries is not None:
            notes.append(f"evaluated on {queries} {data_args.eval_split_name} images")
    if not notes:
        return records
    return [replace(record, metric_name=", ".join([record.metric_name, *notes])) for record in records]


def _part_of_split(used: int, data_args: DataArguments, split: Literal["train", "eval"]) -> str | None:
    """``"N of M"`` when ``used`` examples are fewer than the ``M`` of the whole split, ``"N"`` when ``M`` is
    unknown, None when they are the whole split."""
    whole = count_examples(replace(data_args, max_train_samples=None, max_eval_samples=None), split)
    if whole is not None and used >= whole:
        return None
    return f"{used} of {whole}" if whole else str(used)


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
    string keys for k, as written to ``output_json``: each k is one the memory bank could give, so a
    requested k larger than the bank appears as ``k = num_train``; ``ks_requested`` lists the request and
    ``clipped_ks`` maps each requested k that was larger than the bank to the k it was reported as.
    """
    train, test = train_test_features(
        model, train_loader, test_loader, kind, cache_dir, accelerator=accelerator, dtype=dtype, progress=progress
    )
    scores = knn_accuracy(*train, *test, ks=ks, temperature=temperature, num_classes=num_classes, progress=progress)
    num_train = int(train[0].shape[0])
    results: dict[str, Any] = {
        **(extra or {}),
        "protocol": "knn",
        "kind": kind,
        "temperature": temperature,
        "num_train": num_train,
        "num_test": int(test[0].shape[0]),
        "feature_dim": int(train[0].shape[1]),
        "ks_requested": [int(k) for k in ks],
        "clipped_ks": {str(k): used for k, used in knn_ks_used(ks, num_train).items() if used != k},
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
        train, test = train_test_features(
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
