"""Checkpoints are checked before anything of them loads: a damaged or unsafe file is named in one line.

Two kinds of file are refused, each with its own ``ValueError`` so that a recipe reports it in one line:

- :class:`CorruptCheckpointError`: a file of a checkpoint to resume from cannot be read (a run killed
  mid-write, a partial copy); the message names the newest complete checkpoint before it.
- :class:`UnsafePickleError`: a pickled file asks for more than tensors and plain containers. The
  Trainer and transformers unpickle with ``torch.load(weights_only=True)``, which refuses such a file
  before building anything from it, but with a traceback whose advice is to turn that protection off.
  A checkpoint's pickles are disassembled before resuming (nothing in them is unpickled or run); a
  teacher's refused weights are disassembled to name what they ask for. Both messages say how to turn
  the file into a safe one.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig, PreTrainedModel, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .skipping import who

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# The Trainer's RNG state files (one per process under DDP); it loads them with numpy's array globals allowed.
_RNG_STATE = re.compile(r"rng_state(_\d+)?\.pth")


class CorruptCheckpointError(ValueError):
    """A checkpoint to resume from holds a file that cannot be read (a run killed mid-write, a partial copy)."""


class UnsafePickleError(ValueError):
    """A pickled checkpoint file whose unpickling needs more than tensors and plain containers, so could run code."""


def _unreadable_file(checkpoint: Path) -> tuple[str, str] | None:
    """The first file of ``checkpoint`` that cannot be read, and why; None when every one can.

    Cheap checks that a truncated file fails: a safetensors header must cover the file, a torch.save
    archive ends with its zip directory, a JSON state must parse.
    """
    for path in sorted(path for path in checkpoint.rglob("*") if path.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt"):
                    pass
            elif path.suffix in PICKLE_SUFFIXES:
                with zipfile.ZipFile(path):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as error:
            return path.relative_to(checkpoint).as_posix(), str(error)
    return None


def unsafe_globals(path: Path) -> list[str]:
    """The globals (``module.name``) that unpickling ``path``, a zip-format ``torch.save`` file, needs beyond
    what ``torch.load(weights_only=True)`` accepts at this point; read from the pickle's opcodes, so nothing
    in it is unpickled. Sorted, for a message that does not change from run to run."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def _unsafe_file(checkpoint: Path) -> tuple[str, list[str]] | None:
    """The first pickled file of ``checkpoint`` that resuming would refuse to unpickle, and the globals it
    needs; None when every one is safe. Expects readable files (:func:`_unreadable_file` first).

    Each file is judged as the Trainer loads it: RNG states with numpy's array globals allowed, every other
    file with ``weights_only=True`` alone. ``training_args.bin`` pickles the whole TrainingArguments object
    (classes of transformers and Accelerate), but nothing reads it when a run resumes.
    """
    for path in sorted(path for path in checkpoint.rglob("*") if path.is_file()):
        if path.suffix not in PICKLE_SUFFIXES or path.name == TRAINING_ARGS_NAME:
            continue
        if _RNG_STATE.fullmatch(path.name):
            with safe_globals():
                found = unsafe_globals(path)
        else:
            found = unsafe_globals(path)
        if found:
            return path.relative_to(checkpoint).as_posix(), found
    return None


def _checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
    return int(match.group(1)) if match else None


def _instead(folder: Path) -> str:
    """What to do instead of resuming from ``folder``: the newest complete, safe checkpoint before it, or afresh."""
    step = _checkpoint_step(folder)
    earlier = [
        path
        for path in folder.parent.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and (number := _checkpoint_step(path)) is not None and (step is None or number < step)
    ]
    previous = next(
        (
            path
            for path in sorted(earlier, key=_checkpoint_step, reverse=True)
            if _unreadable_file(path) is None and _unsafe_file(path) is None
        ),
        None,
    )
    if previous is not None:
        return f"resume from {previous} instead, the newest complete checkpoint before it"
    return f"{folder.parent} holds no complete checkpoint before it: start the run afresh"


def check_checkpoint(checkpoint: str | os.PathLike[str]) -> None:
    """Raise :class:`CorruptCheckpointError` when a file of ``checkpoint`` cannot be read, and
    :class:`UnsafePickleError` when one of its pickles (optimizer, scheduler, scaler, RNG state) asks for
    more than the Trainer unpickles.

    The message names the file and the newest complete checkpoint before it in the same run folder,
    to resume from instead: resuming from such a checkpoint would otherwise end in a raw traceback of
    whichever loader reads the file first. Checkpoints the Trainer writes pass.
    """
    folder = Path(checkpoint)
    broken = _unreadable_file(folder)
    if broken is not None:
        name, reason = broken
        raise CorruptCheckpointError(
            f"Cannot resume from {folder}: {name} is incomplete or corrupt ({reason}); {_instead(folder)}."
        )
    unsafe = _unsafe_file(folder)
    if unsafe is not None:
        name, found = unsafe
        raise UnsafePickleError(
            f"Cannot resume from {folder}: {name} is not a safe checkpoint: unpickling it needs "
            f"{', '.join(found)}, which can run code, so none of it was loaded. If it comes from a source you "
            "trust, load it once in a trusted, isolated environment and save its state again as tensors and "
            f"plain containers (torch.save of a state dict); otherwise {_instead(folder)}."
        )


