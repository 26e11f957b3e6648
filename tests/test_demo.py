"""The offline demo end to end on a small slice of real Fashion-MNIST, and the pieces it is built from."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import set_seed

from attndistill_hf.arguments import DistillModelArguments
from attndistill_hf.cache_writer import build_target_cache
from attndistill_hf.cli import parse_config_and_flags, read_config_file
from attndistill_hf.data import DataArguments, train_transform
from attndistill_hf.demo import ablation
from attndistill_hf.demo.ablation import (
    CASE_ORDER,
    LOSSES,
    AblationArguments,
    case_of,
    keep_other_sections,
    loss_of,
    render_results,
    run_ablation,
)
from attndistill_hf.demo.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, HUB_DATASET_ID, SOURCE_FILES
from attndistill_hf.demo.pipeline import (
    FULL,
    QUICK,
    ClassificationCollator,
    DemoScale,
    TeacherRecipe,
    TeacherRunArguments,
    build_teacher_card,
    launch_distillation,
    path_overrides,
    recipe_hash,
    teacher_classifier,
    teacher_training_arguments,
    train_teacher,
    untrained_student,
)
from attndistill_hf.demo.run import DemoArguments, check_student_preset, run_demo
from attndistill_hf.hub import EvalRecord, set_section
from attndistill_hf.models import LAYER_NORM_EPS, STUDENT_PRESETS, build_student
from attndistill_hf.pipeline import load_student
from attndistill_hf.target_cache import CacheInfo

from helpers import encode, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CONFIGS = RECIPES / "configs"

needs_real = pytest.mark.skipif(
    not all((Path(DEBIAN_FASHION_MNIST_DIR) / name).is_file() for pair in SOURCE_FILES.values() for name in pair),
    reason="Fashion-MNIST IDX files are not installed (Debian package dataset-fashion-mnist)",
)


# ---- The demo, end to end ------------------------------------------------------------------------


@pytest.mark.slow
@needs_real
def test_quick_demo_distilled_student_beats_untrained(tmp_path: Path) -> None:
    results = load_recipe("demo").main(["--quick", "--output_root", str(tmp_path), "--no_progress"])

    rows = {row["model"]: row for row in results["rows"]}
    teacher = rows["teacher (supervised)"]["knn"]
    distilled = rows["distilled student (AttnDistill)"]["knn"]
    untrained = rows["untrained student"]["knn"]
    for k in ("10", "20"):
        # The claim of the demo, on held-out real images: distillation taught the student something.
        assert distilled[k]["top1"] > untrained[k]["top1"], (k, distilled[k], untrained[k])
    assert 10.0 < teacher["20"]["top1"] <= 100.0  # a trained teacher, above chance on 10 classes

    # The student folder is a complete Hub model repo, and the demo's numbers are the ones it stores.
    student = tmp_path / "demo-student"
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "attention_maps.png",
        "training_curves.png",
        "knn_results.json",
        "demo_results.json",
    ):
        assert (student / name).is_file(), name
    stored = json.loads((student / "demo_results.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(results["rows"]))
    card = (student / "README.md").read_text()
    assert "## Demo comparison" in card
    assert f"{distilled['20']['top1']:.2f}" in card and f"{untrained['20']['top1']:.2f}" in card
    assert str(tmp_path) not in card  # no local path is published
    # The distilled student kept the demo's shape: fewer heads and a larger patch than the teacher.
    teacher_config = json.loads((tmp_path / "demo-teacher" / "config.json").read_text())
    student_config = json.loads((student / "config.json").read_text())
    assert student_config["num_attention_heads"] < teacher_config["num_attention_heads"]
    assert student_config["patch_size"] > teacher_config["patch_size"]

    # The teacher's card states its measured k-NN; a second request with the same recipe reuses it.
    teacher_card = (tmp_path / "demo-teacher" / "README.md").read_text()
    assert "supervised" in teacher_card and f"{teacher['20']['top1']:.2f}" in teacher_card
    again = train_teacher(
        QUICK.teacher,
        TeacherRunArguments(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "demo-teacher"), progress=False),
    )
    assert again["reused"]
    assert again["knn"]["knn"] == json.loads(json.dumps(results["rows"][0]["knn"]))
    assert (tmp_path / "demo-teacher" / "model.safetensors").stat().st_size < 10 * 2**20


# ---- Pieces (fast) -------------------------------------------------------------------------------


def test_teacher_batches_are_seeded_labelled_views_of_the_library_transform() -> None:
    recipe = TeacherRecipe()
    view = train_transform(recipe.image_size, [0.3] * 3, [0.35] * 3, scale=(recipe.crop_scale_min, 1.0))
    collate = ClassificationCollator(view)
    rng = np.random.default_rng(0)
    examples = [
        {"image": {"bytes": encode(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)), "PNG")}, "label": i}
        for i in range(6)
    ]
    torch.manual_seed(1)
    first = collate(examples)
    torch.manual_seed(1)
    second = collate(examples)
    # What ViTForImageClassification.forward takes, nothing more (no skipped-image count).
    assert set(first) == {"pixel_values", "labels"}
    assert first["pixel_values"].shape == (6, 3, 32, 32)
    assert first["labels"].tolist() == list(range(6))
    torch.testing.assert_close(first["pixel_values"], second["pixel_values"])
    # Grayscale images are repeated over the three channels.
    assert torch.equal(first["pixel_values"][:, 0], first["pixel_values"][:, 2])


def test_teacher_is_trained_by_trainer_with_the_recipe() -> None:
    recipe = TeacherRecipe()
    model = teacher_classifier(recipe)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 96, 4)
    assert (config.patch_size, config.image_size, config.num_labels) == (4, 32, 10)
    assert config.layer_norm_eps == LAYER_NORM_EPS
    # Fixed sin-cos position embeddings: frozen, so Trainer's optimizer leaves them out.
    assert not model.vit.embeddings.position_embeddings.requires_grad
    torch.testing.assert_close(teacher_classifier(recipe).state_dict(), model.state_dict())  # seeded
    args = teacher_training_arguments(recipe, TeacherRunArguments(output_dir="unused"))
    assert (args.max_steps, args.per_device_train_batch_size, args.warmup_steps) == (2400, 32, 100)
    assert (args.learning_rate, args.weight_decay, args.label_smoothing_factor) == (1e-3, 0.05, 0.1)
    assert args.lr_scheduler_type == "cosine" and args.max_grad_norm == 1.0 and args.seed == recipe.seed


def test_recipe_hash_follows_recipe_and_data() -> None:
    recipe = TeacherRecipe()
    base = recipe_hash(recipe, "data-a")
    assert base == recipe_hash(TeacherRecipe(), "data-a")
    assert base != recipe_hash(recipe, "data-b")
    assert base != recipe_hash(TeacherRecipe(max_steps=recipe.max_steps + 1), "data-a")


def test_demo_config_matches_the_demo() -> None:
    config = read_config_file(CONFIGS / "demo.yaml")
    assert config["knn_train_samples"] == FULL.max_train
    assert config["teacher_name_or_path"] == "outputs/demo-teacher"
    # The student is a named preset: the file alone says what is trained, nothing is generated for it.
    assert config["student_preset"] == "vit-mini-2heads-patch8" and "student_name_or_path" not in config
    # A default run passes no path override, so the student's card shows exactly this file.
    wanted = {
        "teacher_name_or_path": "outputs/demo-teacher",
        "output_dir": "outputs/demo-student",
        "data_files": ["data/fashion_mnist/train-*.parquet"],
    }
    assert path_overrides(config, wanted) == []
    assert path_overrides(config, {"output_dir": "elsewhere"}) == ["--output_dir", "elsewhere"]
    # Both shape adaptations are exercised: fewer heads and a larger patch than the teacher.
    student, teacher = STUDENT_PRESETS[config["student_preset"]], FULL.teacher
    assert student["num_attention_heads"] < teacher.num_attention_heads
    assert student["patch_size"] > teacher.patch_size


def test_demo_untrained_baseline_is_the_distilled_student_at_initialisation() -> None:
    config = read_config_file(CONFIGS / "demo.yaml")
    image_size, seed = int(config["image_size"]), int(config["seed"])
    teacher = build_student("vit-mini-patch4", image_size=image_size)
    # distill.py builds the student from the preset, initialised from the run's seed alone.
    set_seed(seed + 1)
    model_args = DistillModelArguments(teacher_name_or_path="unused", student_preset=config["student_preset"])
    initial = load_student(model_args, DataArguments(image_size=image_size), teacher.config.model_type, seed)
    baseline = untrained_student(config, image_size, seed)
    assert not baseline.training
    assert initial.state_dict().keys() == baseline.state_dict().keys()
    for name, tensor in initial.state_dict().items():
        assert torch.equal(tensor, baseline.state_dict()[name]), name


def test_demo_refuses_a_student_that_is_not_a_preset() -> None:
    check_student_preset({"student_preset": "vit-mini-2heads-patch8"}, "demo.yaml")
    for config in ({"student_name_or_path": "some/dir"}, {"student_preset": "x", "student_name_or_path": "some/dir"}):
        with pytest.raises(ValueError, match="student_preset"):
            check_student_preset(config, "demo.yaml")


def test_card_sections_go_before_limitations_and_are_replaced() -> None:
    card = "---\nlicense: x\n---\n\n# m\n\n## Results\n\nr\n\n## Limitations\n\nl\n"
    once = set_section(card, "Demo comparison", "table 1", before="Limitations")
    assert once == card.replace("## Limitations", "## Demo comparison\n\ntable 1\n\n## Limitations")
    # A second demo run replaces its comparison instead of adding another one.
    assert set_section(once, "Demo comparison", "table 2", before="Limitations") == once.replace("table 1", "table 2")
    assert set_section("# m\n", "Demo comparison", "t", before="Limitations") == "# m\n\n## Demo comparison\n\nt\n"


def test_teacher_card_publishes_its_numbers_without_local_paths_or_tokens() -> None:
    token = "hf_" + "Zq8" * 12  # token-shaped, never valid
    card = build_teacher_card(
        model_name="/home/someone/runs/demo-teacher",
        description="A supervised demo teacher.",
        provenance=["**Data**: Fashion-MNIST.", "**Objective**: supervised."],
        recipe_text=f"data_dir: /home/someone/fashion_mnist\nhub_token: {token}\nmax_steps: 300\n",
        training_summary={"steps": 300, "wall_time_s": 75.0},
        eval_results=[EvalRecord("k-NN top-1 (k=20)", 81.25, "fashion_mnist", "test")],
        evaluation="Weighted k-NN of the frozen CLS features:",
        limitations="A demonstration model.",
        datasets=[HUB_DATASET_ID],
    )
    assert card.data.model_name == "demo-teacher" and card.data.datasets == [HUB_DATASET_ID]
    assert [result.metric_value for result in card.data.eval_results] == [81.25]
    assert "| k-NN top-1 (k=20) | fashion_mnist | test | accuracy | 81.25 |" in card.text
    assert "| Wall time | 0:01:15 (h:mm:ss) |" in card.text and "data_dir: fashion_mnist\n" in card.text
    assert "/home/someone" not in card.content and token not in card.content
    assert card.text.index("## How it was made") < card.text.index("## Results") < card.text.index("## Limitations")


@pytest.mark.slow
def test_a_failed_distillation_ends_in_one_error(tmp_path: Path) -> None:
    with pytest.raises(ChildProcessError, match="distillation exited with status 2"):
        launch_distillation(
            REPO / "recipes" / "distill.py", tmp_path / "missing.yaml", [], launcher="python", quiet=True
        )


def test_demo_and_ablation_take_their_documented_flags() -> None:
    """``make demo`` / ``make ablation``, README, docs and bench/bench_ablation.py spell the switches bare."""
    (on,) = parse_config_and_flags((DemoArguments,), ["--quick", "--hub", "--retrain_teacher", "--no_progress"])
    (default,) = parse_config_and_flags((DemoArguments,), [])
    for name in ("quick", "hub", "retrain_teacher"):
        assert getattr(on, name) is True and getattr(default, name) is False, name
    assert on.progress is False and default.progress is True and default.data_dir is None
    assert default.config is None  # the recipe's own configs/demo.yaml
    with pytest.raises(ValueError, match="--launcher: invalid choice: 'torchrun'"):
        parse_config_and_flags((DemoArguments,), ["--launcher", "torchrun"])

    flags = ["--seeds", "0", "1", "2", "3", "--max_steps", "600", "--rerun", "--separate_runs", "--no_progress"]
    (on,) = parse_config_and_flags((AblationArguments,), flags)
    (default,) = parse_config_and_flags((AblationArguments,), [])
    assert (on.seeds, on.max_steps, default.seeds, default.max_steps) == ([0, 1, 2, 3], 600, [0, 1, 2], None)
    for name in ("rerun", "separate_runs"):
        assert getattr(on, name) is True and getattr(default, name) is False, name
    assert on.progress is False and default.progress is True


def test_demo_and_ablation_read_the_recipes_configs_by_default(tmp_path: Path) -> None:
    """Unset, ``--config`` and ``--configs`` name the configs of the recipes folder the front end passes."""
    assert (CONFIGS / "demo.yaml").is_file() and list(CONFIGS.glob("ablation_*.yaml"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"Config file {tmp_path / 'configs' / 'demo.yaml'} ")):
        run_demo(DemoArguments(output_root=str(tmp_path)), tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"No config matches {tmp_path / 'configs'}/ablation_")):
        run_ablation(AblationArguments(output_root=str(tmp_path)), tmp_path)


def test_ablation_configs_cover_three_cases_times_three_losses() -> None:
    cells = set()
    for path in sorted(CONFIGS.glob("ablation_*.yaml")):
        config = read_config_file(path)
        case, loss = case_of(config), loss_of(config)
        assert path.stem == f"ablation_{case}_{loss}"
        cells.add((case, loss))
        # Each case's preset differs from the teacher exactly as the case says.
        student, teacher = STUDENT_PRESETS[config["student_preset"]], FULL.teacher
        heads, patch = student["num_attention_heads"], student["patch_size"]
        assert (heads < teacher.num_attention_heads) == (case == "heads")
        assert (patch > teacher.patch_size) == (case == "patch")
        assert heads <= teacher.num_attention_heads and patch >= teacher.patch_size
    assert cells == {(case, loss) for case in CASE_ORDER for loss in LOSSES}


@pytest.mark.slow
@needs_real
def test_ablation_one_run_per_case_gives_each_student_its_own_runs_result(tmp_path: Path) -> None:
    """A case's three loss settings trained side by side score exactly as with one run each (--separate_runs)."""
    scale = DemoScale(max_train=256, max_test=96, teacher=TeacherRecipe(max_steps=8, warmup_steps=2))
    common = ["--configs", str(CONFIGS / "ablation_heads_*.yaml"), "--seeds", "0", "--max_steps", "4"]
    common += ["--data_dir", str(tmp_path / "data"), "--launcher", "python", "--no_progress"]
    states = {}
    for way, flags in (("together", []), ("separate", ["--separate_runs"])):
        root = tmp_path / way
        if way == "separate":  # the same teacher, trained once
            root.mkdir()
            (root / "demo-teacher").symlink_to(tmp_path / "together" / "demo-teacher", target_is_directory=True)
        outputs = ["--output_root", str(root), "--results", str(root / "results.md")]
        (args,) = parse_config_and_flags((AblationArguments,), [*common, *flags, *outputs])
        states[way] = run_ablation(args, RECIPES, scale=scale)
    together, separate = ({run["config"]: run for run in states[way]["runs"]} for way in ("together", "separate"))
    assert sorted(together) == sorted(separate) == [f"ablation_heads_{loss}.yaml" for loss in ("attn", "both", "proj")]
    assert {run["students_in_run"] for run in together.values()} == {3}
    assert {run["students_in_run"] for run in separate.values()} == {1}
    for config, run in together.items():
        assert run["knn"] == separate[config]["knn"], config
    # Each way's students: one folder per loss setting, in one run folder or in a run folder each.
    assert {p.name for p in (tmp_path / "together" / "ablation" / "heads-4steps-seed0").iterdir()} >= {"attn", "proj"}
    assert (tmp_path / "separate" / "ablation" / "heads-4steps-seed0" / "both" / "model.safetensors").is_file()
    assert "3 students in 1 distillation run (the loss settings" in (tmp_path / "together" / "results.md").read_text()
    assert "3 students in 3 distillation runs (each configuration" in (tmp_path / "separate" / "results.md").read_text()


