"""Device-side decoding and augmentation (run here on the CPU fallback; the CUDA test runs where a GPU is)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from attndistill_hf.data import (
    EXAMPLE_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNREADABLE_IDS,
    ExampleKey,
    eval_transform,
    train_transform,
    view_seed,
)
from attndistill_hf.data.gpu_augment import (
    GpuAugment,
    RawBytesCollator,
    center_crop_boxes,
    jpeg_frame,
    read_image_bytes,
    sample_crop_boxes,
)

from helpers import coordinate_image, encode

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def batch_of(*blobs: bytes | None, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    examples = [{"image": {"bytes": b, "path": None}} for b in blobs]
    if labels is not None:
        for example, label in zip(examples, labels, strict=True):
            example["label"] = label
    return RawBytesCollator("image", "label" if labels is not None else None)(examples)


def reference_mean_area(n: int = 4000) -> float:
    torch.manual_seed(1)
    image = torch.empty(1, 256, 256)
    return float(
        np.mean([np.prod(v2.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])[2:]) for _ in range(n)])
        / 256**2
    )


# ----------------------------------------------------------------------------------------------
# Collator and header parsing
# ----------------------------------------------------------------------------------------------


def test_raw_bytes_collator_packs_bytes_and_counts_unreadable(tmp_path: Path) -> None:
    a, b = b"first-image", b"second"
    path = tmp_path / "c.jpg"
    path.write_bytes(b"third!")
    examples = [
        {"image": {"bytes": a, "path": None}, "label": 1},
        {"image": {"bytes": None, "path": None}, "label": 2},
        {"image": b, "label": 3},
        {"image": {"bytes": None, "path": str(tmp_path / "missing.jpg")}, "label": 4},
        {"image": str(path), "label": 5},
    ]
    batch = RawBytesCollator("image", "label")(examples)
    assert batch["image_data"].dtype == torch.uint8
    assert batch["image_data"].numpy().tobytes() == a + b + b"third!"
    assert batch["image_lengths"].tolist() == [len(a), len(b), 6]
    assert batch["labels"].tolist() == [1, 3, 5]
    assert batch["skipped_images"].item() == 2
    assert set(RawBytesCollator()([{"image": a}])) == {"image_data", "image_lengths", "skipped_images"}
    with pytest.raises(TypeError, match="decode=False"):
        read_image_bytes(Image.new("RGB", (2, 2)))
    with pytest.raises(KeyError, match="no image column 'image'"):
        RawBytesCollator()([{"jpg": a}])


def test_jpeg_frame_reads_size_and_components_from_the_header() -> None:
    assert jpeg_frame(encode(Image.new("L", (8, 6)), "JPEG")) == (6, 8, 1)
    assert jpeg_frame(encode(Image.new("RGB", (300, 17)), "JPEG")) == (17, 300, 3)
    assert jpeg_frame(encode(Image.new("RGB", (8, 8)), "JPEG", progressive=True)) == (8, 8, 3)
    assert jpeg_frame(encode(Image.new("CMYK", (8, 8)), "JPEG")).components == 4
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a long APP1 segment before the frame header
    with_exif = encode(Image.new("RGB", (8, 8)), "JPEG", exif=exif)
    assert jpeg_frame(np.frombuffer(with_exif, dtype=np.uint8)) == (8, 8, 3)
    assert jpeg_frame(encode(Image.new("RGB", (8, 8)), "PNG")) is None
    assert jpeg_frame(b"\xff\xd8\xff\xe0\x00") is None


def test_a_jpeg_above_the_pixel_limit_is_decoded_reduced_on_the_batched_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from attndistill_hf.data import decoding, gpu_augment

    # The same rule as the PIL path, at small sizes: 120 x 60 is above 2,000 pixels, half of it fits.
    monkeypatch.setattr(decoding, "MAX_IMAGE_PIXELS", 2_000)
    monkeypatch.setattr(gpu_augment, "MAX_IMAGE_PIXELS", 2_000)
    large, small = (
        encode(Image.new("RGB", (120, 60), (200, 30, 30)), "JPEG"),
        encode(Image.new("RGB", (40, 20)), "JPEG"),
    )
    data = torch.from_numpy(np.frombuffer(large + small, dtype=np.uint8).copy())
    images, ok = GpuAugment(8, device="cpu").decode(data, torch.tensor([len(large), len(small)]))
    assert ok.tolist() == [True, True]
    assert [tuple(image.shape) for image in images] == [(3, 30, 60), (3, 20, 40)]


# ----------------------------------------------------------------------------------------------
# Crop boxes
# ----------------------------------------------------------------------------------------------


def test_crop_boxes_follow_random_resized_crop() -> None:
    n = 4000
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(torch.full((n,), 256), torch.full((n,), 256), generator=generator).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 256).all()
    area = h * w / 256**2
    # Rounding the sides to pixels moves the area and ratio a little past the nominal bounds.
    assert area.min() >= 0.2 * 0.97 and area.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.97 and (w / h).max() <= 4 / 3 * 1.03
    assert abs(area.mean().item() - reference_mean_area()) < 0.02
    # Positions are uniform over the free space: the mean centre is the image centre.
    assert abs((top + h / 2).mean().item() - 128) < 3 and abs((left + w / 2).mean().item() - 128) < 3


def cpu_crop_boxes(height: int, width: int, n: int, scale: tuple[float, float]) -> torch.Tensor:
    """``n`` boxes (top, left, height, width) drawn by the RandomResizedCrop of the CPU path's training view."""
    crop = next(step for step in train_transform(32, scale=scale).transforms if isinstance(step, v2.RandomResizedCrop))
    image = [tv_tensors.Image(torch.empty(3, height, width, dtype=torch.uint8))]
    torch.manual_seed(0)
    boxes = (crop.make_params(image) for _ in range(n))
    return torch.tensor([[box["top"], box["left"], box["height"], box["width"]] for box in boxes], dtype=torch.float64)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the empirical distribution functions of two samples (Kolmogorov-Smirnov)."""
    points = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a.sort().values, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


@pytest.mark.parametrize("per_image", [False, True], ids=["one generator", "a generator per image"])
@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [
        (256, 256, (0.2, 1.0)),  # the published view on a large image
        (28, 28, (0.35, 1.0)),  # the demo teacher's view of a Fashion-MNIST image: whole-pixel rounding matters
        (60, 300, (0.2, 1.0)),  # a wide image: many draws do not fit, and the centred fallback box is common
    ],
)
def test_gpu_crop_boxes_sample_the_distribution_of_the_cpu_transform(
    height: int, width: int, scale: tuple[float, float], per_image: bool
) -> None:
    """sample_crop_boxes is the batched twin of torchvision's RandomResizedCrop in data.train_transform, drawn
    from one generator or, as for keyed training examples, from each image's own (seeded by its view seed)."""
    n = 20_000
    cpu = cpu_crop_boxes(height, width, n, scale)
    draws = (
        {"generators": [torch.Generator().manual_seed(view_seed(ExampleKey(0, 0, i), i)) for i in range(n)]}
        if per_image
        else {"generator": torch.Generator().manual_seed(0)}
    )
    gpu = sample_crop_boxes(torch.full((n,), height), torch.full((n,), width), scale=scale, **draws).double()

    def statistics(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        top, left, h, w = boxes.unbind(1)
        return {
            "area fraction": h * w / (height * width),
            "log aspect ratio": torch.log(w / h),
            "centre x": (left + w / 2) / width,
            "centre y": (top + h / 2) / height,
        }

    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for name, ours in statistics(gpu).items():
        theirs = statistics(cpu)[name]
        # Sampling error of 20,000 draws: about 0.003 on the means (all statistics lie in [-0.3, 1]) and
        # 0.014 on the distribution functions (Kolmogorov-Smirnov at p = 0.001); the bounds leave room.
        assert abs(ours.mean() - theirs.mean()) < 0.01, (name, ours.mean(), theirs.mean())
        assert abs(ours.std() - theirs.std()) < 0.01, (name, ours.std(), theirs.std())
        assert ks_distance(ours, theirs) < 0.025, (name, ks_distance(ours, theirs))
        # Quantiles: within one whole-pixel step of the box (the 28 px image's area takes discrete values).
        step = 0.08 if height < 64 else 0.02
        gap = (torch.quantile(ours, quantiles) - torch.quantile(theirs, quantiles)).abs().max()
        assert gap < step, (name, gap)


def test_crop_box_fallback_for_extreme_shapes_and_center_boxes() -> None:
    # 10 x 1000 px: no allowed box of 20%+ area fits, so the centred 4/3 box of full height is used.
    box = sample_crop_boxes(torch.tensor([10]), torch.tensor([1000]), generator=torch.Generator().manual_seed(0))
    assert box.tolist() == [[0, 493, 10, 13]]
    tall = sample_crop_boxes(torch.tensor([1000]), torch.tensor([10]), generator=torch.Generator().manual_seed(0))
    assert tall.tolist() == [[493, 0, 13, 10]]
    # Resize(256) + CenterCrop(224) of a 500 x 375 image, expressed in source pixels.
    assert center_crop_boxes(torch.tensor([375]), torch.tensor([500]), 224).tolist() == [[24, 86, 328, 328]]
    with pytest.raises(ValueError, match="scale"):
        sample_crop_boxes(torch.tensor([5]), torch.tensor([5]), scale=(0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Decoding and augmentation
# ----------------------------------------------------------------------------------------------


def test_default_device_and_argument_checks() -> None:
    assert GpuAugment(8).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="image_size"):
        GpuAugment(0)
    with pytest.raises(ValueError, match=r"^std must be a finite number > 0, got 0.0 in \[0.1, 0.0, 0.1\]\.$"):
        GpuAugment(8, std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="flip_prob"):
        GpuAugment(8, flip_prob=2.0)
    augment = GpuAugment(8, device="cpu")
    with pytest.raises(KeyError, match="image_lengths"):
        augment({"image_data": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="add up to 5 bytes"):
        augment({"image_data": torch.zeros(3, dtype=torch.uint8), "image_lengths": torch.tensor([5])})


def test_constant_colour_maps_to_the_normalised_constant() -> None:
    colour = np.array([200, 100, 50])
    augment = GpuAugment(16, device="cpu", seed=0)
    out = augment(batch_of(encode(Image.new("RGB", (50, 37), tuple(colour)), "JPEG", quality=95)))
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.float32
    expected = (colour / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    tolerance = 3 / 255 / np.array(IMAGENET_STD)  # JPEG moves flat colours by a level or two
    assert np.all(np.abs(pixels[0].mean(dim=(1, 2)).numpy() - expected) < tolerance)
    assert pixels[0].std(dim=(1, 2)).max().item() < 1e-4


def test_modes_formats_and_failures_in_one_batch() -> None:
    good = encode(Image.new("RGB", (40, 30), (10, 20, 30)), "JPEG")
    truncated = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    blobs = [
        good,
        encode(Image.new("L", (20, 30), 77), "JPEG"),  # grayscale JPEG
        encode(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG"),  # CMYK JPEG: decoded by PIL
        encode(Image.new("RGBA", (20, 20), (0, 0, 255, 0)), "PNG"),  # transparent PNG: white
        truncated[: len(truncated) // 2],  # fails the batched decode, found one by one
        b"not an image",
        None,  # dropped by the collator
        encode(Image.fromarray(np.full((12, 12), 257 * 60, dtype=np.uint16)), "PNG"),  # 16-bit PNG
    ]
    batch = batch_of(*blobs, labels=list(range(len(blobs))))
    assert batch["skipped_images"].item() == 1
    out = GpuAugment(8, ZERO, ONE, device="cpu", seed=0)(batch)
    # 7 reach the decoder, 2 of them fail: 5 images, and 1 + 2 skipped in all.
    assert out["pixel_values"].shape == (5, 3, 8, 8)
    assert out["labels"].tolist() == [0, 1, 2, 3, 7]
    assert out["skipped_images"].item() == 3
    colours = (out["pixel_values"].mean(dim=(2, 3)) * 255).numpy()
    expected = [[10, 20, 30], [77, 77, 77], [255, 0, 255], [255, 255, 255], [60, 60, 60]]
    np.testing.assert_allclose(colours, expected, atol=3)


def test_all_images_failing_gives_an_empty_batch() -> None:
    out = GpuAugment(12, device="cpu")(batch_of(b"junk", b"\xff\xd8\xff broken", labels=[3, 4]))
    assert out["pixel_values"].shape == (0, 3, 12, 12) and out["labels"].shape == (0,)
    assert out["skipped_images"].item() == 2


def test_crop_area_and_flip_statistics_on_decoded_jpegs() -> None:
    blob = encode(coordinate_image(256), "JPEG", quality=100)
    n, size = 240, 32
    augment = GpuAugment(size, ZERO, ONE, device="cpu", seed=1)
    pixels = torch.cat([augment(batch_of(*[blob] * 40))["pixel_values"] for _ in range(n // 40)]) * 255
    red, green = pixels[:, 0, size // 2], pixels[:, 1, :, size // 2]
    width = (red[:, -1] - red[:, 0]).abs() * size / (size - 1)
    height = (green[:, -1] - green[:, 0]) * size / (size - 1)
    area = (width * height / 256**2).numpy()
    assert area.min() > 0.2 * 0.9 and area.max() < 1.05
    assert abs(area.mean() - reference_mean_area()) < 0.04
    flipped = (red[:, -1] < red[:, 0]).sum().item()
    assert 0.38 * n < flipped < 0.62 * n


def test_normalisation_statistics_and_agreement_with_the_cpu_path() -> None:
    rng = np.random.default_rng(0)
    noise = encode(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)), "PNG")
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    out = GpuAugment(32, mean, std, device="cpu", seed=0)(batch_of(*[noise] * 8))["pixel_values"]
    # Uniform pixels average 127.5; resampling keeps the mean.
    expected = (127.5 / 255 - np.array(mean)) / np.array(std)
    error_in_pixel_units = np.abs(out.mean(dim=(0, 2, 3)).numpy() - expected) * np.array(std)
    assert error_in_pixel_units.max() < 0.01
    # Evaluation view: same geometry as Resize + CenterCrop on the CPU, up to the rounding of the resized
    # size and crop offset to whole pixels (here up to ~2.5 source pixels; the image encodes x and y).
    smooth = Image.fromarray(np.asarray(coordinate_image(256))[20:245, 5:250])
    gpu = GpuAugment(64, ZERO, ONE, device="cpu", train=False)(batch_of(encode(smooth, "PNG")))["pixel_values"][0]
    cpu = eval_transform(64, ZERO, ONE)(smooth)
    assert (gpu - cpu).abs().max().item() * 255 < 3.0
    assert (gpu - cpu).abs().mean().item() * 255 < 1.5


def test_seed_makes_crops_reproducible() -> None:
    blob = encode(coordinate_image(64), "JPEG", quality=90)
    first = GpuAugment(16, device="cpu", seed=5)(batch_of(blob, blob, blob))["pixel_values"]
    again = GpuAugment(16, device="cpu", seed=5)(batch_of(blob, blob, blob))["pixel_values"]
    other = GpuAugment(16, device="cpu", seed=6)(batch_of(blob, blob, blob))["pixel_values"]
    assert torch.equal(first, again) and not torch.equal(first, other)


def keyed_batch(blobs: list[bytes | None], indices: list[int], epoch: int = 0) -> dict:
    """A RawBytesCollator batch of training examples as the trainer hands them over: each with its key."""
    examples = [
        {"image": {"bytes": blob, "path": None}, "label": index, EXAMPLE_KEY: ExampleKey(0, epoch, index)}
        for blob, index in zip(blobs, indices, strict=True)
    ]
    return RawBytesCollator("image", "label")(examples)


def test_a_keyed_view_is_the_same_in_any_batch() -> None:
    """Each image's crop and flip come from its own view seed: not from the batch, its order or the module's seed."""
    blob = encode(coordinate_image(64), "JPEG", quality=90)
    batch = keyed_batch([blob] * 5, [0, 1, 2, 3, 4])
    assert batch["view_seeds"] == [view_seed(ExampleKey(0, 0, i), i) for i in range(5)]
    views = GpuAugment(16, device="cpu", seed=1)(batch)["pixel_values"]
    assert len({view.numpy().tobytes() for view in views}) == 5
    reordered = GpuAugment(16, device="cpu", seed=2)(keyed_batch([blob, b"junk", blob, blob], [4, 9, 2, 0]))
    assert reordered["labels"].tolist() == [4, 2, 0]
    assert torch.equal(reordered["pixel_values"], views[[4, 2, 0]])
    other_epoch = GpuAugment(16, device="cpu", seed=1)(keyed_batch([blob] * 5, [0, 1, 2, 3, 4], epoch=1))
    assert not any(torch.equal(a, b) for a, b in zip(other_epoch["pixel_values"], views, strict=True))


def test_keyed_unreadable_examples_are_counted_once() -> None:
    good = encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG")
    augment = GpuAugment(8, device="cpu")
    # Example 1 cannot be decoded, example 2 has no bytes (the collator drops and lists it).
    first = keyed_batch([good, b"junk", None], [0, 1, 2])
    assert first[UNREADABLE_IDS] == [2] and first["example_ids"] == [0, 1]
    assert augment(first)["skipped_images"].item() == 1 + 1
    # The next epoch reads example 1 again: GpuAugment counts it no more (example 2 is the loader's to count).
    again = keyed_batch([b"junk", good], [1, 0], epoch=1)
    assert augment(again)["skipped_images"].item() == 0
    assert augment(keyed_batch([b"junk"], [5]))["skipped_images"].item() == 1
    assert GpuAugment(8, device="cpu")(batch_of(b"junk", b"junk"))["skipped_images"].item() == 2  # without keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_matches_the_cpu_fallback() -> None:
    blobs = [encode(coordinate_image(128), "JPEG", quality=95), encode(Image.new("L", (50, 70), 99), "JPEG")]
    on_gpu = GpuAugment(32, device="cuda", train=False)(batch_of(*blobs))["pixel_values"]
    on_cpu = GpuAugment(32, device="cpu", train=False)(batch_of(*blobs))["pixel_values"]
    assert on_gpu.is_cuda
    # nvJPEG and libjpeg-turbo may differ by a level or two of their IDCT.
    assert (on_gpu.cpu() - on_cpu).abs().max().item() < 4 / 255 / min(IMAGENET_STD)


def test_bench_data_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end with a tiny setting and writes one JSON row per pipeline."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).parents[1] / "bench" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    rows = bench.main(
        [
            "--num_images",
            "8",
            "--width",
            "64",
            "--height",
            "48",
            "--image_size",
            "16",
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--warmup_epochs",
            "0",
            "--json",
            str(out),
        ]
    )
    assert [r["path"] for r in rows] == ["cpu", "gpu"]
    assert all(r["images"] == 8 and r["img_per_s"] > 0 for r in rows)
    assert json.loads(out.read_text()) == rows
    with pytest.raises(SystemExit):
        bench.parse_args(["--paths", "tpu"])
