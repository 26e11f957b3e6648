"""``AttnDistillTrainer``: a ``transformers.Trainer`` that distills a frozen ViT teacher into a ViT student.

The trainable model handed to the Trainer is :class:`DistillationModule` (student + the AttnDistill
loss with its projector), so that optimizer, scheduler, DDP, mixed precision, checkpoints and resume
all cover the projector too. The teacher is a frozen second model, prepared through Accelerate for
device and precision but never wrapped by DDP. ``save_model`` exports the student alone, as a plain
transformers model that ``AutoModel.from_pretrained`` loads without custom code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainerState
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    TrainOutput,
    get_last_checkpoint,
    rotate_checkpoints,
    seed_worker,
)
from transformers.utils import SAFE_WEIGHTS_NAME

from .attention import (
    install_attention_capture,
    unwrap_model,
)
from .checkpoints import check_checkpoint, check_same_students, finished_state, write_student_configs
from .config import AttnDistillConfig
from .data.streaming import (
    DistinctUnreadableLoader,
    EpochShuffle,
    EqualStepsIterable,
    KeyedExamples,
    prepare_per_rank_dataloader,
)
from .losses import LOSS_TERMS
from .models import teacher_in_precision
from .sharding import check_teacher_sharding, describe_teacher, shard_teacher
from .skipping import SkipTracker, drop_empty_updates, who, zero_surrogate
from .students import (
    DistillationModule,
    MultiStudentModule,
    StudentSpec,
    check_pair,
    check_student,
    exportable_student,
    student_specs,
)
from .target_cache import TargetCache, cached_targets, check_cache_run
from .teacher import teacher_targets

logger = logging.getLogger(__name__)


class TermMeans:
    """Means of the logged loss terms over the steps since the last log, over all processes.

    The names are fixed when the run starts, so every process runs the same collective at every log, also
    one that skipped all its batches of the window; a term's mean is over the steps that computed it.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.sums: list[torch.Tensor | float] = [0.0] * len(names)  # on the device: no sync per step
        self.counts = [0] * len(names)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            if name in self.names:
                index = self.names.index(name)
                self.sums[index] = self.sums[index] + value.detach().float()
                self.counts[index] += 1

    def means(self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The means since the last call (which they reset); a term no process computed is left out."""
        sums = torch.stack([torch.as_tensor(value, dtype=torch.float32).cpu() for value in self.sums])
        totals = sum_over_processes(torch.cat([sums, torch.tensor(self.counts, dtype=torch.float32)]))
        self.sums, self.counts = [0.0] * len(self.names), [0] * len(self.names)
        size = len(self.names)
        return {
            name: round(float(totals[i] / totals[size + i]), 6)
            for i, name in enumerate(self.names)
            if totals[size + i] > 0
        }


class AttnDistillTrainer(Trainer):
    """Trainer that distills ``teacher`` into ``student`` with the AttnDistill loss.

    ``teacher`` is a model, a Hub id or a local directory. ``image_processor`` is saved next to the
    exported student so that ``AutoImageProcessor.from_pretrained`` works on the output directory.
    ``batch_transform`` runs on each batch in the training process before the models see it, e.g.
    :class:`~attndistill_hf.data.GpuAugment` decoding and augmenting JPEG bytes on the GPU.
    ``image_size`` is the crop size of the data transform (default: the student's configured size);
    a pair that cannot take it fails before the first step.
    """

    def __init__(
        self,
        student: PreTrainedModel | Mapping[str, PreTrainedModel | StudentSpec],
        teacher: PreTrainedModel | str | TargetCache,
        args: AttnDistillConfig,
        *,
        image_processor: Any = None,
        batch_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        image_size: int | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        specs = student_specs(student)
        self.target_cache = teacher if isinstance(teacher, TargetCache) else None
        if self.target_cache is not None:  # no teacher runs: its stored targets come with each batch
            teacher_model, teacher_dim = None, self.target_cache.info.hidden_size
        else:
            teacher_model = teacher_in_precision(teacher, args.teacher_dtype)
            teacher_dim = teacher_model.config.hidden_size
            if args.teacher_sharding == "fsdp":
                check_teacher_sharding(teacher_model, args)
        if len(specs) > 1 and args.max_grad_norm:
            raise ValueError(
                f"max_grad_norm {args.max_grad_norm} with several students: clipping the global gradient norm would "
                "couple their updates. Train them without clipping (the published recipe clips nothing)."
            )
        members = {}
        for name, spec in specs.items():
            size = image_size or spec.model.config.image_size
            if teacher_model is None:
                check_student(spec.model, size)
            else:
                check_pair(teacher_model, spec.model, size)
            loss_fn = spec.loss(teacher_dim, args, seed=args.seed)
            members[name] = DistillationModule(spec.model, loss_fn)
        if self.target_cache is not None:
            check_cache_run(
                self.target_cache.info,
                args,
                image_size=size,  # the students share the crop size
                needs_attention=any(member.loss_fn.attn_weight for member in members.values()),
            )
        super().__init__(
            model=members[None] if None in members else MultiStudentModule(members),
            args=args,
            processing_class=image_processor,
            **trainer_kwargs,
        )
        # The loss is a per-batch mean and is not pre-scaled for gradient accumulation: let the
        # Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        # Every forward of a sharded teacher is a collective: all processes run it, even for a skipped batch.
        self.teacher_is_sharded = (
            teacher_model is not None and args.teacher_sharding == "fsdp" and self.accelerator.num_processes > 1
        )
        self.teacher = None if teacher_model is None else self._prepare_teacher(teacher_model)
        scales_itself = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if args.fp16 and self.accelerator.scaler is None and not scales_itself:
            # Accelerate only autocasts and scales fp16 on accelerators: on a CPU "fp16" would silently
            # train in fp32, and fp16 without loss scaling underflows small gradients to zero.
            raise ValueError(
                f"fp16 needs a gradient scaler, which Accelerate only provides on an accelerator (device: "
                f"{self.accelerator.device.type}). Use --bf16 true, or no mixed precision, on this device."
            )
        self.batch_transform = batch_transform
        self._validated = False
        self.skips = SkipTracker(members, args.max_consecutive_nonfinite_steps)
        if args.warmup_epochs > 0:  # in steps, which the Trainer's scheduler takes
            args.warmup_steps = max(1, round(args.warmup_epochs * self._update_steps_per_epoch()))
        # A single student's "loss" is the Trainer's own logged loss; each of several has its own.
        self._terms = TermMeans(
            [f"{name}/{term}" for name in members for term in LOSS_TERMS]
            if None not in members
            else list(LOSS_TERMS[1:])
        )

    def _prepare_teacher(self, teacher: PreTrainedModel) -> nn.Module:
        """The frozen teacher on this process: sharded over all of them, or whole; then Accelerate's precision."""
        args, processes = self.args, self.accelerator.num_processes
        if self.teacher_is_sharded:
            shard_teacher(teacher, self.accelerator.device)  # Accelerate then leaves its placement alone
        elif args.teacher_sharding == "fsdp":
            logger.warning("--teacher_sharding fsdp with one process: the teacher is whole on it.")
        prepared = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        prepared.requires_grad_(False)
        prepared.eval()
        logger.info(describe_teacher(teacher, processes))
        if args.torch_compile:
            install_attention_capture(teacher)
            prepared = torch.compile(prepared, backend=args.torch_compile_backend or "inductor")
        return prepared

    # ---- the loss ---------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        skipped = inputs.get("skipped_images")
        if skipped is not None:
            self.skips.skipped_images += int(skipped.sum())
        pixel_values = inputs["pixel_values"]
        members = self.members
        if self.target_cache is not None:
            targets = cached_targets(inputs, self.target_cache.info)
        else:
            targets = teacher_targets(  # one teacher forward for every student
                self.teacher,
                pixel_values,
                with_attention=any(member.loss_fn.attn_weight for member in members.values()),
            )
        outputs = model(
            pixel_values=pixel_values,
            teacher_cls=targets.cls,
            teacher_attn=targets.attention,
            teacher_grid=targets.grid,
            validate=not self._validated,
        )
        self._validated = True
        per_student = outputs if isinstance(outputs, dict) else {None: outputs}
        total = pixel_values.new_zeros((), dtype=torch.float32)
        for name, terms in per_student.items():
            if not bool(torch.isfinite(terms.loss)) or pixel_values.shape[0] == 0:
                self.skips.nonfinite(name, terms.loss, self.state.global_step)
                total = total + zero_surrogate(members[name].parameters(), terms.loss)
            else:
                self.skips.finite(name)
                total = total + terms.loss
                prefix = f"{name}/" if name else ""
                self._terms.add({f"{prefix}{term}": getattr(terms, term) for term in LOSS_TERMS})
        return (total, per_student) if return_outputs else total

    @property
    def members(self) -> dict[str | None, DistillationModule]:
        """Each student's :class:`DistillationModule` by name (``None`` for the single student)."""
        plain = unwrap_model(self.model)
        return dict(plain.members.items()) if isinstance(plain, MultiStudentModule) else {None: plain}

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.batch_transform is not None:
            # Before the empty-batch check: GPU decoding may find nothing readable in a batch too.
            inputs = self.batch_transform(inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] == 0:
            loss = self._skip_unreadable_batch(model, inputs)
        else:
            self.skips.readable()
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients and self.skips.window:
            drop_empty_updates(
                self.members,
                self.skips.take_window(),
                has_scaler=self.accelerator.scaler is not None,
                step=self.state.global_step,
            )
        return loss

    def _skip_unreadable_batch(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """A batch in which no image could be decoded (the collator left 0 rows): skipped for every
        student, as a non-finite loss is.

        No model takes 0 rows, and under DDP every rank must run the wrapped model's forward and backward
        at every step: a blank stand-in (:meth:`DistillationModule.placeholder_inputs`; the students share
        the crop size and the teacher) runs in its place, and a zero surrogate gives no gradient.
        """
        self.skips.skipped_images += int(inputs["skipped_images"].sum())
        self.skips.unreadable(self.state.global_step)
        placeholder = next(iter(self.members.values())).placeholder_inputs()
        with self.compute_loss_context_manager():
            if self.teacher_is_sharded:  # the other processes' teacher forward gathers with this one's
                teacher_targets(self.teacher, placeholder["pixel_values"], with_attention=False)
            model(**placeholder)
        loss = zero_surrogate(model.parameters(), torch.zeros((), device=self.args.device))
        self.accelerator.backward(loss)
        return loss.detach()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        """``Trainer.train``, with the checkpoint to resume from checked before anything of it loads
        (:func:`check_checkpoint`, :func:`check_same_students`); a checkpoint at the end of the run is loaded
        without another step; a run in which no batch held a readable image stops before anything is exported."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True and os.path.isdir(self.args.output_dir):
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            check_checkpoint(checkpoint)
            check_same_students(checkpoint, self.students)
            finished = finished_state(checkpoint, self.args)
            if finished is not None:
                return self._load_finished(checkpoint, finished)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.skips.check_some_batch_was_readable(self._sum_over_processes)
        return output

    def skipped_images_in_all_processes(self) -> int:
        """Unreadable images met so far by every process (each counts on one of them); a collective."""
        return int(self._sum_over_processes(torch.tensor([self.skips.skipped_images]))[0])

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values.to(self.args.device), reduction="sum").cpu()

    def _load_finished(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        """The students and state of a checkpoint at the end of the run, loaded without another step.

        ``Trainer.train`` would run one more step from such a checkpoint when the run's last epoch is
        partial (step 5 of 4), changing the exported model.
        """
        load_model(self.model, os.path.join(checkpoint, SAFE_WEIGHTS_NAME), device=str(self.args.device))
        self.state = state
        logger.warning(
            "%s is at step %d of %d: the run is finished, nothing left to train.",
            checkpoint,
            state.global_step,
            state.max_steps,
        )
        return TrainOutput(state.global_step, float("nan"), {})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss term since the last log, and the skip counters."""
        if "loss" in logs:
            logs |= self._terms.means(self._sum_over_processes)
            logs["skipped_images"] = self.skipped_images_in_all_processes()
            logs["nonfinite_steps"] = self.skips.nonfinite_steps
            if None not in self.skips.nonfinite_by_student:
                logs |= {f"{name}/nonfinite_steps": n for name, n in self.skips.nonfinite_by_student.items()}
        super().log(logs, start_time)

    # ---- data -------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader | DistinctUnreadableLoader:
        """The training DataLoader: per-rank streams prepared as such, and reproducible training examples.

        A stream already split per rank (``EqualStepsIterable``) must not be sharded a second time:
        ``accelerator.prepare`` would cut each rank's part again, so it is prepared as a single-process
        loader (device placement only). With a collator that reads example keys (``ImageCollator``,
        ``RawBytesCollator``), every example carries its ``ExampleKey`` (the run's seed, or ``data_seed``
        when set; the epoch; its index), of which its random view is a function; a map-style dataset is
        then read in ``EpochShuffle`` order, a function of (seed, epoch), so that a run resumed mid-epoch
        gets the batches and views of an uninterrupted one; and each unreadable example is counted once
        (``DistinctUnreadableLoader``). Any other data takes the Trainer's path.
        """
        dataset = self.train_dataset
        keyed = getattr(self.data_collator, "uses_example_keys", False)
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        if isinstance(dataset, EqualStepsIterable):
            stream = dataset.with_example_keys(seed) if keyed else dataset
            loader = prepare_per_rank_dataloader(
                self.accelerator, self._training_loader(stream, self.args.per_device_train_batch_size)
            )
        elif keyed and hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset):
            examples = KeyedExamples(dataset, seed)
            loader = self.accelerator.prepare(
                self._training_loader(examples, self.args.train_batch_size, sampler=EpochShuffle(examples))
            )
        else:
            return super().get_train_dataloader()
        return DistinctUnreadableLoader(loader) if keyed else loader

    def _training_loader(self, dataset: Any, batch_size: int, sampler: Any = None) -> DataLoader:
        """A DataLoader with the Trainer's settings for training data (workers, pinning, worker seeding)."""
        workers = self.args.dataloader_num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            multiprocessing_context=self.args.dataloader_multiprocessing_context if workers > 0 else None,
            # Every rank's main process has the same seed, so its workers would draw the same augmentations
            # as the other ranks' workers from an unkeyed collator; the Trainer's worker seeding adds the rank.
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index) if workers else None,
        )

    def get_resumed_dataloader(
        self, dataloader: DataLoader | DistinctUnreadableLoader, num_batches: int
    ) -> DataLoader | DistinctUnreadableLoader:
        """Skip the batches trained before the checkpoint; the count of unreadable examples goes on."""
        if isinstance(dataloader, DistinctUnreadableLoader):
            resumed = super().get_resumed_dataloader(dataloader.loader, num_batches)
            return DistinctUnreadableLoader(resumed, dataloader.tally)
        return super().get_resumed_dataloader(dataloader, num_batches)

    # ---- optimisation -----------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on matrices only: biases and every 1-D parameter (norms, tokens' scales) are exempt."""
        return [name for name, param in model.named_parameters() if param.ndim > 1]

    def _update_steps_per_epoch(self) -> int:
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError(
                "warmup_epochs needs the epoch length: stream with a known size (--num_train_examples) "
                "or use warmup_steps."
            )
        batch = self.args.total_train_batch_size
        if isinstance(self.train_dataset, EqualStepsIterable):
            batch //= max(1, self.args.world_size)  # a per-rank stream holds this rank's examples only
        return max(1, math.ceil(len(self.train_dataset) / batch))

    # ---- transformers' private Trainer API ---------------------------------------------------------
    # The only overrides of private Trainer methods, listed with the parameters they rely on in
    # tests/test_private_api.py, which fails when a transformers release changes them.
    # transformers 5.24 writes checkpoint-N in place, so a run killed mid-write would leave a half
    # checkpoint for resume to pick: _get_output_dir + _save_checkpoint stage it and rename it. _save
    # pickles the arguments into training_args.bin: it must not carry the Hub token.

    STAGING_DIR = ".checkpoint-staging"

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, self.STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` under a staging folder, then move it into place with one rename.

        A run killed while writing leaves no half-written ``checkpoint-N`` for resume to pick up:
        ``get_last_checkpoint`` only ever sees complete checkpoints. Rotation (``save_total_limit``)
        runs after the rename, so it only ever deletes older complete checkpoints.
        """
        self.skips.check_some_batch_was_readable(self._sum_over_processes)
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, self.STAGING_DIR)
        if self.args.should_save and os.path.isdir(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # leftover of an earlier crash
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.args.should_save:
            write_student_configs(os.path.join(staging, name), self.students)  # what a resume checks against
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            with contextlib.suppress(OSError):  # only while empty: a finished run leaves no staging folder
                os.rmdir(staging)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """training_args.bin is a pickle of the arguments: never write the Hub token into it."""
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token

    # ---- saving -----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep student + projector; a user's ``save_model`` exports the student alone."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
        else:
            self.export_student(output_dir or self.args.output_dir)

    @property
    def students(self) -> dict[str | None, PreTrainedModel]:
        """The students by name (``None`` for the single student)."""
        return {name: member.student for name, member in self.members.items()}

    @property
    def student(self) -> PreTrainedModel:
        """The student of a single-student run."""
        students = self.students
        if None not in students:
            raise AttributeError(f"This run trains several students ({', '.join(students)}): use trainer.students.")
        return students[None]

    def export_student(self, output_dir: str) -> None:
        """Write the student as a plain transformers model (config, safetensors, image processor).

        With several students, each goes to its own folder ``output_dir/<name>``.
        """
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        for name, student in self.students.items():
            folder = os.path.join(output_dir, name) if name else output_dir
            os.makedirs(folder, exist_ok=True)
            exportable_student(student).save_pretrained(folder, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            logger.info("Exported %s to %s", who(name), folder)
