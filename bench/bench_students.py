"""Several students of one teacher in one run against one run per student: what the shared teacher saves.

For N = 1, 2, 3 students (projector + attention, attention only, projector only: the ablation's three
loss settings) of the same teacher, on the same fixed batch, this times one optimizer step of

- ``together``: one ``AttnDistillTrainer`` with the N students (one teacher forward per batch), and
- ``separate``: each student's own single-student trainer, one after the other (N teacher forwards),

plus the teacher's forward pass alone. The target: a step with N students costs the N separate steps
minus (N - 1) teacher forwards, within 5 % (``together / (separate - (N - 1) x teacher) <= 1.05``).
Every step is the trainer's own ``training_step`` (forward, loss, backward) and an AdamW step. All of
them are timed in turns, one step of each per round, so that the machine's load reaches them alike; on
CUDA the table adds each run's peak memory (the students of one run keep their activations until the
one backward pass of their summed loss).

    python bench/bench_students.py                    # tiny models (seconds), then the paper's sizes
    python bench/bench_students.py --sizes tiny --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import ViTConfig, ViTModel

from attndistill_hf.attention import last_cls_attention
from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.hardware import hardware_description
from attndistill_hf.models import build_student
from attndistill_hf.students import StudentSpec
from attndistill_hf.trainer import AttnDistillTrainer

# The ablation's loss settings, in the order students are added.
LOSS_SETTINGS: dict[str, dict[str, float]] = {
    "both": {},
    "attention": {"proj_loss_weight": 0.0},
    "projector": {"attn_loss_weight": 0.0},
}
TARGET = 1.05


@dataclass(frozen=True)
class Size:
    """Teacher and student architectures and the batch they are timed at."""

    teacher: dict[str, int]
    student_preset: str
    student_overrides: dict[str, int]
    image_size: int
    batch: int


SIZES: dict[str, Size] = {
    # A few seconds on a CPU: 2 blocks, the demo's widths.
    "tiny": Size(
        {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 4},
        "vit-mini-patch4",
        {"num_hidden_layers": 2},
        32,
        16,
    ),
    # The paper's ViT-S/16 -> ViT-T/16 pair at 224 px (a small batch on a CPU).
    "paper": Size(
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 16},
        "vit-tiny-patch16",
        {},
        224,
        8,
    ),
}


def build_teacher(size: Size) -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(
        **size.teacher, intermediate_size=4 * size.teacher["hidden_size"], image_size=size.image_size, qkv_bias=True
    )
    return ViTModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False).eval()


def build_students(size: Size, count: int) -> dict[str, StudentSpec]:
    names = list(LOSS_SETTINGS)[:count]
    return {
        name: StudentSpec(
            build_student(size.student_preset, image_size=size.image_size, seed=index, **size.student_overrides),
            **LOSS_SETTINGS[name],
        )
        for index, name in enumerate(names)
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def optimizer_step(trainer: AttnDistillTrainer, pixels: torch.Tensor) -> Callable[[], None]:
    """One ``training_step`` + AdamW step of ``trainer`` on the fixed batch, as a callable."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop, which is not run here
    model = trainer.model
    model.train()

    def step() -> None:
        trainer.training_step(model, {"pixel_values": pixels})
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def teacher_forward(trainer: AttnDistillTrainer, pixels: torch.Tensor) -> Callable[[], None]:
    """The teacher's forward pass with its CLS attention, as the trainer runs it once per batch."""

    def forward() -> None:
        with torch.no_grad():
            last_cls_attention(trainer.teacher, pixels)

    return forward


