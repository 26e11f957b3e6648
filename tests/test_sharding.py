"""A sharded teacher (``--teacher_sharding fsdp``) trains the students of a replicated one, holding half of it.

Two processes (torchrun, gloo on the CPU) train the same students with the teacher replicated and sharded,
in float32 and bfloat16, with one and two students, and resume a sharded run from a mid-epoch checkpoint;
the same sharded run on two simulated nodes (one process each) must give the same student. The recipe
runs a sharded teacher to its model card while one process meets a batch with no readable image, and
refuses what it cannot run before any data loads.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_multi_student import two_students
from transformers import TrainerCallback, ViTConfig, ViTImageProcessor, ViTModel

from attndistill_hf.cli import parse_config_and_flags, run_recipe
from attndistill_hf.data import DataArguments, ImageCollator, load_split, train_transform
from attndistill_hf.families import family_of, model_class_name
from attndistill_hf.pipeline import DISTILL_ARGUMENTS, run_distillation
from attndistill_hf.sharding import describe_teacher, parameter_bytes
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import (
    PixelDataset,
    distill_command,
    distill_refusal,
    run_torchrun,
    run_two_nodes,
    tiny_run_config,
    tiny_student,
    write_image_folder,
)

# The runs compared, by name: (teacher_dtype, students).
RUNS = {"float32": ("float32", "one"), "bfloat16": ("bfloat16", "one"), "two_students": ("float32", "two")}
SHARDINGS = ("none", "fsdp")


def wide_teacher(path: Path | None = None) -> ViTModel:
    """A random ViT teacher of 4 blocks, 64 wide, patch 8 on 32 px crops (213,568 parameters).

    FSDP2 splits every weight on its first dimension. Split over two processes, the CLS token and the
    position embeddings, whose first dimension is 1, stay whole on the first one (1,152 parameters): it
    holds 50.3 % of the teacher, the second 49.7 %.
    """
    torch.manual_seed(123)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    model = ViTModel(config, add_pooling_layer=False)
    if path is not None:
        model.save_pretrained(path)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return model


def students_of(kind: str) -> Any:
    """``"one"``: a student; ``"two"``: projector + attention beside attention alone."""
    return tiny_student(0) if kind == "one" else two_students()


def student_states(trainer: AttnDistillTrainer) -> dict[str | None, dict[str, torch.Tensor]]:
    return {
        name: {key: value.detach().clone() for key, value in student.state_dict().items()}
        for name, student in trainer.students.items()
    }


def teacher_facts(trainer: AttnDistillTrainer) -> dict[str, Any]:
    """What this process holds of the teacher, and what the library calls it."""
    held = parameter_bytes(trainer.teacher)
    return {
        "local": held.local,
        "total": held.total,
        "class": type(trainer.teacher).__name__,
        "model_class_name": model_class_name(trainer.teacher),
        "family": family_of(trainer.teacher).model_class,
        "dtypes": {str(parameter.dtype) for parameter in trainer.teacher.parameters()},
        "described": describe_teacher(trainer.teacher, trainer.accelerator.num_processes),
    }


def run(name: str, sharding: str, out: Path) -> dict[str, Any]:
    """3 steps of 4 fixed images per process (AdamW at 1e-3) with the teacher ``sharding``: the students
    after them and what this process held of the teacher."""
    dtype, students = RUNS[name]
    overrides = {"teacher_dtype": dtype, "teacher_sharding": sharding}
    args = tiny_run_config(out / f"{name}-{sharding}", per_device_train_batch_size=4, max_steps=3, **overrides)
    trainer = AttnDistillTrainer(students_of(students), wide_teacher(), args, train_dataset=PixelDataset())
    facts = teacher_facts(trainer)
    trainer.train()
    return {"students": student_states(trainer), "teacher": facts}


# ----------------------------------------------------------------------------------------------
# Resume: a sharded run stopped right after a mid-epoch checkpoint, resumed by a fresh trainer
# ----------------------------------------------------------------------------------------------

# 12 images, a global batch of 4: 3 steps per epoch; checkpoint-4 is one step into the second epoch.
RESUME_STEPS, CHECKPOINT_AT = 6, 4


class Interrupted(Exception):
    """Stands for the run being killed: raised right after a checkpoint is written."""


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == CHECKPOINT_AT:
            raise Interrupted


class CountSteps(TrainerCallback):
    """The optimizer steps this trainer ran (a resumed run starts at the checkpoint's step)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def resumable_run(data: Path, out: Path, *, stop: bool = False, resume: str | None = None) -> AttnDistillTrainer:
    """A sharded run on the image folder ``data`` with the published augmentation (random crops and flips
    drawn from the seed, the epoch and the image), as ``distill.py`` builds it."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoints = {"save_strategy": "steps", "save_steps": CHECKPOINT_AT}
    batch = 4 // processes
    args = tiny_run_config(
        out, per_device_train_batch_size=batch, max_steps=RESUME_STEPS, teacher_sharding="fsdp", **checkpoints
    )
    data_args = DataArguments(train_dir=str(data), image_size=32, cache_dir=str(data.parent / f"{data.name}-cache"))
    trainer = AttnDistillTrainer(
        tiny_student(),
        wide_teacher(),
        args,
        train_dataset=load_split(data_args, "train", seed=args.seed),
        data_collator=ImageCollator(train_transform(32), fill_skipped=True),
        callbacks=[CountSteps(), *([StopAfterSave()] if stop else [])],
    )
    with contextlib.suppress(Interrupted):
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def steps_run(trainer: AttnDistillTrainer) -> int:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, CountSteps)).steps


def straight_and_resumed(data: Path, root: Path) -> dict[str, Any]:
    """The student of an uninterrupted sharded run on the images in ``data``, of the run stopped right after
    its mid-epoch checkpoint, and of that run resumed by a fresh trainer; runs in ``root``."""
    straight = resumable_run(data, root / "straight")
    interrupted = resumable_run(data, root / "interrupted", stop=True)
    checkpoint = root / "interrupted" / f"checkpoint-{CHECKPOINT_AT}"
    resumed = resumable_run(data, root / "interrupted", resume=str(checkpoint))
    return {
        "steps": (straight.state.global_step, interrupted.state.global_step, resumed.state.global_step),
        "steps_run": tuple(steps_run(trainer) for trainer in (straight, interrupted, resumed)),
        "sharded": resumed.teacher_is_sharded,
        "straight": student_states(straight)[None],
        "at_checkpoint": student_states(interrupted)[None],
        "resumed": student_states(resumed)[None],
    }


# ----------------------------------------------------------------------------------------------
# The recipe: a sharded teacher to the model card, with an unreadable image on one process
# ----------------------------------------------------------------------------------------------


def recipe_argv(root: Path) -> list[str]:
    """distill.py's flags for a sharded bfloat16 teacher, with the published augmentation and an evaluation
    folder (the final k-NN, the attention figure, the model card). Each process takes 1 image per step: the
    one unreadable file of the 7 leaves one process's batch empty at a step at which the other's is not."""
    return [
        *("--teacher_name_or_path", str(root / "teacher"), "--student_preset", "vit-mini-patch8"),
        *("--teacher_sharding", "fsdp", "--teacher_dtype", "bfloat16", "--image_size", "32", "--use_cpu", "true"),
        *("--train_dir", str(root / "images"), "--eval_dir", str(root / "eval"), "--output_dir", str(root / "out")),
        *("--per_device_train_batch_size", "1", "--num_train_epochs", "1", "--logging_steps", "1"),
        *("--knn_train_samples", "6", "--attention_figure_images", "2", "--report_to", "none"),
        *("--disable_tqdm", "true", "--dataloader_num_workers", "0"),
    ]


def write_recipe_inputs(root: Path) -> None:
    wide_teacher(root / "teacher")
    write_image_folder(root / "images", per_class=2, corrupt=True)  # 6 images and 1 unreadable file
    write_image_folder(root / "eval", per_class=2)


def recipe_run(root: Path) -> dict[str, Any]:
    """The recipe on ``root``'s inputs: the steps at which this process skipped its batch as unreadable,
    and the k-NN results of the students this process published."""
    skipped_at: list[int] = []
    original = AttnDistillTrainer._skip_unreadable_batch

    def spy(self: AttnDistillTrainer, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        skipped_at.append(self.state.global_step)
        return original(self, model, inputs)

    AttnDistillTrainer._skip_unreadable_batch = spy
    try:
        result = distill_command(recipe_argv(root))
    finally:
        AttnDistillTrainer._skip_unreadable_batch = original
    return {"skipped_at": skipped_at, "knn": {name: student.knn for name, student in result.students.items()}}


# ----------------------------------------------------------------------------------------------
# The two-process runs
# ----------------------------------------------------------------------------------------------

# Every process runs the cases named above this text and saves its results as rank<R>.pt.
WORKER = """
import os
import sys
from pathlib import Path
import torch
from helpers import write_image_folder
from test_sharding import recipe_run, run, straight_and_resumed

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
results = {(name, sharding): run(name, sharding, out) for name, sharding in RUN_CASES}
if WITH_RESUME:  # the same images, written by each process for itself; one output folder
    data = write_image_folder(out / f"images-rank{rank}", per_class=4, classes=3)
    results["resume"] = straight_and_resumed(data, out / "resume")
if WITH_RECIPE:
    results["recipe"] = recipe_run(out / "recipe")
torch.save(results, out / f"rank{rank}.pt")
"""


def worker(cases: list[tuple[str, str]], *, resume: bool = False, recipe: bool = False) -> str:
    return f"RUN_CASES = {cases!r}\nWITH_RESUME = {resume!r}\nWITH_RECIPE = {recipe!r}\n" + WORKER


def results_of(folder: Path) -> list[dict[Any, Any]]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[Any, Any]]]:
    """One launch of 2 processes (each launch costs seconds): every run of RUNS with the teacher replicated and
    sharded, the resumed sharded run and the recipe run; the folder and each process's results."""
    folder = tmp_path_factory.mktemp("two_processes")
    write_recipe_inputs(folder / "recipe")
    cases = [(name, sharding) for name in RUNS for sharding in SHARDINGS]
    # run_torchrun kills the workers of a launch that hangs (a process left out of the teacher's gathers).
    run_torchrun(worker(cases, resume=True, recipe=True), folder, [["--standalone", "--nproc_per_node", "2"]], 240)
    return folder, results_of(folder)


@pytest.fixture
def ranks(launch: tuple[Path, list[dict[Any, Any]]]) -> list[dict[Any, Any]]:
    """Each process's results of the two-process launch."""
    return launch[1]


def assert_same_students(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, state in expected.items():
        assert got[name].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got[name][key], value, atol=atol, rtol=0, msg=f"{name}: {key}")


def assert_trained(states: dict[str | None, dict[str, torch.Tensor]], kind: str) -> None:
    """Each student moved from its initial weights: the comparisons are not between untouched students."""
    students = students_of(kind)
    initial = {name: spec.model for name, spec in students.items()} if kind == "two" else {None: students}
    for name, model in initial.items():
        moved = max((states[name][key] - value).abs().max().item() for key, value in model.state_dict().items())
        assert moved > 1e-4, name


def assert_half_on_each(facts: list[dict[str, Any]], dtype: torch.dtype) -> None:
    """Each process holds about half of the teacher's parameter bytes, and the two halves make it whole."""
    total = sum(parameter.numel() for parameter in wide_teacher().parameters()) * dtype.itemsize
    assert [f["total"] for f in facts] == [total, total]
    assert sum(f["local"] for f in facts) == total
    for f in facts:
        assert 0 < f["local"] <= total * (1 / 2 + 0.05), (f["local"], total)
        assert f["dtypes"] == {str(dtype)}
        assert "sharded over 2 processes" in f["described"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_a_sharded_teacher_trains_the_student_of_a_replicated_one_and_each_process_holds_half(
    ranks: list[dict[Any, Any]], name: str
) -> None:
    for results in ranks:  # the students are the same on both processes (DDP)
        replicated, sharded = results[(name, "none")], results[(name, "fsdp")]
        assert_same_students(sharded["students"], replicated["students"], atol=1e-5)
        assert replicated["teacher"]["local"] == replicated["teacher"]["total"]  # a whole copy on each
        assert replicated["teacher"]["dtypes"] == {f"torch.{name}"}
    assert_trained(ranks[0][(name, "fsdp")]["students"], "one")
    assert_half_on_each([results[(name, "fsdp")]["teacher"] for results in ranks], getattr(torch, name))


@pytest.mark.slow
def test_two_students_of_a_sharded_teacher_equal_those_of_a_replicated_one(ranks: list[dict[Any, Any]]) -> None:
    for results in ranks:
        replicated, sharded = results[("two_students", "none")], results[("two_students", "fsdp")]
        assert set(sharded["students"]) == {"both", "attn"}
        assert_same_students(sharded["students"], replicated["students"], atol=1e-5)
    assert_trained(ranks[0][("two_students", "fsdp")]["students"], "two")
    assert_half_on_each([results[("two_students", "fsdp")]["teacher"] for results in ranks], torch.float32)


@pytest.mark.slow
def test_a_sharded_teacher_is_still_known_by_its_own_class(ranks: list[dict[Any, Any]]) -> None:
    for results in ranks:
        facts = results[("float32", "fsdp")]["teacher"]
        assert facts["class"] == "FSDPViTModel"  # fully_shard swapped in its subclass
        assert facts["model_class_name"] == facts["family"] == "ViTModel"
        assert facts["described"].startswith("Teacher ViTModel: 0.2 M parameters in float32, sharded over 2")
        assert results[("float32", "none")]["teacher"]["class"] == "ViTModel"


@pytest.mark.slow
def test_a_sharded_run_resumed_mid_epoch_by_a_fresh_trainer_equals_the_uninterrupted_run(
    ranks: list[dict[Any, Any]],
) -> None:
    for results in ranks:
        resume = results["resume"]
        assert resume["steps"] == (RESUME_STEPS, CHECKPOINT_AT, RESUME_STEPS) and resume["sharded"]
        # The fresh trainer ran the steps after the checkpoint alone, not the whole run again.
        assert resume["steps_run"] == (RESUME_STEPS, CHECKPOINT_AT, RESUME_STEPS - CHECKPOINT_AT)
        straight, resumed = resume["straight"], resume["resumed"]
        # The steps after the checkpoint trained: the comparison is not between two untouched students.
        assert any(not torch.equal(resume["at_checkpoint"][key], value) for key, value in straight.items())
        assert [key for key, value in straight.items() if not torch.equal(resumed[key], value)] == []


@pytest.mark.slow
def test_two_simulated_nodes_train_the_student_of_one_node_with_two_processes(
    ranks: list[dict[Any, Any]], tmp_path: Path
) -> None:
    run_two_nodes(worker([("float32", "fsdp")]), tmp_path, timeout=180)
    nodes = results_of(tmp_path)
    for results, one_node in zip(nodes, ranks, strict=True):
        got, expected = results[("float32", "fsdp")], one_node[("float32", "fsdp")]
        assert_same_students(got["students"], expected["students"], atol=1e-6)
        assert got["teacher"]["local"] == expected["teacher"]["local"]  # the same shard on each process
    assert_half_on_each([results[("float32", "fsdp")]["teacher"] for results in nodes], torch.float32)


@pytest.mark.slow
def test_the_recipe_runs_a_sharded_teacher_to_its_card_past_a_batch_unreadable_on_one_process(
    launch: tuple[Path, list[dict[Any, Any]]],
) -> None:
    folder, results = launch
    recipe, out = [r["recipe"] for r in results], folder / "recipe" / "out"
    # The unreadable file left one process's batch empty at a step at which the other's held an image: the
    # process that skipped ran its share of the teacher's forward with the other.
    assert len(set(recipe[0]["skipped_at"]) ^ set(recipe[1]["skipped_at"])) == 1, recipe
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 7 files on 2 processes, 1 per batch: one epoch
    assert state["log_history"][-2]["skipped_images"] == 1  # the last training log, before the summary
    assert {"README.md", "attention_maps.png", "knn_results.json", "model.safetensors"} <= {
        path.name for path in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert "with its weights in bfloat16" in card and "--teacher_sharding fsdp" in card
    assert "| Images skipped (unreadable) | 1 |" in card
    # The final k-NN of the exported student, published by the first process alone.
    assert recipe[1]["knn"] == {} and set(recipe[0]["knn"]) == {None}
    assert recipe[0]["knn"][None] == json.loads((out / "knn_results.json").read_text())["knn"]
    assert all(0 <= result["top1"] <= 100 for result in recipe[0]["knn"][None].values())


# ----------------------------------------------------------------------------------------------
# Refusals, before any data loads
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def refusal_argv(tmp_path: Path) -> list[str]:
    """distill.py's flags for a sharded teacher, whose training folder holds no image: the run stops with that
    folder's error as soon as its data loads, so a refusal that comes first came before any data loaded."""
    wide_teacher(tmp_path / "teacher")
    (tmp_path / "empty").mkdir()
    return [
        *("--teacher_name_or_path", str(tmp_path / "teacher"), "--student_preset", "vit-mini-patch8"),
        *("--image_size", "32", "--use_cpu", "true", "--report_to", "none", "--output_dir", str(tmp_path / "out")),
        *("--train_dir", str(tmp_path / "empty")),
    ]


@pytest.mark.parametrize(
    ("flags", "environment", "error"),
    [
        (["--teacher_sharding", "fsdp"], {}, "error: --train_dir '{empty}' holds no image files"),  # the data loads
        (
            ["--teacher_sharding", "fsdp", "--torch_compile", "true"],
            {},
            "error: --teacher_sharding fsdp with --torch_compile: a compiled teacher would trace FSDP2's gathers, "
            "which this library does not test; drop one of the two.",
        ),
        (
            ["--teacher_sharding", "fsdp"],
            {"ACCELERATE_USE_FSDP": "true"},  # accelerate launch --use_fsdp
            "error: --teacher_sharding fsdp trains the students with DDP beside the sharded teacher; this launch "
            "trains them with FSDP. Launch without Accelerate's FSDP plugin.",
        ),
        (
            ["--teacher_sharding", "zero3"],
            {},
            "error: --teacher_sharding: invalid choice: 'zero3' (choose from 'none', 'fsdp')",
        ),
        (
            ["--teacher_dtype", "float64"],
            {},
            "error: --teacher_dtype: invalid choice: 'float64' (choose from 'float32', 'bfloat16', 'float16')",
        ),
    ],
    ids=["control-the_data_loads", "torch_compile", "fsdp_students", "bad_sharding", "bad_dtype"],
)
def test_what_a_sharded_teacher_cannot_run_is_refused_before_any_data_loads(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    refusal_argv: list[str],
    flags: list[str],
    environment: dict[str, str],
    error: str,
) -> None:
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    status, line = distill_refusal([*refusal_argv, *flags], capsys)
    assert status == 2
    assert line.startswith(error.format(empty=tmp_path / "empty")), line
    assert not (tmp_path / "out").exists()


def test_students_launched_with_deepspeed_beside_a_sharded_teacher_are_refused_before_any_data_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], refusal_argv: list[str]
) -> None:
    """``accelerate launch --use_deepspeed`` sets ACCELERATE_USE_DEEPSPEED=true. Parsing the flags then builds
    Accelerate's DeepSpeed plugin, which needs the deepspeed package; the variable is set here once they are
    parsed, where the run reads it."""
    arguments = parse_config_and_flags(DISTILL_ARGUMENTS, [*refusal_argv, "--teacher_sharding", "fsdp"])

    def launched_with_deepspeed() -> None:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        run_distillation(*arguments, recipe="")

    with pytest.raises(SystemExit) as stopped:
        run_recipe(launched_with_deepspeed)
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --teacher_sharding fsdp trains the students with DDP beside the sharded teacher; this launch trains "
        "them with DeepSpeed. Launch without Accelerate's DeepSpeed plugin."
    ]
    assert not (tmp_path / "out").exists()
