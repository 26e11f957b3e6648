"""Teacher conversion: every original layout converts, reloads from disk and matches the original forward.

Checkpoints are written by ``reference_checkpoints.make_reference_checkpoint`` in the layouts the
released files use (flat, nested under teacher / student / state_dict / model, with module. / backbone.
prefixes, with heads and decoders), with random weights; the comparison is done here again,
independently of the converter's own verification, on the model reloaded from ``output_dir``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTMAEModel, ViTModel

from attndistill_hf import convert as convert_module
from attndistill_hf.cli import run_recipe
from attndistill_hf.convert import (
    CheckpointError,
    ConversionVerificationError,
    convert_checkpoint,
    convert_checkpoint_with_report,
    load_checkpoint_file,
)
from attndistill_hf.models import forward_kwargs, load_teacher
from attndistill_hf.reference_vit import ReferenceViT

from helpers import PixelDataset, load_recipe, tiny_run_config, tiny_student
from reference_checkpoints import make_reference_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
SMALL = {"width": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "image_size": 32}


def _compare_with_reference(output_dir: Path, reference: ReferenceViT, size: int = 32) -> tuple[float, float]:
    """Max |diff| of CLS token and last-layer CLS attention: reloaded converted model vs reference."""
    model = AutoModel.from_pretrained(output_dir, attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        expected = reference(pixels)
        output = model(pixels, output_attentions=True, **forward_kwargs(model, pixels))
    assert len(output.attentions) == model.config.num_hidden_layers
    cls_diff = (output.last_hidden_state[:, 0] - expected.tokens[:, 0]).abs().max().item()
    attn_diff = (output.attentions[-1][:, :, 0] - expected.last_attention[:, :, 0]).abs().max().item()
    # The CLS attention row is a distribution over 1 + N tokens in both.
    assert output.attentions[-1].shape == expected.last_attention.shape
    torch.testing.assert_close(output.attentions[-1][:, :, 0].sum(-1), torch.ones(3, 2))
    return cls_diff, attn_diff


@pytest.mark.parametrize(
    ("format", "wrap", "prefix", "entry"),
    [
        ("dino", None, "", ""),
        ("dino", "teacher", "backbone.", "teacher"),
        ("mugs", None, "", ""),
        ("mugs", "state_dict", "module.backbone.", "state_dict"),
        ("ibot", "teacher", "backbone.", "teacher"),
        ("ibot", "student", "module.backbone.", "student"),
        ("mae", "model", "", "model"),
        ("mae", None, "", ""),
        ("timm", None, "", ""),
        ("timm", "state_dict", "module.", "state_dict"),
    ],
)
def test_each_format_converts_and_matches_reference(
    tmp_path: Path, format: str, wrap: str | None, prefix: str, entry: str
) -> None:
    checkpoint = tmp_path / f"{format}.pth"
    reference = make_reference_checkpoint(checkpoint, format, wrap=wrap, prefix=prefix, seed=3, **SMALL)
    out = tmp_path / "converted"
    model, report = convert_checkpoint_with_report(checkpoint, format, out, num_heads=2)

    expected_class = ViTMAEModel if format == "mae" else ViTModel
    assert isinstance(model, expected_class)
    assert report.checkpoint_entry == entry
    assert (report.width, report.depth, report.num_heads, report.patch_size, report.image_size) == (32, 2, 2, 8, 32)
    assert report.intermediate_size == 128
    assert report.verified and report.cls_max_abs_diff < TOL and report.cls_attention_max_abs_diff < TOL
    assert report.dropped, "heads / decoder keys of the checkpoint must be reported as dropped"
    cls_diff, attn_diff = _compare_with_reference(out, reference)
    assert cls_diff < TOL
    assert attn_diff < TOL
    saved = json.loads((out / "conversion_report.json").read_text())
    assert saved["cls_max_abs_diff"] < TOL and saved["format"] == format
    assert not [p for p in tmp_path.iterdir() if "converting" in p.name], "staging folder left behind"


def test_full_checkpoint_prefers_teacher_over_student(tmp_path: Path) -> None:
    checkpoint = tmp_path / "full.pth"
    teacher = make_reference_checkpoint(checkpoint, "dino", wrap="teacher", prefix="backbone.", **SMALL)
    raw = torch.load(checkpoint, weights_only=False)
    assert set(raw) >= {"teacher", "student", "args", "optimizer", "epoch"}
    # The student really is a different network, so converting it would fail the comparison below.
    assert not torch.equal(raw["student"]["module.backbone.cls_token"], raw["teacher"]["backbone.cls_token"])
    convert_checkpoint(checkpoint, "dino", tmp_path / "out", num_heads=2)
    cls_diff, attn_diff = _compare_with_reference(tmp_path / "out", teacher)
    assert cls_diff < TOL and attn_diff < TOL


def test_safetensors_checkpoint_converts(tmp_path: Path) -> None:
    checkpoint = tmp_path / "backbone.safetensors"
    reference = make_reference_checkpoint(checkpoint, "timm", prefix="module.", **SMALL)
    assert isinstance(load_checkpoint_file(checkpoint), dict)
    convert_checkpoint(checkpoint, "timm", tmp_path / "out", num_heads=2)
    cls_diff, attn_diff = _compare_with_reference(tmp_path / "out", reference)
    assert cls_diff < TOL and attn_diff < TOL


def test_checkpoint_without_qkv_bias_converts(tmp_path: Path) -> None:
    reference = ReferenceViT(32, 2, 2, 8, 32, qkv_bias=False).eval()
    checkpoint = tmp_path / "nobias.pth"
    torch.save(reference.state_dict(), checkpoint)
    model, report = convert_checkpoint_with_report(checkpoint, "timm", tmp_path / "out", num_heads=2)
    assert report.qkv_bias is False and model.config.qkv_bias is False
    cls_diff, attn_diff = _compare_with_reference(tmp_path / "out", reference)
    assert cls_diff < TOL and attn_diff < TOL


def test_heads_from_width_table(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.pth"
    make_reference_checkpoint(checkpoint, "dino", width=192, depth=1, num_heads=3, patch_size=16, image_size=32)
    _, report = convert_checkpoint_with_report(checkpoint, "dino", tmp_path / "out")
    assert report.num_heads == 3 and report.cls_max_abs_diff < TOL


def test_other_resolution_matches_reference_interpolation(tmp_path: Path) -> None:
    """Away from the native size the converted ViT resamples its table like the reference does."""
    checkpoint = tmp_path / "dino.pth"
    reference = make_reference_checkpoint(checkpoint, "dino", **SMALL)
    convert_checkpoint(checkpoint, "dino", tmp_path / "out", num_heads=2)
    cls_diff, attn_diff = _compare_with_reference(tmp_path / "out", reference, size=48)
    assert cls_diff < TOL and attn_diff < TOL


def test_saved_folder_loads_with_auto_classes_without_remote_code(tmp_path: Path) -> None:
    checkpoint = tmp_path / "dino.pth"
    make_reference_checkpoint(checkpoint, "dino", **SMALL)
    out = tmp_path / "out"
    convert_checkpoint(checkpoint, "dino", out, num_heads=2)
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.py"))
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "vit" and "auto_map" not in config_json
    assert config_json["layer_norm_eps"] == pytest.approx(1e-6)
    model = AutoModel.from_pretrained(out, trust_remote_code=False)
    assert isinstance(model, ViTModel)
    processor = AutoImageProcessor.from_pretrained(out, trust_remote_code=False)
    assert processor.size == {"height": 32, "width": 32}
    assert int(processor.resample) == 3  # bicubic
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert processor.image_std == pytest.approx([0.229, 0.224, 0.225])


def test_mae_conversion_has_masking_off(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mae.pth"
    reference = make_reference_checkpoint(checkpoint, "mae", wrap="model", **SMALL)
    out = tmp_path / "out"
    model = convert_checkpoint(checkpoint, "mae", out, num_heads=2)
    assert model.config.mask_ratio == 0.0
    assert json.loads((out / "config.json").read_text())["mask_ratio"] == 0.0
    assert AutoConfig.from_pretrained(out).mask_ratio == 0.0
    teacher = load_teacher(str(out), attn_implementation="eager")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = teacher(pixels, **forward_kwargs(teacher, pixels))
        expected = reference(pixels)
    # Every patch is kept and in raster order: all tokens match, not only CLS.
    assert output.last_hidden_state.shape == (2, 17, 32)
    assert (output.last_hidden_state - expected.tokens).abs().max().item() < TOL
    # The fixed sin-cos table survives the round trip unchanged.
    torch.testing.assert_close(teacher.embeddings.position_embeddings, reference.pos_embed, rtol=0, atol=0)


def _state(tmp_path: Path, format: str = "dino") -> dict[str, torch.Tensor]:
    model = make_reference_checkpoint(tmp_path / "src.pth", format, with_head=False, **SMALL)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _expect_error(tmp_path: Path, state: object, *fragments: str, format: str = "dino", **overrides: object) -> str:
    checkpoint = tmp_path / "bad.pth"
    torch.save(state, checkpoint)
    kwargs = {"num_heads": 2, **overrides}
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(checkpoint, format, tmp_path / "out", **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error: {message}"
    assert not (tmp_path / "out").exists()
    return message


def test_missing_block_is_named(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state = {k: v for k, v in state.items() if not k.startswith("blocks.0.")}
    _expect_error(tmp_path, {"teacher": state}, "missing: blocks.0.*")


def test_missing_final_norm_is_named(tmp_path: Path) -> None:
    state = _state(tmp_path)
    del state["norm.weight"], state["norm.bias"]
    _expect_error(tmp_path, state, "missing: norm.* (2 keys)")


def test_wrong_width_is_named(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state["blocks.1.attn.qkv.weight"] = torch.randn(48, 16)
    _expect_error(tmp_path, state, "width mismatch", "blocks.1.attn.qkv.weight has [48, 16], expected [96, 32]")


def test_unknown_extra_key_is_named(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state["blocks.1.ls1.gamma"] = torch.ones(32)  # layer scale: a different architecture
    state["reg_token"] = torch.zeros(1, 4, 32)
    _expect_error(tmp_path, state, "unexpected: blocks.1.ls1.gamma, reg_token")


def test_arch_preset_mismatch_is_named(tmp_path: Path) -> None:
    _expect_error(
        tmp_path,
        _state(tmp_path),
        "width mismatch: checkpoint has width 32 (cls_token), vit_small has 384",
        "depth mismatch: checkpoint has 2 blocks, vit_small has 12",
        arch="vit_small",
        num_heads=None,
    )


def test_patch_and_image_size_overrides_are_checked(tmp_path: Path) -> None:
    _expect_error(tmp_path, _state(tmp_path), "patch size mismatch", "kernel 8, patch_size=16 given", patch_size=16)
    _expect_error(tmp_path, _state(tmp_path), "image size mismatch", "image_size=224 given", image_size=224)


def test_unknown_width_needs_num_heads(tmp_path: Path) -> None:
    _expect_error(tmp_path, _state(tmp_path), "Cannot infer the number of attention heads for width 32", num_heads=None)


def test_global_pool_timm_model_is_refused(tmp_path: Path) -> None:
    state = _state(tmp_path, "timm")
    state["fc_norm.weight"] = state.pop("norm.weight")
    state["fc_norm.bias"] = state.pop("norm.bias")
    _expect_error(tmp_path, state, "global-average-pooling", "fc_norm", format="timm")


def test_timm_fc_norm_beside_final_norm_is_dropped(tmp_path: Path) -> None:
    state = _state(tmp_path, "timm")
    state["fc_norm.weight"], state["fc_norm.bias"] = torch.ones(32), torch.zeros(32)
    torch.save(state, tmp_path / "timm.pth")
    _, report = convert_checkpoint_with_report(tmp_path / "timm.pth", "timm", tmp_path / "out", num_heads=2)
    assert any("fc_norm" in item for item in report.dropped) and report.cls_max_abs_diff < TOL


def test_checkpoint_without_state_dict_is_named(tmp_path: Path) -> None:
    _expect_error(tmp_path, {"epoch": 3, "optimizer": {}}, "No state dict found", "epoch")


def test_not_a_vit_is_named(tmp_path: Path) -> None:
    _expect_error(tmp_path, {"conv1.weight": torch.zeros(8, 3, 3, 3)}, "missing: cls_token")


def _swap_last_query_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the converter map the last block's query weights to the key and back: a wrong mapping of right shape."""
    correct = convert_module._hf_state_dict

    def swapped(state, arch):  # type: ignore[no-untyped-def]
        out = correct(state, arch)
        last = f"layers.{arch.depth - 1}.attention."
        out[last + "q_proj.weight"], out[last + "k_proj.weight"] = (
            out[last + "k_proj.weight"],
            out[last + "q_proj.weight"],
        )
        return out

    monkeypatch.setattr(convert_module, "_hf_state_dict", swapped)


