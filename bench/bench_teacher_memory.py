"""What a large frozen teacher costs each process: float32 vs bfloat16 weights, replicated vs sharded.

For every number of processes (``--ranks``), weight precision (``--dtypes``) and placement (``--sharding``:
``none``, a whole copy on every process; ``fsdp``, the library's ``shard_teacher``), one group of fresh
processes (``torch.distributed.run``; gloo on CPU, NCCL on CUDA) builds the teacher, places it, and runs
the teacher step of training (``teacher_targets`` with the last-layer CLS attention) on a small batch.
Each process reports

- the teacher's parameter bytes it holds (``parameter_bytes``: its shards when sharded) and in all;
- its memory, measured from just before the teacher is built: on CUDA ``torch.cuda.memory_allocated``
  and ``max_memory_allocated``; on CPU the resident set (``VmRSS``) and its high-water mark (``VmHWM``)
  of ``/proc/self/status``. The high-water mark is reset (``/proc/self/clear_refs``) before the teacher
  is built and again before the forward passes, so each peak belongs to the phase it names, where
  ``resource.getrusage``'s ``ru_maxrss`` only knows the whole life of the process (it is the fallback
  where ``/proc`` is missing). The ranks run with glibc's mmap threshold fixed at 128 KiB, so a freed
  tensor leaves the resident set at once and the resident set follows what the process holds. On CUDA
  the JSON also has each process's host peak (``host_peak_bytes``);
- img/s of the teacher step (all processes together).

The teacher is built as the library loads one, in the precision it will run in: on the CPU, weights in
that dtype from the start (built on the meta device, cast there, then materialised: a bfloat16 teacher
never exists in float32), RoPE frequencies kept in float32 (``cast_teacher``); then moved to the device
(replicated) or sharded onto it (``shard_teacher``), so a sharded process holds the whole teacher in host
memory until it is sharded. Weights are random (a fixed pseudo-random pattern: the values do not change
bytes or speed), nothing is downloaded.

Checked on every row: bfloat16 weights are exactly half the float32 bytes; a sharded process holds at
most 1/N + 5 % of the teacher's bytes; on CUDA, the sharded teacher step costs at most 15 % more time
than the replicated one. One GPU runs one process (NCCL takes one device per process): there the fsdp
rows shard over one process, which measures the cost of FSDP2's machinery, not of sharding over GPUs.

    python bench/bench_teacher_memory.py --teacher vitl16 --device cpu          # ranks 1, 2, 4 on the CPU
    python bench/bench_teacher_memory.py --teacher vit7b16 --device cuda --ranks 1 --batch_size 16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTLayerScale,
    DINOv3ViTRopePositionEmbedding,
)

from attndistill_hf.hardware import hardware_description
from attndistill_hf.models import cast_teacher, torch_dtype
from attndistill_hf.sharding import parameter_bytes, shard_teacher
from attndistill_hf.teacher import teacher_targets

REPO = Path(__file__).resolve().parents[1]  # on the rank processes' PYTHONPATH

GB = 1e9  # bytes are reported in GB (10^9), as the library's log line does
DTYPES = ("float32", "bfloat16", "float16")
SHARDINGS = ("none", "fsdp")
SHARD_SLACK = 0.05  # a sharded process holds at most 1/N + 5 % of the teacher's bytes
SPEED_SLACK = 1.15  # the sharded teacher step takes at most 15 % more time than the replicated one
MMAP_THRESHOLD = 128 * 1024  # glibc's malloc: every allocation above this is its own mapping, freed at once
POOL_SIZE = 262_139  # the weight pattern's period: a prime, so that no row of a matrix repeats another


@dataclass(frozen=True)
class TeacherPreset:
    """A DINOv3 teacher architecture (``DINOv3ViTConfig`` fields; patch 16, 4 registers, LayerScale)."""

    label: str
    config: dict[str, Any]


_DINOV3 = {"patch_size": 16, "num_register_tokens": 4, "layerscale_value": 1e-5}
TEACHERS: dict[str, TeacherPreset] = {
    # For tests: 2 blocks of width 64, the layout of the large ones.
    "tiny": TeacherPreset(
        "tiny DINOv3 (2 blocks, width 64)",
        {**_DINOV3, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    ),
    # facebook/dinov3-vitl16-pretrain-lvd1689m: GELU MLP 4096, key without bias.
    "vitl16": TeacherPreset(
        "DINOv3 ViT-L/16",
        {**_DINOV3, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    ),
    # facebook/dinov3-vit7b16-pretrain-lvd1689m: SwiGLU MLP (8192 = 2/3 of 3 x 4096), no q/k/v biases.
    "vit7b16": TeacherPreset(
        "DINOv3 ViT-7B/16",
        {
            **_DINOV3,
            "hidden_size": 4096,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "intermediate_size": 8192,
            "use_gated_mlp": True,
            "hidden_act": "silu",
            "query_bias": False,
            "key_bias": False,
            "value_bias": False,
        },
    ),
}


# ---- the teacher -------------------------------------------------------------------------------------


def teacher_config(preset: TeacherPreset, image_size: int) -> DINOv3ViTConfig:
    config = DINOv3ViTConfig(**preset.config, image_size=image_size)
    config._attn_implementation = "sdpa"  # the library's default: the CLS row is captured from sdpa's inputs
    return config


def build_teacher(preset: TeacherPreset, dtype: torch.dtype, image_size: int, *, seed: int = 0) -> DINOv3ViTModel:
    """A frozen teacher on the CPU with its weights in ``dtype`` from the start, as ``from_pretrained`` loads
    one: built on the meta device, cast there (``cast_teacher`` keeps the RoPE frequencies in float32), then
    materialised and filled."""
    config = teacher_config(preset, image_size)
    with torch.device("meta"):
        model = DINOv3ViTModel(config)
    cast_teacher(model, dtype)
    model.to_empty(device="cpu")
    fill_weights(model, seed=seed)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def fill_weights(model: DINOv3ViTModel, *, seed: int) -> None:
    """Weights of a freshly initialised DINOv3 at the cost of a memory copy: matrices, convolution and tokens
    from a pseudo-random pattern (std 0.02) at a different offset each, LayerNorms 1 and 0, LayerScale at
    its configured value, biases 0; the RoPE frequencies are computed as the model computes them. A 7B
    teacher's random initialisation would take minutes on a CPU; its values change neither bytes nor speed."""
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2 * POOL_SIZE, generator=generator) * 0.02).to(dtype)
    index = 0
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm):
                parameter.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(module, DINOv3ViTLayerScale):
                parameter.fill_(model.config.layerscale_value)
            elif name in ("bias", "mask_token"):
                parameter.zero_()
            else:
                flat, offset = parameter.view(-1), (index * 7919) % POOL_SIZE
                period = pool[offset : offset + POOL_SIZE]
                whole, rest = divmod(flat.numel(), POOL_SIZE)  # one copy of the repeated pattern, then the rest
                flat[: whole * POOL_SIZE].view(whole, POOL_SIZE).copy_(period.expand(whole, POOL_SIZE))
                flat[whole * POOL_SIZE :].copy_(period[:rest])
                index += 1
    model.rope_embeddings.inv_freq.copy_(DINOv3ViTRopePositionEmbedding(model.config).inv_freq)


