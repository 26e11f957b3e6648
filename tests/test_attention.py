"""The CLS-attention capture equals each family's eager ground truth, on sharpened weights.

Plain random initialisation gives near-uniform attention maps (every entry close to 1 / T), which
hide a wrong capture: here the query/key projections are scaled up and the zero-initialised tables
(CLS, registers, position embeddings, relative position bias, detection tokens) are filled with
random values, and each test checks that the ground-truth maps are far from uniform.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AttentionInterface,
    BeitConfig,
    BeitModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    InternVLVisionConfig,
    InternVLVisionModel,
    MetaClip2VisionConfig,
    MetaClip2VisionModel,
    ResNetConfig,
    ResNetModel,
    Sapiens2Config,
    Sapiens2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    TimmWrapperConfig,
    TimmWrapperModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
    ViTMSNConfig,
    ViTMSNModel,
    YolosConfig,
    YolosModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from attndistill_hf.attention import (
    CAPTURE_BACKEND,
    eager_last_cls_attention,
    find_last_attention,
    last_cls_attention,
)
from attndistill_hf.families import UnsupportedModelError, normalised_cls_feature, token_layout
from attndistill_hf.models import build_student, forward_kwargs, load_teacher

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
TIMM_ARGS = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "reg_tokens": 4,
    "qk_norm": True,
    "dynamic_img_size": True,
}


def _timm(**extra: object) -> TimmWrapperModel:
    return TimmWrapperModel(TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args={**TIMM_ARGS, **extra}))


# family -> (build(attn_implementation), tokens that are neither CLS nor patch at 32 px)
FAMILIES = {
    "vit": (lambda impl: ViTModel._from_config(ViTConfig(**TINY), attn_implementation=impl), 0),
    "deit": (lambda impl: DeiTModel._from_config(DeiTConfig(**TINY), attn_implementation=impl), 1),
    "vit_mae": (
        lambda impl: ViTMAEModel._from_config(ViTMAEConfig(**TINY, mask_ratio=0.0), attn_implementation=impl),
        0,
    ),
    "vit_msn": (lambda impl: ViTMSNModel._from_config(ViTMSNConfig(**TINY), attn_implementation=impl), 0),
    "dinov2": (lambda impl: Dinov2Model._from_config(Dinov2Config(**TINY), attn_implementation=impl), 0),
    "dinov2_registers": (
        lambda impl: Dinov2WithRegistersModel._from_config(
            Dinov2WithRegistersConfig(**TINY, num_register_tokens=4), attn_implementation=impl
        ),
        4,
    ),
    "dinov3": (
        lambda impl: DINOv3ViTModel._from_config(
            DINOv3ViTConfig(**TINY, num_register_tokens=4), attn_implementation=impl
        ),
        4,
    ),
    "clip": (lambda impl: CLIPVisionModel._from_config(CLIPVisionConfig(**TINY), attn_implementation=impl), 0),
    "metaclip_2": (
        lambda impl: MetaClip2VisionModel._from_config(MetaClip2VisionConfig(**TINY), attn_implementation=impl),
        0,
    ),
    "beit": (
        lambda impl: BeitModel._from_config(
            BeitConfig(**TINY, use_relative_position_bias=True, use_mean_pooling=False), attn_implementation=impl
        ),
        0,
    ),
    "beit_shared_bias": (
        lambda impl: BeitModel._from_config(
            BeitConfig(**TINY, use_shared_relative_position_bias=True, use_mean_pooling=False),
            attn_implementation=impl,
        ),
        0,
    ),
    "internvl": (
        lambda impl: InternVLVisionModel._from_config(
            InternVLVisionConfig(**TINY, use_qk_norm=True, use_mean_pooling=False), attn_implementation=impl
        ),
        0,
    ),
    # Grouped keys in the last block: 2 key/value heads for 4 query heads.
    "sapiens2": (
        lambda impl: Sapiens2Model._from_config(
            Sapiens2Config(**TINY, num_register_tokens=4, num_key_value_heads_per_layer=[4, 2]),
            attn_implementation=impl,
        ),
        4,
    ),
    "yolos": (
        lambda impl: YolosModel._from_config(
            YolosConfig(**{**TINY, "image_size": [32, 32]}, num_detection_tokens=5), attn_implementation=impl
        ),
        5,
    ),
    "timm": (lambda _impl: _timm(), 4),
}
TABLES = (
    "cls_token",
    "class_embedding",
    "register_tokens",
    "reg_token",
    "position_embeddings",
    "position_embedding",
    "pos_embed",
    "relative_position_bias_table",
    "detection_tokens",
    "mask_token",
)
QK_WEIGHTS = ("q_proj.weight", "k_proj.weight", "attention.query.weight", "attention.key.weight")


@torch.no_grad()
def sharpen(model: nn.Module) -> nn.Module:
    """Scale the q/k projections up and fill the zero-initialised tables, so that maps are peaked."""
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if name.endswith(QK_WEIGHTS):
            param.copy_(0.25 * torch.randn(param.shape, generator=generator))
        elif name.endswith("attn.qkv.weight"):  # timm: q and k are the first two thirds of the rows
            rows = 2 * param.shape[0] // 3
            param[:rows].copy_(0.25 * torch.randn(param[:rows].shape, generator=generator))
        elif any(table in name for table in TABLES):
            param.copy_(torch.randn(param.shape, generator=generator))
    for name, buffer in model.named_buffers():
        if "position_embeddings" in name and buffer.is_floating_point():  # MAE: fixed sin-cos table
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    return model


def pair(family: str) -> tuple[nn.Module, nn.Module]:
    """The same sharpened weights on the fast (sdpa) path and the eager ground-truth path."""
    build, _ = FAMILIES[family]
    fast = sharpen(build("sdpa"))
    reference = build("eager")
    reference.load_state_dict(fast.state_dict())
    if family == "timm":
        for block in reference.timm_model.blocks:
            block.attn.fused_attn = False  # timm's explicit softmax: the ground truth
    else:
        assert fast.config._attn_implementation == "sdpa"
    # Eval mode unless a test says otherwise: DINOv3 augments its RoPE coordinates at random in train mode.
    return fast.eval(), reference.eval()


def _run(model: nn.Module, capture, pixels: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)  # DINOv3 augments RoPE coordinates at random in train mode: same draw for both
    return capture(model, pixels)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [32, 48])
def test_fast_capture_equals_eager_ground_truth(family: str, train: bool, size: int) -> None:
    fast, reference = pair(family)
    fast.train(train)
    reference.train(train)
    pixels = torch.randn(3, 3, size, size)
    fast_out, fast_map = _run(fast, last_cls_attention, pixels)
    ref_out, ref_map = _run(reference, eager_last_cls_attention, pixels)
    num_patches = (size // 8) ** 2
    assert fast_map.shape == (3, 4, 1 + num_patches) and fast_map.dtype == torch.float32
    assert ref_map.max() > 4 / (1 + num_patches)  # sharpened: far from uniform
    assert (fast_map - ref_map).abs().max().item() <= 1e-5
    torch.testing.assert_close(fast_map.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(fast_out.last_hidden_state, ref_out.last_hidden_state, atol=1e-5, rtol=1e-5)
    # The fast path must not have produced per-layer maps: every block ran on sdpa.
    assert not getattr(fast_out, "attentions", None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_through_captured_map_match_eager(family: str) -> None:
    fast, reference = pair(family)
    fast.train()
    reference.train()
    pixels = torch.randn(2, 3, 32, 32)
    target = torch.rand(2, 4, 17).softmax(-1)

    def grads(model: nn.Module, capture) -> dict[str, torch.Tensor]:
        model.zero_grad()
        _, attention = _run(model, capture, pixels)
        (target * attention.log()).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_grads = grads(fast, last_cls_attention)
    ref_grads = grads(reference, eager_last_cls_attention)
    assert fast_grads.keys() == ref_grads.keys()
    assert any("embed" in name for name in fast_grads)  # flows down to the first layer
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _projection_hook_capture(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The capture this library used before: the CLS row recomputed from the q/k *projection outputs*."""
    attention = find_last_attention(model).module
    kept: dict[str, torch.Tensor] = {}
    handles = [
        attention.q_proj.register_forward_hook(lambda _m, _i, out: kept.update(q=out)),
        attention.k_proj.register_forward_hook(lambda _m, _i, out: kept.update(k=out)),
    ]
    model(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    batch, tokens, _ = kept["k"].shape
    query = kept["q"][:, 0].reshape(batch, 4, 8)
    key = kept["k"].reshape(batch, tokens, 4, 8)
    row = (torch.einsum("bhd,bthd->bht", query, key) * 8**-0.5).softmax(-1)
    layout = token_layout(model)
    kept_keys = torch.cat([row[..., :1], row[..., layout.patch_slice(tokens)]], dim=-1)
    return kept_keys / kept_keys.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", ["dinov3", "beit", "internvl"])
def test_projection_hooks_were_wrong_where_q_k_or_logits_change_after_them(family: str) -> None:
    """DINOv3 rotates q/k (RoPE) after the projections, InternVL normalises them, BEiT adds a relative position
    bias to the logits: the old projection-hook capture misses each of them, and this comparison catches it."""
    fast, reference = pair(family)
    pixels = torch.randn(2, 3, 32, 32)
    _, truth = eager_last_cls_attention(reference, pixels)
    with torch.no_grad():
        old = _projection_hook_capture(fast, pixels)
    _, new = last_cls_attention(fast, pixels)
    assert (old - truth).abs().max().item() > 1e-2
    assert (new - truth).abs().max().item() <= 1e-5


def test_other_blocks_keep_the_backend_the_model_was_loaded_with() -> None:
    calls: list[int] = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(id(module))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_sdpa)
    model = sharpen(
        DINOv3ViTModel._from_config(DINOv3ViTConfig(**TINY, num_register_tokens=4), attn_implementation="counting_sdpa")
    )
    _, attention = last_cls_attention(model, torch.randn(2, 3, 32, 32))
    # Both blocks ran the model's own kernel (the last one through the capture), once per forward pass.
    layers = model.model.layer
    assert calls == [id(layer.attention) for layer in layers]
    assert model.config._attn_implementation == "counting_sdpa"
    assert layers[0].attention.config._attn_implementation == "counting_sdpa"
    assert layers[-1].attention.config._attn_implementation == CAPTURE_BACKEND
    # A later backend change of the model is followed by the captured module's kernel too.
    model.set_attn_implementation("eager")
    calls.clear()
    _, eager_attention = last_cls_attention(model, torch.randn(2, 3, 32, 32))
    assert calls == [] and eager_attention.shape == attention.shape


