"""Fashion-MNIST preparation: the IDX reader against hand-written files, and the parquet layout on real data."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from attndistill_hf.demo import fashion_mnist
from attndistill_hf.demo.fashion_mnist import (
    CLASS_NAMES,
    DEBIAN_FASHION_MNIST_DIR,
    HUB_DATASET_ID,
    balanced_subset_indices,
    prepare_fashion_mnist,
    read_fashion_mnist_split,
    read_idx,
)

from helpers import load_recipe, needs_real, skip_without_real


def write_idx(path: Path, array: np.ndarray, type_code: int, *, compress: bool = True) -> Path:
    """An IDX file written from the format's description: 0, 0, type code, ndim, big-endian dims, data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# ---- read_idx ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "code"), [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, dtype: type, code: int, compress: bool) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    read = read_idx(write_idx(tmp_path / "x.idx", array, code, compress=compress))
    assert read.shape == (3, 4, 5)
    assert read.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_corrupt_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good.gz", np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)
    raw = gzip.decompress(good.read_bytes())

    truncated_gzip = tmp_path / "truncated.gz"
    truncated_gzip.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(truncated_gzip)

    bad_magic = tmp_path / "magic.gz"
    bad_magic.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad_magic)

    bad_type = tmp_path / "type.gz"
    bad_type.write_bytes(gzip.compress(raw[:2] + b"\x42" + raw[3:]))
    with pytest.raises(ValueError, match="type code"):
        read_idx(bad_type)

    short_payload = tmp_path / "short.gz"
    short_payload.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(short_payload)

    long_payload = tmp_path / "long.gz"
    long_payload.write_bytes(gzip.compress(raw + b"\x00"))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(long_payload)

    cut_header = tmp_path / "header.gz"
    cut_header.write_bytes(gzip.compress(raw[:9]))
    with pytest.raises(ValueError, match="header"):
        read_idx(cut_header)

    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing.gz")


@needs_real
def test_real_idx_files() -> None:
    images, labels = read_fashion_mnist_split(DEBIAN_FASHION_MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    # Background is black and garments are bright: real images, not noise or a constant.
    assert images[:, 0, 0].mean() < 5 and images.mean() > 40
    with pytest.raises(ValueError, match="split"):
        read_fashion_mnist_split(DEBIAN_FASHION_MNIST_DIR, "validation")


def test_read_split_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        read_fashion_mnist_split(tmp_path, "train")


def test_balanced_subset_indices() -> None:
    labels = np.repeat(np.arange(4), [50, 50, 50, 3])  # class 3 is too small for its share
    keep = balanced_subset_indices(labels, 42, seed=1)
    assert len(keep) == 42 and len(set(keep.tolist())) == 42
    assert np.all(np.diff(keep) > 0)
    counts = np.bincount(labels[keep], minlength=4)
    assert counts[3] == 3  # all it has
    assert counts[:3].max() - counts[:3].min() <= 1  # the shortfall spread evenly over the others
    np.testing.assert_array_equal(keep, balanced_subset_indices(labels, 42, seed=1))
    assert not np.array_equal(keep, balanced_subset_indices(labels, 42, seed=2))
    np.testing.assert_array_equal(balanced_subset_indices(labels, 1000, seed=0), np.arange(len(labels)))


# ---- prepare_fashion_mnist ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    skip_without_real()
    out = tmp_path_factory.mktemp("fmnist")
    return prepare_fashion_mnist(
        out, max_train=300, max_test=100, num_train_shards=3, num_test_shards=2, progress=False
    )


@needs_real
def test_prepare_writes_balanced_parquet_shards(prepared: dict) -> None:
    from datasets import ClassLabel, Image, load_dataset

    data_dir = Path(prepared["data_dir"])
    assert [Path(p).name for p in prepared["train"]] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [Path(p).name for p in prepared["test"]] == ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]
    info = json.loads(Path(prepared["info"]).read_text())
    assert info["num_examples"] == {"train": 300, "test": 100}

    dataset = load_dataset(str(data_dir))
    assert dataset["train"].num_rows == 300 and dataset["test"].num_rows == 100
    features = dataset["train"].features
    assert isinstance(features["image"], Image)
    assert isinstance(features["label"], ClassLabel) and features["label"].names == list(CLASS_NAMES)
    np.testing.assert_array_equal(np.bincount(dataset["train"]["label"]), [30] * 10)
    np.testing.assert_array_equal(np.bincount(dataset["test"]["label"]), [10] * 10)

    # Rows are the seeded balanced subset of the source, in source order, pixel for pixel.
    images, labels = read_fashion_mnist_split(DEBIAN_FASHION_MNIST_DIR, "train")
    keep = balanced_subset_indices(labels, 300, seed=0)
    for row in (0, 157, 299):
        item = dataset["train"][row]
        assert item["image"].mode == "L" and item["image"].size == (28, 28)
        np.testing.assert_array_equal(np.asarray(item["image"]), images[keep[row]])
        assert item["label"] == labels[keep[row]]


