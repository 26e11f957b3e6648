"""AttnDistill on the Hugging Face stack: the public API.

>>> from attndistill_hf import distill
>>> result = distill(teacher_name_or_path="facebook/dino-vits16", train_dir="images/", output_dir="out")

or, piece by piece:

>>> from attndistill_hf import AttnDistillConfig, AttnDistillTrainer, build_student
"""

# Before the imports: modules of the package read it while the package is still importing.
__version__ = "0.1.0"

from .attention import eager_last_cls_attention, last_cls_attention
from .config import AttnDistillConfig
from .families import UnsupportedModelError, family_of
from .losses import AttnDistillLoss
from .models import STUDENT_PRESETS, build_student, load_teacher
from .pipeline import DistillResult, StudentResult, distill
from .students import check_pair
from .trainer import AttnDistillTrainer

__all__ = [
    "STUDENT_PRESETS",
    "AttnDistillConfig",
    "AttnDistillLoss",
    "AttnDistillTrainer",
    "DistillResult",
    "StudentResult",
    "UnsupportedModelError",
    "build_student",
    "check_pair",
    "distill",
    "eager_last_cls_attention",
    "family_of",
    "last_cls_attention",
    "load_teacher",
]
