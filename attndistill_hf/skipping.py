"""Batches a run skips, and why: a student's non-finite loss, a batch without a readable image.

A skipped batch still runs a forward and backward (a zero surrogate over the trainable parameters), so
that every DDP rank takes part in every collective; a student every batch of whose accumulation window
was skipped gets no update at all (:func:`drop_empty_updates`). :class:`SkipTracker` counts the skips
and stops the run when too many come in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps whose loss was NaN or infinite."""


class UnreadableDataError(ValueError):
    """Raised when the training data yield no readable image: in too many batches in a row, or in the whole run."""


def zero_surrogate(parameters: Iterable[nn.Parameter], like: torch.Tensor) -> torch.Tensor:
    """A zero loss over the trainable ``parameters``: exact zero gradients, and DDP's reducer sees every one.

    Backpropagating ``0 * NaN`` would still poison the gradients.
    """
    return sum((p.sum() * 0.0 for p in parameters if p.requires_grad), like.new_zeros(()))


def who(name: str | None) -> str:
    return f"student {name!r}" if name else "the student"


class SkipTracker:
    """Skipped batches of a run, per student (``None``: the single student): in the current accumulation
    window, in a row, in all; and the batches without a readable image, in a row and in all."""

    def __init__(self, names: Iterable[str | None], max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.window: set[str | None] = set()
        self.consecutive_nonfinite = dict.fromkeys(names, 0)
        self.nonfinite_by_student = dict.fromkeys(self.consecutive_nonfinite, 0)
        self.consecutive_unreadable = 0
        self.unreadable_batches = 0
        self.readable_batches = 0
        self.skipped_images = 0

    @property
    def nonfinite_steps(self) -> int:
        """Batches skipped for a NaN/inf loss, summed over the students."""
        return sum(self.nonfinite_by_student.values())

    def finite(self, name: str | None) -> None:
        self.consecutive_nonfinite[name] = 0

    def nonfinite(self, name: str | None, bad_loss: torch.Tensor, step: int) -> None:
        """Count a batch of student ``name`` whose loss is NaN/inf; stop after too many in a row."""
        self.window.add(name)
        self.nonfinite_by_student[name] += 1
        self.consecutive_nonfinite[name] += 1
        logger.warning(
            "Skipping a batch of %s with a non-finite loss (%s); %d skipped so far.",
            who(name),
            bad_loss.item(),
            self.nonfinite_by_student[name],
        )
        if self.consecutive_nonfinite[name] >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite[name]} consecutive steps of {who(name)} had a NaN/inf loss (step "
                f"{step}). Lower the learning rate, use bf16 instead of fp16, or resume from the last checkpoint."
            )

    def readable(self) -> None:
        self.consecutive_unreadable = 0
        self.readable_batches += 1

    def unreadable(self, step: int) -> None:
        """Count a batch in which no image could be decoded, skipped for every student; stop after too many."""
        self.window |= set(self.consecutive_nonfinite)
        self.unreadable_batches += 1
        self.consecutive_unreadable += 1
        logger.warning("Skipping a batch without a readable image; %d unreadable images so far.", self.skipped_images)
        if self.consecutive_unreadable >= self.max_consecutive:
            raise UnreadableDataError(
                f"{self.consecutive_unreadable} batches in a row held no readable image ({self.skipped_images} "
                f"unreadable images so far, step {step}): check that the training data are images in a format "
                "PIL reads."
            )

    def take_window(self) -> set[str | None]:
        """The students skipped in the accumulation window that just ended (and a fresh window)."""
        skipped, self.window = self.window, set()
        return skipped

    def check_some_batch_was_readable(self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Stop a run none of whose batches so far held a readable image on any process, before it writes a
        checkpoint or exports a student that learnt nothing."""
        counts = torch.tensor([self.readable_batches, self.unreadable_batches, self.skipped_images])
        readable, unreadable, images = sum_over_processes(counts).tolist()
        if unreadable and not readable:
            raise UnreadableDataError(
                f"No training batch held a readable image: {images} unreadable images in {unreadable} batches. "
                "Check that the training data are images in a format PIL reads."
            )


def drop_empty_updates(
    members: Mapping[str | None, nn.Module], skipped: set[str | None], *, has_scaler: bool, step: int
) -> None:
    """After the window's last backward: a student every batch of which was skipped gets no update at all.

    Zero gradients are not a skipped step: AdamW would still move the weights by its momentum and
    weight decay. Under DDP the gradients are already averaged here, so "all zero" (every rank skipped
    everything) is the same decision on every rank without another collective.
    """
    empty = []
    for name in sorted(skipped, key=str):
        params = [p for p in members[name].parameters() if p.grad is not None]
        if not any(bool(p.grad.any()) for p in params):
            empty.append((name, params))
    if not empty:
        return
    # With a grad scaler and nothing left to update, an inf makes it skip the step and hold the
    # learning-rate schedule, as for an fp16 overflow; otherwise the empty students' gradients are
    # removed, and torch optimizers leave a parameter without a gradient untouched.
    skip_whole_step = has_scaler and len(empty) == len(members)
    for _name, params in empty:
        for param in params:
            if skip_whole_step:
                param.grad.fill_(float("inf"))
            else:
                param.grad = None
    names = ", ".join(repr(name) for name, _ in empty if name) or "the student"
    logger.warning("Every batch of this update was skipped for %s: no update at step %d.", names, step)
