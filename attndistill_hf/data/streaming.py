"""Per-rank streaming: each rank's own shards, the same number of steps on every rank, DataLoader workers.

Every rank reads its own shards (``split_dataset_by_node``), shuffles with the same seed (so shard
assignment agrees across ranks) and is truncated or cycled to the same number of batches
(:class:`EqualStepsIterable`): a rank that ran out early would leave the others blocked in a collective
forever.

Per-rank streaming and Accelerate: by default Accelerate dispatches an iterable dataset from rank 0
(``dispatch_batches=True``) and, when told not to, re-shards it itself. Both defeat per-rank shards, so a
trainer that streams turns dispatching off (``AttnDistillConfig`` sets ``dispatch_batches: False``) and
wraps its DataLoader with :func:`prepare_per_rank_dataloader` instead of ``accelerator.prepare``.

Epochs: ``Trainer`` calls ``set_epoch`` on the prepared DataLoader at the start of each epoch, and
Accelerate forwards it to the dataset; :class:`EqualStepsIterable` passes it on to the streamed dataset,
whose shuffle order (buffer and shard order) then changes. The epoch lives in shared memory, so it also
reaches persistent DataLoader workers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch


def steps_per_epoch(num_examples: int, world_size: int, per_device_batch: int, *, drop_last: bool = True) -> int:
    """Batches every rank runs in one epoch, the same on all ranks.

    ``drop_last=True`` leaves out the remainder that does not fill a global batch (``world_size x
    per_device_batch``); ``False`` rounds up and the ranks repeat a few examples to fill the last one.
    """
    for name, value in (
        ("num_examples", num_examples),
        ("world_size", world_size),
        ("per_device_batch", per_device_batch),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    global_batch = world_size * per_device_batch
    steps = num_examples // global_batch if drop_last else math.ceil(num_examples / global_batch)
    if steps == 0:
        raise ValueError(
            f"{num_examples} examples do not fill one global batch of {global_batch} "
            f"({world_size} ranks x {per_device_batch}); lower the batch size or pass drop_last=False"
        )
    return steps


def shard_stream(
    ds: Any, *, rank: int, world_size: int, seed: int, buffer_size: int = 10_000, shuffle: bool = True
) -> Any:
    """This rank's part of a streamed dataset, shuffled with a seed common to all ranks.

    ``split_dataset_by_node`` gives each rank whole shards when their number divides by ``world_size``,
    else every ``world_size``-th example of all shards; both are disjoint and cover everything. The seed
    must be the same on every rank: the shard order it draws decides which shards a rank gets.
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if not isinstance(ds, IterableDataset):
        raise TypeError(f"shard_stream expects a streamed datasets.IterableDataset, got {type(ds).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    if shuffle and buffer_size < 1:
        raise ValueError(f"buffer_size must be positive, got {buffer_size}")
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if shuffle:
        ds = ds.shuffle(seed=seed, buffer_size=buffer_size)
    return ds


class EqualStepsIterable(torch.utils.data.IterableDataset):
    """Yields exactly ``steps x per_device_batch`` examples of a stream, in whole batches per worker.

    Ranks' shards rarely hold the same number of examples; a rank that stops early leaves the others
    waiting in a collective. This wrapper cuts a long stream and cycles a short one (the repeats are
    this rank's own examples, in the same order), so every rank yields ``steps`` batches. With
    DataLoader workers the batches are divided among the workers that own shards (the stream gives
    workers beyond ``num_shards`` nothing), whole batches each, so no partial batch appears.

    ``len()`` is known, so ``Trainer`` can count epochs. ``set_epoch`` is forwarded to the stream.
    """

    def __init__(self, dataset: Any, steps: int, per_device_batch: int) -> None:
        super().__init__()
        if steps < 1 or per_device_batch < 1:
            raise ValueError(f"steps and per_device_batch must be positive, got {steps} and {per_device_batch}")
        self.dataset = dataset
        self.steps = steps
        self.per_device_batch = per_device_batch
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps * self.per_device_batch

    @property
    def num_shards(self) -> int | None:
        """Shards of the wrapped stream for this rank (the useful maximum of DataLoader workers)."""
        return getattr(self.dataset, "num_shards", None)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the stream, which reseeds its shuffle with it."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _quota(self) -> int:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards = self.num_shards
        active = min(workers, shards) if shards else workers
        if worker >= active:
            return 0
        batches = self.steps // active + (1 if worker < self.steps % active else 0)
        return batches * self.per_device_batch

    def __iter__(self) -> Iterator[Any]:
        quota = self._quota()
        emitted = 0
        while emitted < quota:
            produced = 0
            for example in self.dataset:
                yield example
                produced += 1
                emitted += 1
                if emitted >= quota:
                    return
            if produced == 0:
                raise RuntimeError(
                    "The stream gave this rank/worker no examples, so it cannot fill its batches; use fewer "
                    "DataLoader workers (see dataloader_workers) or more shards"
                )


def dataloader_workers(ds: Any, requested: int) -> int:
    """DataLoader workers worth starting for ``ds``: a stream cannot feed more workers than it has shards.

    Warns and returns the shard count when ``requested`` exceeds it (the surplus workers would sit idle).
    """
    if requested < 0:
        raise ValueError(f"the number of workers cannot be negative, got {requested}")
    shards = getattr(ds, "num_shards", None)
    streamed = isinstance(ds, torch.utils.data.IterableDataset) or type(ds).__name__ == "IterableDataset"
    if streamed and shards and requested > shards:
        warnings.warn(
            f"{requested} DataLoader workers requested but this rank's stream has {shards} shard(s); "
            f"using {shards}. Write the data in more shards to read it with more workers.",
            stacklevel=2,
        )
        return shards
    return requested


def prepare_per_rank_dataloader(accelerator: Any, dataloader: torch.utils.data.DataLoader) -> Any:
    """Device placement for a DataLoader that already reads only this rank's data.

    ``accelerator.prepare`` would shard an iterable dataset again (``.shard`` or ``IterableDatasetShard``)
    and each rank would see a fraction of its own part. Preparing as a single process keeps the stream
    whole; the loader is still registered with the accelerator so that ``save_state`` knows it. RNG
    states are not synchronised: each rank draws its own augmentations.
    """
    from accelerate.data_loader import prepare_data_loader

    prepared = prepare_data_loader(
        dataloader,
        accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=accelerator.device_placement,
        rng_types=None,
        dispatch_batches=False,
        non_blocking=getattr(accelerator, "non_blocking", False),
        use_stateful_dataloader=getattr(accelerator, "use_stateful_dataloader", False),
    )
    registry = getattr(accelerator, "_dataloaders", None)
    if isinstance(registry, list):
        registry.append(prepared)
    return prepared
