"""Training from a teacher-target cache (``--teacher_targets``) is training with the teacher, on the stored views.

A cache keeps, for K recorded views of every image, the crop box, the flip and the teacher's targets
(CLS feature, last-layer CLS-attention rows). A run from it loads no teacher: each epoch an image gets one
of its stored views, and the loss reads the stored targets. What must hold:

* a step from a float32 cache is the online step on the same views (loss, every gradient, the update), in
  every attention case (a: same heads and grid, b: grids differ, c: heads differ, b+c), with attention
  guidance alone and the projector alone; a float16 cache differs by its rounding only;
* several students from one cache train as each would alone from it;
* a run stopped after a mid-epoch checkpoint and resumed equals the uninterrupted run, over epochs in which
  the chosen view changes, on 1 and 2 processes;
* a streamed source's cache trains streamed and finds every image;
* each image is trained on its stored views only (the pixels and the targets of one stored view);
* a cache that does not fit the run is refused before training, in one line, leaving no output folder;
* the card names the cache, and the exported student loads with ``AutoModel``.

Attention is compared on sharpened teachers (q/k scaled up, as in test_attention.py): a random ViT's maps
are nearly uniform, against which a wrong head, key or view would go unnoticed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from test_resume_exact import Interrupted, StopAfterSave
from transformers import AutoModel, ViTImageProcessor, ViTModel

from attndistill_hf import pipeline
from attndistill_hf.arguments import DistillModelArguments, DistillRunArguments
from attndistill_hf.cache_writer import CacheArguments, build_target_cache, cache_teacher_targets, teacher_cache_info
from attndistill_hf.data import (
    EXAMPLE_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataArguments,
    ExampleKey,
    decode_image,
    example_id,
    load_split,
)
from attndistill_hf.data.transforms import TrainView, apply_train_view
from attndistill_hf.models import build_student
from attndistill_hf.students import StudentSpec
from attndistill_hf.target_cache import (
    CachedViewCollator,
    CacheMismatchError,
    TargetCache,
    chosen_view,
)
from attndistill_hf.teacher import teacher_targets
from attndistill_hf.trainer import AttnDistillTrainer

from helpers import (
    REPO,
    distill_command,
    distill_exit_status,
    distill_refusal,
    run_two_processes,
    tiny_run_config,
    tiny_student,
    tiny_teacher,
    write_image_folder,
)

IMAGE_SIZE = 32
IMAGES = 12  # 3 classes x 4 PNGs of 40 px
# The teacher (heads, patch) of each attention case against tiny_student (2 heads, patch 8: a 4 x 4 grid).
CASES = {"a": (2, 8), "b": (2, 4), "c": (4, 8), "bc": (4, 4)}
SETTINGS = {"attention": {"proj_loss_weight": 0.0, "attn_loss_weight": 1.0}, "projector": {"attn_loss_weight": 0.0}}
# A 16-bit cache rounds each stored CLS target by at most 2**-11 = 4.9e-4 (float16) or 2**-8 = 3.9e-3 (bfloat16) of
# itself, and each attention probability (float16 through its logarithm) by under 1 %: the step's loss and its
# largest gradient error (relative to the largest gradient) stay within these bounds (measured on these models,
# float16: loss <= 7e-5, gradients <= 3.6e-4; bfloat16: 1.2e-3, 3.9e-3; docs/method.md).
ROUNDING_BOUNDS = {"float16": 1e-3, "bfloat16": 1e-2}

# Resume: 12 images at a global batch of 4 are 3 steps an epoch; checkpoints at steps 4 and 8, the
# interrupted run stops right after checkpoint-8, the second step of the third epoch.
GLOBAL_BATCH = 4
MAX_STEPS = 10
SAVE_STEPS = 4
STOP_AT = 8
VIEWS = 3  # K of the resume and view caches: the chosen view changes from epoch to epoch


@pytest.fixture(autouse=True, scope="module")
def datasets_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``TargetCache`` prepares the cache's parquet shards in datasets' cache: a folder of this run's, not
    the user's; and tiny parquet streams need no 5 s pause when they close."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        patch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
        yield


# ----------------------------------------------------------------------------------------------
# Teachers, images and caches
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Large q/k projections (as test_attention.sharpen): peaked CLS-attention maps."""
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            param.copy_(0.25 * torch.randn(param.shape, generator=generator))
    return model


def sharp_teacher(case: str = "bc", path: Path | None = None) -> ViTModel:
    heads, patch = CASES[case]
    teacher = sharpen(tiny_teacher(heads=heads, patch=patch)).eval()
    if path is not None:
        teacher.save_pretrained(path)
        ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return teacher


