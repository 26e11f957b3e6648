"""The ablation's wall time three ways: one distillation run per configuration, one per case, and one per case
from a teacher-target cache.

``recipes/ablation.py`` trains the three loss settings of an attention case side by side, in one run per
seed with one teacher forward per batch; with ``--separate_runs`` it trains each configuration in a run
of its own, as it did before; with ``--teacher_targets_views K`` the teacher runs once, before any run, over
K recorded views per image, and every run trains from those stored targets. This benchmark runs the same
cases and seeds each way, in turns, each in a folder of its own (sharing the cached demo teacher and the
data), and prints each way's wall time (the caching included), their ratios, and the students' k-NN: the
first two train every student exactly alike (their largest difference should be 0); from the cache each
image is trained on its stored views instead of fresh ones, so its k-NN is another draw.

    python bench/bench_ablation.py                              # case (c), seed 0, 600 steps: ~10 min on 2 cores
    python bench/bench_ablation.py --cases same heads patch --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attndistill_hf.demo.fashion_mnist import prepare_fashion_mnist
from attndistill_hf.demo.pipeline import FULL, TeacherRunArguments, train_teacher
from attndistill_hf.hardware import hardware_description

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "configs"
WAYS: dict[str, list[str]] = {
    "one run per config": ["--separate_runs"],
    "one run per case": [],
    "one run per case, from a cache": ["--teacher_targets_views", "1"],
}


def run_ablation(way: str, case: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    """``recipes/ablation.py`` on one case's configs, one way, in ``<work_dir>/<way>``; the runs it measured and
    the seconds it spent caching the teacher's targets (0 without a cache)."""
    root = args.work_dir / way.replace(" ", "-").replace(",", "")
    root.mkdir(parents=True, exist_ok=True)
    link = root / "demo-teacher"
    if not link.exists():
        link.symlink_to(args.teacher_dir.resolve(), target_is_directory=True)
    command = [
        sys.executable,
        str(REPO / "recipes" / "ablation.py"),
        "--configs",
        str(CONFIGS / f"ablation_{case}_*.yaml"),
    ]
    command += ["--seeds", *map(str, args.seeds), "--max_steps", str(args.max_steps), "--output_root", str(root)]
    command += ["--data_dir", str(args.data_dir), "--results", str(root / "results.md"), "--rerun", "--no_progress"]
    print(f"== case {case}, {way}", flush=True)
    subprocess.run([*command, *WAYS[way]], check=True)
    measured = json.loads((root / "ablation" / "results.json").read_text())
    return measured["selected"], (measured.get("teacher_targets") or {}).get("caching_time_s", 0.0)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["heads"], choices=["same", "heads", "patch"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--data_dir", type=Path, default=REPO / "data" / "fashion_mnist")
    parser.add_argument("--teacher_dir", type=Path, default=REPO / "outputs" / "demo-teacher")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "bench-ablation")
    args = parser.parse_args(argv)
    # The teacher both ways share: trained once (or found in its cache) before either is timed.
    prepare_fashion_mnist(args.data_dir, max_train=FULL.max_train, max_test=FULL.max_test)
    train_teacher(FULL.teacher, TeacherRunArguments(str(args.data_dir), str(args.teacher_dir)))
    results: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    caching: dict[str, float] = dict.fromkeys(WAYS, 0.0)
    for case in args.cases:  # the ways in turns, case by case
        for way in WAYS:
            runs, seconds = run_ablation(way, case, args)
            results[way] += runs
            caching[way] += seconds
    rows = []
    for way, runs in results.items():
        distill = sum(run["distill_time_s"] for run in runs)
        rows.append(
            {
                "way": way,
                "runs": round(sum(1 / run["students_in_run"] for run in runs)),
                "students": len(runs),
                "caching_s": caching[way],
                "distill_s": distill,
                "total_s": caching[way] + distill,
                "knn": {(run["config"], run["seed"]): run["knn"] for run in runs},
            }
        )
    separate, together, cached = rows
    knn_gap = max(
        abs(separate["knn"][run][k] - together["knn"][run][k]) for run in separate["knn"] for k in separate["knn"][run]
    )
    print(
        f"\n{hardware_description()}; cases {', '.join(args.cases)}, seeds {', '.join(map(str, args.seeds))}, "
        f"{args.max_steps} steps; 1-minute load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        "| ablation runs | distillation runs | students | teacher caching (min) | distillation (min) | total (min) "
        "| mean k-NN top-1 (k=20) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mean_knn = sum(knn["20"] for knn in row["knn"].values()) / len(row["knn"])
        print(
            f"| {row['way']} | {row['runs']} | {row['students']} | {row['caching_s'] / 60:.1f} | "
            f"{row['distill_s'] / 60:.1f} | {row['total_s'] / 60:.1f} | {mean_knn:.2f} |"
        )
    print(
        f"\nOne run per case / one run per config: {together['total_s'] / separate['total_s']:.3f} "
        f"({separate['total_s'] / together['total_s']:.2f}x faster); largest k-NN difference between them: "
        f"{knn_gap:.2f} points.\nFrom a cache / one run per case: {cached['total_s'] / together['total_s']:.3f} "
        f"({together['total_s'] / cached['total_s']:.2f}x faster, the caching included)."
    )
    return rows


if __name__ == "__main__":
    main()
