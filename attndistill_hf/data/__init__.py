"""Training and evaluation images: sources, per-rank streaming, the published transforms, a robust collator.

Distillation needs no labels, only many images, read fast and never stopping a run. The design follows
from that:

* Images stay encoded in the dataset (``datasets.Image(decode=False)``) and are decoded in the collator,
  inside the DataLoader workers, where a corrupt file can be caught, skipped and counted. The count
  travels inside the batch (``skipped_images``) because workers are separate processes.
* Streaming (``--streaming``) reads shards as they come. Every rank reads its own shards, shuffles with
  the same seed and is truncated or cycled to the same number of batches, so that no rank leaves the
  others blocked in a collective.
* Augmentation is the published one: RandomResizedCrop(scale 0.2-1, bicubic) + flip + the teacher's
  normalisation; evaluation resizes to 256/224 of the crop and centre-crops.
* Every random choice of the training data is a function of the run's seed, the epoch and the example
  (:class:`ExampleKey`): the order of a map-style dataset (:class:`EpochShuffle`) and each example's view
  (:func:`view_seed`), so that a run resumed mid-epoch continues exactly, with any number of DataLoader
  workers. Each unreadable example is counted once (:class:`DistinctUnreadableLoader`).

The modules:

* :mod:`.sources`: ``DataArguments``, Hub / folder / shard sources, :func:`load_split`,
  :func:`count_examples` and the evaluation-view loader.
* :mod:`.streaming`: each rank's part of a stream, equal steps on every rank, keyed examples in a seeded
  order, the count of unreadable examples, DataLoader workers and device placement (what the trainer needs).
* :mod:`.decoding`: image bytes, files and PIL images to 8-bit RGB; None for what cannot be decoded.
* :mod:`.transforms`: the teacher's normalisation, the training and evaluation views, example keys and
  seeded views, :class:`ImageCollator`.
* :mod:`.gpu_augment`: the training view on the accelerator (``--gpu_augment``): workers collate encoded
  bytes (:class:`RawBytesCollator`), :class:`GpuAugment` decodes and augments the batch on the device.

The public names of all five are importable from here (``from attndistill_hf.data import load_split``).
"""

from .decoding import decode_image, to_rgb
from .gpu_augment import (
    GpuAugment,
    RawBytesCollator,
    center_crop_boxes,
    jpeg_frame,
    read_image_bytes,
    sample_crop_boxes,
)
from .sources import (
    DEFAULT_SUBSET_SEED,
    WEBDATASET_IMAGE_KEYS,
    WEBDATASET_LABEL_KEYS,
    DataArguments,
    check_hub_split,
    column_names,
    count_examples,
    eval_view_loader,
    load_split,
    require_label_column,
)
from .streaming import (
    DistinctUnreadableLoader,
    EpochShuffle,
    EqualStepsIterable,
    KeyedExamples,
    UnreadableTally,
    dataloader_workers,
    prepare_per_rank_dataloader,
    shard_stream,
    steps_per_epoch,
)
from .transforms import (
    EXAMPLE_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNREADABLE_IDS,
    ExampleKey,
    ImageCollator,
    derived_seed,
    eval_transform,
    example_id,
    image_stats,
    probe_train_transform,
    seeded_view,
    train_transform,
    view_seed,
)

__all__ = [
    "DEFAULT_SUBSET_SEED",
    "EXAMPLE_KEY",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "UNREADABLE_IDS",
    "WEBDATASET_IMAGE_KEYS",
    "WEBDATASET_LABEL_KEYS",
    "DataArguments",
    "DistinctUnreadableLoader",
    "EpochShuffle",
    "EqualStepsIterable",
    "ExampleKey",
    "GpuAugment",
    "ImageCollator",
    "KeyedExamples",
    "RawBytesCollator",
    "UnreadableTally",
    "center_crop_boxes",
    "check_hub_split",
    "column_names",
    "count_examples",
    "dataloader_workers",
    "decode_image",
    "derived_seed",
    "eval_transform",
    "eval_view_loader",
    "example_id",
    "image_stats",
    "jpeg_frame",
    "load_split",
    "prepare_per_rank_dataloader",
    "probe_train_transform",
    "read_image_bytes",
    "require_label_column",
    "sample_crop_boxes",
    "seeded_view",
    "shard_stream",
    "steps_per_epoch",
    "to_rgb",
    "train_transform",
    "view_seed",
]
