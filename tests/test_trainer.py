"""AttnDistillTrainer: exact gradient accumulation, resume, export, NaN handling, weight decay groups."""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    Dinov2Config,
    Dinov2Model,
    TrainerCallback,
)

from attndistill_hf.attention import last_cls_attention
from attndistill_hf.checkpoints import CorruptCheckpointError
from attndistill_hf.cli import run_recipe
from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.data import EqualStepsIterable
from attndistill_hf.families import UnsupportedModelError
from attndistill_hf.skipping import NonFiniteLossError, UnreadableDataError
from attndistill_hf.students import check_pair
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import TINY_ENCODER, PixelDataset, tiny_run_config, tiny_student, tiny_teacher


def student_after(tmp_path: Path, **overrides) -> dict[str, torch.Tensor]:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, **overrides), train_dataset=PixelDataset()
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


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


def test_projector_reads_the_last_block_before_the_final_norm(tmp_path: Path) -> None:
    """The published student projects its last block's tokens; its final norm stays out of the loss, untrained."""
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, max_steps=3), train_dataset=PixelDataset()
    )
    student, loss_fn = trainer.model.student, trainer.model.loss_fn
    with torch.no_grad():  # a per-channel final norm: reading after it would change the projected token
        generator = torch.Generator().manual_seed(0)
        student.layernorm.weight.copy_(torch.rand(student.layernorm.weight.shape, generator=generator) + 0.5)
        student.layernorm.bias.copy_(torch.randn(student.layernorm.bias.shape, generator=generator))
    norm_before = {k: v.clone() for k, v in student.layernorm.state_dict().items()}
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        teacher_out, teacher_attn = last_cls_attention(trainer.teacher, pixels)
    teacher_cls = teacher_out.last_hidden_state[:, 0]
    loss_proj = trainer.model(pixel_values=pixels, teacher_cls=teacher_cls, teacher_attn=teacher_attn).loss_proj
    seen = []  # what enters the final norm: the last block's tokens
    handle = student.layernorm.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        student(pixel_values=pixels)
    handle.remove()
    blocks = seen[0]
    expected = ((loss_fn.projector(blocks[:, 0]) - teacher_cls) ** 2).mean()
    assert loss_proj.item() == pytest.approx(expected.item(), rel=1e-5)
    after_norm = ((loss_fn.projector(student.layernorm(blocks)[:, 0]) - teacher_cls) ** 2).mean()
    assert abs(after_norm.item() - expected.item()) > 1e-3  # the two readings are told apart
    assert not any(p.requires_grad for p in student.layernorm.parameters())
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    trained = student.state_dict()
    assert all(torch.equal(trained[f"layernorm.{k}"], v) for k, v in norm_before.items())
    assert max((trained[k] - v).abs().max().item() for k, v in start.items()) > 0  # the rest trained


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


def test_export_leaves_the_global_random_state_alone(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path), train_dataset=PixelDataset()
    )
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    trainer.save_model(str(tmp_path / "first"))
    assert torch.equal(torch.rand(4), expected)  # the export neither drew from nor reseeded the run's generator
    trainer.save_model(str(tmp_path / "second"))
    first, second = (AutoModel.from_pretrained(tmp_path / name).pooler.dense.weight for name in ("first", "second"))
    assert torch.equal(first, second)  # the added pooler is still the same on every export


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


def test_nonfinite_batch_is_skipped_and_stops_the_run_when_repeated(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_consecutive_nonfinite_steps=2),
        train_dataset=PixelDataset(),
    )
    trainer.create_optimizer()
    bad = {"pixel_values": torch.full((2, 3, 32, 32), float("nan"))}
    trainer._validated = True  # input validation happens on the first step; here the NaN must be survived
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(trainer.model, bad)
    assert loss.item() == 0.0 and trainer.skips.nonfinite_steps == 1
    # The whole update was skipped: no gradient reaches the optimizer (zeros would still move AdamW).
    assert all(p.grad is None for p in trainer.model.parameters())
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        trainer.training_step(trainer.model, bad)


class PoisonedWindow(PixelDataset):
    """Images whose reads number ``first``..``last`` (counting from 0) are NaN: one whole update at batch 8."""

    def __init__(self, first: int = 8, last: int = 15) -> None:
        super().__init__()
        self.reads, self.first, self.last = 0, first, last

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        if self.first <= self.reads <= self.last:
            item = {"pixel_values": torch.full_like(item["pixel_values"], float("nan"))}
        self.reads += 1
        return item


