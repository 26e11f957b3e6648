"""Data sources, per-rank streaming, transforms and the collator, on tiny local data made here."""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from dataclasses import fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision.transforms import v2

from attndistill_hf.data import (
    EXAMPLE_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNREADABLE_IDS,
    DataArguments,
    DistinctUnreadableLoader,
    EpochShuffle,
    EqualStepsIterable,
    ExampleKey,
    ImageCollator,
    KeyedExamples,
    check_hub_split,
    column_names,
    count_examples,
    dataloader_workers,
    decode_image,
    eval_transform,
    eval_view_loader,
    image_stats,
    load_split,
    prepare_per_rank_dataloader,
    shard_stream,
    steps_per_epoch,
    to_rgb,
    train_transform,
)

from helpers import coordinate_image, encode, write_image_folder

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@pytest.fixture(autouse=True)
def no_arrow_shutdown_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shuffled parquet streams pause 5 s when they close (a guard for arrow's reader threads); tiny
    test files need no such pause."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


# 7 decodable images of every awkward kind, 2 that are not.
GOOD_IMAGES = 7
BAD_IMAGES = 2


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "cat").mkdir()
    (root / "dog").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "cat" / "rgb.jpg", quality=95)
    Image.new("L", (30, 40), 90).save(root / "cat" / "gray.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(root / "cat" / "rgba.png")
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(root / "cat" / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 257 * 60, dtype=np.uint16)).save(root / "dog" / "deep.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(root / "dog" / "tiny.png")
    palette = Image.new("P", (12, 12), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "dog" / "palette.png", transparency=0)
    good_jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (root / "dog" / "garbage.png").write_bytes(b"this is not an image at all")
    return root


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of 5 examples with ids 0..19 (the label is the id) plus an uneven set of three."""
    root = tmp_path_factory.mktemp("parquet")
    (root / "even").mkdir()
    (root / "uneven").mkdir()
    image = encode(Image.new("RGB", (10, 10), (50, 60, 70)), "PNG")
    for shard in range(4):
        ids = list(range(5 * shard, 5 * shard + 5))
        ds = Dataset.from_dict({"image": [{"bytes": image, "path": None}] * 5, "label": ids})
        ds.cast_column("image", ImageFeature()).to_parquet(str(root / "even" / f"part-{shard}.parquet"))
    for shard, ids in enumerate([range(0, 7), range(7, 10), range(10, 12)]):
        ds = Dataset.from_dict({"image": [{"bytes": image, "path": None}] * len(ids), "label": list(ids)})
        ds.cast_column("image", ImageFeature()).to_parquet(str(root / "uneven" / f"part-{shard}.parquet"))
    return root


def ids_of(ds) -> list[int]:
    return [int(example["label"]) for example in ds]


# ----------------------------------------------------------------------------------------------
# DataArguments
# ----------------------------------------------------------------------------------------------


def test_every_field_documented_and_parsed_by_hf_argument_parser(image_folder: Path) -> None:
    from transformers import HfArgumentParser

    assert all(f.metadata.get("help") for f in fields(DataArguments))
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_dir", str(image_folder), "--streaming", "--image_size", "96", "--max_train_samples", "3"]
    )
    assert (args.train_source, args.streaming, args.image_size, args.max_train_samples) == ("folder", True, 96, 3)
    assert args.eval_source is None
    # A config file may give a single pattern as a string.
    assert DataArguments(data_files="x/*.parquet").data_files == ["x/*.parquet"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset_name": "a/b", "data_files": ["x.parquet"]}, "--dataset_name, --data_files"),
        ({"dataset_config": "full"}, "--dataset_config is set without --dataset_name"),
        ({"train_dir": "/no/such/folder"}, "is not a directory"),
        ({"data_files": ["shards/*.txt"]}, "must end in .parquet"),
        ({"data_files": ["a/*.parquet", "b/*.tar"]}, "mixes parquet and webdataset"),
        ({"eval_dir": ".", "eval_data_files": ["e.parquet"]}, "keep one evaluation source"),
        ({"max_train_samples": 0}, "--max_train_samples must be a positive integer"),
        ({"image_size": -3}, "--image_size must be a positive integer"),
    ],
)
def test_bad_arguments_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataArguments(**kwargs)


# ----------------------------------------------------------------------------------------------
# Decoding and colour conversion
# ----------------------------------------------------------------------------------------------


def test_to_rgb_converts_every_mode_to_expected_colours() -> None:
    def pixel(image: Image.Image) -> tuple[int, ...]:
        rgb = to_rgb(image)
        assert rgb.mode == "RGB"
        return rgb.getpixel((0, 0))

    assert pixel(Image.new("L", (2, 2), 90)) == (90, 90, 90)
    assert pixel(Image.new("RGBA", (2, 2), (0, 0, 255, 0))) == (255, 255, 255)  # transparent -> white
    assert pixel(Image.new("RGBA", (2, 2), (0, 0, 255, 255))) == (0, 0, 255)
    assert pixel(Image.new("RGBA", (2, 2), (0, 0, 0, 128))) == (127, 127, 127)  # half over white
    assert pixel(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (0, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (2, 2), (0, 255, 0, 0))) == (255, 0, 255)
    # 16-bit: scaled, not clipped (PIL's own convert would give 255 here).
    assert pixel(Image.fromarray(np.full((2, 2), 257 * 60, dtype=np.uint16))) == (60, 60, 60)
    assert pixel(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))) == (128, 128, 128)
    assert pixel(Image.new("I", (2, 2), 40000)) == (156, 156, 156)
    opaque_palette = Image.new("P", (2, 2), 1)
    opaque_palette.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    assert pixel(opaque_palette) == (9, 8, 7)
    see_through = opaque_palette.copy()
    see_through.info["transparency"] = 1
    assert pixel(see_through) == (255, 255, 255)


def test_decode_image_accepts_every_form_and_rejects_bad_data(tmp_path: Path) -> None:
    image = Image.new("RGB", (6, 4), (1, 2, 3))
    data = encode(image, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for value in (
        data,
        bytearray(data),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        path,
        image,
    ):
        decoded = decode_image(value)
        assert decoded is not None and decoded.mode == "RGB" and decoded.size == (6, 4)
        assert decoded.getpixel((5, 3)) == (1, 2, 3)
    for bad in (b"", b"\x89PNG garbage", data[:40], {"bytes": None, "path": None}, str(tmp_path / "gone.png"), None):
        assert decode_image(bad) is None
    with pytest.raises(TypeError, match="image column must hold"):
        decode_image(12)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_image_folder_skips_and_counts_corrupt_files(image_folder: Path, tmp_path: Path, streaming: bool) -> None:
    args = DataArguments(train_dir=str(image_folder), streaming=streaming, cache_dir=str(tmp_path))
    ds = load_split(args, "train")
    assert ds.features["image"] == ImageFeature(decode=False)
    examples = list(ds)
    assert len(examples) == GOOD_IMAGES + BAD_IMAGES
    assert count_examples(args, "train", None if streaming else ds) == GOOD_IMAGES + BAD_IMAGES
    collate = ImageCollator(train_transform(24), "image", "label")
    batch = collate(examples)
    assert batch["pixel_values"].shape == (GOOD_IMAGES, 3, 24, 24)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["skipped_images"].item() == BAD_IMAGES and batch["skipped_images"].dtype == torch.long
    names = [Path(e["image"]["path"]).name for e in examples]
    bad_names = ("truncated.jpg", "garbage.png")
    good_labels = [e["label"] for e, n in zip(examples, names, strict=True) if n not in bad_names]
    assert batch["labels"].tolist() == good_labels


def test_every_mode_becomes_a_three_channel_crop_of_the_right_colour(image_folder: Path) -> None:
    expected = {
        "rgb.jpg": (200, 10, 10),
        "gray.png": (90, 90, 90),
        "rgba.png": (255, 255, 255),
        "cmyk.jpg": (255, 0, 255),
        "deep.png": (60, 60, 60),
        "tiny.png": (10, 200, 10),
        "palette.png": (255, 255, 255),
    }
    collate = ImageCollator(eval_transform(20, ZERO, ONE))
    for name, colour in expected.items():
        (path,) = image_folder.glob(f"*/{name}")
        batch = collate([{"image": {"bytes": None, "path": str(path)}}])
        pixels = batch["pixel_values"]
        assert pixels.shape == (1, 3, 20, 20), name
        # Constant images stay constant through resizing; JPEG may move a value by a few levels.
        np.testing.assert_allclose(pixels.mean(dim=(0, 2, 3)).numpy() * 255, colour, atol=3, err_msg=name)
        assert "labels" not in batch


def test_parquet_and_count_from_metadata(parquet_shards: Path, tmp_path: Path) -> None:
    pattern = str(parquet_shards / "even" / "*.parquet")
    args = DataArguments(data_files=[pattern], cache_dir=str(tmp_path))
    ds = load_split(args, "train")
    assert len(ds) == 20 and sorted(ids_of(ds)) == list(range(20))
    streamed = load_split(args, "train", streaming=True)
    assert streamed.num_shards == 4
    assert count_examples(args, "train") == 20
    capped = DataArguments(data_files=[pattern], max_train_samples=7, streaming=True)
    assert len(ids_of(load_split(capped, "train"))) == 7
    assert count_examples(capped, "train") == 7
    assert count_examples(DataArguments(data_files=[pattern], num_train_examples=13), "train") == 13


def test_webdataset_shards_get_default_column_names(tmp_path: Path) -> None:
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as archive:
        for i in range(3):
            for ext, data in (("jpg", encode(Image.new("RGB", (9, 9), (i, i, i)), "JPEG")), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    args = DataArguments(data_files=[str(tmp_path / "*.tar")], streaming=True)
    ds = load_split(args, "train")
    assert {"image", "label"} <= set(column_names(ds))
    assert count_examples(args, "train") == 3
    batch = ImageCollator(eval_transform(8), "image", "label")(list(ds))
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["labels"].tolist() == [0, 1, 2]


def test_load_errors_are_clear(parquet_shards: Path, tmp_path: Path) -> None:
    Dataset.from_dict({"img": [b"x"], "target": [1]}).to_parquet(str(tmp_path / "wrong.parquet"))
    with pytest.raises(ValueError, match=r"no image column 'image'; its columns are \['img', 'target'\]"):
        load_split(DataArguments(data_files=[str(tmp_path / "wrong.parquet")], streaming=True), "train")
    Dataset.from_dict({"image": [], "label": []}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="empty"):
        load_split(DataArguments(data_files=[str(tmp_path / "empty.parquet")], streaming=True), "train")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_split(DataArguments(data_files=[str(tmp_path / "none" / "*.parquet")]), "train")
    with pytest.raises(ValueError, match="No training data"):
        load_split(DataArguments(), "train")
    with pytest.raises(ValueError, match="No evaluation data"):
        load_split(DataArguments(data_files=[str(tmp_path / "wrong.parquet")]), "eval")
    with pytest.raises(ValueError, match="split must be"):
        load_split(DataArguments(), "validation")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Limits (seeded random subsets) and Hub split names
# ----------------------------------------------------------------------------------------------


def paths_of(ds) -> list[str]:
    return [example["image"]["path"] for example in ds]


def test_limits_of_a_class_sorted_folder_are_seeded_subsets_of_every_class(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "sorted", per_class=10, classes=4, size=8)
    whole = DataArguments(train_dir=str(folder), eval_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    # An image folder loads class-sorted: its first 12 examples hold 2 of the 4 classes.
    assert load_split(whole, "train")["label"][:12] == [0] * 10 + [1] * 2
    args = replace(whole, max_train_samples=12, max_eval_samples=9)
    subset = load_split(args, "train", seed=0)
    assert len(subset) == 12 == count_examples(args, "train", subset) == count_examples(args, "train")
    assert set(subset["label"]) == {0, 1, 2, 3}
    assert paths_of(subset) == paths_of(load_split(args, "train", seed=0))
    assert set(paths_of(subset)) != set(paths_of(load_split(args, "train", seed=1)))
    evaluation = load_split(args, "eval", seed=0)
    assert len(evaluation) == 9 and set(evaluation["label"]) == {0, 1, 2, 3}
    # A k-NN bank: the smaller of limit and max_train_samples, drawn the same way.
    loader, bank = eval_view_loader(args, "train", batch_size=5, limit=8, seed=0)
    labels = torch.cat([batch["labels"] for batch in loader]).tolist()
    assert len(bank) == 8 and len(labels) == 8 and set(labels) == {0, 1, 2, 3}
    assert len(eval_view_loader(args, "train", batch_size=5, limit=40)[1]) == 12
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_split(args, "train", limit=0)


def test_streamed_limit_is_a_seeded_shuffle_across_shards(parquet_shards: Path) -> None:
    args = DataArguments(data_files=[str(parquet_shards / "even" / "*.parquet")], streaming=True, max_train_samples=7)
    ids = ids_of(load_split(args, "train", seed=0))
    assert len(ids) == 7 == count_examples(args, "train")
    assert ids == ids_of(load_split(args, "train", seed=0))
    assert ids_of(load_split(args, "train", seed=1)) != ids
    # Not the stream's first 7 (shards 0 and 1): drawn from the shuffled shards through the buffer.
    assert ids != list(range(7)) and len({i // 5 for i in ids}) > 2
    assert len(ids_of(load_split(args, "train", limit=3, seed=0))) == 3


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory laid out as on the Hub, with the splits ImageNet-1k has: train and validation."""
    root = tmp_path_factory.mktemp("hub_layout")
    (root / "data").mkdir()
    image = encode(Image.new("RGB", (10, 10), (50, 60, 70)), "PNG")
    for split, count in (("train", 8), ("validation", 6)):
        ds = Dataset.from_dict({"image": [{"bytes": image, "path": None}] * count, "label": list(range(count))})
        ds.cast_column("image", ImageFeature()).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_missing_hub_split_fails_before_anything_is_prepared(hub_layout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = DataArguments(dataset_name=str(hub_layout), cache_dir=str(cache))  # eval_split defaults to "test"
    message = r"no split 'test' \(--eval_split 'test'\); its splits are \['train', 'validation'\]"
    with pytest.raises(ValueError, match=message):
        check_hub_split(args, "eval")
    with pytest.raises(ValueError, match=message):
        load_split(args, "eval")  # not streamed: load_dataset would prepare every split before failing
    assert not list(cache.rglob("*.arrow"))
    with pytest.raises(ValueError, match=r"no split 'training' \(--train_split 'training'\)"):
        load_split(replace(args, train_split="training"), "train", streaming=True)
    valid = replace(args, eval_split="validation")
    check_hub_split(replace(valid, eval_split="train[:50%]+validation"), "eval")
    assert len(load_split(valid, "eval")) == 6
    # Local folders and shards have no split names: nothing to check.
    check_hub_split(DataArguments(data_files=["x/*.parquet"], eval_split="none"), "eval")


# ----------------------------------------------------------------------------------------------
# Streaming per rank
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["even", "uneven"])
def test_ranks_get_disjoint_parts_covering_everything(parquet_shards: Path, layout: str) -> None:
    args = DataArguments(data_files=[str(parquet_shards / layout / "*.parquet")], streaming=True)
    ds = load_split(args, "train")
    total = count_examples(args, "train")
    parts = [ids_of(shard_stream(ds, rank=r, world_size=2, seed=7, buffer_size=4)) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(total))


def test_shuffle_is_reproducible_per_rank_and_changes_with_epoch(parquet_shards: Path) -> None:
    args = DataArguments(data_files=[str(parquet_shards / "even" / "*.parquet")], streaming=True)
    ds = load_split(args, "train")

    def order(rank: int, epoch: int, seed: int = 3) -> list[int]:
        stream = shard_stream(ds, rank=rank, world_size=2, seed=seed, buffer_size=8)
        stream.set_epoch(epoch)
        return ids_of(stream)

    for rank in range(2):
        assert order(rank, 0) == order(rank, 0)  # what another process with the same seed sees
    epoch0 = [order(r, 0) for r in range(2)]
    epoch1 = [order(r, 1) for r in range(2)]
    assert epoch0 != epoch1
    for parts in (epoch0, epoch1):  # still a partition after the reshuffle
        assert sorted(parts[0] + parts[1]) == list(range(20)) and not set(parts[0]) & set(parts[1])


def test_steps_per_epoch_numbers() -> None:
    assert steps_per_epoch(20, 2, 4) == 2
    assert steps_per_epoch(20, 2, 4, drop_last=False) == 3
    assert steps_per_epoch(1_281_167, 8, 256) == 625
    with pytest.raises(ValueError, match="do not fill one global batch"):
        steps_per_epoch(7, 2, 4)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        steps_per_epoch(7, 0, 4)


def test_equal_steps_on_every_rank_with_uneven_shards(parquet_shards: Path) -> None:
    # Shards of 7, 3 and 2 examples over 2 ranks: the ranks' streams differ in length.
    args = DataArguments(data_files=[str(parquet_shards / "uneven" / "*.parquet")], streaming=True)
    ds = load_split(args, "train")
    steps = steps_per_epoch(count_examples(args, "train"), world_size=2, per_device_batch=2, drop_last=False)
    assert steps == 3
    batches_per_rank = []
    for rank in range(2):
        stream = EqualStepsIterable(shard_stream(ds, rank=rank, world_size=2, seed=0, buffer_size=4), steps, 2)
        assert len(stream) == 6
        loader = torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=ImageCollator(eval_transform(4)))
        batches = list(loader)
        assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 2]
        batches_per_rank.append(len(batches))
    assert batches_per_rank == [3, 3]