def place(teacher: nn.Module, sharding: str, device: torch.device) -> nn.Module:
    """The teacher on ``device``: a whole copy (``none``) or this process's shards (``fsdp``)."""
    if sharding == "fsdp":
        return shard_teacher(teacher, device)
    return teacher.to(device)


# ---- memory ------------------------------------------------------------------------------------------


class MemoryProbe:
    """This process's memory on ``device``: CUDA's allocator, or the resident set of the process on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        if device.type != "cuda" and self._status("VmHWM") is None:
            self.kind = "ru_maxrss"  # no /proc: the peak of the whole process, and no current value

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            except OSError:
                self.kind = "rss_peak_since_start"  # VmHWM then includes everything before

    def current(self) -> int | None:
        """Memory in use now; without ``/proc``, the peak so far (growth above it is then a lower bound)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self.peak() if self.kind == "ru_maxrss" else self._status("VmRSS")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "ru_maxrss":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return self._status("VmHWM")


def _growth(value: int | None, baseline: int | None) -> int | None:
    return None if value is None or baseline is None else value - baseline


# ---- one process of one configuration ------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> None:
    """One rank: warm up, then build, place and run the teacher; write this rank's numbers as JSON."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo")
    dtype, sharding = torch_dtype(args.dtypes), args.sharding
    preset = TEACHERS[args.teacher]
    try:
        # The kernels, the allocator and the communicators' first use, on a tiny teacher placed the same
        # way: none of it is the teacher's, and none of it lands after the baseline.
        warm = place(build_teacher(TEACHERS["tiny"], dtype, args.image_size), sharding, device)
        teacher_targets(warm, torch.zeros(1, 3, args.image_size, args.image_size, device=device))
        del warm
        dist.barrier()
        probe = MemoryProbe(device)
        probe.reset_peak()
        baseline = probe.current()
        # On CUDA, the host's share too: each process holds the whole teacher in host memory until it is
        # placed on its device.
        host = MemoryProbe(torch.device("cpu")) if device.type == "cuda" else None
        if host is not None:
            host.reset_peak()
        host_baseline = host.current() if host is not None else None
        start = time.perf_counter()
        teacher = build_teacher(preset, dtype, args.image_size, seed=args.seed)
        built = time.perf_counter()
        teacher = place(teacher, sharding, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        placed = time.perf_counter()
        held, load_peak = probe.current(), probe.peak()
        generator = torch.Generator().manual_seed(args.seed + 1 + rank)
        pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
        probe.reset_peak()
        for _ in range(args.warmup):
            teacher_targets(teacher, pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        timed = time.perf_counter()
        for _ in range(args.steps):
            targets = teacher_targets(teacher, pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - timed
        step_peak = probe.peak()
        finite = bool(torch.isfinite(targets.cls).all()) and (
            targets.attention is not None and bool(torch.isfinite(targets.attention).all())
        )
        held_bytes = parameter_bytes(teacher)
        result = {
            "rank": rank,
            "world": world,
            "device_name": hardware_description(device),
            "parameters": sum(parameter.numel() for parameter in teacher.parameters()),
            "param_bytes_local": held_bytes.local,
            "param_bytes_total": held_bytes.total,
            "memory_kind": probe.kind,
            "held_bytes": _growth(held, baseline),
            "peak_bytes": _growth(max(load_peak or 0, step_peak or 0) or None, baseline),
            "step_peak_bytes": _growth(step_peak, baseline),
            "host_peak_bytes": _growth(host.peak(), host_baseline) if host is not None else None,
            "build_s": built - start,
            "place_s": placed - built,
            "elapsed_s": elapsed,
            "finite": finite,
        }
        Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result) + "\n")
    finally:
        dist.destroy_process_group()


# ---- the whole table ---------------------------------------------------------------------------------


def worker_argv(args: argparse.Namespace, dtype: str, sharding: str, result_dir: str) -> list[str]:
    return [
        "--worker",
        "--result_dir",
        result_dir,
        "--teacher",
        args.teacher,
        "--dtypes",
        dtype,
        "--sharding",
        sharding,
        "--device",
        args.device,
        "--batch_size",
        str(args.batch_size),
        "--image_size",
        str(args.image_size),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]


def worker_env(args: argparse.Namespace, ranks: int) -> dict[str, str]:
    threads = args.threads if args.device == "cpu" else max(1, (os.cpu_count() or 1) // ranks)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if args.device == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks talk over the loopback interface
    return env


def run_configuration(args: argparse.Namespace, ranks: int, dtype: str, sharding: str) -> dict[str, Any]:
    """Launch ``ranks`` fresh processes for one configuration; its table row (``error`` set if it failed)."""
    row: dict[str, Any] = {
        "teacher": args.teacher,
        "teacher_label": TEACHERS[args.teacher].label,
        "ranks": ranks,
        "dtype": dtype,
        "sharding": sharding,
        "batch": args.batch_size,
        "image_size": args.image_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "error": None,
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teacher-memory-") as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        command += [str(Path(__file__).resolve()), *worker_argv(args, dtype, sharding, folder)]
        process = subprocess.Popen(
            command,
            env=worker_env(args, ranks),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # on a timeout, the launcher and every rank are killed together
        )
        try:
            output, _ = process.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            row["error"] = f"timed out after {args.timeout:g} s"
        files = [Path(folder, f"rank{rank}.json") for rank in range(ranks)]
        if row["error"] is None and (process.returncode != 0 or not all(path.is_file() for path in files)):
            row["error"] = f"exit status {process.returncode}"
        row["wall_s"] = time.perf_counter() - start
        if row["error"] is not None:
            print(f"{ranks} rank(s), {dtype}, {sharding}: {row['error']}\n{output[-4000:]}", file=sys.stderr)
            return row
        results = sorted((json.loads(path.read_text()) for path in files), key=lambda result: result["rank"])
    first = results[0]
    row.update(
        {
            "device": first["device_name"],
            "parameters": first["parameters"],
            "param_bytes_total": first["param_bytes_total"],
            "memory_kind": first["memory_kind"],
            "finite": all(result["finite"] for result in results),
            # The teacher step of all processes together: each runs its own batch.
            "img_per_s": ranks * args.batch_size * args.steps / max(result["elapsed_s"] for result in results),
        }
    )
    keys = ("param_bytes_local", "held_bytes", "peak_bytes", "step_peak_bytes", "host_peak_bytes", "build_s", "place_s")
    for key in keys:
        row[key] = [result[key] for result in results]  # one value per rank
    if not row["finite"]:
        row["error"] = "the teacher's targets are not finite"
    return row


def _peer(rows: Sequence[dict[str, Any]], row: dict[str, Any], **changes: str) -> dict[str, Any] | None:
    """The measured row of the same configuration as ``row`` but for ``changes``."""
    wanted = {key: row[key] for key in ("ranks", "dtype", "sharding")} | changes
    for other in rows:
        if other["error"] is None and all(other[key] == value for key, value in wanted.items()):
            return other
    return None


def _most(values: Sequence[int | None] | None) -> int | None:
    known = [value for value in values or () if value is not None]
    return max(known) if known else None


def check_row(rows: Sequence[dict[str, Any]], row: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """The targets that apply to ``row``: name, measured value, requirement and whether it is met."""
    if row["error"] is not None:
        return []
    checks: list[dict[str, Any]] = []
    full = _peer(rows, row, dtype="float32")
    if row["dtype"] in ("bfloat16", "float16") and full is not None:
        halves = [2 * local for local in row["param_bytes_local"]] == full["param_bytes_local"]
        halves &= 2 * row["param_bytes_total"] == full["param_bytes_total"]
        ratio = row["param_bytes_total"] / full["param_bytes_total"]
        checks.append({"name": "half of float32", "measured": f"{ratio:.3f}x", "required": "0.500x", "passed": halves})
    if row["sharding"] == "fsdp":
        share = max(row["param_bytes_local"]) / row["param_bytes_total"]
        limit = 1 / row["ranks"] + SHARD_SLACK
        checks.append(
            {"name": "share", "measured": f"{share:.3f}", "required": f"<= {limit:.3f}", "passed": share <= limit}
        )
        replicated = _peer(rows, row, sharding="none")
        if device == "cuda" and replicated is not None:
            speed = row["img_per_s"] / replicated["img_per_s"]
            checks.append(
                {
                    "name": "img/s vs replicated",
                    "measured": f"{speed:.2f}x",
                    "required": f">= {1 / SPEED_SLACK:.2f}x",
                    "passed": speed >= 1 / SPEED_SLACK,
                }
            )
    return checks


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.3f}"


def _times(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: each configuration's worst process (the largest value over its ranks)."""
    lines = [
        "| ranks | weights | teacher | params per rank (GB) | share of teacher | vs float32 | held per rank (GB) "
        "| peak per rank (GB) | step peak per rank (GB) | step peak vs replicated | img/s | img/s vs replicated "
        "| checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        placement = "sharded (FSDP2)" if row["sharding"] == "fsdp" else "replicated"
        if row["error"] is not None:
            lines.append(
                f"| {row['ranks']} | {row['dtype']} | {placement} |" + " - |" * 9 + f" FAILED: {row['error']} |"
            )
            continue
        local = max(row["param_bytes_local"])
        full, replicated = _peer(rows, row, dtype="float32"), _peer(rows, row, sharding="none")
        step_peak = _most(row["step_peak_bytes"])
        checks = "; ".join(
            f"{check['name']} {check['measured']}: {'PASS' if check['passed'] else 'FAIL'}" for check in row["checks"]
        )
        lines.append(
            f"| {row['ranks']} | {row['dtype']} | {placement} | {_gb(local)} | {local / row['param_bytes_total']:.3f} "
            f"| {_times(local, max(full['param_bytes_local']) if full else None)} "
            f"| {_gb(_most(row['held_bytes']))} | {_gb(_most(row['peak_bytes']))} | {_gb(step_peak)} "
            f"| {_times(step_peak, _most(replicated['step_peak_bytes']) if replicated else None)} "
            f"| {row['img_per_s']:,.1f} | {_times(row['img_per_s'], replicated['img_per_s'] if replicated else None)} "
            f"| {checks or '-'} |"
        )
    return "\n".join(lines)


def notes(args: argparse.Namespace, rows: Sequence[dict[str, Any]], skipped: Sequence[int]) -> list[str]:
    """What the table's numbers are on this device, and what it did not measure."""
    lines = []
    if args.device == "cuda":
        lines.append(
            "Memory: torch.cuda.max_memory_allocated / memory_allocated per process, from just before the teacher "
            "is built. held: after placing it; peak: building, placing and the forward passes; step peak: the "
            "forward passes alone."
        )
    else:
        lines.append(
            "CPU measurement: memory is each process's resident set (VmRSS / VmHWM) above its value just before "
            "the teacher is built. held: after placing it; peak: building, placing and the forward passes (a "
            "sharded process holds the whole teacher until it is sharded); step peak: the forward passes alone. "
            "img/s is the CPU's and no target."
        )
    if skipped:
        counts = ", ".join(str(count) for count in skipped)
        lines.append(f"Not measured: {counts} process(es), which need as many GPUs ({torch.cuda.device_count()} here).")
    measured = {row["ranks"] for row in rows if row["error"] is None}
    if args.device == "cuda" and measured and max(measured) == 1:
        lines.append(
            "One GPU: the fsdp rows shard over one process (the cost of FSDP2's machinery); the ratio of a "
            "teacher sharded over several GPUs to a replicated one is not measured."
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Parameter bytes, memory and img/s per process of a large frozen teacher: float32 vs "
        "bfloat16 weights, replicated vs sharded (FSDP2) over 1, 2, 4 processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--teacher", default="vitl16", choices=list(TEACHERS), help="The teacher's architecture.")
    parser.add_argument("--ranks", default="1,2,4", help="Comma-separated process counts.")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"Comma-separated, among {', '.join(DTYPES)}.")
    parser.add_argument("--sharding", default="none,fsdp", help=f"Comma-separated, among {', '.join(SHARDINGS)}.")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="Default: cuda when available.")
    parser.add_argument("--batch_size", type=int, default=None, help="Images per process (16 on cuda, 2 on cpu).")
    parser.add_argument("--image_size", type=int, default=224, help="Square image side; divisible by 16.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed forward passes (2 on cuda, 1 on cpu).")
    parser.add_argument("--steps", type=int, default=None, help="Timed forward passes (5 on cuda, 2 on cpu).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each CPU process.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds one configuration may take.")
    parser.add_argument("--json", default=None, metavar="PATH", help="Also write the rows to PATH as JSON.")
    parser.add_argument("--fail_on_missed", action="store_true", help="Exit with status 1 when a check fails.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (16 if on_cuda else 2)
    args.warmup = (2 if on_cuda else 1) if args.warmup is None else args.warmup
    args.steps = (5 if on_cuda else 2) if args.steps is None else args.steps
    if args.worker:
        args.sharding = args.sharding.strip()
        return args
    try:
        args.rank_counts = list(dict.fromkeys(int(count) for count in args.ranks.split(",") if count.strip()))
    except ValueError:
        parser.error(f"--ranks {args.ranks!r}: comma-separated process counts, such as 1,2,4.")
    args.dtype_list = _split(args.dtypes, DTYPES, "--dtypes", parser)
    args.sharding_list = _split(args.sharding, SHARDINGS, "--sharding", parser)
    if not args.rank_counts or min(args.rank_counts) < 1:
        parser.error("--ranks: process counts of at least 1.")
    if args.image_size % 16:
        parser.error(f"--image_size {args.image_size} must be divisible by the patch size 16.")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--batch_size, --steps and --threads must be positive; --warmup >= 0.")
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    return args


def _split(text: str, known: Sequence[str], flag: str, parser: argparse.ArgumentParser) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"{flag} {text!r}: choose from {', '.join(known)}.")
    return names


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measure every configuration; print the table, its checks and notes; return the rows."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return []
    preset = TEACHERS[args.teacher]
    today = datetime.date.today().isoformat()
    print(
        f"{preset.label} teacher | {args.device} | torch {torch.__version__} | transformers "
        f"{transformers.__version__} | {today}\nbatch {args.batch_size} per process, {args.image_size} px, "
        f"{args.warmup} warm-up + {args.steps} timed teacher steps (with the CLS attention)"
    )
    available = torch.cuda.device_count() if args.device == "cuda" else None
    skipped = [count for count in args.rank_counts if available is not None and count > available]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for ranks in (count for count in args.rank_counts if count not in skipped):
        for dtype in args.dtype_list:
            for sharding in args.sharding_list:
                row = run_configuration(args, ranks, dtype, sharding)
                state = row["error"] or f"{row['img_per_s']:,.1f} img/s"
                print(f"  {ranks} rank(s) {dtype:<9} {sharding:<5} {state} ({row['wall_s']:.0f} s)", flush=True)
                rows.append(row)
    for row in rows:
        row["checks"] = check_row(rows, row, args.device)
        row["passed"] = all(check["passed"] for check in row["checks"]) if row["error"] is None else None
    print(f"\n{len(rows)} configurations in {time.perf_counter() - started:.0f} s\n")
    print(format_table(rows))
    print()
    for line in notes(args, rows, skipped):
        print(line)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "date": today}
    rows = [{**row, **versions} for row in rows]
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {path}")
    failed = any(row["error"] is not None for row in rows)
    if failed or (args.fail_on_missed and any(row["passed"] is False for row in rows)):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