def test_no_grad_teacher_and_bf16_autocast() -> None:
    fast, reference = pair("dinov3")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _out, attention = last_cls_attention(fast, pixels)
    assert not attention.requires_grad and attention.dtype == torch.float32
    _, ref_map = eager_last_cls_attention(reference, pixels)
    assert (attention - ref_map).abs().max().item() < 5e-2  # bf16 projections, float32 softmax
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("family", ["vit", "dinov3"])
def test_works_under_torch_compile(family: str) -> None:
    fast, reference = pair(family)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=False)
    pixels = torch.randn(2, 3, 32, 32)
    for _ in range(2):  # second call reuses the compiled graph with the capture in place
        _, attention = last_cls_attention(compiled, pixels)
    _, ref_map = eager_last_cls_attention(reference, pixels)
    assert (attention - ref_map).abs().max().item() <= 1e-5
    attention.log().sum().backward()
    assert find_last_attention(fast).module.q_proj.weight.grad is not None


def test_clip_teacher_feature_is_the_post_layernorm_cls() -> None:
    fast, _ = pair("clip")
    pixels = torch.randn(2, 3, 32, 32)
    output, _ = last_cls_attention(fast, pixels)
    expected = fast.post_layernorm(output.last_hidden_state[:, 0])
    torch.testing.assert_close(normalised_cls_feature(fast, output), expected)
    assert not torch.allclose(output.last_hidden_state[:, 0], expected)


