"""Several students of one teacher in one run: each equals its own single-student run, under DDP, resume and NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from attndistill_hf.arguments import DistillModelArguments
from attndistill_hf.data import DataArguments
from attndistill_hf.pipeline import load_students
from attndistill_hf.students import MultiStudentModule, StudentSpec
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import (
    REPO,
    PixelDataset,
    distill_command,
    run_two_processes,
    tiny_run_config,
    tiny_student,
    tiny_teacher,
    write_image_folder,
)


def noisy_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A random augmentation drawn from the global RNG: both runs must draw it identically."""
    pixels = torch.stack([item["pixel_values"] for item in items])
    return {"pixel_values": pixels + 0.1 * torch.randn_like(pixels)}


def two_students() -> dict[str, StudentSpec]:
    """Projector + attention beside attention only, with different initial weights."""
    return {"both": StudentSpec(tiny_student(0)), "attn": StudentSpec(tiny_student(1), proj_loss_weight=0.0)}


SINGLE_SETTINGS = {"both": (0, {}), "attn": (1, {"proj_loss_weight": 0.0})}


def states(trainer: AttnDistillTrainer) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.detach().clone() for k, v in student.state_dict().items()}
        for name, student in trainer.students.items()
    }


def test_two_students_in_one_run_equal_their_single_student_runs(tmp_path: Path) -> None:
    multi = AttnDistillTrainer(
        two_students(),
        tiny_teacher(),
        tiny_run_config(tmp_path / "multi", max_steps=3),
        train_dataset=PixelDataset(),
        data_collator=noisy_collate,
    )
    assert isinstance(multi.model, MultiStudentModule)
    multi.train()
    logged = [entry for entry in multi.state.log_history if "both/loss_proj" in entry]
    assert len(logged) == 3 and all(entry["attn/loss_proj"] == 0.0 for entry in logged)
    assert all(entry["both/loss_attn"] > 0 and entry["attn/loss_attn"] > 0 for entry in logged)
    after = states(multi)
    for name, (seed, overrides) in SINGLE_SETTINGS.items():
        single = AttnDistillTrainer(
            tiny_student(seed),
            tiny_teacher(),
            tiny_run_config(tmp_path / name, max_steps=3, **overrides),
            train_dataset=PixelDataset(),
            data_collator=noisy_collate,
        )
        single.train()
        initial = tiny_student(seed).state_dict()
        assert max((after[name][k] - v).abs().max().item() for k, v in initial.items()) > 1e-4  # it trained
        for key, value in single.student.state_dict().items():
            torch.testing.assert_close(after[name][key], value, atol=1e-6, rtol=0, msg=f"{name}: {key}")

    multi.save_model(str(tmp_path / "export"))
    for name in SINGLE_SETTINGS:
        reloaded = AutoModel.from_pretrained(tmp_path / "export" / name)
        for key, value in after[name].items():
            torch.testing.assert_close(reloaded.state_dict()[key], value, atol=0, rtol=0, msg=f"{name}: {key}")
    with pytest.raises(AttributeError, match="several students"):
        _ = multi.student


class Record(TrainerCallback):
    def __init__(self, trainer: AttnDistillTrainer) -> None:
        self.trainer, self.after = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(states(self.trainer))


def poison_second_call(loss_fn: torch.nn.Module) -> None:
    """The loss of ``loss_fn`` turns NaN on its second call (the second step)."""
    original, calls = loss_fn.forward, []

    def forward(*args, **kwargs):
        calls.append(None)
        terms = original(*args, **kwargs)
        if len(calls) == 2:
            terms.loss = terms.loss * float("nan")
        return terms

    loss_fn.forward = forward


