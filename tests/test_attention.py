"""The fast last-layer CLS-attention capture equals the literal transformers (eager) path."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

from attndistill_hf.attention import eager_last_cls_attention, find_last_attention, last_cls_attention
from attndistill_hf.models import build_student, forward_kwargs

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
FAMILIES = {
    "vit": (ViTModel, ViTConfig, {}),
    "deit": (DeiTModel, DeiTConfig, {}),
    "vit_mae": (ViTMAEModel, ViTMAEConfig, {"mask_ratio": 0.0}),
    "dinov2": (Dinov2Model, Dinov2Config, {}),
    "dinov2_registers": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig, {"num_register_tokens": 4}),
}


def pair(family: str):
    """The same random weights on the fast (sdpa) and the reference (eager) backend."""
    model_cls, config_cls, extra = FAMILIES[family]
    fast = model_cls._from_config(config_cls(**TINY, **extra), attn_implementation="sdpa")
    reference = model_cls._from_config(config_cls(**TINY, **extra), attn_implementation="eager")
    reference.load_state_dict(fast.state_dict())
    assert fast.config._attn_implementation == "sdpa"
    return fast, reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [32, 48])
def test_fast_capture_equals_eager_reference(family: str, train: bool, size: int) -> None:
    fast, reference = pair(family)
    fast.train(train)
    reference.train(train)
    pixels = torch.randn(3, 3, size, size)
    fast_out, fast_map = last_cls_attention(fast, pixels)
    ref_out, ref_map = eager_last_cls_attention(reference, pixels)
    num_patches = (size // 8) ** 2
    assert fast_map.shape == (3, 4, 1 + num_patches) and fast_map.dtype == torch.float32
    assert (fast_map - ref_map).abs().max().item() <= 1e-5
    torch.testing.assert_close(fast_map.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(fast_out.last_hidden_state, ref_out.last_hidden_state, atol=1e-5, rtol=1e-5)
    # The fast path must not have produced per-layer maps: every block ran on sdpa.
    assert not getattr(fast_out, "attentions", None)


@pytest.mark.parametrize("family", ["vit", "dinov2_registers"])
def test_gradients_through_captured_map_match_eager(family: str) -> None:
    fast, reference = pair(family)
    fast.train()
    reference.train()
    pixels = torch.randn(2, 3, 32, 32)
    target = torch.rand(2, 4, 17).softmax(-1)

    def grads(model, capture) -> dict[str, torch.Tensor]:
        model.zero_grad()
        _, attention = capture(model, pixels)
        (target * attention.log()).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_grads = grads(fast, last_cls_attention)
    ref_grads = grads(reference, eager_last_cls_attention)
    assert fast_grads.keys() == ref_grads.keys()
    assert any("embeddings" in name for name in fast_grads)  # flows down to the first layer
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_grad_teacher_and_bf16_autocast() -> None:
    fast, reference = pair("vit")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _out, attention = last_cls_attention(fast, pixels)
    assert not attention.requires_grad and attention.dtype == torch.float32
    _, ref_map = eager_last_cls_attention(reference, pixels)
    assert (attention - ref_map).abs().max().item() < 3e-2  # bf16 projections, float32 softmax
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4))


def test_works_under_torch_compile() -> None:
    fast, reference = pair("vit")
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=False)
    pixels = torch.randn(2, 3, 32, 32, requires_grad=False)
    for _ in range(2):  # second call reuses the compiled graph with hooks in place
        _, attention = last_cls_attention(compiled, pixels)
    _, ref_map = eager_last_cls_attention(reference, pixels)
    assert (attention - ref_map).abs().max().item() <= 1e-5
    attention.log().sum().backward()
    assert fast.layers[-1].attention.q_proj.weight.grad is not None


def test_mae_teacher_sees_patches_in_raster_order() -> None:
    fast, _ = pair("vit_mae")
    pixels = torch.randn(2, 3, 32, 32)
    ordered, _ = last_cls_attention(fast, pixels)
    # A random shuffle (mask_ratio 0 still shuffles), undone with ids_restore, gives the same tokens.
    noise = torch.rand(2, 16)
    shuffled = fast(pixel_values=pixels, noise=noise)
    restore = shuffled.ids_restore.unsqueeze(-1).expand(-1, -1, 32)
    unshuffled = torch.gather(shuffled.last_hidden_state[:, 1:], 1, restore)
    torch.testing.assert_close(ordered.last_hidden_state[:, 1:], unshuffled, atol=1e-5, rtol=1e-5)
    assert forward_kwargs(fast, pixels)["noise"].shape == (2, 16)


def test_mae_with_masking_on_is_refused() -> None:
    model = ViTMAEModel(ViTMAEConfig(**TINY))  # default mask_ratio 0.75
    with pytest.raises(ValueError, match=r"mask_ratio=0\.75"):
        last_cls_attention(model, torch.randn(1, 3, 32, 32))


def test_reference_path_refuses_sdpa_instead_of_returning_nothing() -> None:
    fast, _ = pair("vit")
    with pytest.raises(ValueError, match="eager"):
        eager_last_cls_attention(fast, torch.randn(1, 3, 32, 32))


def test_unsupported_models_name_their_class() -> None:
    cnn = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    with pytest.raises(TypeError, match="ResNetModel has no CLS token"):
        last_cls_attention(cnn, torch.randn(1, 3, 32, 32))

    class NoAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = torch.nn.Module()
            self.embeddings.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))

    with pytest.raises(TypeError, match="NoAttention has no attention block"):
        find_last_attention(NoAttention())


def test_hooks_are_not_part_of_the_state_dict() -> None:
    fast, _ = pair("vit")
    keys = set(fast.state_dict())
    last_cls_attention(fast, torch.randn(1, 3, 32, 32))
    assert set(fast.state_dict()) == keys
    assert find_last_attention(fast).query is fast.layers[-1].attention.q_proj


# The CPU demo and ablation students: preset -> (heads, patch), all 4 layers of width 64.
MINI_PRESETS = {
    "vit-mini-patch4": (4, 4),
    "vit-mini-2heads-patch4": (2, 4),
    "vit-mini-patch8": (4, 8),
    "vit-mini-2heads-patch8": (2, 8),
}


@pytest.mark.parametrize("preset", sorted(MINI_PRESETS))
def test_mini_presets_build_the_demo_students(preset: str) -> None:
    heads, patch = MINI_PRESETS[preset]
    tokens = 1 + (32 // patch) ** 2
    student = build_student(preset, image_size=32, seed=0)
    config = student.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 4, 256)
    assert (config.num_attention_heads, config.patch_size, config.image_size) == (heads, patch, 32)
    assert len(student.layers) == 4
    assert student.embeddings.patch_embeddings.projection.weight.shape == (64, 3, patch, patch)
    assert student.embeddings.position_embeddings.shape == (1, tokens, 64)

    output, cls_attention = last_cls_attention(student, torch.randn(2, 3, 32, 32))
    assert output.last_hidden_state.shape == (2, tokens, 64)
    assert cls_attention.shape == (2, heads, tokens)
    torch.testing.assert_close(cls_attention.sum(-1), torch.ones(2, heads))