def test_verification_catches_a_wrong_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Swapping query and key is invisible to shapes; the reference comparison must catch it."""
    checkpoint = tmp_path / "dino.pth"
    make_reference_checkpoint(checkpoint, "dino", **SMALL)
    _swap_last_query_and_key(monkeypatch)
    with pytest.raises(ConversionVerificationError, match="last-layer CLS attention"):
        convert_checkpoint(checkpoint, "dino", tmp_path / "out", num_heads=2)
    assert not (tmp_path / "out").exists(), "a model that failed verification must not be written"
    assert [p.name for p in tmp_path.iterdir()] == ["dino.pth"]


def test_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_recipe("convert_teacher").main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    flags = ("--checkpoint", "--format", "--output_dir", "--arch", "--patch_size", "--image_size", "--num_heads")
    for flag in (*flags, "--tolerance", "--no_verify"):
        assert flag in text
    for choice in ("dino", "mugs", "ibot", "mae", "timm", "vit_small"):
        assert choice in text


def _exit_status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``python recipes/convert_teacher.py ARGV`` in this process: its exit status and its one ``error:`` line."""
    recipe = load_recipe("convert_teacher")
    with pytest.raises(SystemExit) as stopped:
        run_recipe(lambda: recipe.main(argv))
    assert isinstance(stopped.value.code, int)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return stopped.value.code, line


