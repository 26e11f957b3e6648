"""The teacher-target cache, writing and reading: recipes/cache_teacher.py (cache_writer) and target_cache.

A cache holds K recorded views of every readable image, each with the teacher's CLS target and CLS-attention
rows: the recorded views are the seeded training views to the bit, the stored targets are the live
teacher's on them (within the storage dtype's rounding), an interrupted cache completes to exactly an
uninterrupted one, two processes write the rows of one, a stream is cached by image digests that its
training data finds, and a cache that does not fit (incomplete, damaged, other images) is refused.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import datasets
import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from test_modern_teachers import dinov3_teacher
from transformers import ViTImageProcessor, ViTModel

from attndistill_hf import cache_writer, hub
from attndistill_hf.cache_writer import PENDING_FILE, cache_teacher_targets, teacher_cache_info
from attndistill_hf.cli import run_recipe
from attndistill_hf.data import DataArguments, load_split
from attndistill_hf.data.decoding import decode_image
from attndistill_hf.data.transforms import (
    EXAMPLE_KEY,
    ExampleKey,
    TrainView,
    apply_train_view,
    draw_train_view,
    example_id,
    seeded_view,
    train_transform,
)
from attndistill_hf.pipeline import build_train_dataset
from attndistill_hf.target_cache import (
    INFO_FILE,
    PUBLISHED_AUGMENTATION,
    CachedViewCollator,
    CacheInfo,
    CacheMismatchError,
    TargetCache,
    chosen_view,
    image_identity,
    stored_view_seed,
)
from attndistill_hf.teacher import teacher_targets

from helpers import encode, load_recipe, run_two_processes, tiny_run_config, tiny_teacher

RECIPE = load_recipe("cache_teacher")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViTImageProcessor's, which the saved teachers ship
VIEWS = 3
# A view's targets from forwards of other batches (a live teacher, another process) may differ in the last bits.
BATCHES = 1e-5
SHARDS = [f"train-00000-0000{serial}.parquet" for serial in range(3)]  # of one process: 6 images, 2 a shard
UNREADABLE = b"\x89PNG\r\n\x1a\n-not-an-image"
# Width x height and PIL mode of the folder's images: smaller and larger than the 32 px crop, every kind of mode.
IMAGES = [((40, 40), "RGB"), ((20, 28), "RGB"), ((57, 33), "L"), ((36, 61), "RGBA"), ((31, 45), "P"), ((48, 24), "RGB")]


@pytest.fixture(scope="module", autouse=True)
def own_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The arrow copies ``datasets`` makes of the caches' shards stay in this module's folder."""
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf-datasets"))
    yield
    datasets.config.HF_DATASETS_CACHE = saved


@pytest.fixture(autouse=True)
def no_arrow_shutdown_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Large query and key weights: peaked attention maps, so that a wrong row or key order shows."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("query.weight", "key.weight", "q_proj.weight", "k_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def sharp_teacher(path: Path | None = None) -> ViTModel:
    """The tiny ViT teacher (patch 8: a 4 x 4 grid at 32 px) with peaked attention; saved when ``path`` is given."""
    model = sharpen(tiny_teacher(patch=8))
    if path is not None:
        model.save_pretrained(path)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return model


def image_of(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([np.asarray(image), alpha]), "RGBA")
    return image.convert(mode)


def write_folder(root: Path, corrupt: bool = True) -> Path:
    """The images of ``IMAGES`` as PNGs in two class folders, and an undecodable file."""
    for number, (size, mode) in enumerate(IMAGES):
        folder = root / f"class{number % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image_of(size, mode, number).save(folder / f"{number}.png")
    if corrupt:
        (root / "class0" / "corrupt.png").write_bytes(UNREADABLE)
    return root


def write_stream(root: Path) -> Path:
    """The folder's images, one of them twice (identical bytes), and an undecodable one, as 2 parquet shards."""
    encoded = [encode(image_of(size, mode, number), "PNG") for number, (size, mode) in enumerate(IMAGES)]
    encoded += [encoded[2], UNREADABLE]
    root.mkdir(parents=True)
    for shard in range(2):
        rows = [{"bytes": data, "path": None} for data in encoded[shard::2]]
        table = datasets.Dataset.from_dict({"image": rows, "label": [shard] * len(rows)})
        table.cast_column("image", datasets.Image()).to_parquet(str(root / f"part-{shard}.parquet"))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    sharp_teacher(root / "teacher")
    return {"root": root, "teacher": root / "teacher", "images": write_folder(root / "images")}