class RecordWeights(TrainerCallback):
    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def run_with_poisoned_second_update(
    tmp_path: Path, scaler: torch.amp.GradScaler | None = None, **overrides
) -> tuple[AttnDistillTrainer, RecordWeights]:
    record = RecordWeights()
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, **{"max_steps": 3, "max_grad_norm": 0.0, **overrides}),
        train_dataset=PoisonedWindow(),
        callbacks=[record],
    )
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # what Accelerate creates for fp16 on a GPU
    trainer.train()
    assert trainer.skips.nonfinite_steps == 1
    return trainer, record


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=0, rtol=0)


def test_an_update_with_only_nonfinite_batches_changes_nothing(tmp_path: Path) -> None:
    # AdamW with weight decay after a real first step: zero gradients alone would still move every weight.
    after = run_with_poisoned_second_update(tmp_path)[1].after_step
    assert_same(after[0], after[1])
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])  # training goes on


class UnreadableBatches:
    """A collator whose chosen calls (counting from 1) hold no readable image, as ImageCollator gives them."""

    def __init__(self, unreadable: Container[int]) -> None:
        self.calls, self.unreadable = 0, unreadable

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.calls += 1
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        if self.calls in self.unreadable:
            return {"pixel_values": pixel_values[:0], "skipped_images": torch.tensor(len(items))}
        return {"pixel_values": pixel_values, "skipped_images": torch.tensor(0)}


def test_a_batch_without_a_readable_image_is_skipped_and_a_run_without_any_stops(tmp_path: Path) -> None:
    record = RecordWeights()
    args = tiny_run_config(tmp_path, max_steps=3)
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        args,
        train_dataset=PixelDataset(),
        data_collator=UnreadableBatches({2}),
        callbacks=[record],
    )
    trainer.train()
    after = record.after_step
    assert_same(after[0], after[1])  # the second update had nothing to learn from
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])
    assert (trainer.skips.skipped_images, trainer.skips.nonfinite_steps) == (8, 0)

    def unreadable_run(**overrides: int) -> AttnDistillTrainer:
        return AttnDistillTrainer(
            tiny_student(),
            tiny_teacher(),
            tiny_run_config(tmp_path, **overrides),
            train_dataset=PixelDataset(),
            data_collator=UnreadableBatches(range(1, 100)),
        )

    with pytest.raises(UnreadableDataError, match=r"^3 batches in a row held no readable image \(24 unreadable images"):
        unreadable_run(max_steps=5, max_consecutive_nonfinite_steps=3).train()
    with pytest.raises(UnreadableDataError, match=r"^No training batch held a readable image: 16 unreadable images"):
        unreadable_run(max_steps=2).train()  # fewer batches than the limit in a row


def test_a_batch_transform_that_decodes_nothing_is_skipped_like_an_unreadable_batch(tmp_path: Path) -> None:
    """GPU decoding (a batch_transform) can find no readable image in a batch too: skipped, no crash."""
    record = RecordWeights()
    unreadable = UnreadableBatches({2})

    def decode(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unreadable([{"pixel_values": image} for image in batch["pixel_values"]])

    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        tiny_run_config(tmp_path, max_steps=3),
        train_dataset=PixelDataset(),
        batch_transform=decode,
        callbacks=[record],
    )
    trainer.train()
    after = record.after_step
    assert_same(after[0], after[1])  # the second update had nothing to learn from
    assert (trainer.skips.skipped_images, trainer.skips.nonfinite_steps) == (8, 0)


def test_fp16_grad_scaler_skips_the_poisoned_update_and_backs_off(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    after = run_with_poisoned_second_update(tmp_path, scaler)[1].after_step
    assert_same(after[0], after[1])
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])
    assert scaler.get_scale() == 2.0**9  # the skipped update counted as one overflow


def test_fp16_without_a_grad_scaler_is_refused_and_bf16_needs_none(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 needs a gradient scaler"):
        AttnDistillTrainer(
            tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, fp16=True), train_dataset=PixelDataset()
        )
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path, bf16=True), train_dataset=PixelDataset()
    )
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.scaler is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_scales_the_loss_and_skips_a_poisoned_update(tmp_path: Path) -> None:
    trainer, record = run_with_poisoned_second_update(tmp_path, use_cpu=False, fp16=True)
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert_same(record.after_step[0], record.after_step[1])
    assert any(not torch.equal(record.after_step[1][k], record.after_step[2][k]) for k in record.after_step[1])
    assert scaler.get_scale() < 2.0**16  # the poisoned update backed the default initial scale off


def test_first_step_validates_inputs(tmp_path: Path) -> None:
    trainer = AttnDistillTrainer(
        tiny_student(), tiny_teacher(), tiny_run_config(tmp_path), train_dataset=PixelDataset()
    )
    with pytest.raises(ValueError, match="NaN or inf"):
        trainer.compute_loss(trainer.model, {"pixel_values": torch.full((2, 3, 32, 32), float("nan"))})


