"""The teacher step: one frozen forward pass that gives every student its targets.

:func:`teacher_targets` is what a training step computes from the teacher (the trainer, once per batch
for all students, and the step benchmark): its CLS feature, its last-layer CLS-query attention when a
student is guided by it, and its patch grid at the batch's resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import last_cls_attention, run_model, unwrap_model
from .families import normalised_cls_feature
from .models import patch_grid


@dataclass
class TeacherTargets:
    """The teacher's outputs that the AttnDistill loss reads, for one batch."""

    cls: torch.Tensor  # [B, D]: the family's CLS feature (after the final norm; CLIP: the pooled output)
    attention: torch.Tensor | None  # [B, H, 1 + N]: last-layer CLS-query attention; None without guidance
    grid: tuple[int, int]  # the teacher's patch grid at the batch's resolution


def teacher_targets(
    teacher: nn.Module,
    pixel_values: torch.Tensor,
    *,
    with_attention: bool = True,
    capture: Callable[[nn.Module, torch.Tensor], tuple[Any, torch.Tensor]] = last_cls_attention,
) -> TeacherTargets:
    """The frozen teacher's targets for ``pixel_values``, without building a graph.

    ``capture`` takes the CLS row of the last attention (the benchmark passes the eager reference to
    time the naive step); without attention guidance the teacher runs plainly. The images enter in the
    precision of the teacher's weights (``--teacher_dtype``); the targets leave in float32.
    """
    pixel_values = pixel_values.to(next(teacher.parameters()).dtype)
    with torch.no_grad():
        if with_attention:
            output, attention = capture(teacher, pixel_values)
        else:
            output, attention = run_model(teacher, pixel_values), None
    grid = patch_grid(unwrap_model(teacher), tuple(pixel_values.shape[-2:]))
    cls = normalised_cls_feature(teacher, output).float()
    return TeacherTargets(cls=cls, attention=attention, grid=grid)
