"""``from attndistill_hf import ...`` gives the library's own objects, and nothing listed is missing."""

from __future__ import annotations

import attndistill_hf
from attndistill_hf import attention, families, losses, models, pipeline, trainer


def test_public_names_are_the_modules_objects() -> None:
    homes = {
        "AttnDistillConfig": trainer,
        "AttnDistillTrainer": trainer,
        "check_pair": trainer,
        "AttnDistillLoss": losses,
        "build_student": models,
        "load_teacher": models,
        "STUDENT_PRESETS": models,
        "last_cls_attention": attention,
        "eager_last_cls_attention": attention,
        "UnsupportedModelError": families,
        "family_of": families,
        "distill": pipeline,
        "DistillResult": pipeline,
        "StudentResult": pipeline,
    }
    assert sorted(attndistill_hf.__all__) == sorted(homes)
    for name, module in homes.items():
        assert getattr(attndistill_hf, name) is getattr(module, name), name
