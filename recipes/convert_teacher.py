"""Convert an original self-supervised ViT checkpoint into a transformers teacher and verify it.

Example:

    python recipes/convert_teacher.py --checkpoint dino_deitsmall8_pretrain.pth --format dino \\
        --output_dir teachers/dino-vits8

The output folder loads with ``AutoModel.from_pretrained`` / ``AutoImageProcessor.from_pretrained``
(no remote code) and with ``attndistill_hf.models.load_teacher``. The verification report (max
difference of the CLS token and of the last-layer CLS attention against the original architecture) is
printed and saved as ``conversion_report.json``. Exit status: 0 converted and verified, 1 verification
failed, 2 the checkpoint could not be read or does not match a supported ViT.
"""

from __future__ import annotations

import argparse
import logging
import sys

from attndistill_hf.convert import (
    ARCH_PRESETS,
    CheckpointError,
    ConversionVerificationError,
    convert_checkpoint_with_report,
)
from attndistill_hf.reference_vit import CHECKPOINT_FORMATS


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every flag is documented in ``--help``."""
    parser = argparse.ArgumentParser(
        description=(
            "Convert a DINO / Mugs / iBOT / MAE / timm ViT checkpoint (.pth or .safetensors, original key "
            "names) to a transformers model saved with save_pretrained, then reload it and check it against "
            "the original architecture on a random input."
        )
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Path of the original checkpoint (.pth read with weights_only=True, or .safetensors). Full "
        "training checkpoints are unwrapped (teacher preferred over student); module./backbone. prefixes "
        "and heads are removed.",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=CHECKPOINT_FORMATS,
        help="Layout of the checkpoint: dino, mugs, ibot and timm give a ViTModel; mae gives a ViTMAEModel "
        "saved with mask_ratio 0 (masking off, as a teacher needs).",
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        help="Folder that receives model.safetensors, config.json, preprocessor_config.json and "
        "conversion_report.json (written only once verification passes).",
    )
    parser.add_argument(
        "--arch",
        choices=sorted(ARCH_PRESETS),
        default=None,
        help="Expected architecture; its width and depth are checked against the tensors and its head count "
        "is used. Default: inferred from the tensors.",
    )
    parser.add_argument(
        "--patch_size",
        type=int,
        default=None,
        help="Expected patch size, checked against the patch-embedding kernel. Default: read from the kernel.",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Expected native image size, checked against the position-embedding table (patches per side x "
        "patch size). Default: read from the table.",
    )
    parser.add_argument(
        "--num_heads",
        type=int,
        default=None,
        help="Number of attention heads (not recoverable from the weights). Default: from --arch, else from "
        "the width (192->3, 384->6, 768->12, 1024->16).",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="Largest accepted max |difference| of the CLS token and of the last-layer CLS attention between "
        "the converted model and the original architecture (default 1e-4).",
    )
    parser.add_argument(
        "--no_verify",
        action="store_true",
        help="Skip the comparison with the original architecture (not recommended).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conversion and print its report; return the process exit status."""
    args = build_parser().parse_args(argv)
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
            verify=not args.no_verify,
            tolerance=args.tolerance,
        )
    except ConversionVerificationError as error:
        print(f"error: verification failed: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
