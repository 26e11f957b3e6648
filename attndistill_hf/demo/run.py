"""The offline demo: real data, a real teacher, a distilled student and its baselines, on a CPU.

``recipes/demo.py`` is its front end; its four stages are described there. :func:`run_demo` prepares
Fashion-MNIST, trains (or reuses) the supervised teacher, starts ``recipes/distill.py`` on the demo
config and compares the teacher, the distilled student and the same student untrained by weighted
k-NN on the held-out test images; the comparison goes to ``demo_results.json`` and the student's card.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel

from ..cli import read_config_file
from ..evaluation import DEFAULT_KNN_KS, run_knn_eval
from ..hardware import hardware_description
from ..hub import set_section
from .fashion_mnist import prepare_fashion_mnist
from .pipeline import (
    FULL,
    LAUNCHERS,
    QUICK,
    TeacherRunArguments,
    knn_loaders,
    launch_distillation,
    path_overrides,
    train_teacher,
    untrained_student,
)


@dataclass
class DemoArguments:
    """Where the demo writes, what it reads, and how it runs distillation."""

    quick: bool = field(default=False, metadata={"help": "A tiny slice of data and few steps (for tests)."})
    output_root: str = field(default="outputs", metadata={"help": "Folder for demo-teacher/ and demo-student/."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the Fashion-MNIST shards; unset: data/fashion_mnist, <output_root>/data if --quick."
        },
    )
    # The recipes folder is the caller's (the package does not ship it), so the default is resolved at run time.
    config: str | None = field(
        default=None, metadata={"help": "Distillation config file; unset: recipes/configs/demo.yaml."}
    )
    hub: bool = field(default=False, metadata={"help": "Read Fashion-MNIST from the Hub instead of IDX files."})
    launcher: str = field(
        default="auto",
        metadata={
            "help": "How distill.py runs: 'accelerate launch' (auto: when the command exists) or plain python.",
            "choices": LAUNCHERS,
        },
    )
    retrain_teacher: bool = field(default=False, metadata={"help": "Train the teacher even when one is cached."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _stage(index: int, title: str) -> float:
    print(f"\n[{index}/4] {title}", flush=True)
    return time.time()


def evaluate(
    name: str, model: torch.nn.Module, loaders: tuple[Any, Any], progress: bool
) -> dict[str, dict[str, float]]:
    print(f"k-NN of the {name}", flush=True)
    result = run_knn_eval(model, *loaders, ks=DEFAULT_KNN_KS, progress=progress, print_table=False)
    return result["knn"]


def backbone_parameters(model: torch.nn.Module) -> int:
    """Parameters that produce the CLS feature (ViTModel's unused pooler left out)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pooler."))


def _architecture(config: Any) -> str:
    return (
        f"ViT {config.num_hidden_layers}L/{config.hidden_size}w/{config.num_attention_heads}h, "
        f"patch {config.patch_size}"
    )


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's comparison as a Markdown table (k-NN top-1 in %, one column per k)."""
    header = "| model | architecture | params | " + " | ".join(f"k={k}" for k in DEFAULT_KNN_KS) + " |"
    lines = [header, "|" + "---|" * (3 + len(DEFAULT_KNN_KS))]
    for row in rows:
        scores = " | ".join(f"{row['knn'][str(k)]['top1']:.2f}" for k in DEFAULT_KNN_KS)
        lines.append(f"| {row['model']} | {row['architecture']} | {row['params'] / 1e6:.2f} M | {scores} |")
    return "\n".join(lines)


def check_student_preset(config: dict[str, Any], config_path: str) -> None:
    """Refuse, before any work, a config whose student is not a preset (the baseline is built from it)."""
    if not config.get("student_preset") or config.get("student_name_or_path"):
        raise ValueError(
            f"{config_path}: the demo compares the distilled student with the same preset untrained; "
            "name the student by student_preset (and give no student_name_or_path)."
        )


def run_demo(args: DemoArguments, recipes: Path) -> dict[str, Any]:
    """Run the four stages; returns what ``demo_results.json`` holds.

    ``recipes`` is the folder of ``distill.py``, which the distillation stage starts, and of the default
    config ``configs/demo.yaml``.
    """
    config_path = args.config or str(recipes / "configs" / "demo.yaml")
    progress = args.progress
    scale = QUICK if args.quick else FULL
    root = Path(args.output_root)
    data_dir = Path(args.data_dir) if args.data_dir else (root / "data" if args.quick else Path("data/fashion_mnist"))
    teacher_dir, student_dir = root / "demo-teacher", root / "demo-student"
    config = read_config_file(config_path)
    check_student_preset(config, config_path)
    image_size = int(config.get("image_size", 32))
    times: dict[str, float] = {}
    started = time.time()

    t0 = _stage(1, f"Fashion-MNIST: {scale.max_train} train / {scale.max_test} test images -> {data_dir}")
    prepare_fashion_mnist(data_dir, hub=args.hub, max_train=scale.max_train, max_test=scale.max_test, progress=progress)
    times["data_s"] = time.time() - t0

    t0 = _stage(2, f"Teacher (supervised ViT) -> {teacher_dir}")
    teacher_record = train_teacher(
        scale.teacher,
        TeacherRunArguments(
            data_dir=str(data_dir), output_dir=str(teacher_dir), overwrite=args.retrain_teacher, progress=progress
        ),
    )
    verb = "reused (same recipe and data)" if teacher_record["reused"] else "trained"
    print(f"teacher {verb}: k-NN top-1 (k=20) {teacher_record['knn']['knn']['20']['top1']:.2f}%")
    times["teacher_s"] = time.time() - t0

    t0 = _stage(3, f"Distillation -> {student_dir}")
    # A default run passes no override, so the card quotes the config file alone (and the card names any
    # local path by its last component).
    overrides = path_overrides(
        config,
        {
            "teacher_name_or_path": str(teacher_dir),
            "output_dir": str(student_dir),
            "data_files": [str(data_dir / "train-*.parquet")],
            "eval_data_files": [str(data_dir / "test-*.parquet")],
            "knn_train_samples": scale.max_train,
        },
    )
    overrides += list(scale.distill_overrides)
    if not progress:
        overrides += ["--disable_tqdm", "true"]
    times["distill_s"] = launch_distillation(recipes / "distill.py", config_path, overrides, launcher=args.launcher)

    t0 = _stage(4, "k-NN on the held-out test images: teacher, distilled student, untrained student")
    mean, std = teacher_record["image_mean"], teacher_record["image_std"]
    loaders = knn_loaders(data_dir, image_size, mean, std)
    distilled = AutoModel.from_pretrained(student_dir).eval()
    seed = int(config.get("seed", 0))
    untrained = untrained_student(config, image_size, seed)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    rows = [
        {
            "model": "teacher (supervised)",
            "architecture": _architecture(teacher_config),
            "params": teacher_record["num_parameters"],
            "knn": teacher_record["knn"]["knn"],  # measured at the end of its training: same data, same protocol
        },
        {
            "model": "distilled student (AttnDistill)",
            "architecture": _architecture(distilled.config),
            "params": backbone_parameters(distilled),
            "knn": evaluate("distilled student", distilled, loaders, progress),
        },
        {
            "model": "untrained student",
            "architecture": _architecture(untrained.config),
            "params": backbone_parameters(untrained),
            "knn": evaluate("untrained student", untrained, loaders, progress),
        },
    ]
    times["evaluation_s"] = time.time() - t0
    times["total_s"] = time.time() - started

    table = summary_table(rows)
    details = (
        f"Weighted k-NN top-1 (%) of the frozen CLS features on {scale.max_test} held-out Fashion-MNIST test "
        f"images, memory bank {scale.max_train} train images. The untrained student has the same architecture "
        f"(random initialisation, seed {seed}). Demo run on {hardware_description()}: "
        f"{times['total_s'] / 60:.1f} min in all, distillation {times['distill_s'] / 60:.1f} min."
    )
    results = {
        "quick": args.quick,
        "rows": rows,
        "times": {key: round(value, 1) for key, value in times.items()},
        "hardware": hardware_description(),
        "teacher_recipe_hash": teacher_record["recipe_hash"],
        "teacher_reused": teacher_record["reused"],
        "num_train": scale.max_train,
        "num_test": scale.max_test,
    }
    (student_dir / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    readme = student_dir / "README.md"
    readme.write_text(set_section(readme.read_text(), "Demo comparison", f"{details}\n\n{table}", before="Limitations"))
    print("\n" + table)
    print(f"\n{details}\nStudent (Hub-ready): {student_dir}")
    return results
