"""Wall time of a distillation epoch from a teacher-target cache against the same epoch with the teacher online.

For each teacher -> student pair (random weights; the paper's pairs of ``bench_step.PAIRS`` and a large
DINOv3 teacher), one run of this script writes a folder of JPEGs, caches the teacher's targets for one view
per image (``cache_writer.cache_teacher_targets``), then trains the same student for one epoch twice with
``AttnDistillTrainer``: with the teacher online, and from the cache. Both epochs decode, crop and batch the
same images with the published augmentation in the main process; only where the targets come from differs.
The table gives the seconds of each epoch (from its steps after the first, scaled to the epoch), their ratio,
the one-off cost of caching and the cache's bytes per view.

    python bench/bench_cache.py                                  # CPU: 128 images of 224 px, batch 32
    python bench/bench_cache.py --tiny --num_images 16 --image_size 32 --batch_size 8   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import PAIRS, PairSpec, TeacherSpec, build_bench_student, build_teacher, device_name

from attndistill_hf.cache_writer import cache_teacher_targets, teacher_cache_info
from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.data import IMAGENET_MEAN, IMAGENET_STD, DataArguments, ImageCollator, load_split, train_transform
from attndistill_hf.target_cache import CachedViewCollator, TargetCache
from attndistill_hf.trainer import AttnDistillTrainer

DINOV3_L16 = TeacherSpec("DINOv3 ViT-L/16", 1024, 24, 16, 16, architecture="dinov3_vit")
# The large-teacher pair: the teacher forward is most of the step, which is what a cache removes.
LARGE = {"dinov3-l16-s16": PairSpec("dinov3-l16-s16", DINOV3_L16, "dinov3-vits16", "DINOv3 ViT-S/16", "c")}
ALL_PAIRS = {**PAIRS, **LARGE}


def write_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` random JPEGs of ImageNet-like sizes in one class folder."""
    rng = np.random.default_rng(seed)
    target = folder / "class0"
    target.mkdir(parents=True)
    for index in range(count):
        height, width = int(rng.integers(300, 500)), int(rng.integers(300, 500))
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (target / f"{index}.jpg").write_bytes(buffer.getvalue())
    return folder


class StepClock(TrainerCallback):
    """The end time of every step: an epoch's time is taken from the steps after the first, which alone pays
    for the first use of each kernel and allocation (and would favour whichever mode runs second)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def epoch_seconds(self, steps: int) -> float:
        if len(self.ends) < 2:
            raise ValueError("an epoch of at least 2 steps is needed (raise --num_images or lower --batch_size)")
        return (self.ends[-1] - self.ends[0]) * steps / (len(self.ends) - 1)


def run_pair(pair: PairSpec, dataset: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    teacher = build_teacher(pair.teacher, args.image_size, attn_implementation="sdpa", tiny=args.tiny, seed=0)
    teacher.to(device)
    info = teacher_cache_info(
        teacher,
        teacher_name=pair.teacher.label,
        teacher_dtype="float32",
        image_size=args.image_size,
        views_per_image=1,
        seed=0,
        storage_dtype="float16",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        dataset="generated JPEGs",
    )
    folder = work / f"cache-{pair.key}"
    started = time.perf_counter()
    cache_teacher_targets(teacher, dataset, folder, info, batch_size=args.batch_size, device=device, progress=False)
    cache_seconds = time.perf_counter() - started
    size = sum(path.stat().st_size for path in (folder / "data").glob("*.parquet"))
    steps = len(dataset) // args.batch_size
    epochs: dict[str, float] = {}
    for mode in ("online", "cache"):
        student = build_bench_student(
            pair.student_preset, args.image_size, attn_implementation="sdpa", tiny=args.tiny, seed=0
        )
        config = AttnDistillConfig(
            output_dir=str(work / f"run-{pair.key}-{mode}"),
            per_device_train_batch_size=args.batch_size,
            max_steps=steps,
            learning_rate=1e-4,
            save_strategy="no",
            logging_steps=steps,
            dataloader_num_workers=0,
            use_cpu=args.device == "cpu",
            disable_tqdm=True,
            report_to="none",
        )
        if mode == "online":
            collator: Any = ImageCollator(train_transform(args.image_size), fill_skipped=True)
            source: Any = teacher
        else:
            source = TargetCache(folder)
            collator = CachedViewCollator(source, fill_skipped=True)
        trainer = AttnDistillTrainer(student, source, config, train_dataset=dataset, data_collator=collator)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        epochs[mode] = clock.epoch_seconds(steps)
    return {
        "pair": pair.label,
        "images": len(dataset),
        "batch": args.batch_size,
        "image_size": args.image_size,
        "online_s": round(epochs["online"], 4),
        "cache_s": round(epochs["cache"], 4),
        "speedup": round(epochs["online"] / epochs["cache"], 2),
        "caching_s": round(cache_seconds, 4),
        "bytes_per_view": round(size / len(dataset)),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| pair | epoch online (s) | epoch from cache (s) | online / cache | caching once (s) | bytes per view |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['pair']} | {row['online_s']:.1f} | {row['cache_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['caching_s']:.1f} | {row['bytes_per_view']:,} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=",".join(ALL_PAIRS), help=f"comma-separated, of {', '.join(ALL_PAIRS)}")
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tiny", action="store_true", help="2-block models of width 8 per head (smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    unknown = set(args.pairs.split(",")) - set(ALL_PAIRS)
    if unknown:
        parser.error(f"unknown pairs: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        dataset = load_split(DataArguments(train_dir=str(write_jpegs(work / "images", args.num_images))), "train")
        rows = [run_pair(ALL_PAIRS[key], dataset, args, work) for key in args.pairs.split(",")]
    stamp = {"date": datetime.date.today().isoformat(), "device": device_name(torch.device(args.device))}
    rows = [{**row, **stamp, "torch": torch.__version__} for row in rows]
    print(f"{stamp['device']}, {stamp['date']}, torch {torch.__version__}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