def test_short_stream_is_cycled_and_long_stream_cut(parquet_shards: Path) -> None:
    args = DataArguments(data_files=[str(parquet_shards / "even" / "*.parquet")], streaming=True)
    ds = load_split(args, "train")
    rank0 = shard_stream(ds, rank=0, world_size=2, seed=0, shuffle=False)
    own = ids_of(rank0)
    assert len(own) == 10
    assert ids_of(EqualStepsIterable(rank0, steps=3, per_device_batch=4)) == own + own[:2]
    assert ids_of(EqualStepsIterable(rank0, steps=2, per_device_batch=3)) == own[:6]


def test_workers_share_the_steps_and_epoch_reaches_them(parquet_shards: Path) -> None:
    args = DataArguments(data_files=[str(parquet_shards / "even" / "*.parquet")], streaming=True)
    ds = load_split(args, "train")
    rank_stream = shard_stream(ds, rank=1, world_size=2, seed=5, buffer_size=4)
    stream = EqualStepsIterable(rank_stream, steps=3, per_device_batch=3)
    collate = ImageCollator(eval_transform(4), label_column="label")
    loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate)
    first = [b["labels"].tolist() for b in loader]
    assert [len(b) for b in first] == [3, 3, 3]
    stream.set_epoch(1)
    assert stream.dataset.epoch == 1
    second = [b["labels"].tolist() for b in loader]
    assert [len(b) for b in second] == [3, 3, 3] and second != first


