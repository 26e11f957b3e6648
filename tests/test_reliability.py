"""Faults lose nothing: SIGKILL mid-step and mid-checkpoint-write, then resume; secrets stay secret."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from attndistill_hf.cli import recipe_text
from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import PixelDataset, run_two_processes, tiny_run_config, tiny_student, tiny_teacher, write_image_folder

ROOT = Path(__file__).resolve().parents[1]

# Runs recipes/distill.py in-process and kills itself with SIGKILL at a chosen point:
#   KILL_AT=step:N        right after optimizer step N (the step's update is not checkpointed yet)
#   KILL_AT=checkpoint:N  in the middle of writing checkpoint-N (model and optimizer written, RNG not)
DRIVER = """
import os, runpy, signal, sys
import attndistill_hf.trainer as trainer_module
from transformers import TrainerCallback

kind, step = os.environ.get("KILL_AT", "none:0").split(":")
step = int(step)
Trainer = trainer_module.AttnDistillTrainer

if kind == "step":
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
    original_init = Trainer.__init__
    def init(self, *a, **k):
        original_init(self, *a, **k)
        self.add_callback(Kill())
    Trainer.__init__ = init
elif kind == "checkpoint":
    original_rng = Trainer._save_rng_state
    def save_rng(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_rng(self, output_dir)
    Trainer._save_rng_state = save_rng

sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def distill(tmp_path: Path, out: Path, extra: list[str], kill_at: str = "none:0") -> int:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KILL_AT": kill_at}
    args = ["--teacher_name_or_path", str(tmp_path / "teacher"), "--student_preset", "vit-tiny-patch16"]
    args += ["--image_size", "32", "--patch_size", "8", "--use_cpu", "true", "--train_dir", str(tmp_path / "images")]
    args += ["--train_augmentation", "none", "--per_device_train_batch_size", "4", "--max_steps", "6"]
    args += ["--save_steps", "2", "--optim", "sgd", "--learning_rate", "0.05", "--output_dir", str(out)]
    args += ["--final_knn_eval", "false", "--model_card", "false", "--dataloader_num_workers", "0", *extra]
    command = [sys.executable, str(driver), str(ROOT / "recipes" / "distill.py"), *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=600).returncode


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    tiny_teacher(tmp_path / "teacher")
    write_image_folder(tmp_path / "images", per_class=4)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["step:3", "checkpoint:4"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(setup: Path, kill_at: str) -> None:
    tmp_path = setup
    assert distill(tmp_path, tmp_path / "straight", []) == 0
    interrupted = tmp_path / "interrupted"
    assert distill(tmp_path, interrupted, [], kill_at=kill_at) == -signal.SIGKILL
    last = get_last_checkpoint(str(interrupted))
    assert last == str(interrupted / "checkpoint-2")  # never the half-written checkpoint-4
    assert distill(tmp_path, interrupted, ["--resume_from_checkpoint", last]) == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5)


def test_hub_token_is_never_written_to_disk(tmp_path: Path) -> None:
    token = "hf_" + "x" * 30
    args = tiny_run_config(
        tmp_path,
        per_device_train_batch_size=4,
        learning_rate=None,
        seed=42,
        logging_steps=500,
        save_strategy="steps",
        save_steps=2,
        hub_token=token,
    )
    trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written)
    for path in written:
        assert token.encode() not in path.read_bytes(), path
    assert trainer.args.hub_token == token  # still usable in memory for the push


