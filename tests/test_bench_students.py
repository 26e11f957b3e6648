"""bench/bench_students.py: one run with N students against N single-student runs, on tiny models."""

from __future__ import annotations

from types import ModuleType

import pytest

from helpers import REPO, load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(REPO / "bench" / "bench_students.py", "attndistill_bench_students")


def table_cells(table: str) -> dict[int, list[str]]:
    """The cells of each data row of a printed table, by its number of students."""
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 8 and cells[1].isdigit():
            rows[int(cells[1])] = cells
    return rows


def verdict(bench: ModuleType, ratio: float) -> str:
    return f"{ratio:.3f} ({'met' if ratio <= bench.TARGET else 'missed'})"


def test_rows_compare_one_run_with_separate_runs_minus_the_shared_teacher(
    bench: ModuleType, capsys: pytest.CaptureFixture
) -> None:
    rows = bench.main(["--sizes", "tiny", "--students", "1", "3", "--warmup", "0", "--steps", "1", "--threads", "1"])
    assert [row["students"] for row in rows] == [1, 3]
    for row in rows:
        expected = row["separate_s"] - (row["students"] - 1) * row["teacher_s"]
        assert row["ratio_to_target"] == pytest.approx(row["together_s"] / expected)
        assert row["together_s"] > 0 and row["teacher_s"] > 0
    # Each printed row shows its run's numbers, and the verdict that its ratio gives against the target.
    cells = table_cells(capsys.readouterr().out)
    assert sorted(cells) == [1, 3]
    for row in rows:
        size, _, batch, together, separate, teacher, ratio = cells[row["students"]][:7]
        assert (size, int(batch)) == ("tiny", row["batch"])
        assert (float(together), float(separate), float(teacher)) == pytest.approx(
            (row["together_s"], row["separate_s"], row["teacher_s"]), abs=5e-5
        )
        assert ratio == verdict(bench, row["ratio_to_target"])


def test_the_verdict_is_met_up_to_the_target_and_missed_above(bench: ModuleType, capsys: pytest.CaptureFixture) -> None:
    def row(students: int, ratio: float) -> dict:
        together, teacher = 1.0, 0.25
        separate = together / ratio + (students - 1) * teacher
        return {
            "size": "tiny",
            "students": students,
            "batch": 16,
            "together_s": together,
            "separate_s": separate,
            "teacher_s": teacher,
            "ratio_to_target": ratio,
            "speedup_vs_separate": separate / together,
            "together_peak_gib": None,
            "separate_peak_gib": None,
        }

    bench.print_table([row(1, 0.98), row(2, bench.TARGET), row(3, bench.TARGET + 0.01)])
    cells = table_cells(capsys.readouterr().out)
    assert {students: cells[students][6] for students in cells} == {
        1: "0.980 (met)",
        2: f"{bench.TARGET:.3f} (met)",
        3: f"{bench.TARGET + 0.01:.3f} (missed)",
    }
