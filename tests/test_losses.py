"""Parity of the AttnDistill losses with an independent float64 reference written from the method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attndistill_hf.losses import (
    AttnDistillLoss,
    AttnDistillProjector,
    attention_guidance_loss,
    fuse_heads,
    projector_alignment_loss,
    resize_patch_attention,
)

LOW, HIGH = 1e-5, 0.996


def random_maps(batch: int, heads: int, tokens: int, sharpness: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Peaked softmax rows, so that both clamp bounds are exercised."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, tokens, generator=gen, dtype=torch.float64) * sharpness
    logits[:, 0, 0] += 25.0  # one head looks almost only at CLS: above the upper clamp bound
    return logits.softmax(-1).float()


# ---- independent reference: per sample, per head, plain Python sums, float64 -----------------------


def ref_clamp_norm(row: list[float]) -> list[float]:
    clamped = [min(max(v, LOW), HIGH) for v in row]
    total = sum(clamped)
    return [v / total for v in clamped]


def ref_resize(row: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> list[float]:
    cls = float(row[0])
    grid = row[1:].double().reshape(1, 1, *src)
    resized = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False).reshape(-1).tolist()
    mass = sum(resized)
    return [cls] + [v * (1.0 - cls) / mass for v in resized]


def ref_fuse(rows: list[list[float]], temperature: float, floor: float | None) -> list[float]:
    scores = []
    for token in range(len(rows[0])):
        total = 0.0
        for row in rows:
            value = row[token] if floor is None else max(row[token], floor)
            total += math.log(max(value, 1e-300))
        scores.append(total / temperature)
    peak = max(scores)
    exps = [math.exp(s - peak) for s in scores]
    z = sum(exps)
    return [e / z for e in exps]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def reference_loss(teacher, student, t_grid, s_grid, temperature=10.0) -> float:
    total = 0.0
    batch = teacher.shape[0]
    for b in range(batch):
        t_rows = [teacher[b, h].double() for h in range(teacher.shape[1])]
        s_rows = [student[b, h].double().tolist() for h in range(student.shape[1])]
        resized = t_grid != s_grid
        t_rows = [ref_resize(r, t_grid, s_grid) for r in t_rows] if resized else [r.tolist() for r in t_rows]
        if len(t_rows) != len(s_rows):
            t_rows = [ref_fuse(t_rows, temperature, LOW if resized else None)]
            s_rows = [ref_fuse(s_rows, temperature, None)]
        for t_row, s_row in zip(t_rows, s_rows, strict=True):
            total += ref_kl(ref_clamp_norm(t_row), ref_clamp_norm(s_row))
    return total / batch


CASES = {
    "a_same": ((6, (7, 7)), (6, (7, 7))),
    "b_patches": ((6, (14, 14)), (6, (7, 7))),
    "c_heads": ((6, (7, 7)), (3, (7, 7))),
    "bc_both": ((6, (14, 14)), (3, (7, 7))),
    "bc_nonsquare": ((12, (4, 6)), (3, (2, 3))),
    "b_upsample": ((3, (2, 3)), (3, (4, 6))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("temperature", [10.0, 3.0])
def test_attention_guidance_matches_reference(case: str, temperature: float) -> None:
    (t_heads, t_grid), (s_heads, s_grid) = CASES[case]
    teacher = random_maps(3, t_heads, 1 + t_grid[0] * t_grid[1], seed=1)
    student = random_maps(3, s_heads, 1 + s_grid[0] * s_grid[1], seed=2)
    square = t_grid[0] == t_grid[1] and s_grid[0] == s_grid[1]
    grids = {} if square else {"teacher_grid": t_grid, "student_grid": s_grid}
    ours = attention_guidance_loss(teacher, student, fusion_temperature=temperature, **grids)
    expected = reference_loss(teacher, student, t_grid, s_grid, temperature)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected, rel=2e-5, abs=1e-7)
    assert expected > 0.01  # the maps differ: the loss must see it


def test_loss_is_zero_for_identical_maps_and_matches_torch_kl() -> None:
    maps = random_maps(4, 6, 50)
    assert attention_guidance_loss(maps, maps).item() == pytest.approx(0.0, abs=1e-7)
    student = random_maps(4, 6, 50, seed=3)
    t, s = (m.clamp(LOW, HIGH) for m in (maps, student))
    t, s = t / t.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True)
    expected = (t * (t.log() - s.log())).sum() / 4
    assert attention_guidance_loss(maps, student).item() == pytest.approx(expected.item(), rel=1e-5)


def test_resize_keeps_cls_weight_and_mass() -> None:
    maps = random_maps(2, 3, 1 + 28 * 28)
    resized = resize_patch_attention(maps, (28, 28), (14, 14))
    assert resized.shape == (2, 3, 1 + 196)
    torch.testing.assert_close(resized[..., 0], maps[..., 0])
    torch.testing.assert_close(resized.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_a_row_with_almost_no_patch_mass_is_resized_and_fused_finite_as_the_reference() -> None:
    # The CLS query looks at one patch; the others hold float32 denormals, and the 1 x 3 grid resized to
    # 1 x 1 keeps the middle one (4.9e-40): (1 - a0) / 4.9e-40 overflowed to inf and the fused loss was NaN.
    teacher = torch.tensor([[[2.8429e-19, 1.0, 4.9383e-40, 2.9228e-41], [0.1, 0.3, 0.4, 0.2]]])
    student = torch.tensor([[[0.9, 0.1]]])
    resized = resize_patch_attention(teacher, (1, 3), (1, 1))
    torch.testing.assert_close(resized, torch.tensor([[[2.8429e-19, 1.0], [0.1, 0.9]]]))
    ours = attention_guidance_loss(teacher, student, fusion_temperature=1.0, teacher_grid=(1, 3), student_grid=(1, 1))
    expected = reference_loss(teacher, student, (1, 3), (1, 1), temperature=1.0)
    assert ours.item() == pytest.approx(expected, rel=2e-5) and expected > 0.01
    nothing = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # no patch mass at all: zero patch weights, not 0 / 0
    torch.testing.assert_close(resize_patch_attention(nothing, (1, 3), (1, 1)), torch.tensor([[[1.0, 0.0]]]))


def test_fusion_with_temperature_equal_heads_is_normalised_geometric_mean() -> None:
    maps = random_maps(2, 4, 10).double()
    fused = fuse_heads(maps, temperature=4.0)
    geo = maps.log().mean(dim=1, keepdim=True).exp()
    torch.testing.assert_close(fused, geo / geo.sum(-1, keepdim=True))


def test_gradient_flows_to_student_map_only_through_kl() -> None:
    teacher = random_maps(2, 6, 50)
    logits = torch.randn(2, 3, 50, requires_grad=True)
    attention_guidance_loss(teacher, logits.softmax(-1)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("teacher", "student", "kwargs", "message"),
    [
        (random_maps(2, 6, 50), random_maps(3, 6, 50), {}, "Batch mismatch"),
        (random_maps(2, 6, 50), random_maps(2, 6, 50)[0], {}, r"\[batch, heads, 1 \+ patches\]"),
        (random_maps(2, 6, 50) * 2, random_maps(2, 6, 50), {}, "not probability distributions"),
        (random_maps(2, 6, 51), random_maps(2, 6, 50), {}, "do not form a square grid"),
        (random_maps(2, 6, 50), random_maps(2, 6, 50), {"teacher_grid": (5, 5)}, "has 25 cells"),
        (
            torch.full((2, 6, 50), float("nan")),
            random_maps(2, 6, 50),
            {},
            "NaN or inf",
        ),
    ],
)
def test_bad_maps_raise_clear_errors(teacher, student, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        attention_guidance_loss(teacher, student, **kwargs)


def test_projector_alignment_mse_and_cosine() -> None:
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    assert projector_alignment_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert projector_alignment_loss(a, b, "cosine").item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        projector_alignment_loss(a, b[:, :8])
    with pytest.raises(ValueError, match="Unknown projector loss"):
        projector_alignment_loss(a, b, "l1")


def test_projector_has_the_published_layout() -> None:
    projector = AttnDistillProjector(192, 384)
    layers = list(projector.layers)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Linear", "GELU", "Linear", "GELU", "Linear", "LayerNorm"]
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(192, 384), (384, 192), (192, 384), (384, 384)]
    assert layers[0].normalized_shape == (192,) and layers[-1].normalized_shape == (384,)
    assert len([m for m in AttnDistillProjector(8, 4, depth=2).layers if isinstance(m, torch.nn.Linear)]) == 2
    widths = AttnDistillLoss(8, 12, projector_hidden_dims=[32, 16]).projector.layers
    assert [(m.in_features, m.out_features) for m in widths if isinstance(m, torch.nn.Linear)] == [
        (8, 32),
        (32, 16),
        (16, 12),
    ]


def test_projector_starts_like_the_published_one() -> None:
    # Published: LayerNorm eps 1e-6 (weight 1, bias 0), Linear weights trunc_normal(std=0.02) on [-2, 2]
    # (so, at this std, a plain N(0, 0.02)), biases 0. PyTorch's default init would give U(+-1/sqrt(fan_in)):
    # std 0.029 for fan_in 384 and non-zero biases.
    torch.manual_seed(0)
    layers = list(AttnDistillProjector(384, 768).layers)
    for norm in (layers[0], layers[-1]):
        assert norm.eps == 1e-6 and bool((norm.weight == 1).all()) and bool((norm.bias == 0).all())
    for linear in (m for m in layers if isinstance(m, torch.nn.Linear)):
        assert bool((linear.bias == 0).all())
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert linear.weight.mean().abs().item() < 1e-3


def test_attndistill_loss_combines_terms_with_weights() -> None:
    loss_fn = AttnDistillLoss(8, 12, proj_weight=1.0, attn_weight=0.1)
    teacher_cls, student_cls = torch.randn(4, 12), torch.randn(4, 8)
    teacher_attn, student_attn = random_maps(4, 6, 17), random_maps(4, 3, 17, seed=5)
    out = loss_fn(teacher_cls, teacher_attn, student_cls, student_attn)
    proj = projector_alignment_loss(loss_fn.projector(student_cls), teacher_cls)
    attn = attention_guidance_loss(teacher_attn, student_attn)
    assert out.loss_proj.item() == pytest.approx(proj.item(), rel=1e-6)
    assert out.loss_attn.item() == pytest.approx(attn.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(proj.item() + 0.1 * attn.item(), rel=1e-6)
    # Tokens [B, T, D] are accepted and their CLS token is used.
    tokens = torch.cat([student_cls[:, None], torch.randn(4, 5, 8)], dim=1)
    teacher_tokens = torch.cat([teacher_cls[:, None], torch.randn(4, 5, 12)], dim=1)
    again = loss_fn(teacher_tokens, teacher_attn, tokens, student_attn)
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_zero_weight_terms_are_skipped() -> None:
    only_proj = AttnDistillLoss(8, 12, attn_weight=0.0)
    out = only_proj(torch.randn(2, 12), None, torch.randn(2, 8), None)
    assert out.loss_attn.item() == 0.0 and out.loss.item() == pytest.approx(out.loss_proj.item())
    only_attn = AttnDistillLoss(8, 12, proj_weight=0.0, attn_weight=1.0)
    maps = random_maps(2, 3, 17)
    assert only_attn(torch.randn(2, 12), maps, torch.randn(2, 8), maps).loss.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no attention maps"):
        only_attn(torch.randn(2, 12), None, torch.randn(2, 8), None)