def test_pair_checks_name_the_problem() -> None:
    with pytest.raises(ValueError, match="configured for 32 px but the data transform crops 48 px"):
        check_pair(tiny_teacher(), tiny_student(), 48)
    with pytest.raises(ValueError, match="teacher cannot take 30 px crops"):
        check_pair(tiny_teacher(), tiny_student(), 30)
    with pytest.raises(UnsupportedModelError, match="Unsupported teacher: Linear is not supported: it is not a ViT"):
        check_pair(torch.nn.Linear(2, 2), tiny_student(), 32)
    data2vec = Data2VecVisionModel(Data2VecVisionConfig(**TINY_ENCODER))
    with pytest.raises(UnsupportedModelError, match=r"Unsupported teacher: Data2VecVisionModel .* bypasses"):
        check_pair(data2vec, tiny_student(), 32)
    dinov2 = Dinov2Model(Dinov2Config(**TINY_ENCODER))
    with pytest.raises(UnsupportedModelError, match=r"Unsupported student: Dinov2Model; students are .* ViTModel"):
        check_pair(tiny_teacher(), dinov2, 32)


def test_pair_check_probes_a_model_once_per_grid_and_backend() -> None:
    """The teacher of several students, and a recipe's check before the trainer's, cost one probe forward."""
    teacher, forwards = tiny_teacher(), []
    teacher.register_forward_pre_hook(lambda *_: forwards.append(None))
    for _ in range(3):
        check_pair(teacher, tiny_student(), 32)
    assert len(forwards) == 1
    check_pair(teacher, tiny_student(image_size=48), 48)  # another grid: probed again
    assert len(forwards) == 2
    teacher.set_attn_implementation("eager")  # another backend: probed again
    check_pair(teacher, tiny_student(), 32)
    assert len(forwards) == 3


def test_pair_check_runs_the_capture_once_and_catches_what_structure_cannot() -> None:
    """A model whose last attention passes something the capture does not reproduce is refused up front."""
    check_pair(tiny_teacher(), tiny_student(), 32)  # a supported pair passes
    teacher = tiny_teacher()  # the same teacher, its last attention passing softcap to the kernel
    attention = teacher.layers[-1].attention
    original = attention.forward
    attention.forward = lambda hidden_states, *args, **kwargs: original(hidden_states, *args, softcap=30.0, **kwargs)
    with pytest.raises(UnsupportedModelError, match="Unsupported teacher: ViTAttention passes softcap"):
        check_pair(teacher, tiny_student(), 32)


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


FINAL_NORM = {"student.layernorm.weight", "student.layernorm.bias"}
# What the last block's CLS-attention row does not depend on: everything after its query/key projections.
LAST_BLOCK_AFTER_QK = {
    f"student.layers.1.{module}.{kind}"
    for module in ("attention.v_proj", "attention.o_proj", "layernorm_after", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
}


@pytest.mark.parametrize(
    ("proj_weight", "attn_weight"), [(1.0, 0.1), (1.0, 0.0), (0.0, 0.1)], ids=["both", "projector", "attention"]
)
def test_parameters_the_loss_cannot_reach_are_frozen(tmp_path: Path, proj_weight: float, attn_weight: float) -> None:
    args = tiny_run_config(
        tmp_path, proj_loss_weight=proj_weight, attn_loss_weight=attn_weight, optim="sgd", learning_rate=1.0
    )
    trainer = AttnDistillTrainer(tiny_student(), tiny_teacher(), args, train_dataset=PixelDataset())
    params = dict(trainer.model.named_parameters())
    expected = set(FINAL_NORM)  # neither term reads after the last block
    if not proj_weight:  # attention guidance alone reaches neither the projector nor the end of the last block
        expected |= LAST_BLOCK_AFTER_QK | {name for name in params if name.startswith("loss_fn.projector.")}
    assert {name for name, param in params.items() if not param.requires_grad} == expected
    optimised = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert optimised == {id(p) for name, p in params.items() if name not in expected}
    start = {name: param.detach().clone() for name, param in params.items()}
    trainer.train()
    for name, param in trainer.model.named_parameters():  # the frozen part keeps its initial values, the rest trains
        assert torch.equal(param, start[name]) == (name in expected), name
    trainer.save_model(str(tmp_path / "student"))  # the exported student is complete, frozen parts included
    exported = AutoModel.from_pretrained(tmp_path / "student").state_dict()
    for name, value in trainer.student.state_dict().items():
        assert torch.equal(exported[name], value), name


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
