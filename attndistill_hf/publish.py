"""What each trained student leaves in its folder: k-NN results, figures and model card; then the push."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from .arguments import DistillModelArguments, DistillRunArguments
from .attention import last_cls_attention, unwrap_model
from .config import AttnDistillConfig
from .data import (
    DataArguments,
)
from .evaluation import card_records, run_knn_eval
from .figures import plot_attention_maps, plot_training_curves
from .hardware import hardware_description
from .hub import (
    EvalRecord,
    HubPushError,
    LossSettings,
    push_output_dir,
    teacher_license,
    write_model_card,
)
from .models import patch_grid
from .teacher import TeacherTargets, teacher_targets
from .trainer import AttnDistillTrainer

logger = logging.getLogger(__name__)


@dataclass
class FigureBatch:
    """The evaluation images of the attention figure, and the teacher's targets for them."""

    pixel_values: torch.Tensor
    teacher: TeacherTargets


def figure_batch(trainer: AttnDistillTrainer, loader: DataLoader, count: int) -> FigureBatch:
    """The first ``count`` evaluation images and the teacher's maps of them. Every process calls it: the
    forward of a sharded teacher gathers its weights from all of them."""
    pixel_values = next(iter(loader))["pixel_values"][:count].to(trainer.args.device)
    return FigureBatch(pixel_values, teacher_targets(trainer.teacher, pixel_values))


def attention_figure(batch: FigureBatch, student: PreTrainedModel, mean: Any, std: Any, path: Path) -> str:
    """Teacher vs student last-layer CLS attention on the figure's images."""
    pixel_values = batch.pixel_values
    student = student.eval()
    with torch.no_grad():
        _, student_maps = last_cls_attention(student, pixel_values)
    size = tuple(pixel_values.shape[-2:])
    images = pixel_values.cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    plot_attention_maps(
        images.clamp(0, 1),
        batch.teacher.attention.cpu(),
        student_maps.cpu(),
        batch.teacher.grid,
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
    figure: FigureBatch | None,
    model_args: DistillModelArguments,
    data_args: DataArguments,
    run_args: DistillRunArguments,
    recipe: str,
    skipped_images: int,
    mean: Any,
    std: Any,
) -> dict[str, dict[str, float]] | None:
    """One exported student's k-NN results, figures and model card in ``folder``; returns its k-NN results."""
    args = trainer.args
    knn = None
    records: list[EvalRecord] = []
    figures: dict[str, str] = {}
    if knn_loaders is not None and run_args.final_knn_eval:
        result = run_knn_eval(student, *knn_loaders, output_json=folder / "knn_results.json")
        knn = result["knn"]
        records = card_records(result, data_args, bank_limit=run_args.knn_train_samples)
    history = student_log_history(trainer.state.log_history, name)
    if any("loss" in entry for entry in history):
        figures["Training curves"] = plot_training_curves(history, folder / "training_curves.png").name
    if figure is not None:
        figures["Last-layer CLS attention: teacher vs student"] = attention_figure(
            figure, student, mean, std, folder / "attention_maps.png"
        )
    if run_args.model_card:
        cache = trainer.target_cache
        teacher_name = cache.info.teacher if cache is not None else model_args.teacher_name_or_path
        model_type = (
            cache.info.teacher_config.get("model_type", "")
            if cache is not None
            else unwrap_model(trainer.teacher).config.model_type
        )
        write_model_card(
            folder,
            model_id_or_name=hub_id or folder.name,
            teacher=teacher_name,
            student_config=student.config.to_dict(),
            dataset_name=data_args.source_name,
            hub_dataset=data_args.train_source == "hub",
            dataset_split=data_args.eval_split_name,
            eval_results=records,
            recipe_text=recipe,
            training_summary={
                "steps": trainer.state.global_step,
                "epochs": round(trainer.state.epoch or 0.0, 3),
                "effective_batch_size": args.total_train_batch_size,
                "peak_learning_rate": args.learning_rate,
                "skipped_images": skipped_images,
                "nonfinite_steps": trainer.skips.nonfinite_by_student[name],
                **({"students_in_this_run": len(trainer.students)} if name else {}),
                "hardware": hardware_description(args.device, args.world_size),
                "wall_time_s": round(time.time() - started, 1),
            },
            figures=figures,
            license=run_args.card_license,
            limitations=run_args.card_limitations,
            loss=LossSettings.of(trainer.members[name].loss_fn),  # this student's own loss settings
            teacher_license=teacher_license(teacher_name, model_type),
            teacher_dtype=cache.info.teacher_dtype if cache is not None else args.teacher_dtype,
            target_cache=None if cache is None else cache.describe(model_args.teacher_targets),
        )
    return knn


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
