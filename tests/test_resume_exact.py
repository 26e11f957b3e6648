"""Resume mid-epoch is bit-equal to an uninterrupted run with the published augmentation; unreadable files count once.

Every random choice of the training data (order, crop, flip, the fill-in views of undecodable images) is
a function of the run's seed, the epoch and the example. A run stopped right after a mid-epoch checkpoint
and resumed by a fresh trainer must end with the very weights (``torch.equal``) of a run that was never
interrupted: for an image folder, webdataset shards and a parquet stream, on 1 and 2 processes, whatever
the number of DataLoader workers (map-style data; a stream's batches depend on how many workers share it).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.data import (
    DataArguments,
    EqualStepsIterable,
    ImageCollator,
    count_examples,
    load_split,
    shard_stream,
    steps_per_epoch,
    train_transform,
)
from attndistill_hf.data.gpu_augment import GpuAugment, RawBytesCollator
from attndistill_hf.skipping import UnreadableDataError
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import encode, run_two_processes, tiny_run_config, tiny_student, tiny_teacher, write_image_folder

GLOBAL_BATCH = 4
MAX_STEPS = 10
# Checkpoints at steps 4 and 8; the interrupted run stops right after saving checkpoint-8, which lies in
# the second epoch (6 or 7 steps each), not at its start.
SAVE_STEPS = 4
STOP_AT = 8
UNREADABLE = b"\x89PNG\r\n\x1a\n-not-an-image"


@pytest.fixture(autouse=True)
def no_arrow_shutdown_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shuffled parquet streams pause 5 s when they close (a guard for arrow's reader threads); tiny
    test files need no such pause."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def write_sources(root: Path) -> dict[str, DataArguments]:
    """A class folder of 24 PNGs and 1 undecodable file, the same 24 images as 3 webdataset tars (prepared
    as a map-style dataset), and as 4 parquet shards read as a stream."""
    write_image_folder(root / "folder", per_class=8, classes=3, corrupt=True)
    images = sorted((root / "folder").glob("class*/[0-9]*.png"))
    (root / "tars").mkdir()
    for shard in range(3):
        with tarfile.open(root / "tars" / f"shard-{shard}.tar", "w") as archive:
            for index, path in enumerate(images[shard::3]):
                for ext, data in (("png", path.read_bytes()), ("cls", str(shard).encode())):
                    info = tarfile.TarInfo(f"s{shard}-{index:03d}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    (root / "parquet").mkdir()
    for shard in range(4):
        rows = [{"bytes": path.read_bytes(), "path": None} for path in images[shard::4]]
        table = datasets.Dataset.from_dict({"image": rows, "label": [shard] * len(rows)})
        table.cast_column("image", datasets.Image()).to_parquet(str(root / "parquet" / f"part-{shard}.parquet"))
    common = {"image_size": 32, "cache_dir": str(root / "cache")}
    return {
        "folder": DataArguments(train_dir=str(root / "folder"), **common),
        "shards": DataArguments(data_files=[str(root / "tars" / "*.tar")], **common),
        "stream": DataArguments(data_files=[str(root / "parquet" / "*.parquet")], streaming=True, **common),
    }


def training_data(data_args: DataArguments, args: AttnDistillConfig) -> Any:
    """The training data as ``distill.py`` reads it: a prepared dataset, or a stream split per rank with the
    same number of steps on every rank."""
    dataset = load_split(data_args, "train", seed=args.seed)
    if not data_args.streaming:
        return dataset
    world, batch = max(1, args.world_size), args.per_device_train_batch_size
    stream = shard_stream(dataset, rank=args.process_index, world_size=world, seed=args.seed)
    return EqualStepsIterable(stream, steps_per_epoch(count_examples(data_args, "train"), world, batch), batch)


class Interrupted(Exception):
    """Stands for the run being killed: raised right after a checkpoint is written."""


class StopAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


def train(
    data_args: DataArguments,
    out: Path,
    *,
    workers: int,
    gpu_path: bool = False,
    stop_at: int | None = None,
    resume: str | None = None,
    max_steps: int = MAX_STEPS,
    logging_steps: int = 1,
) -> AttnDistillTrainer:
    """A run of a fresh trainer on ``data_args`` with the published augmentation (the CPU path's views, or
    the GPU path's, here on the CPU), as ``distill.py`` sets it up: AdamW at 1e-3, ``max_steps`` planned."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    args = tiny_run_config(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // processes,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=logging_steps,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
    )
    if gpu_path:
        collator, batch_transform = RawBytesCollator(), GpuAugment(32, device="cpu")
    else:
        collator, batch_transform = ImageCollator(train_transform(32), fill_skipped=True), None
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        args,
        train_dataset=training_data(data_args, args),
        data_collator=collator,
        batch_transform=batch_transform,
        callbacks=[StopAfterSave(stop_at)] if stop_at else None,
    )
    with contextlib.suppress(Interrupted):
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def student(trainer: AttnDistillTrainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.student.state_dict().items()}