def cache_argv(world: dict[str, Path], out: Path, *flags: str) -> list[str]:
    """``recipes/cache_teacher.py`` over the folder of ``world`` into ``out``: K = 3 views, 2 images a forward and
    2 a shard (3 shards and an unreadable file), float32 targets unless ``flags`` say otherwise."""
    argv = ["--teacher_name_or_path", str(world["teacher"]), "--train_dir", str(world["images"])]
    argv += ["--image_size", "32", "--cache_dir", str(world["root"] / "prepared"), "--output_dir", str(out)]
    argv += ["--views_per_image", str(VIEWS), "--batch_size", str(2 * VIEWS), "--shard_images", "2"]
    argv += ["--num_workers", "0", "--cache_dtype", "float32"]
    return argv + list(flags)


def cache_exit_status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, list[str]]:
    """``python recipes/cache_teacher.py ARGV`` in this process: its exit status and its error lines."""
    try:
        run_recipe(lambda: RECIPE.main(argv))
        status: int | str | None = 0
    except SystemExit as stopped:
        status = stopped.code
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def folder_cache(world: dict[str, Path]) -> Path:
    """The folder's cache as the recipe writes it (float32 targets); tests that change it change a copy."""
    out = world["root"] / "cache-folder"
    RECIPE.main(cache_argv(world, out))
    return out


def stored_rows(folder: Path, twice: int = 0) -> dict[tuple[int, int], dict[str, Any]]:
    """Every row of the cache in ``folder`` by (example, view), as datasets reads the shards; ``twice``: how many
    (example, view) may be stored twice (an image a stream holds twice), with the same view."""
    files = sorted(str(path) for path in (folder / "data").glob("*.parquet"))
    table = datasets.load_dataset("parquet", data_files=files, split="train").with_format("numpy")
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for row in table:
        key = (int(row["example"]), int(row["view"]))
        if key in rows:
            twice -= 1
            assert twice >= 0, f"view {key[1]} of example {key[0]} is stored twice"
            for column in ("image", "crop", "flip"):
                assert np.array_equal(rows[key][column], row[column]), (key, column)
        rows[key] = row
    assert twice == 0
    return rows


def assert_same_rows(got: Path, expected: Path, atol: float = 0.0) -> None:
    """The two caches hold the same (example, view, image, crop, flip) rows, with targets within ``atol``."""
    mine, theirs = stored_rows(got), stored_rows(expected)
    assert sorted(mine) == sorted(theirs)
    for key, row in theirs.items():
        for column in ("image", "crop", "flip"):
            assert np.array_equal(mine[key][column], row[column]), (key, column)
        for column in ("cls", "attention"):
            np.testing.assert_allclose(mine[key][column], row[column], rtol=0, atol=atol, err_msg=str((key, column)))


def recorded_view(row: dict[str, Any]) -> TrainView:
    """The view a stored row records."""
    return TrainView(*(int(v) for v in row["crop"]), bool(row["flip"]))


def live_targets(teacher: torch.nn.Module, dataset: Any, rows: list[dict[str, Any]]) -> Any:
    """The live teacher's targets on the views the rows record, each made from its example's image."""
    pixels = []
    for row in rows:
        image = decode_image(dataset[int(row["example"])]["image"])
        pixels.append(apply_train_view(image, recorded_view(row), 32, MEAN, STD))
    return teacher_targets(teacher, torch.stack(pixels))


def tiny_info(teacher: torch.nn.Module, **settings: Any) -> CacheInfo:
    """The cache metadata of ``teacher`` on the tests' 32 px images: 2 float16 views, seed 0, unless ``settings``."""
    defaults = {
        "teacher_name": "tiny",
        "teacher_dtype": "float32",
        "image_size": 32,
        "views_per_image": 2,
        "seed": 0,
        "storage_dtype": "float16",
        "mean": MEAN,
        "std": STD,
        "dataset": "images",
    }
    return teacher_cache_info(teacher, **(defaults | settings))


def folder_dataset(world: dict[str, Path]) -> Any:
    """The folder's images as the recipe reads them (prepared, encoded: the index is the example's identity)."""
    data_args = DataArguments(train_dir=str(world["images"]), image_size=32, cache_dir=str(world["root"] / "prepared"))
    return load_split(data_args, "train", seed=0)


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------


