"""Tiny models and data shared by the training tests (real code paths, seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from attndistill_hf.models import build_student


def tiny_teacher(path: Path | None = None, *, heads: int = 4, patch: int = 4, image_size: int = 32) -> ViTModel:
    """A random ViT teacher (48 wide, 2 blocks); saved with an image processor when ``path`` is given."""
    torch.manual_seed(123)
    config = ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=96,
        image_size=image_size,
        patch_size=patch,
        layer_norm_eps=1e-6,
    )
    model = ViTModel(config, add_pooling_layer=False)
    if path is not None:
        model.save_pretrained(path)
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model


def tiny_student(seed: int = 0, image_size: int = 32) -> ViTModel:
    return build_student(
        "vit-tiny-patch16",
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        seed=seed,
    )


class PixelDataset(torch.utils.data.Dataset):
    """Fixed random images as ``{"pixel_values"}``: no augmentation, so runs are comparable exactly."""

    def __init__(self, size: int = 32, count: int = 32) -> None:
        generator = torch.Generator().manual_seed(7)
        self.pixels = torch.randn(count, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index]}


def write_image_folder(root: Path, per_class: int = 6, classes: int = 3, size: int = 40, corrupt: bool = False) -> Path:
    """Class folders of PNGs whose colour depends on the class (plus an undecodable file if asked)."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = (rng.random((size, size, 3)) * 60 + label * 90).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{index}.png")
    if corrupt:
        (root / "class0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-an-image")
    return root
