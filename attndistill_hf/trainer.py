"""``AttnDistillTrainer``: a ``transformers.Trainer`` that distills a frozen ViT teacher into a ViT student.

The trainable model handed to the Trainer is :class:`DistillationModule` (student + the AttnDistill
loss with its projector), so that optimizer, scheduler, DDP, mixed precision, checkpoints and resume
all cover the projector too. The teacher is a frozen second model, prepared through Accelerate for
device and precision but never wrapped by DDP. ``save_model`` exports the student alone, as a plain
transformers model that ``AutoModel.from_pretrained`` loads without custom code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerState, TrainingArguments, ViTModel
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    get_last_checkpoint,
    rotate_checkpoints,
    seed_worker,
)
from transformers.utils import SAFE_WEIGHTS_NAME

from .attention import (
    install_attention_capture,
    install_last_block_capture,
    last_block_tokens,
    last_cls_attention,
    run_model,
    unwrap_model,
    verify_capture,
)
from .checkpoints import check_checkpoint
from .data.streaming import (
    DistinctUnreadableLoader,
    EpochShuffle,
    EqualStepsIterable,
    KeyedExamples,
    prepare_per_rank_dataloader,
)
from .families import UnsupportedModelError, cls_feature, family_of
from .losses import AttnDistillLoss, check_projector_loss
from .models import cls_features, load_teacher, patch_grid
from .validation import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPTIONAL_POSITIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Bound,
    check_fields,
    check_value,
)

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps whose loss was NaN or infinite."""


class UnreadableDataError(ValueError):
    """Raised when the training data yield no readable image: in too many batches in a row, or in the whole run."""


# The loss settings that a StudentSpec may set for its student (None there: the run's value), with their ranges.
LOSS_SETTING_BOUNDS: dict[str, Bound] = {
    "proj_loss_weight": NON_NEGATIVE,
    "attn_loss_weight": NON_NEGATIVE,
    "fusion_temperature": POSITIVE,
    "projector_depth": POSITIVE_INT,
    "projector_hidden_dims": Bound(integer=True, minimum=1, optional=True),
}
UNIT_INTERVAL_OPEN_TOP = Bound(minimum=0, below=1)
# Every numeric field of AttnDistillConfig that a run's result depends on, its own and TrainingArguments'.
TRAINING_BOUNDS: dict[str, Bound] = {
    **LOSS_SETTING_BOUNDS,
    "attn_clamp_min": Bound(above=0, below=1),
    "attn_clamp_max": Bound(above=0, maximum=1),
    "learning_rate": Bound(above=0, optional=True),
    "base_learning_rate": POSITIVE,
    "warmup_epochs": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "max_consecutive_nonfinite_steps": POSITIVE_INT,
    "effective_batch_size": OPTIONAL_POSITIVE_INT,
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    # -1: train for num_train_epochs (TrainingArguments' "not set"); 0 steps would export an untrained student.
    "max_steps": Bound(integer=True, minimum=-1, excluded=(0,), text="a positive integer, or -1 for num_train_epochs"),
    "num_train_epochs": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": UNIT_INTERVAL_OPEN_TOP,
    "adam_beta2": UNIT_INTERVAL_OPEN_TOP,
    "adam_epsilon": POSITIVE,
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "save_total_limit": OPTIONAL_POSITIVE_INT,
    "seed": Bound(integer=True, minimum=0, below=2**32),  # numpy's seed range
    "dataloader_num_workers": NON_NEGATIVE_INT,
}