def test_a_nan_in_one_students_loss_leaves_the_other_students_update_unchanged(tmp_path: Path) -> None:
    runs = {}
    for poisoned in (False, True):
        trainer = AttnDistillTrainer(
            two_students(),
            tiny_teacher(),
            tiny_run_config(tmp_path / str(poisoned), max_steps=3),
            train_dataset=PixelDataset(),
        )
        if poisoned:
            poison_second_call(trainer.members["attn"].loss_fn)
        record = Record(trainer)
        trainer.add_callback(record)
        trainer.train()
        runs[poisoned] = (record.after, trainer)
    clean, (poisoned, trainer) = runs[False][0], runs[True]
    assert trainer.skips.nonfinite_by_student == {"both": 0, "attn": 1}
    for step in range(3):  # the healthy student trains exactly as without the NaN
        for key, value in clean[step]["both"].items():
            torch.testing.assert_close(poisoned[step]["both"][key], value, atol=0, rtol=0, msg=key)
    for key, value in poisoned[0]["attn"].items():  # no update at all for the poisoned student at step 2
        torch.testing.assert_close(poisoned[1]["attn"][key], value, atol=0, rtol=0, msg=key)
    assert any(not torch.equal(poisoned[2]["attn"][k], v) for k, v in poisoned[1]["attn"].items())  # then trains on


# Two DDP ranks (gloo), 4 images each, two students: the global batch of a one-process run at 8.
DDP_WORKER = """
import sys
import torch
from attndistill_hf.trainer import AttnDistillTrainer
from helpers import PixelDataset, tiny_run_config, tiny_teacher
from test_multi_student import two_students

args = tiny_run_config(sys.argv[1], per_device_train_batch_size=4, optim="sgd", learning_rate=0.05)
trainer = AttnDistillTrainer(two_students(), tiny_teacher(), args, train_dataset=PixelDataset())
trainer.train()
if args.process_index == 0:
    torch.save(trainer.model.state_dict(), f"{sys.argv[1]}/two.pt")
"""


@pytest.mark.slow
def test_two_students_under_ddp_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    run_two_processes(DDP_WORKER, tmp_path)
    args = tiny_run_config(tmp_path / "one", optim="sgd", learning_rate=0.05)
    trainer = AttnDistillTrainer(two_students(), tiny_teacher(), args, train_dataset=PixelDataset())
    trainer.train()
    one, two = trainer.model.state_dict(), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and any(key.startswith("members.attn.") for key in one)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-6, rtol=1e-5, msg=key)


# Trains two students for 4 steps with a checkpoint every 2; KILL_AT_STEP kills the process after that step.
KILL_WORKER = """
import os, signal, sys
from transformers import TrainerCallback
from attndistill_hf.trainer import AttnDistillTrainer
from helpers import PixelDataset, tiny_run_config, tiny_teacher
from test_multi_student import noisy_collate, two_students

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AT_STEP", "0")):
            os.kill(os.getpid(), signal.SIGKILL)

out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
args = tiny_run_config(out, max_steps=4, save_strategy="steps", save_steps=2, optim="sgd", learning_rate=0.05)
data = {"train_dataset": PixelDataset(), "data_collator": noisy_collate}
trainer = AttnDistillTrainer(two_students(), tiny_teacher(), args, **data)
trainer.add_callback(Kill())
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(out)
"""


