"""The AttnDistill objective: projector alignment of CLS tokens plus last-layer CLS-attention guidance.

Small pure functions, one concern each, composed by :class:`AttnDistillLoss`. The numerics follow
the published training code (see docs/method.md): plain MSE on the projected CLS token, and
``KL(teacher || student)`` of clamped, L1-renormalised CLS-attention rows, summed over heads and
tokens and averaged over the batch. Teacher and student maps that differ in patch grid (case b) or
head count (case c) are brought to a common shape first.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .models import LAYER_NORM_EPS, cls_token, square_side
from .validation import POSITIVE, POSITIVE_INT, check_value

Grid = tuple[int, int]

# The published loss settings, declared once: AttnDistillLoss, the run's config, model cards and the
# benchmarks read them from here.
DEFAULT_PROJ_WEIGHT = 1.0
DEFAULT_ATTN_WEIGHT = 0.1
DEFAULT_FUSION_TEMPERATURE = 10.0
DEFAULT_PROJECTOR_DEPTH = 4  # the d-2d-d-2d-D head
DEFAULT_PROJECTOR_LOSS = "mse"
DEFAULT_CLAMP = (1e-5, 0.996)
# Floor against log(0) in the head fusion; far below any float32 softmax output a ViT produces.
LOG_FLOOR = 1e-30


def clamp_and_renormalise(attention: torch.Tensor, clamp: tuple[float, float] = DEFAULT_CLAMP) -> torch.Tensor:
    """Clamp probabilities to ``[low, high]`` and L1-renormalise over the last (token) axis."""
    clamped = attention.clamp(min=clamp[0], max=clamp[1])
    return clamped / clamped.sum(dim=-1, keepdim=True)


def resize_patch_attention(attention: torch.Tensor, source_grid: Grid, target_grid: Grid) -> torch.Tensor:
    """Case (b): move CLS-attention rows ``[B, H, 1 + Ns]`` to another patch grid.

    The patch weights are resized on their 2-D grid with bicubic interpolation (align_corners=False)
    and rescaled to the mass they had (``1 - a0``), so the CLS self-weight ``a0`` is kept. Bicubic can
    produce small negatives; the clamp before the KL handles them.

    The resized weights are divided by their sum before they are scaled: a row whose patches hold almost
    nothing (a CLS query on itself, patch weights of 1e-40) would overflow ``(1 - a0) / sum`` to inf. A
    row whose resized patches sum to zero or less has no mass to rescale and gets zero patch weights.
    """
    batch, heads, tokens = attention.shape
    if tokens - 1 != source_grid[0] * source_grid[1]:
        raise ValueError(f"A map with {tokens - 1} patch keys does not fit the patch grid {source_grid}.")
    cls_weight = attention[..., :1]
    patches = attention[..., 1:].reshape(batch, heads, *source_grid)
    resized = F.interpolate(patches, size=target_grid, mode="bicubic", align_corners=False).flatten(2)
    mass = resized.sum(dim=-1, keepdim=True)
    has_mass = mass > 0
    shares = resized / torch.where(has_mass, mass, torch.ones_like(mass))
    resized = torch.where(has_mass, shares * (1.0 - cls_weight), torch.zeros_like(shares))
    return torch.cat([cls_weight, resized], dim=-1)


def fuse_heads(attention: torch.Tensor, temperature: float, floor: float = LOG_FLOOR) -> torch.Tensor:
    """Case (c): fuse ``[B, H, T]`` maps into one ``[B, 1, T]`` map, ``softmax(sum_h log a_h / T)``.

    With ``temperature == H`` this is the normalised geometric mean of the heads.
    """
    check_value("temperature", temperature, POSITIVE)
    log_sum = attention.clamp_min(floor).log().sum(dim=1, keepdim=True)
    return (log_sum / temperature).softmax(dim=-1)


def attention_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` summed over heads and tokens, averaged over the batch."""
    return F.kl_div(student.log(), teacher, reduction="batchmean")


def _grid(tokens: int, grid: Grid | None) -> Grid:
    if grid is None:
        side = square_side(tokens - 1)
        return side, side
    if grid[0] * grid[1] != tokens - 1:
        raise ValueError(f"Patch grid {tuple(grid)} has {grid[0] * grid[1]} cells but the map has {tokens - 1}.")
    return int(grid[0]), int(grid[1])