@dataclass
class AttnDistillConfig(TrainingArguments):
    """TrainingArguments plus the AttnDistill fields.

    Defaults follow the published recipe (AdamW betas (0.9, 0.95), weight decay 0.05, base learning rate
    1.5e-4 per 256 images, half-cosine schedule, no gradient clipping, loss weights 1.0 / 0.1, T = 10),
    except the run's length and warm-up (published: 40 warm-up epochs), which belong to each experiment's
    config. ``effective_batch_size`` sets the gradient accumulation from the number of processes, as the
    published code fills its batch of 4096.
    """

    proj_loss_weight: float = field(default=1.0, metadata={"help": "Weight w_proj of the projector alignment term."})
    attn_loss_weight: float = field(
        default=0.1, metadata={"help": "Weight w_attn of the last-layer CLS-attention KL term (0 disables it)."}
    )
    fusion_temperature: float = field(
        default=10.0,
        metadata={"help": "Temperature T of the head fusion softmax(sum_h log a_h / T) when head counts differ."},
    )
    projector_depth: int = field(
        default=4, metadata={"help": "Linear layers in the projector (4 = the published d-2d-d-2d-D head)."}
    )
    projector_hidden_dims: list[int] | None = field(
        default=None,
        metadata={
            "help": "Widths of the projector's hidden layers (e.g. 768 384 768); overrides projector_depth. "
            "Default: the published widths 2d, d, 2d, ... for projector_depth layers (d = student width)."
        },
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per optimizer step over all processes (published: 4096). When set, "
            "gradient_accumulation_steps = effective_batch_size // (per_device_train_batch_size x processes), "
            "so the same config gives the same batch on any number of GPUs."
        },
    )
    projector_loss: str = field(
        default="mse", metadata={"help": "Projector distance: 'mse' (published) or 'cosine' (2 - 2 cos)."}
    )
    attn_clamp_min: float = field(default=1e-5, metadata={"help": "Lower clamp of the attention maps before the KL."})
    attn_clamp_max: float = field(default=0.996, metadata={"help": "Upper clamp of the attention maps before the KL."})
    learning_rate: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "Peak learning rate. Default: base_learning_rate x total batch size / 256."},
    )
    base_learning_rate: float = field(
        default=1.5e-4, metadata={"help": "Learning rate per 256 images, used when learning_rate is not given."}
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Linear warm-up length in epochs (converted to steps); overrides warmup_steps when > 0. "
            "The published recipe warms up for 40 epochs (the paper's configs set it)."
        },
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Gradient clipping norm; 0 disables clipping (published: no clipping)."}
    )
    max_consecutive_nonfinite_steps: int = field(
        default=20,
        metadata={
            "help": "Stop with an error after this many skipped batches in a row (NaN/inf loss, or no readable image)."
        },
    )
    # Published recipe: AdamW (0.9, 0.95), weight decay 0.05, per-step warm-up then half-cosine to 0.
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (published: 0.95)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on >= 2-D weights (0.05)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warm-up (cosine to 0)."})
    # The collator needs the image column; the model takes no label.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all columns for the collator."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Parameters that the loss cannot reach are frozen at setup: no unused-parameter search."},
    )

    def __post_init__(self) -> None:
        # Found here, naming the flag, rather than by the optimizer or torch after the teacher has loaded,
        # or never (a NaN weight, a zero learning rate or max_steps 0 would export an untrained student).
        check_fields(self, TRAINING_BOUNDS)
        if self.max_steps <= 0:
            check_value("--num_train_epochs", self.num_train_epochs, POSITIVE)
        check_projector_loss(self.projector_loss)
        if not self.attn_clamp_min < self.attn_clamp_max:
            raise ValueError("Need 0 < attn_clamp_min < attn_clamp_max <= 1.")
        if self.proj_loss_weight == 0 and self.attn_loss_weight == 0:
            raise ValueError("Both loss weights are 0: nothing to train.")
        lr_given = self.learning_rate is not None
        if not lr_given:
            self.learning_rate = self.base_learning_rate
        # Streamed data is sharded per rank by the DataLoader preparation; rank-0 dispatch would read
        # (and decode) every image on one process.
        if self.accelerator_config is None:
            self.accelerator_config = {"dispatch_batches": False}
        elif isinstance(self.accelerator_config, dict):
            self.accelerator_config.setdefault("dispatch_batches", False)
        super().__post_init__()
        if self.effective_batch_size is not None:
            self._fill_effective_batch()
        if not lr_given:
            self.learning_rate = self.base_learning_rate * self.total_train_batch_size / 256

    def _fill_effective_batch(self) -> None:
        processes = max(1, self.world_size)
        per_step = self.per_device_train_batch_size * processes
        steps = self.effective_batch_size // per_step
        if steps < 1:
            raise ValueError(
                f"effective_batch_size {self.effective_batch_size} is smaller than one step of "
                f"{self.per_device_train_batch_size} images x {processes} processes = {per_step}."
            )
        if self.gradient_accumulation_steps not in (1, steps):
            raise ValueError(
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} and effective_batch_size "
                f"{self.effective_batch_size} disagree ({self.effective_batch_size} // {per_step} images per step = "
                f"{steps}); set only one of them."
            )
        if steps * per_step != self.effective_batch_size:
            logger.warning(
                "effective_batch_size %d is not a multiple of %d images per step (%d per device x %d processes): "
                "using %d accumulation steps, %d images per update.",
                self.effective_batch_size,
                per_step,
                self.per_device_train_batch_size,
                processes,
                steps,
                steps * per_step,
            )
        self.gradient_accumulation_steps = steps

    @property
    def total_train_batch_size(self) -> int:
        """Images per optimizer step over all processes (per device x accumulation x world size)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(1, self.world_size)


class DistillationModule(nn.Module):
    """What the Trainer optimises: the student and the loss (whose projector trains with it).

    The forward pass takes the teacher's CLS token and attention map, computed outside under
    ``no_grad``, so that DDP wraps only trainable parameters. ``capture`` computes the student's map
    (the fast hooked path; the benchmark passes the eager reference to time the naive step).

    As in the published code, the projector takes the student's last-block tokens *before* its final
    LayerNorm (the projector opens with its own LayerNorm). The final norm is then outside the loss and
    stays at its initial affine (1, 0), as it does in the published code: the exported student's
    ``last_hidden_state`` is the last block's tokens through a plain (identity-affine) LayerNorm, the
    published evaluation feature. It and every other parameter that the configured loss cannot reach
    are frozen at construction (:meth:`_freeze_unreachable`).
    """

    def __init__(
        self,
        student: PreTrainedModel,
        loss_fn: AttnDistillLoss,
        capture: Callable[[nn.Module, torch.Tensor], tuple[Any, torch.Tensor]] = last_cls_attention,
    ) -> None:
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn
        self.capture = capture
        # Hooks before any torch.compile of this module (q/k for the map, the final norm's input).
        install_last_block_capture(student)
        self._freeze_unreachable()

    def _freeze_unreachable(self) -> None:
        """Freeze the trainable parameters that no term of the configured loss reaches.

        They would never get a gradient: DDP without its unused-parameter search stops at the second
        step, and a skipped batch's zero surrogate would let AdamW's weight decay move them. Which they
        are depends on the loss weights: the final norm always (both terms read the last block before
        it); with attention guidance alone also the projector and everything of the last block after
        its query/key projections (values, output projection, MLP), which its CLS-attention row does
        not depend on. One backward pass of the loss on a blank image, against a placeholder teacher of
        the student's own shapes, finds them for any student and loss setting: a parameter left without
        a gradient is one the loss cannot reach. Frozen parameters keep their values and are exported.
        """
        was_training = self.training
        self.eval()  # no dropout: the probe draws nothing from the global RNG
        try:
            loss, _, _ = self(**self.placeholder_inputs())
            loss.backward()
        finally:
            self.train(was_training)
        frozen = []
        for name, param in self.named_parameters():
            if param.requires_grad and param.grad is None:
                param.requires_grad_(False)
                frozen.append(name)
            param.grad = None
        logger.info("Frozen, outside the loss: %s", ", ".join(frozen) or "nothing")

    def placeholder_inputs(self) -> dict[str, Any]:
        """Forward inputs that need no data: one blank image, and a teacher of the student's own shapes."""
        config = self.student.config
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        grid = patch_grid(self.student)
        keys = 1 + grid[0] * grid[1]
        like = {"device": self.student.device, "dtype": self.student.dtype}
        return {
            "pixel_values": torch.zeros(1, config.num_channels, height, width, **like),
            "teacher_cls": torch.zeros(1, self.loss_fn.teacher_dim, **like),
            "teacher_attn": torch.full((1, config.num_attention_heads, keys), 1.0 / keys, **like),
            "teacher_grid": grid,
        }

    def forward(
        self,
        pixel_values: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_attn: torch.Tensor | None = None,
        teacher_grid: tuple[int, int] | None = None,
        validate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.loss_fn.attn_weight:
            _, student_attn = self.capture(self.student, pixel_values)
        else:
            run_model(self.student, pixel_values)
            student_attn = None
        terms = self.loss_fn(
            teacher_cls,
            teacher_attn,
            cls_features(last_block_tokens(self.student)),  # before the final norm
            student_attn,
            teacher_grid=teacher_grid,
            student_grid=patch_grid(self.student, tuple(pixel_values.shape[-2:])),
            validate=validate,
        )
        return terms.loss, terms.loss_proj, terms.loss_attn


@dataclass
class StudentSpec:
    """One student of a run: its model and the loss settings in which it differs from the run's config.

    A field left at None takes the value of :class:`AttnDistillConfig`, so several students of one
    teacher can train side by side with, e.g., projector only / attention only / both.
    """

    model: PreTrainedModel
    proj_loss_weight: float | None = None
    attn_loss_weight: float | None = None
    fusion_temperature: float | None = None
    projector_depth: int | None = None
    projector_hidden_dims: list[int] | None = None
    projector_loss: str | None = None

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in LOSS_SETTING_BOUNDS if getattr(self, name) is not None}
        check_fields(given, LOSS_SETTING_BOUNDS, prefix="StudentSpec.")
        if self.projector_loss is not None:
            check_projector_loss(self.projector_loss)

    def loss(self, teacher_dim: int, args: AttnDistillConfig, seed: int) -> AttnDistillLoss:
        """This student's loss (and projector), with the run's settings where this spec has none.

        The projector is initialised from ``seed`` alone, not from the global RNG's position: a
        student's projector starts the same whether it trains alone or beside others.
        """

        def setting(name: str) -> Any:
            own = getattr(self, name)
            return getattr(args, name) if own is None else own

        if setting("proj_loss_weight") == 0 and setting("attn_loss_weight") == 0:
            raise ValueError("A student has both loss weights at 0: nothing to train it with.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AttnDistillLoss(
                self.model.config.hidden_size,
                teacher_dim,
                proj_weight=setting("proj_loss_weight"),
                attn_weight=setting("attn_loss_weight"),
                fusion_temperature=setting("fusion_temperature"),
                projector_depth=setting("projector_depth"),
                projector_hidden_dims=setting("projector_hidden_dims"),
                projector_loss=setting("projector_loss"),
                clamp=(args.attn_clamp_min, args.attn_clamp_max),
            )


