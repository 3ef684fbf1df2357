"""The benchmark's own code path at tiny scale on the CPU: it runs, and its report has the promised shape.
No timing is asserted (speed and memory are measured on a GPU, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_training.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_report_structure(tmp_path):
    bench = load_benchmark()
    report = bench.main(
        ["--tiny", "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md")]
    )

    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert {"device", "torch", "bf16_matmul_tflops", "tflop_per_image_768", "command", "rows"} <= set(report)
    assert report["bf16_matmul_tflops"] > 0
    rows = report["rows"]
    assert {(r["config"], r["batch"]) for r in rows} == {
        (config, batch) for config in ("ours", "a1111", "diffusers-example") for batch in (1, 2)
    }
    for row in rows:
        assert set(row) == set(bench.Row.__dataclass_fields__)
        assert row["status"] == "ok" and row["arch"] == "tiny" and row["cap_gib"] is None
        assert row["images_per_s"] > 0 and row["tflop_per_image"] > 0 and row["utilisation"] > 0
        assert row["peak_allocated_gib"] is None  # no CUDA memory statistics on the CPU
        # the no-GPU estimate sits beside it, for the configurations it models
        assert (row["estimated_allocated_gib"] is None) == (row["config"] == "diffusers-example")
    plans = {r["config"]: (r["checkpointing"], r["precision"]) for r in rows}
    assert plans == {"ours": ("off", "fp32"), "a1111": ("all", "fp32"), "diffusers-example": ("off", "fp32")}

    table = (tmp_path / "bench.md").read_text()
    assert bench.TABLE_HEADER in table and table.count("| tiny |") == len(rows)


MONITORS_SCRIPT = SCRIPT.parent / "bench_monitors.py"


def test_tiny_monitor_benchmark_runs_both_ways_and_prints_the_ratio(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_monitors", MONITORS_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)

    report = bench.main(["--tiny", "--json", str(tmp_path / "monitors.json")])

    assert json.loads((tmp_path / "monitors.json").read_text()) == report
    assert len(report["seconds_on"]) == len(report["seconds_off"]) == 1
    assert report["ratio"] > 0 and report["preview_in_training_steps"] > 0
    assert "monitor-overhead ratio" in capsys.readouterr().out