def unsafe_weights_error(name_or_path: str, role: str = "teacher") -> UnsafePickleError:
    """The error for a model whose pickled weights (``pytorch_model*.bin``) transformers refused to unpickle.

    transformers reads ``.bin`` weights with ``torch.load(weights_only=True)`` when a model has no
    safetensors weights: a ``.bin`` of tensors loads, and one that asks for other objects is refused
    before anything in it runs. This names the offending files of a local folder and what they ask for,
    and says how to convert the model to safetensors.
    """
    found: dict[str, list[str]] = {}
    if os.path.isdir(name_or_path):
        for path in sorted(Path(name_or_path).glob("*.bin")):
            # Pre-zip torch.save files (transformers reads those too) cannot be disassembled: not named then.
            if zipfile.is_zipfile(path) and (asked := unsafe_globals(path)):
                found[path.name] = asked
    files = ", ".join(found) or "its pickled weights (pytorch_model.bin)"
    needs = ", ".join(sorted({name for names in found.values() for name in names}))
    return UnsafePickleError(
        f"Cannot load the {role} {name_or_path!r}: {files} is not a safe checkpoint: unpickling it needs "
        f"{needs or 'more than tensors and plain containers'}, which can run code, so it was refused before "
        "anything in it ran. If it comes from a source you trust, load the model once in a trusted, isolated "
        "environment and save it with save_pretrained, which writes model.safetensors; then give that folder."
    )


# The students' architectures, kept in each checkpoint for a resume to compare with its own students.
STUDENT_CONFIGS_FILE = "student_configs.json"
# Config entries that do not change what a checkpoint's weights mean.
_NOT_ARCHITECTURE = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "output_attentions",
}


def architecture(config: PretrainedConfig) -> dict[str, Any]:
    """A student config's entries that decide its architecture (JSON types, as written to a checkpoint)."""
    return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}))


def describe_architecture(config: Mapping[str, Any], keys: list[str]) -> str:
    settings = ", ".join(f"{key}={config.get(key)!r}" for key in keys)
    return f"{config.get('model_type', 'a model')} with {settings}"


def _architectures(students: Mapping[str | None, PreTrainedModel]) -> dict[str, dict[str, Any]]:
    # The single student (None) is "" in the file: JSON keys are strings.
    return {name or "": architecture(student.config) for name, student in students.items()}


def write_student_configs(checkpoint: str | os.PathLike[str], students: Mapping[str | None, PreTrainedModel]) -> None:
    """Keep the students' architectures in ``checkpoint``, for a resume to compare with its own students."""
    text = json.dumps(_architectures(students), indent=2, sort_keys=True)
    (Path(checkpoint) / STUDENT_CONFIGS_FILE).write_text(text)


def check_same_students(checkpoint: str | os.PathLike[str], students: Mapping[str | None, PreTrainedModel]) -> None:
    """Refuse to continue a checkpoint's students with students of another architecture: weights of the same
    shapes (another head count, say) would load without a word. Checkpoints without the file pass."""
    path = Path(checkpoint) / STUDENT_CONFIGS_FILE
    if not path.is_file():
        return
    saved, current = json.loads(path.read_text()), _architectures(students)
    if set(saved) != set(current):
        raise ValueError(
            f"Cannot resume from {checkpoint}: it trained the students {sorted(saved)}, this run has "
            f"{sorted(current)}; resume with the same students or start a new run."
        )
    for name, config in current.items():
        if saved[name] != config:
            differ = sorted(
                key for key in saved[name].keys() | config.keys() if saved[name].get(key) != config.get(key)
            )
            raise ValueError(
                f"Cannot resume from {checkpoint}: {who(name)} there is {describe_architecture(saved[name], differ)}, "
                f"this run builds {describe_architecture(config, differ)}; resume with the same student "
                "(--student_preset / --student_name_or_path / --patch_size) or start a new run."
            )


def finished_state(checkpoint: str | os.PathLike[str], args: TrainingArguments) -> TrainerState | None:
    """The trainer state of ``checkpoint`` when it is the end of the run that ``args`` describe, else None.

    The run's length is ``max_steps`` when given; else the checkpoint's own plan, when it was made for
    the same number of epochs (a longer run continues it).
    """
    path = Path(checkpoint) / TRAINER_STATE_NAME
    if not path.is_file():
        return None
    state = TrainerState.load_from_json(str(path))
    if args.max_steps > 0:
        planned = args.max_steps
    elif state.num_train_epochs == args.num_train_epochs:
        planned = state.max_steps
    else:
        return None
    return state if planned and state.global_step >= planned else None