def test_extra_tokens_are_dropped_by_their_positions() -> None:
    """YOLOS puts its detection tokens after the patches, DINOv3 its registers before them."""
    yolos, reference = pair("yolos")
    pixels = torch.randn(2, 3, 32, 32)
    _, ref_output = eager_last_cls_attention(reference, pixels)
    full = reference(pixel_values=pixels, output_attentions=True).attentions[-1][:, :, 0]
    assert full.shape[-1] == 1 + 16 + 5
    kept = torch.cat([full[..., :17]], dim=-1)
    torch.testing.assert_close(ref_output, kept / kept.sum(-1, keepdim=True))
    layout = token_layout(yolos)
    assert (layout.leading, layout.trailing) == (1, 5)
    dinov3, _ = pair("dinov3")
    assert token_layout(dinov3).patch_slice(21) == slice(5, 21)


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
    with pytest.raises(ValueError, match="fused_attn = False"):
        eager_last_cls_attention(_timm(), torch.randn(1, 3, 32, 32))


REFUSALS = {
    "cnn": (
        lambda: ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])),
        "ResNetModel is not supported: it is not a ViT-family encoder",
    ),
    "data2vec_vision": (
        lambda: Data2VecVisionModel(Data2VecVisionConfig(**TINY, use_relative_position_bias=True)),
        "Data2VecVisionModel is not supported: its attention code bypasses transformers' AttentionInterface",
    ),
    "beit_mean_pooling": (
        lambda: BeitModel(BeitConfig(**TINY, use_mean_pooling=True)),
        "BeitModel is not supported: use_mean_pooling=True",
    ),
    "siglip": (
        lambda: SiglipVisionModel(SiglipVisionConfig(**TINY)),
        "SiglipVisionModel is not supported: it has no CLS",
    ),
    "clip_text_and_vision": (
        lambda: CLIPModel(
            CLIPConfig(
                text_config=CLIPTextConfig(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
                ).to_dict(),
                vision_config=CLIPVisionConfig(**TINY).to_dict(),
            )
        ),
        "CLIPModel is not supported: it is the text \\+ vision model: load its vision tower",
    ),
    "timm_no_class_token": (
        lambda: _timm(class_token=False, global_pool="avg", reg_tokens=0),
        "TimmWrapperModel is not supported: its VisionTransformer has no class token",
    ),
    "timm_pooled_norm": (
        lambda: _timm(global_pool="avg", fc_norm=True),
        "TimmWrapperModel is not supported: global_pool='avg' normalises the pooled feature",
    ),
    "timm_other_architecture": (
        lambda: TimmWrapperModel(
            TimmWrapperConfig(
                architecture="eva02_tiny_patch14_224",
                model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 4},
            )
        ),
        "TimmWrapperModel is not supported: it wraps timm's Eva; only timm's VisionTransformer",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_models_that_cannot_be_captured_exactly_are_refused_with_class_and_reason(case: str) -> None:
    build, message = REFUSALS[case]
    with pytest.raises(UnsupportedModelError, match=message):
        last_cls_attention(build(), torch.randn(1, 3, 32, 32))