def test_dataloader_workers_capped_by_shards(parquet_shards: Path, tmp_path: Path) -> None:
    args = DataArguments(
        data_files=[str(parquet_shards / "even" / "*.parquet")], streaming=True, cache_dir=str(tmp_path)
    )
    ds = load_split(args, "train")
    with pytest.warns(UserWarning, match="has 4 shard"):
        assert dataloader_workers(ds, 8) == 4
    rank_stream = shard_stream(ds, rank=0, world_size=2, seed=0)
    with pytest.warns(UserWarning, match="has 2 shard"):
        assert dataloader_workers(EqualStepsIterable(rank_stream, 1, 1), 16) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataloader_workers(ds, 3) == 3
        assert dataloader_workers(load_split(args, "train", streaming=False), 16) == 16


def test_per_rank_dataloader_is_not_resharded_by_accelerate(parquet_shards: Path) -> None:
    from accelerate import Accelerator
    from accelerate.data_loader import IterableDatasetShard, prepare_data_loader

    args = DataArguments(data_files=[str(parquet_shards / "even" / "*.parquet")], streaming=True)
    stream = EqualStepsIterable(shard_stream(load_split(args, "train"), rank=0, world_size=2, seed=0), 2, 5)
    collate = ImageCollator(eval_transform(4), label_column="label")
    loader = torch.utils.data.DataLoader(stream, batch_size=5, collate_fn=collate)
    # What plain preparation would do with 2 processes: cut this rank's stream again.
    naive = prepare_data_loader(loader, num_processes=2, process_index=0, dispatch_batches=False)
    assert isinstance(naive.dataset, IterableDatasetShard)
    accelerator = Accelerator(cpu=True)
    prepared = prepare_per_rank_dataloader(accelerator, loader)
    assert prepared.dataset is stream and prepared in accelerator._dataloaders
    labels = [b["labels"].tolist() for b in prepared]
    assert labels == [b["labels"].tolist() for b in loader] and sum(len(x) for x in labels) == 10
    prepared.set_epoch(4)  # what Trainer does at each epoch
    assert stream.dataset.epoch == 4


