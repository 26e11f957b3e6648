"""Several students of one teacher in one run against one run per student: what the shared teacher saves.

For N = 1, 2, 3 students (projector + attention, attention only, projector only: the ablation's three
loss settings) of the same teacher, on the same fixed batch, this times one optimizer step of

- ``together``: one ``AttnDistillTrainer`` with the N students (one teacher forward per batch), and
- ``separate``: each student's own single-student trainer, one after the other (N teacher forwards),

plus the teacher's forward pass alone. The target: a step with N students costs the N separate steps
minus (N - 1) teacher forwards, within 5 % (``together / (separate - (N - 1) x teacher) <= 1.05``).
Every step is the trainer's own ``training_step`` (forward, loss, backward) and an AdamW step.

    python bench/bench_students.py                    # tiny models (seconds), then the paper's sizes
    python bench/bench_students.py --sizes tiny --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import ViTConfig, ViTModel

from attndistill_hf.attention import last_cls_attention
from attndistill_hf.hardware import hardware_description
from attndistill_hf.models import build_student
from attndistill_hf.trainer import AttnDistillConfig, AttnDistillTrainer, StudentSpec

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


def step_seconds(trainer: AttnDistillTrainer, pixels: torch.Tensor, warmup: int, steps: int) -> float:
    """Median seconds of ``training_step`` + an AdamW step on the fixed batch."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop, which is not run here
    model = trainer.model
    model.train()
    times = []
    for index in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        trainer.training_step(model, {"pixel_values": pixels})
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        _sync()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def teacher_seconds(trainer: AttnDistillTrainer, pixels: torch.Tensor, warmup: int, steps: int) -> float:
    """Median seconds of the teacher's forward pass with its CLS attention, as a trainer runs it."""
    pixels = pixels.to(trainer.args.device)
    times = []
    with torch.no_grad():
        for index in range(warmup + steps):
            _sync()
            start = time.perf_counter()
            last_cls_attention(trainer.teacher, pixels)
            _sync()
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_trainer(students: dict[str, StudentSpec], teacher: ViTModel, folder: str) -> AttnDistillTrainer:
    """One trainer for several students; a single student trains alone, with its loss settings as the run's."""
    single = next(iter(students.values())) if len(students) == 1 else None
    own = {name: getattr(single, name) for name in ("proj_loss_weight", "attn_loss_weight")} if single else {}
    args = AttnDistillConfig(
        output_dir=folder,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-4,
        **{name: value for name, value in own.items() if value is not None},
    )
    return AttnDistillTrainer(single.model if single else students, teacher, args)


def measure(size_name: str, counts: Sequence[int], warmup: int, steps: int) -> list[dict[str, float | int | str]]:
    size = SIZES[size_name]
    teacher = build_teacher(size)
    pixels = torch.randn(size.batch, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(1))
    rows = []
    with tempfile.TemporaryDirectory() as folder:  # the trainers write nothing; TrainingArguments needs one
        teacher_time = teacher_seconds(make_trainer(build_students(size, 1), teacher, folder), pixels, warmup, steps)
        for count in counts:
            together = step_seconds(make_trainer(build_students(size, count), teacher, folder), pixels, warmup, steps)
            separate = sum(
                step_seconds(make_trainer({name: spec}, teacher, folder), pixels, warmup, steps)
                for name, spec in build_students(size, count).items()
            )
            expected = separate - (count - 1) * teacher_time
            rows.append(
                {
                    "size": size_name,
                    "students": count,
                    "together_s": together,
                    "separate_s": separate,
                    "teacher_s": teacher_time,
                    "ratio_to_target": together / expected,
                    "speedup_vs_separate": separate / together,
                }
            )
    return rows


def print_table(rows: list[dict[str, float | int | str]]) -> None:
    print(
        "| size | students | one run (s/step) | separate runs (s/step) | teacher forward (s) | "
        "one run / (separate - (N-1) x teacher) | speed-up vs separate |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        verdict = "met" if row["ratio_to_target"] <= TARGET else "missed"
        print(
            f"| {row['size']} | {row['students']} | {row['together_s']:.4f} | {row['separate_s']:.4f} | "
            f"{row['teacher_s']:.4f} | {row['ratio_to_target']:.3f} ({verdict}) | {row['speedup_vs_separate']:.2f}x |"
        )


def main(argv: Sequence[str] | None = None) -> list[dict[str, float | int | str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "paper"])
    parser.add_argument("--students", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {hardware_description(device, 1)} | torch {torch.__version__} | {args.steps} timed steps (median)")
    rows = [row for size in args.sizes for row in measure(size, args.students, args.warmup, args.steps)]
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
