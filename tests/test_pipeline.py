"""``distill()``: a whole run from Python, with the recipe's fields as keyword arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from attndistill_hf import DistillResult, distill

from helpers import tiny_teacher, write_image_folder

QUICK = {"image_size": 32, "patch_size": 8, "use_cpu": True, "per_device_train_batch_size": 4, "max_steps": 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    tiny_teacher(root / "teacher")
    return root / "teacher", write_image_folder(root / "images", per_class=4)


@pytest.mark.slow
def test_distill_runs_from_python_and_its_student_loads_with_automodel(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    teacher, images = inputs
    result = distill(
        teacher_name_or_path=teacher,  # a Path: fields take what a config file would hold
        student_preset="vit-tiny-patch16",
        train_dir=images,
        eval_dir=images,
        output_dir=tmp_path / "out",
        **QUICK,
    )
    assert isinstance(result, DistillResult) and result.finished_at_step is None
    assert result.student.folder == tmp_path / "out"
    # 12 labelled images in the bank: k-NN at k=10 and at the bank's size, top-1 in percent.
    assert sorted(result.student.knn, key=int) == ["10", "12"]
    assert all(0.0 <= scores["top1"] <= 100.0 for scores in result.student.knn.values())
    student = AutoModel.from_pretrained(result.student.folder)
    assert type(student).__name__ == "ViTModel" and student.config.patch_size == 8
    with torch.no_grad():
        assert student(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state.shape == (1, 17, 192)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# keyword arguments\n" in card and "max_steps: 2\n" in card and str(teacher) not in card


@pytest.mark.slow
def test_a_config_file_with_fields_over_it_and_several_students(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    teacher, images = inputs
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher_name_or_path: {teacher}\ntrain_dir: {images}\nmax_steps: 5\nimage_size: 32\n")
    result = distill(
        config,
        output_dir=str(tmp_path / "out"),
        students=[{"name": "both"}, {"name": "attn", "proj_loss_weight": 0.0}],
        student_preset="vit-tiny-patch16",
        patch_size=8,
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=1,  # over the file's 5
    )
    assert set(result.students) == {"both", "attn"}
    assert {name: student.folder for name, student in result.students.items()} == {
        "both": tmp_path / "out" / "both",
        "attn": tmp_path / "out" / "attn",
    }
    assert all(student.knn is None for student in result.students.values())  # no evaluation data given
    assert result.train_metrics["epoch"] > 0
    with pytest.raises(AttributeError, match="several students"):
        _ = result.student
    assert AutoModel.from_pretrained(tmp_path / "out" / "attn").config.hidden_size == 192


def test_a_mistake_in_the_fields_is_the_recipes_one_line_error_before_anything_loads(tmp_path: Path) -> None:
    base = {"teacher_name_or_path": str(tmp_path / "missing"), "output_dir": str(tmp_path / "out")}
    with pytest.raises(ValueError, match=r"^Unknown keys in the keyword arguments: max_step\. See --help"):
        distill(**base, max_step=3)
    with pytest.raises(ValueError, match=r"^--attn_loss_weight must be a finite number >= 0, got nan\.$"):
        distill(**base, attn_loss_weight=float("nan"))
    with pytest.raises(ValueError, match=r"^max_steps in the keyword arguments: invalid int value: 'three'$"):
        distill(**base, max_steps="three")
    config = tmp_path / "run.yaml"
    config.write_text("student_preset: vit-tiny-patch16\n")
    # None clears a field, as null does in a config file.
    with pytest.raises(ValueError, match=r"^Give --student_preset or --student_name_or_path\.$"):
        distill(config, **base, student_preset=None)
    assert not (tmp_path / "out").exists()
