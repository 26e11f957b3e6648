"""AttnDistillTrainer: exact gradient accumulation, resume, export, weight decay groups, staged checkpoints,
the data's crop size, warm-up epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    TrainerCallback,
)

from attndistill_hf.checkpoints import CorruptCheckpointError
from attndistill_hf.cli import run_recipe
from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.data import EqualStepsIterable
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import PixelDataset, tiny_run_config, tiny_student, tiny_teacher


def student_after(tmp_path: Path, **overrides) -> dict[str, torch.Tensor]:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, **overrides), train_dataset=PixelDataset()
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    # SGD: the update is proportional to the gradient, so equal updates mean equal gradients (Adam's
    # first step is ~lr * sign(g) and would hide a wrong scale).
    large = student_after(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, optim="sgd")
    accumulated = student_after(
        tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4, optim="sgd"
    )
    initial = tiny_student().state_dict()
    moved = max((large[k] - initial[k]).abs().max().item() for k in large)
    assert moved > 1e-4  # training changed the weights...
    for name, value in large.items():  # ...and both runs changed them identically
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = student_after(tmp_path / "straight", max_steps=4)
    first = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=PixelDataset(),
        callbacks=[StopAt(2)],  # "interrupted" after two steps, with the schedule of a 4-step run
    )
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    second = AttnDistillTrainer(
        tiny_student(seed=99),  # different init: everything must come from the checkpoint
        tiny_teacher(),
        tiny_run_config(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=PixelDataset(),
    )
    second.train(resume_from_checkpoint=str(checkpoint))
    resumed = second.student.state_dict()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_logged_terms_and_export(tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_steps=3),
        train_dataset=PixelDataset(),
        image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss_proj"] > 0 and entry["loss_attn"] > 0
        assert entry["loss"] == pytest.approx(entry["loss_proj"] + 0.1 * entry["loss_attn"], rel=1e-3)
    out = tmp_path / "student"
    trainer.save_model(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    reloaded = AutoModel.from_pretrained(out)
    assert type(reloaded).__name__ == "ViTModel"
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 32, "width": 32}
    pixels = torch.randn(2, 3, 32, 32)
    trainer.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=pixels).last_hidden_state, trainer.student(pixel_values=pixels).last_hidden_state
        )
    assert not any("projector" in k for k in reloaded.state_dict())


def test_weight_decay_exempts_biases_and_1d_parameters(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path), train_dataset=PixelDataset()
    )
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    params = dict(trainer.model.named_parameters())
    assert "loss_fn.projector.layers.1.weight" in decayed  # the projector trains (and decays) too
    assert all(params[name].ndim > 1 for name in decayed)
    assert {n for n, p in params.items() if p.ndim > 1} == decayed
    optimizer = trainer.create_optimizer()
    decays = {g["weight_decay"] for g in optimizer.param_groups if g["params"]}
    assert decays == {0.05, 0.0}


def test_teacher_is_frozen_and_not_wrapped(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path), train_dataset=PixelDataset()
    )
    assert not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert not any(p is q for p in trainer.teacher.parameters() for q in trainer.model.parameters())


def test_first_step_validates_inputs(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path), train_dataset=PixelDataset()
    )
    with pytest.raises(ValueError, match="NaN or inf"):
        trainer.compute_loss(trainer.model, {"pixel_values": torch.full((2, 3, 32, 32), float("nan"))})


def test_batch_transform_runs_in_the_training_process(tmp_path: Path) -> None:
    seen: list[tuple[int, ...]] = []

    def halve(batch: dict) -> dict:
        seen.append(tuple(batch["pixel_values"].shape))
        return {"pixel_values": batch["pixel_values"][:4], "skipped_images": torch.tensor(3)}

    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_steps=2),
        train_dataset=PixelDataset(),
        batch_transform=halve,
    )
    trainer.train()
    assert seen == [(8, 3, 32, 32), (8, 3, 32, 32)]
    assert trainer.skips.skipped_images == 6


def test_checkpoints_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    args = tiny_run_config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-6"]  # rotation kept the newest two complete ones
    assert not (tmp_path / AttnDistillTrainer.STAGING_DIR).exists()  # nothing staged is left, not even the folder

    # A crash while writing checkpoint-8 (here: the RNG state write fails) leaves checkpoint-6 the last.
    resumed = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=2),
        train_dataset=PixelDataset(),
    )

    def crash(_output_dir: str) -> None:
        raise OSError("disk full")

    resumed._save_rng_state = crash
    with pytest.raises(OSError, match="disk full"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")
    assert (tmp_path / "checkpoint-6" / "optimizer.pt").is_file()


@pytest.mark.parametrize("broken", ["optimizer.pt", "model.safetensors"])
def test_a_corrupt_checkpoint_is_named_with_the_newest_complete_one(
    tmp_path: Path, broken: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def trainer(max_steps: int) -> AttnDistillTrainer:
        args = tiny_run_config(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1)
        return AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())

    def truncate(path: Path) -> None:  # a copy or a disk that gave out half-way
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    trainer(3).train()
    truncate(tmp_path / "checkpoint-3" / broken)
    truncate(tmp_path / "checkpoint-2" / "rng_state.pth")  # so checkpoint-1 is the newest complete one
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"^Cannot resume from {tmp_path}/checkpoint-3: {broken} is incomplete or corrupt \(.+\); resume from "
        rf"{tmp_path}/checkpoint-1 instead, the newest complete checkpoint before it\.$",
    ):
        trainer(4).train(resume_from_checkpoint=True)
    truncate(tmp_path / "checkpoint-1" / "trainer_state.json")
    # A recipe reports it as a mistake in its input: one line, exit status 2, no traceback.
    monkeypatch.delenv("ATTNDISTILL_FULL_ERROR", raising=False)
    capsys.readouterr()  # only what the recipe writes from here on
    with pytest.raises(SystemExit) as stopped:
        run_recipe(lambda: trainer(4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2")))
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith(f"error: Cannot resume from {tmp_path}/checkpoint-2: rng_state.pth is incomplete")
    assert errors[0].endswith("holds no complete checkpoint before it: start the run afresh.")


def test_trainer_checks_the_data_crop_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="configured for 32 px but the data transform crops 48 px"):
        AttnDistillTrainer(
            tiny_student(), tiny_teacher(), tiny_run_config(tmp_path), train_dataset=PixelDataset(), image_size=48
        )


class RandomStream(torch.utils.data.IterableDataset):
    """Images drawn from the loading process's RNG, like random augmentations in DataLoader workers."""

    def __iter__(self):
        for _ in range(8):
            yield {"pixel_values": torch.rand(3, 32, 32)}