def test_a_recorded_view_is_the_seeded_training_view_to_the_bit() -> None:
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P", "I;16"]
    flips = set()
    for trial in range(40):
        width, height = (int(v) for v in rng.integers(6, 90, size=2))
        mode, size = modes[trial % len(modes)], int(rng.integers(8, 64))
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        else:
            image = image_of((width, height), mode, trial)
        data = encode(image, "PNG")
        opened = Image.open(io.BytesIO(data))
        assert opened.mode == mode  # the file keeps its mode: to_rgb converts it in both paths
        mean, std = tuple(rng.uniform(0.2, 0.6, 3)), tuple(rng.uniform(0.1, 0.4, 3))
        for source in (opened, decode_image(data)):
            for _ in range(3):
                seed = int(rng.integers(0, 2**63))
                view = draw_train_view(source, seed)
                flips.add(view.flip)
                expected = seeded_view(train_transform(size, mean, std), source, seed)
                assert torch.equal(apply_train_view(source, view, size, mean, std), expected), (mode, width, height)
                assert view == draw_train_view(source, seed)  # the same seed draws the same view
    assert flips == {True, False}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def test_the_cache_of_a_folder_holds_the_live_teachers_targets_on_k_views_of_every_readable_image(
    world: dict[str, Path], folder_cache: Path
) -> None:
    table = datasets.load_dataset(str(folder_cache), split="train")
    assert len(table) == len(IMAGES) * VIEWS
    assert table.column_names == ["example", "image", "view", "crop", "flip", "cls", "attention"]
    assert table.features["attention"] == datasets.Array2D((4, 17), "float32")

    info = CacheInfo.load(folder_cache)
    assert (info.teacher, info.teacher_class, info.teacher_dtype) == ("teacher", "ViTModel", "float32")
    assert (info.image_size, info.patch_grid, info.heads, info.hidden_size, info.keys) == (32, [4, 4], 4, 48, 17)
    assert (info.tokens_dropped, info.views_per_image, info.seed, info.storage_dtype) == (0, VIEWS, 0, "float32")
    assert (info.num_images, info.unreadable_images, info.dataset) == (len(IMAGES), 1, "images")
    assert info.augmentation == PUBLISHED_AUGMENTATION and (info.mean, info.std) == (list(MEAN), list(STD))
    assert sorted(path.name for path in folder_cache.iterdir()) == ["README.md", INFO_FILE, "data"]
    assert [path.name for path in sorted((folder_cache / "data").iterdir())] == SHARDS  # 6 images, 2 a shard

    dataset, cache = folder_dataset(world), TargetCache(folder_cache)
    by_key = stored_rows(folder_cache)
    for (example, view), row in by_key.items():  # the reader finds each (example, view) and reads it as stored
        found = cache.rows[cache.row(example, view)]
        assert (int(found["example"]), int(found["view"])) == (example, view)
        assert np.array_equal(found["crop"], row["crop"]) and np.array_equal(found["cls"], row["cls"])
    rows = list(by_key.values())
    live = live_targets(sharp_teacher(), dataset, rows)
    for position, row in enumerate(rows):
        example, view = int(row["example"]), int(row["view"])
        image = decode_image(dataset[example]["image"])
        assert image is not None and 0 <= view < VIEWS
        assert int(row["image"]) == image_identity(dataset[example], "image")
        # The recorded view is the one drawn from the cache's seed, the example and the view's number.
        assert draw_train_view(image, stored_view_seed(0, example, view)) == recorded_view(row)
        np.testing.assert_allclose(row["cls"], live.cls[position].numpy(), rtol=0, atol=BATCHES)
        np.testing.assert_allclose(row["attention"], live.attention[position].numpy(), rtol=0, atol=BATCHES)
    attention = np.stack([row["attention"] for row in rows])
    np.testing.assert_allclose(attention.sum(-1), 1, atol=1e-5)
    assert attention.max(-1).mean() > 0.3  # peaked maps (uniform would be 1/17): a wrong key order shows
    by_image: dict[int, list[TrainView]] = {}
    for row in rows:
        by_image.setdefault(int(row["example"]), []).append(recorded_view(row))
    unreadable = [i for i in range(len(dataset)) if decode_image(dataset[i]["image"]) is None]
    assert len(unreadable) == 1 and sorted(by_image) == sorted(set(range(len(dataset))) - set(unreadable))
    assert all(len(set(views)) == VIEWS for views in by_image.values())  # the K views of an image differ

    card = (folder_cache / "README.md").read_text()
    assert card.startswith("---\n") and f"# Teacher targets of `{info.teacher}`" in card
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert "teacher-targets" in metadata["tags"]
    assert f"{VIEWS} recorded training view(s) of each of {len(IMAGES)} images" in " ".join(card.split())