@pytest.mark.slow
@needs_real
def test_ablation_from_a_cache_trains_every_run_from_the_stored_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--teacher_targets_views K: the teacher runs once, into a cache of K views per train image stored as asked,
    and every run of the case trains from it (its key names the cache); the report says so."""
    scale = DemoScale(max_train=256, max_test=96, teacher=TeacherRecipe(max_steps=8, warmup_steps=2))
    argv = ["--configs", str(CONFIGS / "ablation_heads_*.yaml"), "--seeds", "0", "--max_steps", "2"]
    argv += ["--data_dir", str(tmp_path / "data"), "--launcher", "python", "--no_progress"]
    argv += ["--output_root", str(tmp_path), "--results", str(tmp_path / "results.md")]
    argv += ["--teacher_targets_views", "2", "--teacher_targets_dtype", "float32"]
    (args,) = parse_config_and_flags((AblationArguments,), argv)

    def cache_then_hide_the_teachers_weights(*arguments: Any) -> CacheInfo:
        info = build_target_cache(*arguments)
        weights = tmp_path / "demo-teacher" / "model.safetensors"
        weights.rename(weights.with_suffix(".hidden"))  # a run that loaded the teacher would fail now
        return info

    monkeypatch.setattr(ablation, "build_target_cache", cache_then_hide_the_teachers_weights)
    state = run_ablation(args, RECIPES, scale=scale)
    info = CacheInfo.load(tmp_path / "ablation" / "teacher-targets-2views-float32")
    assert (info.views_per_image, info.storage_dtype, info.num_images) == (2, "float32", 256)
    assert sorted(run["loss"] for run in state["runs"]) == ["attn", "both", "proj"]
    assert state["teacher_targets"]["storage_dtype"] == "float32"
    report = (tmp_path / "results.md").read_text()
    assert "2 recorded views per train image, stored as float32; every run trained from them" in report


def test_ablation_report_states_mean_and_spread() -> None:
    def knn(value: float) -> dict[str, float]:
        return {"10": value, "20": value, "200": value}

    # Three seeds per loss; the longer schedule scores 5 points more everywhere.
    runs = [
        {
            "case": "same",
            "loss": loss,
            "seed": seed,
            "max_steps": steps,
            "knn": knn(value + shift),
            "distill_time_s": 30.0,
        }
        for steps, shift in ((300, 0.0), (600, 5.0))
        for loss, values in (("proj", (70.0, 72.0, 74.0)), ("both", (75.0, 76.0, 77.0)))
        for seed, value in enumerate(values)
    ]
    state = {
        "runs": runs,
        "untrained": [{"case": "same", "seed": s, "knn": knn(60.0)} for s in range(3)],
        "teacher": {
            "recipe_hash": "abc",
            "recipe": {"max_steps": 10, "batch_size": 8},
            "knn": {"knn": {k: {"top1": 80.0} for k in ("10", "20", "200")}},
        },
        "seeds": [0, 1, 2],
        "num_train": 100,
        "num_test": 50,
        "config_steps": 300,
        "settings": {300: "300 steps", 600: "600 steps"},
        "hardware": "CPU",
        "date": "2025-01-01",
        "total_time_s": 120.0,
        "load_average": [None, None],
    }
    text = render_results(state)
    # One table per schedule, each with mean ± sample standard deviation over the seeds.
    assert "## 300 steps" in text and "## 600 steps" in text and "--max_steps 600" in text
    assert "| 72.00 ± 2.00 |" in text and "| 76.00 ± 1.00 |" in text and "| 60.00 ± 0.00 |" in text
    assert "| 77.00 ± 2.00 |" in text and "| 81.00 ± 1.00 |" in text
    assert "adding the attention term to the projector term: +4.00" in text
    assert "2025-01-01" in text and "CPU" in text


def test_a_regenerated_ablation_report_keeps_the_sections_of_other_measurements() -> None:
    """docs/results.md also holds docs/scripts/cache_accuracy.py's section: rewriting the ablation's report keeps
    it, in its place after the report, and replaces the report's own sections instead of adding copies."""
    old = "# Results\n\n## Setup\n\nold setup\n\n## Cache study\n\nthe study's table\n"
    new = "# Results\n\n## Setup\n\nnew setup\n"
    kept = keep_other_sections(old, new)
    assert kept == "# Results\n\n## Setup\n\nnew setup\n\n## Cache study\n\nthe study's table\n"
    assert keep_other_sections(kept, kept) == kept
