"""The paper's ablation at small scale: which loss term matters, in each of the three attention cases.

``recipes/ablation.py`` is its front end; what it runs and reports is described there. Each case's
students (the ``vit-mini-*`` presets) differ from the demo teacher as the method's three cases do, and
each case's three loss settings train side by side in one distillation run per seed. The k-NN top-1
of every student on the held-out test images goes to ``<output_root>/ablation/results.json`` after
every run (an interrupted ablation resumes where it stopped; a run is redone only when its settings
change) and, rendered by :func:`render_results`, to ``docs/results.md``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModel

from ..cache_writer import CacheArguments, build_target_cache
from ..cli import read_config_file
from ..data import DataArguments
from ..evaluation import run_knn_eval
from ..hardware import hardware_description
from ..hub import set_section
from ..target_cache import STORAGE_DTYPES
from ..validation import OPTIONAL_POSITIVE_INT, check_choice, check_fields
from .fashion_mnist import prepare_fashion_mnist
from .pipeline import (
    FULL,
    LAUNCHERS,
    DemoScale,
    TeacherRunArguments,
    knn_loaders,
    launch_distillation,
    path_overrides,
    train_teacher,
    untrained_student,
)

KS: tuple[int, ...] = (10, 20, 200)
MAIN_K = "20"
# Student preset -> (case key, description).
CASES: dict[str, tuple[str, str]] = {
    "vit-mini-patch4": ("same", "(a) same heads and patch: 4 heads, patch 4"),
    "vit-mini-2heads-patch4": ("heads", "(c) fewer heads: 2 heads, patch 4"),
    "vit-mini-patch8": ("patch", "(b) larger patch: 4 heads, patch 8"),
}
CASE_ORDER: tuple[str, ...] = ("same", "heads", "patch")
LOSSES: dict[str, str] = {
    "proj": "projector only",
    "attn": "attention only",
    "both": "projector + attention",
}


@dataclass
class AblationArguments:
    """Which configs and seeds run, where everything goes, and how distillation runs."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of every configuration."})
    # The recipes folder is the caller's (the package does not ship it), so the default is resolved at run time.
    configs: str | None = field(
        default=None,
        metadata={"help": "Glob of the ablation configs; unset: recipes/configs/ablation_*.yaml."},
    )
    output_root: str = field(default="outputs", metadata={"help": "Folder of the teacher, students and results."})
    data_dir: str = field(default="data/fashion_mnist", metadata={"help": "Where the Fashion-MNIST shards go."})
    results: str = field(default="docs/results.md", metadata={"help": "The Markdown report to write."})
    max_steps: int | None = field(default=None, metadata={"help": "Override every config's max_steps."})
    rerun: bool = field(
        default=False,
        metadata={
            "help": "Run this invocation's runs again even when results.json has them (other step counts are kept)."
        },
    )
    launcher: str = field(
        default="auto",
        metadata={
            "help": "How distill.py runs: 'accelerate launch' (auto: when the command exists) or plain python.",
            "choices": LAUNCHERS,
        },
    )
    separate_runs: bool = field(
        default=False,
        metadata={
            "help": "Train every config in a distillation run of its own (one teacher forward per student and "
            "batch) instead of a case's loss settings side by side: for comparing wall times "
            "(bench/bench_ablation.py)."
        },
    )
    teacher_targets_views: int | None = field(
        default=None,
        metadata={
            "help": "Run the teacher once, over this many recorded views per training image (as recipes/"
            "cache_teacher.py does), and train every run from those stored targets instead of the teacher online."
        },
    )
    teacher_targets_dtype: str = field(
        default="float16",
        metadata={
            "help": "How those targets are stored (recipes/cache_teacher.py's --cache_dtype).",
            "choices": STORAGE_DTYPES,
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        check_fields(self, {"teacher_targets_views": OPTIONAL_POSITIVE_INT, "max_steps": OPTIONAL_POSITIVE_INT})
        check_choice("--teacher_targets_dtype", self.teacher_targets_dtype, STORAGE_DTYPES)


# The loss settings in which the three configs of a case differ (one student each in the case's run).
LOSS_KEYS = ("proj_loss_weight", "attn_loss_weight")


def case_of(config: dict[str, Any]) -> str:
    """The case key of a config, from its student preset."""
    preset = config.get("student_preset")
    if preset not in CASES:
        raise ValueError(f"Student preset {preset!r} is not one of the ablation students {sorted(CASES)}.")
    return CASES[preset][0]


def loss_of(config: dict[str, Any]) -> str:
    """'proj', 'attn' or 'both' from the config's loss weights."""
    proj, attn = float(config.get("proj_loss_weight", 1.0)), float(config.get("attn_loss_weight", 0.1))
    if proj and attn:
        return "both"
    return "proj" if proj else "attn"


def cached_batches(loader: Any, desc: str, progress: bool) -> list[dict[str, torch.Tensor]]:
    """Every batch of ``loader`` decoded once and kept, so dozens of evaluations decode nothing."""
    return list(tqdm(loader, desc=desc, unit="batch", disable=not progress))


def knn_top1(model: torch.nn.Module, bank: list[Any], test: list[Any]) -> dict[str, float]:
    """k-NN top-1 (%) per k of ``model`` with the cached bank / test batches."""
    result = run_knn_eval(model, bank, test, ks=KS, progress=False, print_table=False)
    return {k: score["top1"] for k, score in result["knn"].items()}


def _run_key(config_text: str, overrides: Sequence[str], seed: int, teacher_hash: str) -> str:
    payload = json.dumps([config_text, list(overrides), seed, teacher_hash])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _load_note(load: Sequence[float | None]) -> str:
    if not load or any(value is None for value in load):
        return ""
    return f"; 1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end"


def _settings(config: dict[str, Any], steps: int, num_train: int) -> str:
    batch = config["per_device_train_batch_size"]
    return (
        f"{steps} steps of {batch} images ({steps * batch / num_train:.2f} epochs), "
        f"AdamW (0.9, {config['adam_beta2']}), learning rate {config['learning_rate']} "
        f"with {config['warmup_steps']} warm-up steps then cosine, weight decay {config['weight_decay']}, "
        "the published augmentation (RandomResizedCrop 0.2-1 + flip), "
        f"fusion temperature {config['fusion_temperature']}; "
        "loss weights 1.0 (projector) / 0.1 (attention) where a term is on"
    )


def _case_label(case: str) -> tuple[str, str]:
    description = next(d for c, d in CASES.values() if c == case)
    label, student = description.split(": ", 1)
    return label, student


def _runs_text(runs: Sequence[dict[str, Any]]) -> str:
    """The students and the distillation runs behind them (each trained ``students_in_run``), as text."""
    count = round(sum(1 / r.get("students_in_run", 1) for r in runs))
    return f"{len(runs)} students in {count} distillation run{'' if count == 1 else 's'}"


def _grouping_text(runs: Sequence[dict[str, Any]]) -> str:
    if all(r.get("students_in_run", 1) == 1 for r in runs):
        return "each configuration in a run of its own (`--separate_runs`)"
    return "the loss settings of a case and seed side by side, against one teacher forward per batch"


def _schedule_section(steps: int, runs: Sequence[dict[str, Any]], state: dict[str, Any]) -> list[str]:
    """One table (and its plain comparisons) for the runs of one schedule length."""
    command = "python recipes/ablation.py" + ("" if steps == state["config_steps"] else f" --max_steps {steps}")
    times = [r["distill_time_s"] for r in runs]
    lines = [
        f"## {steps} steps: k-NN top-1 (%) on the held-out test images",
        "",
        f"`{command}`. Distillation: {state['settings'][steps]}. {_runs_text(runs)} ({_grouping_text(runs)}), "
        f"{statistics.mean(times):.0f} s of distillation per student on average ({sum(times) / 60:.1f} min in all).",
        "",
        "| attention case | student | loss | k=10 | k=20 | k=200 | k=20 per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    teacher_knn = state["teacher"]["knn"]["knn"]
    lines.append(
        "| - | teacher (supervised) | - | "
        + " | ".join(f"{teacher_knn[str(k)]['top1']:.2f}" for k in KS)
        + " | (one teacher) |"
    )
    means: dict[tuple[str, str], float] = {}
    for case in CASE_ORDER:
        label, student = _case_label(case)
        base = sorted((b for b in state["untrained"] if b["case"] == case), key=lambda b: b["seed"])
        if base:
            cells = [_mean_std([b["knn"][str(k)] for b in base]) for k in KS]
            per_seed = ", ".join(f"{b['knn'][MAIN_K]:.1f}" for b in base)
            lines.append(f"| {label} | {student} | untrained | {' | '.join(cells)} | {per_seed} |")
        for loss in LOSSES:
            found = sorted((r for r in runs if r["case"] == case and r["loss"] == loss), key=lambda r: r["seed"])
            if not found:
                continue
            cells = [_mean_std([r["knn"][str(k)] for r in found]) for k in KS]
            per_seed = ", ".join(f"{r['knn'][MAIN_K]:.1f}" for r in found)
            means[(case, loss)] = statistics.mean(r["knn"][MAIN_K] for r in found)
            lines.append(f"| {label} | {student} | {LOSSES[loss]} | {' | '.join(cells)} | {per_seed} |")

    lines += ["", f"Differences of the k=20 means after {steps} steps:", ""]
    for case in CASE_ORDER:
        label, _ = _case_label(case)
        present = {loss: means[(case, loss)] for loss in LOSSES if (case, loss) in means}
        if len(present) < 2:
            continue
        best = max(present, key=lambda loss: present[loss])
        parts = [f"best: {LOSSES[best]} ({present[best]:.2f})"]
        if "both" in present and "proj" in present:
            parts.append(f"adding the attention term to the projector term: {present['both'] - present['proj']:+.2f}")
        if "attn" in present and "proj" in present:
            parts.append(f"attention only vs projector only: {present['attn'] - present['proj']:+.2f}")
        lines.append(f"- {label}: " + "; ".join(parts) + ".")
    return [*lines, ""]


def _targets_line(targets: dict[str, Any] | None) -> list[str]:
    """The setup line of an ablation trained from a teacher-target cache (none for the teacher online)."""
    if targets is None:
        return []
    return [
        f"- **Teacher targets**: computed once ({targets['caching_time_s'] / 60:.1f} min) for "
        f"{targets['views_per_image']} recorded views per train image, stored as "
        f"{targets.get('storage_dtype', 'float16')}; every run trained from them, each image on "
        "one of its stored views per epoch, with no teacher forward during training."
    ]


def render_results(state: dict[str, Any]) -> str:
    """docs/results.md: setup, machine, date, budget, one table per schedule length, plain comparisons."""
    runs, teacher = state["runs"], state["teacher"]
    dates = sorted({r.get("date", state["date"]) for r in runs} | {state["date"]})
    date_text = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [
        "# Results: the AttnDistill ablation at small scale",
        "",
        "Generated by `python recipes/ablation.py` (`make ablation`) from the runs it measured and stored in "
        "`outputs/ablation/results.json`; nothing here is typed in by hand.",
        "",
        "## Setup",
        "",
        f"- **Data**: Fashion-MNIST, {state['num_train']} class-balanced train images (distillation data and "
        f"k-NN memory bank) and {state['num_test']} held-out test images (evaluation), prepared by "
        "`recipes/prepare_fashion_mnist.py`.",
        f"- **Teacher**: `recipes/train_teacher.py` (recipe hash `{teacher['recipe_hash']}`): a ViT with 4 layers, "
        "width 96, 4 heads, patch 4 on 32 px crops, trained **with labels** (supervised) for "
        f"{teacher['recipe']['max_steps']} steps of {teacher['recipe']['batch_size']} images. The published "
        "teachers are self-supervised; here a supervised one fits the CPU budget. Distillation uses no labels.",
        "- **Students**: 4 layers, width 64, trained from scratch, one per attention case: "
        + "; ".join(description for _, description in CASES.values())
        + ". The untrained rows are the same architectures at initialisation (one per seed).",
        "- **Losses**: projector only = `attn_loss_weight: 0`; attention only = `proj_loss_weight: 0`; "
        "projector + attention = the published 1.0 / 0.1 (`recipes/configs/ablation_<case>_<loss>.yaml`).",
        "- **Evaluation**: weighted k-NN (DINO's protocol, T = 0.07) of the final CLS token on the test images, "
        "memory bank = the train images; the evaluation view is resize + centre crop to 32 px.",
        f"- **Seeds**: {', '.join(str(s) for s in state['seeds'])} (student initialisation, data order, "
        "augmentation). Cells are mean ± sample standard deviation over the seeds.",
        *_targets_line(state.get("teacher_targets")),
        f"- **Machine**: {state['hardware']}; Python {platform.python_version()}, torch {torch.__version__}.",
        f"- **Date**: {date_text}.",
        f"- **Budget**: {_runs_text(runs)}, "
        f"{sum(r['distill_time_s'] for r in runs) / 60:.1f} min of "
        f"distillation in all (wall clock); the last invocation took {state['total_time_s'] / 60:.1f} min"
        f"{_load_note(state['load_average'])}.",
        "",
    ]
    for steps in sorted({r["max_steps"] for r in runs}):
        lines += _schedule_section(steps, [r for r in runs if r["max_steps"] == steps], state)
    lines += [
        "Differences smaller than the standard deviations above are within seed noise at this scale. The paper's",
        "ablation (ImageNet-Subset, hundreds of epochs, self-supervised MAE teacher) is far larger; these runs",
        "check the direction of its effects on a small real data set, not their size.",
        "",
    ]
    return "\n".join(lines)


def keep_other_sections(old: str, new: str) -> str:
    """``new`` with the ``## `` sections of ``old`` that it does not have (a report of other measurements, such as
    docs/scripts/cache_accuracy.py's, lives in the same page) appended in their order."""
    for part in old.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        if f"\n## {title}\n" not in new:
            new = set_section(new, title, body.strip("\n"))
    return new


def run_ablation(args: AblationArguments, recipes: Path, *, scale: DemoScale = FULL) -> dict[str, Any]:
    """Run every config for every seed (runs already in results.json are reused) and write the report.

    ``recipes`` is the folder of ``distill.py``, which every distillation run starts, and of the default
    ``configs/ablation_*.yaml``. ``scale`` sets the data and the teacher. Returns the state the report
    is rendered from.
    """
    progress = args.progress
    started = time.time()
    root, data_dir = Path(args.output_root), Path(args.data_dir)
    pattern = args.configs or str(recipes / "configs" / "ablation_*.yaml")
    config_paths = sorted(glob.glob(pattern))
    if not config_paths:
        raise FileNotFoundError(f"No config matches {pattern}.")
    configs = {path: read_config_file(path) for path in config_paths}
    config_steps = {int(config["max_steps"]) for config in configs.values()}
    if len(config_steps) != 1:
        raise ValueError(f"The ablation configs disagree on max_steps ({sorted(config_steps)}); align them.")
    default_steps = config_steps.pop()
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    prepare_fashion_mnist(data_dir, max_train=scale.max_train, max_test=scale.max_test, progress=progress)
    teacher_dir = root / "demo-teacher"
    teacher = train_teacher(scale.teacher, TeacherRunArguments(str(data_dir), str(teacher_dir), progress=progress))
    mean, std = teacher["image_mean"], teacher["image_std"]
    bank_loader, test_loader = knn_loaders(data_dir, scale.teacher.image_size, mean, std)
    bank = cached_batches(bank_loader, "decoding the k-NN memory bank", progress)
    test = cached_batches(test_loader, "decoding the test images", progress)

    cache = None
    if args.teacher_targets_views is not None:  # the teacher runs once, here; every run reads its targets
        stored_as = "" if args.teacher_targets_dtype == "float16" else f"-{args.teacher_targets_dtype}"
        cache = root / "ablation" / f"teacher-targets-{args.teacher_targets_views}views{stored_as}"
        cache_started = time.time()
        build_target_cache(
            CacheArguments(
                teacher_name_or_path=str(teacher_dir),
                output_dir=str(cache),
                views_per_image=args.teacher_targets_views,
                cache_dtype=args.teacher_targets_dtype,
                num_workers=0,
                batch_size=256,
            ),
            DataArguments(data_files=[str(data_dir / "train-*.parquet")], image_size=scale.teacher.image_size),
        )
        cache_time = time.time() - cache_started

    def overrides_for(config: dict[str, Any], steps: int) -> list[str]:
        flags = path_overrides(
            config,
            {
                "teacher_name_or_path": str(teacher_dir),
                "data_files": [str(data_dir / "train-*.parquet")],
                "eval_data_files": [str(data_dir / "test-*.parquet")],
            },
        )
        if cache is not None:
            flags += ["--teacher_targets", str(cache)]
        return flags if steps == int(config["max_steps"]) else [*flags, "--max_steps", str(steps)]

    def key_for(path: str, steps: int, seed: int) -> str:
        return _run_key(Path(path).read_text(), overrides_for(configs[path], steps), seed, teacher["recipe_hash"])

    results_path = root / "ablation" / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    stored: dict[str, dict[str, Any]] = {run["key"]: run for run in previous.get("runs", [])}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    steps = args.max_steps or default_steps
    # One distillation run per case and seed trains the case's students of every loss setting side by side
    # (distill.py --students: one teacher forward per batch); each student equals its own single-student run.
    case_paths: dict[str, list[str]] = {}
    for path in config_paths:
        case_paths.setdefault(case_of(configs[path]), []).append(path)
    jobs = [(case, seed) for case in case_paths for seed in args.seeds]
    if args.rerun:  # this invocation's runs again; runs of other schedule lengths stay in the report
        for path in config_paths:
            for seed in args.seeds:
                stored.pop(key_for(path, steps, seed), None)

    def run_students(students: dict[str, str], case: str, seed: int) -> dict[str, dict[str, Any]]:
        """One distillation run of the configs ``students`` (loss setting -> config path); their records by key.

        Several configs of a case train side by side (``--students``, one student each: they differ in their
        loss weights only); a single one trains as its config says, in a folder of its own.
        """
        base = next(iter(students.values()))
        output_dir = root / "ablation" / f"{case}-{steps}steps-seed{seed}"
        flags = [*overrides_for(configs[base], steps), "--seed", str(seed), "--overwrite_output_dir", "true"]
        flags += ["--disable_tqdm", "true"]
        if len(students) > 1:
            entries = [
                json.dumps({"name": loss, **{key: configs[path][key] for key in LOSS_KEYS if key in configs[path]}})
                for loss, path in students.items()
            ]
            flags += ["--students", *entries]
            folders = {loss: output_dir / loss for loss in students}
        else:
            (loss,) = students
            output_dir = output_dir / loss
            folders = {loss: output_dir}
        # A run that is not in the report is (re)run from scratch.
        distill_time = launch_distillation(
            recipes / "distill.py", base, [*flags, "--output_dir", str(output_dir)], launcher=args.launcher, quiet=True
        )
        records = {}
        for loss, path in students.items():
            student = AutoModel.from_pretrained(folders[loss]).eval()
            record = {
                "key": key_for(path, steps, seed),
                "config": Path(path).name,
                "case": case,
                "loss": loss,
                "seed": seed,
                "max_steps": steps,
                "knn": knn_top1(student, bank, test),
                # The run's wall time, shared out over the students it trained.
                "distill_time_s": round(distill_time / len(students), 1),
                "students_in_run": len(students),
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            }
            tqdm.write(f"{record['config']} seed {seed}, {steps} steps: k-NN top-1 (k=20) {record['knn'][MAIN_K]:.2f}%")
            records[record["key"]] = record
        return records

    bar = tqdm(jobs, desc=f"ablation runs ({steps} steps)", unit="run", disable=not progress)
    for case, seed in bar:
        missing = [path for path in case_paths[case] if key_for(path, steps, seed) not in stored]
        bar.set_postfix_str(f"{case} seed {seed}")
        if not missing:
            continue
        if args.separate_runs:  # one run per configuration, its loss settings from its own file
            groups = [{loss_of(configs[path]): path} for path in missing]
        else:
            groups = [{loss_of(configs[path]): path for path in missing}]
        for students in groups:
            stored |= run_students(students, case, seed)
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps({"runs": list(stored.values())}, indent=2) + "\n")

    # Every stored run of these configs and seeds, whatever its schedule length, made with this teacher and the
    # current config files (a run whose key no longer matches was made with other settings and is left out).
    selected: list[dict[str, Any]] = []
    for record in stored.values():
        path = next((p for p in config_paths if Path(p).name == record["config"]), None)
        if path is None or record["seed"] not in args.seeds:
            continue
        record_steps = int(record.get("max_steps", configs[path]["max_steps"]))
        if record["key"] == key_for(path, record_steps, record["seed"]):
            selected.append({"max_steps": record_steps, "date": today, **record})

    # Each case's student at initialisation, built with each seed as distill.py builds it from the case's configs.
    case_configs = {case_of(config): config for config in configs.values()}
    untrained = []
    for case in (case for case in CASE_ORDER if case in case_configs):
        for seed in args.seeds:
            model = untrained_student(case_configs[case], scale.teacher.image_size, seed)
            untrained.append({"case": case, "seed": seed, "knn": knn_top1(model, bank, test)})

    reference = configs[config_paths[0]]
    state = {
        "runs": selected,
        "untrained": untrained,
        "teacher": teacher,
        "seeds": args.seeds,
        "num_train": scale.max_train,
        "num_test": scale.max_test,
        "config_steps": default_steps,
        "settings": {s: _settings(reference, s, scale.max_train) for s in {r["max_steps"] for r in selected}},
        "hardware": hardware_description(),
        "date": today,
        "total_time_s": time.time() - started,
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "teacher_targets": None
        if cache is None
        else {
            "views_per_image": args.teacher_targets_views,
            "storage_dtype": args.teacher_targets_dtype,
            "caching_time_s": round(cache_time, 1),
        },
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in state.items() if key not in ("teacher", "settings")}
    results_path.write_text(
        json.dumps({**summary, "runs": list(stored.values()), "selected": selected}, indent=2) + "\n"
    )
    report = Path(args.results)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(keep_other_sections(report.read_text() if report.is_file() else "", render_results(state)))
    print(f"Wrote {report} ({len(selected)} runs, {state['total_time_s'] / 60:.1f} min)")
    return state
