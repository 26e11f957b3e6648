"""Throughput of one AttnDistill training step: naive vs the library's default vs the floor (vs compile).

Each timed step is what one optimizer step of distillation costs: the frozen teacher's forward pass
under ``no_grad``, the student's forward pass, the loss (projector alignment of the CLS token plus the
last-layer CLS-attention KL), the backward pass and an AdamW step (fused on CUDA), under bf16
autocast on CUDA and in float32 on CPU. Images are a fixed random batch already on the device, so the
input pipeline is not measured here (``bench/bench_data.py`` measures it).

Modes, per teacher -> student pair (random weights; the paper's three ViT pairs and a DINOv3 pair):

- ``naive``: both models on eager attention, maps taken with ``output_attentions=True`` (every block
  materialises its ``B x H x T x T`` attention), as a straightforward implementation does.
- ``default``: the library's path: sdpa in every block, the last block's CLS row computed from the
  queries and keys its attention kernel receives (``last_cls_attention`` and ``DistillationModule``).
- ``floor``: sdpa, attention weight 0: teacher forward + student forward/backward + projector, no
  attention term at all. The default step cannot be faster than this.
- ``default+compile``: the default step with the teacher and the trainable module under ``torch.compile``.

Run ``python bench/bench_step.py --help`` for the options; docs/benchmarks.md has the measured tables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers import DINOv3ViTConfig, PreTrainedModel, ViTConfig

from attndistill_hf.attention import (
    eager_last_cls_attention,
    install_attention_capture,
    last_cls_attention,
)
from attndistill_hf.hardware import hardware_description as device_name  # run_gpu.sh imports it by this name
from attndistill_hf.losses import (
    DEFAULT_ATTN_WEIGHT,
    DEFAULT_FUSION_TEMPERATURE,
    DEFAULT_PROJ_WEIGHT,
    AttnDistillLoss,
)
from attndistill_hf.models import DINOV3_REGISTERS, LAYER_NORM_EPS, STUDENT_PRESETS, build_student
from attndistill_hf.students import DistillationModule
from attndistill_hf.teacher import teacher_targets

MODES = ("naive", "default", "floor", "default+compile")
# The relative difference allowed between the naive and the default loss (and gradients) in float32.
LOSS_TOLERANCE = 1e-4
RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 1024**3


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher architecture (random weights; only the shape matters for speed).

    ``architecture`` names the model class as the student presets do: ``vit`` (``ViTModel``) or
    ``dinov3_vit`` (``DINOv3ViTModel``: RoPE, register tokens, LayerScale).
    """

    label: str
    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    architecture: Literal["vit", "dinov3_vit"] = "vit"


@dataclass(frozen=True)
class PairSpec:
    """A teacher -> student pair of the paper and the attention case it exercises."""

    key: str
    teacher: TeacherSpec
    student_preset: str
    student_label: str
    case: str

    @property
    def label(self) -> str:
        return f"{self.teacher.label} -> {self.student_label} (case {self.case})"


VIT_S16 = TeacherSpec("ViT-S/16", 384, 12, 6, 16)
VIT_S8 = TeacherSpec("ViT-S/8", 384, 12, 6, 8)
VIT_B16 = TeacherSpec("ViT-B/16", 768, 12, 12, 16)
DINOV3_B16 = TeacherSpec("DINOv3 ViT-B/16", 768, 12, 12, 16, architecture="dinov3_vit")
PAIRS: dict[str, PairSpec] = {
    "s16-t16": PairSpec("s16-t16", VIT_S16, "vit-tiny-patch16", "ViT-T/16", "c"),
    "s8-s16": PairSpec("s8-s16", VIT_S8, "vit-small-patch16", "ViT-S/16", "b"),
    "b16-s16": PairSpec("b16-s16", VIT_B16, "vit-small-patch16", "ViT-S/16", "c"),
    # Not a paper pair: it runs the capture through RoPE and register tokens (DINOv3's layout).
    "dinov3-b16-s16": PairSpec("dinov3-b16-s16", DINOV3_B16, "dinov3-vits16", "DINOv3 ViT-S/16", "c"),
}
# --tiny: 2 blocks of width 8 per head; head counts and patch sizes are kept, so every pair still
# exercises its attention case (b: patch grids differ, c: head counts differ).
TINY_LAYERS = 2
TINY_HEAD_DIM = 8


# ---- models ------------------------------------------------------------------------------------------