def check_attention_shapes(teacher: torch.Tensor, student: torch.Tensor) -> None:
    """Raise ``ValueError`` unless both maps are ``[batch, heads, 1 + patches]`` with the same batch."""
    for name, attention in (("teacher", teacher), ("student", student)):
        if attention.dim() != 3:
            raise ValueError(f"The {name} map must be [batch, heads, 1 + patches], got {tuple(attention.shape)}.")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"Batch mismatch: teacher maps have {teacher.shape[0]} rows, student maps {student.shape[0]}.")


def check_attention_values(attention: torch.Tensor, name: str, *, tolerance: float = 1e-3) -> None:
    """Raise ``ValueError`` for a map with NaN/inf or rows that are not probability distributions.

    These checks synchronise with the device, so the trainer runs them on its first step only.
    """
    if not torch.isfinite(attention).all():
        raise ValueError(f"The {name} attention map contains NaN or inf values.")
    if (attention < 0).any() or (attention.sum(dim=-1) - 1).abs().max() > tolerance:
        raise ValueError(
            f"The {name} attention rows are not probability distributions (non-negative, summing to 1 "
            "over the keys); pass softmax outputs, e.g. from last_cls_attention."
        )


def attention_guidance_loss(
    teacher_attn: torch.Tensor,
    student_attn: torch.Tensor,
    *,
    fusion_temperature: float = DEFAULT_FUSION_TEMPERATURE,
    teacher_grid: Grid | None = None,
    student_grid: Grid | None = None,
    clamp: tuple[float, float] = DEFAULT_CLAMP,
    validate: bool = True,
) -> torch.Tensor:
    """The attention-guidance term for CLS-attention rows ``[B, H, 1 + N]`` of teacher and student.

    (a) same heads and patches: head-to-head KL. (b) different patch counts: the teacher's map is
    resized to the student's grid (grids default to square; give them for non-square images).
    (c) different head counts: both sides fused with ``softmax(sum_h log a_h / T)``. (b)+(c): resize,
    clamp the resized teacher map at the lower clamp bound (bicubic negatives), then fuse.
    """
    check_attention_shapes(teacher_attn, student_attn)
    if validate:
        check_attention_values(teacher_attn, "teacher")
        check_attention_values(student_attn, "student")
    teacher = teacher_attn.float()
    student = student_attn.float()
    t_grid = _grid(teacher.shape[-1], teacher_grid)
    s_grid = _grid(student.shape[-1], student_grid)
    resized = t_grid != s_grid
    if resized:
        teacher = resize_patch_attention(teacher, t_grid, s_grid)
    if teacher.shape[1] != student.shape[1]:
        if resized:
            teacher = teacher.clamp_min(clamp[0])
        teacher = fuse_heads(teacher, fusion_temperature)
        student = fuse_heads(student, fusion_temperature)
    return attention_kl(clamp_and_renormalise(teacher, clamp), clamp_and_renormalise(student, clamp))


PROJECTOR_LOSSES = ("mse", "cosine")


def check_projector_loss(kind: str) -> str:
    """``kind`` when it is one of :data:`PROJECTOR_LOSSES`, else a ValueError naming the choices."""
    if kind not in PROJECTOR_LOSSES:
        raise ValueError(f"Unknown projector loss {kind!r}; use one of {', '.join(PROJECTOR_LOSSES)}.")
    return kind


def projector_alignment_loss(
    student_cls_projected: torch.Tensor, teacher_cls: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Distance between the projected student CLS and the teacher CLS (after its final LayerNorm).

    ``mse``: mean over batch x teacher width (the published default). ``cosine``: mean of ``2 - 2 cos``.
    """
    if student_cls_projected.shape != teacher_cls.shape:
        raise ValueError(
            f"Projected student CLS {tuple(student_cls_projected.shape)} and teacher CLS "
            f"{tuple(teacher_cls.shape)} differ in shape; the projector must map to the teacher's width."
        )
    student = student_cls_projected.float()
    teacher = teacher_cls.float()
    if check_projector_loss(kind) == "mse":
        return F.mse_loss(student, teacher)
    return (2.0 - 2.0 * F.cosine_similarity(student, teacher, dim=-1)).mean()


def projector_hidden_dims(student_dim: int, depth: int) -> list[int]:
    """Hidden widths of the published projector generalised to any depth: 2d, d, 2d, d, ..."""
    check_value("depth", depth, POSITIVE_INT)  # at least the linear layer to the teacher's width
    return [2 * student_dim if i % 2 == 0 else student_dim for i in range(depth - 1)]


class AttnDistillProjector(nn.Module):
    """LayerNorm(d) -> [Linear -> GELU] x (depth-1) -> Linear(., D_teacher) -> LayerNorm(D_teacher).

    With depth 4 this is the published head: d -> 2d -> d -> 2d -> D_teacher, no BatchNorm, LayerNorm
    eps 1e-6, Linear weights from a truncated normal (std 0.02) with zero biases. It is a training-time
    head only; the exported student does not contain it.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        depth: int = DEFAULT_PROJECTOR_DEPTH,
        hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        widths = [student_dim, *(hidden_dims if hidden_dims is not None else projector_hidden_dims(student_dim, depth))]
        layers: list[nn.Module] = [nn.LayerNorm(student_dim, eps=LAYER_NORM_EPS)]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.GELU()]
        layers += [nn.Linear(widths[-1], teacher_dim), nn.LayerNorm(teacher_dim, eps=LAYER_NORM_EPS)]
        self.layers = nn.Sequential(*layers)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, student_tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(student_tokens)


