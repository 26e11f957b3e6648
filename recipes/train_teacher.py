"""Train the demo teacher: a small **supervised** ViT on Fashion-MNIST, on a CPU, in a couple of minutes.

AttnDistill's teachers are self-supervised ViTs (DINO, Mugs, MAE). None of them exists for 28 px
clothing images, and self-supervised pre-training does not fit a CPU budget of minutes, so the demo
teacher is trained **with labels**: a ``ViTForImageClassification`` (linear head on the final CLS
token) learns the ten Fashion-MNIST classes with cross-entropy. Only its backbone is kept. The
distillation that follows uses no labels at all; the teacher is simply a ViT whose last-layer CLS
token and CLS attention are meaningful for these images, which is all AttnDistill needs.

    python recipes/train_teacher.py --data_dir data/fashion_mnist --output_dir outputs/demo-teacher

What it writes to ``--output_dir`` (a Hub-ready model folder, a few MB):

- ``config.json`` + ``model.safetensors``: the backbone as a plain transformers ``ViTModel``
  (patch 4 on 32 px RGB crops: an 8x8 grid of patches, so the attention maps have some resolution);
- ``preprocessor_config.json``: a ``ViTImageProcessor`` (32 px, the mean / std of the training images);
- ``README.md``: a model card saying how it was made (data, steps, time, seed) and its k-NN top-1 on
  the test split, measured at the end of the run;
- ``teacher_recipe.json``: the recipe, its hash and the measured numbers. A later run with the same
  recipe and the same data (the hash covers both) finds it and reuses the teacher instead of training.

Images are the parquet shards of ``recipes/prepare_fashion_mnist.py``. Training decodes them once
into memory and augments whole batches at once (random resized crop + horizontal flip, one affine
resampling per batch), which keeps two CPU cores busy with the model rather than with image decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel
from transformers.image_utils import PILImageResampling

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.data import DataArguments, eval_view_loader
from attndistill_hf.evaluation import run_knn_eval
from attndistill_hf.fashion_mnist import CLASS_NAMES, HUB_DATASET_ID, INFO_FILENAME
from attndistill_hf.hub import EvalRecord
from attndistill_hf.models import sincos_2d_position_embeddings
from attndistill_hf.trainer import exportable_student

logger = logging.getLogger("attndistill_hf.train_teacher")

RECIPE_FILENAME = "teacher_recipe.json"
# Bump when the training code changes what a recipe produces, so cached teachers are retrained.
RECIPE_VERSION = 2
KNN_KS: tuple[int, ...] = (10, 20, 100, 200)


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
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on >= 2-D weights."})
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


def load_images(data_dir: str | os.PathLike[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as ``uint8 [N, H, W]`` (grayscale) and their labels ``long [N]``."""
    import pyarrow.parquet as pq

    images: list[np.ndarray] = []
    labels: list[int] = []
    for path in shard_files(data_dir, split):
        table = pq.read_table(path, columns=["image", "label"]).to_pydict()
        for value, label in zip(table["image"], table["label"], strict=True):
            with Image.open(io.BytesIO(value["bytes"])) as image:
                images.append(np.asarray(image.convert("L"), dtype=np.uint8))
            labels.append(int(label))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long)


