"""recipes/distill.py end to end: folders, streamed shards, 2 processes == 1 process, corrupt images."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, ResNetConfig, ResNetModel

from attndistill_hf import pipeline, publish
from attndistill_hf.arguments import DistillRunArguments
from attndistill_hf.data import IMAGENET_MEAN, IMAGENET_STD, DataArguments
from attndistill_hf.evaluation import KNNEvaluationCallback, card_records
from attndistill_hf.families import UnsupportedModelError
from attndistill_hf.hub import HubPushError
from attndistill_hf.pipeline import build_knn_loaders, knn_streamed
from attndistill_hf.publish import push_students
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import distill_command, distill_exit_status, tiny_run_config, tiny_teacher, write_image_folder

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_corrupt_images_are_counted(tmp_path: Path, teacher_dir: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=1, classes=3, corrupt=True)
    out = tmp_path / "out"
    # One batch of all 4 files: the corrupt one is skipped and counted, the step still trains.
    run(
        ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(images), "--max_steps", "2"]
        + ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(out)]
    )
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["skipped_images"] for e in logs] == [1, 1]  # the one corrupt file, met in both epochs
    assert all(np.isfinite(e["loss"]) for e in logs)


@pytest.mark.slow
def test_a_folder_of_only_unreadable_images_stops_in_one_line(
    tmp_path: Path, teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    for index in range(3):
        (images / f"{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-an-image")
    out = tmp_path / "out"
    argv = ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--max_steps", "2", "--train_dir", str(images.parent)]
    assert distill_exit_status([*argv, "--per_device_train_batch_size", "4", "--output_dir", str(out)]) == 2
    # 2 batches of the 3 files, every one unreadable: each file counted once
    error = next(line for line in capsys.readouterr().err.splitlines() if "error: " in line)
    assert error.endswith(
        "error: No training batch held a readable image: 3 unreadable images in 2 batches. "
        "Check that the training data are images in a format PIL reads."
    )
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
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


def write_hub_layout(root: Path) -> Path:
    """A local dataset directory laid out as a Hub dataset with ImageNet-1k's splits: 24 train images in
    2 shards (class = index % 3), 12 validation images."""
    write_shards(root / "data", shards=2, per_shard=12)
    shutil.copy(root / "data" / "train-0.parquet", root / "data" / "validation-0.parquet")
    return root


def test_knn_bank_of_a_class_sorted_folder_holds_every_class(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=6, classes=3, size=16)
    data_args = DataArguments(train_dir=str(images), eval_dir=str(images), image_size=16, cache_dir=str(tmp_path))
    args = tiny_run_config(tmp_path / "out", per_device_eval_batch_size=4)
    # The folder loads class-sorted (its first 6 images are all of class 0); the bank is a random 6.
    bank, test = build_knn_loaders(
        data_args, DistillRunArguments(knn_train_samples=6), args, IMAGENET_MEAN, IMAGENET_STD
    )
    labels = torch.cat([batch["labels"] for batch in bank]).tolist()
    assert len(labels) == 6 and set(labels) == {0, 1, 2}
    assert len(torch.cat([batch["labels"] for batch in test])) == 18
    # A streamed folder is one class-sorted shard: its bank is prepared; streamed shards stay streamed.
    assert not knn_streamed(replace(data_args, streaming=True), "train")
    assert knn_streamed(DataArguments(data_files=["x/*.parquet"], streaming=True), "train")
    with pytest.raises(ValueError, match="--knn_train_samples must be a positive integer"):
        DistillRunArguments(knn_train_samples=0)


def test_card_names_the_memory_bank_unless_it_is_the_whole_train_split(tmp_path: Path) -> None:
    data_args = DataArguments(train_dir=str(write_image_folder(tmp_path / "images", per_class=6, classes=3)))
    result = {"protocol": "knn", "num_train": 18, "knn": {"20": {"top1": 50.0, "top5": 90.0}}}

    def names(num_train: int, args: DataArguments) -> list[str]:
        records = card_records({**result, "num_train": num_train}, args, bank_limit=5000)
        return [record.metric_name for record in records]

    assert names(18, data_args) == ["k-NN top-1 (k=20)"]
    assert names(6, data_args) == ["k-NN top-1 (k=20), memory bank: 6 of 18 train images"]
    # Trained on a subset, the bank is still not the whole split.
    assert names(12, replace(data_args, max_train_samples=12)) == [
        "k-NN top-1 (k=20), memory bank: 12 of 18 train images"
    ]
    # A Hub split of unknown size: the bank is named.
    assert names(18, DataArguments(dataset_name="someone/images")) == [
        "k-NN top-1 (k=20), memory bank: 18 train images"
    ]
    # Without any limit (recipes/eval_knn.py) the bank is the whole split, of known size or not.
    whole_split = {**result, "num_train": 18}
    assert [r.metric_name for r in card_records(whole_split, DataArguments(dataset_name="someone/images"))] == [
        "k-NN top-1 (k=20)"
    ]
    subset = card_records({**result, "num_train": 6}, replace(data_args, max_train_samples=6))
    assert [r.metric_name for r in subset] == ["k-NN top-1 (k=20), memory bank: 6 of 18 train images"]


def test_missing_eval_split_fails_before_the_teacher_and_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = write_hub_layout(tmp_path / "hub")

    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("reached before the eval split was checked")

    monkeypatch.setattr(pipeline, "load_run_teacher", too_late)
    monkeypatch.setattr(pipeline, "load_split", too_late)
    with pytest.raises(ValueError, match=r"no split 'test' .*its splits are \['train', 'validation'\]"):
        distill_command(
            ["--teacher_name_or_path", "unused", *QUICK, "--dataset_name", str(hub), "--max_steps", "1"]
            + ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_streamed_hub_dataset_gives_a_streamed_knn_bank(tmp_path: Path, teacher_dir: Path) -> None:
    hub, cache, out = write_hub_layout(tmp_path / "hub"), tmp_path / "cache", tmp_path / "out"
    run(
        ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--dataset_name", str(hub), "--streaming", "true"]
        + ["--eval_split", "validation", "--num_train_examples", "24", "--knn_train_samples", "9"]
        + ["--max_steps", "2", "--per_device_train_batch_size", "4", "--knn_eval_steps", "1"]
        + ["--cache_dir", str(cache), "--output_dir", str(out)]
    )
    knn = json.loads((out / "knn_results.json").read_text())
    assert (knn["num_train"], knn["num_test"]) == (9, 12)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_knn_top1" in entry] == [1, 2]
    assert "k-NN top-1 (k=9), memory bank: 9 of 24 train images" in (out / "README.md").read_text()
    # Training, bank and test set were all streamed: no split was downloaded and prepared.
    assert not list(cache.rglob("*.arrow"))


def test_input_mistakes_are_found_before_the_teacher_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("reached before the input was checked")

    monkeypatch.setattr(pipeline, "load_run_teacher", too_late)
    base = ["--teacher_name_or_path", "unused", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    with pytest.raises(ValueError, match="Unknown --student_preset 'vit-huge'"):
        distill_command([*base, "--student_preset", "vit-huge"])
    with pytest.raises(ValueError, match="--train_augmentation must be 'published' or 'none'"):
        distill_command([*base, "--train_augmentation", "randaug"])
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        distill_command([*base, "--train_dir", str(tmp_path), "--push_to_hub", "true"])


def test_an_unusable_output_folder_is_named_before_the_teacher_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("reached before the output folder was checked")

    monkeypatch.setattr(pipeline, "load_run_teacher", too_late)
    base = ["--teacher_name_or_path", "unused", *QUICK, "--train_dir", str(write_image_folder(tmp_path / "images"))]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"^--output_dir {a_file} is a file, not a folder\.$"):
        distill_command([*base, "--output_dir", str(a_file)])
    with pytest.raises(ValueError, match=rf"^Cannot write to --output_dir {a_file}/out: "):
        distill_command([*base, "--output_dir", str(a_file / "out")])
    if os.geteuid() != 0:  # root writes into any folder
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(ValueError, match=rf"^Cannot write to --output_dir {read_only}: Permission denied"):
            distill_command([*base, "--output_dir", str(read_only)])


def test_a_refused_run_leaves_no_output_folder_behind(tmp_path: Path, teacher_dir: Path) -> None:
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match="fp16 needs a gradient scaler"):
        distill_command(
            ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(write_image_folder(tmp_path / "i"))]
            + ["--max_steps", "1", "--fp16", "true", "--output_dir", str(out)]
        )
    assert not (tmp_path / "new").exists()  # neither the folder nor the parent created for it


def test_a_cnn_teacher_is_refused_as_not_a_vit_family_encoder(tmp_path: Path) -> None:
    teacher = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(teacher)
    with pytest.raises(UnsupportedModelError) as refused:
        distill_command(
            ["--teacher_name_or_path", str(teacher), *QUICK, "--train_dir", str(write_image_folder(tmp_path / "i"))]
            + ["--max_steps", "1", "--output_dir", str(tmp_path / "out")]
        )
    message = str(refused.value)
    assert message.startswith("Unsupported teacher: ResNetModel is not supported: it is not a ViT-family encoder")
    assert "attn_implementation" not in message  # no advice about a flag the recipe does not have


def test_unlabelled_eval_data_is_refused_before_training(tmp_path: Path, teacher_dir: Path) -> None:
    labelled = write_image_folder(tmp_path / "train")
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, image in enumerate(sorted(labelled.rglob("*.png"))[:4]):
        shutil.copy(image, flat / f"{index}.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"k-NN test set .* has no label column 'label'"):
        distill_command(
            ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(labelled), "--eval_dir", str(flat)]
            + ["--max_steps", "1", "--per_device_train_batch_size", "4", "--output_dir", str(out)]
        )
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_card_names_local_data_by_name_and_publishes_no_local_path(tmp_path: Path, teacher_dir: Path) -> None:
    images = write_image_folder(tmp_path / "data" / "train")
    val = write_image_folder(tmp_path / "data" / "val", per_class=2)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"  # a config's path that a flag overrides is in the card's recipe too
    config.write_text(f"teacher_name_or_path: {teacher_dir}\noutput_dir: {tmp_path / 'elsewhere'}\n")
    argv = [str(config), *QUICK, "--train_dir", str(images), "--eval_dir", str(val), "--max_steps", "1"]
    assert (
        distill_exit_status(
            [*argv, "--per_device_train_batch_size", "4", "--save_steps", "1", "--output_dir", str(out)]
        )
        == 0
    )
    card = ModelCard.load(out / "README.md")
    assert "split: val" in card.content and "split: test" not in card.content
    assert card.data.datasets is None and "on `data` images" in card.text  # local data: named, not listed
    assert "--train_dir train --eval_dir val" in card.text and f"teacher_name_or_path: {teacher_dir.name}" in card.text
    scanned = 0
    for path in (path for path in out.rglob("*") if path.is_file()):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # weights and the pickled training arguments (never pushed)
        scanned += 1
        assert str(tmp_path) not in text and str(teacher_dir) not in text, path
    assert scanned >= 6  # card, configs, k-NN results, trainer states


@pytest.mark.slow
def test_a_finished_run_is_refused_unless_overwritten_or_resumed(
    tmp_path: Path, teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = write_image_folder(tmp_path / "images", per_class=2)
    out = tmp_path / "out"
    common = ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(images), "--output_dir", str(out)]
    common += ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--attention_figure_images", "0"]
    assert distill_exit_status([*common, "--eval_dir", str(images), "--max_steps", "2", "--save_steps", "1"]) == 0
    first = {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert {"knn_results.json", "checkpoint-1/optimizer.pt", "checkpoint-2/optimizer.pt"} <= first.keys()

    capsys.readouterr()
    assert distill_exit_status([*common, "--max_steps", "2"]) == 2
    refused = capsys.readouterr().err
    assert refused.startswith(f"error: --output_dir {out} holds an earlier run (")
    assert "--overwrite_output_dir true" in refused and "--resume_from_checkpoint last" in refused
    assert len(refused.splitlines()) == 2  # the error and the hint for the traceback
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first

    assert (
        distill_exit_status([*common, "--max_steps", "4", "--save_steps", "1", "--resume_from_checkpoint", "last"]) == 0
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]  # steps 1-2 come from checkpoint-2
    first_logs = json.loads(first["trainer_state.json"])["log_history"]
    assert logged[:2] == [entry for entry in first_logs if "loss" in entry]

    assert (
        distill_exit_status([*common, "--max_steps", "1", "--save_strategy", "no", "--overwrite_output_dir", "true"])
        == 0
    )
    files = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    assert files == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "trainer_state.json",
        "training_curves.png",
    ]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.slow
def test_a_failed_push_keeps_the_output_and_exits_non_zero(
    tmp_path: Path, teacher_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client, refused before any request
    images = write_image_folder(tmp_path / "images", per_class=2)
    out = tmp_path / "out"
    argv = ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--max_steps", "1", "--train_dir", str(images)]
    argv += ["--per_device_train_batch_size", "4", "--output_dir", str(out)]
    assert distill_exit_status([*argv, "--push_to_hub", "true", "--hub_model_id", "someone/student"]) == 1
    stderr = capsys.readouterr().err
    assert f"error: Pushing {out} to the Hub repo 'someone/student' failed" in stderr
    assert f"hf upload someone/student {out} ." in stderr  # the retry hint
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (out / name).is_file(), name


def test_every_student_is_pushed_and_any_failed_push_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed, failing = [], {"someone/b"}

    def push(folder: Path, repo_id: str, **kwargs: object) -> str:
        if repo_id in failing:
            raise HubPushError(f"Pushing {folder} to {repo_id!r} failed (offline).", local_dir=folder, repo_id=repo_id)
        pushed.append(repo_id)
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(publish, "push_output_dir", push)
    args = tiny_run_config(tmp_path)
    targets = [(tmp_path / name, f"someone/{name}") for name in "abc"]
    with pytest.raises(HubPushError, match=rf"^Pushing {tmp_path}/b to 'someone/b' failed \(offline\)\.$"):
        push_students(targets, args)
    assert pushed == ["someone/a", "someone/c"]  # a failed push does not stop the others
    failing.add("someone/c")
    with pytest.raises(HubPushError) as excinfo:
        push_students(targets, args)
    assert str(excinfo.value).splitlines() == [
        f"Pushing {tmp_path}/b to 'someone/b' failed (offline).",
        f"Pushing {tmp_path}/c to 'someone/c' failed (offline).",
    ]


def test_the_knn_callback_is_registered_once(
    tmp_path: Path, teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[KNNEvaluationCallback] = []

    class Registered(Exception):
        pass

    class Recording(AttnDistillTrainer):
        def train(self, *args: object, **kwargs: object) -> None:
            registered.extend(c for c in self.callback_handler.callbacks if isinstance(c, KNNEvaluationCallback))
            raise Registered

    monkeypatch.setattr(pipeline, "AttnDistillTrainer", Recording)
    images = write_image_folder(tmp_path / "images", per_class=2)
    with pytest.raises(Registered):
        distill_command(
            ["--teacher_name_or_path", str(teacher_dir), *QUICK, "--train_dir", str(images), "--eval_dir", str(images)]
            + ["--knn_eval_steps", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "out")]
        )
    assert len(registered) == 1 and isinstance(registered[0].trainer, Recording)  # logs through trainer.log
