"""Tables and target checks from the JSON rows of ``bench_step.py`` and ``bench_data.py``.

Reads the rows a GPU run wrote (``bench/run_gpu.sh`` calls this last), prints the Markdown tables that
``docs/benchmarks.md`` records and checks each performance target of the project on them:

* the default step within 3% of the floor for each of the paper's three pairs, and at least 1.5x / 2.5x /
  1.6x the naive step (ViT-S/16 -> ViT-T/16, ViT-S/8 -> ViT-S/16, ViT-B/16 -> ViT-S/16); other pairs
  (the DINOv3 one) are in the tables but have no target;
* peak memory of the default step for ViT-S/8 -> ViT-S/16 at most a third of the naive step's;
* ``default+compile`` (inductor) for ViT-S/16 -> ViT-T/16 at 7,000 img/s or more;
* GPU decoding at 6,000 img/s or more, and at least the fastest ViT-S/16 -> ViT-T/16 step (so the input
  pipeline does not hold the training step back);
* the CPU path's workers used well: img/s with the most workers at least 75% of (workers x img/s with one
  worker).

The thresholds are those of one H100; on another device the check still runs and says which device it
was. A target whose rows are missing is reported as not measured. ``--fail_on_missed``: exit status 1
when a measured target is missed.

    python bench/report.py bench/results/2026-11-26-nvidia-h100-80gb-hbm3*.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_step import format_table

# (pair key, minimum speed-up of the default step over the naive step): the paper's pairs only.
SPEEDUP_TARGETS = (("s16-t16", 1.5), ("s8-s16", 2.5), ("b16-s16", 1.6))
FLOOR_SLACK = 0.03  # the default step may be at most 3% slower than the floor
MEMORY_PAIR, MEMORY_FRACTION = "s8-s16", 1 / 3
COMPILE_PAIR, COMPILE_IMG_PER_S = "s16-t16", 7000.0
GPU_DECODE_IMG_PER_S = 6000.0
WORKER_EFFICIENCY = 0.75


@dataclass(frozen=True)
class Target:
    """One checked target: what was measured against what is required; ``passed`` None when not measured."""

    name: str
    measured: str
    required: str
    passed: bool | None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.passed]


def load_rows(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Step rows (``bench_step.py``) and data rows (``bench_data.py``) from JSON files, told apart by their keys."""
    step_rows: list[dict[str, Any]] = []
    data_rows: list[dict[str, Any]] = []
    for path in paths:
        rows = json.loads(Path(path).read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        for row in rows:
            if "pair_key" in row and "mode" in row:
                step_rows.append(row)
            elif "path" in row and "workers" in row:
                data_rows.append(row)
            else:
                raise ValueError(f"{path}: a row that is neither a step nor a data row: {sorted(row)}")
    return step_rows, data_rows


def _step(rows: Sequence[dict[str, Any]], pair: str, mode: str) -> dict[str, Any] | None:
    found = [row for row in rows if row["pair_key"] == pair and row["mode"] == mode]
    return max(found, key=lambda row: row["img_per_s"]) if found else None


def _label(rows: Sequence[dict[str, Any]], pair: str) -> str:
    return next((row["pair"] for row in rows if row["pair_key"] == pair), pair)


def _at_least(name: str, value: float | None, minimum: float, unit: str, note: str = "") -> Target:
    """``value >= minimum``, or not measured when ``value`` is None; ``unit`` "x" (ratio) or " img/s"."""
    shown = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{v:,.0f}{unit}")
    if value is None:
        return Target(name, "-", f">= {shown(minimum)}", None)
    return Target(name, shown(value) + note, f">= {shown(minimum)}", value >= minimum)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "img_per_s") -> float | None:
    return a[key] / b[key] if a and b else None