def _as_cls_token(output: ModelOutput | torch.Tensor) -> torch.Tensor:
    """The CLS token ``[B, D]`` of a loss input: given as is, or the first of its tokens ``[B, T, D]``."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 2 else cls_token(output)
    return cls_token(output.last_hidden_state)


# The names of AttnDistillLossOutput's fields, as logged (``<name>/...`` for each of several students).
LOSS_TERMS: tuple[str, ...] = ("loss", "loss_proj", "loss_attn")


@dataclass
class AttnDistillLossOutput:
    """The weighted total and its two terms (each unweighted; detached: logged, never backpropagated)."""

    loss: torch.Tensor
    loss_proj: torch.Tensor
    loss_attn: torch.Tensor


class AttnDistillLoss(nn.Module):
    """``w_proj * L_proj + w_attn * L_attn``; owns the projector, which trains with the student.

    A term whose weight is 0 is not computed (the ablations and the throughput floor use this), and
    its reported value is 0.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        proj_weight: float = DEFAULT_PROJ_WEIGHT,
        attn_weight: float = DEFAULT_ATTN_WEIGHT,
        fusion_temperature: float = DEFAULT_FUSION_TEMPERATURE,
        projector_depth: int = DEFAULT_PROJECTOR_DEPTH,
        projector_hidden_dims: Sequence[int] | None = None,
        projector_loss: str = DEFAULT_PROJECTOR_LOSS,
        clamp: tuple[float, float] = DEFAULT_CLAMP,
    ) -> None:
        super().__init__()
        check_projector_loss(projector_loss)  # before a run starts, not at its first step
        self.projector = AttnDistillProjector(
            student_dim, teacher_dim, depth=projector_depth, hidden_dims=projector_hidden_dims
        )
        self.teacher_dim = teacher_dim
        self.proj_weight = proj_weight
        self.attn_weight = attn_weight
        self.fusion_temperature = fusion_temperature
        self.projector_loss = projector_loss
        self.clamp = clamp

    def forward(
        self,
        teacher_output: ModelOutput | torch.Tensor,
        teacher_attn: torch.Tensor | None,
        student_output: ModelOutput | torch.Tensor,
        student_attn: torch.Tensor | None,
        *,
        teacher_grid: Grid | None = None,
        student_grid: Grid | None = None,
        validate: bool = False,
    ) -> AttnDistillLossOutput:
        """Inputs: each model's output (or its CLS token ``[B, D]`` / tokens ``[B, T, D]``) and its
        CLS-attention rows ``[B, H, 1 + N]``. The teacher's side is its CLS feature after its final norm;
        the student's is its last block's tokens *before* its final LayerNorm, as the trainer passes them
        and as the published code reads them (the projector opens with its own LayerNorm).

        The projector is per token, so projecting only the CLS token equals projecting every token and
        taking the CLS token, at a fraction of the cost.
        """
        teacher_cls = _as_cls_token(teacher_output)
        student_cls = _as_cls_token(student_output)
        zero = student_cls.new_zeros((), dtype=torch.float32)
        loss_proj = zero
        loss_attn = zero
        if self.proj_weight:
            projected = self.projector(student_cls)
            loss_proj = projector_alignment_loss(projected, teacher_cls, self.projector_loss)
        if self.attn_weight:
            if teacher_attn is None or student_attn is None:
                raise ValueError("attn_weight is non-zero but no attention maps were given.")
            loss_attn = attention_guidance_loss(
                teacher_attn,
                student_attn,
                fusion_temperature=self.fusion_temperature,
                teacher_grid=teacher_grid,
                student_grid=student_grid,
                clamp=self.clamp,
                validate=validate,
            )
        loss = self.proj_weight * loss_proj + self.attn_weight * loss_attn
        return AttnDistillLossOutput(loss=loss, loss_proj=loss_proj.detach(), loss_attn=loss_attn.detach())
