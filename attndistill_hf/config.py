"""``AttnDistillConfig``: ``TrainingArguments`` plus the AttnDistill fields, each checked when it is set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import (
    DEFAULT_ATTN_WEIGHT,
    DEFAULT_CLAMP,
    DEFAULT_FUSION_TEMPERATURE,
    DEFAULT_PROJ_WEIGHT,
    DEFAULT_PROJECTOR_DEPTH,
    DEFAULT_PROJECTOR_LOSS,
    check_projector_loss,
)
from .validation import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    OPTIONAL_POSITIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Bound,
    check_choice,
    check_fields,
    check_value,
)

logger = logging.getLogger(__name__)

# The precisions a teacher's weights may be loaded in (its CLS row is computed in float32 whatever they are).
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# none: a full copy of the teacher on every process; fsdp: each holds 1/world of it (FSDP2, teacher.py).
TEACHER_SHARDINGS = ("none", "fsdp")


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

    proj_loss_weight: float = field(
        default=DEFAULT_PROJ_WEIGHT, metadata={"help": "Weight w_proj of the projector alignment term."}
    )
    attn_loss_weight: float = field(
        default=DEFAULT_ATTN_WEIGHT,
        metadata={"help": "Weight w_attn of the last-layer CLS-attention KL term (0 disables it)."},
    )
    fusion_temperature: float = field(
        default=DEFAULT_FUSION_TEMPERATURE,
        metadata={"help": "Temperature T of the head fusion softmax(sum_h log a_h / T) when head counts differ."},
    )
    projector_depth: int = field(
        default=DEFAULT_PROJECTOR_DEPTH,
        metadata={"help": "Linear layers in the projector (4 = the published d-2d-d-2d-D head)."},
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
        default=DEFAULT_PROJECTOR_LOSS,
        metadata={"help": "Projector distance: 'mse' (published) or 'cosine' (2 - 2 cos)."},
    )
    attn_clamp_min: float = field(
        default=DEFAULT_CLAMP[0], metadata={"help": "Lower clamp of the attention maps before the KL."}
    )
    attn_clamp_max: float = field(
        default=DEFAULT_CLAMP[1], metadata={"help": "Upper clamp of the attention maps before the KL."}
    )
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
    teacher_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision of the teacher's weights: float32, bfloat16 or float16 (the DINOv3-7B era: half "
            "the bytes). The teacher computes its targets in it; its CLS attention row is computed in float32.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    teacher_sharding: str = field(
        default="none",
        metadata={
            "help": "none: every process holds the whole teacher; fsdp: the frozen teacher is sharded over all "
            "processes with FSDP2 (each holds 1/world of its weights and gathers one block at a time).",
            "choices": list(TEACHER_SHARDINGS),
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
        check_choice("--teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        check_choice("--teacher_sharding", self.teacher_sharding, TEACHER_SHARDINGS)
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