def straight_and_resumed(
    data_args: DataArguments, out: Path, workers: tuple[int, int], gpu_path: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """The student after an uninterrupted run (``workers[0]`` DataLoader workers), after the interrupted run's
    checkpoint-8, and after that run resumed by a fresh trainer (``workers[1]`` workers)."""
    straight = student(train(data_args, out / "straight", workers=workers[0], gpu_path=gpu_path))
    interrupted = train(data_args, out / "interrupted", workers=workers[1], gpu_path=gpu_path, stop_at=STOP_AT)
    assert interrupted.state.global_step == STOP_AT
    checkpoint = out / "interrupted" / f"checkpoint-{STOP_AT}"
    resumed = train(data_args, out / "interrupted", workers=workers[1], gpu_path=gpu_path, resume=str(checkpoint))
    assert resumed.state.global_step == MAX_STEPS
    return {"straight": straight, "at_checkpoint": student(interrupted), "resumed": student(resumed)}


# Map-style data: an uninterrupted run with 2 persistent workers, resumed without any (the views do not
# depend on the worker count). A stream's batches do: 2 persistent workers in both runs, so that the
# epoch must reach persistent workers for the straight run's second epoch to match.
WORKERS = {"folder": (2, 0), "shards": (2, 0), "stream": (2, 2)}
CASES = [(source, False) for source in WORKERS] + [("folder", True)]


def resume_differences(students: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """The student tensors in which the resumed run differs from the uninterrupted one (``torch.equal``)."""
    straight, resumed = students["straight"], students["resumed"]
    # The steps after the checkpoint trained: the comparison is not between two untouched students.
    assert any(not torch.equal(students["at_checkpoint"][name], value) for name, value in straight.items())
    return [name for name, value in straight.items() if not torch.equal(resumed[name], value)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DataArguments]:
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.mark.slow
@pytest.mark.parametrize(("source", "gpu_path"), CASES, ids=[s + ("-gpu_augment" if g else "") for s, g in CASES])
def test_resume_mid_epoch_is_bit_equal_with_the_published_augmentation(
    sources: dict[str, DataArguments], tmp_path: Path, source: str, gpu_path: bool
) -> None:
    students = straight_and_resumed(sources[source], tmp_path, WORKERS[source], gpu_path)
    assert resume_differences(students) == []


# Both ranks run every case; rank 0 saves the students, each rank its count of unreadable images.
TWO_PROCESS_WORKER = """
import os
import sys
import datasets
import torch
from pathlib import Path
from test_resume_exact import WORKERS, straight_and_resumed, unreadable_counts, write_sources

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # as no_arrow_shutdown_pause does in this process
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])  # set by torchrun; the process group starts with the first trainer
sources = write_sources(out / f"data-rank{rank}")  # the same files, written by each rank for itself
results = {source: straight_and_resumed(sources[source], out / source, WORKERS[source]) for source in WORKERS}
counts = unreadable_counts(out / f"data-rank{rank}" / "unreadable", out / "unreadable")
if rank == 0:
    torch.save(results, out / "students.pt")
torch.save(counts, out / f"counts-rank{rank}.pt")
"""


@pytest.mark.slow
def test_resume_mid_epoch_is_bit_equal_on_two_processes(tmp_path: Path) -> None:
    run_two_processes(TWO_PROCESS_WORKER, tmp_path, timeout=600)
    results = torch.load(tmp_path / "students.pt")
    assert {source: resume_differences(students) for source, students in results.items()} == {
        source: [] for source in WORKERS
    }
    counts = [torch.load(tmp_path / f"counts-rank{rank}.pt") for rank in (0, 1)]
    # Summed over the ranks (as the end-of-run check sums them), each unreadable file counts once.
    assert sum(c["mixed"] for c in counts) == 4
    for c in counts:
        assert c["only_unreadable"].startswith("No training batch held a readable image: 4 unreadable images")


# ----------------------------------------------------------------------------------------------
# Unreadable images are counted once, however often they are read
# ----------------------------------------------------------------------------------------------


def write_mixed_folder(root: Path, readable: int, unreadable: int) -> Path:
    folder = root / "class0"
    folder.mkdir(parents=True)
    for index in range(readable):
        (folder / f"good{index}.png").write_bytes(encode(Image.new("RGB", (40, 40), (index * 20, 90, 30)), "PNG"))
    for index in range(unreadable):
        (folder / f"bad{index}.png").write_bytes(UNREADABLE)
    return root


def unreadable_counts(data: Path, out: Path) -> dict[str, int | str]:
    """A folder of 4 readable and 4 unreadable files read for 3 epochs (global batch 4, 6 steps): the run's
    count; and a folder of 4 unreadable files alone, read twice: the error that stops the run."""
    mixed = write_mixed_folder(data / "mixed", readable=4, unreadable=4)
    args = DataArguments(train_dir=str(mixed), image_size=32, cache_dir=str(data / "cache"))
    # A log at every step: under DDP every rank reduces the same loss terms, also in a window in which it
    # met only unreadable batches (a rank with fewer reductions than the others would hang them).
    trainer = train(args, out / "mixed", workers=0, max_steps=6, logging_steps=1)
    assert trainer.state.epoch == 3
    logged = [entry["skipped_images"] for entry in trainer.state.log_history if "skipped_images" in entry]
    assert len(logged) == 6 and logged[-1] == trainer.skipped_images_in_all_processes()
    only = write_mixed_folder(data / "only", readable=0, unreadable=4)
    args = DataArguments(train_dir=str(only), image_size=32, cache_dir=str(data / "cache"))
    with pytest.raises(UnreadableDataError) as stopped:
        train(args, out / "only", workers=0, max_steps=2)
    return {"mixed": trainer.skips.skipped_images, "only_unreadable": str(stopped.value)}


def test_unreadable_files_are_counted_once_not_once_per_read(tmp_path: Path) -> None:
    counts = unreadable_counts(tmp_path / "data", tmp_path / "out")
    assert counts["mixed"] == 4  # each unreadable file read 3 times, once per epoch
    assert counts["only_unreadable"].startswith(
        "No training batch held a readable image: 4 unreadable images in 2 batches"
    )


def test_the_trainers_loader_repeats_an_epoch_exactly_and_reshuffles_the_next(
    sources: dict[str, DataArguments], tmp_path: Path
) -> None:
    args = tiny_run_config(tmp_path, per_device_train_batch_size=5, seed=42)
    trainer = AttnDistillTrainer(
        tiny_student(),
        tiny_teacher(),
        args,
        train_dataset=training_data(sources["folder"], args),
        data_collator=ImageCollator(train_transform(32), label_column="label", fill_skipped=True),
    )

    def epoch(number: int) -> list[dict[str, torch.Tensor]]:
        loader = trainer.get_train_dataloader()
        loader.set_epoch(number)
        return list(loader)

    torch.manual_seed(1)
    first = epoch(1)
    torch.manual_seed(2)  # the process's random state plays no part
    again, second = epoch(1), epoch(2)
    assert [len(batch["labels"]) for batch in first] == [5] * 5  # 25 files: the undecodable one filled in
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
        assert "unreadable_ids" not in a  # turned into the count of new ones
    # Each loader counts the undecodable file once.
    assert [sum(int(batch["skipped_images"]) for batch in run) for run in (first, again)] == [1, 1]
    labels = [torch.cat([batch["labels"] for batch in run]) for run in (first, second)]
    assert not torch.equal(*labels)  # another epoch, another order