def write_cache(
    teacher: ViTModel,
    dataset: Any,
    folder: Path,
    *,
    views: int = 2,
    dtype: str = "float32",
    with_attention: bool = True,
) -> TargetCache:
    """The cache of ``teacher`` over ``dataset`` (views of seed 0), as recipes/cache_teacher.py writes it."""
    info = teacher_cache_info(
        teacher,
        teacher_name="teacher",
        teacher_dtype="float32",
        image_size=IMAGE_SIZE,
        views_per_image=views,
        seed=0,
        storage_dtype=dtype,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        dataset="images",
        with_attention=with_attention,
    )
    cache_teacher_targets(teacher, dataset, folder, info, batch_size=64, progress=False)
    return TargetCache(folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cached")


@pytest.fixture(scope="module")
def data_args(root: Path) -> DataArguments:
    images = write_image_folder(root / "images", per_class=4, classes=3)
    return DataArguments(train_dir=str(images), image_size=IMAGE_SIZE, cache_dir=str(root / "hf-data"))


@pytest.fixture(scope="module")
def dataset(data_args: DataArguments) -> Any:
    loaded = load_split(data_args, "train")
    assert len(loaded) == IMAGES
    return loaded


@pytest.fixture(scope="module")
def case_cache(root: Path, dataset: Any) -> Callable[[str, str], tuple[ViTModel, TargetCache]]:
    """The sharpened teacher of an attention case and its cache (2 views) in a storage dtype, made once."""
    made: dict[tuple[str, str], tuple[ViTModel, TargetCache]] = {}

    def get(case: str, dtype: str) -> tuple[ViTModel, TargetCache]:
        if (case, dtype) not in made:
            teacher = sharp_teacher(case)
            made[case, dtype] = teacher, write_cache(teacher, dataset, root / f"cache-{case}-{dtype}", dtype=dtype)
        return made[case, dtype]

    return get


@pytest.fixture(scope="module")
def views_cache(root: Path, dataset: Any) -> TargetCache:
    """K = 3 views of every image, of the b+c teacher, in float32."""
    return write_cache(sharp_teacher(), dataset, root / "cache-views", views=VIEWS)


def keyed(dataset: Any, indices: Sequence[int], epoch: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Examples as the trainer hands them to the collator."""
    return [{**dataset[index], EXAMPLE_KEY: ExampleKey(seed, epoch, index)} for index in indices]


# ----------------------------------------------------------------------------------------------
# 1. A step from the cache is the online step on the same views
# ----------------------------------------------------------------------------------------------


def one_step(
    teacher: ViTModel | TargetCache, batch: Mapping[str, Any], setting: str, out: Path
) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The loss of a fresh trainer (student of seed 0) on ``batch``, each parameter's gradient, and each
    parameter's update by one step of the trainer's own optimizer (AdamW at 1e-3)."""
    trainer = AttnDistillTrainer(tiny_student(0), teacher, tiny_run_config(out, **SETTINGS[setting]))
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    params = dict(model.named_parameters())
    gradients = {name: param.grad.detach().clone() for name, param in params.items() if param.grad is not None}
    before = {name: param.detach().clone() for name, param in params.items()}
    trainer.create_optimizer().step()
    updates = {name: param.detach() - before[name] for name, param in params.items()}
    return loss.item(), gradients, updates


def cached_and_online(
    case_cache: Callable[[str, str], tuple[ViTModel, TargetCache]],
    dataset: Any,
    case: str,
    dtype: str,
    setting: str,
    out: Path,
) -> tuple[tuple[float, dict, dict], tuple[float, dict, dict], dict[str, Any]]:
    """One step from a cache batch of 8 images (their stored views of epoch 1) and the online step of the
    live teacher on the very same pixel values."""
    teacher, cache = case_cache(case, dtype)
    batch = CachedViewCollator(cache)(keyed(dataset, range(8)))
    assert int(batch["skipped_images"]) == 0
    cached = one_step(cache, batch, setting, out / "cached")
    online = one_step(teacher, {"pixel_values": batch["pixel_values"]}, setting, out / "online")
    return cached, online, batch


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_from_a_float32_cache_equals_the_online_step(
    case_cache: Callable, dataset: Any, tmp_path: Path, case: str, setting: str
) -> None:
    (loss, gradients, updates), (live_loss, live_gradients, live_updates), batch = cached_and_online(
        case_cache, dataset, case, "float32", setting, tmp_path
    )
    teacher, student = case_cache(case, "float32")[0].config, tiny_student(0).config
    differ = (teacher.num_attention_heads != student.num_attention_heads, teacher.patch_size != student.patch_size)
    assert differ == ("c" in case, "b" in case)  # the case is what it is named
    live = teacher_targets(case_cache(case, "float32")[0], batch["pixel_values"])
    keys = live.attention.shape[-1]
    assert live.attention.max() > 4 / keys  # sharpened: far from uniform

    assert live_loss > 0 and abs(loss - live_loss) <= 1e-6 * max(1.0, abs(live_loss))
    assert gradients.keys() == live_gradients.keys()
    reached = {name.split(".")[0] + "." + name.split(".")[1] for name in live_gradients}
    # Attention guidance reaches the student only; the projector term reaches the projector too.
    assert ("loss_fn.projector" in reached) == (setting == "projector") and "student.embeddings" in reached
    for name, gradient in live_gradients.items():
        scale = max(1.0, gradient.abs().max().item())
        torch.testing.assert_close(gradients[name], gradient, rtol=0, atol=1e-6 * scale, msg=name)
    # AdamW's first step moves a parameter by lr * g / (|g| + eps) (and its decay, the same on both sides): the
    # updates agree to 1e-6 beyond what that map makes of the gradients' own difference, whose slope is
    # eps / (|g| + eps)**2 <= 1 / eps between them: large only where g is ~0 (the key biases, which the softmax
    # cancels, get gradients of 1e-10 from rounding alone).
    lr, eps = 1e-3, 1e-8
    assert any(update.abs().max() > 0 for update in live_updates.values())
    for name, update in live_updates.items():
        if name not in live_gradients:
            assert torch.equal(updates[name], update), name  # frozen or not reached: no step, or decay alone
            continue
        mine, live = gradients[name], live_gradients[name]
        nearest = torch.where(mine.sign() == live.sign(), torch.minimum(mine.abs(), live.abs()), 0.0)
        slope = eps / (nearest + eps) ** 2
        assert ((updates[name] - update).abs() <= 1e-6 + lr * slope * (mine - live).abs()).all(), name


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", sorted(ROUNDING_BOUNDS))
def test_a_step_from_a_16_bit_cache_is_within_its_rounding_of_the_online_step(
    case_cache: Callable, dataset: Any, tmp_path: Path, dtype: str, case: str, setting: str
) -> None:
    (loss, gradients, _), (live_loss, live_gradients, _), _ = cached_and_online(
        case_cache, dataset, case, dtype, setting, tmp_path
    )
    bound = ROUNDING_BOUNDS[dtype]
    loss_error = abs(loss - live_loss) / live_loss
    scale = max(gradient.abs().max().item() for gradient in live_gradients.values())
    gradient_error = max((gradients[name] - g).abs().max().item() for name, g in live_gradients.items()) / scale
    assert loss_error <= bound and gradient_error <= bound, (loss_error, gradient_error)


# ----------------------------------------------------------------------------------------------
# 2. Several students from one cache
# ----------------------------------------------------------------------------------------------


def cache_trainer(
    student: Any, cache: TargetCache, dataset: Any, out: Path, collator: Any = None, **overrides: Any
) -> AttnDistillTrainer:
    """A trainer from ``cache`` on the folder's images, fed as distill.py feeds them (keyed, epoch-shuffled)."""
    return AttnDistillTrainer(
        student,
        cache,
        tiny_run_config(out, **({"per_device_train_batch_size": GLOBAL_BATCH} | overrides)),
        train_dataset=dataset,
        data_collator=collator or CachedViewCollator(cache, fill_skipped=True),
    )


def two_students() -> dict[str, StudentSpec]:
    """As in test_multi_student.py: projector + attention beside attention only, from different initial weights."""
    return {"both": StudentSpec(tiny_student(0)), "attn": StudentSpec(tiny_student(1), proj_loss_weight=0.0)}


SINGLE_SETTINGS = {"both": (0, {}), "attn": (1, {"proj_loss_weight": 0.0})}


def states(trainer: AttnDistillTrainer) -> dict[str | None, dict[str, torch.Tensor]]:
    return {name: student_state(student) for name, student in trainer.students.items()}


def student_state(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in student.state_dict().items()}


def test_two_students_from_one_cache_train_as_each_would_alone(
    views_cache: TargetCache, dataset: Any, tmp_path: Path
) -> None:
    multi = cache_trainer(two_students(), views_cache, dataset, tmp_path / "multi", max_steps=4)
    multi.train()  # 4 steps: over the first epoch's end
    after = states(multi)
    for name, (seed, overrides) in SINGLE_SETTINGS.items():
        single = cache_trainer(tiny_student(seed), views_cache, dataset, tmp_path / name, max_steps=4, **overrides)
        single.train()
        initial = tiny_student(seed).state_dict()
        assert max((after[name][k] - v).abs().max().item() for k, v in initial.items()) > 1e-4  # it trained
        for key, value in single.student.state_dict().items():
            torch.testing.assert_close(after[name][key], value, atol=1e-6, rtol=0, msg=f"{name}: {key}")


# ----------------------------------------------------------------------------------------------
# 3. Resume mid-epoch equals the uninterrupted run
# ----------------------------------------------------------------------------------------------


def train_from_cache(
    cache: TargetCache,
    dataset: Any,
    out: Path,
    *,
    workers: int = 0,
    stop_at: int | None = None,
    resume: str | None = None,
) -> AttnDistillTrainer:
    """A run of a fresh trainer from ``cache`` (``workers`` DataLoader workers), checkpoints every 4 steps."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = AttnDistillTrainer(
        tiny_student(),
        cache,
        tiny_run_config(
            out,
            per_device_train_batch_size=GLOBAL_BATCH // processes,
            max_steps=MAX_STEPS,
            save_strategy="steps",
            save_steps=SAVE_STEPS,
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,
        ),
        train_dataset=dataset,
        data_collator=CachedViewCollator(cache, fill_skipped=True),
        callbacks=[StopAfterSave(stop_at)] if stop_at else None,
    )
    with contextlib.suppress(Interrupted):
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def straight_and_resumed(cache: TargetCache, dataset: Any, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The student after an uninterrupted run from ``cache`` (2 persistent DataLoader workers: the collator reads
    the cache in them, and must get the epoch there), at the interrupted run's checkpoint-8, and after that run
    resumed by a fresh trainer (both without workers: the views do not depend on them)."""
    straight = student_state(train_from_cache(cache, dataset, out / "straight", workers=2).student)
    interrupted = train_from_cache(cache, dataset, out / "interrupted", stop_at=STOP_AT)
    assert interrupted.state.global_step == STOP_AT and 2 < interrupted.state.epoch < 3  # mid-epoch
    resumed = train_from_cache(cache, dataset, out / "interrupted", resume=str(out / "interrupted" / "checkpoint-8"))
    assert resumed.state.global_step == MAX_STEPS
    return {
        "straight": straight,
        "at_checkpoint": student_state(interrupted.student),
        "resumed": student_state(resumed.student),
    }


def resume_differences(students: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    straight, resumed = students["straight"], students["resumed"]
    assert any(not torch.equal(students["at_checkpoint"][name], value) for name, value in straight.items())
    return [name for name, value in straight.items() if not torch.equal(resumed[name], value)]


def test_resume_mid_epoch_from_a_cache_is_bit_equal(views_cache: TargetCache, dataset: Any, tmp_path: Path) -> None:
    # Over the run's 4 epochs (0-3) the chosen stored view of an image changes: a resume must find it again.
    for index in range(IMAGES):
        chosen = {chosen_view(ExampleKey(0, epoch, index), index, VIEWS) for epoch in range(4)}
        if len(chosen) > 1:
            break
    else:
        pytest.fail("no image changes its view over the epochs: the test would not see a wrong epoch")
    assert resume_differences(straight_and_resumed(views_cache, dataset, tmp_path)) == []


TWO_PROCESS_WORKER = """
import os
import sys
from pathlib import Path

import datasets
import torch

from attndistill_hf.data import DataArguments, load_split
from attndistill_hf.target_cache import TargetCache
from test_cached_training import straight_and_resumed

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
datasets.config.HF_DATASETS_CACHE = str(out / f"hf-rank{rank}")  # each rank prepares its own copies
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
data = DataArguments(train_dir=str(out / "images"), image_size=32, cache_dir=str(out / f"data-rank{rank}"))
students = straight_and_resumed(TargetCache(out / "targets"), load_split(data, "train"), out / "runs")
if rank == 0:
    torch.save(students, out / "students.pt")
"""


@pytest.mark.slow
def test_resume_mid_epoch_from_a_cache_is_bit_equal_on_two_processes(tmp_path: Path) -> None:
    data = DataArguments(
        train_dir=str(write_image_folder(tmp_path / "images", per_class=4, classes=3)),
        image_size=IMAGE_SIZE,
        cache_dir=str(tmp_path / "data"),
    )
    write_cache(sharp_teacher(), load_split(data, "train"), tmp_path / "targets", views=VIEWS)
    run_two_processes(TWO_PROCESS_WORKER, tmp_path, timeout=300)
    assert resume_differences(torch.load(tmp_path / "students.pt")) == []


# ----------------------------------------------------------------------------------------------
# 4. A streamed source's cache trains streamed (recipe path)
# ----------------------------------------------------------------------------------------------


QUICK = ["--image_size", str(IMAGE_SIZE), "--use_cpu", "true", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def teacher_dir(root: Path) -> Path:
    sharp_teacher(path=root / "teacher")
    return root / "teacher"


@pytest.fixture(scope="module")
def student_dir(root: Path) -> Path:
    """A config folder of the tiny student (no weights): the recipe builds it from --seed."""
    tiny_student(0).config.save_pretrained(root / "student")
    return root / "student"


def write_parquet_shards(folder: Path, images: Path) -> str:
    """The folder's PNGs as 4 parquet shards of an image column and a label."""
    paths = sorted(images.glob("class*/*.png"))
    folder.mkdir(parents=True)
    for shard in range(4):
        rows = [{"bytes": path.read_bytes(), "path": None} for path in paths[shard::4]]
        table = datasets.Dataset.from_dict({"image": rows, "label": [shard] * len(rows)})
        table.cast_column("image", datasets.Image()).to_parquet(str(folder / f"part-{shard}.parquet"))
    return str(folder / "*.parquet")


@pytest.fixture(scope="module")
def stream_cache(root: Path, teacher_dir: Path, data_args: DataArguments) -> tuple[str, Path]:
    """The folder's images as a parquet stream, and its cache (K = 2) written by ``python recipes/cache_teacher.py``
    in a process of its own, as a user runs it (nothing imported before it)."""
    files = write_parquet_shards(root / "parquet", Path(data_args.train_dir))
    out = root / "stream-targets"
    argv = ["--teacher_name_or_path", str(teacher_dir), "--data_files", files, "--streaming", "true"]
    argv += ["--image_size", str(IMAGE_SIZE), "--views_per_image", "2", "--num_workers", "0"]
    argv += ["--output_dir", str(out), "--cache_dir", str(root / "hf-stream")]
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf-datasets-stream"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "cache_teacher.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return files, out


@pytest.mark.slow
def test_a_streamed_sources_cache_trains_streamed_and_finds_every_image(
    stream_cache: tuple[str, Path], student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, targets = stream_cache
    info = json.loads((targets / "attndistill_cache.json").read_text())
    stored = set(pq.read_table(str(targets / "data"), columns=["example"])["example"].to_pylist())
    assert info["keyed_by"] == "image" and info["num_images"] == IMAGES and len(stored) == IMAGES
    looked_up: list[int] = []
    row = TargetCache.row

    def recorded(self: TargetCache, identity: int, view: int) -> int:
        looked_up.append(identity)
        return row(self, identity, view)

    monkeypatch.setattr(TargetCache, "row", recorded)
    out = tmp_path / "out"
    result = distill_command(
        ["--teacher_targets", str(targets), "--student_name_or_path", str(student_dir), *QUICK]
        + ["--data_files", files, "--streaming", "true", "--max_steps", "3", "--per_device_train_batch_size", "4"]
        + ["--output_dir", str(out), "--cache_dir", str(tmp_path / "hf"), "--logging_steps", "1"]
    )
    # One epoch of the stream (12 images, 3 steps of 4): every image found in the cache, none skipped.
    assert set(looked_up) == stored
    logged = [entry for entry in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(logged) == 3 and logged[-1]["skipped_images"] == 0
    assert result.student.folder == out and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_stream_of_other_images_is_refused_before_training(
    stream_cache: tuple[str, Path], student_dir: Path, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started with a cache of other images")

    monkeypatch.setattr(AttnDistillTrainer, "train", too_late)
    other = write_parquet_shards(tmp_path / "parquet", another_folders_images(root))
    with pytest.raises(CacheMismatchError):
        distill_command(
            ["--teacher_targets", str(stream_cache[1]), "--student_name_or_path", str(student_dir), *QUICK]
            + ["--data_files", other, "--streaming", "true", "--max_steps", "3", "--per_device_train_batch_size", "4"]
            + ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "hf")]
        )


@pytest.mark.slow  # its cache is written by the recipe in a process of its own
def test_a_streamed_cache_run_starts_no_more_workers_than_its_stream_has_shards(
    stream_cache: tuple[str, Path], tmp_path: Path
) -> None:
    """A run with the teacher reads a stream of 4 shards with at most 4 DataLoader workers
    (pipeline.training_data: dataloader_workers warns and lowers the count): surplus ones would idle."""
    files, targets = stream_cache
    data = DataArguments(data_files=[files], streaming=True, image_size=IMAGE_SIZE, cache_dir=str(tmp_path / "hf"))
    args = tiny_run_config(tmp_path / "out", dataloader_num_workers=8, per_device_train_batch_size=4)
    with pytest.warns(UserWarning, match="8 DataLoader workers requested but this rank's stream has 4 shard"):
        pipeline.training_data(data, DistillRunArguments(), args, IMAGENET_MEAN, IMAGENET_STD, TargetCache(targets))
    assert args.dataloader_num_workers == 4


# ----------------------------------------------------------------------------------------------
# 5. Each image is trained on its stored views only
# ----------------------------------------------------------------------------------------------


class RecordingCollator:
    """Wraps the cache's collator: keeps each example's identity and epoch with its row of the batch."""

    uses_example_keys = True

    def __init__(self, collator: CachedViewCollator) -> None:
        self.collator = collator
        self.seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # identity, epoch, pixels, teacher_cls

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for position, example in enumerate(examples):
            key = example[EXAMPLE_KEY]
            identity = example_id(key, example, "image")
            self.seen.append((identity, key.epoch, batch["pixel_values"][position], batch["teacher_cls"][position]))
        return batch


def stored_views(cache: TargetCache, dataset: Any) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each image's stored views as pixels (apply_train_view of the stored crop and flip) and their stored CLS
    targets, read from the cache's parquet files directly."""
    table = pq.read_table(glob.glob(str(cache.folder / "data" / "*.parquet"))[0]).to_pylist()
    for extra in glob.glob(str(cache.folder / "data" / "*.parquet"))[1:]:
        table += pq.read_table(extra).to_pylist()
    views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for row in sorted(table, key=lambda row: (row["example"], row["view"])):
        image = decode_image(dataset[row["example"]]["image"])
        pixels = apply_train_view(image, TrainView(*row["crop"], row["flip"]), IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)
        views.setdefault(row["example"], []).append((pixels, torch.tensor(row["cls"], dtype=torch.float32)))
    return views


def trained_views(cache: TargetCache, dataset: Any, out: Path, epochs: int) -> dict[int, list[int]]:
    """Train ``epochs`` epochs from ``cache`` and say which stored view each image was trained on, epoch by
    epoch; every batch row must be one stored view's pixels, with that view's targets."""
    recorder = RecordingCollator(CachedViewCollator(cache, fill_skipped=True))
    trainer = cache_trainer(tiny_student(), cache, dataset, out, recorder, max_steps=epochs * IMAGES // GLOBAL_BATCH)
    trainer.train()
    views = stored_views(cache, dataset)
    assert len(views) == IMAGES and all(len(stored) == cache.info.views_per_image for stored in views.values())
    trained: dict[int, list[int]] = {}
    for identity, epoch, pixels, target in recorder.seen:
        matches = [view for view, (stored, _) in enumerate(views[identity]) if torch.equal(pixels, stored)]
        assert matches, f"image {identity} in epoch {epoch} was trained on a view that is none of its stored ones"
        view = matches[0]
        assert torch.equal(target, views[identity][view][1]), f"image {identity}: the targets of another view"
        trained.setdefault(identity, []).append(view)
        assert len(trained[identity]) == epoch + 1  # once an epoch, in order
    return trained


def test_each_image_is_trained_on_its_stored_views_and_several_of_them_over_the_epochs(
    views_cache: TargetCache, dataset: Any, tmp_path: Path
) -> None:
    trained = trained_views(views_cache, dataset, tmp_path, epochs=4)
    assert sorted(trained) == list(range(IMAGES)) and all(len(views) == 4 for views in trained.values())
    # K = 3 over 4 epochs: the view changes with the epoch (an image kept on one view would be P = 1/27 each).
    assert sum(len(set(views)) > 1 for views in trained.values()) >= IMAGES // 2
    assert len({view for views in trained.values() for view in views}) == VIEWS


def test_with_one_stored_view_an_image_is_always_trained_on_it(dataset: Any, tmp_path: Path) -> None:
    cache = write_cache(sharp_teacher(), dataset, tmp_path / "targets", views=1)
    trained = trained_views(cache, dataset, tmp_path / "out", epochs=3)
    assert trained == {identity: [0, 0, 0] for identity in range(IMAGES)}


# ----------------------------------------------------------------------------------------------
# 6. Refusals before training, through the recipe
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_caches(root: Path, teacher_dir: Path, data_args: DataArguments) -> dict[str, Path]:
    """Caches written by build_target_cache (recipes/cache_teacher.py): 3 float16 views with attention rows,
    and 1 float32 view without them."""
    caches = {
        "targets": {"views_per_image": VIEWS},
        "no-attention": {"views_per_image": 1, "cache_dtype": "float32", "with_attention": False},
    }
    for name, settings in caches.items():
        arguments = CacheArguments(teacher_name_or_path=str(teacher_dir), output_dir=str(root / name), **settings)
        arguments.num_workers = 0
        build_target_cache(arguments, data_args)
    return {name: root / name for name in caches}


def recipe_argv(cache: Path, student: Path, images: str, out: Path, *more: str) -> list[str]:
    """``recipes/distill.py`` from ``cache``: one step of 4 of ``images`` for the tiny student config."""
    argv = ["--teacher_targets", str(cache), "--student_name_or_path", str(student), *QUICK, "--train_dir", images]
    return [*argv, "--max_steps", "1", "--per_device_train_batch_size", "4", "--output_dir", str(out), *more]


REFUSALS = {
    "another image size": (
        ["--image_size", "48"],
        "The teacher-target cache holds 32 px views; this run crops 48 px",
    ),
    "another teacher too": (
        ["--teacher_name_or_path", "facebook/dino-vits16"],
        "--teacher_name_or_path facebook/dino-vits16 is not the teacher of the cache --teacher_targets",
    ),
    "gpu augmentation": (["--gpu_augment", "true"], "--teacher_targets: each image is trained on one of its stored"),
    "no augmentation": (["--train_augmentation", "none"], "--teacher_targets: each image is trained on one of its"),
    "another teacher precision": (
        ["--teacher_dtype", "bfloat16"],
        "--teacher_dtype bfloat16: the teacher-target cache was made with the teacher's weights in float32",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_cache_that_does_not_fit_is_refused_before_training(
    case: str,
    recipe_caches: dict[str, Path],
    student_dir: Path,
    data_args: DataArguments,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags, message = REFUSALS[case]
    student = student_dir
    if case == "another image size":  # a student of 48 px: the cache's image size is what does not fit
        student = tmp_path / "student48"
        build_student(
            "vit-tiny-patch16", image_size=48, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
        ).config.save_pretrained(student)
    out = tmp_path / "new" / "out"
    argv = recipe_argv(recipe_caches["targets"], student, data_args.train_dir, out, *flags)
    status, line = distill_refusal([*argv, "--cache_dir", data_args.cache_dir], capsys)
    assert status == 2 and line.startswith("error: ") and message in line, line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("unset", [[], ["--teacher_name_or_path", "", "--teacher_targets", ""]])
def test_neither_a_teacher_nor_a_cache_is_refused(unset: list[str], student_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["--student_name_or_path", str(student_dir), *QUICK, "--train_dir", str(tmp_path), "--output_dir"]
    status, line = distill_refusal([*argv, str(tmp_path / "out"), *unset], capsys)
    assert status == 2 and "Give the teacher (--teacher_name_or_path) or its stored targets (--teacher_targets)" in line
    assert not (tmp_path / "out").exists()


def test_an_empty_teacher_on_the_command_line_unsets_the_configs_beside_a_cache() -> None:
    arguments = DistillModelArguments(teacher_name_or_path="", teacher_targets="me/targets", student_name_or_path="")
    assert (arguments.teacher_name_or_path, arguments.student_name_or_path) == (None, None)
    assert arguments.teacher_targets == "me/targets"


def test_the_caches_own_teacher_and_its_sharding_may_be_named_beside_it_and_no_teacher_loads(
    recipe_caches: dict[str, Path],
    teacher_dir: Path,
    student_dir: Path,
    data_args: DataArguments,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run from a cache loaded a teacher")

    monkeypatch.setattr(pipeline, "load_run_teacher", no_teacher)
    out = tmp_path / "out"
    argv = recipe_argv(
        recipe_caches["targets"], student_dir, data_args.train_dir, out, "--cache_dir", data_args.cache_dir
    )
    # As a config for the teacher names it (and its sharding, which a run without a teacher ignores).
    distill_command([*argv, "--teacher_name_or_path", str(teacher_dir), "--teacher_sharding", "fsdp"])
    assert (out / "model.safetensors").is_file()


def test_a_cache_without_attention_rows_is_refused_for_attention_guidance_and_trains_without_it(
    recipe_caches: dict[str, Path], student_dir: Path, data_args: DataArguments, tmp_path: Path, capsys
) -> None:
    cache = recipe_caches["no-attention"]
    refused = recipe_argv(
        cache, student_dir, data_args.train_dir, tmp_path / "refused", "--cache_dir", data_args.cache_dir
    )
    status, line = distill_refusal(refused, capsys)
    assert status == 2 and "holds no attention rows" in line and "attn_loss_weight > 0" in line, line
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "trained"
    trained = recipe_argv(cache, student_dir, data_args.train_dir, out, "--cache_dir", data_args.cache_dir)
    distill_command([*trained, "--attn_loss_weight", "0"])
    assert (out / "model.safetensors").is_file()


def another_folders_images(root: Path) -> Path:
    """12 other images in the same layout (the same file names, other pixels): index for index, the cache
    has an entry for each, but of another image."""
    folder = root / "other-images"
    if not folder.exists():
        write_image_folder(folder, per_class=4, classes=3, size=44)
    return folder


@pytest.mark.parametrize("other", ["other images", "one image more"])
def test_a_cache_of_other_images_is_refused_before_training_in_one_line_leaving_no_output(
    other: str,
    recipe_caches: dict[str, Path],
    student_dir: Path,
    data_args: DataArguments,
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started with a cache of other images")

    monkeypatch.setattr(AttnDistillTrainer, "train", too_late)
    if other == "other images":
        images, message = another_folders_images(root), "Image 0 of the training data is another image than the cache's"
    else:
        images = tmp_path / "images"
        shutil.copytree(data_args.train_dir, images)
        shutil.copy(images / "class0" / "0.png", images / "class0" / "extra.png")
        message = f"The training data has {IMAGES + 1} images; the teacher-target cache was made from {IMAGES}"
    argv = recipe_argv(recipe_caches["targets"], student_dir, str(images), tmp_path / "new" / "out")
    status, line = distill_refusal([*argv, "--cache_dir", str(tmp_path / "hf")], capsys)
    assert status == 2 and message in line, line
    assert not (tmp_path / "new").exists()


def test_other_images_past_the_probed_ones_are_refused_at_their_batch_in_one_line_leaving_no_output(
    recipe_caches: dict[str, Path], student_dir: Path, data_args: DataArguments, tmp_path: Path, capsys
) -> None:
    """check_cache_covers compares the count and the first 8 images before training; an image changed after
    those is found by the collator, at the first batch that holds it (here within the first epoch)."""
    images = tmp_path / "images"
    shutil.copytree(data_args.train_dir, images)
    write_image_folder(tmp_path / "other", per_class=4, classes=3, size=44)
    shutil.copytree(tmp_path / "other" / "class2", images / "class2", dirs_exist_ok=True)  # images 8-11
    argv = recipe_argv(recipe_caches["targets"], student_dir, str(images), tmp_path / "new" / "out")
    status = distill_exit_status([*argv, "--cache_dir", str(tmp_path / "hf"), "--max_steps", "3"])
    # Refused mid-run, its one line follows the training progress bar's (on the same line of the terminal).
    errors = [line.split("error: ", 1)[1] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert status == 2 and len(errors) == 1, errors
    assert re.match(r"Example (8|9|10|11) is another image than the one the teacher-target cache", errors[0]), errors
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------
# 7. The card
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_card_names_the_cache_and_the_student_loads(
    recipe_caches: dict[str, Path], student_dir: Path, data_args: DataArguments, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = recipe_argv(
        recipe_caches["targets"], student_dir, data_args.train_dir, out, "--cache_dir", data_args.cache_dir
    )
    result = distill_command([*argv, "--eval_dir", data_args.train_dir, "--max_steps", "2"])
    card = (out / "README.md").read_text()
    teacher = card.split("## Teacher", 1)[1].split("##", 1)[0]
    assert teacher.strip().startswith("`teacher`, with its weights in float32. It did not run during this student")
    assert "the teacher-target cache `targets`" in teacher
    assert f"{VIEWS} recorded view(s) of each of {IMAGES} images at {IMAGE_SIZE} px" in teacher
    assert "targets stored as float16" in teacher
    assert str(Path(data_args.train_dir).parent) not in card  # local paths are published by name only
    # No teacher ran: no attention figure of evaluation images; the k-NN results are there.
    assert not (out / "attention_maps.png").exists() and "attention_maps.png" not in card
    assert result.student.knn and "| k-NN top-1 (k=10) |" in card
    student = AutoModel.from_pretrained(out)
    assert type(student).__name__ == "ViTModel"
    trained = {name: value for name, value in student.state_dict().items() if not name.startswith("pooler.")}
    initial = build_student(config=student.config, seed=42).state_dict()
    assert any(not torch.equal(value, initial[name]) for name, value in trained.items())
