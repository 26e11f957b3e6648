"""Writing a teacher-target cache (see :mod:`attndistill_hf.target_cache` for what it holds and how runs read it).

:func:`cache_teacher_targets` runs the teacher over ``views_per_image`` recorded views of every image, in
batches, over any number of processes (each caches its share of the images and writes its own shards), with
a progress bar; :func:`build_target_cache` is everything ``recipes/cache_teacher.py`` does: refuse or resume
the output folder, load the teacher and the data, cache, write the info file last, push to the Hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from datasets.distributed import split_dataset_by_node
from torch import nn
from tqdm.auto import tqdm

from .config import TEACHER_DTYPES
from .data import DataArguments, load_split
from .data.decoding import decode_image
from .data.transforms import EXAMPLE_KEY, ExampleKey, TrainView, apply_train_view, draw_train_view, example_id
from .families import model_class_name, token_layout, unwrap_model
from .hub import push_output_dir
from .models import load_run_teacher, patch_grid
from .target_cache import (
    INFO_FILE,
    STORAGE_DTYPES,
    CacheInfo,
    CacheMismatchError,
    encode_attention,
    encode_targets,
    encoded_image,
    image_identity,
    shard_files,
    stored_view_seed,
    teacher_reference,
)
from .teacher import TeacherTargets, teacher_targets
from .validation import NON_NEGATIVE_INT, POSITIVE_INT, Bound, check_choice, check_fields, check_value

logger = logging.getLogger(__name__)

# Written when a cache starts: the settings an interrupted cache must be resumed with.
PENDING_FILE = ".attndistill_cache_pending.json"


@dataclass
class CacheArguments:
    """The teacher, the views and the output of a teacher-target cache (the data: ``DataArguments``)."""

    teacher_name_or_path: str = field(metadata={"help": "Teacher: a Hub id or a local model directory."})
    output_dir: str = field(metadata={"help": "Folder of the cache (a datasets dataset of parquet shards)."})
    views_per_image: int = field(default=4, metadata={"help": "Recorded views per image (K)."})
    cache_dtype: str = field(
        default="float16",
        metadata={"help": "Storage of the targets: float16, bfloat16 or float32.", "choices": list(STORAGE_DTYPES)},
    )
    teacher_dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the teacher's weights.", "choices": list(TEACHER_DTYPES)},
    )
    with_attention: bool = field(
        default=True, metadata={"help": "Store the CLS-attention rows (off: for projector-only students)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the recorded views."})
    batch_size: int = field(default=64, metadata={"help": "Views per teacher forward, per process."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers decoding images, per process."})
    shard_images: int = field(default=1024, metadata={"help": "Images per parquet shard (the unit of resuming)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the teacher's Hub repo."})
    push_to_hub: bool = field(default=False, metadata={"help": "Publish the cache as a Hub dataset repo."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "The dataset repo to push to."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the dataset repo private."})

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "views_per_image": POSITIVE_INT,
                "batch_size": POSITIVE_INT,
                "shard_images": POSITIVE_INT,
                "seed": Bound(integer=True, minimum=0, below=2**63),
                "num_workers": NON_NEGATIVE_INT,
            },
        )
        check_choice("--cache_dtype", self.cache_dtype, STORAGE_DTYPES)
        check_choice("--teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():  # found before the teacher loads
            raise ValueError(f"--output_dir {self.output_dir} is a file, not a folder.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id (e.g. your-name/dinov3-vit7b16-targets-in1k).")


CACHE_ARGUMENTS = (CacheArguments, DataArguments)


class ViewsCollator:
    """Decodes a batch of examples and makes ``views_per_image`` recorded views of each (in DataLoader workers)."""

    def __init__(self, info: CacheInfo, image_column: str) -> None:
        self.info = info
        self.image_column = image_column

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pixels, rows, unreadable = [], [], 0
        for example in examples:
            identity = example_id(example[EXAMPLE_KEY], example, self.image_column)
            encoded = encoded_image(example, self.image_column)
            digest = image_identity(example, self.image_column, encoded)
            image = decode_image(encoded)
            if image is None:
                unreadable += 1
                continue
            for view_index in range(self.info.views_per_image):
                view = draw_train_view(image, stored_view_seed(self.info.seed, identity, view_index))
                pixels.append(apply_train_view(image, view, self.info.image_size, self.info.mean, self.info.std))
                rows.append((identity, digest, view_index, view))
        size = self.info.image_size
        return {
            "pixel_values": torch.stack(pixels) if pixels else torch.empty(0, 3, size, size),
            "rows": rows,
            "unreadable": unreadable,
        }


def _written_identities(folder: Path) -> set[int]:
    """The examples already in complete shards of an interrupted cache."""
    files = shard_files(folder)
    if not files:
        return set()
    done = datasets.load_dataset("parquet", data_files=files, split="train", columns=["example"])
    return set(done["example"])


def _rank_examples(dataset: Any, seed: int, rank: int, world: int, done: set[int], image_column: str) -> Any:
    """This process's share of the examples not yet cached, each with its ``ExampleKey``."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        indices = [index for index in range(rank, len(dataset), world) if index not in done]
        return _KeyedSubset(dataset, indices, seed)
    stream = split_dataset_by_node(dataset, rank=rank, world_size=world)
    key = ExampleKey(seed, 0)

    def keyed(example: dict[str, Any]) -> dict[str, Any]:
        return {**example, EXAMPLE_KEY: key}

    return stream.map(keyed).filter(lambda example: example_id(key, example, image_column) not in done)


