"""Original checkpoints are untrusted files: reading one must never run code from it.

Each crafted file below carries a payload that, when unpickled normally, writes a marker file. The
tests show that ``load_checkpoint_file`` / ``convert_checkpoint`` refuse it with an explanation and the
marker never appears, and then that the payload is live (a plain ``torch.load(weights_only=False)``
does write the marker), so the tests would fail if the protection were removed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from attndistill_hf.convert import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint_file,
)
from attndistill_hf.reference_vit import ReferenceViT

PACKAGE_DIRS = [Path(__file__).resolve().parents[1] / name for name in ("attndistill_hf", "recipes")]


class WritesMarker:
    """Unpickling this object calls ``exec`` with code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('executed')",))


def _payloads(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Crafted files (name -> (checkpoint, marker)) in the zip format, the legacy format and nested in a state dict."""
    files: dict[str, tuple[Path, Path]] = {}
    marker = tmp_path / "marker_zip"
    torch.save(WritesMarker(marker), tmp_path / "evil_zip.pth")
    files["zip"] = (tmp_path / "evil_zip.pth", marker)

    marker = tmp_path / "marker_legacy"
    torch.save(WritesMarker(marker), tmp_path / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    files["legacy"] = (tmp_path / "evil_legacy.pth", marker)

    marker = tmp_path / "marker_raw_pickle"
    with open(tmp_path / "evil_raw.pth", "wb") as handle:
        pickle.dump(WritesMarker(marker), handle, protocol=2)
    files["raw_pickle"] = (tmp_path / "evil_raw.pth", marker)

    # A real backbone state dict with the payload hidden among its entries.
    marker = tmp_path / "marker_nested"
    state = dict(ReferenceViT(32, 1, 2, 8, 16).state_dict())
    torch.save({"teacher": state, "args": WritesMarker(marker)}, tmp_path / "evil_nested.pth")
    files["nested"] = (tmp_path / "evil_nested.pth", marker)
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw_pickle", "nested"])
def test_crafted_pickle_is_refused_and_never_executed(tmp_path: Path, kind: str) -> None:
    checkpoint, marker = _payloads(tmp_path)[kind]
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(checkpoint)
    message = str(info.value)
    assert str(checkpoint) in message
    assert "never executed" in message and "safetensors" in message
    assert not marker.exists(), "the checkpoint's code ran"

    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(checkpoint, "dino", tmp_path / "out", num_heads=2)
    assert not marker.exists(), "the checkpoint's code ran during conversion"
    assert not (tmp_path / "out").exists()

    # The payload is live: an unrestricted load runs it. Without weights_only the test above would fail.
    with contextlib.suppress(Exception):  # only the side effect matters here
        torch.load(checkpoint, weights_only=False)
    assert marker.read_text() == "executed"


def test_refusal_names_the_offending_global(tmp_path: Path) -> None:
    checkpoint, _ = _payloads(tmp_path)["zip"]
    with pytest.raises(UnsafeCheckpointError, match="exec"):
        load_checkpoint_file(checkpoint)


def test_training_checkpoint_arguments_are_allowed(tmp_path: Path) -> None:
    """DINO-style checkpoints keep their argparse.Namespace; that one harmless class is allowed."""
    import argparse

    path = tmp_path / "full.pth"
    torch.save({"teacher": {"cls_token": torch.ones(1, 1, 4)}, "args": argparse.Namespace(arch="vit_small")}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["args"].arch == "vit_small"
    torch.testing.assert_close(loaded["teacher"]["cls_token"], torch.ones(1, 1, 4))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "teacher.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint_file(tmp_path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_names_the_path(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save({"cls_token": torch.randn(1, 1, 32), "pos_embed": torch.randn(1, 17, 32)}, good)
    else:
        from safetensors.torch import save_file

        save_file({"cls_token": torch.randn(1, 1, 32), "pos_embed": torch.randn(1, 17, 32)}, str(good))
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(bad))) as info:
        load_checkpoint_file(bad)
    assert "truncated" in str(info.value)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint_file(path)


def test_every_torch_load_in_the_project_is_weights_only() -> None:
    """A guard for future code: no ``torch.load`` call in the package or recipes without weights_only=True."""
    offenders = []
    for directory in PACKAGE_DIRS:
        for source in directory.rglob("*.py"):
            text = source.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start() : text.find(")", match.start()) + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{source.name}: {call}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
