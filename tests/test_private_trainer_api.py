"""The private transformers.Trainer methods that AttnDistillTrainer overrides still look as it expects.

transformers may change private methods in any release of the pinned range. Each check below fails
with the name of what changed, instead of checkpoints being written in place or the Hub token being
pickled without any test noticing.
"""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer, trainer_utils

from attndistill_hf.trainer import AttnDistillTrainer

# The private methods of transformers.Trainer that AttnDistillTrainer overrides, with the parameters it relies on.
PRIVATE_TRAINER_API: dict[str, tuple[str, ...]] = {
    "_get_output_dir": ("self", "trial"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_save": ("self", "output_dir", "state_dict"),
}


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_API))
def test_overridden_private_methods_keep_their_parameters(name: str) -> None:
    assert hasattr(Trainer, name), f"transformers.Trainer has no {name} any more"
    parameters = tuple(inspect.signature(getattr(Trainer, name)).parameters)
    assert parameters == PRIVATE_TRAINER_API[name], f"Trainer.{name}{parameters} changed"
    assert name in vars(AttnDistillTrainer)  # listed because it is overridden
    assert tuple(inspect.signature(getattr(AttnDistillTrainer, name)).parameters) == parameters


def test_every_private_override_is_listed() -> None:
    private = {
        name
        for name in vars(AttnDistillTrainer)
        if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert private == set(PRIVATE_TRAINER_API)


def test_checkpoint_staging_still_works_through_get_output_dir() -> None:
    """The staging folder works because _save_checkpoint asks _get_output_dir where checkpoint-N goes."""
    source = inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(" in source, "Trainer._save_checkpoint no longer calls _get_output_dir"
    assert "PREFIX_CHECKPOINT_DIR" in source


def test_the_arguments_pickle_is_written_by_save() -> None:
    source = inspect.getsource(Trainer._save)
    assert "TRAINING_ARGS_NAME" in source and "self.args" in source, "Trainer._save no longer writes the arguments"


def test_helpers_the_trainer_calls_keep_their_parameters() -> None:
    assert tuple(inspect.signature(trainer_utils.rotate_checkpoints).parameters)[:4] == (
        "output_dir",
        "save_total_limit",
        "best_model_checkpoint",
        "use_mtime",
    )
    assert tuple(inspect.signature(trainer_utils.seed_worker).parameters) == ("worker_id", "num_workers", "rank")
