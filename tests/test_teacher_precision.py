"""A teacher in bfloat16 or float16 (``--teacher_dtype``): the DINOv3-7B architecture captured exactly, the
low-precision CLS row against the eager map and a float64 computation, the cast that loads as
``from_pretrained(dtype=...)`` does, a training run, the model card and the refusal of other dtypes.

Attention maps are compared on sharpened weights, as in test_attention.py: plain random initialisation
gives near-uniform maps that hide a wrong capture, so the q/k projections are scaled up, the CLS and
register tokens (and ViT's position table) filled with random values and the layer scales drawn at
random; each comparison checks that the maps are far from uniform.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers import AutoModel, DINOv3ViTConfig, DINOv3ViTModel, ViTConfig, ViTImageProcessor, ViTModel

import attndistill_hf.attention as attention_module
import attndistill_hf.trainer as trainer_module
from attndistill_hf.attention import (
    cls_attention_from_logit_inputs,
    eager_last_cls_attention,
    find_last_attention,
    last_cls_attention,
    select_cls_and_patch_keys,
)
from attndistill_hf.families import unwrap_model
from attndistill_hf.models import cast_teacher, load_teacher, torch_dtype
from attndistill_hf.teacher import teacher_targets
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import (
    PixelDataset,
    argv_without_a_teacher,
    distill_command,
    distill_refusal,
    tiny_run_config,
    tiny_student,
    write_image_folder,
)

# The architecture flags of the released facebook/dinov3-vit7b16-pretrain-lvd1689m (4096 wide, 40 blocks of
# 32 heads, SwiGLU MLP of 8192, q/k/v projections without bias, output projection and MLP with bias,
# LayerScale, 4 registers, RoPE), at a tiny width and depth.
SEVEN_B_FLAGS = {
    "use_gated_mlp": True,
    "hidden_act": "silu",
    "query_bias": False,
    "key_bias": False,
    "value_bias": False,
    "proj_bias": True,
    "mlp_bias": True,
    "layerscale_value": 1e-5,
    "num_register_tokens": 4,
    "layer_norm_eps": 1e-5,
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "patch_size": 8}
# 112 px at patch 8: 14 x 14 = 196 patches, the token count of a ViT-*/16 at 224 px.
SIZE = 112
KINDS = ("dinov3_7b", "vit")
QK_WEIGHTS = ("q_proj.weight", "k_proj.weight", "attention.query.weight", "attention.key.weight")
TABLES = ("cls_token", "register_tokens", "position_embeddings")
# The largest differences between a low-precision teacher's captured CLS row and its eager map (absolute,
# and relative on the probabilities above 1e-4), measured over 20 seeds x 4 images x 4 heads on both
# architectures and both paths, then doubled or more (docs/method.md, "Teacher precision").
BOUNDS = {torch.bfloat16: (0.05, 0.3), torch.float16: (0.01, 0.05)}
CARRIED = 1e-4  # probabilities below this take no part in the relative difference


@torch.no_grad()
def sharpen(model: nn.Module) -> nn.Module:
    """Peaked maps: scaled q/k projections, random CLS / register tokens / position table, random layer scales
    (DINOv3-7B's initial 1e-5 would leave every block's contribution negligible)."""
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if name.endswith(QK_WEIGHTS):
            param.copy_(0.25 * torch.randn(param.shape, generator=generator))
        elif name.endswith(TABLES):
            param.copy_(torch.randn(param.shape, generator=generator))
        elif name.endswith("lambda1"):
            param.copy_(torch.empty(param.shape).uniform_(0.2, 1.0, generator=generator))
    return model


def build(kind: str, attn_implementation: str, image_size: int = SIZE) -> DINOv3ViTModel | ViTModel:
    torch.manual_seed(0)
    if kind == "dinov3_7b":
        config = DINOv3ViTConfig(**TINY, **SEVEN_B_FLAGS, image_size=image_size)
        return DINOv3ViTModel._from_config(config, attn_implementation=attn_implementation).eval()
    config = ViTConfig(**TINY, image_size=image_size, layer_norm_eps=1e-6)
    return ViTModel._from_config(config, attn_implementation=attn_implementation, add_pooling_layer=False).eval()


def pair(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """The same sharpened weights in ``dtype`` on sdpa (the trainer's path) and on eager (the reference)."""
    fast = sharpen(build(kind, "sdpa"))
    reference = build(kind, "eager")
    reference.load_state_dict(fast.state_dict())
    return cast_teacher(fast, dtype).eval(), cast_teacher(reference, dtype).eval()


def save_seven_b_like(path: Path, image_size: int = 32) -> Path:
    """The tiny DINOv3-7B-like teacher, sharpened, saved in float32 with an image processor."""
    sharpen(build("dinov3_7b", "sdpa", image_size)).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def images(seed: int, count: int = 4, size: int = SIZE) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_the_dinov3_7b_architecture_is_captured_exactly_in_float32() -> None:
    fast, reference = pair("dinov3_7b")
    block = fast.model.layer[-1]
    assert block.attention.q_proj.bias is None and block.attention.k_proj.bias is None
    assert block.attention.v_proj.bias is None and block.attention.o_proj.bias is not None
    assert type(block.mlp).__name__ == "DINOv3ViTGatedMLP" and block.mlp.act_fn.__class__.__name__ == "SiLUActivation"
    assert block.layer_scale1.lambda1.min() > 0.1 and block.layer_scale1.lambda1.std() > 0.1  # not 1e-5, not 1
    assert fast.rope_embeddings.inv_freq.dtype == torch.float32
    pixels = images(0, count=3)
    fast_targets = teacher_targets(fast, pixels)
    reference_targets = teacher_targets(reference, pixels, capture=eager_last_cls_attention)
    fast_map, reference_map = fast_targets.attention, reference_targets.attention
    keys = 1 + (SIZE // 8) ** 2
    assert fast_map.shape == (3, 4, keys) and fast_map.dtype == torch.float32 and fast_targets.grid == (14, 14)
    assert reference_map.amax(-1).min() > 10 / keys  # every row peaked, far from uniform
    assert (fast_map - reference_map).abs().max().item() <= 1e-6
    torch.testing.assert_close(fast_targets.cls, reference_targets.cls, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_low_precision_teachers_row_is_within_bounds_of_its_eager_map_and_closer_to_float64(
    kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The captured row takes the queries and keys in the teacher's precision and computes the logits and the
    softmax in float32; eager computes the logits in that precision and rounds the probabilities to it. A
    float64 row from the same queries and keys is the exact value both approximate."""
    fast, reference = pair(kind, dtype)
    assert {param.dtype for param in fast.parameters()} == {dtype}
    layout = find_last_attention(reference).layout
    kept: dict[str, object] = {}

    def keep_kernel_inputs(query, key, scaling, cls_index=0, attention_mask=None):
        kept.update(query=query, key=key, scaling=scaling, cls_index=cls_index)
        return cls_attention_from_logit_inputs(query, key, scaling, cls_index, attention_mask)

    monkeypatch.setattr(attention_module, "cls_attention_from_logit_inputs", keep_kernel_inputs)
    worst = {"same": [0.0, 0.0], "model": [0.0, 0.0]}  # [absolute, relative]
    for seed in range(3):
        pixels = images(seed).to(dtype)
        # One forward pass of the eager model: its captured row and its map, from the same queries and keys.
        output, captured = last_cls_attention(reference, pixels, output_attentions=True)
        eager = select_cls_and_patch_keys(output.attentions[-1][:, :, layout.cls_index].float(), layout)
        query, key = kept["query"], kept["key"]
        assert query.dtype == key.dtype == dtype
        exact = torch.einsum("bhd,bhtd->bht", query[:, :, kept["cls_index"]].double(), key.double())
        exact = select_cls_and_patch_keys((exact * kept["scaling"]).softmax(-1), layout)
        assert eager.amax(-1).mean() > 20 / eager.shape[-1]  # peaked
        captured_error = (captured.double() - exact).abs().max().item()
        eager_error = (eager.double() - exact).abs().max().item()
        assert captured_error <= 2e-6 and 100 * captured_error < eager_error
        # The trainer's path: the sdpa model's row against the eager model's map (on two backends every
        # earlier block rounds differently too).
        _, trained_on = last_cls_attention(fast, pixels)
        for path, row in (("same", captured), ("model", trained_on)):
            difference = (row.double() - eager.double()).abs()
            worst[path][0] = max(worst[path][0], difference.max().item())
            worst[path][1] = max(worst[path][1], (difference / exact)[exact > CARRIED].max().item())
    absolute, relative = BOUNDS[dtype]
    for path, (measured_absolute, measured_relative) in worst.items():
        assert measured_absolute <= absolute, (path, measured_absolute)
        assert measured_relative <= relative, (path, measured_relative)
    assert worst["same"][0] > 0  # the two rows do differ: eager rounds


def test_cast_teacher_is_from_pretrained_dtype_bit_for_bit_and_to_is_not(tmp_path: Path) -> None:
    """``cast_teacher`` keeps DINOv3's RoPE frequencies (computed, never saved) in float32, as
    ``from_pretrained(dtype=...)`` does; ``model.to(torch.bfloat16)`` rounds them and moves every patch's position."""
    path = save_seven_b_like(tmp_path / "teacher")
    cast = cast_teacher(AutoModel.from_pretrained(path), torch.bfloat16)
    loaded = AutoModel.from_pretrained(path, dtype=torch.bfloat16)
    rounded = AutoModel.from_pretrained(path).to(torch.bfloat16)
    assert cast.rope_embeddings.inv_freq.dtype == loaded.rope_embeddings.inv_freq.dtype == torch.float32
    assert rounded.rope_embeddings.inv_freq.dtype == torch.bfloat16
    cast_tensors = dict(cast.named_parameters()) | dict(cast.named_buffers())
    loaded_tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert cast_tensors.keys() == loaded_tensors.keys()
    for name, tensor in cast_tensors.items():
        assert tensor.dtype == loaded_tensors[name].dtype and torch.equal(tensor, loaded_tensors[name]), name
    pixels = images(1, count=2, size=32)
    got, expected, off = (teacher_targets(model, pixels) for model in (cast, loaded, rounded))
    assert torch.equal(got.cls, expected.cls) and torch.equal(got.attention, expected.attention)
    assert not torch.equal(off.cls, expected.cls) and not torch.equal(off.attention, expected.attention)


def test_a_teacher_object_is_cast_down_from_float32_and_a_lower_precision_one_is_refused(tmp_path: Path) -> None:
    """A float32 model with --teacher_dtype bfloat16 is cast as from_pretrained(dtype=...) loads it; a bfloat16
    model with the default float32 (or with float16) is refused: casting cannot give back the rounded weights."""
    path = save_seven_b_like(tmp_path / "teacher")
    args = tiny_run_config(tmp_path / "run", teacher_dtype="bfloat16")
    trainer = AttnDistillTrainer(tiny_student(), AutoModel.from_pretrained(path), args, train_dataset=PixelDataset())
    assert {param.dtype for param in unwrap_model(trainer.teacher).parameters()} == {torch.bfloat16}
    in_bf16 = AutoModel.from_pretrained(path, dtype=torch.bfloat16)
    AttnDistillTrainer(tiny_student(), in_bf16, args, train_dataset=PixelDataset())  # already in it: taken as is
    for dtype in ("float32", "float16"):
        with pytest.raises(ValueError, match=f"weights are in bfloat16 and --teacher_dtype is {dtype}"):
            AttnDistillTrainer(
                tiny_student(),
                in_bf16,
                tiny_run_config(tmp_path / dtype, teacher_dtype=dtype),
                train_dataset=PixelDataset(),
            )
    assert {param.dtype for param in in_bf16.parameters()} == {torch.bfloat16}  # the caller's model is untouched


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_run_trains_against_the_teacher_in_its_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """float32 is the default; in every precision one step's targets are those of the teacher loaded with
    ``from_pretrained(dtype=...)`` (float16 runs on a CPU too)."""
    path = save_seven_b_like(tmp_path / "teacher")
    steps: list[tuple[torch.Tensor, object]] = []

    def keep_targets(teacher, pixel_values, **kwargs):
        targets = teacher_targets(teacher, pixel_values, **kwargs)
        steps.append((pixel_values.detach().clone(), targets))
        return targets

    monkeypatch.setattr(trainer_module, "teacher_targets", keep_targets)
    args = tiny_run_config(tmp_path / "run", **({} if dtype == "float32" else {"teacher_dtype": dtype}))
    assert args.teacher_dtype == dtype
    trainer = AttnDistillTrainer(tiny_student(), str(path), args, train_dataset=PixelDataset())
    teacher = unwrap_model(trainer.teacher)
    assert {param.dtype for param in teacher.parameters()} == {torch_dtype(dtype)}
    assert teacher.rope_embeddings.inv_freq.dtype == torch.float32
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss_attn" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) and entry["loss_attn"] > 0 for entry in logged)
    pixels, targets = steps[0]
    expected = teacher_targets(load_teacher(str(path), dtype=torch_dtype(dtype)), pixels)
    assert targets.cls.dtype == targets.attention.dtype == torch.float32
    assert torch.equal(targets.cls, expected.cls) and torch.equal(targets.attention, expected.attention)
    if dtype != "float32":  # the targets did come from the low-precision weights
        in_float32 = teacher_targets(load_teacher(str(path)), pixels)
        assert not torch.equal(targets.cls, in_float32.cls)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_recipe_card_names_the_teachers_precision(tmp_path: Path, dtype: str) -> None:
    teacher = save_seven_b_like(tmp_path / "teacher")
    out = tmp_path / "out"
    distill_command(
        ["--teacher_name_or_path", str(teacher), "--student_preset", "vit-mini-patch8", "--image_size", "32"]
        + ["--train_dir", str(write_image_folder(tmp_path / "images", size=36)), "--teacher_dtype", dtype]
        + ["--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--output_dir", str(out)]
        + ["--report_to", "none", "--disable_tqdm", "true"]
    )
    card = ModelCard.load(out / "README.md")
    teacher_section = card.text.split("## Teacher\n", 1)[1].split("\n## ", 1)[0]
    assert f"with its weights in {dtype}" in teacher_section
    assert ("bfloat16" in teacher_section) == (dtype == "bfloat16")


@pytest.mark.parametrize("value", ["float64", "int8"])
def test_another_teacher_dtype_is_refused_naming_the_flag_before_the_teacher_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    status, error = distill_refusal([*argv_without_a_teacher(tmp_path), "--teacher_dtype", value], capsys)
    assert status == 2
    assert error == f"error: --teacher_dtype: invalid choice: '{value}' (choose from 'float32', 'bfloat16', 'float16')"
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=rf"^--teacher_dtype '{value}': use one of float32, bfloat16, float16\.$"):
        tiny_run_config(tmp_path / "run", teacher_dtype=value)
