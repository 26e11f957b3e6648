"""recipes/distill.py end to end: folders, streamed shards, 2 processes == 1 process, corrupt images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from helpers import tiny_teacher, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "recipes" / "distill.py"


def write_shards(folder: Path, shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        images = []
        for index in range(per_shard):
            buffer = io.BytesIO()
            pixels = (rng.random((36, 36, 3)) * 60 + (index % 3) * 90).astype("uint8")
            Image.fromarray(pixels).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        table = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(per_shard)]})
        table.cast_column("image", datasets.Image()).to_parquet(str(folder / f"train-{shard}.parquet"))
    return str(folder / "*.parquet")


def run(args: list[str], processes: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes:
        # torchrun with gloo: the same DDP code path as a GPU launch, on CPU processes.
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(DISTILL)]
    else:
        command = [sys.executable, str(DISTILL)]
    result = subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


QUICK = ["--student_preset", "vit-tiny-patch16", "--image_size", "32", "--patch_size", "8", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    tiny_teacher(path)
    return path


def test_quick_cpu_run_on_an_image_folder(tmp_path: Path, teacher_dir: Path) -> None:
    images = write_image_folder(tmp_path / "images", corrupt=True)
    out = tmp_path / "out"
    run(
        ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(images), "--max_steps", "3"]
        + ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(out)]
    )
    student = AutoModel.from_pretrained(out)
    assert type(student).__name__ == "ViTModel" and student.config.patch_size == 8
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logs) == 3
    assert all(np.isfinite(entry["loss_proj"]) and np.isfinite(entry["loss_attn"]) for entry in logs)
    # 19 images: 18 decodable + 1 corrupt; 3 steps x 4 cover 12 of them in the sampler's order, so the
    # corrupt one may or may not be drawn: the count equals what the batches actually met.
    assert logs[-1]["skipped_images"] in (0, 1)
    card = (out / "README.md").read_text()
    assert f"| Images skipped (unreadable) | {logs[-1]['skipped_images']} |" in card


def test_corrupt_images_are_counted(tmp_path: Path, teacher_dir: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=1, classes=3, corrupt=True)
    out = tmp_path / "out"
    # One batch of all 4 files: the corrupt one is skipped and counted, the step still trains.
    run(
        ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(images), "--max_steps", "2"]
        + ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(out)]
    )
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["skipped_images"] for e in logs] == [1, 2]
    assert all(np.isfinite(e["loss"]) for e in logs)


def test_two_processes_equal_one_process_on_streamed_shards(tmp_path: Path, teacher_dir: Path) -> None:
    pattern = write_shards(tmp_path / "shards", shards=1, per_shard=16)
    common = ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--data_files", pattern, "--streaming", "true"]
    # Deterministic views and no shuffle buffer: both runs see the same global batches; SGD makes equal
    # weights mean equal averaged gradients.
    common += ["--shuffle_buffer_size", "1", "--train_augmentation", "none", "--max_steps", "2"]
    common += ["--optim", "sgd", "--learning_rate", "0.05", "--final_knn_eval", "false", "--model_card", "false"]
    run([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    run([*common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")], processes=2)
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    initial_run = AutoModel.from_pretrained(tmp_path / "one")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    assert initial_run.config.image_size == 32