class _KeyedSubset(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, indices: list[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, indices, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        return {**self.dataset[index], EXAMPLE_KEY: ExampleKey(self.seed, 0, index)}


def _write_shard(rows: list[dict[str, Any]], info: CacheInfo, folder: Path, name: str) -> None:
    columns = {column: [row[column] for row in rows] for column in info.features()}
    table = datasets.Dataset.from_dict(columns, features=info.features())
    partial = folder / "data" / f".{name}.partial"
    table.to_parquet(str(partial))
    os.replace(partial, folder / "data" / name)  # a shard is in place whole or not at all


def cache_teacher_targets(
    teacher: nn.Module,
    dataset: Any,
    output_dir: str | os.PathLike[str],
    info: CacheInfo,
    *,
    image_column: str = "image",
    batch_size: int = 64,
    num_workers: int = 0,
    shard_images: int = 1024,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> CacheInfo:
    """Run ``teacher`` over ``info.views_per_image`` views of every image of ``dataset`` and write the cache.

    ``dataset`` is a map-style dataset or a stream of examples with an ``image_column``; each of
    ``world_size`` processes caches its share (``rank``) and ``sum_over_processes`` (a collective, needed with
    several) adds up their counts, after which the process of rank 0 writes the info file. An interrupted
    cache resumes: images already in a complete shard are skipped. Returns the info as written.
    """
    check_value("views_per_image", info.views_per_image, POSITIVE_INT)
    check_value("batch_size", batch_size, POSITIVE_INT)
    check_value("shard_images", shard_images, POSITIVE_INT)
    if (info.keyed_by == "index") != (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(f"CacheInfo.keyed_by {info.keyed_by!r}: map-style data is keyed by index, a stream by image.")
    teacher.eval()  # a frozen teacher in inference mode, whatever the caller left it in
    folder = Path(output_dir)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    done = _written_identities(folder)
    examples = _rank_examples(dataset, info.seed, rank, world_size, done, image_column)
    images_per_batch = max(1, batch_size // info.views_per_image)
    loader = torch.utils.data.DataLoader(
        examples, batch_size=images_per_batch, num_workers=num_workers, collate_fn=ViewsCollator(info, image_column)
    )
    serial = len(list((folder / "data").glob(f"train-{rank:05d}-*.parquet")))
    pending: list[dict[str, Any]] = []
    counts = torch.zeros(2, dtype=torch.long)  # cached images, unreadable images (this process)
    total = math.ceil(len(examples) / images_per_batch) if hasattr(examples, "__len__") else None
    for batch in tqdm(loader, total=total, desc="teacher targets", disable=not progress or rank != 0):
        counts[1] += batch["unreadable"]
        if not batch["rows"]:
            continue
        targets = teacher_targets(teacher, batch["pixel_values"].to(device), with_attention=info.with_attention)
        pending += _rows(batch["rows"], targets, info)
        counts[0] += len(batch["rows"]) // info.views_per_image
        if len(pending) >= shard_images * info.views_per_image:
            _write_shard(pending, info, folder, f"train-{rank:05d}-{serial:05d}.parquet")
            pending, serial = [], serial + 1
    if pending:
        _write_shard(pending, info, folder, f"train-{rank:05d}-{serial:05d}.parquet")
    if sum_over_processes is not None:
        counts = sum_over_processes(counts)  # also waits for every process's last shard
    if rank == 0:
        info.num_images = len(_written_identities(folder))
        info.unreadable_images = int(counts[1])
        write_dataset_card(folder, info)
        info.save(folder)
    return info


def _rows(rows: list[tuple[int, int, int, TrainView]], targets: TeacherTargets, info: CacheInfo) -> list[dict]:
    cls = encode_targets(targets.cls, info.storage_dtype)
    attention = encode_attention(targets.attention, info.storage_dtype) if targets.attention is not None else None
    out = []
    for position, (identity, digest, view_index, view) in enumerate(rows):
        row = {
            "example": identity,
            "image": digest,
            "view": view_index,
            "crop": [view.top, view.left, view.height, view.width],
            "flip": view.flip,
            "cls": cls[position],
        }
        if attention is not None:
            row["attention"] = attention[position]
        out.append(row)
    return out


def teacher_cache_info(
    teacher: nn.Module,
    *,
    teacher_name: str,
    teacher_dtype: str,
    image_size: int,
    views_per_image: int,
    seed: int,
    storage_dtype: str,
    mean: Sequence[float],
    std: Sequence[float],
    dataset: str,
    keyed_by: str = "index",
    with_attention: bool = True,
) -> CacheInfo:
    """The :class:`CacheInfo` of a cache of ``teacher`` (its patch grid at ``image_size``, heads, tokens)."""
    check_choice("--cache_dtype", storage_dtype, STORAGE_DTYPES)
    plain = unwrap_model(teacher)
    grid = patch_grid(plain, image_size)
    layout = token_layout(plain)
    config = plain.config
    return CacheInfo(
        teacher=teacher_reference(teacher_name),
        teacher_revision=getattr(config, "_commit_hash", None),
        teacher_class=model_class_name(plain),
        teacher_dtype=teacher_dtype,
        teacher_config=config.to_dict(),
        hidden_size=int(config.hidden_size),
        heads=int(config.num_attention_heads) if with_attention else None,
        image_size=image_size,
        patch_grid=list(grid),
        tokens_dropped=layout.leading - 1 + layout.trailing,
        keyed_by=keyed_by,
        views_per_image=views_per_image,
        seed=seed,
        storage_dtype=storage_dtype,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        dataset=dataset,
    )


def write_dataset_card(folder: Path, info: CacheInfo) -> None:
    """The cache's dataset card: what it holds, how it was made, how to use it."""
    attention = (
        f"its last-layer CLS-attention row of every head (`attention`, {info.heads} x {info.keys}: the CLS key, then "
        f"the {info.patch_grid[0]} x {info.patch_grid[1]} patches in raster order; {info.tokens_dropped} other "
        "token(s) dropped and each row renormalised)"
        if info.with_attention
        else "no attention rows (a cache for students trained without attention guidance)"
    )
    # No `configs` with data_files patterns: datasets would key its Arrow copy of the folder by the patterns and the
    # folder's name alone, so load_dataset(PATH) of another cache of that name would read this one's stale copy;
    # without them it finds data/train-*.parquet itself and keys the copy by the files' paths and times.
    text = f"""---
tags:
- attndistill
- teacher-targets
---
# Teacher targets of `{info.teacher}`

The outputs of the teacher `{info.teacher}` ({info.teacher_class}, weights in {info.teacher_dtype}) for
{info.views_per_image} recorded training view(s) of each of {info.num_images} images of `{info.dataset}`, at
{info.image_size} px, for distilling students without running the teacher (AttnDistill, `--teacher_targets`).

Each row is one view: `example` (the image's identity in its dataset), `image` (a digest of its encoded
image), `view`, the view's `crop` box (top, left, height, width, in the decoded image's pixels) and
`flip`, the teacher's CLS target (`cls`, {info.hidden_size} values, after its final norm) and {attention}.
Targets are stored as {info.storage_dtype}. The views are those of the published augmentation
(RandomResizedCrop scale 0.2-1, bicubic, horizontal flip 0.5), normalised with mean {info.mean} and std
{info.std}. `{INFO_FILE}` holds every setting.
"""
    (folder / "README.md").write_text(text)


def _check_output_folder(folder: Path, info: CacheInfo) -> bool:
    """Whether the cache in ``folder`` is already complete with these settings; refuse a folder it cannot use.

    An empty or missing folder starts a cache; one with the pending settings of these arguments resumes it;
    anything else (another cache's settings, unrelated files) is refused, never mixed.
    """
    settings = json.loads(json.dumps(asdict(info)))  # as the files hold them (lists, not tuples)
    if (folder / INFO_FILE).is_file():
        done = asdict(CacheInfo.load(folder))
        ignored = ("num_images", "unreadable_images")
        if any(done[name] != value for name, value in settings.items() if name not in ignored):
            raise CacheMismatchError(f"{folder} holds a complete cache of other settings; choose another --output_dir.")
        return True
    pending = folder / PENDING_FILE
    if pending.is_file():
        if json.loads(pending.read_text()) != settings:
            raise CacheMismatchError(
                f"{folder} holds an interrupted cache of other settings; resume it with its own arguments, or choose "
                "another --output_dir."
            )
    elif folder.is_dir() and any(folder.iterdir()):
        raise CacheMismatchError(f"--output_dir {folder} exists and is not a teacher-target cache; choose another.")
    return False


def build_target_cache(cache_args: CacheArguments, data_args: DataArguments) -> CacheInfo:
    """Everything ``recipes/cache_teacher.py`` does: a complete cache in ``cache_args.output_dir`` (resumed when it
    was interrupted), on every process of the launch, then pushed to the Hub when asked."""
    # On a machine without an accelerator, accelerate counts the processes of a launch only when told it runs on
    # the CPU: otherwise each process would think itself alone and cache every image.
    state = PartialState(cpu=not torch.accelerator.is_available())
    teacher, mean, std = load_run_teacher(
        cache_args.teacher_name_or_path, cache_args.teacher_dtype, trust_remote_code=cache_args.trust_remote_code
    )
    info = teacher_cache_info(
        teacher,
        teacher_name=cache_args.teacher_name_or_path,
        teacher_dtype=cache_args.teacher_dtype,
        image_size=data_args.image_size,
        views_per_image=cache_args.views_per_image,
        seed=cache_args.seed,
        storage_dtype=cache_args.cache_dtype,
        mean=mean,
        std=std,
        dataset=data_args.source_name,
        keyed_by="image" if data_args.streaming else "index",
        with_attention=cache_args.with_attention,
    )
    folder = Path(cache_args.output_dir)
    complete = _check_output_folder(folder, info)
    state.wait_for_everyone()  # every process checked the folder before the first one writes into it
    if complete:
        logger.warning("%s is a complete cache of these settings: nothing to do.", folder)
        info = CacheInfo.load(folder)
    else:
        dataset = load_split(data_args, "train", seed=cache_args.seed)  # data it cannot read leaves no folder behind
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PENDING_FILE).write_text(json.dumps(asdict(info)))
        state.wait_for_everyone()
        info = cache_teacher_targets(
            teacher.to(state.device),
            dataset,
            folder,
            info,
            image_column=data_args.image_column,
            batch_size=cache_args.batch_size,
            num_workers=cache_args.num_workers,
            shard_images=cache_args.shard_images,
            device=state.device,
            rank=state.process_index,
            world_size=state.num_processes,
            sum_over_processes=(lambda counts: reduce(counts.to(state.device), "sum").cpu())
            if state.num_processes > 1
            else None,
        )
        if state.is_main_process:
            (folder / PENDING_FILE).unlink()
    if cache_args.push_to_hub and state.is_main_process:
        push_output_dir(
            folder,
            cache_args.hub_dataset_id,
            private=cache_args.hub_private_repo,
            repo_type="dataset",
            commit_message="Upload AttnDistill teacher targets",
            ignore_patterns=[PENDING_FILE],
        )
    return info
