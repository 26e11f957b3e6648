"""The students: what the projector reads, the pair check, frozen parameters, export, names and specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    Dinov2Config,
    Dinov2Model,
)

from attndistill_hf.attention import last_cls_attention
from attndistill_hf.families import UnsupportedModelError
from attndistill_hf.students import StudentSpec, check_pair, check_student_name, student_specs
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import (
    TINY_ENCODER,
    PixelDataset,
    argv_without_a_teacher,
    distill_refusal,
    tiny_run_config,
    tiny_student,
    tiny_teacher,
)

FINAL_NORM = {"student.layernorm.weight", "student.layernorm.bias"}


# What the last block's CLS-attention row does not depend on: everything after its query/key projections.
LAST_BLOCK_AFTER_QK = {
    f"student.layers.1.{module}.{kind}"
    for module in ("attention.v_proj", "attention.o_proj", "layernorm_after", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
}


@pytest.mark.parametrize("name", ["checkpoint-2", "checkpoint-9", "Checkpoint-3", "checkpoint", "runs"])
def test_a_student_named_like_what_a_run_writes_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    status, error = distill_refusal(
        [*argv_without_a_teacher(tmp_path), "--students", f'{{"name": "{name}"}}', '{"name": "b"}'], capsys
    )
    assert status == 2
    assert error == (
        f"error: --students: Student name {name!r} is taken by what a run writes in its output folder "
        "(checkpoint-N checkpoints, runs/ logs): choose another name."
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is taken by what a run writes"):
        student_specs({name: tiny_student(), "b": tiny_student()})


def test_ordinary_student_names_are_accepted() -> None:
    for name in ("a", "proj-only", "checkpointed_b", "run", "s1"):
        check_student_name(name)
    with pytest.raises(ValueError, match="must be letters, digits"):
        check_student_name("../a")


def test_a_student_spec_refuses_settings_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"^StudentSpec\.attn_loss_weight must be a finite number >= 0, got nan\.$"):
        StudentSpec(tiny_student(), attn_loss_weight=float("nan"))
    with pytest.raises(ValueError, match=r"^StudentSpec\.projector_hidden_dims must be a positive integer"):
        StudentSpec(tiny_student(), projector_hidden_dims=[8, -1])
    with pytest.raises(ValueError, match="Unknown projector loss 'l1'"):
        StudentSpec(tiny_student(), projector_loss="l1")
    assert StudentSpec(tiny_student(), attn_loss_weight=0.0).attn_loss_weight == 0.0


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