def teacher_config(spec: TeacherSpec, image_size: int, *, tiny: bool) -> ViTConfig | DINOv3ViTConfig:
    """The teacher's config: DINO-style ViT (LayerNorm eps 1e-6, qkv bias), or DINOv3's released layout."""
    hidden = spec.num_heads * TINY_HEAD_DIM if tiny else spec.hidden_size
    shape = {
        "hidden_size": hidden,
        "num_hidden_layers": TINY_LAYERS if tiny else spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": 4 * hidden,
        "image_size": image_size,
        "patch_size": spec.patch_size,
    }
    if spec.architecture == "dinov3_vit":
        # DINOv3ViTConfig's defaults are those of the released checkpoints (LayerNorm eps 1e-5, key
        # without bias, LayerScale 1, RoPE theta 100); its RoPE augmentation only runs in train mode.
        return DINOv3ViTConfig(**shape, num_register_tokens=DINOV3_REGISTERS)
    return ViTConfig(**shape, layer_norm_eps=LAYER_NORM_EPS, qkv_bias=True)


def build_teacher(
    spec: TeacherSpec, image_size: int, *, attn_implementation: str, tiny: bool, seed: int
) -> PreTrainedModel:
    """A frozen, randomly initialised teacher in eval mode."""
    # build_student builds any model from a config (ViTModel without pooler, or DINOv3ViTModel).
    config = teacher_config(spec, image_size, tiny=tiny)
    model = build_student(config=config, attn_implementation=attn_implementation, seed=seed)
    model.requires_grad_(False)
    return model.eval()


def build_bench_student(
    preset: str, image_size: int, *, attn_implementation: str, tiny: bool, seed: int
) -> PreTrainedModel:
    """The student preset (or its tiny version), randomly initialised, in train mode."""
    overrides: dict[str, int] = {}
    if tiny:
        hidden = STUDENT_PRESETS[preset]["num_attention_heads"] * TINY_HEAD_DIM
        overrides = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": TINY_LAYERS}
    student = build_student(
        preset, image_size=image_size, attn_implementation=attn_implementation, seed=seed, **overrides
    )
    return student.train()


@dataclass
class StepSetup:
    """Everything one mode of one pair needs to run training steps."""

    pair: PairSpec
    mode: str
    teacher: nn.Module
    module: nn.Module
    with_attention: bool

    def loss(self, pixel_values: torch.Tensor, *, validate: bool = False) -> torch.Tensor:
        """The trainer's teacher step (under ``no_grad``), then the trainable module's loss (student + loss)."""
        targets = teacher_targets(
            self.teacher,
            pixel_values,
            with_attention=self.mode == "naive" or self.with_attention,
            capture=eager_last_cls_attention if self.mode == "naive" else last_cls_attention,
        )
        return self.module(pixel_values, targets.cls, targets.attention, targets.grid, validate).loss


