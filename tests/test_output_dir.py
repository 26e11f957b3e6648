"""What a rerun finds in an output folder: a finished run is not trained further, a resume keeps its
students' architecture, and a run stopped by its input leaves nothing to be taken for a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import distill_exit_status, tiny_teacher, write_image_folder

pytestmark = pytest.mark.slow

QUICK = ["--image_size", "32", "--patch_size", "8", "--use_cpu", "true", "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    tiny_teacher(root / "teacher")
    return root / "teacher", write_image_folder(root / "images")


def argv(inputs: tuple[Path, Path], out: Path, *extra: str, preset: str = "vit-tiny-patch16") -> list[str]:
    teacher, images = inputs
    return [
        *("--teacher_name_or_path", str(teacher), "--train_dir", str(images), "--output_dir", str(out)),
        *("--student_preset", preset, *QUICK, "--max_steps", "3", "--save_steps", "2", *extra),
    ]


def test_resuming_a_finished_run_does_nothing_and_says_so(
    tmp_path: Path, inputs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    assert distill_exit_status(argv(inputs, out)) == 0
    # 18 images in batches of 4: step 3 ends mid-epoch, where Trainer would have run a step 4 on resume.
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / ".checkpoint-staging").exists()
    exported = (out / "model.safetensors").read_bytes()
    with caplog.at_level(logging.WARNING):
        assert distill_exit_status(argv(inputs, out, "--resume_from_checkpoint", "last")) == 0
    assert f"{out} finished at step 3 and its students are exported: nothing to resume" in caplog.text
    assert (out / "model.safetensors").read_bytes() == exported
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "checkpoint-4").exists()


def test_a_final_checkpoint_not_yet_exported_is_exported_without_another_step(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    assert distill_exit_status(argv(inputs, out)) == 0
    expected = load_file(out / "model.safetensors")
    for name in ("model.safetensors", "config.json", "trainer_state.json"):  # killed after the last checkpoint
        (out / name).unlink()
    assert distill_exit_status(argv(inputs, out, "--resume_from_checkpoint", "last")) == 0
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[key], expected[key]) for key in expected)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_resuming_with_another_student_architecture_is_refused_naming_both(
    tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert distill_exit_status(argv(inputs, out)) == 0
    (out / "checkpoint-3").rename(out / "kept")  # leave checkpoint-2, mid-run
    # 3 and 6 heads of width 192: the same parameter shapes, so the weights alone would load silently.
    resumed = argv(inputs, out, "--resume_from_checkpoint", "last", preset="vit-tiny-6heads-patch16")
    assert distill_exit_status(resumed) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")][-1]
    assert error == (
        f"error: Cannot resume from {out / 'checkpoint-2'}: the student there is vit with num_attention_heads=3, "
        "this run builds vit with num_attention_heads=6; resume with the same student (--student_preset / "
        "--student_name_or_path / --patch_size) or start a new run."
    )
    assert (out / "checkpoint-2" / "model.safetensors").is_file()  # a refused resume keeps the checkpoints


def test_a_run_without_a_readable_image_leaves_no_output_folder(
    tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, _ = inputs
    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    for index in range(4):
        (images / f"{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-an-image")
    out = tmp_path / "out"
    refused = [
        *("--teacher_name_or_path", str(teacher), "--train_dir", str(images.parent), "--output_dir", str(out)),
        *("--student_preset", "vit-tiny-patch16", *QUICK, "--max_steps", "4", "--save_steps", "1"),
    ]
    assert distill_exit_status(refused) == 2
    assert "error: No training batch held a readable image" in capsys.readouterr().err
    # Nothing written (no checkpoint of a student that saw no image), so a rerun is not refused as "an earlier run".
    assert not out.exists()