def random_resized_crop_flip(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """A random resized crop (area in ``scale``, aspect ratio 3/4 to 4/3) and a horizontal flip per image.

    ``images`` is ``float [B, C, H, W]``; the result is ``[B, C, size, size]``, resampled bilinearly with
    one ``grid_sample`` for the whole batch (no per-image Python work).
    """
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    area = uniform(*scale)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    # Crop width and height as fractions of the image side (affine_grid works in [-1, 1] units).
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = uniform(-1.0, 1.0) * (1 - width)
    centre_y = uniform(-1.0, 1.0) * (1 - height)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def knn_loaders(
    data_dir: str | os.PathLike[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    max_train: int | None = None,
    max_test: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Labelled train (memory bank) and test loaders with the k-NN evaluation view (resize + centre crop).

    The same loaders serve the teacher's card, the demo and the ablation, so every number of the demo
    is measured with one protocol on one held-out split.
    """
    data_args = DataArguments(
        data_files=[str(Path(data_dir) / "train-*.parquet")],
        eval_data_files=[str(Path(data_dir) / "test-*.parquet")],
        image_size=image_size,
        max_train_samples=max_train,
        max_eval_samples=max_test,
    )
    train, _ = eval_view_loader(data_args, "train", mean, std, batch_size=batch_size, streaming=False)
    test, _ = eval_view_loader(data_args, "eval", mean, std, batch_size=batch_size, streaming=False)
    return train, test


# --------------------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------------------


def teacher_config(recipe: TeacherRecipe) -> ViTConfig:
    """The teacher's ``ViTConfig`` (with the class names, so the head of the training model is labelled)."""
    return ViTConfig(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        num_channels=3,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.mlp_ratio * recipe.hidden_size,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(CLASS_NAMES)},
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_classifier(
    recipe: TeacherRecipe, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, progress: bool
) -> tuple[ViTForImageClassification, dict[str, float]]:
    """Supervised training of a ViT classifier on ``images`` (uint8 [N, H, W]); returns it and the last metrics."""
    torch.manual_seed(recipe.seed)
    config = teacher_config(recipe)
    config._attn_implementation = "sdpa"
    model = ViTForImageClassification(config)
    if recipe.sincos_position_embeddings:
        grid = recipe.image_size // recipe.patch_size
        table = sincos_2d_position_embeddings(recipe.hidden_size, grid, grid)
        with torch.no_grad():
            model.vit.embeddings.position_embeddings.copy_(table.unsqueeze(0))
        model.vit.embeddings.position_embeddings.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.learning_rate, betas=(0.9, 0.999), fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, recipe.warmup_steps, recipe.max_steps)
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    pixels = images.unsqueeze(1).float().div_(255.0)  # [N, 1, H, W] in [0, 1]
    order = torch.randperm(len(labels), generator=generator)
    cursor = 0
    running_loss, running_acc = 0.0, 0.0
    bar = tqdm(range(recipe.max_steps), desc="teacher training", unit="step", disable=not progress)
    for step in bar:
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(labels), generator=generator), 0
        index = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        view = random_resized_crop_flip(pixels[index], recipe.image_size, (recipe.crop_scale_min, 1.0), generator)
        view = ((view - mean) / std).expand(-1, 3, -1, -1)
        logits = model(pixel_values=view).logits
        loss = F.cross_entropy(logits, labels[index], label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        accuracy = (logits.argmax(-1) == labels[index]).float().mean().item()
        # Exponential moving averages: a readable progress bar without a separate evaluation pass.
        momentum = 0.0 if step == 0 else 0.95
        running_loss = momentum * running_loss + (1 - momentum) * loss.item()
        running_acc = momentum * running_acc + (1 - momentum) * accuracy
        bar.set_postfix(loss=f"{running_loss:.3f}", acc=f"{100 * running_acc:.1f}%", refresh=False)
    bar.close()
    model.eval()
    return model, {"train_loss_ema": running_loss, "train_accuracy_ema": 100 * running_acc}


def teacher_knn(
    model: torch.nn.Module,
    data_dir: str | os.PathLike[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Weighted k-NN (DINO's protocol) of the final CLS token: every train image as memory, every test image."""
    train_loader, test_loader = knn_loaders(data_dir, image_size, mean, std, batch_size=batch_size)
    return run_knn_eval(model, train_loader, test_loader, ks=KNN_KS, progress=progress, print_table=False)


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


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
        "image_size": info.get("image_size"),
    }


def build_teacher_card(record: dict[str, Any]) -> ModelCard:
    """The teacher's model card, rendered from the recipe record (every number in it was measured)."""
    recipe = record["recipe"]
    knn = record["knn"]["knn"]
    data = record["data"]
    counts = data["num_examples"]
    split_note = "class-balanced seeded subsets" if any(data["max_examples"].values()) else "the complete splits"
    records = [
        EvalRecord(
            f"k-NN top-1 (k={k})",
            knn[k]["top1"],
            "fashion_mnist",
            "test",
            dataset_type=HUB_DATASET_ID,
            dataset_config=None,
        )
        for k in knn
    ]
    card_data = ModelCardData(
        model_name=record["name"],
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="apache-2.0",
        datasets=[HUB_DATASET_ID],
        tags=["vit", "fashion-mnist", "attndistill", "teacher"],
        eval_results=[r.to_eval_result() for r in records],
    )
    rows = "\n".join(f"| {k} | {knn[k]['top1']:.2f} | {knn[k]['top5']:.2f} |" for k in knn)
    hyper = "\n".join(f"| `{key}` | {value} |" for key, value in recipe.items())
    mean, std = record["image_mean"], record["image_std"]
    position = "fixed 2-D sin-cos" if recipe.get("sincos_position_embeddings") else "learned"
    body = f"""# {record["name"]}

A small Vision Transformer trained **with labels (supervised)** on Fashion-MNIST, to serve as the
teacher of the AttnDistill demo. Only the backbone is published: a plain transformers `ViTModel`
whose last-layer CLS token (after the final LayerNorm) is the image feature.

Architecture: {recipe["num_hidden_layers"]} layers, width {recipe["hidden_size"]},
{recipe["num_attention_heads"]} heads, patch {recipe["patch_size"]} on {recipe["image_size"]} px RGB crops
({record["num_patches"]} patches + CLS), {position} position embeddings,
{record["num_parameters"] / 1e6:.2f} M parameters.

## How it was made

- **Data**: Fashion-MNIST from {data["source"]}, written as parquet shards by
  `recipes/prepare_fashion_mnist.py`: {counts.get("train", "?")} train and {counts.get("test", "?")} test
  images ({split_note}, subset seed {data["subset_seed"]}). Grayscale images are repeated over 3 channels.
- **Objective**: supervised. A linear head on the final CLS token (`ViTForImageClassification`) trained
  with cross-entropy (label smoothing {recipe["label_smoothing"]}) on the train images; the head is dropped
  afterwards. (AttnDistill's published teachers are self-supervised; a supervised teacher is what fits a
  CPU budget of minutes. The distillation of the demo uses no labels.)
- **Optimisation**: AdamW (betas 0.9 / 0.999, weight decay {recipe["weight_decay"]} on matrices),
  peak learning rate {recipe["learning_rate"]}, {recipe["warmup_steps"]} linear warm-up steps then cosine
  to 0, {recipe["max_steps"]} steps of {recipe["batch_size"]} images ({record["epochs"]:.2f} epochs),
  gradient clipping {recipe["max_grad_norm"]}, seed {recipe["seed"]}.
- **Augmentation**: random resized crop to {recipe["image_size"]} px (area {recipe["crop_scale_min"]} to 1,
  aspect 3/4 to 4/3, bilinear) + horizontal flip; normalisation with the train images' mean {mean[0]:.4f}
  and std {std[0]:.4f} (stored in `preprocessor_config.json`).
- **Compute**: {record["hardware"]}; training took {record["train_time_s"]:.0f} s
  ({record["date"]}).
- **Recipe**: `recipes/train_teacher.py`, recipe hash `{record["recipe_hash"]}`:

| field | value |
|---|---|
{hyper}

## Evaluation

Weighted k-NN of the frozen CLS features (DINO's protocol: cosine similarity, votes weighted by
exp(sim / 0.07)), memory bank = the {record["knn"]["num_train"]} train images, evaluated on the
{record["knn"]["num_test"]} held-out test images, evaluation view resize + centre crop to
{recipe["image_size"]} px. Measured at the end of the training run:

| k | top-1 (%) | top-5 (%) |
|---|---|---|
{rows}

Final training-batch accuracy (moving average): {record["train_metrics"]["train_accuracy_ema"]:.1f} %.

## How to use

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("path/to/this/folder")
model = AutoModel.from_pretrained("path/to/this/folder").eval()
image = Image.open("example.png").convert("RGB")
with torch.no_grad():
    features = model(**processor(images=image, return_tensors="pt")).last_hidden_state[:, 0]
```

The checkpoint carries the pooler that transformers' `ViTModel` builds by default, untrained: it is
never used (the features are the CLS token of `last_hidden_state`) and is left out of the parameter
count above.

As an AttnDistill teacher: `python recipes/distill.py recipes/configs/demo.yaml`.

## Limitations

A demonstration model: a few minutes of CPU training on 28 px grayscale clothing images. It knows
nothing beyond Fashion-MNIST, and it was trained with labels, unlike the self-supervised teachers the
method is meant for.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def hardware_description() -> str:
    """CPU / GPU and thread count, for cards and result tables (no host names, no paths)."""
    if torch.cuda.is_available():
        return f"1 x {torch.cuda.get_device_name(0)}"
    processor = platform.processor() or platform.machine()
    return f"CPU ({os.cpu_count()} cores, {processor}), {torch.get_num_threads()} torch threads"


def cached_record(output_dir: str | os.PathLike[str], expected_hash: str) -> dict[str, Any] | None:
    """The recipe record of a complete teacher in ``output_dir`` made with ``expected_hash``, else None."""
    out = Path(output_dir)
    record_path = out / RECIPE_FILENAME
    needed = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
    if not record_path.is_file() or not all((out / name).is_file() for name in needed):
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
        build_teacher_card(record).save(out / "README.md")  # the card follows this code; the numbers, the record
        return {**record, "reused": True}

    started = time.time()
    images, labels = load_images(data_dir, "train")
    pixels = images.float().div(255.0)
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    model, train_metrics = train_classifier(recipe, images, labels, mean, std, run.progress)
    train_time = time.time() - started
    backbone: ViTModel = model.vit
    image_mean, image_std = [mean] * 3, [std] * 3
    knn = teacher_knn(
        backbone,
        data_dir,
        recipe.image_size,
        image_mean,
        image_std,
        batch_size=run.eval_batch_size,
        progress=run.progress,
    )

    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILENAME).unlink(missing_ok=True)  # written last: its presence means "complete"
    # Saved as AutoModel builds a ViTModel (with its unused pooler), so loading it reports nothing missing.
    exportable_student(backbone).save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(
        do_resize=True,
        size={"height": recipe.image_size, "width": recipe.image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=image_mean,
        image_std=image_std,
    ).save_pretrained(out)
    grid = recipe.image_size // recipe.patch_size
    record: dict[str, Any] = {
        "name": out.name,
        "recipe_hash": expected,
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "data": {**_data_description(data_dir), "sha256": fingerprint},
        "objective": "supervised (cross-entropy on the Fashion-MNIST labels)",
        "image_mean": image_mean,
        "image_std": image_std,
        "num_patches": grid * grid,
        "num_parameters": sum(p.numel() for p in backbone.parameters()),
        "epochs": recipe.max_steps * recipe.batch_size / len(labels),
        "train_metrics": train_metrics,
        "train_time_s": round(train_time, 1),
        "total_time_s": round(time.time() - started, 1),
        "hardware": hardware_description(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "knn": knn,
    }
    build_teacher_card(record).save(out / "README.md")
    (out / RECIPE_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "reused": False}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python recipes/train_teacher.py [config.yaml] [--flag value ...]``; ``--help`` lists every field."""
    recipe, run = parse_config_and_flags((TeacherRecipe, TeacherRunArguments), argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = train_teacher(recipe, run)
    top1 = record["knn"]["knn"]["20"]["top1"]
    state = "reused" if record["reused"] else f"trained in {record['train_time_s']:.0f} s"
    print(f"Teacher {state}: {run.output_dir} (k-NN top-1, k=20: {top1:.2f}%, recipe {record['recipe_hash']})")
    return record


if __name__ == "__main__":
    run_recipe(main)
