"""The frozen teacher sharded over every process with FSDP2 (``--teacher_sharding fsdp``).

A teacher of the DINOv3-7B size is 27 GB of float32 weights (13.4 GB in bfloat16) on every process when
each holds a copy. Sharded, each process keeps 1/world of every block's weights; a block's weights are
gathered from all processes just before it runs and freed right after it (``reshard_after_forward``), so
a process holds its share plus about one block at a time. The teacher is frozen: no gradients and no
optimizer state are sharded, and the students stay replicated (DDP through Accelerate). The forward on the
gathered weights is the computation of a full copy, so a sharded run trains the students of a replicated
one (tests compare them).

Every process must run the teacher the same number of times, since each forward gathers with all the
others: the trainer also runs it for a batch that it skips, and the model card's attention figure is
computed on every process.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments

from .families import UnsupportedModelError, family_of, model_class_name, unwrap_model


def teacher_blocks(model: nn.Module) -> list[nn.Module]:
    """The teacher's transformer blocks, in order: the longest ``ModuleList`` / ``Sequential`` whose every
    member holds one of its family's attention modules. Each block is one unit that FSDP2 gathers."""
    plain = unwrap_model(model)
    attention_class = family_of(plain).attention_class
    best: list[nn.Module] = []
    for container in plain.modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        members = list(container.children())
        if len(members) > len(best) and all(
            any(type(module).__name__ == attention_class for module in member.modules()) for member in members
        ):
            best = members
    return best


def students_plugin(args: TrainingArguments) -> str | None:
    """The Accelerate plugin that would train the students (DeepSpeed or FSDP), from the arguments or the
    environment ``accelerate launch`` sets; None for DDP or one process."""
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def check_teacher_sharding(teacher: nn.Module, args: TrainingArguments) -> None:
    """Refuse a sharded teacher that this library cannot run exactly, before any data loads, with the reason."""
    name = model_class_name(unwrap_model(teacher))
    plugin = students_plugin(args)
    if plugin is not None:
        raise ValueError(
            f"--teacher_sharding fsdp trains the students with DDP beside the sharded teacher; this launch trains "
            f"them with {plugin}. Launch without Accelerate's {plugin} plugin."
        )
    if args.torch_compile:
        raise ValueError(
            "--teacher_sharding fsdp with --torch_compile: a compiled teacher would trace FSDP2's gathers, which "
            "this library does not test; drop one of the two."
        )
    if not teacher_blocks(teacher):
        raise UnsupportedModelError(
            f"{name} cannot be sharded: no list of transformer blocks was found to gather one at a time."
        )


def shard_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """Shard the frozen ``teacher`` over all processes of the default process group, one FSDP2 unit per block
    and one for the rest (embeddings, final norm); each block's gather is issued while the block before it runs.

    Call it once the process group exists, on every process, with the teacher's weights in the dtype it
    will run in; ``device`` is this process's device (the shards and buffers move there).
    """
    if any(parameter.requires_grad for parameter in teacher.parameters()):
        raise ValueError("Freeze the teacher (requires_grad_(False)) before sharding it.")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    blocks = teacher_blocks(teacher)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root too: its own weights are sharded, and it frees them after the forward (a frozen teacher
    # runs no backward that would reuse them).
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    for block, following in itertools.pairwise(blocks):
        block.set_modules_to_forward_prefetch([following])
    return teacher


@dataclass(frozen=True)
class ParameterBytes:
    """A model's parameter bytes: those this process holds, and the whole model's."""

    local: int
    total: int

    @property
    def fraction(self) -> float:
        return self.local / self.total if self.total else 0.0


def parameter_bytes(model: nn.Module) -> ParameterBytes:
    """The bytes of ``model``'s parameters on this process (its shards, when sharded) and in all."""
    local = total = 0
    for parameter in model.parameters():
        size = parameter.element_size()
        local += (parameter.to_local() if isinstance(parameter, DTensor) else parameter).numel() * size
        total += parameter.numel() * size
    return ParameterBytes(local, total)


def describe_teacher(teacher: nn.Module, processes: int) -> str:
    """One line for the log: the teacher, its size and precision, and what each process holds of it."""
    held = parameter_bytes(teacher)
    count = sum(parameter.numel() for parameter in teacher.parameters())
    dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    line = f"Teacher {model_class_name(unwrap_model(teacher))}: {count / 1e6:,.1f} M parameters in {dtype}, "
    if held.local < held.total:
        share = f"{held.local / 1e9:.3g} of {held.total / 1e9:.3g} GB"
        return line + f"sharded over {processes} processes: {share} on each."
    return line + f"{held.total / 1e9:.3g} GB on each of {processes} process(es)."