def interleaved_seconds(
    workloads: dict[str, Callable[[], None]], warmup: int, steps: int
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Median seconds (and CUDA peak memory in GiB) of each workload, timed in turns.

    Every round runs each workload once, starting one further along each round, so that a change of
    the machine's load or clock during the measurement reaches all of them alike and the ratios
    between them stay fair.
    """
    names = list(workloads)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float | None] = dict.fromkeys(names)
    for index in range(warmup + steps):
        for offset in range(len(names)):
            name = names[(index + offset) % len(names)]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _sync()
            start = time.perf_counter()
            workloads[name]()
            _sync()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
                if torch.cuda.is_available():
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    peaks[name] = max(peaks[name] or 0.0, peak)
    return {name: statistics.median(values) for name, values in times.items()}, peaks


def make_trainer(
    students: dict[str, StudentSpec], teacher: ViTModel, folder: str, bf16: bool = False
) -> AttnDistillTrainer:
    """One trainer for several students; a single student trains alone, with its loss settings as the run's."""
    single = next(iter(students.values())) if len(students) == 1 else None
    own = {name: getattr(single, name) for name in ("proj_loss_weight", "attn_loss_weight")} if single else {}
    args = AttnDistillConfig(
        output_dir=folder,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-4,
        bf16=bf16,
        **{name: value for name, value in own.items() if value is not None},
    )
    return AttnDistillTrainer(single.model if single else students, teacher, args)


def measure(
    size_name: str,
    counts: Sequence[int],
    warmup: int,
    steps: int,
    batch_size: int | None = None,
    bf16: bool = False,
) -> list[dict[str, Any]]:
    """One row per student count: the N-student run, the N single-student runs and the teacher, timed in turns.

    The single-student runs are the same three for every N (separate runs of the first N students are
    the sum of their times); the 1-student "one run" is a second, independent trainer of the first
    student, so its row shows the measurement's noise.
    """
    size = SIZES[size_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = build_teacher(size).to(device)
    batch = batch_size or size.batch
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, size.image_size, size.image_size, generator=generator).to(device)
    with tempfile.TemporaryDirectory() as folder:  # the trainers write nothing; TrainingArguments needs one
        singles = {
            name: make_trainer({name: spec}, teacher, folder, bf16)
            for name, spec in build_students(size, max(counts)).items()
        }
        workloads = {f"separate/{name}": optimizer_step(trainer, pixels) for name, trainer in singles.items()}
        for count in counts:
            trainer = make_trainer(build_students(size, count), teacher, folder, bf16)
            workloads[f"together/{count}"] = optimizer_step(trainer, pixels)
        workloads["teacher"] = teacher_forward(next(iter(singles.values())), pixels)
        seconds, peaks = interleaved_seconds(workloads, warmup, steps)
    rows = []
    for count in counts:
        firsts = list(singles)[:count]
        separate = sum(seconds[f"separate/{name}"] for name in firsts)
        together = seconds[f"together/{count}"]
        single_peaks = [peaks[f"separate/{name}"] for name in firsts]
        rows.append(
            {
                "size": size_name,
                "students": count,
                "batch": batch,
                "together_s": together,
                "separate_s": separate,
                "teacher_s": seconds["teacher"],
                "ratio_to_target": together / (separate - (count - 1) * seconds["teacher"]),
                "speedup_vs_separate": separate / together,
                "together_peak_gib": peaks[f"together/{count}"],
                "separate_peak_gib": None if None in single_peaks else max(single_peaks),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    with_memory = any(row["together_peak_gib"] is not None for row in rows)
    memory_header = " peak memory, one run / largest separate (GiB) |" if with_memory else ""
    print(
        "| size | students | batch | one run (s/step) | separate runs (s/step) | teacher forward (s) | "
        f"one run / (separate - (N-1) x teacher) | speed-up vs separate |{memory_header}"
    )
    print("|---" * (9 if with_memory else 8) + "|")
    for row in rows:
        verdict = "met" if row["ratio_to_target"] <= TARGET else "missed"
        memory = f" {row['together_peak_gib']:.2f} / {row['separate_peak_gib']:.2f} |" if with_memory else ""
        print(
            f"| {row['size']} | {row['students']} | {row['batch']} | {row['together_s']:.4f} | "
            f"{row['separate_s']:.4f} | {row['teacher_s']:.4f} | {row['ratio_to_target']:.3f} ({verdict}) | "
            f"{row['speedup_vs_separate']:.2f}x |{memory}"
        )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "paper"])
    parser.add_argument("--students", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--batch_size", type=int, default=None, help="Override every size's batch.")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision, as a GPU run trains.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {hardware_description(device, 1)} | torch {torch.__version__} | {args.steps} timed steps (median)")
    rows = [
        row
        for size in args.sizes
        for row in measure(size, args.students, args.warmup, args.steps, args.batch_size, args.bf16)
    ]
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
