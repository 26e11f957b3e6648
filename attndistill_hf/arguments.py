"""The fields of a distillation run beyond the training arguments: teacher and students, evaluation, card.

``DistillModelArguments`` names the teacher and the student(s), ``DistillRunArguments`` the evaluation during
and after training, the model card and the output-folder policy. With ``DataArguments`` and
``AttnDistillConfig`` they are every field of ``distill()`` and of ``recipes/distill.py`` (each field's
``help`` is its ``--help`` text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from .config import LOSS_SETTING_BOUNDS
from .losses import check_projector_loss
from .models import (
    STUDENT_PRESETS,
)
from .students import StudentSpec, check_student_name
from .validation import NON_NEGATIVE_INT, OPTIONAL_POSITIVE_INT, POSITIVE_INT, check_fields

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
    name = entry["name"]
    try:
        check_student_name(name)
    except ValueError as error:
        raise ValueError(f"--students: {error}") from None
    unknown = sorted(set(entry) - {"name", *STUDENT_FIELDS})
    if unknown:
        raise ValueError(
            f"--students entry {name!r}: unknown field(s) {', '.join(unknown)}; accepted: "
            f"name, {', '.join(STUDENT_FIELDS)}."
        )
    prefix = f"--students entry {name!r}: "
    check_fields(entry, {**LOSS_SETTING_BOUNDS, "patch_size": POSITIVE_INT}, prefix=prefix)
    if "projector_loss" in entry:
        check_projector_loss(entry["projector_loss"])
    return entry


@dataclass
class DistillModelArguments:
    """Which teacher to distill and which student to train."""

    teacher_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher: a Hub id (e.g. facebook/dino-vits8) or a local model directory."},
    )
    teacher_targets: str | None = field(
        default=None,
        metadata={
            "help": "Train from a teacher-target cache (recipes/cache_teacher.py; a local folder or a Hub dataset id) "
            "instead of a teacher: no teacher is loaded, each image is trained on one of its stored views. "
            "--teacher_name_or_path, when also given (a config's teacher), must be the cache's teacher."
        },
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
        for name in ("teacher_name_or_path", "teacher_targets", "student_name_or_path"):
            if getattr(self, name) == "":  # how a command line unsets a config's path: --teacher_name_or_path ""
                setattr(self, name, None)
        if self.teacher_name_or_path is None and self.teacher_targets is None:
            raise ValueError("Give the teacher (--teacher_name_or_path) or its stored targets (--teacher_targets).")
        self.student_entries = [parse_student_entry(entry) for entry in self.students or []]
        check_fields(self, {"patch_size": OPTIONAL_POSITIVE_INT})
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
        check_fields(
            self,
            {
                "knn_eval_steps": OPTIONAL_POSITIVE_INT,
                "knn_train_samples": POSITIVE_INT,
                "knn_k": POSITIVE_INT,
                "attention_figure_images": NON_NEGATIVE_INT,
            },
        )
