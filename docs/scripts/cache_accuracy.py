"""Distillation from a teacher-target cache against the online teacher, on the offline demo (docs/results.md).

At equal student steps (the demo config: 800 steps of 64 images, about 5 epochs of the 10,000 Fashion-MNIST
training images), the student is distilled with the teacher online (a fresh view of each image every
epoch) and from caches of K = 1, 4 and 16 recorded views per image, each with several seeds; the table
gives the weighted k-NN top-1 (k = 20, every training image in the bank) as mean, spread and per seed, and
the cache's size (wall times: bench/bench_cache.py). Needs the demo's data and teacher (``make demo`` prepares both):

    python docs/scripts/cache_accuracy.py --output_root outputs/cache-study
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from attndistill_hf import distill
from attndistill_hf.cache_writer import CacheArguments, build_target_cache
from attndistill_hf.data import DataArguments
from attndistill_hf.hub import set_section

REPO = Path(__file__).resolve().parents[2]
SECTION = "Teacher targets computed once: cache against online teacher"


def knn_top1(result: Any) -> float:
    return float(result.students[None].knn["20"]["top1"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.output_root)
    data = Path(args.data_dir)
    fields = {
        "teacher_name_or_path": args.teacher,
        "data_files": str(data / "train-*.parquet"),
        "eval_data_files": str(data / "test-*.parquet"),
        "attention_figure_images": 0,
        "disable_tqdm": True,
    }
    caches: dict[int, dict[str, Any]] = {}
    for views in args.views:
        folder = root / f"cache-k{views}"
        started = time.time()
        info = build_target_cache(
            CacheArguments(
                teacher_name_or_path=args.teacher,
                output_dir=str(folder),
                views_per_image=views,
                num_workers=0,
                batch_size=256,
            ),
            DataArguments(data_files=fields["data_files"], image_size=32),
        )
        size = sum(path.stat().st_size for path in (folder / "data").glob("*.parquet"))
        caches[views] = {
            "seconds": round(time.time() - started, 1),
            "bytes_per_view": round(size / (info.num_images * views), 1),
            "images": info.num_images,
        }
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:
        settings = {"online": {}} | {
            f"cache K={views}": {"teacher_targets": str(root / f"cache-k{views}")} for views in args.views
        }
        for name, extra in settings.items():
            started = time.time()
            own = {**fields, **extra, "seed": seed, "output_dir": str(root / f"{name.replace(' ', '-')}-seed{seed}")}
            if "teacher_targets" in extra:
                own["teacher_name_or_path"] = None
            result = distill(args.config, **own)
            runs.setdefault(name, {})[seed] = {"knn_top1": knn_top1(result), "seconds": round(time.time() - started, 1)}
            print(
                f"{name} seed {seed}: k-NN {runs[name][seed]['knn_top1']:.2f} in {runs[name][seed]['seconds']} s",
                flush=True,
            )
    return {"caches": caches, "runs": runs, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d")}


def table(study: dict[str, Any]) -> str:
    lines = [
        "| setting | k-NN top-1 (k=20), mean ± std | per seed | teacher forwards |",
        "|---|---|---|---|",
    ]
    for name, by_seed in study["runs"].items():
        values = [by_seed[seed]["knn_top1"] for seed in study["seeds"]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        if name == "online":
            forwards = "every step"
        else:
            cache = study["caches"][int(name.split("=")[1])]
            forwards = f"once, before training ({cache['bytes_per_view']:.0f} bytes per view)"
        per_seed = ", ".join(f"{value:.2f}" for value in values)
        lines.append(f"| {name} | {statistics.mean(values):.2f} ± {spread:.2f} | {per_seed} | {forwards} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="outputs/demo-teacher")
    parser.add_argument("--data_dir", default="data/fashion_mnist")
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "demo.yaml"))
    parser.add_argument("--output_root", default="outputs/cache-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--results", default=str(REPO / "docs" / "results.md"), help="Markdown file to update.")
    args = parser.parse_args()
    study = run(args)
    Path(args.output_root, "cache_accuracy.json").write_text(json.dumps(study, indent=2) + "\n")
    print(table(study))
    results = Path(args.results)
    body = (
        f"Measured {study['date']} by `docs/scripts/cache_accuracy.py` on the offline demo (its config: 800 steps of "
        f"64 images, about 5 epochs), seeds {', '.join(map(str, study['seeds']))}; caches of float16 targets with "
        "seed 0 for the recorded views.\n\n" + table(study)
    )
    results.write_text(set_section(results.read_text(), SECTION, body))


if __name__ == "__main__":
    main()
