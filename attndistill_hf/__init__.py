"""AttnDistill on the Hugging Face stack: the public API.

>>> from attndistill_hf import AttnDistillConfig, AttnDistillTrainer, build_student
"""

from .attention import eager_last_cls_attention, last_cls_attention
from .families import UnsupportedModelError, family_of
from .losses import AttnDistillLoss
from .models import STUDENT_PRESETS, build_student, load_teacher
from .trainer import AttnDistillConfig, AttnDistillTrainer, check_pair

__version__ = "0.1.0"

__all__ = [
    "STUDENT_PRESETS",
    "AttnDistillConfig",
    "AttnDistillLoss",
    "AttnDistillTrainer",
    "UnsupportedModelError",
    "build_student",
    "check_pair",
    "eager_last_cls_attention",
    "family_of",
    "last_cls_attention",
    "load_teacher",
]
