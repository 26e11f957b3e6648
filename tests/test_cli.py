"""Recipe command lines: config file + flags, null values, no abbreviations, one-line errors, broken config
files, a launch that started one process where several were asked for."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from attndistill_hf.cli import (
    RunFailedError,
    check_single_process_launch,
    parse_config_and_flags,
    read_config_file,
    run_recipe,
)
from attndistill_hf.models import TeacherLoadError, check_model_location, load_teacher

from helpers import distill_refusal, load_recipe

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Fields:
    max_steps: int = field(default=10, metadata={"help": "Steps to run."})
    eval_split: str | None = field(default="test", metadata={"help": "Evaluation split."})
    final_eval: bool = field(default=True, metadata={"help": "Evaluate at the end."})


def test_flags_override_the_file_and_null_clears_a_field(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\neval_split: null\n")
    (fields,) = parse_config_and_flags((Fields,), [str(config)])
    assert (fields.max_steps, fields.eval_split, fields.final_eval) == (3, None, True)
    (fields,) = parse_config_and_flags((Fields,), [str(config), "--max_steps", "5", "--eval_split", "validation"])
    assert (fields.max_steps, fields.eval_split) == (5, "validation")
    (fields,) = parse_config_and_flags((Fields,), [str(config), "--no_final_eval"])
    assert fields.final_eval is False
    config.write_text("max_step: null\n")
    with pytest.raises(ValueError, match=r"Unknown keys in .*run\.yaml: max_step"):
        parse_config_and_flags((Fields,), [str(config)])


def test_abbreviated_flags_are_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown arguments: --max_step 7"):
        parse_config_and_flags((Fields,), ["--max_step", "7"])
    config = tmp_path / "run.yaml"
    config.write_text("max_step: 9\n")
    with pytest.raises(ValueError, match="Unknown arguments: --max_step 9"):
        parse_config_and_flags((Fields,), [str(config)])


def test_a_bad_value_is_one_line_naming_the_field_and_where_it_was_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: abc\nfinal_eval: maybe\n")
    with pytest.raises(ValueError, match=rf"^max_steps in {config}: invalid int value: 'abc'$"):
        parse_config_and_flags((Fields,), [str(config)])
    config.write_text("final_eval: maybe\n")
    with pytest.raises(ValueError, match=rf"^final_eval in {config}: Truthy value expected: got maybe"):
        parse_config_and_flags((Fields,), [str(config)])
    with pytest.raises(ValueError, match=r"^--max_steps: invalid int value: 'x'$"):
        parse_config_and_flags((Fields,), ["--max_steps", "x"])
    config.write_text("max_steps: abc\n")  # overridden, but still read
    with pytest.raises(ValueError, match=rf"^max_steps in {config} or on the command line: invalid int value: 'abc'$"):
        parse_config_and_flags((Fields,), [str(config), "--max_steps", "4"])
    assert capsys.readouterr().err == ""  # no usage text


def test_help_says_what_a_negated_flag_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config_and_flags((Fields,), ["--help"], description="Usage:\n    line one\n    line two")
    text = capsys.readouterr().out
    assert "Turn --final_eval off." in text
    assert "    line one\n    line two" in text  # the description keeps its layout


def test_run_recipe_turns_input_mistakes_into_one_line(monkeypatch, capsys) -> None:
    def main() -> None:
        raise FileNotFoundError("--train_dir /nowhere does not exist")

    monkeypatch.delenv("ATTNDISTILL_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:
        run_recipe(main)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == "error: --train_dir /nowhere does not exist"
    with pytest.raises(SystemExit):
        run_recipe(lambda: (_ for _ in ()).throw(KeyError("Example has no label column 'label'")))
    assert capsys.readouterr().err.startswith("error: Example has no label column 'label'\n")
    monkeypatch.setenv("ATTNDISTILL_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError):
        run_recipe(main)
    assert run_recipe(lambda: 7) == 7


def test_run_recipe_reports_a_failed_run_with_status_1(monkeypatch, capsys) -> None:
    def main() -> None:
        raise RunFailedError("verification failed: CLS token differs by 3e-2")

    for full_error in ("0", "1"):  # as for a failed push: one line, whatever ATTNDISTILL_FULL_ERROR says
        monkeypatch.setenv("ATTNDISTILL_FULL_ERROR", full_error)
        with pytest.raises(SystemExit) as stopped:
            run_recipe(main)
        assert stopped.value.code == 1
        assert capsys.readouterr().err == "error: verification failed: CLS token differs by 3e-2\n"


def test_missing_local_model_is_named_by_its_role(tmp_path: Path) -> None:
    with pytest.raises(TeacherLoadError, match=r"The teacher directory '.*/missing' does not exist"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(TeacherLoadError, match=r"The model directory './nowhere/at/all' does not exist"):
        load_teacher("./nowhere/at/all", role="model")
    with pytest.raises(TeacherLoadError, match=r"The student directory '.*/gone' does not exist"):
        load_recipe("finetune").main(["--student_dir", str(tmp_path / "gone"), "--output_dir", str(tmp_path)])
    assert check_model_location("facebook/dino-vits16") == "facebook/dino-vits16"  # a Hub id is left to the Hub
    assert check_model_location(str(tmp_path)) == str(tmp_path)


@pytest.mark.slow
def test_a_recipe_reports_a_bad_path_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "eval_knn.py"), "--model_name_or_path", str(tmp_path / "gone")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-2].startswith(f"error: The model directory '{tmp_path / 'gone'}' does not exist")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "run.yaml",
            "max_steps: 3\nteacher_name_or_path: [unclosed\n",
            "line 2: not valid YAML (while parsing a flow sequence: expected ',' or ']', but got '<stream end>').",
        ),
        (
            "run.yaml",
            "max_steps: 3\n  image_size: 32\n",
            "line 2: not valid YAML (mapping values are not allowed here).",
        ),
        ("run.json", '{"max_steps": 3,\n "image_size": }\n', "line 2: not valid JSON (Expecting value)."),
    ],
)
def test_a_broken_config_file_is_one_line_naming_the_file_and_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ValueError, match="not valid"):
        read_config_file(config)
    status, error = distill_refusal([str(config), "--output_dir", str(tmp_path / "out")], capsys)
    assert (status, error) == (2, f"error: Config file {config}, {message}")


def test_a_cpu_launch_that_started_one_of_several_processes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["recipes/distill.py", "--max_steps", "2"])
    launcher = ["python", "accelerate", "launch", "--num_processes", "2", "--cpu", "recipes/distill.py"]
    # What `accelerate launch --num_processes 2 --cpu` gives its one process: CPU, and a rendezvous address.
    one_of_two = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(ValueError) as refused:
        check_single_process_launch(one_of_two, launcher)
    assert str(refused.value) == (
        "accelerate launch --cpu started 1 process, not the 2 asked for (Accelerate starts several CPU processes "
        "only through mpirun); run: torchrun --nproc_per_node 2 recipes/distill.py --max_steps 2 --use_cpu true"
    )
    # One process asked for (no rendezvous address), a torchrun rank, an MPI rank, no Accelerate at all: fine.
    check_single_process_launch({"ACCELERATE_USE_CPU": "True"}, launcher)
    check_single_process_launch({**one_of_two, "WORLD_SIZE": "2"}, launcher)
    check_single_process_launch({**one_of_two, "OMPI_COMM_WORLD_SIZE": "2"}, launcher)
    check_single_process_launch({"MASTER_ADDR": "10.0.0.1"}, [])
