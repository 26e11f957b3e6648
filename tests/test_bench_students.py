"""bench/bench_students.py: one run with N students against N single-student runs, on tiny models."""

from __future__ import annotations

import pytest

from helpers import REPO, load_script


def test_rows_compare_one_run_with_separate_runs_minus_the_shared_teacher(capsys: pytest.CaptureFixture) -> None:
    bench = load_script(REPO / "bench" / "bench_students.py", "attndistill_bench_students")
    rows = bench.main(["--sizes", "tiny", "--students", "1", "3", "--warmup", "0", "--steps", "1", "--threads", "1"])
    assert [row["students"] for row in rows] == [1, 3]
    for row in rows:
        expected = row["separate_s"] - (row["students"] - 1) * row["teacher_s"]
        assert row["ratio_to_target"] == pytest.approx(row["together_s"] / expected)
        assert row["together_s"] > 0 and row["teacher_s"] > 0
    table = capsys.readouterr().out
    assert "| tiny | 3 |" in table and ("(met)" in table or "(missed)" in table)
