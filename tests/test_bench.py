"""The training-step benchmark runs on CPU (smoke), and its default step is numerically the naive step."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_step.py"
# Tiny models, 2 images of 32 px: patch-16 grid 2x2, patch-8 grid 4x4.
TINY = ["--device", "cpu", "--tiny", "--batch_size", "2", "--image_size", "32", "--warmup", "1", "--steps", "1"]


def load_bench() -> ModuleType:
    name = "attndistill_bench_step"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def test_smoke_rows_for_every_pair_and_mode(bench: ModuleType, tmp_path: Path, capsys) -> None:
    json_path = tmp_path / "rows.json"
    rows = bench.main([*TINY, "--modes", "naive,default,floor", "--json", str(json_path)])
    pairs = [spec.label for spec in bench.PAIRS.values()]
    assert [(row["pair"], row["mode"]) for row in rows] == [
        (pair, mode) for pair in pairs for mode in ("naive", "default", "floor")
    ]
    for row in rows:
        assert row["img_per_s"] > 0 and row["batch"] == 2 and row["image_size"] == 32
        assert row["torch"] == torch.__version__ and row["device"].startswith("CPU") and row["date"]
    written = json.loads(json_path.read_text())
    assert written == json.loads(json.dumps(rows))
    printed = capsys.readouterr().out
    assert "| pair | mode | img/s | vs naive | vs floor |" in printed
    assert "ViT-S/8 -> ViT-S/16 (case b) | floor" in printed


def test_compile_mode_runs_without_recompiling(bench: ModuleType) -> None:
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    rows = bench.main(
        [*TINY, "--steps", "2", "--pairs", "s16-t16", "--modes", "default+compile", "--compile_backend", "aot_eager"]
    )
    assert len(rows) == 1 and rows[0]["mode"] == "default+compile" and rows[0]["img_per_s"] > 0
    assert rows[0]["compile_backend"] == "aot_eager"
    # Capture hooks are installed before compiling: one whole graph each for the teacher and the
    # trainable module, no graph break and no per-step recompilation.
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("pair_key", ["s16-t16", "s8-s16", "b16-s16"])
def test_default_step_equals_naive_step(bench: ModuleType, pair_key: str) -> None:
    pair = bench.PAIRS[pair_key]
    # The tiny models keep the attention case of the pair: different heads (c) or patch grids (b).
    setup = bench.make_setup(pair, "default", image_size=32, device=torch.device("cpu"), tiny=True)
    teacher, student = setup.teacher.config, setup.module.student.config
    heads_differ = teacher.num_attention_heads != student.num_attention_heads
    grids_differ = teacher.patch_size != student.patch_size
    assert (heads_differ, grids_differ) == ((True, False) if pair.case == "c" else (False, True))

    result = bench.compare_naive_default(pair, batch=3, image_size=32, device=torch.device("cpu"), tiny=True)
    assert result.rel_loss <= bench.LOSS_TOLERANCE
    assert result.rel_grad <= bench.LOSS_TOLERANCE
    assert result.grads_naive.keys() == result.grads_default.keys()
    assert any(name.startswith("student.embeddings") for name in result.grads_naive)
    assert any(name.startswith("loss_fn.projector") for name in result.grads_naive)
    for name, grad in result.grads_default.items():
        torch.testing.assert_close(grad, result.grads_naive[name], rtol=1e-4, atol=1e-6, msg=name)


def test_check_loss_flag_passes_and_fails_loudly(bench: ModuleType, monkeypatch, capsys) -> None:
    rows = bench.main([*TINY, "--pairs", "s8-s16", "--modes", "default", "--check_loss", "--check_batch", "2"])
    assert len(rows) == 1
    assert "ViT-S/8 -> ViT-S/16 (case b): naive" in capsys.readouterr().out
    monkeypatch.setattr(bench, "LOSS_TOLERANCE", -1.0)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--pairs", "s16-t16", "--modes", "default", "--check_loss", "--check_batch", "2"])
    assert exit_info.value.code == 1


def test_profile_lists_top_ops(bench: ModuleType, capsys) -> None:
    rows = bench.main(
        [*TINY, "--pairs", "s16-t16", "--profile", "default", "--profile_steps", "1", "--profile_rows", "5"]
    )
    assert 0 < len(rows) <= 5
    assert all(row["mode"] == "default" and row["self_ms_per_step"] >= 0 for row in rows)
    assert rows[0]["self_share"] >= rows[-1]["self_share"]
    assert "profile: ViT-S/16 -> ViT-T/16 (case c), mode default" in capsys.readouterr().out


def test_table_ratios(bench: ModuleType) -> None:
    def row(mode: str, speed: float, peak: float) -> dict:
        return {"pair": "P", "mode": mode, "img_per_s": speed, "peak_gib": peak, "peak_kind": "cuda_max_allocated"}

    table = bench.format_table([row("naive", 100.0, 30.0), row("default", 250.0, 10.0), row("floor", 255.0, 10.0)])
    assert "| P | default | 250.0 | 2.50x | 0.98x | 10.00 | 0.33x |" in table


def test_bad_arguments_are_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--modes", "fastest"])
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--image_size", "40"])
