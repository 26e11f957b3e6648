"""The ablation's wall time with one distillation run per configuration (before) and per case (after).

``recipes/ablation.py`` trains the three loss settings of an attention case side by side, in one run per
seed with one teacher forward per batch; with ``--separate_runs`` it trains each configuration in a run
of its own, as it did before. This benchmark runs the same cases and seeds both ways, one after the
other in turns, each in a folder of its own (sharing the cached demo teacher and the data), and prints
the distillation wall time of each way, their ratio, and the largest difference between the students'
k-NN accuracies (each student trains exactly as it would alone, so it should be 0).

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
WAYS: dict[str, list[str]] = {"one run per config": ["--separate_runs"], "one run per case": []}


def run_ablation(way: str, case: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``recipes/ablation.py`` on one case's configs, one way, in ``<work_dir>/<way>``; the runs it measured."""
    root = args.work_dir / way.replace(" ", "-")
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
    return json.loads((root / "ablation" / "results.json").read_text())["selected"]


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
    for case in args.cases:  # the two ways in turns, case by case
        for way in WAYS:
            results[way] += run_ablation(way, case, args)
    rows = []
    for way, runs in results.items():
        rows.append(
            {
                "way": way,
                "runs": round(sum(1 / run["students_in_run"] for run in runs)),
                "students": len(runs),
                "distill_s": sum(run["distill_time_s"] for run in runs),
                "knn": {(run["config"], run["seed"]): run["knn"] for run in runs},
            }
        )
    before, after = rows
    knn_gap = max(
        abs(before["knn"][run][k] - after["knn"][run][k]) for run in before["knn"] for k in before["knn"][run]
    )
    print(
        f"\n{hardware_description()}; cases {', '.join(args.cases)}, seeds {', '.join(map(str, args.seeds))}, "
        f"{args.max_steps} steps; 1-minute load average {os.getloadavg()[0]:.1f} at the end"
    )
    print("| ablation runs | distillation runs | students | distillation wall time (min) | per student (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['way']} | {row['runs']} | {row['students']} | {row['distill_s'] / 60:.1f} | "
            f"{row['distill_s'] / row['students']:.0f} |"
        )
    print(
        f"\nOne run per case / one run per config: {after['distill_s'] / before['distill_s']:.3f} "
        f"({before['distill_s'] / after['distill_s']:.2f}x faster); largest k-NN difference between the ways: "
        f"{knn_gap:.2f} points"
    )
    return rows


if __name__ == "__main__":
    main()