def test_a_cache_of_a_teacher_with_registers_drops_them_from_the_stored_rows(tmp_path: Path) -> None:
    teacher = dinov3_teacher()
    images = write_folder(tmp_path / "images", corrupt=False)
    dataset = load_split(DataArguments(train_dir=str(images), image_size=32, cache_dir=str(tmp_path)), "train")
    info = tiny_info(teacher, teacher_name="tiny-dinov3", seed=5, storage_dtype="float32")
    written = cache_teacher_targets(teacher, dataset, tmp_path / "cache", info, batch_size=4, progress=False)
    assert (written.tokens_dropped, written.heads, written.patch_grid, written.keys) == (4, 4, [4, 4], 17)
    assert written.num_images == len(IMAGES) and written.teacher_class == "DINOv3ViTModel"
    rows = list(stored_rows(tmp_path / "cache").values())
    assert len(rows) == 2 * len(IMAGES)
    live = live_targets(teacher, dataset, rows)
    assert live.attention.shape[-1] == 17
    for position, row in enumerate(rows):
        np.testing.assert_allclose(row["cls"], live.cls[position].numpy(), rtol=0, atol=BATCHES)
        np.testing.assert_allclose(row["attention"], live.attention[position].numpy(), rtol=0, atol=BATCHES)
    assert np.stack([row["attention"] for row in rows]).max(-1).mean() > 0.3


def test_float16_and_bfloat16_storage_round_the_float32_targets(world: dict[str, Path], tmp_path: Path) -> None:
    """A stored target is the live float32 one rounded to the storage dtype, nothing else. CLS targets: within
    half a unit in the last place (2^-11 of the value for float16, 2^-8 for bfloat16). Attention rows: bfloat16
    rounds the probabilities, float16 their logarithm (no small probability flushed to 0), and each row is
    renormalised when read; every probability keeps a relative precision, the smallest ones included."""
    teacher, dataset = sharp_teacher(), folder_dataset(world)
    read: dict[str, dict[str, torch.Tensor]] = {}
    for dtype in ("float32", "float16", "bfloat16"):
        info = tiny_info(teacher, storage_dtype=dtype)
        cache_teacher_targets(teacher, dataset, tmp_path / dtype, info, batch_size=4, progress=False)
        cache = TargetCache(tmp_path / dtype)
        examples = sorted(set(cache.sorted_examples.tolist()))
        assert len(examples) == len(IMAGES)
        rows = [cache.row(example, view) for example in examples for view in range(2)]
        read[dtype] = cache.read(rows)
    live = live_targets(teacher, dataset, [cache.rows[row] for row in rows])
    exact = read["float32"]
    for column in ("cls", "attention"):
        torch.testing.assert_close(exact[column], getattr(live, column), rtol=0, atol=BATCHES)
    errors = {}
    assert exact["attention"].min() < 6e-8  # probabilities that float16 itself would flush to 0
    for dtype, rounding, relative in (("float16", torch.float16, 2**-11), ("bfloat16", torch.bfloat16, 2**-8)):
        got, want = read[dtype]["cls"], exact["cls"]
        assert got.dtype == torch.float32
        assert torch.equal(got, want.to(rounding).float())  # exactly the rounding of the float32 target
        assert ((got - want).abs() <= want.abs() * relative + 2**-24).all()  # half an ulp, subnormals aside
        rows = exact["attention"].log() if dtype == "float16" else exact["attention"]
        rows = rows.to(rounding).float()
        rows = rows.exp() if dtype == "float16" else rows
        assert torch.equal(read[dtype]["attention"], rows / rows.sum(-1, keepdim=True))
        assert torch.allclose(read[dtype]["attention"].sum(-1), torch.ones(()), atol=1e-6)
        errors[dtype, "cls"] = (got - want).abs().max().item()
        errors[dtype, "attention"] = (
            ((read[dtype]["attention"] - exact["attention"]).abs() / exact["attention"]).max().item()
        )
    print("stored targets: cls max abs error, attention max relative error:", errors)
    # float16 logs of probabilities down to 1e-9 (|log| < 32, spacing 2^-6): e^(2^-7) - 1 < 0.8 %, plus the
    # renormalisation; bfloat16 probabilities: 2^-8 plus the renormalisation.
    assert errors["float16", "attention"] < 0.01 and errors["bfloat16", "attention"] < 0.01
    assert errors["float16", "cls"] < 2e-3 and errors["bfloat16", "cls"] < 2e-2