class MultiStudentModule(nn.Module):
    """Several students of one teacher, optimised as one module (one optimizer, DDP wrapper and checkpoint).

    Each member is a :class:`DistillationModule` with its own projector and loss settings; all of them
    read the same teacher outputs, computed once per batch. The forward pass returns each member's
    ``(loss, loss_proj, loss_attn)`` by name: the trainer sums the finite ones and skips the others.
    """

    def __init__(self, members: Mapping[str, DistillationModule]) -> None:
        super().__init__()
        self.members = nn.ModuleDict(members)

    def forward(
        self,
        pixel_values: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_attn: torch.Tensor | None = None,
        teacher_grid: tuple[int, int] | None = None,
        validate: bool = False,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return {
            name: member(pixel_values, teacher_cls, teacher_attn, teacher_grid, validate)
            for name, member in self.members.items()
        }


STUDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Folders a run writes into its output folder beside the students' (names with a dot cannot be students'):
# the trainer's checkpoints (resume picks the newest checkpoint-N) and TensorBoard's default log folder.
RESERVED_STUDENT_NAMES = re.compile(rf"^({PREFIX_CHECKPOINT_DIR}(-.*)?|runs)$", re.IGNORECASE)


def check_student_name(name: Any) -> None:
    """A student's name is its output folder ``<output_dir>/<name>``: a plain folder name that nothing else
    of the run writes (a student named ``checkpoint-2`` would be exported over the step-2 checkpoint)."""
    if not isinstance(name, str) or not STUDENT_NAME.match(name):
        raise ValueError(
            f"Student name {name!r} must be letters, digits, '-' or '_' (it names the student's output folder)."
        )
    if RESERVED_STUDENT_NAMES.match(name):
        raise ValueError(
            f"Student name {name!r} is taken by what a run writes in its output folder ({PREFIX_CHECKPOINT_DIR}-N "
            "checkpoints, runs/ logs): choose another name."
        )


