"""Figures for model cards: training curves and teacher-vs-student attention maps.

Every function takes plain data and an output path, writes one PNG and returns the path. Figures are
drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never through ``pyplot``:
that keeps the functions free of global state (no backend switch, no open-figure leaks) so they can run
inside training jobs, worker processes and tests alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Series of ``TrainerState.log_history`` drawn by ``plot_training_curves``, one panel each, in order.
LOSS_SERIES: tuple[str, ...] = ("loss", "loss_proj", "loss_attn")
KNN_PREFIX = "eval_knn_top1"
LR_SERIES = "learning_rate"

_DPI = 100


def _save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` with Agg to ``path`` (parents created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def _series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the log entries that have both the key and a step, finite only."""
    steps: list[float] = []
    values: list[float] = []
    for entry in log_history:
        if key not in entry or "step" not in entry:
            continue
        try:
            value = float(entry[key])
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            steps.append(float(entry["step"]))
            values.append(value)
    return steps, values


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Plot the loss terms, k-NN accuracy and learning rate of a run against the optimizer step.

    ``log_history`` is ``TrainerState.log_history``: training entries carry ``loss`` (and the
    distillation terms ``loss_proj`` / ``loss_attn`` when the trainer logs them) and ``learning_rate``;
    evaluation entries carry ``eval_knn_top1`` (or several ``eval_knn_top1_*`` keys, e.g. one per k).
    Each present series gets its own panel, missing ones are left out, and a history with nothing to
    plot raises ``ValueError`` rather than writing an empty picture into a model card.
    """
    panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]] = []
    for key in LOSS_SERIES:
        steps, values = _series(log_history, key)
        if steps:
            panels.append((key, [(key, steps, values)]))
    knn_keys = sorted({k for entry in log_history for k in entry if k.startswith(KNN_PREFIX)})
    knn_lines = [(k, *_series(log_history, k)) for k in knn_keys]
    knn_lines = [line for line in knn_lines if line[1]]
    if knn_lines:
        panels.append(("k-NN top-1 (%)", knn_lines))
    steps, values = _series(log_history, LR_SERIES)
    if steps:
        panels.append((LR_SERIES, [(LR_SERIES, steps, values)]))
    if not panels:
        raise ValueError(
            "Nothing to plot: the log history has no finite "
            f"{', '.join((*LOSS_SERIES, KNN_PREFIX, LR_SERIES))} values with a 'step'."
        )

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):
        for label, xs, ys in lines:
            # A single evaluation point would be invisible as a line.
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
        if title == LR_SERIES:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, path)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def attention_heatmaps(
    maps: Any, grid: tuple[int, int], image_size: tuple[int, int], *, mode: str = "bilinear"
) -> np.ndarray:
    """Per-image heatmaps [B, H_img, W_img] in [0, 1] from CLS-query attention rows [B, heads, tokens].

    The heads are averaged, the prefix columns (CLS first, plus any distillation or register tokens,
    inferred as ``tokens - rows * cols``) are dropped, the patch weights are put back on their 2-D grid
    in raster order and upsampled to the image size. Each map is min-max scaled per image so that the
    teacher's and student's maps are comparable by shape, not by their (different) CLS self-weight.
    """
    rows, cols = grid
    arr = torch.as_tensor(_as_numpy(maps))
    if arr.ndim != 3:
        raise ValueError(f"Attention maps must be [batch, heads, tokens], got shape {tuple(arr.shape)}.")
    prefix = arr.shape[-1] - rows * cols
    if prefix < 1:
        raise ValueError(
            f"Attention rows have {arr.shape[-1]} tokens but a {rows}x{cols} grid needs {rows * cols} "
            "patches plus a CLS column: pass the grid of the model that produced the maps."
        )
    patches = arr.mean(dim=1)[:, prefix:].reshape(-1, 1, rows, cols)
    kwargs = {"align_corners": False} if mode in {"bilinear", "bicubic"} else {}
    up = F.interpolate(patches, size=tuple(image_size), mode=mode, **kwargs)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    scaled = (up - low) / (high - low).clamp_min(1e-12)
    return scaled.numpy()


def plot_attention_maps(
    images: Any,
    teacher_maps: Any,
    student_maps: Any,
    teacher_grid: tuple[int, int],
    student_grid: tuple[int, int],
    path: str | Path,
    *,
    titles: Sequence[str] = ("image", "teacher", "student"),
    row_labels: Sequence[str] | None = None,
    alpha: float = 0.55,
    mode: str = "bilinear",
) -> Path:
    """One row per image: the image, then the teacher's and the student's head-mean CLS attention on it.

    ``images`` are [B, 3, H, W] floats in 0..1 (unnormalised); ``teacher_maps`` / ``student_maps`` are the
    last block's CLS-query attention rows [B, heads, prefix + patches] with the CLS key first. This is
    the picture behind the method: the attention term pushes the student's map towards the teacher's.
    ``titles`` name the three columns; ``row_labels`` (e.g. class names) label the rows.
    """
    imgs = _as_numpy(images)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"Images must be [batch, 3, height, width], got shape {imgs.shape}.")
    batch = imgs.shape[0]
    if len(teacher_maps) != batch or len(student_maps) != batch:
        raise ValueError(f"{batch} images but {len(teacher_maps)} teacher and {len(student_maps)} student maps.")
    if len(titles) != 3:
        raise ValueError(f"titles names the 3 columns (image, teacher, student), got {len(titles)}.")
    if row_labels is not None and len(row_labels) != batch:
        raise ValueError(f"{len(row_labels)} row labels for {batch} images.")
    size = (imgs.shape[2], imgs.shape[3])
    heat = (
        attention_heatmaps(teacher_maps, teacher_grid, size, mode=mode),
        attention_heatmaps(student_maps, student_grid, size, mode=mode),
    )
    pictures = np.clip(imgs.transpose(0, 2, 3, 1), 0.0, 1.0)
    if pictures.shape[-1] == 1:
        pictures = np.repeat(pictures, 3, axis=-1)

    fig = Figure(figsize=(3 * 2.4, batch * 2.4), layout="constrained")
    axes = fig.subplots(batch, 3, squeeze=False)
    for i in range(batch):
        axes[i, 0].imshow(pictures[i])
        for col, maps in ((1, heat[0]), (2, heat[1])):
            axes[i, col].imshow(pictures[i])
            axes[i, col].imshow(maps[i], cmap="inferno", alpha=alpha, vmin=0.0, vmax=1.0)
        for col in range(3):
            axes[i, col].set_xticks([])
            axes[i, col].set_yticks([])
            if i == 0:
                axes[i, col].set_title(titles[col])
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i])
    return _save(fig, path)