@needs_real
def test_prepare_is_idempotent_and_rewrites_on_change(prepared: dict, tmp_path: Path) -> None:
    out = tmp_path / "fm"
    kwargs = {"max_train": 40, "max_test": 20, "num_train_shards": 4, "num_test_shards": 1, "progress": False}
    first = prepare_fashion_mnist(out, **kwargs)
    stamps = {p: Path(p).stat().st_mtime_ns for p in first["train"] + first["test"]}
    again = prepare_fashion_mnist(out, **kwargs)
    assert again == first
    assert {p: Path(p).stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten

    changed = prepare_fashion_mnist(out, **{**kwargs, "num_train_shards": 2, "image_size": 32})
    assert sorted(p.name for p in out.glob("train-*.parquet")) == [Path(p).name for p in changed["train"]]
    from datasets import load_dataset

    dataset = load_dataset(str(out), split="train")
    assert dataset.num_rows == 40 and dataset[0]["image"].size == (32, 32)

    # A missing shard means "not prepared": the next call writes it again.
    Path(changed["test"][0]).unlink()
    prepare_fashion_mnist(out, **{**kwargs, "num_train_shards": 2, "image_size": 32})
    assert Path(changed["test"][0]).is_file()


def test_prepare_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_train"):
        prepare_fashion_mnist(tmp_path, max_train=0)
    with pytest.raises(ValueError, match="num_test_shards"):
        prepare_fashion_mnist(tmp_path, num_test_shards=0)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "nowhere", progress=False)


def test_prepare_from_hub_writes_the_same_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub path (unreachable here) is exercised with a stand-in for load_dataset."""
    import datasets
    from PIL import Image as PILImage

    calls = []
    rng = np.random.default_rng(0)

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        count = 50 if split == "train" else 20
        pixels = rng.integers(0, 255, size=(count, 28, 28), dtype=np.uint8)
        return datasets.Dataset.from_dict(
            {"image": [PILImage.fromarray(p) for p in pixels], "label": [i % 10 for i in range(count)]},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
            ),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = prepare_fashion_mnist(
        tmp_path, hub=True, max_train=20, num_train_shards=2, num_test_shards=1, progress=False
    )
    assert calls == [(HUB_DATASET_ID, "train"), (HUB_DATASET_ID, "test")]
    info = json.loads(Path(result["info"]).read_text())
    assert info["source"] == HUB_DATASET_ID and info["num_examples"] == {"train": 20, "test": 20}
    monkeypatch.undo()
    loaded = datasets.load_dataset(str(tmp_path), split="train")
    np.testing.assert_array_equal(np.bincount(loaded["label"]), [2] * 10)


# ---- CLI -------------------------------------------------------------------------------------------


def test_prepare_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe("prepare_fashion_mnist")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--output_dir",
        "--source_dir",
        "--hub",
        "--max_train",
        "--max_test",
        "--num_train_shards",
        "--num_test_shards",
        "--image_size",
        "--seed",
        "--overwrite",
    ):
        assert flag in text
    # Every flag has a help text (argparse prints the flag, then its description).
    assert text.count("(default") >= 8


def test_prepare_cli_flags_reach_the_preparation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def record(output_dir: str, **kwargs: Any) -> dict[str, Any]:
        calls.append({"output_dir": output_dir, **kwargs})
        return {"data_dir": output_dir, "train": [], "test": []}

    # The library's function is replaced before the recipe is loaded, so the recipe imports the stand-in.
    monkeypatch.setattr(fashion_mnist, "prepare_fashion_mnist", record)
    recipe = load_recipe("prepare_fashion_mnist")
    # The documented spellings: bare switches, and --no_progress for the progress bars.
    recipe.main(["--output_dir", str(tmp_path), "--hub", "--overwrite", "--no_progress", "--max_train", "20"])
    recipe.main(["--output_dir", str(tmp_path), "--hub", "false", "--image_size", "32"])
    assert calls[0]["hub"] is calls[0]["overwrite"] is True and calls[0]["progress"] is False
    assert calls[0]["max_train"] == 20 and calls[0]["max_test"] is None
    assert calls[1]["hub"] is calls[1]["overwrite"] is False and calls[1]["progress"] is True
    assert calls[1]["image_size"] == 32 and calls[1]["source_dir"] == DEBIAN_FASHION_MNIST_DIR
    with pytest.raises(ValueError, match="required: --output_dir"):
        recipe.main(["--hub"])


@pytest.mark.slow
@needs_real
def test_prepare_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe("prepare_fashion_mnist")
    result = recipe.main(
        [
            "--output_dir",
            str(tmp_path),
            "--max_train",
            "20",
            "--max_test",
            "10",
            "--num_train_shards",
            "2",
            "--num_test_shards",
            "1",
            "--no_progress",
        ]
    )
    assert len(result["train"]) == 2 and all(Path(p).is_file() for p in result["train"] + result["test"])
    assert str(tmp_path) in capsys.readouterr().out