def student_specs(student: PreTrainedModel | Mapping[str, PreTrainedModel | StudentSpec]) -> dict[str, StudentSpec]:
    """The students of a run by name; one plain model is the single, unnamed student ``""``."""
    if isinstance(student, nn.Module):
        return {"": StudentSpec(student)}
    if not student:
        raise ValueError("No students: give a model, or a mapping of names to models / StudentSpec.")
    specs = {}
    for name, value in student.items():
        check_student_name(name)
        specs[name] = value if isinstance(value, StudentSpec) else StudentSpec(value)
    return specs


# The students' architectures, kept in each checkpoint for a resume to compare with its own students.
STUDENT_CONFIGS_FILE = "student_configs.json"
# Config entries that do not change what a checkpoint's weights mean.
_NOT_ARCHITECTURE = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "output_attentions",
}


def architecture(config: PretrainedConfig) -> dict[str, Any]:
    """A student config's entries that decide its architecture (JSON types, as written to a checkpoint)."""
    return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}))


def describe_architecture(config: Mapping[str, Any], keys: list[str]) -> str:
    settings = ", ".join(f"{key}={config.get(key)!r}" for key in keys)
    return f"{config.get('model_type', 'a model')} with {settings}"


def finished_state(checkpoint: str | os.PathLike[str], args: TrainingArguments) -> TrainerState | None:
    """The trainer state of ``checkpoint`` when it is the end of the run that ``args`` describe, else None.

    The run's length is ``max_steps`` when given; else the checkpoint's own plan, when it was made for
    the same number of epochs (a longer run continues it).
    """
    path = Path(checkpoint) / TRAINER_STATE_NAME
    if not path.is_file():
        return None
    state = TrainerState.load_from_json(str(path))
    if args.max_steps > 0:
        planned = args.max_steps
    elif state.num_train_epochs == args.num_train_epochs:
        planned = state.max_steps
    else:
        return None
    return state if planned and state.global_step >= planned else None


# Private methods of transformers.Trainer that AttnDistillTrainer overrides, with the parameters it relies on.
PRIVATE_TRAINER_API: dict[str, tuple[str, ...]] = {
    "_get_output_dir": ("self", "trial"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_save": ("self", "output_dir", "state_dict"),
}

# Students are exported as these plain transformers classes (tested end to end, AutoModel reload included).
STUDENT_CLASSES = ("ViTModel", "DINOv3ViTModel")


def check_pair(teacher: PreTrainedModel, student: PreTrainedModel, image_size: int | tuple[int, int]) -> None:
    """Fail before the first step when the pair cannot be distilled exactly at ``image_size``.

    Both models must be of a family whose last attention is captured exactly, and one forward pass of
    a blank image through each proves the capture sees their last attention kernel's inputs and yields
    a CLS row over the CLS and patch keys at this resolution.
    """
    for role, model in (("teacher", teacher), ("student", student)):
        try:
            family_of(model)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"Unsupported {role}: {error}") from None
        try:
            grid = patch_grid(model, image_size)
        except ValueError as error:
            raise ValueError(f"The {role} cannot take {image_size} px crops: {error}") from None
        try:
            verify_capture(model, grid)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"Unsupported {role}: {error}") from None
    if type(student).__name__ not in STUDENT_CLASSES:
        raise UnsupportedModelError(
            f"Unsupported student: {type(student).__name__}; students are trained and exported as one of "
            f"{', '.join(STUDENT_CLASSES)} (see build_student and its presets)."
        )
    size = image_size if isinstance(image_size, int) else image_size[0]
    student_size = student.config.image_size
    if student_size != size:
        raise ValueError(
            f"The student is configured for {student_size} px but the data transform crops {size} px: set the "
            f"student's image_size (or --image_size) to {size}."
        )


