"""bench/gpu_step.py (issue 10) kept working on the CPU with the tiny preset: every configuration runs the
production step through Trainer.optimizer_step, the phase pass and the validation render, and the
results come out as a markdown table and JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_step", REPO / "bench/gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_step_bench_runs_every_config_on_cpu(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "gpu_step.json"
    results = bench.main(["--device", "cpu", "--preset", "tiny", "--resolution", "64", "--steps", "2",
                          "--warmup", "1", "--phase-steps", "2", "--render", "eager", "--render-steps", "2",
                          "--render-repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    configs = results["configs"]
    assert sorted(configs) == ["a", "b", "c", "d"]
    for key, result in configs.items():
        assert "error" not in result, (key, result.get("error"))
        assert len(result["step_times"]) == 2 and result["s_per_step"] > 0
        assert result["peak_rss_gib"] > 0
        assert sum(result["phase_share"].values()) == pytest.approx(1.0)
        assert all(v > 0 for v in result["phase_s"].values())
        assert result["ema_update_s"] > 0  # the seed recipe has use_ema
    assert configs["a"]["quantized"] and not configs["b"]["quantized"]
    assert not configs["c"]["gradient_checkpointing"] and configs["a"]["gradient_checkpointing"]
    assert configs["a"]["batch"] == 4 and configs["d"]["batch"] == 1
    assert results["adapter"]["parameters"] > 0 and results["adapter"]["gradient_bytes"] > 0
    render = results["render"]["eager"]
    assert render["s_per_image"] > 0 and len(render["times"]) == 1
    table = capsys.readouterr().out
    assert "| (a) production" in table and "| (d) batch 1 | 1 |" in table and "| eager |" in table


def test_gpu_step_bench_refuses_what_it_cannot_run():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "a,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--resolution", "1000"])


@pytest.mark.slow
def test_gpu_step_bench_compiled_render_on_cpu(tmp_path):
    """The torch.compile path of the render timing (validation_torch_compile), on the tiny model."""
    bench = load_bench()
    results = bench.main(["--device", "cpu", "--preset", "tiny", "--resolution", "64", "--configs", "a",
                          "--steps", "1", "--warmup", "0", "--phase-steps", "1", "--render", "compiled",
                          "--render-steps", "2", "--render-repeats", "1"])
    compiled = results["render"]["compiled"]
    assert "error" not in compiled, compiled.get("error")
    assert compiled["s_per_image"] > 0
