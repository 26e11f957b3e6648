"""DINOv3 end to end (a DINOv3 teacher into a DINOv3 student, exported, reloaded), and refusals in the recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import (
    AutoModel,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    ViTImageProcessor,
)

from attndistill_hf.attention import eager_last_cls_attention, last_cls_attention
from attndistill_hf.cli import parse_config_and_flags
from attndistill_hf.models import STUDENT_PRESETS, build_student
from attndistill_hf.pipeline import DISTILL_ARGUMENTS
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import REPO, TINY_ENCODER, PixelDataset, distill_command, tiny_run_config, write_image_folder


def dinov3_teacher(path: Path | None = None, attn_implementation: str = "sdpa") -> DINOv3ViTModel:
    """A tiny DINOv3 (RoPE, 4 registers) with peaked attention: scaled q/k, random register tokens."""
    torch.manual_seed(3)
    config = DINOv3ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
    )
    model = DINOv3ViTModel._from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0, 0.25)
            elif "register_tokens" in name or "cls_token" in name:
                param.normal_()
    if path is not None:
        model.save_pretrained(path)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return model


def dinov3_student(seed: int = 0) -> DINOv3ViTModel:
    return build_student("dinov3-mini-patch4", image_size=32, patch_size=8, hidden_size=32, seed=seed)


def test_trained_dinov3_student_exports_and_reloads_identically(tmp_path: Path) -> None:
    student = dinov3_student()
    before = {name: param.clone() for name, param in student.named_parameters()}
    args = tiny_run_config(tmp_path / "run", max_steps=3)
    trainer = AttnDistillTrainer(student, dinov3_teacher(), args, train_dataset=PixelDataset())
    trainer.train()
    losses = [entry for entry in trainer.state.log_history if "loss_attn" in entry]
    assert len(losses) == 3 and all(entry["loss_attn"] > 0 for entry in losses)
    moved = [name for name, param in trainer.student.named_parameters() if not torch.equal(param, before[name])]
    assert any("model.layer.1.attention.q_proj" in name for name in moved)
    assert any("register_tokens" in name for name in moved)

    trainer.save_model(str(tmp_path / "export"))
    reloaded = AutoModel.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is DINOv3ViTModel and reloaded.config.num_register_tokens == 4
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trainer.student.eval()(pixel_values=pixels)
        got = reloaded(pixel_values=pixels)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


def test_naive_eager_loss_equals_default_loss_for_a_dinov3_pair(tmp_path: Path) -> None:
    """The loss through the backend capture equals the loss from eager output_attentions maps."""
    pixels = torch.randn(4, 3, 32, 32)
    teacher_fast, teacher_eager = dinov3_teacher(), dinov3_teacher(attn_implementation="eager")
    args = tiny_run_config(tmp_path, seed=42)
    fast = AttnDistillTrainer(dinov3_student(), teacher_fast, args)
    eager_student = dinov3_student()
    eager_student.set_attn_implementation("eager")
    naive = AttnDistillTrainer(eager_student, teacher_eager, args)
    naive.model.capture = eager_last_cls_attention
    naive.model.loss_fn.load_state_dict(fast.model.loss_fn.state_dict())
    losses = []
    for trainer in (fast, naive):
        trainer.model.eval()
        capture = last_cls_attention if trainer is fast else eager_last_cls_attention
        with torch.no_grad():
            teacher_out, teacher_attn = capture(trainer.teacher, pixels)
            terms = trainer.model(
                pixel_values=pixels,
                teacher_cls=teacher_out.last_hidden_state[:, 0],
                teacher_attn=teacher_attn,
                teacher_grid=(4, 4),
            )
        losses.append((terms.loss.item(), terms.loss_proj.item(), terms.loss_attn.item()))
    assert losses[0][2] > 0.05  # the attention term is not negligible
    for fast_term, naive_term in zip(*losses, strict=True):
        assert fast_term == pytest.approx(naive_term, rel=1e-5)


@pytest.mark.slow
def test_recipe_card_names_the_dinov3_license(tmp_path: Path) -> None:
    teacher = tmp_path / "dinov3-teacher"
    dinov3_teacher(teacher)
    images = write_image_folder(tmp_path / "images", size=36)
    out = tmp_path / "out"
    distill_command(
        ["--teacher_name_or_path", str(teacher), "--student_preset", "dinov3-mini-patch4", "--patch_size", "8"]
        + ["--image_size", "32", "--train_dir", str(images), "--max_steps", "2", "--per_device_train_batch_size", "4"]
        + ["--use_cpu", "true", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true"]
    )
    assert type(AutoModel.from_pretrained(out)) is DINOv3ViTModel
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.license_name == "dinov3-license"
    assert "## License" in card.text and "dinov3-license" in card.text
    assert "plain transformers `DINOv3ViTModel`" in card.text


def test_dinov3_configs_name_released_checkpoints_and_dinov3_students() -> None:
    for name, student in (
        ("in1k_dinov3_vitb16_to_vits16", "dinov3-vits16"),
        ("in1k_dinov3_vits16_to_vitt16", "dinov3-vitt16"),
    ):
        config = yaml.safe_load((REPO / "recipes" / "configs" / f"{name}.yaml").read_text())
        assert config["teacher_name_or_path"].startswith("facebook/dinov3-vit")
        assert config["teacher_name_or_path"].endswith("-pretrain-lvd1689m")
        assert config["student_preset"] == student


@pytest.mark.parametrize(
    ("name", "students"),
    [
        ("in1k_dinov3_vit7b16_to_vits16", {None: "dinov3-vits16"}),
        ("in1k_dinov3_vit7b16_to_vitb16", {None: "dinov3-vitb16"}),
        ("in1k_dinov3_vit7b16_to_vits16_vitb16", {"vits16": "dinov3-vits16", "vitb16": "dinov3-vitb16"}),
    ],
)
def test_dinov3_7b_configs_load_the_teacher_in_bfloat16_sharded(name: str, students: dict[str | None, str]) -> None:
    # --use_cpu: the configs train in bf16 on GPUs, which TrainingArguments refuses on a machine without one.
    model_args, _, _, args = parse_config_and_flags(
        DISTILL_ARGUMENTS, [str(REPO / "recipes" / "configs" / f"{name}.yaml"), "--use_cpu", "true"]
    )
    assert model_args.teacher_name_or_path == "facebook/dinov3-vit7b16-pretrain-lvd1689m"
    assert args.teacher_dtype == "bfloat16" and args.teacher_sharding == "fsdp" and args.bf16
    assert args.output_dir == f"outputs/{name.replace('_', '-')}"
    entries = model_args.student_entries or [{"name": None, "student_preset": model_args.student_preset}]
    found = {entry["name"]: entry["student_preset"] for entry in entries}
    assert found == students
    assert all(preset in STUDENT_PRESETS for preset in found.values())


@pytest.mark.slow
def test_recipe_refuses_an_uncapturable_teacher_in_one_line_before_data_loads(tmp_path: Path) -> None:
    teacher = tmp_path / "data2vec"
    Data2VecVisionModel(Data2VecVisionConfig(**TINY_ENCODER)).save_pretrained(teacher)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "distill.py"), "--teacher_name_or_path", str(teacher)]
        + ["--student_preset", "vit-mini-patch4", "--image_size", "32", "--use_cpu", "true"]
        + ["--train_dir", str(write_image_folder(tmp_path / "images")), "--max_steps", "1", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: Unsupported teacher: Data2VecVisionModel is not supported: its attention code")
    assert "Traceback" not in result.stderr and not out.exists()
