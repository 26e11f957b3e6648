"""The students of a run and what the Trainer optimises: each student with its loss and projector.

:class:`DistillationModule` is one student and its AttnDistill loss (whose projector trains with it);
:class:`MultiStudentModule` holds several, optimised as one module; :class:`StudentSpec` names a
student's own loss settings. :func:`check_pair` proves, before the first step, that a teacher and a
student can be distilled exactly; :func:`exportable_student` is the student as ``AutoModel`` loads it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, ViTModel
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
)

from .attention import (
    install_last_block_capture,
    last_block_tokens,
    last_cls_attention,
    run_model,
    verify_capture,
)
from .config import LOSS_SETTING_BOUNDS, AttnDistillConfig
from .families import UnsupportedModelError, family_of
from .losses import AttnDistillLoss, AttnDistillLossOutput, check_projector_loss
from .models import cls_token, patch_grid
from .validation import (
    check_fields,
)

logger = logging.getLogger(__name__)


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
            self(**self.placeholder_inputs()).loss.backward()
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
    ) -> AttnDistillLossOutput:
        if self.loss_fn.attn_weight:
            _, student_attn = self.capture(self.student, pixel_values)
        else:
            run_model(self.student, pixel_values)
            student_attn = None
        return self.loss_fn(
            teacher_cls,
            teacher_attn,
            cls_token(last_block_tokens(self.student)),  # before the final norm
            student_attn,
            teacher_grid=teacher_grid,
            student_grid=patch_grid(self.student, tuple(pixel_values.shape[-2:])),
            validate=validate,
        )


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

    def setting(self, name: str, args: AttnDistillConfig) -> Any:
        """This student's loss setting ``name``: its own, else the run's."""
        own = getattr(self, name)
        return getattr(args, name) if own is None else own

    def loss(self, teacher_dim: int, args: AttnDistillConfig, seed: int) -> AttnDistillLoss:
        """This student's loss (and projector), with the run's settings where this spec has none.

        The projector is initialised from ``seed`` alone, not from the global RNG's position: a
        student's projector starts the same whether it trains alone or beside others.
        """

        if self.setting("proj_loss_weight", args) == 0 and self.setting("attn_loss_weight", args) == 0:
            raise ValueError("A student has both loss weights at 0: nothing to train it with.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AttnDistillLoss(
                self.model.config.hidden_size,
                teacher_dim,
                proj_weight=self.setting("proj_loss_weight", args),
                attn_weight=self.setting("attn_loss_weight", args),
                fusion_temperature=self.setting("fusion_temperature", args),
                projector_depth=self.setting("projector_depth", args),
                projector_hidden_dims=self.setting("projector_hidden_dims", args),
                projector_loss=self.setting("projector_loss", args),
                clamp=(args.attn_clamp_min, args.attn_clamp_max),
            )


class MultiStudentModule(nn.Module):
    """Several students of one teacher, optimised as one module (one optimizer, DDP wrapper and checkpoint).

    Each member is a :class:`DistillationModule` with its own projector and loss settings; all of them
    read the same teacher outputs, computed once per batch. The forward pass returns each member's
    :class:`~attndistill_hf.losses.AttnDistillLossOutput` by name: the trainer sums the finite ones and
    skips the others.
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
    ) -> dict[str, AttnDistillLossOutput]:
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


def student_specs(
    student: PreTrainedModel | Mapping[str, PreTrainedModel | StudentSpec],
) -> dict[str | None, StudentSpec]:
    """The students of a run by name; one plain model is the run's single student, named ``None``."""
    if isinstance(student, nn.Module):
        return {None: StudentSpec(student)}
    if not student:
        raise ValueError("No students: give a model, or a mapping of names to models / StudentSpec.")
    specs = {}
    for name, value in student.items():
        check_student_name(name)
        specs[name] = value if isinstance(value, StudentSpec) else StudentSpec(value)
    return specs


# Students are exported as these plain transformers classes (tested end to end, AutoModel reload included).
STUDENT_CLASSES = ("ViTModel", "DINOv3ViTModel")


def check_pair(teacher: PreTrainedModel, student: PreTrainedModel, image_size: int | tuple[int, int]) -> None:
    """Fail before the first step when the pair cannot be distilled exactly at ``image_size``.

    Both models must be of a family whose last attention is captured exactly, and one forward pass of
    a blank image through each proves the capture sees their last attention kernel's inputs and yields
    a CLS row over the CLS and patch keys at this resolution.
    """
    check_captured("teacher", teacher, image_size)
    check_student(student, image_size)


def check_captured(role: str, model: PreTrainedModel, image_size: int | tuple[int, int]) -> None:
    """``model`` (the ``role`` in messages) is of a supported family, tiles ``image_size`` and its capture works."""
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


def check_student(student: PreTrainedModel, image_size: int | tuple[int, int]) -> None:
    """The student's side of :func:`check_pair` (all there is to check when the targets come from a cache)."""
    check_captured("student", student, image_size)
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
