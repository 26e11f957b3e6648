"""Convert an original self-supervised ViT checkpoint into a transformers teacher and verify it.

    python recipes/convert_teacher.py --checkpoint dino_deitsmall8_pretrain.pth --format dino \\
        --output_dir teachers/dino-vits8

The checkpoint is a DINO / Mugs / iBOT / MAE / timm ViT (.pth or .safetensors, original key names). The
output folder loads with ``AutoModel.from_pretrained`` / ``AutoImageProcessor.from_pretrained`` (no
remote code) and with ``attndistill_hf.models.load_teacher``. The verification report (max difference
of the CLS token and of the last-layer CLS attention against the original architecture, on a random
input) is printed and saved as ``conversion_report.json``. Exit status: 0 converted and verified, 1
verification failed, 2 the checkpoint could not be read or does not match a supported ViT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from attndistill_hf.cli import RunFailedError, parse_config_and_flags, run_recipe
from attndistill_hf.convert import (
    ARCH_PRESETS,
    ConversionReport,
    ConversionVerificationError,
    convert_checkpoint_with_report,
)
from attndistill_hf.reference_vit import CHECKPOINT_FORMATS


@dataclass
class ConvertArguments:
    """The checkpoint, its layout, where the model goes, and what to check it against."""

    checkpoint: str = field(
        metadata={
            "help": "Path of the original checkpoint (.pth read with weights_only=True, or .safetensors). Full "
            "training checkpoints are unwrapped (teacher preferred over student); module./backbone. prefixes "
            "and heads are removed."
        }
    )
    format: str = field(
        metadata={
            "help": "Layout of the checkpoint: dino, mugs, ibot and timm give a ViTModel; mae gives a ViTMAEModel "
            "saved with mask_ratio 0 (masking off, as a teacher needs).",
            "choices": CHECKPOINT_FORMATS,
        }
    )
    output_dir: str = field(
        metadata={
            "help": "Folder that receives model.safetensors, config.json, preprocessor_config.json and "
            "conversion_report.json (written only once verification passes)."
        }
    )
    arch: str | None = field(
        default=None,
        metadata={
            "help": "Expected architecture; its width and depth are checked against the tensors and its head "
            "count is used. Default: inferred from the tensors.",
            "choices": sorted(ARCH_PRESETS),
        },
    )
    patch_size: int | None = field(
        default=None,
        metadata={"help": "Expected patch size, checked against the patch-embedding kernel. Default: read from it."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Expected native image size, checked against the position-embedding table (patches per side "
            "x patch size). Default: read from the table."
        },
    )
    num_heads: int | None = field(
        default=None,
        metadata={
            "help": "Number of attention heads (not recoverable from the weights). Default: from --arch, else from "
            "the width (192->3, 384->6, 768->12, 1024->16)."
        },
    )
    tolerance: float = field(
        default=1e-4,
        metadata={
            "help": "Largest accepted max |difference| of the CLS token and of the last-layer CLS attention "
            "between the converted model and the original architecture."
        },
    )
    verify: bool = field(
        default=True,
        metadata={"help": "Compare the converted model with the original architecture (--no_verify: not recommended)."},
    )


def main(argv: Sequence[str] | None = None) -> ConversionReport:
    """``python recipes/convert_teacher.py [config.yaml] --checkpoint ... --format ... --output_dir ...``."""
    (args,) = parse_config_and_flags((ConvertArguments,), argv, description=__doc__)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _, report = convert_checkpoint_with_report(
            args.checkpoint,
            args.format,
            args.output_dir,
            arch=args.arch,
            patch_size=args.patch_size,
            image_size=args.image_size,
            num_heads=args.num_heads,
            verify=args.verify,
            tolerance=args.tolerance,
        )
    except ConversionVerificationError as error:
        raise RunFailedError(f"verification failed: {error}") from None
    print(report.summary())
    return report


if __name__ == "__main__":
    run_recipe(main)