def exportable_student(student: PreTrainedModel) -> PreTrainedModel:
    """The student as ``AutoModel`` builds it, so that loading warns about nothing missing.

    Students train without ViT's pooler (unused parameters break DDP), but ``AutoModel`` builds a
    ViTModel with one. The exported copy carries a freshly initialised pooler, the same on every
    export; AttnDistill features are the CLS token of ``last_hidden_state``, which the pooler does not
    touch.
    """
    if not isinstance(student, ViTModel) or student.pooler is not None:
        return student
    # A fixed seed in a forked generator: saving a model must not reseed or advance the run's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = ViTModel(student.config)
    full = full.to(next(student.parameters()).device)
    missing, unexpected = full.load_state_dict(student.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"Cannot export the student: missing {missing}, unexpected {unexpected}.")
    return full


class AttnDistillTrainer(Trainer):
    """Trainer that distills ``teacher`` into ``student`` with the AttnDistill loss.

    ``teacher`` is a model, a Hub id or a local directory. ``image_processor`` is saved next to the
    exported student so that ``AutoImageProcessor.from_pretrained`` works on the output directory.
    ``batch_transform`` runs on each batch in the training process before the models see it, e.g.
    :class:`~attndistill_hf.gpu_augment.GpuAugment` decoding and augmenting JPEG bytes on the GPU.
    ``image_size`` is the crop size of the data transform (default: the student's configured size);
    a pair that cannot take it fails before the first step.
    """

    def __init__(
        self,
        student: PreTrainedModel | Mapping[str, PreTrainedModel | StudentSpec],
        teacher: PreTrainedModel | str,
        args: AttnDistillConfig,
        *,
        image_processor: Any = None,
        batch_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        image_size: int | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        teacher_model = load_teacher(teacher)
        specs = student_specs(student)
        if len(specs) > 1 and args.max_grad_norm:
            raise ValueError(
                f"max_grad_norm {args.max_grad_norm} with several students: clipping the global gradient norm would "
                "couple their updates. Train them without clipping (the published recipe clips nothing)."
            )
        members = {}
        for name, spec in specs.items():
            check_pair(teacher_model, spec.model, image_size or spec.model.config.image_size)
            loss_fn = spec.loss(teacher_model.config.hidden_size, args, seed=args.seed)
            members[name] = DistillationModule(spec.model, loss_fn)
        super().__init__(
            model=members[""] if "" in members else MultiStudentModule(members),
            args=args,
            processing_class=image_processor,
            **trainer_kwargs,
        )
        # The loss is a per-batch mean and is not pre-scaled for gradient accumulation: let the
        # Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.teacher = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if args.torch_compile:
            install_attention_capture(teacher_model)
            self.teacher = torch.compile(self.teacher, backend=args.torch_compile_backend or "inductor")
        scales_itself = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if args.fp16 and self.accelerator.scaler is None and not scales_itself:
            # Accelerate only autocasts and scales fp16 on accelerators: on a CPU "fp16" would silently
            # train in fp32, and fp16 without loss scaling underflows small gradients to zero.
            raise ValueError(
                f"fp16 needs a gradient scaler, which Accelerate only provides on an accelerator (device: "
                f"{self.accelerator.device.type}). Use --bf16 true, or no mixed precision, on this device."
            )
        self.batch_transform = batch_transform
        self._validated = False
        # Per student ("" for a single one): skips in the current accumulation window, in a row, in all.
        self._window_skipped: set[str] = set()
        self._consecutive_nonfinite = dict.fromkeys(members, 0)
        self.nonfinite_steps_by_student = dict.fromkeys(members, 0)
        # Batches without a readable image: in a row, in all; and the batches that had one.
        self._consecutive_unreadable = 0
        self._unreadable_batches = 0
        self._readable_batches = 0
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self.skipped_images = 0

    # ---- the loss ---------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        skipped = inputs.get("skipped_images")
        if skipped is not None:
            self.skipped_images += int(skipped.sum())
        pixel_values = inputs["pixel_values"]
        members = self.members
        with_attention = any(member.loss_fn.attn_weight for member in members.values())
        with torch.no_grad():  # one teacher forward for every student
            if with_attention:
                teacher_out, teacher_attn = last_cls_attention(self.teacher, pixel_values)
            else:
                teacher_out, teacher_attn = run_model(self.teacher, pixel_values), None
        teacher_grid = patch_grid(unwrap_model(self.teacher), tuple(pixel_values.shape[-2:]))
        outputs = model(
            pixel_values=pixel_values,
            teacher_cls=cls_feature(self.teacher, teacher_out),
            teacher_attn=teacher_attn,
            teacher_grid=teacher_grid,
            validate=not self._validated,
        )
        self._validated = True
        per_student = outputs if isinstance(outputs, dict) else {"": outputs}
        total = pixel_values.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for name, (loss, loss_proj, loss_attn) in per_student.items():
            prefix = f"{name}/" if name else ""
            if not bool(torch.isfinite(loss)) or pixel_values.shape[0] == 0:
                total = total + self._skip_step(members[name], loss, name)
            else:
                self._consecutive_nonfinite[name] = 0
                total = total + loss
                own = {f"{prefix}loss": loss} if prefix else {}  # a single student's loss is the logged "loss"
                self._accumulate({**own, f"{prefix}loss_proj": loss_proj, f"{prefix}loss_attn": loss_attn})
            terms |= {f"{prefix}loss_proj": loss_proj, f"{prefix}loss_attn": loss_attn}
        return (total, terms) if return_outputs else total

    @property
    def members(self) -> dict[str, DistillationModule]:
        """Each student's :class:`DistillationModule` by name (``""`` for a single student)."""
        plain = unwrap_model(self.model)
        return dict(plain.members.items()) if isinstance(plain, MultiStudentModule) else {"": plain}

    @property
    def nonfinite_steps(self) -> int:
        """Batches skipped for a NaN/inf loss, summed over the students."""
        return sum(self.nonfinite_steps_by_student.values())

    def _skip_step(self, member: nn.Module, bad_loss: torch.Tensor, name: str = "") -> torch.Tensor:
        """Drop one student's batch whose loss is NaN/inf: a zero loss over that student's trainable parameters.

        Backpropagating ``0 * NaN`` would still poison the gradients; this surrogate gives exact zero
        gradients and keeps DDP's reducer satisfied (every parameter receives one). The other students
        and the other micro-batches of the accumulation window still count; a student with nothing
        left in the window is not updated at all (:meth:`_drop_empty_update`).
        """
        self._window_skipped.add(name)
        self.nonfinite_steps_by_student[name] += 1
        self._consecutive_nonfinite[name] += 1
        who = f"student {name!r}" if name else "the student"
        logger.warning(
            "Skipping a batch of %s with a non-finite loss (%s); %d skipped so far.",
            who,
            bad_loss.item(),
            self.nonfinite_steps_by_student[name],
        )
        if self._consecutive_nonfinite[name] >= self.args.max_consecutive_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite[name]} consecutive steps of {who} had a NaN/inf loss (step "
                f"{self.state.global_step}). Lower the learning rate, use bf16 instead of fp16, or resume from the "
                "last checkpoint."
            )
        return sum((p.sum() * 0.0 for p in member.parameters() if p.requires_grad), bad_loss.new_zeros(()))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.batch_transform is not None:
            # Before the empty-batch check: GPU decoding may find nothing readable in a batch too.
            inputs = self.batch_transform(inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] == 0:
            loss = self._skip_unreadable_batch(model, inputs)
        else:
            self._consecutive_unreadable = 0
            self._readable_batches += 1
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients and self._window_skipped:
            skipped, self._window_skipped = self._window_skipped, set()
            self._drop_empty_update(skipped)
        return loss

    def _skip_unreadable_batch(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """A batch in which no image could be decoded (the collator left 0 rows): skipped for every
        student, as a non-finite loss is.

        No model takes 0 rows, and under DDP every rank must run the wrapped model's forward and backward
        at every step: a blank stand-in (:meth:`DistillationModule.placeholder_inputs`; the students share
        the crop size and the teacher) runs in its place, and a zero surrogate gives no gradient.
        """
        self.skipped_images += int(inputs["skipped_images"].sum())
        self._unreadable_batches += 1
        self._consecutive_unreadable += 1
        logger.warning("Skipping a batch without a readable image; %d unreadable images so far.", self.skipped_images)
        if self._consecutive_unreadable >= self.args.max_consecutive_nonfinite_steps:
            raise UnreadableDataError(
                f"{self._consecutive_unreadable} batches in a row held no readable image ({self.skipped_images} "
                f"unreadable images so far, step {self.state.global_step}): check that the training data are images "
                "in a format PIL reads."
            )
        members = self.members
        self._window_skipped |= set(members)
        with self.compute_loss_context_manager():
            model(**next(iter(members.values())).placeholder_inputs())
        zero = torch.zeros((), device=self.args.device)
        loss = sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), zero)
        self.accelerator.backward(loss)
        return loss.detach()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``, with the checkpoint to resume from checked before anything of it loads
        (:func:`check_checkpoint`); a run in which no batch held a readable image stops before anything
        is exported."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True and os.path.isdir(self.args.output_dir):
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            check_checkpoint(checkpoint)
            self._check_same_students(checkpoint)
            finished = finished_state(checkpoint, self.args)
            if finished is not None:
                return self._load_finished(checkpoint, finished)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._check_some_batch_was_readable()
        return output

    def _check_same_students(self, checkpoint: str) -> None:
        """Refuse to continue a checkpoint's students with students of another architecture (weights of the
        same shapes would load without a word, e.g. another head count)."""
        path = Path(checkpoint) / STUDENT_CONFIGS_FILE
        if not path.is_file():  # checkpoints written before the configs were kept
            return
        saved = json.loads(path.read_text())
        current = {name: architecture(student.config) for name, student in self.students.items()}
        if set(saved) != set(current):
            raise ValueError(
                f"Cannot resume from {checkpoint}: it trained the students {sorted(saved)}, this run has "
                f"{sorted(current)}; resume with the same students or start a new run."
            )
        for name, config in current.items():
            if saved[name] != config:
                differ = sorted(
                    key for key in saved[name].keys() | config.keys() if saved[name].get(key) != config.get(key)
                )
                who = f"student {name!r}" if name else "the student"
                raise ValueError(
                    f"Cannot resume from {checkpoint}: {who} there is {describe_architecture(saved[name], differ)}, "
                    f"this run builds {describe_architecture(config, differ)}; resume with the same student "
                    "(--student_preset / --student_name_or_path / --patch_size) or start a new run."
                )

    def _load_finished(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        """The students and state of a checkpoint at the end of the run, loaded without another step.

        ``Trainer.train`` would run one more step from such a checkpoint when the run's last epoch is
        partial (step 5 of 4), changing the exported model.
        """
        load_model(self.model, os.path.join(checkpoint, SAFE_WEIGHTS_NAME), device=str(self.args.device))
        self.state = state
        logger.warning(
            "%s is at step %d of %d: the run is finished, nothing left to train.",
            checkpoint,
            state.global_step,
            state.max_steps,
        )
        return TrainOutput(state.global_step, float("nan"), {})

    def _check_some_batch_was_readable(self) -> None:
        """Stop a run none of whose batches so far held a readable image (on any rank), before it writes a
        checkpoint or exports a student that learnt nothing."""
        counts = torch.tensor([self._readable_batches, self._unreadable_batches, self.skipped_images])
        readable, unreadable, images = self.accelerator.reduce(counts.to(self.args.device), reduction="sum").tolist()
        if unreadable and not readable:
            raise UnreadableDataError(
                f"No training batch held a readable image: {images} unreadable images in {unreadable} batches. "
                "Check that the training data are images in a format PIL reads."
            )

    def _drop_empty_update(self, skipped: set[str]) -> None:
        """After the window's last backward: a student every batch of which was skipped gets no update at all.

        Zero gradients are not a skipped step: AdamW would still move the weights by its momentum
        and weight decay. Under DDP the gradients are already averaged here, so "all zero" (every
        rank skipped everything) is the same decision on every rank without another collective.
        """
        members = self.members
        empty = []
        for name in sorted(skipped):
            params = [p for p in members[name].parameters() if p.grad is not None]
            if not any(bool(p.grad.any()) for p in params):
                empty.append((name, params))
        if not empty:
            return
        # With a grad scaler and nothing left to update, an inf makes it skip the step and hold the
        # learning-rate schedule, as for an fp16 overflow; otherwise the empty students' gradients are
        # removed, and torch optimizers leave a parameter without a gradient untouched.
        skip_whole_step = self.accelerator.scaler is not None and len(empty) == len(members)
        for _name, params in empty:
            for param in params:
                if skip_whole_step:
                    param.grad.fill_(float("inf"))
                else:
                    param.grad = None
        names = ", ".join(repr(name) for name, _ in empty if name) or "the student"
        logger.warning(
            "Every batch of this update was skipped for %s: no update at step %d.", names, self.state.global_step
        )

    def _accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss term since the last log, and the skip counters."""
        if "loss" in logs:
            for name, total in self._term_sums.items():
                mean = self.accelerator.reduce(total / max(1, self._term_count), reduction="mean")
                logs[name] = round(float(mean), 6)
            self._term_sums, self._term_count = {}, 0
            logs["skipped_images"] = self.skipped_images
            logs["nonfinite_steps"] = self.nonfinite_steps
            if "" not in self.nonfinite_steps_by_student:
                logs |= {f"{name}/nonfinite_steps": n for name, n in self.nonfinite_steps_by_student.items()}
        super().log(logs, start_time)

    # ---- data -------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader | DistinctUnreadableLoader:
        """The training DataLoader: per-rank streams prepared as such, and reproducible training examples.

        A stream already split per rank (``EqualStepsIterable``) must not be sharded a second time:
        ``accelerator.prepare`` would cut each rank's part again, so it is prepared as a single-process
        loader (device placement only). With a collator that reads example keys (``ImageCollator``,
        ``RawBytesCollator``), every example carries its ``ExampleKey`` (the run's seed, or ``data_seed``
        when set; the epoch; its index), of which its random view is a function; a map-style dataset is
        then read in ``EpochShuffle`` order, a function of (seed, epoch), so that a run resumed mid-epoch
        gets the batches and views of an uninterrupted one; and each unreadable example is counted once
        (``DistinctUnreadableLoader``). Any other data takes the Trainer's path.
        """
        dataset = self.train_dataset
        keyed = getattr(self.data_collator, "uses_example_keys", False)
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        if isinstance(dataset, EqualStepsIterable):
            stream = dataset.with_example_keys(seed) if keyed else dataset
            loader = prepare_per_rank_dataloader(
                self.accelerator, self._training_loader(stream, self.args.per_device_train_batch_size)
            )
        elif keyed and hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset):
            examples = KeyedExamples(dataset, seed)
            loader = self.accelerator.prepare(
                self._training_loader(examples, self.args.train_batch_size, sampler=EpochShuffle(examples))
            )
        else:
            return super().get_train_dataloader()
        return DistinctUnreadableLoader(loader) if keyed else loader

    def _training_loader(self, dataset: Any, batch_size: int, sampler: Any = None) -> DataLoader:
        """A DataLoader with the Trainer's settings for training data (workers, pinning, worker seeding)."""
        workers = self.args.dataloader_num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            multiprocessing_context=self.args.dataloader_multiprocessing_context if workers > 0 else None,
            # Every rank's main process has the same seed, so its workers would draw the same augmentations
            # as the other ranks' workers from an unkeyed collator; the Trainer's worker seeding adds the rank.
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index) if workers else None,
        )

    def get_resumed_dataloader(
        self, dataloader: DataLoader | DistinctUnreadableLoader, num_batches: int
    ) -> DataLoader | DistinctUnreadableLoader:
        """Skip the batches trained before the checkpoint; the count of unreadable examples goes on."""
        if isinstance(dataloader, DistinctUnreadableLoader):
            resumed = super().get_resumed_dataloader(dataloader.loader, num_batches)
            return DistinctUnreadableLoader(resumed, dataloader.tally)
        return super().get_resumed_dataloader(dataloader, num_batches)

    # ---- optimisation -----------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on matrices only: biases and every 1-D parameter (norms, tokens' scales) are exempt."""
        return [name for name, param in model.named_parameters() if param.ndim > 1]

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.args.warmup_epochs > 0 and self.lr_scheduler is None:
            self.args.warmup_steps = max(1, round(self.args.warmup_epochs * self._update_steps_per_epoch()))
        return super().create_scheduler(num_training_steps, optimizer)

    def _update_steps_per_epoch(self) -> int:
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError(
                "warmup_epochs needs the epoch length: stream with a known size (--num_train_examples) "
                "or use warmup_steps."
            )
        batch = self.args.total_train_batch_size
        if isinstance(self.train_dataset, EqualStepsIterable):
            batch //= max(1, self.args.world_size)  # a per-rank stream holds this rank's examples only
        return max(1, math.ceil(len(self.train_dataset) / batch))

    # ---- transformers' private Trainer API ---------------------------------------------------------
    # The only overrides of private Trainer methods, listed in PRIVATE_TRAINER_API with the parameters
    # they rely on; tests/test_private_trainer_api.py fails when a transformers release changes them.
    # transformers 5.24 writes checkpoint-N in place, so a run killed mid-write would leave a half
    # checkpoint for resume to pick: _get_output_dir + _save_checkpoint stage it and rename it. _save
    # pickles the arguments into training_args.bin: it must not carry the Hub token.

    STAGING_DIR = ".checkpoint-staging"

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, self.STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` under a staging folder, then move it into place with one rename.

        A run killed while writing leaves no half-written ``checkpoint-N`` for resume to pick up:
        ``get_last_checkpoint`` only ever sees complete checkpoints. Rotation (``save_total_limit``)
        runs after the rename, so it only ever deletes older complete checkpoints.
        """
        self._check_some_batch_was_readable()
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, self.STAGING_DIR)
        if self.args.should_save and os.path.isdir(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # leftover of an earlier crash
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.args.should_save:  # what a resume checks its students against
            configs = {name: architecture(student.config) for name, student in self.students.items()}
            Path(staging, name, STUDENT_CONFIGS_FILE).write_text(json.dumps(configs, indent=2, sort_keys=True))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            with contextlib.suppress(OSError):  # only while empty: a finished run leaves no staging folder
                os.rmdir(staging)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """training_args.bin is a pickle of the arguments: never write the Hub token into it."""
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token

    # ---- saving -----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep student + projector; a user's ``save_model`` exports the student alone."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
        else:
            self.export_student(output_dir or self.args.output_dir)

    @property
    def students(self) -> dict[str, PreTrainedModel]:
        """The students by name (``""`` for a single student)."""
        return {name: member.student for name, member in self.members.items()}

    @property
    def student(self) -> PreTrainedModel:
        """The student of a single-student run."""
        students = self.students
        if "" not in students:
            raise AttributeError(f"This run trains several students ({', '.join(students)}): use trainer.students.")
        return students[""]

    def export_student(self, output_dir: str) -> None:
        """Write the student as a plain transformers model (config, safetensors, image processor).

        With several students, each goes to its own folder ``output_dir/<name>``.
        """
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        for name, student in self.students.items():
            folder = os.path.join(output_dir, name) if name else output_dir
            os.makedirs(folder, exist_ok=True)
            exportable_student(student).save_pretrained(folder, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            logger.info("Exported %s to %s", f"student {name!r}" if name else "the student", folder)