def check_targets(step_rows: Sequence[dict[str, Any]], data_rows: Sequence[dict[str, Any]]) -> list[Target]:
    """Every performance target, in the order of the project's list."""
    targets: list[Target] = []
    for pair, speedup in SPEEDUP_TARGETS:
        label = _label(step_rows, pair)
        default, floor, naive = (_step(step_rows, pair, mode) for mode in ("default", "floor", "naive"))
        targets.append(_at_least(f"{label}: default vs floor", _ratio(default, floor), 1 - FLOOR_SLACK, "x"))
        targets.append(_at_least(f"{label}: default vs naive", _ratio(default, naive), speedup, "x"))

    default, naive = _step(step_rows, MEMORY_PAIR, "default"), _step(step_rows, MEMORY_PAIR, "naive")
    name = f"{_label(step_rows, MEMORY_PAIR)}: peak memory, default vs naive"
    # A process's resident set (CPU runs) does not isolate the step's memory: only CUDA peaks count.
    if default and naive and default["peak_kind"] == naive["peak_kind"] == "cuda_max_allocated":
        ratio = default["peak_gib"] / naive["peak_gib"]
        targets.append(Target(name, f"{ratio:.2f}x", f"<= {MEMORY_FRACTION:.2f}x", ratio <= MEMORY_FRACTION))
    else:
        targets.append(Target(name, "-", f"<= {MEMORY_FRACTION:.2f}x (CUDA peaks)", None))

    pair_rows = [row for row in step_rows if row["pair_key"] == COMPILE_PAIR]
    compiled = [row["img_per_s"] for row in pair_rows if row.get("compile_backend") == "inductor"]
    label = _label(step_rows, COMPILE_PAIR)
    targets.append(
        _at_least(f"{label}: default+compile (inductor)", max(compiled, default=None), COMPILE_IMG_PER_S, " img/s")
    )

    on_gpu = [row["img_per_s"] for row in data_rows if row["path"] == "gpu" and row["device"] == "cuda"]
    best_gpu = max(on_gpu, default=None)
    targets.append(_at_least("GPU decoding + augmentation", best_gpu, GPU_DECODE_IMG_PER_S, " img/s"))
    fastest = max((row["img_per_s"] for row in pair_rows if row["mode"] != "naive"), default=None)
    targets.append(
        _at_least(
            f"GPU input pipeline vs the fastest {label} step",
            best_gpu / fastest if best_gpu is not None and fastest else None,
            1.0,
            "x",
            f" ({fastest:,.0f} img/s step)" if fastest else "",
        )
    )

    cpu = {row["workers"]: row["img_per_s"] for row in data_rows if row["path"] == "cpu"}
    most = max(cpu, default=0)
    name, required = "CPU path: worker scaling", f">= {WORKER_EFFICIENCY:.0%} of linear"
    if 1 in cpu and most > 1:
        efficiency = cpu[most] / (most * cpu[1])
        measured = f"{efficiency:.0%} ({most} workers: {cpu[most]:,.0f} img/s; 1 worker: {cpu[1]:,.0f})"
        targets.append(Target(name, measured, required, efficiency >= WORKER_EFFICIENCY))
    else:
        targets.append(Target(name, "-", f"{required} (needs runs with 1 and more workers)", None))
    return targets


def format_targets(targets: Sequence[Target]) -> str:
    lines = ["| target | measured | required | verdict |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.required} | {t.verdict} |" for t in targets]
    return "\n".join(lines)


def format_data_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| pipeline | workers | device | img/s |", "|---|---|---|---|"]
    lines += [f"| {row['path']} | {row['workers']} | {row['device_name']} | {row['img_per_s']:,.0f} |" for row in rows]
    return "\n".join(lines)


def environment(step_rows: Sequence[dict[str, Any]], data_rows: Sequence[dict[str, Any]]) -> str:
    """One line naming the device(s), the software versions and the date(s) the rows carry."""
    parts = []
    for key in ("device", "torch", "transformers", "date"):
        values = sorted({str(row[key]) for row in step_rows if key in row})
        if values:
            parts.append(f"{key} {', '.join(values)}")
    versions = sorted({str(row["torchvision"]) for row in data_rows if "torchvision" in row})
    if versions:
        parts.append(f"torchvision {', '.join(versions)}")
    cores = sorted({str(row["cpu_count"]) for row in data_rows if "cpu_count" in row})
    if cores:
        parts.append(f"{', '.join(cores)} CPU cores")
    return "; ".join(parts)


def format_report(step_rows: Sequence[dict[str, Any]], data_rows: Sequence[dict[str, Any]]) -> str:
    sections = [environment(step_rows, data_rows)]
    if step_rows:
        sections.append("Training step:\n\n" + format_table(step_rows))
    if data_rows:
        sections.append("Input pipeline:\n\n" + format_data_table(data_rows))
    sections.append("Targets:\n\n" + format_targets(check_targets(step_rows, data_rows)))
    return "\n\n".join(sections) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Target]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_files", nargs="+", type=Path, help="JSON files written by bench_step.py / bench_data.py")
    parser.add_argument("--output", type=Path, default=None, help="also write the report (Markdown) to this file")
    parser.add_argument(
        "--fail_on_missed", action="store_true", help="exit with status 1 when a measured target is missed"
    )
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.json_files if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    step_rows, data_rows = load_rows(args.json_files)
    report = format_report(step_rows, data_rows)
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    targets = check_targets(step_rows, data_rows)
    if args.fail_on_missed and any(t.passed is False for t in targets):
        raise SystemExit(1)
    return targets


if __name__ == "__main__":
    main()