def test_a_cache_without_attention_holds_the_cls_targets_alone(world: dict[str, Path], tmp_path: Path) -> None:
    teacher, dataset = sharp_teacher(), folder_dataset(world)
    info = tiny_info(teacher, with_attention=False)
    cache_teacher_targets(teacher, dataset, tmp_path / "cache", info, batch_size=4, progress=False)
    cache = TargetCache(tmp_path / "cache")
    assert (cache.info.heads, cache.info.with_attention) == (None, False)
    assert "attention" not in cache.rows.column_names
    assert "no attention rows" in (tmp_path / "cache" / "README.md").read_text()
    examples = [{**dataset[i], EXAMPLE_KEY: ExampleKey(0, 0, i)} for i in range(len(dataset))]
    batch = CachedViewCollator(cache, "image")(examples)
    assert "teacher_attention" not in batch and batch["teacher_cls"].shape == (len(IMAGES), 48)
    rows = [cache.row(example, 1) for example in sorted(set(cache.sorted_examples.tolist()))]
    live = live_targets(teacher, dataset, [cache.rows[row] for row in rows])
    assert live.attention is not None and "attention" not in cache.read(rows)
    assert ((cache.read(rows)["cls"] - live.cls).abs() <= live.cls.abs() * 2**-11 + BATCHES).all()  # float16


def test_caches_in_folders_of_the_same_name_read_their_own_rows(world: dict[str, Path], tmp_path: Path) -> None:
    """datasets keys its arrow copy of a local dataset folder by the folder's name and its card's file patterns:
    a card with ``configs`` would make a second cache named alike read the first one's rows."""
    teacher, dataset = sharp_teacher(), folder_dataset(world)
    for views, where in ((1, "a"), (2, "b")):
        info = tiny_info(teacher, views_per_image=views)
        folder = tmp_path / where / "targets"
        cache_teacher_targets(teacher, dataset, folder, info, batch_size=4, progress=False)
        assert len(datasets.load_dataset(str(folder), split="train")) == views * len(IMAGES)
        cache = TargetCache(folder)
        assert len(cache.rows) == views * len(IMAGES) and len(cache) == len(IMAGES)


# --------------------------------------------------------------------------------------------------
# Resuming, re-running, refusing the output folder
# --------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands for the cache being killed mid-way."""


