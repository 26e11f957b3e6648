"""Input pipeline throughput: CPU workers (decode + bicubic augment) vs device decode + batched augment.

Generates ImageNet-like JPEGs (500 x 375, smooth content plus grain, about 70 KB at quality 90) in a
temporary folder, then measures images per second of

* ``cpu``: a DataLoader with ``--num_workers`` workers running ``ImageCollator`` + ``train_transform``
  (PIL decode, RandomResizedCrop bicubic, flip, normalise), the library's default path;
* ``gpu``: a DataLoader whose workers only gather bytes (``RawBytesCollator``), then ``GpuAugment`` on the
  device (nvJPEG batched decode, crop + resize + flip + normalise). Without CUDA it runs on the CPU, which
  shows the fallback works but says nothing about GPU speed.

The first ``--warmup_epochs`` passes start the workers and fill caches; only the later passes are timed,
with the device synchronised. Prints a table; ``--json PATH`` also writes the rows.

    python bench/bench_data.py                       # small CPU smoke run (under a minute)
    python bench/bench_data.py --num_images 4096 --batch_size 256 --num_workers 16 --json bench/results/x.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from attndistill_hf.data import IMAGENET_MEAN, IMAGENET_STD, ImageCollator, train_transform
from attndistill_hf.data.gpu_augment import GpuAugment, RawBytesCollator
from attndistill_hf.hardware import hardware_description


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=256, help="JPEGs generated and read per pass")
    parser.add_argument("--width", type=int, default=500, help="width of the generated images in pixels")
    parser.add_argument("--height", type=int, default=375, help="height of the generated images in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated images")
    parser.add_argument("--image_size", type=int, default=224, help="crop size produced by both paths")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch")
    parser.add_argument(
        "--num_workers",
        default=str(min(4, os.cpu_count() or 1)),
        help="DataLoader worker processes; a comma-separated list (e.g. 1,4,16) measures each path at each "
        "count, which shows how the CPU path scales with its workers",
    )
    parser.add_argument("--paths", default="cpu,gpu", help="comma-separated pipelines to measure: cpu, gpu")
    parser.add_argument(
        "--device", default=None, help="device of the gpu path (default: cuda when available, else cpu)"
    )
    parser.add_argument("--warmup_epochs", type=int, default=1, help="untimed passes before the timed ones")
    parser.add_argument("--epochs", type=int, default=1, help="timed passes over the images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--json", type=Path, default=None, help="also write the result rows to this JSON file")
    args = parser.parse_args(argv)
    for name in ("num_images", "width", "height", "image_size", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    try:
        args.num_workers = [int(n) for n in str(args.num_workers).split(",") if n.strip()]
    except ValueError:
        parser.error(f"--num_workers takes comma-separated integers, got {args.num_workers!r}")
    if not args.num_workers or min(args.num_workers) < 0 or args.warmup_epochs < 0:
        parser.error("--num_workers needs at least one count; counts and --warmup_epochs cannot be negative")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - {"cpu", "gpu"}
    if unknown or not args.paths:
        parser.error(f"--paths takes cpu and/or gpu, got {args.paths}")
    return args


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A photo-like JPEG: smooth colour fields at two scales plus sensor-like grain (sets the file size)."""
    coarse = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    fine = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    detail = np.asarray(Image.fromarray(fine).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    grain = rng.standard_normal((height, width, 3), dtype=np.float32) * 10.0
    pixels = np.clip(0.7 * base + 0.3 * detail + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_images(folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write the JPEGs and return examples as ``load_split`` gives them (``{"bytes", "path"}`` dicts)."""
    rng = np.random.default_rng(args.seed)
    examples = []
    for i in range(args.num_images):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(synthetic_jpeg(rng, args.width, args.height, args.quality))
        examples.append({"image": {"bytes": None, "path": str(path)}})
    return examples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    examples: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    after: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
    device: torch.device,
    num_workers: int,
    args: argparse.Namespace,
) -> tuple[int, float]:
    """Images delivered and seconds taken over the timed epochs (workers stay alive between epochs)."""
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    images, seconds = 0, 0.0
    for epoch in range(args.warmup_epochs + args.epochs):
        timed = epoch >= args.warmup_epochs
        _sync(device)
        start = time.perf_counter()
        count = 0
        for batch in loader:
            if after is not None:
                batch = after(batch)
            count += int(batch["pixel_values"].shape[0])
        _sync(device)
        if timed:
            seconds += time.perf_counter() - start
            images += count
    return images, seconds


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    gpu_device = (
        torch.device(args.device)
        if args.device
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        start = time.perf_counter()
        examples = write_images(Path(tmp), args)
        sizes = [os.path.getsize(e["image"]["path"]) for e in examples]
        print(
            f"generated {len(examples)} JPEGs of {args.width}x{args.height}, mean {np.mean(sizes) / 1e3:.0f} KB, "
            f"in {time.perf_counter() - start:.1f}s"
        )
        for path in args.paths:
            if path == "cpu":
                device = torch.device("cpu")
                collate = ImageCollator(train_transform(args.image_size, IMAGENET_MEAN, IMAGENET_STD))
                after = None
            else:
                device = gpu_device
                collate = RawBytesCollator()
                after = GpuAugment(args.image_size, IMAGENET_MEAN, IMAGENET_STD, device=device, seed=args.seed)
            for workers in args.num_workers:
                images, seconds = measure(examples, collate, after, device, workers, args)
                rows.append(
                    {
                        "path": path,
                        "workers": workers,
                        "device": device.type,
                        "device_name": hardware_description(device),
                        "batch_size": args.batch_size,
                        "image_size": args.image_size,
                        "images": images,
                        "seconds": round(seconds, 4),
                        "img_per_s": round(images / seconds, 1) if seconds > 0 else float("inf"),
                        "mean_jpeg_kb": round(float(np.mean(sizes)) / 1e3, 1),
                        "cpu_count": os.cpu_count(),
                        "torch": torch.__version__,
                        "torchvision": torchvision.__version__,
                    }
                )
                print(f"  {path} path, {workers} workers: {rows[-1]['img_per_s']:,.1f} img/s", flush=True)
    header = f"{'path':<5} {'workers':>7} {'device':<6} {'images':>7} {'seconds':>8} {'img/s':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['path']:<5} {row['workers']:>7} {row['device']:<6} {row['images']:>7} "
            f"{row['seconds']:>8.2f} {row['img_per_s']:>9.1f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
