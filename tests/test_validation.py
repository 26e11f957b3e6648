"""Numeric settings refused when parsed, naming the flag (or the library function's argument): one range
helper (``attndistill_hf.validation``) for the recipes' fields, the config and the library's functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from attndistill_hf.data import (
    EqualStepsIterable,
    GpuAugment,
    dataloader_workers,
    image_stats,
    steps_per_epoch,
    train_transform,
)
from attndistill_hf.demo.fashion_mnist import prepare_fashion_mnist
from attndistill_hf.evaluation import (
    EvalArguments,
    KNNEvaluationCallback,
    LinearProbeConfig,
    balanced_label_subset,
    knn_accuracy,
)
from attndistill_hf.losses import fuse_heads, projector_hidden_dims
from attndistill_hf.validation import POSITIVE_INT, Bound, check_value

from helpers import argv_without_a_teacher, distill_refusal


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--attn_loss_weight", "nan"], "--attn_loss_weight must be a finite number >= 0, got nan."),
        (["--proj_loss_weight", "inf"], "--proj_loss_weight must be a finite number >= 0, got inf."),
        (["--attn_loss_weight", "-1"], "--attn_loss_weight must be a finite number >= 0, got -1.0."),
        (["--fusion_temperature", "0"], "--fusion_temperature must be a finite number > 0, got 0.0."),
        (["--learning_rate", "0"], "--learning_rate must be a finite number > 0 (or null), got 0.0."),
        (["--base_learning_rate", "nan"], "--base_learning_rate must be a finite number > 0, got nan."),
        (["--max_steps", "0"], "--max_steps must be a positive integer, or -1 for num_train_epochs, got 0."),
        (["--num_train_epochs", "0"], "--num_train_epochs must be a finite number > 0, got 0.0."),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer, got 0."),
        (["--per_device_train_batch_size", "-4"], "--per_device_train_batch_size must be a positive integer, got -4."),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer, got 0."),
        (["--warmup_epochs", "-1"], "--warmup_epochs must be a finite number >= 0, got -1.0."),
        (["--weight_decay", "nan"], "--weight_decay must be a finite number >= 0, got nan."),
        (["--adam_beta2", "1"], "--adam_beta2 must be a finite number >= 0 and < 1, got 1.0."),
        (["--projector_depth", "0"], "--projector_depth must be a positive integer, got 0."),
        (["--projector_hidden_dims", "64", "0"], "--projector_hidden_dims must be a positive integer"),
        (["--effective_batch_size", "0"], "--effective_batch_size must be a positive integer (or null), got 0."),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be a finite number >= 0, got -1.0."),
        (["--knn_k", "0"], "--knn_k must be a positive integer, got 0."),
        (["--knn_eval_steps", "0"], "--knn_eval_steps must be a positive integer (or null), got 0."),
        (["--attention_figure_images", "-1"], "--attention_figure_images must be a non-negative integer, got -1."),
        (["--patch_size", "0"], "--patch_size must be a positive integer (or null), got 0."),
        (["--seed", "-1"], "--seed must be an integer >= 0 and < 4.29497e+09, got -1."),
        (
            ["--students", '{"name": "a", "attn_loss_weight": NaN}'],
            "--students entry 'a': attn_loss_weight must be a finite number >= 0, got nan.",
        ),
        (
            ["--students", '{"name": "a", "fusion_temperature": -2}'],
            "--students entry 'a': fusion_temperature must be a finite number > 0, got -2.",
        ),
        (
            ["--students", '{"name": "a", "projector_depth": 1.5}'],
            "--students entry 'a': projector_depth must be a positive integer, got 1.5.",
        ),
        (
            ["--students", '{"name": "a", "patch_size": 0}'],
            "--students entry 'a': patch_size must be a positive integer, got 0.",
        ),
    ],
)
def test_a_setting_out_of_range_is_refused_when_parsed_naming_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    status, error = distill_refusal([*argv_without_a_teacher(tmp_path), *flags], capsys)
    assert status == 2
    assert error.startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_bounds_describe_what_they_accept() -> None:
    check_value("--n", 3, POSITIVE_INT)
    for bad in (0, -1, 1.0, True, "3", None, float("nan")):
        with pytest.raises(ValueError, match=r"^--n must be a positive integer, got"):
            check_value("--n", bad, POSITIVE_INT)
    unit = Bound(above=0, maximum=1)
    assert unit.accepts(1.0) and unit.accepts(1e-9) and not unit.accepts(0.0) and not unit.accepts(float("inf"))
    with pytest.raises(ValueError, match=r"^--dims must not be empty\.$"):
        check_value("--dims", [], POSITIVE_INT)


FEATURES, LABELS = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: steps_per_epoch(7, 0, 4), "world_size must be a positive integer, got 0."),
        (lambda: EqualStepsIterable([], 0, 4), "steps must be a positive integer, got 0."),
        (lambda: dataloader_workers([], -1), "the number of workers must be a non-negative integer, got -1."),
        (lambda: train_transform(True), "image_size must be a positive integer, got True."),
        (
            lambda: train_transform(8, std=(0.5, 0.0, 0.5)),
            "std must be a finite number > 0, got 0.0 in [0.5, 0.0, 0.5].",
        ),
        (
            lambda: image_stats({"image_mean": [0.1], "image_std": [0.0]}),
            "image std must be a finite number > 0, got 0.0 in [0.0, 0.0, 0.0].",
        ),
        (lambda: GpuAugment(8, flip_prob=2.0), "flip_prob must be a finite number >= 0 and <= 1, got 2.0."),
        (lambda: knn_accuracy(FEATURES, LABELS, FEATURES, LABELS, ks=[]), "ks must not be empty."),
        (
            lambda: knn_accuracy(FEATURES, LABELS, FEATURES, LABELS, ks=[1, 0]),
            "ks must be a positive integer, got 0 in [1, 0].",
        ),
        (
            lambda: knn_accuracy(FEATURES, LABELS, FEATURES, LABELS, temperature=float("nan")),
            "temperature must be a finite number > 0, got nan.",
        ),
        (lambda: KNNEvaluationCallback([], [], k=0), "k must be a positive integer, got 0."),
        (
            lambda: LinearProbeConfig(eval_every=-1),
            "eval_every must be 0 (the final epoch only) or a positive integer, got -1.",
        ),
        (
            lambda: LinearProbeConfig(lr_sweep=(0.1, 0.0)),
            "lr_sweep must be a finite number > 0, got 0.0 in [0.1, 0.0].",
        ),
        (lambda: balanced_label_subset(LABELS, 1.5, 0), "fraction must be a finite number > 0 and <= 1, got 1.5."),
        (
            lambda: EvalArguments(model_name_or_path="model", num_workers=-1),
            "--num_workers must be a non-negative integer, got -1.",
        ),
        (lambda: fuse_heads(torch.rand(1, 2, 5), temperature=0.0), "temperature must be a finite number > 0, got 0.0."),
        (lambda: projector_hidden_dims(8, 0), "depth must be a positive integer, got 0."),
        (
            lambda: prepare_fashion_mnist("unused", num_test_shards=0),
            "num_test_shards must be a positive integer, got 0.",
        ),
    ],
)
def test_library_functions_name_the_argument_out_of_range(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        call()
    assert str(refused.value) == message
