"""Figures: valid PNGs, graceful handling of missing series, and attention panels that follow their inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attndistill_hf.figures import attention_heatmaps, plot_attention_maps, plot_training_curves

from helpers import REPO, load_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> tuple[int, int]:
    """The file is a PNG that PIL decodes to a non-empty picture; return its (width, height)."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
    assert width > 0 and height > 0
    return width, height


def peaked_rows(batch: int, heads: int, grid: tuple[int, int], where: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """CLS-query rows [batch, heads, prefix + patches] whose patch mass sits on one cell of the grid."""
    rows, cols = grid
    logits = torch.randn(batch, heads, prefix + rows * cols) * 0.1
    logits[..., prefix + where[0] * cols + where[1]] += 6.0
    return logits.softmax(dim=-1)


def test_training_curves_plot_every_present_series(tmp_path: Path) -> None:
    steps = torch.arange(1, 21)
    losses = (2.0 * torch.exp(-steps / 8.0) + 0.05 * torch.rand(20)).tolist()
    history = [
        {"step": int(s), "loss": loss, "loss_proj": loss * 0.9, "loss_attn": loss * 0.1, "learning_rate": 1e-4 * int(s)}
        for s, loss in zip(steps, losses, strict=True)
    ]
    history += [{"step": 5 * i, "eval_knn_top1": 10.0 + 7.0 * i, "epoch": i} for i in range(1, 5)]
    history.append({"train_runtime": 12.0, "step": 20})  # Trainer's final summary: nothing to plot
    out = plot_training_curves(history, tmp_path / "nested" / "curves.png")
    assert out == tmp_path / "nested" / "curves.png"
    width, height = assert_png(out)
    # Five panels on a three-column grid: two rows, so the picture is not a single strip.
    assert width > height > 0


def test_training_curves_skip_missing_series_and_refuse_empty(tmp_path: Path) -> None:
    # Plain Trainer history: only `loss`, and a non-finite value that must not break the plot.
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 6, "loss": float("nan")}]
    only_loss = assert_png(plot_training_curves(history, tmp_path / "loss.png"))
    full = [dict(e, loss_proj=0.5, loss_attn=0.1, learning_rate=1e-3) for e in history]
    all_series = assert_png(plot_training_curves(full, tmp_path / "full.png"))
    assert only_loss[0] < all_series[0]  # one panel is narrower than three

    with pytest.raises(ValueError, match="Nothing to plot"):
        plot_training_curves([{"train_runtime": 1.0, "step": 3}, {"loss": 0.3}], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_heatmaps_follow_the_peak_and_drop_prefix_tokens() -> None:
    top_left = attention_heatmaps(peaked_rows(2, 3, (4, 4), (0, 0)), (4, 4), (32, 32))
    bottom_right = attention_heatmaps(peaked_rows(2, 3, (4, 4), (3, 3)), (4, 4), (32, 32))
    assert top_left.shape == bottom_right.shape == (2, 32, 32)
    for heat in (top_left, bottom_right):
        assert heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6
    # Mass in the top-left vs bottom-right quadrant, per image.
    assert (top_left[:, :16, :16].mean(axis=(1, 2)) > 5 * top_left[:, 16:, 16:].mean(axis=(1, 2))).all()
    assert (bottom_right[:, 16:, 16:].mean(axis=(1, 2)) > 5 * bottom_right[:, :16, :16].mean(axis=(1, 2))).all()

    # Register tokens between CLS and patches (DINOv2 layout) are inferred from the grid and dropped: a huge
    # weight on them must not shift the map.
    with_registers = peaked_rows(1, 2, (4, 4), (0, 3), prefix=5)
    with_registers[..., 1:5] = 50.0
    heat = attention_heatmaps(with_registers, (4, 4), (8, 8), mode="nearest")
    assert np.unravel_index(heat[0].argmax(), heat[0].shape)[0] < 2
    assert np.unravel_index(heat[0].argmax(), heat[0].shape)[1] >= 6

    with pytest.raises(ValueError, match="grid"):
        attention_heatmaps(peaked_rows(1, 2, (4, 4), (0, 0)), (5, 5), (8, 8))


def _panel_columns(path: Path) -> list[np.ndarray]:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    third = pixels.shape[1] // 3
    return [pixels[:, i * third : (i + 1) * third] for i in range(3)]


def test_attention_figure_panels_reflect_their_inputs(tmp_path: Path) -> None:
    images = torch.full((2, 3, 48, 48), 0.5) + 0.05 * torch.rand(2, 3, 48, 48)
    student = peaked_rows(2, 3, (3, 3), (1, 1))  # different head count and grid than the teacher
    teacher_tl = peaked_rows(2, 6, (6, 6), (0, 0))
    teacher_br = peaked_rows(2, 6, (6, 6), (5, 5))
    a = plot_attention_maps(images, teacher_tl, student, (6, 6), (3, 3), tmp_path / "tl.png", row_labels=["x", "y"])
    b = plot_attention_maps(images, teacher_br, student, (6, 6), (3, 3), tmp_path / "br.png", row_labels=["x", "y"])
    size_a, size_b = assert_png(a), assert_png(b)
    assert size_a == size_b
    image_a, teacher_a, student_a = _panel_columns(a)
    image_b, teacher_b, student_b = _panel_columns(b)
    # Same images and student maps: those columns render identically; only the teacher column moves.
    assert np.array_equal(image_a, image_b)
    assert np.array_equal(student_a, student_b)
    assert np.abs(teacher_a - teacher_b).mean() > 1.0

    # Within the teacher column of the first row, the hot (bright) region sits where the peak is.
    def brightness(panel: np.ndarray) -> np.ndarray:
        rows = panel[: panel.shape[0] // 2].sum(axis=-1)  # first image row of the figure
        return rows

    tl, br = brightness(teacher_a), brightness(teacher_b)
    h, w = tl.shape
    quadrant = (slice(h // 4, h // 2), slice(w // 4, w // 2))  # upper-left part of the panel
    opposite = (slice(h // 2, 3 * h // 4), slice(w // 2, 3 * w // 4))
    assert tl[quadrant].mean() - tl[opposite].mean() > br[quadrant].mean() - br[opposite].mean()


def test_attention_figure_rejects_mismatched_inputs(tmp_path: Path) -> None:
    images = torch.rand(2, 3, 16, 16)
    maps = peaked_rows(2, 2, (2, 2), (0, 0))
    with pytest.raises(ValueError, match="2 images"):
        plot_attention_maps(images, maps[:1], maps, (2, 2), (2, 2), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        plot_attention_maps(images[0], maps, maps, (2, 2), (2, 2), tmp_path / "x.png")


def test_attention_cases_schematic_is_the_docs_figure(tmp_path: Path) -> None:
    script = load_script(REPO / "docs" / "scripts" / "plot_attention_cases.py", "plot_attention_cases")
    out = script.plot_attention_cases(tmp_path / "cases.png")
    width, height = assert_png(out)
    assert width > 600 and height > 400
    # docs/method.md shows what the script draws now (text rendering may differ by a few pixels elsewhere).
    with Image.open(out) as drawn, Image.open(script.FIGURE) as published:
        assert drawn.size == published.size
        difference = np.abs(np.asarray(drawn.convert("RGB"), np.int16) - np.asarray(published.convert("RGB"), np.int16))
    assert difference.mean() < 1.0