def test_recipe_text_redacts_tokens(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\nhub_token: in-the-file\n")
    argv = [str(config), "--hub_token", "s3cret", "--max_steps", "4", "--hub_token=0ther", "--api_token", "x1"]
    text = recipe_text([*argv, "--num_prefix_tokens", "1", "--hub_token"])
    for secret in ("in-the-file", "s3cret", "0ther", "x1"):
        assert secret not in text
    assert text.startswith("max_steps: 3\nhub_token: <redacted>\n")
    assert "--hub_token <redacted> --max_steps 4 --hub_token=<redacted>" in text
    assert "--num_prefix_tokens 1 --hub_token\n" in text  # look-alike flags and a flag without value stay


def test_no_code_path_enables_remote_code() -> None:
    """trust_remote_code is only ever forwarded from a user's flag (a name or attribute), never set by the project
    to a value of its own, as a keyword or as a key of a dict of keyword arguments."""
    offenders = []
    folders = ("attndistill_hf", "recipes", "bench")
    sources = [path for folder in folders for path in ROOT.joinpath(folder).rglob("*.py")]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                values = [node.value]
            elif isinstance(node, ast.Dict):
                values = [
                    value
                    for key, value in zip(node.keys, node.values, strict=True)
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code"
                ]
            else:
                continue
            offenders += [
                f"{path.name}:{value.lineno}" for value in values if not isinstance(value, ast.Name | ast.Attribute)
            ]
    assert offenders == []


def test_unreadable_teacher_is_named(tmp_path: Path) -> None:
    from attndistill_hf.models import TeacherLoadError, load_teacher

    tiny_teacher(tmp_path / "teacher")
    weights = tmp_path / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # truncated download
    with pytest.raises(TeacherLoadError, match=r"(?s)Cannot load the teacher '.*teacher'.*convert_teacher"):
        load_teacher(str(tmp_path / "teacher"))


# Two DDP ranks (gloo): at update 2 only rank 0's batch is NaN, at update 3 both ranks' batches are; at
# update 4 only rank 1's batch has no readable image, at update 5 neither rank's has.
NONFINITE_WORKER = """
import sys
import torch
from transformers import TrainerCallback
from attndistill_hf.trainer import AttnDistillTrainer
from helpers import PixelDataset, tiny_run_config, tiny_student, tiny_teacher

class Poisoned(PixelDataset):
    def __init__(self, rank):
        super().__init__()
        self.reads, self.rank = 0, rank
    def __getitem__(self, index):
        item = super().__getitem__(index)
        update = self.reads // 4 + 1  # 4 images per rank and update
        self.reads += 1
        if update == 3 or (update == 2 and self.rank == 0):
            item = {"pixel_values": torch.full_like(item["pixel_values"], float("nan"))}
        if update == 5 or (update == 4 and self.rank == 1):
            item = {**item, "unreadable": True}
        return item

def collate(items):  # as ImageCollator does: images that fail to decode are left out and counted
    kept = [item["pixel_values"] for item in items if "unreadable" not in item]
    pixel_values = torch.stack(kept) if kept else torch.empty(0, 3, 32, 32)
    return {"pixel_values": pixel_values, "skipped_images": torch.tensor(len(items) - len(kept))}

class Record(TrainerCallback):
    def __init__(self):
        self.after = []
    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append({k: v.detach().clone() for k, v in model.state_dict().items()})

args = tiny_run_config(sys.argv[1], per_device_train_batch_size=4, max_steps=5, logging_steps=500, max_grad_norm=0.0)
record = Record()
trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=Poisoned(args.process_index),
                             data_collator=collate, callbacks=[record])
trainer.train()
result = {"after": record.after, "nonfinite": trainer.skips.nonfinite_steps, "unreadable": trainer.skips.skipped_images}
torch.save(result, f"{sys.argv[1]}/rank{args.process_index}.pt")
"""


@pytest.mark.slow
def test_nonfinite_and_unreadable_skips_agree_across_ranks(tmp_path: Path) -> None:
    """One rank's NaN (or unreadable) batch still lets the update happen on both ranks; on every rank, it is skipped."""
    run_two_processes(NONFINITE_WORKER, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["nonfinite"] for r in ranks] == [2, 1]
    assert [r["unreadable"] for r in ranks] == [4, 8]
    for step in range(5):  # the ranks never diverge
        for name, value in ranks[0]["after"][step].items():
            torch.testing.assert_close(ranks[1]["after"][step][name], value, atol=0, rtol=0)
    after = ranks[0]["after"]
    for counted, skipped in ((1, 2), (3, 4)):
        assert any(not torch.equal(after[counted - 1][k], after[counted][k]) for k in after[0])  # one rank's batch
        for name, value in after[counted].items():  # nothing left to learn from: no update at all
            torch.testing.assert_close(after[skipped][name], value, atol=0, rtol=0)


LOSS_SETTINGS = {"both": (1.0, 0.1), "projector": (1.0, 0.0), "attention": (0.0, 0.1)}

# Two DDP ranks (gloo), 4 images each, for every loss setting: the global batch of a one-process run at 8.
LOSS_SETTINGS_WORKER = """
import sys
import torch
from attndistill_hf.trainer import AttnDistillTrainer
from helpers import PixelDataset, tiny_student, tiny_teacher
from test_reliability import LOSS_SETTINGS, loss_setting_config

for name, weights in LOSS_SETTINGS.items():
    args = loss_setting_config(f"{sys.argv[1]}/{name}", weights, per_device_train_batch_size=4)
    trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())
    trainer.train()
    if args.process_index == 0:
        torch.save(trainer.model.state_dict(), f"{sys.argv[1]}/{name}.pt")
"""


def loss_setting_config(output_dir: str, weights: tuple[float, float], **overrides: int) -> AttnDistillConfig:
    # SGD: equal weights after the run mean equal averaged gradients at every step.
    return tiny_run_config(
        output_dir,
        proj_loss_weight=weights[0],
        attn_loss_weight=weights[1],
        optim="sgd",
        learning_rate=0.05,
        logging_steps=500,
        **overrides,
    )


@pytest.mark.slow
def test_every_loss_setting_trains_under_ddp_as_one_process(tmp_path: Path) -> None:
    """Attention-only, projector-only and both: 2 ranks x 4 images give the weights of 1 process x 8."""
    run_two_processes(LOSS_SETTINGS_WORKER, tmp_path)
    initial = tiny_student().state_dict()
    for name, weights in LOSS_SETTINGS.items():
        args = loss_setting_config(str(tmp_path / f"one-{name}"), weights, per_device_train_batch_size=8)
        trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())
        trainer.train()
        one, two = trainer.model.state_dict(), torch.load(tmp_path / f"{name}.pt")
        assert one.keys() == two.keys()
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        moved = max((one[f"student.{k}"] - v).abs().max().item() for k, v in initial.items())
        assert moved > 1e-4, name  # the student trained