def test_cli_exit_status_tells_bad_input_from_failed_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ATTNDISTILL_FULL_ERROR", raising=False)
    out = ["--output_dir", str(tmp_path / "out")]
    status, line = _exit_status(["--checkpoint", str(tmp_path / "gone.pth"), "--format", "dino", *out], capsys)
    assert status == 2 and "gone.pth" in line
    status, line = _exit_status(["--checkpoint", "x.pth", "--format", "dinov2", *out], capsys)
    assert status == 2 and line.startswith("error: --format: invalid choice: 'dinov2'")

    checkpoint = tmp_path / "dino.pth"
    make_reference_checkpoint(checkpoint, "dino", **SMALL)
    _swap_last_query_and_key(monkeypatch)
    status, line = _exit_status(["--checkpoint", str(checkpoint), "--format", "dino", "--num_heads", "2", *out], capsys)
    assert status == 1 and line.startswith("error: verification failed: Converted model differs")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_converts_and_prints_report(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mugs.pth"
    reference = make_reference_checkpoint(checkpoint, "mugs", wrap="state_dict", prefix="module.backbone.", **SMALL)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes" / "convert_teacher.py"),
            "--checkpoint",
            str(checkpoint),
            "--format",
            "mugs",
            "--output_dir",
            str(out),
            "--num_heads",
            "2",
            "--patch_size",
            "8",
            "--image_size",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "verified:" in result.stdout and "CLS token" in result.stdout
    assert "relation_blocks" in result.stdout  # Mugs' relation block is reported as dropped
    cls_diff, attn_diff = _compare_with_reference(out, reference)
    assert cls_diff < TOL and attn_diff < TOL


def test_safetensors_with_wrong_width_is_named(tmp_path: Path) -> None:
    state = _state(tmp_path, "timm")
    state["patch_embed.proj.bias"] = torch.zeros(16)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.bias has \[16\], expected \[32\]"):
        convert_checkpoint(tmp_path / "bad.safetensors", "timm", tmp_path / "out", num_heads=2)


@pytest.mark.parametrize("format", ["dino", "mae"])
def test_converted_teacher_gives_reference_attention_through_library_capture(tmp_path: Path, format: str) -> None:
    """As the distillation uses it (sdpa backend, CLS row recomputed from hooks), the teacher matches the original."""
    from attndistill_hf.attention import last_cls_attention

    checkpoint = tmp_path / f"{format}.pth"
    reference = make_reference_checkpoint(checkpoint, format, **SMALL)
    convert_checkpoint(checkpoint, format, tmp_path / "out", num_heads=2)
    teacher = load_teacher(str(tmp_path / "out"))
    assert teacher.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output, attention = last_cls_attention(teacher, pixels)
        expected = reference(pixels)
    assert attention.shape == (2, 2, 17)
    assert (attention - expected.last_attention[:, :, 0]).abs().max().item() < TOL
    assert (output.last_hidden_state[:, 0] - expected.tokens[:, 0]).abs().max().item() < TOL


@pytest.mark.parametrize("format", ["mugs", "mae"])
def test_converted_teacher_drives_a_short_distillation(tmp_path: Path, format: str) -> None:
    from attndistill_hf.trainer import AttnDistillTrainer

    checkpoint = tmp_path / "teacher.pth"
    make_reference_checkpoint(checkpoint, format, wrap="teacher", prefix="module.backbone.", seed=5, **SMALL)
    convert_checkpoint(checkpoint, format, tmp_path / "teacher", num_heads=2)
    args = tiny_run_config(tmp_path / "run", per_device_train_batch_size=4, seed=42)
    trainer = AttnDistillTrainer(tiny_student(), str(tmp_path / "teacher"), args, train_dataset=PixelDataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["loss_attn"] > 0 and entry["loss_proj"] > 0 for entry in logs)
    assert type(trainer.teacher).__name__ == ("ViTMAEModel" if format == "mae" else "ViTModel")
