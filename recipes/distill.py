"""Distill a self-supervised ViT teacher into a ViT student with AttnDistill.

    accelerate launch recipes/distill.py recipes/configs/in1k_dino_vits8_to_vits16.yaml
    python recipes/distill.py --teacher_name_or_path DIR --student_preset vit-tiny-patch16 \
        --image_size 32 --patch_size 8 --train_dir IMAGES --max_steps 3 --output_dir OUT

A config file (YAML/JSON) may come first; flags after it override it. ``--help`` lists every field.
The output directory ends up a complete Hub model repo: the student (config.json, model.safetensors,
preprocessor_config.json), a model card with the evaluations that were run, and its figures.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModel, PreTrainedModel, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from attndistill_hf.attention import last_cls_attention, unwrap_model
from attndistill_hf.cli import parse_config_and_flags, recipe_text, run_recipe
from attndistill_hf.data import (
    DataArguments,
    EqualStepsIterable,
    ImageCollator,
    check_hub_split,
    count_examples,
    dataloader_workers,
    eval_transform,
    eval_view_loader,
    image_stats,
    load_split,
    require_label_column,
    shard_stream,
    steps_per_epoch,
    train_transform,
)
from attndistill_hf.evaluation import KNNEvaluationCallback, card_records, run_knn_eval
from attndistill_hf.figures import plot_attention_maps, plot_training_curves
from attndistill_hf.gpu_augment import GpuAugment, RawBytesCollator
from attndistill_hf.hardware import hardware_description
from attndistill_hf.hub import EvalRecord, HubPushError, push_output_dir, teacher_license, write_model_card
from attndistill_hf.models import (
    STUDENT_PRESETS,
    build_image_processor,
    build_student,
    load_image_processor,
    load_teacher,
    patch_grid,
)
from attndistill_hf.trainer import AttnDistillConfig, AttnDistillTrainer, StudentSpec, check_pair, student_specs

logger = logging.getLogger("attndistill_hf.distill")


# What one entry of --students may set: its architecture and its loss settings (trainer.StudentSpec).
STUDENT_MODEL_FIELDS = ("student_preset", "student_name_or_path", "patch_size", "student_sincos_position_embeddings")
STUDENT_LOSS_FIELDS = tuple(field.name for field in fields(StudentSpec) if field.name != "model")
STUDENT_FIELDS = (*STUDENT_MODEL_FIELDS, *STUDENT_LOSS_FIELDS, "hub_model_id")


def parse_student_entry(entry: str | dict[str, Any]) -> dict[str, Any]:
    """One ``--students`` entry (a JSON object, or a mapping from a config file), checked field by field."""
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as error:
            raise ValueError(f"--students entry {entry!r} is not a JSON object: {error}.") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"--students entry {entry!r} must be a mapping with a 'name'.")
    unknown = sorted(set(entry) - {"name", *STUDENT_FIELDS})
    if unknown:
        raise ValueError(
            f"--students entry {entry['name']!r}: unknown field(s) {', '.join(unknown)}; accepted: "
            f"name, {', '.join(STUDENT_FIELDS)}."
        )
    return entry


@dataclass
class DistillModelArguments:
    """Which teacher to distill and which student to train."""

    teacher_name_or_path: str = field(
        metadata={"help": "Teacher: a Hub id (e.g. facebook/dino-vits8) or a local model directory."}
    )
    student_preset: str | None = field(
        default="vit-tiny-patch16",
        metadata={"help": f"Student architecture trained from scratch; one of {sorted(STUDENT_PRESETS)}."},
    )
    student_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from this model or config directory instead of a preset (overrides the preset)."},
    )
    patch_size: int | None = field(default=None, metadata={"help": "Override the student preset's patch size."})
    student_sincos_position_embeddings: bool | None = field(
        default=None,
        metadata={"help": "Fixed 2-D sin-cos position embeddings for the student (default: when the teacher is MAE)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repo of the teacher (off: never runs it)."}
    )
    students: list[str] | None = field(
        default=None,
        metadata={
            "help": "Several students of the teacher in one run (one teacher forward per batch for all). In a config "
            "file: a list of mappings; on the command line: one JSON object each. Each has a 'name' (its output "
            f"folder <output_dir>/<name>) and may set {', '.join(sorted(STUDENT_FIELDS))}; what it leaves out is "
            "taken from the flags above. hub_model_id defaults to <--hub_model_id>-<name>."
        },
    )

    def __post_init__(self) -> None:
        self.student_entries = [parse_student_entry(entry) for entry in self.students or []]
        names = [entry["name"] for entry in self.student_entries]
        if len(set(names)) != len(names):
            raise ValueError(f"--students: every student needs its own name, got {names}.")
        if self.student_name_or_path is None:
            if self.student_preset is None:
                raise ValueError("Give --student_preset or --student_name_or_path.")
            if self.student_preset not in STUDENT_PRESETS:
                raise ValueError(
                    f"Unknown --student_preset {self.student_preset!r}; choose one of {sorted(STUDENT_PRESETS)} "
                    "or give --student_name_or_path."
                )


@dataclass
class DistillRunArguments:
    """Evaluation during and after training, the model card and the Hub upload."""

    train_augmentation: str = field(
        default="published",
        metadata={
            "help": "'published': RandomResizedCrop(scale 0.2-1, bicubic) + flip; 'none': the deterministic "
            "evaluation view (resize + center crop), for debugging and exact reproducibility checks."
        },
    )
    knn_eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Run a k-NN evaluation every N steps (logged as eval_knn_top1, or <name>/eval_knn_top1 for each "
            "of several students: a monitor on the bank below)."
        },
    )
    knn_train_samples: int = field(
        default=5000,
        metadata={
            "help": "Labelled training images in the k-NN memory bank (during and after training): a random "
            "subset drawn with --seed (the whole split when it is smaller; streamed like the training data, "
            "except a local folder). The card names the bank size of a result whose bank is not the whole "
            "train split; DINO's protocol number needs it whole (recipes/eval_knn.py)."
        },
    )
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the k-NN during training."})
    final_knn_eval: bool = field(
        default=True,
        metadata={"help": "Evaluate the exported student by k-NN (k=10,20,100,200) when eval data exists."},
    )
    attention_figure_images: int = field(
        default=4, metadata={"help": "Evaluation images in the teacher-vs-student attention figure (0: none)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the earlier run in --output_dir: the folder is emptied before anything loads. Without "
            "it, a folder that holds a run is refused unless --resume_from_checkpoint continues it."
        },
    )
    model_card: bool = field(default=True, metadata={"help": "Write README.md (model card) into output_dir."})
    card_license: str = field(
        default="apache-2.0",
        metadata={
            "help": "License in the model card. Left at apache-2.0, a teacher under a license of its own (DINOv3's, "
            "or the license in a local teacher folder's README.md) passes it on to the card."
        },
    )
    card_limitations: str | None = field(
        default=None, metadata={"help": "Limitations stated in the model card (e.g. 'demo run on a tiny dataset')."}
    )

    def __post_init__(self) -> None:
        if self.train_augmentation not in {"published", "none"}:
            raise ValueError(f"--train_augmentation must be 'published' or 'none', got {self.train_augmentation!r}.")
        if isinstance(self.knn_train_samples, bool) or self.knn_train_samples < 1:
            raise ValueError(f"--knn_train_samples must be a positive integer, got {self.knn_train_samples!r}.")


# What a run leaves in its output folder from its first checkpoint on (a finished run: trainer_state.json too).
RUN_MARKERS = ("trainer_state.json", f"{PREFIX_CHECKPOINT_DIR}-*", AttnDistillTrainer.STAGING_DIR)


def resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, ``last`` / ``true`` for the newest one in
    ``output_dir``, or None (also for ``false``) to start afresh."""
    if value is None or value.lower() == "false":
        return None
    if value.lower() in ("last", "true"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: {output_dir} holds no checkpoint to resume from.")
        return last
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value} is not a checkpoint folder.")
    return value


