"""Every private transformers or Accelerate API the library relies on still behaves as it expects.

transformers and Accelerate may change private names in any release of the supported range. Each check
below fails with the name of what changed, instead of checkpoints being written in place, the Hub token
being pickled, a loss being scaled twice or the attention capture silently missing a kernel. The list:

| private API | used by | for |
|---|---|---|
| ``Trainer._get_output_dir``, ``_save_checkpoint`` | trainer.py | staging checkpoint-N, renamed into place |
| ``Trainer._save`` | trainer.py | the arguments pickle without the Hub token |
| ``Trainer.save_model(_internal_call=)`` | trainer.py | checkpoints keep the projector, exports do not |
| ``Trainer.model_accepts_loss_kwargs`` | trainer.py | the loss is divided by the accumulation steps |
| ``Accelerator.scaler`` | trainer.py | fp16 refused without a scaler; an all-skipped step skipped |
| ``Accelerator._dataloaders`` | data/streaming.py | a per-rank stream registered for ``save_state`` |
| ``PretrainedConfig._attn_implementation_internal`` | attention.py | the capture backend on the last block only |
| ``modeling_utils.ALL_ATTENTION_FUNCTIONS`` | attention.py | the capture hands on to the model's kernel |
"""

from __future__ import annotations

import inspect

import pytest
import torch
from accelerate import Accelerator
from transformers import AttentionInterface, Trainer, ViTConfig, trainer_utils
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


def test_save_model_still_marks_the_trainers_own_calls() -> None:
    assert "_internal_call" in inspect.signature(Trainer.save_model).parameters
    # checkpoint-N holds student + projector because the Trainer's own save passes _internal_call=True.
    assert "save_model(output_dir, _internal_call=True)" in inspect.getsource(Trainer._save_checkpoint)


def test_model_accepts_loss_kwargs_still_decides_the_accumulation_scaling() -> None:
    source = inspect.getsource(Trainer.training_step)
    assert "model_accepts_loss_kwargs" in source, "Trainer.training_step no longer reads model_accepts_loss_kwargs"
    assert "gradient_accumulation_steps" in source


def test_the_accelerators_scaler_and_dataloader_registry_are_still_there() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.scaler is None  # no fp16 loss scaling on a CPU: what the fp16 refusal reads
    assert isinstance(accelerator._dataloaders, list)
    prepared = accelerator.prepare(torch.utils.data.DataLoader(list(range(4)), batch_size=2))
    assert accelerator._dataloaders[-1] is prepared  # what a per-rank stream appends itself to


def test_a_configs_attention_implementation_is_still_set_through_its_internal_field() -> None:
    config = ViTConfig()
    config._attn_implementation_internal = "eager"
    assert config._attn_implementation == "eager"


def test_the_attention_registry_still_hands_out_registered_kernels() -> None:
    def kernel(*args: object, **kwargs: object) -> None:
        return None

    AttentionInterface.register("private-api-probe", kernel)
    assert ALL_ATTENTION_FUNCTIONS["private-api-probe"] is kernel
    assert ALL_ATTENTION_FUNCTIONS.get_interface("private-api-probe", None) is kernel
    assert callable(ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None))
