"""DINO's weighted k-NN, and the callback that measures it during ``Trainer`` training.

- ``knn_accuracy``: cosine similarity, votes exp(sim / T), chunked over the test set so that ImageNet-size
  sets fit in memory.
- ``KNNEvaluationCallback``: k-NN top-1 of the model being trained, logged as ``eval_knn_top1``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..attention import unwrap_model
from ..validation import OPTIONAL_POSITIVE_INT, POSITIVE, POSITIVE_INT, check_value
from .features import FeatureKind, check_features, check_kind, num_classes_of, train_test_features

logger = logging.getLogger(__name__)

DEFAULT_KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
# Elements of one [chunk, num_train] similarity block when chunk_size is automatic: 2**27 float32 values
# (512 MiB), i.e. about 100 test images per chunk against ImageNet's 1.28M train features, as DINO does.
_KNN_SIMILARITY_BUDGET = 2**27


# --------------------------------------------------------------------------------------------------
# Weighted k-NN
# --------------------------------------------------------------------------------------------------


def knn_ks_used(ks: Sequence[int], num_train: int) -> dict[int, int]:
    """Each requested k and the k a memory bank of ``num_train`` features gives: ``min(k, num_train)``."""
    return {int(k): min(int(k), num_train) for k in ks}


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KNN_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """DINO's weighted k-NN: ``{k: {"top1": %, "top5": %}}`` for each k.

    Features are L2-normalised; each test feature's k most cosine-similar train features vote for their
    class with weight ``exp(sim / temperature)``; all classes are ranked by summed votes (DINO sorts the
    whole vote vector, so when fewer than 5 classes got votes, classes without votes fill the remaining
    ranks). Top-1 is the first ranked class, top-5 counts a hit in the first ``min(5, k)``, as DINO does.
    DINO leaves the order of equal votes to an unstable sort; here it is the class index (a stable sort),
    so results do not depend on the device. Results are keyed by the k actually used, in increasing order: a
    k larger than the train set votes with every train feature (with a warning) and is reported as
    ``k = num_train``, so that no result claims more neighbours than there were (requested ks that clip alike
    give one entry; :func:`knn_ks_used` maps each request to its k). Test features are processed in chunks of
    ``chunk_size`` rows (automatic: about 512 MiB of similarities) so ImageNet-size sets fit in memory;
    computation happens on ``train_features``' device.
    """
    check_features(train_features, train_labels, "train")
    check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Train features have dimension {train_features.shape[1]}, test features {test_features.shape[1]}."
        )
    check_value("ks", list(ks), POSITIVE_INT)
    check_value("temperature", temperature, POSITIVE)
    check_value("chunk_size", chunk_size, OPTIONAL_POSITIVE_INT)
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_train = train.shape[0]
    num_classes = num_classes_of(num_classes, train_labels, test_labels)

    used = knn_ks_used(ks, num_train)
    clipped = [str(k) for k, k_used in used.items() if k_used != k]
    if clipped:
        verb = "exceeds" if len(clipped) == 1 else "exceed"
        warnings.warn(
            f"k={', '.join(clipped)} {verb} the {num_train} train features; k={num_train} is reported instead.",
            stacklevel=2,
        )
    effective = sorted(set(used.values()))
    max_k = effective[-1]
    if chunk_size is None:
        chunk_size = max(1, _KNN_SIMILARITY_BUDGET // num_train)

    top1 = dict.fromkeys(effective, 0)
    top5 = dict.fromkeys(effective, 0)
    num_test = test_features.shape[0]
    starts = range(0, num_test, chunk_size)
    for start in tqdm(starts, desc="k-NN", disable=not progress, unit="chunk"):
        queries = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        targets = test_labels[start : start + chunk_size].to(device=device, dtype=torch.long)
        similarity = queries @ train.T
        sims, indices = similarity.topk(max_k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[indices]
        weights = (sims / temperature).exp()
        for k in effective:
            votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            ranked = votes.sort(dim=1, descending=True, stable=True).indices[:, : min(5, k)]
            hits = ranked == targets[:, None]
            top1[k] += int(hits[:, 0].sum())
            top5[k] += int(hits.any(dim=1).sum())
    return {k: {"top1": 100.0 * top1[k] / num_test, "top5": 100.0 * top5[k] / num_test} for k in effective}


# --------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------


def default_feature_model(model: nn.Module) -> nn.Module:
    """The backbone to evaluate inside a training wrapper: unwraps DDP / compile and a ``student`` attribute."""
    model = unwrap_model(model)
    student = getattr(model, "student", None)
    if isinstance(student, nn.Module) and hasattr(student, "config"):
        return student
    return model


class KNNEvaluationCallback(TrainerCallback):
    """k-NN top-1 of the model being trained, every ``every_n_steps`` steps and at the end of training.

    Logged as ``eval_knn_top1`` (configurable) so training curves show it next to the loss. Attach with
    ``callback.attach(trainer)``: values then go through ``trainer.log`` (``state.log_history`` plus every
    reporting integration). Added with ``Trainer(callbacks=[...])`` alone, the callback has no trainer and
    appends ``{"eval_knn_top1", "epoch", "step"}`` to ``state.log_history`` itself (the history saved in
    checkpoints and ``trainer_state.json``). The model's train/eval modes are restored afterwards.

    ``train_labels`` / ``test_labels`` replace the labels of the loaders (for loaders that yield only
    pixels). A memory bank smaller than ``k`` votes with all of its features (``knn_accuracy`` warns). Each
    process evaluates on the full loaders unless an ``accelerator`` that prepared them is given, in which case
    features are gathered across processes.
    """

    def __init__(
        self,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any],
        *,
        every_n_steps: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        kind: FeatureKind = "cls",
        train_labels: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
        num_classes: int | None = None,
        at_train_end: bool = True,
        metric_name: str = "eval_knn_top1",
        feature_model: Callable[[nn.Module], nn.Module] = default_feature_model,
        accelerator: Any | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> None:
        check_value("every_n_steps", every_n_steps, OPTIONAL_POSITIVE_INT)
        check_value("k", k, POSITIVE_INT)
        check_kind(kind)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.every_n_steps, self.k, self.temperature, self.kind = every_n_steps, k, temperature, kind
        self.train_labels, self.test_labels, self.num_classes = train_labels, test_labels, num_classes
        self.at_train_end, self.metric_name = at_train_end, metric_name
        self.feature_model, self.accelerator, self.dtype, self.progress = feature_model, accelerator, dtype, progress
        self.trainer: Any | None = None
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None

    def attach(self, trainer: Any) -> KNNEvaluationCallback:
        """Register with ``trainer`` and log through ``trainer.log`` (reaches TensorBoard, W&B, ...)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def evaluate(self, model: nn.Module) -> float:
        """k-NN top-1 (percent) of ``model`` (unwrapped with ``feature_model``) on the held-out loaders."""
        backbone = self.feature_model(model)
        (train_features, train_labels), (test_features, test_labels) = train_test_features(
            backbone,
            self.train_loader,
            self.test_loader,
            self.kind,
            None,  # the model changes between evaluations: nothing to cache
            accelerator=self.accelerator,
            dtype=self.dtype,
            progress=self.progress,
        )
        if self.train_labels is not None:
            train_labels = torch.as_tensor(self.train_labels)
        if self.test_labels is not None:
            test_labels = torch.as_tensor(self.test_labels)
        for name, labels in (("train", train_labels), ("test", test_labels)):
            if labels.numel() and labels.min() < 0:
                raise ValueError(
                    f"The k-NN {name} loader yields no labels; give {name}_labels= to KNNEvaluationCallback."
                )
        (score,) = knn_accuracy(
            train_features,
            train_labels,
            test_features,
            test_labels,
            ks=(self.k,),
            temperature=self.temperature,
            num_classes=self.num_classes,
        ).values()
        return score["top1"]

    def _log(self, state: TrainerState, control: TrainerControl, model: nn.Module | None) -> None:
        if model is None:
            raise ValueError("KNNEvaluationCallback received no model from the Trainer.")
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        value = self.evaluate(model)
        self.history.append({self.metric_name: value, "step": state.global_step})
        if self.trainer is not None:
            # trainer.log runs the on_log event, whose handler clears control.should_log; keep the flags
            # other callbacks set for this step (e.g. the regular loss logging) intact.
            flags = (control.should_log, control.should_evaluate, control.should_save)
            self.trainer.log({self.metric_name: value})
            control.should_log, control.should_evaluate, control.should_save = flags
        else:
            entry: dict[str, float] = {self.metric_name: value}
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            state.log_history.append({**entry, "step": state.global_step})
        logger.info("step %d: %s = %.2f", state.global_step, self.metric_name, value)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.every_n_steps and state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            self._log(state, control, kwargs.get("model"))
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.at_train_end:
            self._log(state, control, kwargs.get("model"))
        return control
