"""AttnDistillConfig: the published defaults, the learning-rate rule, the effective batch, range checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from attndistill_hf.config import AttnDistillConfig


def test_the_library_config_refuses_what_the_recipe_refuses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--attn_loss_weight must be a finite number >= 0, got nan\.$"):
        AttnDistillConfig(output_dir=str(tmp_path), attn_loss_weight=float("nan"))
    with pytest.raises(ValueError, match=r"^--max_steps must be a positive integer, or -1 for num_train_epochs"):
        AttnDistillConfig(output_dir=str(tmp_path), max_steps=0)
    # num_train_epochs is not used when max_steps is given.
    assert AttnDistillConfig(output_dir=str(tmp_path), max_steps=3, num_train_epochs=0).max_steps == 3


def test_learning_rate_follows_the_base_rate_rule(tmp_path: Path) -> None:
    args = AttnDistillConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=64, gradient_accumulation_steps=2, use_cpu=True
    )
    assert args.learning_rate == pytest.approx(1.5e-4 * 128 / 256)
    assert (args.adam_beta2, args.weight_decay, args.lr_scheduler_type) == (0.95, 0.05, "cosine")
    assert args.accelerator_config.dispatch_batches is False


def test_published_defaults_no_clipping_and_the_effective_batch(tmp_path: Path, caplog) -> None:
    args = AttnDistillConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=64)
    assert args.max_grad_norm == 0.0  # the published recipe clips nothing (TrainingArguments: 1.0)
    filled = AttnDistillConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=64, effective_batch_size=4096
    )
    assert filled.gradient_accumulation_steps == 64 and filled.total_train_batch_size == 4096
    assert filled.learning_rate == pytest.approx(1.5e-4 * 4096 / 256)
    with caplog.at_level("WARNING"):
        rounded = AttnDistillConfig(
            output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=48, effective_batch_size=100
        )
    assert rounded.gradient_accumulation_steps == 2 and "not a multiple of 48" in caplog.text
    with pytest.raises(ValueError, match="gradient_accumulation_steps 4 and effective_batch_size 4096 disagree"):
        AttnDistillConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            per_device_train_batch_size=64,
            effective_batch_size=4096,
            gradient_accumulation_steps=4,
        )
    with pytest.raises(ValueError, match="smaller than one step"):
        AttnDistillConfig(
            output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=64, effective_batch_size=32
        )


def test_a_negative_learning_rate_is_named_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--learning_rate must be a finite number > 0 \(or null\), got -0\.1\.$"):
        AttnDistillConfig(output_dir=str(tmp_path), use_cpu=True, learning_rate=-0.1)
    with pytest.raises(ValueError, match=r"^--base_learning_rate must be a finite number > 0, got -0\.0001\.$"):
        AttnDistillConfig(output_dir=str(tmp_path), use_cpu=True, base_learning_rate=-1e-4)