def first_stream_batch(tmp_path: Path, rank: int, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setattr(AttnDistillConfig, "process_index", property(lambda self: rank))
    args = tiny_run_config(tmp_path, per_device_train_batch_size=4, dataloader_num_workers=1)
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), args, train_dataset=EqualStepsIterable(RandomStream(), 2, 4)
    )
    torch.manual_seed(0)  # every rank's main process is seeded alike
    return next(iter(trainer.get_train_dataloader()))["pixel_values"]


def test_stream_workers_draw_different_augmentations_on_each_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rank0 = first_stream_batch(tmp_path, 0, monkeypatch)
    torch.testing.assert_close(first_stream_batch(tmp_path, 0, monkeypatch), rank0)  # reproducible per rank
    assert not torch.allclose(first_stream_batch(tmp_path, 1, monkeypatch), rank0)


def test_warmup_epochs_become_warmup_steps_of_the_schedule(tmp_path: Path) -> None:
    # 32 images, batches of 8, accumulation 2: 2 updates per epoch, so 1.5 warm-up epochs are 3 steps.
    args = tiny_run_config(
        tmp_path, max_steps=6, warmup_epochs=1.5, gradient_accumulation_steps=2, lr_scheduler_type="linear"
    )
    trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset(count=32))
    assert trainer.args.warmup_steps == 3
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # The rate each step used: linear warm-up from 0 to 1e-3 over 3 steps, then linear decay towards 0 at step 6.
    assert rates == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 2e-3 / 3, 1e-3 / 3])
