"""Property tests: random valid maps of random shapes never break the attention-guidance loss."""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attndistill_hf.losses import DEFAULT_CLAMP, attention_guidance_loss

EPS = torch.finfo(torch.float32).eps


def maps(batch: int, heads: int, grid: tuple[int, int], sharpness: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, 1 + grid[0] * grid[1], generator=generator) * sharpness
    return logits.softmax(-1)


shapes = st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 3, 4, 6, 12]), st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=60, deadline=None)
@given(
    teacher=shapes,
    student=shapes,
    sharpness=st.floats(0.0, 30.0),
    temperature=st.floats(0.5, 20.0),
    seed=st.integers(0, 2**16),
)
# A teacher row with patch weights of 1e-40 resized from 1 x 3 to 1 x 1: an inf in the rescale made this NaN.
@example(teacher=(1, 12, 1, 3), student=(1, 1, 1, 1), sharpness=24.0, temperature=1.0, seed=0)
def test_loss_is_finite_and_non_negative(teacher, student, sharpness, temperature, seed) -> None:
    batch = teacher[0]
    t_map = maps(batch, teacher[1], teacher[2:], sharpness, seed)
    s_map = maps(batch, student[1], student[2:], sharpness, seed + 1)
    loss = attention_guidance_loss(
        t_map, s_map, fusion_temperature=temperature, teacher_grid=teacher[2:], student_grid=student[2:]
    )
    assert math.isfinite(loss.item())
    # float32 rounds each term p log(p / q) by about eps |p log q|; |log q| is at most -log(the lower clamp).
    heads = max(teacher[1], student[1])
    assert loss.item() >= -4 * EPS * heads * -math.log(DEFAULT_CLAMP[0])


@settings(max_examples=40, deadline=None)
@given(shape=shapes, sharpness=st.floats(0.0, 30.0), seed=st.integers(0, 2**16))
@example(shape=(1, 6, 3, 9), sharpness=0.0, seed=0)  # uniform rows: 1.25e-6 of rounding, above a fixed 1e-6
def test_loss_is_zero_when_student_equals_teacher(shape, sharpness, seed) -> None:
    batch, heads, rows, cols = shape
    attention = maps(batch, heads, (rows, cols), sharpness, seed)
    loss = attention_guidance_loss(attention, attention.clone(), teacher_grid=(rows, cols), student_grid=(rows, cols))
    # KL(p || p) is 0; float32 leaves a rounding of about eps per unit of the summed |p log p| (the entropies).
    entropies = torch.special.entr(attention).sum() / batch
    assert abs(loss.item()) <= 4 * EPS * max(entropies.item(), 1.0)
