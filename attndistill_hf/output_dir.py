"""The output folder of a run: refused, emptied, continued or found finished, before anything loads.

As in the transformers examples, a folder that holds an earlier run is never mixed with a new one: it is
replaced (``overwrite_output_dir``, emptied first), continued (``resume_from_checkpoint``) or refused.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .checkpoints import finished_state
from .config import AttnDistillConfig
from .trainer import AttnDistillTrainer

logger = logging.getLogger(__name__)


# What a run leaves in its output folder from its first checkpoint on (a finished run: trainer_state.json too).
RUN_MARKERS = ("trainer_state.json", f"{PREFIX_CHECKPOINT_DIR}-*", AttnDistillTrainer.STAGING_DIR)


def resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, ``last`` / ``true`` for the newest one in
    ``output_dir``, or None (also for ``false``) to start afresh."""
    if value is None or value.lower() == "false":
        return None
    if value.lower() in ("last", "true"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: {output_dir} holds no checkpoint to resume from.")
        return last
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value} is not a checkpoint folder.")
    return value


def exported_final_step(output_dir: str, resume: str, args: AttnDistillConfig) -> int | None:
    """The last step of the run in ``output_dir`` when ``resume`` is its final checkpoint and the run was
    exported from it (its trainer_state.json at the top is that step's), else None."""
    state = finished_state(resume, args)
    exported = Path(output_dir) / TRAINER_STATE_NAME
    if state is None or not exported.is_file():
        return None
    return state.global_step if TrainerState.load_from_json(str(exported)).global_step == state.global_step else None


def prepare_output_dir(output_dir: str, *, overwrite: bool, resume: str | None) -> Path | None:
    """Check ``output_dir`` before anything loads: a folder (created if missing) that can be written,
    refused, emptied or kept as :func:`refuse_or_empty` decides. Returns the topmost folder created
    here, which a run that fails before writing anything removes again (:func:`main`)."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder.")
    refuse_or_empty(folder, overwrite=overwrite, resume=resume)
    created = next((path for path in reversed([folder, *folder.parents]) if not path.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # found now, not when the model is saved after training
            pass
    except OSError as error:
        raise ValueError(f"Cannot write to --output_dir {output_dir}: {error.strerror or error}.") from None
    return created


def refuse_or_empty(folder: Path, *, overwrite: bool, resume: str | None) -> None:
    """Refuse, empty or keep the output ``folder``, as the transformers examples do.

    A folder that holds a run is refused unless it is replaced (``overwrite``: emptied first, so that
    none of the old run's k-NN results, figures or checkpoints end up beside the new model, in a push
    or in a later resume) or continued from one of its checkpoints (``resume``). A non-empty folder
    that holds no run is never emptied.
    """
    output_dir = str(folder)
    entries = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return
    if resume is not None:
        if overwrite and Path(resume).resolve().is_relative_to(folder.resolve()):
            raise ValueError(
                "--overwrite_output_dir would delete the checkpoint that --resume_from_checkpoint continues: "
                "give one of them."
            )
        if not overwrite:
            return
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not any(any(folder.glob(marker)) for marker in RUN_MARKERS):
        raise ValueError(
            f"--output_dir {output_dir} is not empty and holds no run ({listed}): give a new or empty folder."
        )
    if not overwrite:
        raise ValueError(
            f"--output_dir {output_dir} holds an earlier run ({listed}): give --overwrite_output_dir true to replace "
            "it, --resume_from_checkpoint last to continue it, or another folder."
        )
    empty_folder(folder)
    logger.info("Emptied %s (--overwrite_output_dir): it held %s", output_dir, listed)


def empty_folder(folder: Path) -> None:
    """Delete everything inside ``folder`` (links themselves, never what they point to)."""
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