def prepare_output_dir(output_dir: str, *, overwrite: bool, resume: str | None) -> Path | None:
    """Check ``output_dir`` before anything loads: a folder (created if missing) that can be written,
    refused, emptied or kept as :func:`refuse_or_empty` decides. Returns the topmost folder created
    here, which a run that fails before writing anything removes again (:func:`main`)."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder.")
    refuse_or_empty(folder, overwrite=overwrite, resume=resume)
    created = next((path for path in reversed([folder, *folder.parents]) if not path.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # found now, not when the model is saved after training
            pass
    except OSError as error:
        raise ValueError(f"Cannot write to --output_dir {output_dir}: {error.strerror or error}.") from None
    return created


def refuse_or_empty(folder: Path, *, overwrite: bool, resume: str | None) -> None:
    """Refuse, empty or keep the output ``folder``, as the transformers examples do.

    A folder that holds a run is refused unless it is replaced (``overwrite``: emptied first, so that
    none of the old run's k-NN results, figures or checkpoints end up beside the new model, in a push
    or in a later resume) or continued from one of its checkpoints (``resume``). A non-empty folder
    that holds no run is never emptied.
    """
    output_dir = str(folder)
    entries = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return
    if resume is not None:
        if overwrite and Path(resume).resolve().is_relative_to(folder.resolve()):
            raise ValueError(
                "--overwrite_output_dir would delete the checkpoint that --resume_from_checkpoint continues: "
                "give one of them."
            )
        if not overwrite:
            return
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not any(any(folder.glob(marker)) for marker in RUN_MARKERS):
        raise ValueError(
            f"--output_dir {output_dir} is not empty and holds no run ({listed}): give a new or empty folder."
        )
    if not overwrite:
        raise ValueError(
            f"--output_dir {output_dir} holds an earlier run ({listed}): give --overwrite_output_dir true to replace "
            "it, --resume_from_checkpoint last to continue it, or another folder."
        )
    for name in entries:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info("Emptied %s (--overwrite_output_dir): it held %s", output_dir, listed)


def load_student(model_args: DistillModelArguments, data_args: DataArguments, teacher: PreTrainedModel, seed: int):
    """The student: a pretrained/config directory, or a preset built for the crop size and initialised from
    ``seed`` (alone: a student of a ``--students`` list starts as it would in a run of its own)."""
    if model_args.student_name_or_path:
        path = Path(model_args.student_name_or_path)
        has_weights = any((path / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))
        if has_weights or not path.exists():
            return AutoModel.from_pretrained(model_args.student_name_or_path, attn_implementation="sdpa")
        config = AutoConfig.from_pretrained(model_args.student_name_or_path)
        return build_student(config=config, seed=seed)
    sincos = model_args.student_sincos_position_embeddings
    if sincos is None:
        sincos = getattr(teacher.config, "model_type", "") == "vit_mae"
    return build_student(
        model_args.student_preset,
        image_size=data_args.image_size,
        patch_size=model_args.patch_size,
        sincos_position_embeddings=sincos,
        seed=seed,
    )


def load_students(
    model_args: DistillModelArguments, data_args: DataArguments, teacher: PreTrainedModel, seed: int
) -> PreTrainedModel | dict[str, StudentSpec]:
    """The single student, or each ``--students`` entry by name with its own loss settings."""
    if not model_args.student_entries:
        return load_student(model_args, data_args, teacher, seed)
    students = {}
    for entry in model_args.student_entries:
        architecture = {key: entry[key] for key in STUDENT_MODEL_FIELDS if key in entry}
        if "student_name_or_path" in entry and "student_preset" not in entry:
            architecture["student_preset"] = None
        own = replace(model_args, **architecture, students=None)
        losses = {key: entry[key] for key in STUDENT_LOSS_FIELDS if key in entry}
        students[entry["name"]] = StudentSpec(load_student(own, data_args, teacher, seed), **losses)
    return students


def build_train_dataset(data_args: DataArguments, args: AttnDistillConfig) -> Any:
    """Map-style data as is; a stream sharded per rank, shuffled with the common seed, equal steps per rank."""
    dataset = load_split(data_args, "train", seed=args.seed)
    if not data_args.streaming:
        return dataset
    world, rank = max(1, args.world_size), args.process_index
    dataset = shard_stream(
        dataset, rank=rank, world_size=world, seed=args.seed, buffer_size=data_args.shuffle_buffer_size
    )
    total = count_examples(data_args, "train")
    if total is None:
        if args.max_steps <= 0:
            raise ValueError("A stream of unknown size needs --num_train_examples or --max_steps.")
        steps = args.max_steps * args.gradient_accumulation_steps
    else:
        steps = steps_per_epoch(total, world, args.per_device_train_batch_size)
    return EqualStepsIterable(dataset, steps, args.per_device_train_batch_size)


def knn_streamed(data_args: DataArguments, split: Literal["train", "eval"]) -> bool:
    """Whether the k-NN data of ``split`` is streamed: when the training data is, unless it is a local folder.

    Preparing a streamed Hub dataset would download and convert the whole train split (``load_dataset``
    prepares every split), and prepared shards are a copy of them all; a stream gives the bank through
    the seeded shuffle buffer instead. A local folder is prepared (paths only): streamed it is one
    class-sorted shard that no buffer mixes, prepared it gives an exactly uniform subset.
    """
    source = data_args.train_source if split == "train" else data_args.eval_source
    return data_args.streaming and source != "folder"


def build_knn_loaders(
    data_args: DataArguments, run_args: DistillRunArguments, args: AttnDistillConfig, mean: Any, std: Any
) -> tuple[DataLoader, DataLoader]:
    """The k-NN memory bank (``knn_train_samples`` random train images, seeded with the run's seed) and test set."""
    views = {"batch_size": args.per_device_eval_batch_size, "seed": args.seed}
    bank, _ = eval_view_loader(
        data_args,
        "train",
        mean,
        std,
        streaming=knn_streamed(data_args, "train"),
        limit=run_args.knn_train_samples,
        **views,
    )
    test, _ = eval_view_loader(data_args, "eval", mean, std, streaming=knn_streamed(data_args, "eval"), **views)
    for role, loader in (("memory bank (training data)", bank), ("test set (evaluation data)", test)):
        # Found now rather than at the first k-NN, after training.
        require_label_column(
            loader.dataset,
            data_args.label_column,
            f"k-NN {role}",
            "Give labelled data (class sub-folders for a folder), name the column with --label_column, or turn "
            "the k-NN off with --final_knn_eval false.",
        )
    return bank, test


def attention_figure(
    trainer: AttnDistillTrainer,
    student: PreTrainedModel,
    loader: DataLoader,
    count: int,
    mean: Any,
    std: Any,
    path: Path,
) -> str:
    """Teacher vs student last-layer CLS attention on the first evaluation images."""
    pixel_values = next(iter(loader))["pixel_values"][:count].to(trainer.args.device)
    student = student.eval()
    with torch.no_grad():
        _, teacher_maps = last_cls_attention(trainer.teacher, pixel_values)
        _, student_maps = last_cls_attention(student, pixel_values)
    size = tuple(pixel_values.shape[-2:])
    images = pixel_values.cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    plot_attention_maps(
        images.clamp(0, 1),
        teacher_maps.cpu(),
        student_maps.cpu(),
        patch_grid(unwrap_model(trainer.teacher), size),
        patch_grid(student, size),
        path,
    )
    return path.name


def student_log_history(log_history: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The log entries of one student of a multi-student run, its ``<name>/...`` terms under their plain names."""
    if not name:
        return log_history
    prefix = f"{name}/"
    return [
        {key.removeprefix(prefix): value for key, value in entry.items() if "/" not in key or key.startswith(prefix)}
        for entry in log_history
    ]


def publish_student(
    trainer: AttnDistillTrainer,
    name: str,
    student: PreTrainedModel,
    folder: Path,
    hub_id: str | None,
    *,
    started: float,
    knn_loaders: tuple[DataLoader, DataLoader] | None,
    model_args: DistillModelArguments,
    data_args: DataArguments,
    run_args: DistillRunArguments,
    argv: list[str] | None,
    mean: Any,
    std: Any,
) -> dict[str, Any]:
    """One exported student's k-NN results, figures and model card in ``folder``."""
    args = trainer.args
    summary: dict[str, Any] = {}
    records: list[EvalRecord] = []
    figures: dict[str, str] = {}
    if knn_loaders is not None and run_args.final_knn_eval:
        result = run_knn_eval(student, *knn_loaders, output_json=folder / "knn_results.json")
        summary["knn"] = result["knn"]
        records = card_records(result, data_args, bank_limit=run_args.knn_train_samples)
    history = student_log_history(trainer.state.log_history, name)
    if any("loss" in entry for entry in history):
        figures["Training curves"] = plot_training_curves(history, folder / "training_curves.png").name
    if knn_loaders is not None and run_args.attention_figure_images > 0:
        figures["Last-layer CLS attention: teacher vs student"] = attention_figure(
            trainer, student, knn_loaders[1], run_args.attention_figure_images, mean, std, folder / "attention_maps.png"
        )
    if run_args.model_card:
        teacher = unwrap_model(trainer.teacher)
        write_model_card(
            folder,
            model_id_or_name=hub_id or folder.name,
            teacher=model_args.teacher_name_or_path,
            student_config=student.config.to_dict(),
            dataset_name=data_args.source_name,
            hub_dataset=data_args.train_source == "hub",
            dataset_split=data_args.eval_split_name,
            eval_results=records,
            recipe_text=recipe_text(argv),
            training_summary={
                "steps": trainer.state.global_step,
                "epochs": round(trainer.state.epoch or 0.0, 3),
                "effective_batch_size": args.total_train_batch_size,
                "peak_learning_rate": args.learning_rate,
                "skipped_images": trainer.skipped_images,
                "nan_skipped_steps": trainer.nonfinite_steps_by_student[name],
                **({"students_in_this_run": len(trainer.students)} if name else {}),
                "hardware": hardware_description(args.device, args.world_size),
                "wall_time_s": round(time.time() - started, 1),
            },
            figures=figures,
            license=run_args.card_license,
            limitations=run_args.card_limitations,
            teacher_license=teacher_license(model_args.teacher_name_or_path, teacher.config.model_type),
        )
    return summary


def push_students(targets: list[tuple[Path, str]], args: AttnDistillConfig) -> None:
    """Push each student's folder to its Hub repo; a failed push does not stop the others.

    The local folders are complete whatever happens here. Any failure then fails the run with a
    :class:`HubPushError` that says how to retry each push (exit status 1 from the command line), so
    that scripts and CI notice that the run was not published.
    """
    failures = []
    for folder, hub_id in targets:
        try:
            url = push_output_dir(folder, hub_id, private=bool(args.hub_private_repo), token=args.hub_token)
            logger.info("Pushed to %s", url)
        except HubPushError as error:
            failures.append(error)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise HubPushError(
            "\n".join(str(error) for error in failures),
            local_dir=Path(args.output_dir),
            repo_id=", ".join(error.repo_id for error in failures),
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, run_args, args = parse_config_and_flags(
        (DistillModelArguments, DataArguments, DistillRunArguments, AttnDistillConfig), argv, description=__doc__
    )
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    started = time.time()
    resume = resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    created = None
    with args.main_process_first(desc="checking the output folder"):
        if args.should_save:  # the processes that write into it
            created = prepare_output_dir(args.output_dir, overwrite=run_args.overwrite_output_dir, resume=resume)
    try:
        return run(model_args, data_args, run_args, args, argv, resume=resume, started=started)
    except BaseException:
        # A refusal (fp16 on a CPU, an unsupported model, ...) leaves no empty output folder behind.
        if created is not None and not any(path.is_file() for path in created.rglob("*")):
            shutil.rmtree(created)
        raise


def run(
    model_args: DistillModelArguments,
    data_args: DataArguments,
    run_args: DistillRunArguments,
    args: AttnDistillConfig,
    argv: list[str] | None,
    *,
    resume: str | None,
    started: float,
) -> dict[str, Any]:
    """The run, once its output folder is ready: load, train, export, evaluate, publish."""
    run_knn = data_args.eval_source is not None and bool(run_args.knn_eval_steps or run_args.final_knn_eval)
    # A split missing from a Hub dataset fails here, before the teacher, the data or any training.
    check_hub_split(data_args, "train")
    if run_knn:
        check_hub_split(data_args, "eval")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/vit-tiny-attndistill).")
    set_seed(args.seed)
    push, args.push_to_hub = args.push_to_hub, False  # pushed below with the model card, not mid-run
    # transformers' default attention backend: sdpa for every supported family; a class without sdpa (a
    # CNN, say) then loads, and check_pair refuses it as no ViT-family encoder, instead of the load failing
    # with advice to pass attn_implementation, which this recipe has no flag for.
    teacher = load_teacher(
        model_args.teacher_name_or_path, attn_implementation=None, trust_remote_code=model_args.trust_remote_code
    )
    # The teacher's normalisation (ImageNet's when it ships no image processor).
    mean, std = image_stats(
        load_image_processor(model_args.teacher_name_or_path, trust_remote_code=model_args.trust_remote_code)
    )
    student = load_students(model_args, data_args, teacher, args.seed)
    # A teacher or student whose last attention cannot be captured exactly is refused before any data loads.
    for model in student_specs(student).values():
        check_pair(teacher, model.model, data_args.image_size)
    train_dataset = build_train_dataset(data_args, args)
    if isinstance(train_dataset, EqualStepsIterable):
        args.dataloader_num_workers = dataloader_workers(train_dataset, args.dataloader_num_workers)
    make_view = train_transform if run_args.train_augmentation == "published" else eval_transform
    # fill_skipped: an undecodable image is replaced by another view of the batch, so every rank keeps
    # the same batch size (an empty batch on one DDP rank would stall the others).
    collator = ImageCollator(make_view(data_args.image_size, mean, std), data_args.image_column, fill_skipped=True)
    batch_transform = None
    if data_args.gpu_augment:
        if run_args.train_augmentation != "published":
            raise ValueError("--gpu_augment applies the published augmentation; drop --train_augmentation none.")
        # Workers only gather the encoded bytes; decoding and augmentation run batched on the device.
        collator = RawBytesCollator(data_args.image_column)
        batch_transform = GpuAugment(data_args.image_size, mean, std, device=args.device)
    processor = build_image_processor(data_args.image_size, mean, std)

    knn_loaders = None
    if run_knn:
        knn_loaders = build_knn_loaders(data_args, run_args, args, mean, std)
    trainer = AttnDistillTrainer(
        student,
        teacher,
        args,
        image_processor=processor,
        train_dataset=train_dataset,
        data_collator=collator,
        batch_transform=batch_transform,
        image_size=data_args.image_size,
    )
    if knn_loaders is not None and run_args.knn_eval_steps:
        # One monitor per student, logged as <name>/eval_knn_top1 beside its loss terms. attach registers
        # it and logs through trainer.log (passed in callbacks= too, it would run twice).
        for name, trained in trainer.students.items():
            KNNEvaluationCallback(
                *knn_loaders,
                every_n_steps=run_args.knn_eval_steps,
                k=run_args.knn_k,
                metric_name=f"{name}/eval_knn_top1" if name else "eval_knn_top1",
                feature_model=lambda _model, trained=trained: trained,
            ).attach(trainer)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    trainer.save_state()

    summary: dict[str, Any] = {"train": train_result.metrics}
    if trainer.is_world_process_zero():
        entries = {entry["name"]: entry for entry in model_args.student_entries}
        targets = []
        for name, trained in trainer.students.items():
            folder = Path(args.output_dir) / name if name else Path(args.output_dir)
            hub_id = entries.get(name, {}).get("hub_model_id") or (
                f"{args.hub_model_id}-{name}" if name and args.hub_model_id else args.hub_model_id
            )
            published = publish_student(
                trainer,
                name,
                trained,
                folder,
                hub_id,
                started=started,
                knn_loaders=knn_loaders,
                model_args=model_args,
                data_args=data_args,
                run_args=run_args,
                argv=argv,
                mean=mean,
                std=std,
            )
            if name:
                summary.setdefault("students", {})[name] = published
            else:
                summary.update(published)
            if push and hub_id:
                targets.append((folder, hub_id))
        push_students(targets, args)  # last of all, when every student's folder is complete
    summary["model"] = asdict(model_args)
    return summary


if __name__ == "__main__":
    run_recipe(main)
