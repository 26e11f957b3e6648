"""Draw ``docs/figures/attention_cases.png``, the schematic of the three attention cases in ``docs/method.md``.

    python docs/scripts/plot_attention_cases.py             # rewrites docs/figures/attention_cases.png
    python docs/scripts/plot_attention_cases.py OUT.png     # elsewhere

The maps are synthetic (one Gaussian bump per head), but cases (b) and (c) go through the loss's own
resize and head fusion (:mod:`attndistill_hf.losses`), so the figure shows what the KL compares.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attndistill_hf.losses import DEFAULT_FUSION_TEMPERATURE, clamp_and_renormalise, fuse_heads, resize_patch_attention

FIGURE = Path(__file__).resolve().parents[1] / "figures" / "attention_cases.png"


def _synthetic_cls_rows(heads: int, side: int, centres: Sequence[tuple[float, float]], seed: int) -> torch.Tensor:
    """CLS-query rows [heads, 1 + side*side]: one Gaussian bump per head plus a CLS self-weight."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    rows = []
    for h in range(heads):
        cy, cx = centres[h % len(centres)]
        logits = -((ys - cy) ** 2 + (xs - cx) ** 2) / 0.02 + 0.3 * torch.randn(side, side, generator=gen)
        rows.append(torch.cat([torch.tensor([1.5]), logits.flatten()]))
    return torch.softmax(torch.stack(rows), dim=-1)


def _resize_rows(rows: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """Case (b) on [heads, tokens] rows, through the loss's own resize (then clamped as the loss does)."""
    return clamp_and_renormalise(resize_patch_attention(rows[None], (src, src), (dst, dst)))[0]


def _fuse_heads(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """Case (c) on [heads, tokens] rows, through the loss's own head fusion."""
    return fuse_heads(rows[None], temperature)[0]


def _tile_heads(rows: torch.Tensor, side: int) -> np.ndarray:
    """Patch maps of several heads side by side (NaN gutters), each min-max scaled, for one panel."""
    tiles = []
    for row in rows:
        patch = row[1:].reshape(side, side)
        patch = (patch - patch.min()) / (patch.max() - patch.min()).clamp_min(1e-12)
        tiles.append(patch.numpy())
        tiles.append(np.full((side, max(1, side // 6)), np.nan))
    return np.concatenate(tiles[:-1], axis=1)


def plot_attention_cases(path: str | Path, *, temperature: float = DEFAULT_FUSION_TEMPERATURE) -> Path:
    """A schematic of the attention loss cases, drawn from synthetic CLS-attention maps, written to ``path``.

    Rows: (a) same heads and patches, head-to-head KL; (b) a finer teacher grid, bicubic-resized to the
    student's grid with the CLS weight kept; (c) different head counts, both sides fused into one map by
    the normalised geometric mean ``softmax(sum_h log a_h / T)``. Columns: the teacher's maps, the
    teacher side as the KL sees it, the student side as the KL sees it, and the student's maps.
    """
    centres = [(0.3, 0.3), (0.65, 0.7), (0.3, 0.75), (0.7, 0.25), (0.5, 0.5), (0.2, 0.5)]
    teacher_a = _synthetic_cls_rows(3, 8, centres, seed=0)
    student_a = _synthetic_cls_rows(3, 8, centres[1:] + centres[:1], seed=1)
    teacher_b = _synthetic_cls_rows(3, 16, centres, seed=2)
    student_b = _synthetic_cls_rows(3, 8, centres[2:], seed=3)
    teacher_c = _synthetic_cls_rows(6, 8, centres, seed=4)
    student_c = _synthetic_cls_rows(3, 8, centres[::2], seed=5)
    cases = [
        ("(a) same heads, same patches\nKL per head", (teacher_a, 8), (teacher_a, 8), (student_a, 8), (student_a, 8)),
        (
            "(b) teacher 16x16 -> student 8x8\nbicubic resize, CLS weight kept",
            (teacher_b, 16),
            (_resize_rows(teacher_b, 16, 8), 8),
            (student_b, 8),
            (student_b, 8),
        ),
        (
            f"(c) 6 heads vs 3 heads\ngeometric-mean fusion, T={temperature:g}",
            (teacher_c, 8),
            (_fuse_heads(teacher_c, temperature), 8),
            (_fuse_heads(student_c, temperature), 8),
            (student_c, 8),
        ),
    ]
    columns = ["teacher (last block)", "teacher side of the KL", "student side of the KL", "student (last block)"]
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(len(cases), len(columns), squeeze=False)
    for r, (label, *panels) in enumerate(cases):
        for c, (rows, side) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(_tile_heads(rows, side), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{rows.shape[0]} map{'s' if rows.shape[0] > 1 else ''}, {side}x{side}", fontsize=8)
            if r == 0:
                ax.set_title(columns[c], fontsize=10)
        axes[r, 0].set_ylabel(label, fontsize=9)
    fig.suptitle("AttnDistill attention guidance: CLS-query attention of the last block, three cases")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # drawn without pyplot: no backend to choose, no open figure left behind
    fig.savefig(out, format="png", dpi=100)
    return out


if __name__ == "__main__":
    written = plot_attention_cases(sys.argv[1] if len(sys.argv) > 1 else FIGURE)
    print(f"Wrote {written}")