def make_setup(
    pair: PairSpec,
    mode: str,
    *,
    image_size: int,
    device: torch.device,
    tiny: bool,
    compile_backend: str = "inductor",
    seed: int = 0,
) -> StepSetup:
    """Build teacher, student and loss for ``mode``; the same seed gives the same weights in every mode."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose from {', '.join(MODES)}.")
    implementation = "eager" if mode == "naive" else "sdpa"
    teacher = build_teacher(pair.teacher, image_size, attn_implementation=implementation, tiny=tiny, seed=seed)
    student = build_bench_student(
        pair.student_preset, image_size, attn_implementation=implementation, tiny=tiny, seed=seed + 1
    )
    with_attention = mode != "floor"
    torch.manual_seed(seed + 2)
    loss_fn = AttnDistillLoss(
        student.config.hidden_size,
        teacher.config.hidden_size,
        proj_weight=DEFAULT_PROJ_WEIGHT,
        attn_weight=DEFAULT_ATTN_WEIGHT if with_attention else 0.0,
        fusion_temperature=DEFAULT_FUSION_TEMPERATURE,
    )
    # The naive step differs only in how the student's map is taken (eager, every block's maps).
    capture = eager_last_cls_attention if mode == "naive" else last_cls_attention
    module: nn.Module = DistillationModule(student, loss_fn, capture=capture).to(device)
    teacher_module: nn.Module = teacher.to(device)
    if mode == "default+compile":
        # DistillationModule installed the student's capture; the teacher's must be installed too before
        # compiling (installing it inside a compiled region breaks the graph on every step).
        install_attention_capture(teacher_module)
        teacher_module = torch.compile(teacher_module, backend=compile_backend)
        module = torch.compile(module, backend=compile_backend)
    return StepSetup(
        pair=pair,
        mode=mode,
        teacher=teacher_module,
        module=module,
        with_attention=with_attention,
    )


def make_optimizer(module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW of the published recipe (betas 0.9/0.95, weight decay 0.05); fused kernels on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=device.type == "cuda")


def make_train_step(
    setup: StepSetup, optimizer: torch.optim.Optimizer, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One full training step: forward (bf16 autocast on CUDA), backward, optimizer step."""
    use_autocast = device.type == "cuda"

    def step(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = setup.loss(pixel_values)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---- measuring ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's resident-set high-water mark."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory, or the process's peak resident set on CPU (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def release() -> None:
    """Drop compiled graphs and free memory (after the caller dropped its references)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_batch(batch: int, image_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)


def time_mode(
    pair: PairSpec,
    mode: str,
    *,
    batch: int,
    image_size: int,
    warmup: int,
    steps: int,
    device: torch.device,
    tiny: bool,
    compile_backend: str,
) -> dict[str, Any]:
    """Warm-up steps, then ``steps`` timed steps between device synchronisations; one result row."""
    reset_peak_memory(device)
    setup = make_setup(pair, mode, image_size=image_size, device=device, tiny=tiny, compile_backend=compile_backend)
    optimizer = make_optimizer(setup.module, device)
    step = make_train_step(setup, optimizer, device)
    pixels = random_batch(batch, image_size, device)
    loss = torch.zeros(())
    for _ in range(warmup):
        loss = step(pixels)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(pixels)
    synchronize(device)
    elapsed = time.perf_counter() - start
    final_loss = float(loss)
    peak = peak_memory_gib(device)
    del setup, optimizer, step, pixels
    release()
    if not math.isfinite(final_loss):
        raise RuntimeError(f"{pair.label}, mode {mode}: the loss is not finite ({final_loss}).")
    return {
        "pair": pair.label,
        "pair_key": pair.key,
        "case": pair.case,
        "mode": mode,
        "batch": batch,
        "image_size": image_size,
        "img_per_s": batch * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_gib": peak,
        "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "loss": final_loss,
        "warmup": warmup,
        "steps": steps,
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "tiny": tiny,
        "compile_backend": compile_backend if mode == "default+compile" else None,
    }


# ---- numerical parity ----------------------------------------------------------------------------


@dataclass
class ParityResult:
    """The naive and the default step's loss and gradients on the same batch and weights (float32)."""

    pair: str
    loss_naive: float
    loss_default: float
    rel_loss: float
    rel_grad: float
    grads_naive: dict[str, torch.Tensor]
    grads_default: dict[str, torch.Tensor]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_naive_default(
    pair: PairSpec, *, batch: int, image_size: int, device: torch.device, tiny: bool, seed: int = 0
) -> ParityResult:
    """Loss and student/projector gradients of the naive and the default path, float32, TF32 off.

    ``rel_grad`` is the relative difference of the whole gradient vector (all parameters concatenated).
    """
    naive = make_setup(pair, "naive", image_size=image_size, device=device, tiny=tiny, seed=seed)
    default = make_setup(pair, "default", image_size=image_size, device=device, tiny=tiny, seed=seed)
    # Identical weights by construction (same seeds); copy anyway so the comparison never depends on it.
    default.teacher.load_state_dict(naive.teacher.state_dict())
    default.module.load_state_dict(copy.deepcopy(naive.module.state_dict()))
    pixels = random_batch(batch, image_size, device, seed=seed + 3)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        results: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
        for name, setup in (("naive", naive), ("default", default)):
            setup.module.zero_grad(set_to_none=True)
            loss = setup.loss(pixels, validate=True)
            loss.backward()
            loss = loss.detach()
            grads = {n: p.grad.detach().clone() for n, p in setup.module.named_parameters() if p.grad is not None}
            results[name] = (loss.item(), grads)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    (loss_naive, grads_naive), (loss_default, grads_default) = results["naive"], results["default"]
    if grads_naive.keys() != grads_default.keys():
        raise RuntimeError(f"{pair.label}: the two paths trained different parameters.")
    names = sorted(grads_naive)
    flat_naive = torch.cat([grads_naive[n].flatten() for n in names])
    flat_default = torch.cat([grads_default[n].flatten() for n in names])
    del naive, default, pixels
    release()
    return ParityResult(
        pair=pair.label,
        loss_naive=loss_naive,
        loss_default=loss_default,
        rel_loss=abs(loss_default - loss_naive) / max(abs(loss_naive), 1e-30),
        rel_grad=_relative(flat_default, flat_naive),
        grads_naive=grads_naive,
        grads_default=grads_default,
    )


# ---- profiling ---------------------------------------------------------------------------------------


def profile_mode(
    pair: PairSpec,
    mode: str,
    *,
    batch: int,
    image_size: int,
    warmup: int,
    steps: int,
    rows: int,
    device: torch.device,
    tiny: bool,
    compile_backend: str,
) -> list[dict[str, Any]]:
    """Profile ``steps`` steps after warm-up; print and return the top ops by self device time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    setup = make_setup(pair, mode, image_size=image_size, device=device, tiny=tiny, compile_backend=compile_backend)
    optimizer = make_optimizer(setup.module, device)
    step = make_train_step(setup, optimizer, device)
    pixels = random_batch(batch, image_size, device)
    for _ in range(max(1, warmup)):
        step(pixels)
    synchronize(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(pixels)
        synchronize(device)
    on_cuda = device.type == "cuda"
    sort_key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    print(f"\n== profile: {pair.label}, mode {mode}, {steps} steps, batch {batch}, {image_size} px ({sort_key}) ==")
    print(averages.table(sort_by=sort_key, row_limit=rows))

    def self_time(event: Any) -> float:
        return float(getattr(event, sort_key, 0.0) or 0.0)

    if on_cuda:
        # An operator's self device time repeats the time of the kernels it launched, which are rows
        # of their own: the busy time of the device is the sum over device-side rows only.
        total = sum(self_time(event) for event in averages if event.device_type != DeviceType.CPU)
    else:
        total = sum(self_time(event) for event in averages)
    total = total or 1.0
    print(f"{'device' if on_cuda else 'CPU'} busy time per step: {total / 1000 / steps:.2f} ms")
    top = sorted(averages, key=self_time, reverse=True)[:rows]
    del setup, optimizer, step, pixels, prof
    release()
    return [
        {
            "pair": pair.label,
            "mode": mode,
            "op": event.key,
            "calls": int(event.count),
            "self_ms_per_step": self_time(event) / 1000 / steps,
            "self_share": self_time(event) / total,
            "clock": "device" if on_cuda else "cpu",
        }
        for event in top
    ]


# ---- reporting ---------------------------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with img/s and peak memory, and ratios to the naive and the floor step of each pair."""
    lines = [
        "| pair | mode | img/s | vs naive | vs floor | peak GiB | memory vs naive |",
        "|---|---|---|---|---|---|---|",
    ]
    by_pair: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], {})[row["mode"]] = row
    for row in rows:
        modes = by_pair[row["pair"]]
        naive, floor = modes.get("naive"), modes.get("floor")
        peak = row["peak_gib"]
        # Process RSS includes the interpreter and libraries: only CUDA peaks compare as ratios.
        memory_ratio = _ratio(peak, naive["peak_gib"]) if naive and row["peak_kind"] == "cuda_max_allocated" else "-"
        lines.append(
            f"| {row['pair']} | {row['mode']} | {row['img_per_s']:,.1f} "
            f"| {_ratio(row['img_per_s'], naive['img_per_s'] if naive else None)} "
            f"| {_ratio(row['img_per_s'], floor['img_per_s'] if floor else None)} "
            f"| {'-' if peak is None else f'{peak:.2f}'} | {memory_ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Img/s and peak memory of one AttnDistill training step: naive vs default vs floor vs compile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pairs",
        default=",".join(PAIRS),
        help="Comma-separated teacher->student pairs: "
        + "; ".join(f"{key}: {pair.label}" for key, pair in PAIRS.items())
        + ".",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated modes among {', '.join(MODES)}.")
    parser.add_argument("--device", default=None, help="Device to run on (default: cuda when available, else cpu).")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="Images per step (default: 256 on cuda, 4 on cpu)."
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Square image side in pixels, divisible by 16 (default: 224 on cuda, 64 on cpu).",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="Untimed warm-up steps (default: 5 on cuda, 1 on cpu)."
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default: 20 on cuda, 3 on cpu).")
    parser.add_argument(
        "--tiny", action="store_true", help="Shrink every model to 2 blocks of width 8 per head (smoke runs)."
    )
    parser.add_argument(
        "--compile_backend",
        default="inductor",
        help="torch.compile backend of the default+compile mode ('aot_eager' compiles fast and needs no C++ compiler).",
    )
    parser.add_argument(
        "--check_loss",
        action="store_true",
        help=f"Before timing, compare the naive and default loss and gradients on one batch in float32 for each "
        f"pair; exit with status 1 when the relative loss difference exceeds {LOSS_TOLERANCE:g}.",
    )
    parser.add_argument(
        "--check_batch", type=int, default=8, help="Batch size of the --check_loss comparison (float32, eager path)."
    )
    parser.add_argument(
        "--profile",
        default=None,
        choices=MODES,
        metavar="MODE",
        help="Instead of timing, run torch.profiler over a few steps of MODE for each pair and print the top "
        "ops by self device time (self CPU time on cpu).",
    )
    parser.add_argument("--profile_steps", type=int, default=3, help="Profiled steps (after the warm-up steps).")
    parser.add_argument("--profile_rows", type=int, default=25, help="Ops listed per profile.")
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="Write the result rows to PATH as JSON. On cuda a timing run writes "
        "bench/results/<YYYY-MM-DD>-<gpu-name>.json when this is not given.",
    )
    parser.add_argument("--no_json", action="store_true", help="Write no JSON file, not even the default on cuda.")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)."
    )
    args = parser.parse_args(argv)
    args.pair_specs = [PAIRS[key] for key in _split(args.pairs, list(PAIRS), "pair", parser)]
    args.mode_list = _split(args.modes, MODES, "mode", parser)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = args.device.type == "cuda"
    args.batch_size = args.batch_size or (256 if on_cuda else 4)
    args.image_size = args.image_size or (224 if on_cuda else 64)
    args.warmup = (5 if on_cuda else 1) if args.warmup is None else args.warmup
    args.steps = (20 if on_cuda else 3) if args.steps is None else args.steps
    if args.image_size % 16:
        parser.error(f"--image_size {args.image_size} must be divisible by 16 (the patch sizes are 8 and 16).")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.check_batch < 1 or args.profile_steps < 1:
        parser.error("Batch size, steps, --check_batch and --profile_steps must be positive; --warmup >= 0.")
    return args


