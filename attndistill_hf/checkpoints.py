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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

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
