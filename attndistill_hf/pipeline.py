"""``distill()``: a whole AttnDistill run in one call.

Load the teacher and the students, check that their attention is captured exactly, build the data,
train, export each student as a plain transformers model, evaluate it by k-NN, write its figures and
model card, and push it. ``recipes/distill.py`` is this function behind a command line; both take the
same fields (``--help`` lists them) and refuse the same mistakes with the same one-line messages.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModel, PreTrainedModel, set_seed

from .arguments import STUDENT_LOSS_FIELDS, STUDENT_MODEL_FIELDS, DistillModelArguments, DistillRunArguments
from .cli import USER_ERRORS, fields_text, parse_config_and_fields
from .config import AttnDistillConfig
from .data import (
    DataArguments,
    EqualStepsIterable,
    GpuAugment,
    ImageCollator,
    RawBytesCollator,
    check_hub_split,
    count_examples,
    dataloader_workers,
    eval_transform,
    eval_view_loader,
    load_split,
    require_label_column,
    shard_stream,
    steps_per_epoch,
    train_transform,
)
from .evaluation import KNNEvaluationCallback
from .models import build_image_processor, build_student, load_run_teacher
from .output_dir import empty_folder, exported_final_step, prepare_output_dir, resume_checkpoint
from .publish import figure_batch, publish_student, push_students
from .sharding import check_teacher_sharding
from .students import StudentSpec, check_pair, check_student, student_specs
from .target_cache import (
    CachedViewCollator,
    CacheMismatchError,
    TargetCache,
    check_cache_covers,
    check_cache_run,
    teacher_reference,
)
from .trainer import AttnDistillTrainer

logger = logging.getLogger(__name__)


def load_student(model_args: DistillModelArguments, data_args: DataArguments, teacher_model_type: str, seed: int):
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
        sincos = teacher_model_type == "vit_mae"
    return build_student(
        model_args.student_preset,
        image_size=data_args.image_size,
        patch_size=model_args.patch_size,
        sincos_position_embeddings=sincos,
        seed=seed,
    )


def load_students(
    model_args: DistillModelArguments, data_args: DataArguments, teacher_model_type: str, seed: int
) -> PreTrainedModel | dict[str, StudentSpec]:
    """The single student, or each ``--students`` entry by name with its own loss settings (``teacher_model_type``:
    the teacher's ``config.model_type``, which picks the position embeddings of a preset student)."""
    if not model_args.student_entries:
        return load_student(model_args, data_args, teacher_model_type, seed)
    students = {}
    for entry in model_args.student_entries:
        architecture = {key: entry[key] for key in STUDENT_MODEL_FIELDS if key in entry}
        if "student_name_or_path" in entry and "student_preset" not in entry:
            architecture["student_preset"] = None
        own = replace(model_args, **architecture, students=None)
        losses = {key: entry[key] for key in STUDENT_LOSS_FIELDS if key in entry}
        students[entry["name"]] = StudentSpec(load_student(own, data_args, teacher_model_type, seed), **losses)
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


# Every field of a run: distill()'s keyword arguments and recipes/distill.py's flags.
DISTILL_ARGUMENTS = (DistillModelArguments, DataArguments, DistillRunArguments, AttnDistillConfig)


@dataclass
class StudentResult:
    """One exported student: its folder (a complete Hub model repo), its Hub repo and its k-NN results."""

    folder: Path
    hub_model_id: str | None
    knn: dict[str, dict[str, float]] | None  # {"<k>": {"top1": ..., "top5": ...}}; None when not evaluated


@dataclass
class DistillResult:
    """What a run produced: each student by name (``None``: the single student of a run without ``students``)."""

    output_dir: Path
    students: dict[str | None, StudentResult] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    finished_at_step: int | None = None  # the run was already finished and exported: nothing was done

    @property
    def student(self) -> StudentResult:
        """The student of a single-student run."""
        if None not in self.students:
            raise AttributeError(f"This run has several students ({', '.join(map(str, self.students))}).")
        return self.students[None]


def distill(config: str | os.PathLike[str] | None = None, **fields: Any) -> DistillResult:
    """Distill a teacher into one or several students: everything ``recipes/distill.py`` does, in one call.

    ``config`` is an optional YAML/JSON file; ``fields`` are named like the recipe's flags and override it
    (``None`` clears a field)::

        distill(teacher_name_or_path="facebook/dino-vits16", student_preset="vit-tiny-patch16",
                train_dir="images/", output_dir="out", max_steps=1000)

    A mistake in the input raises ``ValueError`` (or another of ``cli.USER_ERRORS``) with the one-line
    message that the recipe prints; a failed push raises :class:`~attndistill_hf.hub.HubPushError` after
    every student's folder is complete.
    """
    arguments = parse_config_and_fields(DISTILL_ARGUMENTS, config, fields)
    return run_distillation(*arguments, recipe=fields_text(config, fields))


def run_distillation(
    model_args: DistillModelArguments,
    data_args: DataArguments,
    run_args: DistillRunArguments,
    args: AttnDistillConfig,
    *,
    recipe: str,
) -> DistillResult:
    """A run of parsed arguments; ``recipe`` (the config as given, secrets redacted) goes into the model cards."""
    started = time.time()
    resume = resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume is not None and (step := exported_final_step(args.output_dir, resume, args)) is not None:
        logger.warning(
            "%s finished at step %d and its students are exported: nothing to resume (a larger --max_steps "
            "continues it).",
            args.output_dir,
            step,
        )
        return DistillResult(Path(args.output_dir), finished_at_step=step)
    created = None
    with args.main_process_first(desc="checking the output folder"):
        if args.should_save:  # the processes that write into it
            created = prepare_output_dir(args.output_dir, overwrite=run_args.overwrite_output_dir, resume=resume)
    try:
        return _run(model_args, data_args, run_args, args, recipe=recipe, resume=resume, started=started)
    except BaseException:
        # A refusal (fp16 on a CPU, an unsupported model, ...) leaves no empty output folder behind.
        if created is not None and not any(path.is_file() for path in created.rglob("*")):
            shutil.rmtree(created)
        raise


def load_teacher_or_cache(
    model_args: DistillModelArguments, args: AttnDistillConfig
) -> tuple[PreTrainedModel | TargetCache, Any, Any, str]:
    """The teacher (or its stored targets), the normalisation it takes and its ``model_type``."""
    if model_args.teacher_targets is not None:
        cache = TargetCache(model_args.teacher_targets)
        named = model_args.teacher_name_or_path
        if named is not None and teacher_reference(named) != cache.info.teacher:
            raise CacheMismatchError(
                f"--teacher_name_or_path {named} is not the teacher of the cache --teacher_targets "
                f"{model_args.teacher_targets} ({cache.info.teacher}); give the cache alone, or its teacher."
            )
        return cache, tuple(cache.info.mean), tuple(cache.info.std), cache.info.teacher_config.get("model_type", "")
    teacher, mean, std = load_run_teacher(
        model_args.teacher_name_or_path, args.teacher_dtype, trust_remote_code=model_args.trust_remote_code
    )
    return teacher, mean, std, getattr(teacher.config, "model_type", "")


def training_data(
    data_args: DataArguments,
    run_args: DistillRunArguments,
    args: AttnDistillConfig,
    mean: Any,
    std: Any,
    cache: TargetCache | None = None,
) -> tuple[Any, Callable[[list[dict[str, Any]]], dict[str, Any]], GpuAugment | None]:
    """The training dataset, its collator and the optional batch transform (decoding on the device); with a
    teacher-target ``cache``, the collator makes each image's stored view and adds its stored targets."""
    if cache is not None and (data_args.gpu_augment or run_args.train_augmentation != "published"):
        raise ValueError(
            "--teacher_targets: each image is trained on one of its stored views of the published augmentation, "
            "made on the CPU; drop --gpu_augment and --train_augmentation none."
        )
    train_dataset = build_train_dataset(data_args, args)
    if isinstance(train_dataset, EqualStepsIterable):
        args.dataloader_num_workers = dataloader_workers(train_dataset, args.dataloader_num_workers)
    if cache is not None:
        check_cache_covers(cache, train_dataset, data_args.image_column, streaming=data_args.streaming)
        return train_dataset, CachedViewCollator(cache, data_args.image_column, fill_skipped=True), None
    if data_args.gpu_augment:
        if run_args.train_augmentation != "published":
            raise ValueError("--gpu_augment applies the published augmentation; drop --train_augmentation none.")
        # Workers only gather the encoded bytes; decoding and augmentation run batched on the device.
        return (
            train_dataset,
            RawBytesCollator(data_args.image_column),
            GpuAugment(data_args.image_size, mean, std, device=args.device),
        )
    make_view = train_transform if run_args.train_augmentation == "published" else eval_transform
    # fill_skipped: an undecodable image is replaced by another view of the batch, so every rank keeps
    # the same batch size (an empty batch on one DDP rank would stall the others).
    collator = ImageCollator(make_view(data_args.image_size, mean, std), data_args.image_column, fill_skipped=True)
    return train_dataset, collator, None


def _run(
    model_args: DistillModelArguments,
    data_args: DataArguments,
    run_args: DistillRunArguments,
    args: AttnDistillConfig,
    *,
    recipe: str,
    resume: str | None,
    started: float,
) -> DistillResult:
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
    teacher, mean, std, model_type = load_teacher_or_cache(model_args, args)
    student = load_students(model_args, data_args, model_type, args.seed)
    # A teacher or student whose last attention cannot be captured exactly, or a cache that does not fit the
    # run, is refused before any data loads.
    for spec in student_specs(student).values():
        if isinstance(teacher, TargetCache):
            check_student(spec.model, data_args.image_size)
        else:
            check_pair(teacher, spec.model, data_args.image_size)
    if isinstance(teacher, TargetCache):
        needs_attention = any(spec.setting("attn_loss_weight", args) for spec in student_specs(student).values())
        check_cache_run(teacher.info, args, image_size=data_args.image_size, needs_attention=needs_attention)
    elif args.teacher_sharding == "fsdp":
        check_teacher_sharding(teacher, args)
    cache = teacher if isinstance(teacher, TargetCache) else None
    train_dataset, collator, batch_transform = training_data(data_args, run_args, args, mean, std, cache)
    knn_loaders = build_knn_loaders(data_args, run_args, args, mean, std) if run_knn else None
    trainer = AttnDistillTrainer(
        student,
        teacher,
        args,
        image_processor=build_image_processor(data_args.image_size, mean, std),
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
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except USER_ERRORS:
        # A fresh run stopped by its input (no readable image, ...) started from an empty folder: it leaves
        # nothing that a rerun would take for a run to resume. A failed resume keeps the earlier checkpoints.
        if resume is None and args.should_save:
            empty_folder(Path(args.output_dir))
        raise
    trainer.save_model(args.output_dir)
    trainer.save_state()

    skipped_images = trainer.skipped_images_in_all_processes()  # on every process, before only one publishes
    result = DistillResult(Path(args.output_dir), train_metrics=train_result.metrics)
    figure = (  # on every process, like skipped_images: a sharded teacher's forward is a collective
        figure_batch(trainer, knn_loaders[1], run_args.attention_figure_images)
        if knn_loaders is not None and run_args.attention_figure_images > 0 and trainer.teacher is not None
        else None  # from a cache there is no teacher to look at the evaluation images
    )
    if trainer.is_world_process_zero():
        entries = {entry["name"]: entry for entry in model_args.student_entries}
        targets = []
        for name, trained in trainer.students.items():
            folder = Path(args.output_dir) / name if name else Path(args.output_dir)
            hub_id = entries.get(name, {}).get("hub_model_id") or (
                f"{args.hub_model_id}-{name}" if name and args.hub_model_id else args.hub_model_id
            )
            knn = publish_student(
                trainer,
                name,
                trained,
                folder,
                hub_id,
                started=started,
                knn_loaders=knn_loaders,
                figure=figure,
                model_args=model_args,
                data_args=data_args,
                run_args=run_args,
                recipe=recipe,
                skipped_images=skipped_images,
                mean=mean,
                std=std,
            )
            result.students[name] = StudentResult(folder, hub_id, knn)
            if push and hub_id:
                targets.append((folder, hub_id))
        push_students(targets, args)  # last of all, when every student's folder is complete
    return result
