"""Per-rank streaming, reproducible training examples, DataLoader workers: what the trainer's data loading needs.

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

Reproducible examples: a training example can carry its :class:`~.transforms.ExampleKey` (the run's seed,
the epoch, its index in a map-style dataset), from which the collator seeds its view. A map-style dataset
is read through :class:`KeyedExamples` in the order of :class:`EpochShuffle`, a function of (seed, epoch)
alone; a stream through :meth:`EqualStepsIterable.with_example_keys`. Resumed mid-epoch, a run then sees
the same remaining batches and views as a run that was never interrupted. :class:`DistinctUnreadableLoader`
counts each unreadable example once, however often the epochs (and ranks) read it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..validation import NON_NEGATIVE_INT, POSITIVE_INT, check_value
from .transforms import EXAMPLE_KEY, UNREADABLE_IDS, ExampleKey, derived_seed


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
        check_value(name, value, POSITIVE_INT)
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
    if shuffle:
        check_value("buffer_size", buffer_size, POSITIVE_INT)
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
    :meth:`with_example_keys` gives the stream whose examples carry their :class:`~.transforms.ExampleKey`.
    """

    def __init__(self, dataset: Any, steps: int, per_device_batch: int) -> None:
        super().__init__()
        check_value("steps", steps, POSITIVE_INT)
        check_value("per_device_batch", per_device_batch, POSITIVE_INT)
        self.dataset = dataset
        self.steps = steps
        self.per_device_batch = per_device_batch
        self.example_seed: int | None = None
        # In shared memory, so that set_epoch also reaches persistent DataLoader workers (they read it to
        # key the examples of each epoch).
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return self.steps * self.per_device_batch

    @property
    def num_shards(self) -> int | None:
        """Shards of the wrapped stream for this rank (the useful maximum of DataLoader workers)."""
        return getattr(self.dataset, "num_shards", None)

    @property
    def epoch(self) -> int:
        """The epoch the stream is in (set by :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the stream, which reseeds its shuffle with it."""
        self._epoch.fill_(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def with_example_keys(self, seed: int) -> EqualStepsIterable:
        """This stream (sharing its epoch) with every example carrying ``ExampleKey(seed, epoch)``.

        A streamed example has no index, and its position depends on how many DataLoader workers share
        the stream: the collator identifies it by its image (:func:`~.transforms.example_id`).
        """
        keyed = copy.copy(self)
        keyed.example_seed = seed
        return keyed

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
        key = None if self.example_seed is None else ExampleKey(self.example_seed, self.epoch)
        emitted = 0
        while emitted < quota:
            produced = 0
            for example in self.dataset:
                yield example if key is None else {**example, EXAMPLE_KEY: key}
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
    check_value("the number of workers", requested, NON_NEGATIVE_INT)
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


# --------------------------------------------------------------------------------------------------
# Map-style examples in a seeded order
# --------------------------------------------------------------------------------------------------


class KeyedExamples(torch.utils.data.Dataset):
    """A map-style dataset read by ``(epoch, index)`` pairs: each example comes with its ``ExampleKey``.

    :class:`EpochShuffle` yields the pairs, so the epoch travels with every index to the DataLoader workers
    (persistent ones too) and nothing in a worker has to be told the epoch.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return {**self.dataset[index], EXAMPLE_KEY: ExampleKey(self.seed, epoch, index)}

    def set_epoch(self, epoch: int) -> None:
        """The epoch that :class:`EpochShuffle` orders next."""
        self.epoch = epoch


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle of :class:`KeyedExamples` that is a function of (seed, epoch) alone, as ``(epoch, index)`` pairs.

    Every rank draws the same order (Accelerate's ``BatchSamplerShard`` gives each its batches), and a run
    resumed mid-epoch (Accelerate's ``SkipBatchSampler``) sees the batches an uninterrupted run sees after
    the same step. The epoch is kept by the dataset: Accelerate forwards ``set_epoch`` to the sampler or
    to the dataset depending on how the loader is wrapped (a loader resumed mid-epoch on several processes
    reaches only the dataset), and both must agree.
    """

    def __init__(self, examples: KeyedExamples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.examples.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.examples.epoch
        generator = torch.Generator().manual_seed(derived_seed("order", self.examples.seed, epoch))
        for index in torch.randperm(len(self.examples), generator=generator).tolist():
            yield epoch, index


# --------------------------------------------------------------------------------------------------
# Counting unreadable examples once
# --------------------------------------------------------------------------------------------------


class UnreadableTally:
    """The identities of the unreadable examples met so far, so that each is counted once.

    Under several processes, :meth:`count_new` gathers every rank's identities (a collective: every rank
    calls it for every batch) and an identity that no rank met before counts on the lowest rank that holds
    it: summed over the ranks, the counts give each unreadable example once, however many epochs and
    ranks read it again.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def count_new(self, identities: Sequence[int]) -> int:
        """How many of this rank's ``identities`` (one batch's) count here."""
        gathered: list[Sequence[int]] = [identities]
        rank = 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [()] * dist.get_world_size()
            dist.all_gather_object(gathered, list(identities))
            rank = dist.get_rank()
        count = 0
        for holder, part in enumerate(gathered):
            for identity in part:
                if identity not in self.seen:
                    self.seen.add(identity)
                    count += holder == rank
        return count


class DistinctUnreadableLoader:
    """A training DataLoader whose ``skipped_images`` count each unreadable example once.

    The collator lists the identities of a batch's unreadable examples (``unreadable_ids``); here, in the
    training process, that list is removed and ``skipped_images`` becomes the number of them that count
    as new (:class:`UnreadableTally`), so that an unreadable file that every epoch reads again is
    reported once. ``tally`` carries the count on from another loader (the one resumed mid-epoch).
    Everything else (length, ``set_epoch``, the sampler) is the wrapped loader's.
    """

    def __init__(self, loader: Any, tally: UnreadableTally | None = None) -> None:
        self.loader = loader
        self.tally = tally if tally is not None else UnreadableTally()

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        # Called only for what the wrapper itself lacks; "loader" is missing only while an instance is
        # being copied or unpickled, where forwarding would recurse.
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, dict) and UNREADABLE_IDS in batch:
                skipped = batch["skipped_images"]
                new = self.tally.count_new(batch.pop(UNREADABLE_IDS))
                batch["skipped_images"] = torch.tensor(new, dtype=skipped.dtype, device=skipped.device)
            yield batch
