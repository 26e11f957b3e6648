"""The offline Fashion-MNIST demo's shared stages: its supervised teacher, its sizes, the distillation launch.

``recipes/train_teacher.py`` and the demo's and the ablation's runs (``demo/run.py``, ``demo/ablation.py``)
share this module, so that the teacher, its cache, the k-NN protocol and the way distillation is started
are the same in all three.

AttnDistill's teachers are self-supervised ViTs (DINO, Mugs, MAE). None of them exists for 28 px
clothing images, and self-supervised pre-training does not fit a CPU budget of minutes, so the demo
teacher is trained **with labels**: transformers' ``ViTForImageClassification`` learns the ten classes
with ``Trainer`` (cross-entropy, AdamW, warm-up then cosine) on the library's training view, and only
its backbone ``ViTModel`` is kept. The distillation uses no labels; the teacher is simply a ViT whose
last-layer CLS token and CLS attention are meaningful for these images, which is all AttnDistill needs.

A teacher folder is a Hub-ready model repo: ``config.json`` + ``model.safetensors`` (a plain
``ViTModel``), ``preprocessor_config.json``, ``README.md`` (its card) and ``teacher_recipe.json`` (the
recipe, its hash and the measured k-NN). A later run with the same recipe and the same data (the hash
covers both) finds it and reuses it instead of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml
from huggingface_hub import ModelCard, ModelCardData
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, ViTModel, set_seed

from ..data import DataArguments, ImageCollator, decode_image, eval_view_loader, load_split, train_transform
from ..evaluation import run_knn_eval
from ..hardware import hardware_description
from ..hub import (
    EvalRecord,
    code_block,
    public_name,
    publish_local_paths,
    records_from_results,
    redact,
    results_table,
    summary_table,
    usage_snippet,
)
from ..models import LAYER_NORM_EPS, build_image_processor, build_student, sincos_2d_position_embeddings
from ..trainer import exportable_student
from .fashion_mnist import CLASS_NAMES, HUB_DATASET_ID, INFO_FILENAME

logger = logging.getLogger(__name__)

RECIPE_FILENAME = "teacher_recipe.json"
# Bump when the training code changes what a recipe produces, so that cached teachers are retrained.
RECIPE_VERSION = 3
TEACHER_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
LAUNCHERS: tuple[str, ...] = ("auto", "accelerate", "python")


@dataclass
class TeacherRecipe:
    """How the teacher is made. Every field goes into the recipe hash (with the data's own hash)."""

    image_size: int = field(default=32, metadata={"help": "Side of the RGB crops the teacher sees, in pixels."})
    patch_size: int = field(default=4, metadata={"help": "ViT patch size (32 / 4 = an 8x8 grid of patches)."})
    hidden_size: int = field(default=96, metadata={"help": "Width of the ViT."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per block."})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP width as a multiple of the ViT width."})
    sincos_position_embeddings: bool = field(
        default=True,
        metadata={"help": "Fixed 2-D sin-cos position embeddings (as MAE) instead of learned ones: faster to train."},
    )
    max_steps: int = field(default=2400, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (Trainer's rule: not on biases and LayerNorms)."}
    )
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps, then cosine to 0."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the cross-entropy."})
    crop_scale_min: float = field(
        default=0.35, metadata={"help": "Smallest area fraction of the random resized crop (largest: 1)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: none)."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, the batches and the augmentation."})


@dataclass
class TeacherRunArguments:
    """Where the data comes from and where the teacher goes (not part of the recipe hash)."""

    data_dir: str = field(
        default="data/fashion_mnist",
        metadata={"help": "Folder of Fashion-MNIST parquet shards (recipes/prepare_fashion_mnist.py)."},
    )
    output_dir: str = field(default="outputs/demo-teacher", metadata={"help": "Where the teacher is written."})
    overwrite: bool = field(default=False, metadata={"help": "Train again even when a matching teacher exists."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of the k-NN feature extraction."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


@dataclass(frozen=True)
class DemoScale:
    """How much data and how many steps a demo run uses."""

    max_train: int
    max_test: int
    teacher: TeacherRecipe
    distill_overrides: tuple[str, ...] = ()


# The full demo: about 7 minutes on 2 idle CPU cores from a cold start, 4 of them training the teacher.
FULL = DemoScale(max_train=10_000, max_test=2_000, teacher=TeacherRecipe())
# --quick: a small slice that still shows the effect, for the test suite (a few minutes on 2 cores).
QUICK = DemoScale(
    max_train=2_000,
    max_test=500,
    teacher=TeacherRecipe(max_steps=400, warmup_steps=30),
    distill_overrides=(
        "--max_steps",
        "400",
        "--warmup_steps",
        "30",
        "--logging_steps",
        "20",
        "--card_limitations",
        "Quick test run of the demo (2,000 Fashion-MNIST images, 400 steps): a check, not a model to use.",
    ),
)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def shard_files(data_dir: str | os.PathLike[str], split: str) -> list[Path]:
    """The parquet shards of one split ('train' or 'test'), sorted; raises when there are none."""
    files = sorted(Path(data_dir).glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"No {split}-*.parquet shards in {data_dir}; write them with "
            f"`python recipes/prepare_fashion_mnist.py --output_dir {data_dir}`."
        )
    return files


def data_fingerprint(data_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the bytes of every train and test shard: the exact data a teacher was made from."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for path in shard_files(data_dir, split):
            digest.update(f"{split}:{path.name}:".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def recipe_hash(recipe: TeacherRecipe, fingerprint: str) -> str:
    """Short hash of the recipe, the data and the code version: equal hashes mean the same teacher."""
    payload = json.dumps({"version": RECIPE_VERSION, "recipe": asdict(recipe), "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shard_data_args(data_dir: str | os.PathLike[str], image_size: int) -> DataArguments:
    """The prepared shards of ``data_dir`` as the library's data arguments (train and test splits)."""
    return DataArguments(
        data_files=[str(Path(data_dir) / "train-*.parquet")],
        eval_data_files=[str(Path(data_dir) / "test-*.parquet")],
        image_size=image_size,
    )


def knn_loaders(
    data_dir: str | os.PathLike[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
) -> tuple[DataLoader, DataLoader]:
    """Every labelled train image (the memory bank) and test image, in the k-NN evaluation view.

    The same loaders serve the teacher's card, the demo and the ablation, so every number of the demo
    is measured with one protocol on one held-out split.
    """
    data_args = shard_data_args(data_dir, image_size)
    train, _ = eval_view_loader(data_args, "train", mean, std, batch_size=batch_size, streaming=False)
    test, _ = eval_view_loader(data_args, "eval", mean, std, batch_size=batch_size, streaming=False)
    return train, test


def pixel_stats(dataset: Any, image_column: str = "image") -> tuple[float, float]:
    """Mean and standard deviation of the grayscale pixels (in [0, 1]) of every image of ``dataset``."""
    pixels = np.stack([np.asarray(decode_image(value).convert("L")) for value in dataset[image_column]])
    scaled = pixels.astype(np.float64) / 255.0
    return round(float(scaled.mean()), 4), round(float(scaled.std()), 4)


class ClassificationCollator:
    """:class:`~attndistill_hf.data.ImageCollator` batches for a classifier: pixel values and labels.

    The skipped-image count is left out, since ``ViTForImageClassification.forward`` would hand it on
    to its layers; an undecodable image is dropped from the batch together with its label.
    """

    def __init__(self, transform: Any, label_column: str = "label") -> None:
        self.collate = ImageCollator(transform, label_column=label_column)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(examples)
        batch.pop("skipped_images")
        return batch


# --------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------


def teacher_classifier(recipe: TeacherRecipe) -> ViTForImageClassification:
    """The classifier the teacher is trained as, initialised with ``recipe.seed`` (heads named by class)."""
    config = ViTConfig(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        num_channels=3,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.mlp_ratio * recipe.hidden_size,
        layer_norm_eps=LAYER_NORM_EPS,
        qkv_bias=True,
        num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(CLASS_NAMES)},
    )
    config._attn_implementation = "sdpa"
    set_seed(recipe.seed)
    model = ViTForImageClassification(config)
    if recipe.sincos_position_embeddings:
        grid = recipe.image_size // recipe.patch_size
        with torch.no_grad():
            table = sincos_2d_position_embeddings(recipe.hidden_size, grid, grid)
            model.vit.embeddings.position_embeddings.copy_(table.unsqueeze(0))
        model.vit.embeddings.position_embeddings.requires_grad_(False)  # Trainer optimises trainable ones only
    return model


def teacher_training_arguments(recipe: TeacherRecipe, run: TeacherRunArguments) -> TrainingArguments:
    """The recipe as ``TrainingArguments``: AdamW, linear warm-up then cosine to 0, label smoothing, clipping."""
    return TrainingArguments(
        output_dir=run.output_dir,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_steps,
        lr_scheduler_type="cosine",
        label_smoothing_factor=recipe.label_smoothing,
        max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed,
        # The collator decodes the image column, which the classifier's forward does not name.
        remove_unused_columns=False,
        # 28 px images decode and augment in well under the time of a step: workers would only compete
        # with the model for the CPU cores.
        dataloader_num_workers=0,
        logging_steps=max(1, recipe.max_steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=not run.progress,
    )


def cached_record(output_dir: str | os.PathLike[str], expected_hash: str) -> dict[str, Any] | None:
    """The recipe record of a complete teacher in ``output_dir`` made with ``expected_hash``, else None."""
    out = Path(output_dir)
    record_path = out / RECIPE_FILENAME
    if not record_path.is_file() or not all((out / name).is_file() for name in TEACHER_FILES):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("recipe_hash") == expected_hash else None


def train_teacher(recipe: TeacherRecipe, run: TeacherRunArguments) -> dict[str, Any]:
    """Train, evaluate and save the teacher (or reuse a matching one). Returns its recipe record.

    The record (also ``teacher_recipe.json``) holds the recipe, its hash, the data description, the
    k-NN results, wall times and ``"reused": True`` when nothing was trained.
    """
    data_dir, out = Path(run.data_dir), Path(run.output_dir)
    fingerprint = data_fingerprint(data_dir)
    expected = recipe_hash(recipe, fingerprint)
    if not run.overwrite and (record := cached_record(out, expected)) is not None:
        logger.info("Reusing the teacher in %s (recipe hash %s)", out, expected)
        write_teacher_card(out, record)  # the card follows this code; the numbers, the record
        return {**record, "reused": True}

    started = time.time()
    train_set = load_split(shard_data_args(data_dir, recipe.image_size), "train")
    mean, std = pixel_stats(train_set)
    image_mean, image_std = [mean] * 3, [std] * 3
    view = train_transform(recipe.image_size, image_mean, image_std, scale=(recipe.crop_scale_min, 1.0))
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILENAME).unlink(missing_ok=True)  # written last: its presence means "complete"
    trainer = Trainer(
        model=teacher_classifier(recipe),
        args=teacher_training_arguments(recipe, run),
        train_dataset=train_set,
        data_collator=ClassificationCollator(view),
    )
    train_loss = trainer.train().metrics["train_loss"]
    train_time = time.time() - started
    backbone: ViTModel = trainer.model.vit.eval()
    train_loader, test_loader = knn_loaders(
        data_dir, recipe.image_size, image_mean, image_std, batch_size=run.eval_batch_size
    )
    knn = run_knn_eval(backbone, train_loader, test_loader, progress=run.progress, print_table=False)

    # Saved as AutoModel builds a ViTModel (with its unused pooler), so loading it reports nothing missing.
    exportable_student(backbone).save_pretrained(out)
    build_image_processor(recipe.image_size, image_mean, image_std).save_pretrained(out)
    grid = recipe.image_size // recipe.patch_size
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record: dict[str, Any] = {
        "name": out.name,
        "recipe_hash": expected,
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "data": {**_data_description(data_dir), "sha256": fingerprint},
        "image_mean": image_mean,
        "image_std": image_std,
        "num_patches": grid * grid,
        "num_parameters": sum(p.numel() for p in backbone.parameters()),
        "epochs": recipe.max_steps * recipe.batch_size / len(train_set),
        # Trainer's train_loss is the mean over the run; the last logged loss, over its last logging window.
        "train_metrics": {"mean_train_loss": train_loss, "final_train_loss": losses[-1] if losses else None},
        "train_time_s": round(train_time, 1),
        "total_time_s": round(time.time() - started, 1),
        "hardware": hardware_description(trainer.args.device),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "knn": knn,
    }
    write_teacher_card(out, record)
    (out / RECIPE_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "reused": False}


def _data_description(data_dir: Path) -> dict[str, Any]:
    """What the card says about the data: source (never a local path), subset sizes and seed."""
    info_path = data_dir / INFO_FILENAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    source = info.get("source")
    return {
        "source": (
            f"the Hub dataset `{HUB_DATASET_ID}`"
            if source == HUB_DATASET_ID
            else "the original IDX files of Zalando Research (as packaged by Debian in `dataset-fashion-mnist`)"
        ),
        "num_examples": info.get("num_examples", {}),
        "max_examples": info.get("max_examples", {}),
        "subset_seed": info.get("seed"),
    }


def build_teacher_card(
    *,
    model_name: str,
    description: str,
    provenance: Sequence[str],
    recipe_text: str,
    training_summary: Mapping[str, Any],
    eval_results: Sequence[EvalRecord],
    evaluation: str,
    limitations: str,
    datasets: Sequence[str] = (),
    extra_tags: Iterable[str] = (),
    license: str = "apache-2.0",
) -> ModelCard:
    """The model card of the demo's supervised teacher.

    ``description`` opens the card; ``provenance`` lists how it was made (data, objective,
    augmentation), one bullet each; ``recipe_text`` is the recipe as its config file reads;
    ``eval_results`` become ``model-index`` entries and the results table, introduced by
    ``evaluation`` (the protocol). ``datasets`` are Hub dataset ids. Like the student's card, every
    number comes from the arguments and the text passes through :func:`~attndistill_hf.hub.redact`.
    """
    records = list(eval_results)
    card_data = ModelCardData(
        model_name=public_name(model_name),
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=license,
        datasets=list(datasets) or None,
        tags=list(dict.fromkeys(["vit", "teacher", *extra_tags])),
        eval_results=[record.to_eval_result() for record in records] or None,
    )
    sections = [
        f"# {public_name(model_name)}",
        description,
        "## How it was made",
        "\n".join(f"- {item}" for item in provenance),
        "## Training recipe",
        code_block(publish_local_paths(recipe_text), "yaml"),
        "## Training summary",
        summary_table(training_summary),
        "## Results",
        evaluation,
        results_table(records),
        "## How to use",
        code_block(usage_snippet("path/to/this/folder"), "python"),
        "## Limitations",
        limitations,
    ]
    body = "\n\n".join(sections) + "\n"
    return ModelCard(redact(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def write_teacher_card(output_dir: Path, record: Mapping[str, Any]) -> None:
    """The teacher's model card (``README.md``), rendered from its recipe record: every number in it was measured."""
    recipe, data, knn = record["recipe"], record["data"], record["knn"]
    counts = data["num_examples"]
    subsets = "class-balanced seeded subsets" if any(data["max_examples"].values()) else "the complete splits"
    position = "fixed 2-D sin-cos" if recipe["sincos_position_embeddings"] else "learned"
    mean, std = record["image_mean"][0], record["image_std"][0]
    records = [
        replace(result, dataset_type=HUB_DATASET_ID) for result in records_from_results(knn, "fashion_mnist", "test")
    ]
    card = build_teacher_card(
        model_name=record["name"],
        description=(
            "A small Vision Transformer trained **with labels (supervised)** on Fashion-MNIST, the teacher of "
            "the AttnDistill demo (`python recipes/distill.py recipes/configs/demo.yaml`). Only the backbone is "
            "published: a plain transformers `ViTModel` whose last-layer CLS token (after the final LayerNorm) "
            f"is the image feature. Architecture: {recipe['num_hidden_layers']} layers, width "
            f"{recipe['hidden_size']}, {recipe['num_attention_heads']} heads, patch {recipe['patch_size']} on "
            f"{recipe['image_size']} px RGB crops ({record['num_patches']} patches + CLS), {position} position "
            f"embeddings, {record['num_parameters'] / 1e6:.2f} M parameters (plus the untrained pooler that "
            "`AutoModel` builds for a `ViTModel`, which the features never use)."
        ),
        provenance=[
            f"**Data**: Fashion-MNIST from {data['source']}, as parquet shards of "
            f"`recipes/prepare_fashion_mnist.py`: {counts.get('train', '?')} train and {counts.get('test', '?')} "
            f"test images ({subsets}, subset seed {data['subset_seed']}); grayscale repeated over 3 channels.",
            "**Objective**: supervised. transformers' `ViTForImageClassification` (a linear head on the final CLS "
            "token) trained by `Trainer` (`recipes/train_teacher.py`) with cross-entropy (label smoothing "
            f"{recipe['label_smoothing']}); the head is dropped afterwards. AttnDistill's published teachers are "
            "self-supervised; a supervised one is what fits a CPU budget of minutes. The distillation of the demo "
            "uses no labels.",
            f"**Optimisation**: AdamW (betas 0.9 / 0.999, weight decay {recipe['weight_decay']} except on biases "
            f"and LayerNorms), peak learning rate {recipe['learning_rate']}, {recipe['warmup_steps']} linear "
            f"warm-up steps then cosine to 0, {recipe['max_steps']} steps of {recipe['batch_size']} images, "
            f"gradient clipping {recipe['max_grad_norm']}, seed {recipe['seed']}.",
            "**Augmentation**: the library's training view (`attndistill_hf.data.train_transform`): "
            f"RandomResizedCrop to {recipe['image_size']} px (area {recipe['crop_scale_min']} to 1, aspect 3/4 "
            f"to 4/3, bicubic) + horizontal flip, normalised with the train images' mean {mean:.4f} and std "
            f"{std:.4f} (stored in `preprocessor_config.json`).",
        ],
        recipe_text=f"# recipe hash {record['recipe_hash']}\n" + yaml.safe_dump(dict(recipe), sort_keys=False),
        training_summary={
            "steps": recipe["max_steps"],
            "epochs": round(record["epochs"], 2),
            **{key: round(value, 4) for key, value in record["train_metrics"].items() if value is not None},
            "hardware": record["hardware"],
            "wall_time_s": record["train_time_s"],
            "date": record["date"],
        },
        eval_results=records,
        evaluation=(
            "Weighted k-NN of the frozen CLS features (DINO's protocol: cosine similarity, votes weighted by "
            f"exp(sim / 0.07)), memory bank = the {knn['num_train']} train images, evaluated on the "
            f"{knn['num_test']} held-out test images in the evaluation view (resize + centre crop to "
            f"{recipe['image_size']} px), measured at the end of the training run:"
        ),
        limitations=(
            "A demonstration model: a few minutes of CPU training on 28 px grayscale clothing images. It knows "
            "nothing beyond Fashion-MNIST, and it was trained with labels, unlike the self-supervised teachers "
            "the method is meant for."
        ),
        datasets=[HUB_DATASET_ID],
        extra_tags=["fashion-mnist", "attndistill"],
    )
    card.save(output_dir / "README.md")


# --------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------


def untrained_student(config: Mapping[str, Any], image_size: int, seed: int) -> torch.nn.Module:
    """distill.py's student at initialisation: the config's preset and patch size, built with the same seed."""
    preset, patch_size = config["student_preset"], config.get("patch_size")
    return build_student(preset, image_size=image_size, patch_size=patch_size, seed=seed).eval()


def path_overrides(config: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Flags for the values that differ from the config file (so a default run's card shows just the file)."""
    flags: list[str] = []
    for key, value in wanted.items():
        current = config.get(key)
        if isinstance(value, list):
            if current != value and [current] != value:
                flags += [f"--{key}", *value]
        elif current != value:
            flags += [f"--{key}", str(value)]
    return flags


def distill_command(script: str | os.PathLike[str], launcher: str = "auto") -> list[str]:
    """``accelerate launch`` on one CPU process, or the plain interpreter ('python', or 'auto' without accelerate)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}.")
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    accelerate = shutil.which("accelerate", path=search)
    if launcher == "accelerate" and accelerate is None:
        raise FileNotFoundError("--launcher accelerate: the `accelerate` command was not found.")
    if launcher == "python" or accelerate is None:
        return [sys.executable, str(script)]
    return [
        accelerate,
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--cpu",
        "--num_cpu_threads_per_process",
        str(torch.get_num_threads()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
    ]


def launch_distillation(
    script: str | os.PathLike[str],
    config_path: str | os.PathLike[str],
    overrides: Sequence[str],
    *,
    launcher: str = "auto",
    quiet: bool = False,
) -> float:
    """Run ``script`` (recipes/distill.py) on ``config_path`` + ``overrides``; returns its wall time in seconds.

    The demo and the ablation both start distillation here, in a process of its own and as a user
    would type it, rather than calling the recipe's ``main`` in theirs: every run starts clean (global
    RNG, logging set-up, Accelerate's process state, torch threads), and no recipe has to put another
    on its import path. The price is the interpreter's start-up, a few seconds per run. ``quiet`` keeps
    the run's output and shows its end only when it fails; a failure raises ``ChildProcessError``.
    """
    command = [*distill_command(script, launcher), str(config_path), *overrides]
    if not quiet:
        print("$ " + shlex.join(command), flush=True)
    env = dict(os.environ)
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("MPLBACKEND", "Agg"),
    ):
        env.setdefault(name, value)
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=quiet, text=True, check=False)
    if done.returncode != 0:
        if quiet:
            sys.stderr.write((done.stdout + done.stderr)[-4000:])
        raise ChildProcessError(f"distillation exited with status {done.returncode}: {shlex.join(command)}")
    return time.time() - started