def interrupting_teacher(monkeypatch: pytest.MonkeyPatch, forwards: int | None) -> list[int]:
    """Count the views of each teacher forward of the cache (their numbers are returned); raise
    ``Interrupted`` instead of forward ``forwards + 1`` (None: never)."""
    views: list[int] = []

    def counted(teacher: torch.nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        if forwards is not None and len(views) == forwards:
            raise Interrupted
        views.append(len(pixel_values))
        return teacher_targets(teacher, pixel_values, **kwargs)

    monkeypatch.setattr(cache_writer, "teacher_targets", counted)
    return views


def test_an_interrupted_cache_completes_to_the_rows_of_an_uninterrupted_one(
    world: dict[str, Path], folder_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    # Forwards of 2 images; shards of 2 images: killed at the third forward, after one complete shard
    # (2 images) and one image of the next, which was still pending.
    interrupting_teacher(monkeypatch, forwards=2)
    with pytest.raises(Interrupted):
        RECIPE.main(cache_argv(world, out))
    assert sorted(path.name for path in out.iterdir()) == [PENDING_FILE, "data"]
    assert [path.name for path in (out / "data").iterdir()] == SHARDS[:1]
    assert len(stored_rows(out)) == 2 * VIEWS
    # A process killed while it wrote the next shard leaves a part of it; it was never renamed into place.
    (out / "data" / f".{SHARDS[1]}.partial").write_bytes(b"PAR1-cut-short")
    unfinished = re.escape(f"{out} has no {INFO_FILE}: ") + ".*run recipes/cache_teacher.py again with the same"
    with pytest.raises(CacheMismatchError, match=unfinished):
        TargetCache(out)
    with pytest.raises(CacheMismatchError, match="holds an interrupted cache of other settings"):
        RECIPE.main(cache_argv(world, out, "--views_per_image", "2"))

    views = interrupting_teacher(monkeypatch, forwards=None)
    info = RECIPE.main(cache_argv(world, out))
    assert sum(views) == (len(IMAGES) - 2) * VIEWS  # the images of the complete shard were not run again
    assert (info.num_images, info.unreadable_images) == (len(IMAGES), 1)
    assert CacheInfo.load(out) == CacheInfo.load(folder_cache)
    assert sorted(path.name for path in out.iterdir()) == ["README.md", INFO_FILE, "data"]
    assert [path.name for path in sorted((out / "data").iterdir())] == SHARDS
    assert_same_rows(out, folder_cache)  # the same forwards of the same images: the same bits


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: its time of last change and its bytes."""
    files = (path for path in folder.rglob("*") if path.is_file())
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes()) for path in files}


def test_a_complete_cache_is_left_alone_and_other_settings_or_other_files_are_refused(
    world: dict[str, Path], folder_cache: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(folder_cache, out)
    before = files_of(out)
    views = interrupting_teacher(monkeypatch, forwards=None)
    assert cache_exit_status(cache_argv(world, out), capsys) == (0, [])
    assert views == [] and files_of(out) == before
    refusal = f"error: {out} holds a complete cache of other settings; choose another --output_dir."
    for flags in (["--views_per_image", "2"], ["--cache_dtype", "float16"], ["--image_size", "48"], ["--seed", "1"]):
        assert cache_exit_status(cache_argv(world, out, *flags), capsys) == (2, [refusal]), flags
    assert views == [] and files_of(out) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refusal = f"error: --output_dir {other} exists and is not a teacher-target cache; choose another."
    assert cache_exit_status(cache_argv(world, other), capsys) == (2, [refusal])
    assert [path.name for path in other.iterdir()] == ["notes.txt"] and views == []

    empty, new = tmp_path / "no-images", tmp_path / "new" / "cache"
    empty.mkdir()
    status, errors = cache_exit_status([*cache_argv(world, new), "--train_dir", str(empty)], capsys)
    assert (status, len(errors)) == (2, 1) and "holds no image files" in errors[0]
    assert not (tmp_path / "new").exists()  # no folder, no pending settings: nothing half-written

    loaded = []
    monkeypatch.setattr(cache_writer, "load_run_teacher", lambda *args, **kwargs: loaded.append(args))
    refusal = f"error: --output_dir {other / 'notes.txt'} is a file, not a folder."
    assert cache_exit_status(cache_argv(world, other / "notes.txt"), capsys) == (2, [refusal])
    assert (other / "notes.txt").read_text() == "mine" and loaded == []  # refused before the teacher loads


# --------------------------------------------------------------------------------------------------
# Several processes, streams
# --------------------------------------------------------------------------------------------------

TWO_PROCESSES = """
import json, sys
from pathlib import Path
from helpers import load_recipe

folder = Path(sys.argv[1])
load_recipe("cache_teacher").main(json.loads((folder / "argv.json").read_text()))
"""


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(
    world: dict[str, Path], folder_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    (tmp_path / "argv.json").write_text(json.dumps(cache_argv(world, out, "--num_workers", "1")))
    monkeypatch.setenv("HF_DATASETS_CACHE", datasets.config.HF_DATASETS_CACHE)
    run_two_processes(TWO_PROCESSES, tmp_path)
    info = CacheInfo.load(out)
    assert (info.num_images, info.unreadable_images) == (len(IMAGES), 1)  # the unreadable file counted once
    assert {path.name[:11] for path in (out / "data").iterdir()} == {"train-00000", "train-00001"}
    assert not (out / PENDING_FILE).exists()
    assert_same_rows(out, folder_cache, atol=BATCHES)


def test_a_stream_is_cached_by_image_digests_its_training_data_finds(tmp_path: Path, world: dict[str, Path]) -> None:
    shards = write_stream(tmp_path / "stream")
    out = tmp_path / "cache"
    argv = cache_argv(world, out, "--cache_dtype", "bfloat16")
    argv[argv.index("--train_dir") : argv.index("--train_dir") + 2] = []
    info = RECIPE.main([*argv, "--data_files", str(shards / "*.parquet"), "--streaming", "true"])
    assert (info.num_images, info.unreadable_images, info.keyed_by) == (len(IMAGES), 1, "image")

    cache = TargetCache(out)
    rows = stored_rows(out, twice=VIEWS)  # the views of the image held twice, cached twice alike
    assert len(rows) == len(IMAGES) * VIEWS and len(cache) == len(IMAGES)
    assert all(int(row["example"]) == int(row["image"]) for row in rows.values())  # known by their image

    data_args = DataArguments(data_files=[str(shards / "*.parquet")], streaming=True, image_size=32)
    run = tiny_run_config(tmp_path / "run", per_device_train_batch_size=4)
    examples = list(build_train_dataset(data_args, run).with_example_keys(run.seed))
    assert len(examples) == len(IMAGES) + 2
    readable = [example for example in examples if decode_image(example["image"]) is not None]
    assert len(readable) == len(IMAGES) + 1  # the duplicate too
    for example in readable:
        identity = example_id(example[EXAMPLE_KEY], example, "image")
        for view in range(VIEWS):
            stored = cache.read([cache.row(identity, view)])
            assert int(stored["image"][0]) == image_identity(example, "image")
            assert stored["views"][0] == recorded_view(rows[identity, view])
        # Over epochs, an image is trained on each of its stored views.
        assert {chosen_view(ExampleKey(run.seed, epoch), identity, VIEWS) for epoch in range(20)} == set(range(VIEWS))

    batch = CachedViewCollator(cache, "image", fill_skipped=True)(examples)
    assert int(batch["skipped_images"]) == 1 and len(batch["pixel_values"]) == len(examples)
    for position, example in enumerate(readable):
        key = example[EXAMPLE_KEY]
        identity = example_id(key, example, "image")
        stored = cache.read([cache.row(identity, chosen_view(key, identity, VIEWS))])
        expected = apply_train_view(decode_image(example["image"]), stored["views"][0], 32, MEAN, STD)
        assert torch.equal(batch["pixel_values"][position], expected)
        assert torch.equal(batch["teacher_cls"][position], stored["cls"][0])
        assert torch.equal(batch["teacher_attention"][position], stored["attention"][0])


# --------------------------------------------------------------------------------------------------
# Reading refusals
# --------------------------------------------------------------------------------------------------


def test_an_incomplete_or_damaged_cache_is_refused(folder_cache: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder_cache, unfinished)
    (unfinished / INFO_FILE).unlink()
    with pytest.raises(CacheMismatchError) as refused:
        TargetCache(unfinished)
    assert str(refused.value) == (
        f"{unfinished} has no {INFO_FILE}: it is not a teacher-target cache, or its writing did not finish "
        "(run recipes/cache_teacher.py again with the same arguments to complete it)."
    )

    damaged = tmp_path / "damaged"
    shutil.copytree(folder_cache, damaged)
    shard = sorted((damaged / "data").glob("*.parquet"))[1]
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # one view of an image is missing
    with pytest.raises(CacheMismatchError, match=f"^{damaged}: some images have another number of views .* damaged"):
        TargetCache(damaged)


def test_a_training_example_the_cache_does_not_hold_is_refused_naming_it(
    world: dict[str, Path], folder_cache: Path, tmp_path: Path
) -> None:
    cache, dataset = TargetCache(folder_cache), folder_dataset(world)
    collate = CachedViewCollator(cache, "image")
    readable = next(i for i in range(len(dataset)) if decode_image(dataset[i]["image"]) is not None)
    example = {**dataset[readable], EXAMPLE_KEY: ExampleKey(0, 0, readable)}
    assert collate([example])["pixel_values"].shape == (1, 3, 32, 32)

    with pytest.raises(CacheMismatchError, match=r"^Image 99 of the training data is not in the teacher-target cache "):
        collate([{**example, EXAMPLE_KEY: ExampleKey(0, 0, 99)}])
    other = {"bytes": encode(image_of((40, 40), "RGB", 99), "PNG"), "path": None}
    with pytest.raises(CacheMismatchError, match=f"^Example {readable} is another image .* the training data changed"):
        collate([{**example, "image": other}])


def test_an_image_file_changed_in_place_since_the_cache_is_refused(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = write_folder(tmp_path / "images", corrupt=False)
    data_args = DataArguments(train_dir=str(images), image_size=32, cache_dir=str(tmp_path / "prepared"))
    dataset, teacher = load_split(data_args, "train"), sharp_teacher()
    info = tiny_info(teacher, views_per_image=1)
    cache_teacher_targets(teacher, dataset, tmp_path / "cache", info, batch_size=8, progress=False)
    collate = CachedViewCollator(TargetCache(tmp_path / "cache"), "image")
    examples = [{**dataset[i], EXAMPLE_KEY: ExampleKey(0, 0, i)} for i in range(len(dataset))]
    opened: list[str] = []
    original_open = open

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith(str(images)):
            opened.append(str(file))
        return original_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording_open)
    collate(examples)
    monkeypatch.undo()
    # Each file is read once: the pixels trained on are the bytes whose digest was checked.
    assert sorted(opened) == sorted(example["image"]["path"] for example in examples)
    path = Path(dataset[2]["image"]["path"])
    image_of((40, 40), "RGB", 99).save(path)  # the same file name, another image
    with pytest.raises(CacheMismatchError, match=r"^Example 2 is another image .* the training data changed"):
        collate(examples)


def test_a_cache_is_read_from_a_folder_or_a_hub_dataset_and_anything_else_is_refused_in_one_line(
    folder_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def snapshot_download(repo_id: str, *, repo_type: str, revision: str | None) -> str:
        asked.append((repo_id, repo_type, revision))
        if repo_id != "me/tiny-targets":
            raise huggingface_hub.errors.LocalEntryNotFoundError("the Hub cannot be reached")
        return str(folder_cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from_hub = TargetCache("me/tiny-targets", revision="v1")
    assert asked == [("me/tiny-targets", "dataset", "v1")] and from_hub.folder == folder_cache
    assert from_hub.info == TargetCache(folder_cache).info and len(asked) == 1  # a folder is read as it is

    for local in (tmp_path / "missing", folder_cache / INFO_FILE):
        with pytest.raises(ValueError, match=f"^--teacher_targets {re.escape(str(local))} is not a folder: give the"):
            TargetCache(local)
    with pytest.raises(ValueError, match=r"^Cannot read the teacher-target cache 'me/other' from the Hub: the Hub"):
        TargetCache("me/other")
    assert len(asked) == 2  # local paths never reach the Hub


# --------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------


class RecordingApi:
    """Stands in for ``HfApi``: records the calls of a push and the files the folder holds when uploaded."""

    calls: ClassVar[list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = []
    uploaded: ClassVar[list[str]] = []

    def __init__(self, token: str | None = None) -> None:
        pass

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        RecordingApi.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/datasets/{args[0]}"

    def upload_folder(self, *args: Any, **kwargs: Any) -> None:
        RecordingApi.calls.append(("upload_folder", args, kwargs))
        folder = Path(kwargs["folder_path"])
        RecordingApi.uploaded = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_push_to_hub_publishes_the_cache_as_a_dataset_repo(
    world: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingApi.calls, RecordingApi.uploaded = [], []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    out = tmp_path / "cache"
    RECIPE.main(cache_argv(world, out, "--push_to_hub", "true", "--hub_dataset_id", "me/tiny-targets"))
    (create, args, kwargs), (upload, _, upload_kwargs) = RecordingApi.calls
    assert (create, args, kwargs) == (
        "create_repo",
        ("me/tiny-targets",),
        {"private": False, "exist_ok": True, "repo_type": "dataset"},
    )
    assert upload == "upload_folder"
    assert (upload_kwargs["repo_id"], upload_kwargs["repo_type"]) == ("me/tiny-targets", "dataset")
    assert Path(upload_kwargs["folder_path"]) == out.resolve() and PENDING_FILE in upload_kwargs["ignore_patterns"]
    assert RecordingApi.uploaded[:2] == ["README.md", INFO_FILE] and len(RecordingApi.uploaded) == 2 + 3

    missing = tmp_path / "no-id"
    argv = ["--teacher_name_or_path", str(tmp_path / "no-teacher"), "--train_dir", str(world["images"])]
    status, errors = cache_exit_status([*argv, "--output_dir", str(missing), "--push_to_hub", "true"], capsys)
    assert (status, len(errors)) == (2, 1)
    assert errors[0].startswith("error: --push_to_hub needs --hub_dataset_id")
    assert not missing.exists() and len(RecordingApi.calls) == 2
