"""What a run ran on, in one line, for model cards, result tables and benchmark rows."""

from __future__ import annotations

import os
import platform

import torch


def hardware_description(device: torch.device | str | None = None, processes: int = 1) -> str:
    """The accelerator's name (``device`` on CUDA), or the CPU with its core and thread counts.

    ``device=None`` describes the CPU. ``processes`` > 1 (a distributed run) prefixes the count. Host
    names and paths are never part of it: the text is published.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        processor = platform.processor() or platform.machine()
        what = f"CPU ({os.cpu_count()} cores, {processor}), {threads} torch thread{'' if threads == 1 else 's'}"
    else:
        what = device.type
    return what if processes == 1 else f"{processes} x {what}"
