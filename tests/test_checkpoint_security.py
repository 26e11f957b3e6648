"""Checkpoints are untrusted files: reading one must never run code from it.

Each crafted file below carries a payload that, when unpickled normally, writes a marker file. The
tests show that ``load_checkpoint_file`` / ``convert_checkpoint``, ``load_teacher`` (a teacher folder with
pickled weights) and resuming a run (its optimizer, scheduler and RNG state files) refuse it with an
explanation and the marker never appears, and then that the payload is live (a plain
``torch.load(weights_only=False)`` does write the marker), so the tests would fail if the protection were
removed. Checkpoints the Trainer writes itself still resume.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers.trainer_pt_utils import safe_globals

from attndistill_hf.checkpoints import UnsafePickleError, check_checkpoint, unsafe_globals
from attndistill_hf.convert import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint_file,
)
from attndistill_hf.models import load_teacher
from attndistill_hf.reference_vit import ReferenceViT
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import PixelDataset, tiny_run_config, tiny_student, tiny_teacher, write_image_folder

PACKAGE_DIRS = [Path(__file__).resolve().parents[1] / name for name in ("attndistill_hf", "recipes")]


class WritesMarker:
    """Unpickling this object calls ``exec`` with code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('executed')",))


def _payloads(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Crafted files (name -> (checkpoint, marker)) in the zip format, the legacy format and nested in a state dict."""
    files: dict[str, tuple[Path, Path]] = {}
    marker = tmp_path / "marker_zip"
    torch.save(WritesMarker(marker), tmp_path / "evil_zip.pth")
    files["zip"] = (tmp_path / "evil_zip.pth", marker)

    marker = tmp_path / "marker_legacy"
    torch.save(WritesMarker(marker), tmp_path / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    files["legacy"] = (tmp_path / "evil_legacy.pth", marker)

    marker = tmp_path / "marker_raw_pickle"
    with open(tmp_path / "evil_raw.pth", "wb") as handle:
        pickle.dump(WritesMarker(marker), handle, protocol=2)
    files["raw_pickle"] = (tmp_path / "evil_raw.pth", marker)

    # A real backbone state dict with the payload hidden among its entries.
    marker = tmp_path / "marker_nested"
    state = dict(ReferenceViT(32, 1, 2, 8, 16).state_dict())
    torch.save({"teacher": state, "args": WritesMarker(marker)}, tmp_path / "evil_nested.pth")
    files["nested"] = (tmp_path / "evil_nested.pth", marker)
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw_pickle", "nested"])
def test_crafted_pickle_is_refused_and_never_executed(tmp_path: Path, kind: str) -> None:
    checkpoint, marker = _payloads(tmp_path)[kind]
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(checkpoint)
    message = str(info.value)
    assert str(checkpoint) in message
    assert "never executed" in message and "safetensors" in message
    assert not marker.exists(), "the checkpoint's code ran"

    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(checkpoint, "dino", tmp_path / "out", num_heads=2)
    assert not marker.exists(), "the checkpoint's code ran during conversion"
    assert not (tmp_path / "out").exists()

    # The payload is live: an unrestricted load runs it. Without weights_only the test above would fail.
    with contextlib.suppress(Exception):  # only the side effect matters here
        torch.load(checkpoint, weights_only=False)
    assert marker.read_text() == "executed"


def test_refusal_names_the_offending_global(tmp_path: Path) -> None:
    checkpoint, _ = _payloads(tmp_path)["zip"]
    with pytest.raises(UnsafeCheckpointError, match="exec"):
        load_checkpoint_file(checkpoint)


def test_training_checkpoint_arguments_are_allowed(tmp_path: Path) -> None:
    """DINO-style checkpoints keep their argparse.Namespace; that one harmless class is allowed."""
    import argparse

    path = tmp_path / "full.pth"
    torch.save({"teacher": {"cls_token": torch.ones(1, 1, 4)}, "args": argparse.Namespace(arch="vit_small")}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["args"].arch == "vit_small"
    torch.testing.assert_close(loaded["teacher"]["cls_token"], torch.ones(1, 1, 4))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "teacher.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint_file(tmp_path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_names_the_path(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save({"cls_token": torch.randn(1, 1, 32), "pos_embed": torch.randn(1, 17, 32)}, good)
    else:
        from safetensors.torch import save_file

        save_file({"cls_token": torch.randn(1, 1, 32), "pos_embed": torch.randn(1, 17, 32)}, str(good))
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(bad))) as info:
        load_checkpoint_file(bad)
    assert "truncated" in str(info.value)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint_file(path)


# ----------------------------------------------------------------------------------------------
# Teachers with pickled weights (pytorch_model.bin, no safetensors)
# ----------------------------------------------------------------------------------------------


def _bin_teacher(folder: Path, *, payload: Path | None = None, legacy: bool = False) -> dict[str, torch.Tensor]:
    """A teacher folder whose only weights are ``pytorch_model.bin`` (with a payload writing ``payload``)."""
    model = tiny_teacher()
    model.config.save_pretrained(folder)
    state = dict(model.state_dict())
    saved: dict[str, object] = dict(state) if payload is None else {**state, "payload": WritesMarker(payload)}
    torch.save(saved, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return state


def test_a_teacher_with_tensor_only_pickled_weights_loads(tmp_path: Path) -> None:
    """transformers unpickles pytorch_model.bin with weights_only=True: a benign one is a valid teacher."""
    state = _bin_teacher(tmp_path)
    loaded = load_teacher(str(tmp_path)).state_dict()
    for name, value in state.items():  # AutoModel adds ViT's pooler, which the file does not hold
        torch.testing.assert_close(loaded[name], value, msg=name)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_teacher_with_crafted_pickled_weights_is_refused_and_never_executed(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "marker"
    _bin_teacher(tmp_path / "teacher", payload=marker, legacy=legacy)
    with pytest.raises(UnsafePickleError) as info:
        load_teacher(str(tmp_path / "teacher"))
    message = str(info.value)
    assert message.startswith(f"Cannot load the teacher {str(tmp_path / 'teacher')!r}: ")
    # A zip-format file is disassembled to name what it asks for; a legacy one cannot be, so it is described.
    named = "its pickled weights (pytorch_model.bin)" if legacy else "pytorch_model.bin"
    needs = "more than tensors and plain containers" if legacy else "builtins.exec"
    assert f"{named} is not a safe checkpoint: unpickling it needs {needs}, which can run code" in message
    assert "save it with save_pretrained, which writes model.safetensors" in message
    assert "weights_only" not in message and info.value.__suppress_context__
    assert not marker.exists(), "the teacher's code ran"

    with contextlib.suppress(Exception):  # the payload is live: an unrestricted load runs it
        torch.load(tmp_path / "teacher" / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "executed"


@pytest.mark.slow
def test_the_distill_recipe_reports_a_crafted_teacher_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _bin_teacher(tmp_path / "teacher", payload=marker)
    write_image_folder(tmp_path / "images", per_class=2)
    args = ["--teacher_name_or_path", str(tmp_path / "teacher"), "--student_preset", "vit-tiny-patch16"]
    args += ["--image_size", "32", "--patch_size", "8", "--use_cpu", "true", "--train_dir", str(tmp_path / "images")]
    args += ["--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--final_knn_eval", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ATTNDISTILL_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, str(PACKAGE_DIRS[1] / "distill.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "pytorch_model.bin is not a safe checkpoint" in errors[0]
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Resuming: the pickles of a checkpoint (optimizer, scheduler, RNG state)
# ----------------------------------------------------------------------------------------------


def _trainer(output_dir: Path, max_steps: int) -> AttnDistillTrainer:
    args = tiny_run_config(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, logging_steps=500)
    return AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as the Trainer leaves it: checkpoint-1 and checkpoint-2, each with its pickles."""
    folder = tmp_path_factory.mktemp("run")
    _trainer(folder, max_steps=2).train()
    return folder


def test_checkpoints_the_trainer_writes_pass_and_resume(trained_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run")
    checkpoint = run / "checkpoint-2"
    # Without the numpy globals the Trainer allows for it, the RNG state would be refused; the arguments
    # file pickles whole objects, but nothing reads it on resume: neither may be refused.
    rng_globals = unsafe_globals(checkpoint / "rng_state.pth")
    assert rng_globals and all(name.startswith("numpy.") for name in rng_globals)
    with safe_globals():
        assert unsafe_globals(checkpoint / "rng_state.pth") == []
    assert unsafe_globals(checkpoint / "training_args.bin")
    check_checkpoint(checkpoint)

    trainer = _trainer(run, max_steps=3)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_executed(
    trained_run: Path, tmp_path: Path, name: str
) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run")
    marker = tmp_path / "marker"
    path = run / "checkpoint-2" / name
    with safe_globals():
        state = torch.load(path, weights_only=True)
    torch.save({**state, "payload": WritesMarker(marker)}, path)

    with pytest.raises(UnsafePickleError) as info:
        _trainer(run, max_steps=3).train(resume_from_checkpoint=True)
    message = str(info.value)
    assert message.startswith(
        f"Cannot resume from {run}/checkpoint-2: {name} is not a safe checkpoint: unpickling it needs builtins.exec, "
    )
    assert message.endswith(f"resume from {run}/checkpoint-1 instead, the newest complete checkpoint before it.")
    assert "torch.save of a state dict" in message and "weights_only" not in message
    assert not marker.exists(), "the checkpoint's code ran"

    with contextlib.suppress(Exception):  # the payload is live: an unrestricted load runs it
        torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"