def _split(text: str, known: Sequence[str], what: str, parser: argparse.ArgumentParser) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known`` (argparse error otherwise)."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # once each, in order
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"Unknown {what}(s) {unknown or text!r}; choose from {', '.join(known)}.")
    return names


def run_loss_check(args: argparse.Namespace) -> bool:
    print(f"float32 parity of the naive and the default step (batch {args.check_batch}, {args.image_size} px):")
    ok = True
    for pair in args.pair_specs:
        result = compare_naive_default(
            pair, batch=args.check_batch, image_size=args.image_size, device=args.device, tiny=args.tiny
        )
        passed = result.rel_loss <= LOSS_TOLERANCE
        ok &= passed
        print(
            f"  {pair.label}: naive {result.loss_naive:.8f}  default {result.loss_default:.8f}  "
            f"rel. loss diff {result.rel_loss:.2e}  rel. grad diff {result.rel_grad:.2e}  "
            f"{'ok' if passed else f'FAIL (> {LOSS_TOLERANCE:g})'}"
        )
    return ok


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the result rows (timing rows, or top-op rows with --profile)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device: torch.device = args.device
    name = device_name(device)
    today = datetime.date.today().isoformat()
    print(
        f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__} | {today}\n"
        f"batch {args.batch_size}, {args.image_size} px, {'bf16 autocast' if device.type == 'cuda' else 'float32'}, "
        f"{args.warmup} warm-up + {args.steps} timed steps{', tiny models' if args.tiny else ''}"
    )
    if args.check_loss and not run_loss_check(args):
        print("The default step's loss differs from the naive step's loss.", file=sys.stderr)
        raise SystemExit(1)
    common = {
        "batch": args.batch_size,
        "image_size": args.image_size,
        "device": device,
        "tiny": args.tiny,
        "compile_backend": args.compile_backend,
    }
    rows: list[dict[str, Any]] = []
    if args.profile:
        for pair in args.pair_specs:
            rows += profile_mode(
                pair, args.profile, warmup=args.warmup, steps=args.profile_steps, rows=args.profile_rows, **common
            )
    else:
        width = max(len(pair.label) for pair in args.pair_specs)
        for pair in args.pair_specs:
            for mode in args.mode_list:
                row = time_mode(pair, mode, warmup=args.warmup, steps=args.steps, **common)
                print(f"  {pair.label:<{width}} {mode:<16} {row['img_per_s']:>10,.1f} img/s")
                rows.append(row)
        print()
        print(format_table(rows))
    versions = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "date": today}
    rows = [{**row, **versions} for row in rows]
    json_path = Path(args.json) if args.json else None
    if json_path is None and device.type == "cuda" and not args.profile:
        json_path = RESULTS_DIR / f"{today}-{slug(name)}.json"
    if json_path is not None and not args.no_json:
        write_json(rows, json_path)
    return rows


if __name__ == "__main__":
    main()