# ----------------------------------------------------------------------------------------------
# Transforms and statistics
# ----------------------------------------------------------------------------------------------


def test_image_stats_from_processor_and_fallback() -> None:
    from transformers import ViTImageProcessor

    assert image_stats(None) == (IMAGENET_MEAN, IMAGENET_STD)
    assert image_stats(object()) == (IMAGENET_MEAN, IMAGENET_STD)
    processor = ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    assert image_stats(processor) == ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert image_stats({"image_mean": 0.3, "image_std": [0.2]}) == ((0.3, 0.3, 0.3), (0.2, 0.2, 0.2))
    assert image_stats(ViTImageProcessor(do_normalize=False)) == (ZERO, ONE)
    with pytest.raises(ValueError, match="1 or 3 values"):
        image_stats({"image_mean": [0.1, 0.2], "image_std": [0.2]})
    with pytest.raises(ValueError, match="std must be a finite number > 0"):
        image_stats({"image_mean": [0.1], "image_std": [0.0]})


def test_normalisation_of_a_constant_image() -> None:
    image = Image.new("RGB", (50, 37), (30, 120, 240))
    expected = (np.array([30, 120, 240]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for transform in (train_transform(16), eval_transform(16)):
        out = transform(image)
        assert out.shape == (3, 16, 16)
        np.testing.assert_allclose(out.numpy(), np.broadcast_to(expected[:, None, None], (3, 16, 16)), atol=1e-5)


def test_eval_transform_sizes_and_centre_crop() -> None:
    assert eval_transform(224).transforms[1].size == [256]
    assert eval_transform(32).transforms[1].size == [37]  # round(32 * 256 / 224)
    for size in ((500, 375), (8, 8), (300, 1000)):
        assert eval_transform(32)(Image.new("L", size)).shape == (3, 32, 32)
    # 256 px at size 224: no resize, then the central 224 px, i.e. x and y 16..239.
    out = eval_transform(224, ZERO, ONE)(coordinate_image(256)) * 255
    assert out[0, 0, 0].item() == pytest.approx(16, abs=0.01) and out[0, 0, -1].item() == pytest.approx(239, abs=0.01)
    assert out[1, 0, 0].item() == pytest.approx(16, abs=0.01) and out[1, -1, 0].item() == pytest.approx(239, abs=0.01)


def measure_crops(views: torch.Tensor, side: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area fraction, aspect ratio (width / height) and flip of each view [N, 3, S, S] of ``coordinate_image(side)``
    (taken with mean 0, std 1): R encodes x and G encodes y, so a view's colours tell which box it shows."""
    out_size = views.shape[-1]
    red, green = views[:, 0, out_size // 2] * 255, views[:, 1, :, out_size // 2] * 255
    # Output pixel centres span (out-1)/out of the crop, so scale the measured span up.
    width = (red[:, -1] - red[:, 0]).abs() * out_size / (out_size - 1)
    height = (green[:, -1] - green[:, 0]) * out_size / (out_size - 1)
    return (width * height / side**2).numpy(), (width / height).numpy(), (red[:, -1] < red[:, 0]).numpy()


def reference_crops(n: int = 4000, side: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Area fractions and aspect ratios of ``n`` boxes drawn by torchvision's RandomResizedCrop(scale 0.2-1)."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(123)
    boxes = np.array(
        [v2.RandomResizedCrop.get_params(torch.empty(1, side, side), [0.2, 1.0], [3 / 4, 4 / 3])[2:] for _ in range(n)]
    )
    torch.set_rng_state(generator_state)
    return boxes[:, 0] * boxes[:, 1] / side**2, boxes[:, 1] / boxes[:, 0]


def test_train_crop_area_and_flip_statistics() -> None:
    """Measure each crop from a coordinate image: its area fraction must follow RandomResizedCrop(0.2, 1)."""
    torch.manual_seed(0)
    n = 300
    transform = train_transform(32, ZERO, ONE)
    image = coordinate_image(256)
    fractions, _, flips = measure_crops(torch.stack([transform(image) for _ in range(n)]))
    assert fractions.min() > 0.2 * 0.9 and fractions.max() < 1.0 * 1.05
    # The same draw through torchvision's sampler gives the expected mean area.
    assert abs(fractions.mean() - reference_crops()[0].mean()) < 0.04
    assert (fractions < 0.3).any() and (fractions > 0.9).any()
    assert 0.4 * n < flips.sum() < 0.6 * n


def test_tiny_image_is_upsampled_to_the_crop() -> None:
    out = train_transform(48)(Image.new("RGB", (8, 8), (10, 20, 30)))
    assert out.shape == (3, 48, 48)


# ----------------------------------------------------------------------------------------------
# Collator edge cases
# ----------------------------------------------------------------------------------------------


def test_collator_whole_batch_failing_and_fill_option() -> None:
    bad = {"image": {"bytes": b"junk", "path": None}, "label": 1}
    good = {"image": {"bytes": encode(Image.new("RGB", (9, 9)), "PNG"), "path": None}, "label": 4}
    collate = ImageCollator(train_transform(16), "image", "label")
    empty = collate([bad, bad, bad])
    assert empty["pixel_values"].shape == (0, 3, 16, 16) and empty["labels"].shape == (0,)
    assert empty["skipped_images"].item() == 3
    filled = ImageCollator(train_transform(16), "image", "label", fill_skipped=True)([good, bad, bad])
    assert filled["pixel_values"].shape == (3, 3, 16, 16) and filled["labels"].tolist() == [4, 4, 4]
    assert filled["skipped_images"].item() == 2
    with pytest.raises(KeyError, match=r"no image column 'image'; its columns are \['jpg'\]"):
        collate([{"jpg": b""}])
    with pytest.raises(KeyError, match="no label column"):
        collate([{"image": good["image"]}])


def test_a_folder_without_images_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "class0").mkdir(parents=True)
    (empty / "class0" / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=r"--train_dir '.*empty' holds no image files"):
        load_split(DataArguments(train_dir=str(empty)), "train")
    images = write_image_folder(tmp_path / "images", per_class=1)
    with pytest.raises(ValueError, match=r"--eval_dir '.*empty' holds no image files"):
        load_split(DataArguments(train_dir=str(images), eval_dir=str(empty)), "eval")
    assert len(load_split(DataArguments(train_dir=str(images)), "train")) == 3


# ----------------------------------------------------------------------------------------------
# Reproducible views: a function of (seed, epoch, example); unreadable examples counted once
# ----------------------------------------------------------------------------------------------


def keyed(examples: list[dict], seed: int = 0, epoch: int = 0) -> list[dict]:
    """The examples as the trainer hands them to the collator: each with its key (here, its position)."""
    return [{**example, EXAMPLE_KEY: ExampleKey(seed, epoch, index)} for index, example in enumerate(examples)]


def coordinate_examples(n: int) -> list[dict]:
    return [{"image": {"bytes": encode(coordinate_image(64), "PNG"), "path": None}}] * n


def test_a_keyed_view_is_a_function_of_seed_epoch_and_example_alone() -> None:
    collate = ImageCollator(train_transform(16, ZERO, ONE))
    examples = keyed(coordinate_examples(6), seed=0, epoch=3)
    torch.manual_seed(0)
    views = collate(examples)["pixel_values"]
    torch.manual_seed(1)  # another random state, another order, other batches: the same views
    state = torch.get_rng_state()
    assert torch.equal(collate(examples[::-1])["pixel_values"].flip(0), views)
    assert torch.equal(torch.cat([collate([example])["pixel_values"] for example in examples]), views)
    assert torch.equal(torch.get_rng_state(), state)  # drawn from a forked generator: the process's is untouched
    # One image at 6 indices: 6 views; another epoch or seed gives each index another view.
    assert len({view.numpy().tobytes() for view in views}) == 6
    for other in (keyed(coordinate_examples(6), seed=0, epoch=4), keyed(coordinate_examples(6), seed=1, epoch=3)):
        assert not any(torch.equal(a, b) for a, b in zip(collate(other)["pixel_values"], views, strict=True))
    # Without keys, views come from the global random state as before.
    torch.manual_seed(0)
    plain = collate(coordinate_examples(2))["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(collate(coordinate_examples(2))["pixel_values"], plain)


def test_keyed_views_follow_random_resized_crop() -> None:
    """The views drawn from per-example seeds keep torchvision's RandomResizedCrop(scale 0.2-1) distribution."""
    n = 600
    examples = keyed([{"image": coordinate_image(256)}] * n, seed=7, epoch=2)
    fractions, aspects, flips = measure_crops(ImageCollator(train_transform(32, ZERO, ONE))(examples)["pixel_values"])
    areas, ratios = reference_crops()

    # Quantiles of the area fraction and the log aspect ratio: their sampling error at 600 draws is about
    # 0.015 (4 standard errors: 0.06); measuring a box from its resampled colours adds about 0.01.
    levels = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert np.abs(np.quantile(fractions, levels) - np.quantile(areas, levels)).max() < 0.06
    assert np.abs(np.quantile(np.log(aspects), levels) - np.quantile(np.log(ratios), levels)).max() < 0.06
    assert abs(fractions.mean() - areas.mean()) < 0.02
    assert 0.43 * n < flips.sum() < 0.57 * n


def collect_views(loader: torch.utils.data.DataLoader) -> list[dict[str, torch.Tensor]]:
    return [{"labels": batch["labels"], "pixel_values": batch["pixel_values"]} for batch in loader]


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for one, other in zip(a, b, strict=True):
        assert torch.equal(one["labels"], other["labels"]) and torch.equal(one["pixel_values"], other["pixel_values"])


def test_map_style_order_and_views_are_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=5, classes=2, size=24)
    dataset = load_split(DataArguments(train_dir=str(folder), cache_dir=str(tmp_path / "cache")), "train")
    collate = ImageCollator(train_transform(16), label_column="label")

    def loader(workers: int) -> torch.utils.data.DataLoader:
        examples = KeyedExamples(dataset, seed=3)
        return torch.utils.data.DataLoader(
            examples,
            batch_size=3,
            sampler=EpochShuffle(examples),
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    order = EpochShuffle(KeyedExamples(dataset, seed=3))
    order.set_epoch(1)
    pairs = list(order)
    assert [epoch for epoch, _ in pairs] == [1] * 10 and sorted(index for _, index in pairs) == list(range(10))
    epochs = {}
    for workers in (0, 2):
        persistent = loader(workers)
        runs = []
        for epoch in (0, 1):
            # Accelerate's loaders set the epoch on the sampler or on the dataset; either reaches both.
            (persistent.sampler if epoch else persistent.dataset).set_epoch(epoch)
            runs.append(collect_views(persistent))
        epochs[workers] = runs
    for epoch in (0, 1):
        assert_same_batches(epochs[0][epoch], epochs[2][epoch])
    labels = [torch.cat([batch["labels"] for batch in run]) for run in epochs[0]]
    assert not torch.equal(*labels)  # each epoch has its own order
    assert not torch.equal(epochs[0][0][0]["pixel_values"], epochs[0][1][0]["pixel_values"])


@pytest.fixture(scope="module")
def distinct_parquet_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two shards of 6 different images each; the label is the image's number."""
    root = tmp_path_factory.mktemp("distinct")
    rng = np.random.default_rng(3)
    for shard in range(2):
        ids = list(range(6 * shard, 6 * shard + 6))
        images = [
            {"bytes": encode(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)), "PNG"), "path": None}
            for _ in ids
        ]
        ds = Dataset.from_dict({"image": images, "label": ids})
        ds.cast_column("image", ImageFeature()).to_parquet(str(root / f"part-{shard}.parquet"))
    return str(root / "*.parquet")


def test_a_streamed_example_keeps_its_view_with_any_number_of_workers(distinct_parquet_shards: str) -> None:
    stream = load_split(DataArguments(data_files=[distinct_parquet_shards], streaming=True), "train")
    collate = ImageCollator(train_transform(16), label_column="label")

    def views_by_label(workers: int, epochs: int) -> list[dict[int, torch.Tensor]]:
        keyed_stream = EqualStepsIterable(shard_stream(stream, rank=0, world_size=1, seed=1), 4, 3).with_example_keys(9)
        loader = torch.utils.data.DataLoader(
            keyed_stream, batch_size=3, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0
        )
        runs = []
        for epoch in range(epochs):
            keyed_stream.set_epoch(epoch)  # persistent workers read it from shared memory
            batches = list(loader)
            labels = torch.cat([batch["labels"] for batch in batches]).tolist()
            runs.append(dict(zip(labels, torch.cat([batch["pixel_values"] for batch in batches]), strict=True)))
        return runs

    one, two = views_by_label(0, 2), views_by_label(2, 2)
    for epoch in (0, 1):
        assert sorted(one[epoch]) == sorted(two[epoch]) == list(range(12))
        for label, view in one[epoch].items():
            assert torch.equal(two[epoch][label], view), (epoch, label)
    assert not any(torch.equal(one[0][label], one[1][label]) for label in range(12))


def test_fill_in_views_are_reproducible() -> None:
    good = {"image": {"bytes": encode(coordinate_image(40), "PNG"), "path": None}}
    bad = {"image": {"bytes": b"junk", "path": None}}
    collate = ImageCollator(train_transform(16), fill_skipped=True)
    examples = keyed([good, bad, bad], epoch=1)
    torch.manual_seed(0)
    first = collate(examples)
    torch.manual_seed(1)
    assert torch.equal(collate(examples)["pixel_values"], first["pixel_values"])
    views = first["pixel_values"]
    assert views.shape == (3, 3, 16, 16) and first["skipped_images"].item() == 2
    # Each fill-in is drawn with its failed example's seed: other views of the one decoded image.
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    assert first[UNREADABLE_IDS] == [1, 2]
    assert UNREADABLE_IDS not in collate([good, bad])  # examples without keys cannot be told apart


def test_each_unreadable_example_is_counted_once() -> None:
    unreadable = {"image": {"bytes": b"junk", "path": None}}
    readable = {"image": {"bytes": encode(Image.new("RGB", (9, 9)), "PNG"), "path": None}}
    collate = ImageCollator(eval_transform(8))
    dataset = [unreadable, readable, unreadable, readable]  # unreadable examples 0 and 2

    def epoch(number: int, order: list[int]) -> list[dict]:
        return [{**dataset[i], EXAMPLE_KEY: ExampleKey(0, number, i)} for i in order]

    batches = [collate(epoch(0, [0, 1])), collate(epoch(0, [2, 3])), collate(epoch(1, [2, 0])), collate(epoch(1, [1]))]
    assert [batch[UNREADABLE_IDS] for batch in batches] == [[0], [2], [2, 0], []]
    assert [batch["skipped_images"].item() for batch in batches] == [1, 1, 2, 0]  # per read, in the batch
    loader = DistinctUnreadableLoader(batches[:2])
    assert [batch["skipped_images"].item() for batch in loader] == [1, 1]
    resumed = DistinctUnreadableLoader(batches[2:], loader.tally)  # the count goes on
    counted = list(resumed)
    assert [batch["skipped_images"].item() for batch in counted] == [0, 0]
    assert all(UNREADABLE_IDS not in batch for batch in counted)
    assert len(resumed) == 2
    # A streamed example is known by its image: the same bytes, the same identity, in any epoch.
    streamed = [{**unreadable, EXAMPLE_KEY: ExampleKey(0, number)} for number in (0, 1)]
    ids = [collate([example])[UNREADABLE_IDS] for example in streamed]
    assert ids[0] == ids[1] and len(ids[0]) == 1