@pytest.mark.slow
def test_kill_and_resume_in_the_middle_of_a_multi_student_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(KILL_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

    def run(out: Path, *extra: str, kill_at: int = 0) -> int:
        command = [sys.executable, str(script), str(out), *extra]
        return subprocess.run(command, env={**env, "KILL_AT_STEP": str(kill_at)}, timeout=300).returncode

    assert run(tmp_path / "straight") == 0
    assert run(tmp_path / "killed", kill_at=3) == -signal.SIGKILL
    last = get_last_checkpoint(str(tmp_path / "killed"))
    assert last == str(tmp_path / "killed" / "checkpoint-2")
    assert run(tmp_path / "killed", last) == 0
    for name in ("both", "attn"):
        straight = load_file(tmp_path / "straight" / name / "model.safetensors")
        resumed = load_file(tmp_path / "killed" / name / "model.safetensors")
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")


def test_bad_multi_student_settings_are_refused_with_their_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Student name 'a/b' must be letters"):
        AttnDistillTrainer({"a/b": tiny_student()}, tiny_teacher(), tiny_run_config(tmp_path))
    with pytest.raises(ValueError, match=r"max_grad_norm 1\.0 with several students"):
        AttnDistillTrainer(two_students(), tiny_teacher(), tiny_run_config(tmp_path, max_grad_norm=1.0))
    with pytest.raises(ValueError, match="both loss weights at 0"):
        AttnDistillTrainer(
            {"x": StudentSpec(tiny_student(), proj_loss_weight=0.0, attn_loss_weight=0.0)},
            tiny_teacher(),
            tiny_run_config(tmp_path),
        )


def test_recipe_students_start_as_they_would_alone_whatever_their_place_in_the_list(tmp_path: Path) -> None:
    """Each listed student is initialised from the run's seed alone, not after the students before it."""
    teacher = tiny_teacher()
    data_args = DataArguments(image_size=32)
    alone = load_students(
        DistillModelArguments(teacher_name_or_path="unused", student_preset="vit-mini-patch4"),
        data_args,
        teacher.config.model_type,
        3,
    )
    listed = load_students(
        DistillModelArguments(
            teacher_name_or_path="unused",
            students=[
                {"name": "first", "student_preset": "vit-mini-2heads-patch4", "proj_loss_weight": 0.0},
                {"name": "second", "student_preset": "vit-mini-patch4"},
            ],
        ),
        data_args,
        teacher.config.model_type,
        3,
    )
    second = listed["second"].model.state_dict()
    assert second.keys() == alone.state_dict().keys()
    for key, value in alone.state_dict().items():
        assert torch.equal(second[key], value), key


@pytest.mark.slow
def test_recipe_trains_a_students_list_and_publishes_each_student_in_its_folder(tmp_path: Path) -> None:
    tiny_teacher(tmp_path / "teacher")
    images = write_image_folder(tmp_path / "images", per_class=4)
    config = tmp_path / "run.yaml"
    config.write_text(
        "students:\n"
        "  - {name: both, student_preset: vit-mini-patch4}\n"
        "  - {name: attn, student_preset: vit-mini-2heads-patch4, proj_loss_weight: 0.0, hub_model_id: me/attn-only}\n"
    )
    out = tmp_path / "out"
    result = distill_command(
        [str(config), "--teacher_name_or_path", str(tmp_path / "teacher"), "--image_size", "32", "--use_cpu", "true"]
        + ["--train_dir", str(images), "--eval_dir", str(images), "--max_steps", "2", "--logging_steps", "1"]
        + ["--per_device_train_batch_size", "4", "--output_dir", str(out), "--report_to", "none"]
        + ["--knn_train_samples", "8", "--disable_tqdm", "true", "--knn_eval_steps", "1"]
    )
    assert set(result.students) == {"both", "attn"}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    monitored = {name: [e for e in history if f"{name}/eval_knn_top1" in e] for name in ("both", "attn")}
    for name, heads in (("both", 4), ("attn", 2)):
        folder = out / name
        student = AutoModel.from_pretrained(folder)
        assert student.config.num_attention_heads == heads
        assert {"README.md", "knn_results.json", "training_curves.png", "attention_maps.png"} <= {
            path.name for path in folder.iterdir()
        }
        assert result.students[name].knn is not None
        # Each student's own monitor, at every step; at the end it is the final evaluation of that student.
        assert [entry["step"] for entry in monitored[name]] == [1, 2]
        final = json.loads((folder / "knn_results.json").read_text())
        assert monitored[name][-1][f"{name}/eval_knn_top1"] == pytest.approx(final["knn"]["8"]["top1"])
    card = (out / "attn" / "README.md").read_text()
    assert "# me/attn-only" in card and "| Students in this run | 2 |" in card
    assert "# both" in (out / "both" / "README.md").read_text()