def test_capture_is_not_part_of_the_state_dict_or_the_saved_config(tmp_path) -> None:
    fast, _ = pair("dinov3")
    keys = set(fast.state_dict())
    last_cls_attention(fast, torch.randn(1, 3, 32, 32))
    assert set(fast.state_dict()) == keys
    assert find_last_attention(fast).module is fast.model.layer[-1].attention
    fast.save_pretrained(tmp_path)
    assert CAPTURE_BACKEND not in (tmp_path / "config.json").read_text()


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


@pytest.mark.parametrize(
    ("preset", "width", "heads"), [("dinov3-vitb16", 768, 12), ("dinov3-vits16", 384, 6), ("dinov3-vitt16", 192, 3)]
)
def test_dinov3_presets_build_dinov3_students(preset: str, width: int, heads: int) -> None:
    student = build_student(preset, image_size=224, seed=0)
    assert type(student) is DINOv3ViTModel
    config = student.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (width, heads, 12)
    assert (config.patch_size, config.num_register_tokens, config.intermediate_size) == (16, 4, 4 * width)
    assert config.pos_embed_rescale is None  # no random RoPE rescaling: the student sees the teacher's view
    assert token_layout(student).patch_slice(1 + 4 + 196) == slice(5, 201)
    with pytest.raises(ValueError, match="RoPE"):
        build_student(preset, sincos_position_embeddings=True)


def test_clip_checkpoints_load_as_their_vision_tower(tmp_path) -> None:
    clip = REFUSALS["clip_text_and_vision"][0]()
    clip.save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    assert type(teacher) is CLIPVisionModel and not teacher.training
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip.vision_model.eval()(pixel_values=pixels).pooler_output
        output, attention = last_cls_attention(teacher, pixels)
    torch.testing.assert_close(normalised_cls_feature(teacher, output), expected)
    assert attention.shape == (2, 4, 17)
