"""One case of the ablation trained from teacher-target caches against the online teacher (docs/results.md).

``recipes/ablation.py`` runs the case's three loss settings (projector only, attention only, both) for every
seed with the teacher online, then again from caches of K = 1, 4 and 16 recorded views per train image
(``--teacher_targets_views K``; float16 targets, and other precisions with ``--cache_dtypes``), all at the
same student steps. The table gives each setting's weighted k-NN top-1 (k = 20) as mean ± spread over the
seeds and per seed, and the differences to the online teacher. Each way runs in a folder of its own under
``--output_root`` (the demo's data and teacher are reused; ``make demo`` prepares both); the ways of an
earlier invocation with the same case, steps and seeds stay in the report:

    python docs/scripts/cache_ablation_accuracy.py                  # case (c), seeds 0 1 2, 600 steps
    python docs/scripts/cache_ablation_accuracy.py --views 16 --cache_dtypes float32   # adds float32 K=16
    python docs/scripts/cache_ablation_accuracy.py --report_only    # the report again, from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from attndistill_hf.demo.ablation import CASE_ORDER, LOSSES, MAIN_K, AblationArguments, run_ablation
from attndistill_hf.hardware import hardware_description
from attndistill_hf.hub import set_section
from attndistill_hf.target_cache import STORAGE_DTYPES

REPO = Path(__file__).resolve().parents[2]
SECTION = "Teacher targets computed once: an ablation case from caches"


def run(args: argparse.Namespace, study: dict[str, Any]) -> dict[str, Any]:
    """Every way (online, then each K and storage precision) over the case's configs and the seeds; their runs
    and caching times, added to ``study`` (the ways of an earlier invocation with the same case, steps and seeds)."""
    root = Path(args.output_root)
    ways: dict[str, tuple[int | None, str]] = {"online": (None, "float16")}
    for dtype in args.cache_dtypes:
        for views in args.views:
            ways[f"cache K={views}" + ("" if dtype == "float16" else f" {dtype}")] = (views, dtype)
    same = {"seeds": args.seeds, "case": args.case, "max_steps": args.max_steps}
    if any(study.get(key) != value for key, value in same.items()):
        study = {"ways": {}, **same}
    for name, (views, dtype) in ways.items():
        way_root = root / name.replace(" ", "-").replace("=", "")
        if not (way_root / "demo-teacher").is_dir():  # the demo's teacher, not trained again per way
            shutil.copytree(args.teacher, way_root / "demo-teacher")
        started = time.time()
        state = run_ablation(
            AblationArguments(
                seeds=args.seeds,
                configs=str(REPO / "recipes" / "configs" / f"ablation_{args.case}_*.yaml"),
                output_root=str(way_root),
                data_dir=args.data_dir,
                results=str(way_root / "report.md"),
                max_steps=args.max_steps,
                teacher_targets_views=views,
                teacher_targets_dtype=dtype,
                progress=False,
            ),
            REPO / "recipes",
        )
        study["ways"][name] = {
            "runs": [
                {"loss": r["loss"], "seed": r["seed"], "knn_top1": r["knn"][MAIN_K], "seconds": r["distill_time_s"]}
                for r in state["runs"]
                if r["max_steps"] == args.max_steps
            ],
            "caching_time_s": (state["teacher_targets"] or {}).get("caching_time_s", 0.0),
            "seconds": round(time.time() - started, 1),
        }
        print(f"{name}: {study['ways'][name]['seconds'] / 60:.1f} min", flush=True)
    study["machine"] = hardware_description()
    today, first = time.strftime("%Y-%m-%d"), study.get("date", "").split(" to ")[0]
    study["date"] = today if first in ("", today) else f"{first} to {today}"
    return study


def _scores(study: dict[str, Any], way: str, loss: str) -> list[float]:
    runs = sorted((r for r in study["ways"][way]["runs"] if r["loss"] == loss), key=lambda r: r["seed"])
    return [r["knn_top1"] for r in runs]


def table(study: dict[str, Any]) -> str:
    """One row per way and loss setting: mean ± spread, per seed, difference of the mean to the online teacher."""
    lines = [
        "| teacher targets | loss | k-NN top-1 (k=20), mean ± std | per seed | vs online |",
        "|---|---|---|---|---|",
    ]
    for way in study["ways"]:
        for loss, label in LOSSES.items():
            values = _scores(study, way, loss)
            if not values:
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            online = _scores(study, "online", loss)
            versus = "-" if way == "online" else f"{statistics.mean(values) - statistics.mean(online):+.2f}"
            per_seed = ", ".join(f"{value:.2f}" for value in values)
            lines.append(f"| {way} | {label} | {statistics.mean(values):.2f} ± {spread:.2f} | {per_seed} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="heads", choices=CASE_ORDER, help="The attention case (heads: case c).")
    parser.add_argument("--teacher", default="outputs/demo-teacher")
    parser.add_argument("--data_dir", default="data/fashion_mnist")
    parser.add_argument("--output_root", default="outputs/cache-ablation-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--cache_dtypes", nargs="+", default=["float16"], choices=STORAGE_DTYPES, help="Storage precisions."
    )
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--results", default=str(REPO / "docs" / "results.md"), help="Markdown file to update.")
    parser.add_argument(
        "--report_only", action="store_true", help="Write the report from the study's JSON of an earlier run."
    )
    args = parser.parse_args()
    saved = Path(args.output_root, "cache_ablation_accuracy.json")
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    if args.report_only:
        study = earlier
    else:
        study = run(args, earlier)
        saved.write_text(json.dumps(study, indent=2) + "\n")
    print(table(study))
    results = Path(args.results)
    # Wall times stay in the JSON: the ways may run beside other work; bench/bench_ablation.py times them.
    body = (
        f"Measured {study['date']} on {study['machine']} by `docs/scripts/cache_ablation_accuracy.py`: the "
        "ablation's case "
        f"`{study['case']}` (`recipes/configs/ablation_{study['case']}_*.yaml`), its three loss settings side by "
        f"side, {study['max_steps']} steps each, seeds {', '.join(map(str, study['seeds']))}, with the teacher "
        "online and from caches of K recorded views per train image (`recipes/ablation.py "
        "--teacher_targets_views K`), their targets stored as float16 unless the row says otherwise.\n\n" + table(study)
    )
    results.write_text(set_section(results.read_text(), SECTION, body))


if __name__ == "__main__":
    main()
