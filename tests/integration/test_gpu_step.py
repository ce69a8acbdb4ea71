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


def test_gpu_step_bench_runs_every_config_on_cpu(tmp_path, capsys, one_thread):
    bench = load_bench()
    out = tmp_path / "gpu_step.json"
    results = bench.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--resolution",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--phase-steps",
            "2",
            "--render",
            "eager",
            "--render-steps",
            "2",
            "--render-repeats",
            "1",
            "--out",
            str(out),
        ]
    )
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
    results = bench.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--resolution",
            "64",
            "--configs",
            "a",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--phase-steps",
            "1",
            "--render",
            "compiled",
            "--render-steps",
            "2",
            "--render-repeats",
            "1",
        ]
    )
    compiled = results["render"]["compiled"]
    assert "error" not in compiled, compiled.get("error")
    assert compiled["s_per_image"] > 0


@pytest.fixture
def one_thread():
    """On a shared 2-core machine torch's 2 OpenMP threads wait on each other: 1 thread is ~30x faster here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gpu_step_bench_profile_on_cpu(tmp_path, capsys, one_thread):
    """--profile at the tiny preset: FLOPs, TFLOP/s, MFU (n/a on the CPU, with the reason) and the trace
    summary come out in the JSON and the printout, with values that make sense."""
    bench = load_bench()
    out = tmp_path / "gpu_step.json"
    results = bench.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--resolution",
            "64",
            "--configs",
            "a",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--phase-steps",
            "1",
            "--render",
            "off",
            "--profile",
            "--profile-steps",
            "1",
            "--trace",
            str(tmp_path / "trace.json"),
            "--out",
            str(out),
        ]
    )
    profile = json.loads(out.read_text())["configs"]["a"]["profile"]
    assert profile["flops_per_step"] > 0
    assert "quanto.qbytes_mm" in profile["flops_by_op"]  # the int8 base's forward matmuls are counted
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in profile["flops_by_op"]  # and attention
    assert sum(profile["flops_by_op"].values()) == profile["flops_per_step"]
    mfu = profile["mfu"]
    assert mfu["achieved_tflops"] > 0 and mfu["mfu"] == "n/a" and "CPU" in mfu["mfu_reason"]
    trace = profile["trace"]
    assert trace["launches_per_step"] > 0 and trace["time_per_step_ms"] > 0
    shares = trace["region_share"]
    assert set(shares) == {"lokr", "quanto_linear", "attention", "norms", "optimizer", "other"}
    assert all(0 <= v <= 1 for v in shares.values()) and sum(shares.values()) <= 1 + 1e-9
    # every marked region ran in this step, so each got some of the time
    assert all(shares[r] > 0 for r in ("lokr", "quanto_linear", "attention", "norms", "optimizer"))
    assert trace["sdpa_ops"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]  # diffusers runs SDPA
    assert 0 < len(trace["top"]) <= 25 and all(row["ms_per_step"] >= 0 for row in trace["top"])
    assert (tmp_path / "trace.json").stat().st_size > 0
    assert results["configs"]["a"]["profile"]["flops_per_step"] == profile["flops_per_step"]
    # counting on fake tensors (how sd35m's FLOPs are had without a GPU) agrees with the real step's count
    fake = bench.step_profile.architecture_flops(
        "tiny",
        4,
        64,
        bench.load_config(bench.REPO / "configs/sd3/config.json", {"resume_from_checkpoint": "none"}).lycoris,
        bench.TEXT_TOKENS,
    )
    assert fake["lokr_ckpt"] == profile["flops_per_step"]
    assert fake["lokr_no_ckpt"] < fake["lokr_ckpt"] and 0 < fake["lokr_share"] < 1
    printed = capsys.readouterr().out
    assert "MFU n/a (the CPU" in printed and "share: lokr" in printed and "| top " in printed


def test_region_ranges_leave_the_model_and_optimizer_as_they_were():
    import torch

    bench = load_bench()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # wraps optimizer.step on the instance
    before = vars(optimizer)["step"]
    with bench.step_profile.region_ranges(model, torch.nn.Module(), optimizer):
        assert vars(optimizer)["step"] is not before and model[1]._forward_hooks
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    assert vars(optimizer)["step"] is before and not model[1]._forward_hooks and not model[1]._forward_pre_hooks


def test_mfu_against_the_peak_table():
    step_profile = load_bench().step_profile
    assert step_profile.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert step_profile.peak_bf16_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert step_profile.peak_bf16_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert step_profile.peak_bf16_tflops("NVIDIA L40S") == pytest.approx(362.05)
    assert step_profile.peak_bf16_tflops("NVIDIA L4") == pytest.approx(121.0)
    assert step_profile.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    # the issue's own arithmetic: 1.6e14 FLOPs in 1.78 s on an H100 SXM is about 9% of peak
    m = step_profile.mfu(1.6e14, 1.78, "cuda", "NVIDIA H100 80GB HBM3")
    assert m["achieved_tflops"] == pytest.approx(89.9, abs=0.1) and m["mfu"] == pytest.approx(0.0909, abs=1e-3)
    unknown = step_profile.mfu(1e12, 1.0, "cuda", "Some Future GPU")
    assert unknown["mfu"] == "n/a" and "Some Future GPU" in unknown["mfu_reason"]


def test_lokr_bypass_forms_agree():
    """The bench's bypass prototypes compute LyCORIS's kron(w1, w2) bypass, to fp32 rounding."""
    import torch

    step_profile = load_bench().step_profile
    g = torch.Generator().manual_seed(0)
    for s1, s2 in (((2, 2), (48, 32)), ((4, 4), (24, 16))):
        h = torch.randn(3, 5, s1[1] * s2[1], generator=g, dtype=torch.float64)
        w1, w2 = torch.randn(*s1, generator=g, dtype=torch.float64), torch.randn(*s2, generator=g, dtype=torch.float64)
        ref = step_profile.bypass_materialised(h, w1, w2)
        torch.testing.assert_close(step_profile.bypass_library(h, w1, w2), ref)
        torch.testing.assert_close(step_profile.bypass_library_eager(h, w1, w2), ref)
        torch.testing.assert_close(step_profile.bypass_batched(h, w1, w2), ref)


def test_gpu_step_bench_runs_the_chosen_lokr_path_and_checkpointing(one_thread):
    """--lokr-forward / --checkpoint-blocks reach the model the bench times, read back from the model itself."""
    bench = load_bench()
    common = ["--device", "cpu", "--preset", "tiny", "--resolution", "64", "--configs", "a", "--render", "off"]
    results = bench.main(
        [
            *common,
            "--steps",
            "1",
            "--warmup",
            "1",
            "--phase-steps",
            "1",
            "--lokr-forward",
            "materialized",
            "--checkpoint-blocks",
            "1",
        ]
    )
    a = results["configs"]["a"]
    assert "error" not in a, a.get("error")
    assert list(a["lokr_forward"]) == ["materialized"] and a["checkpointed_blocks"] == 1 and a["compiled"] is False
    assert a["first_step_s"] > 0 and results["lokr_forward"] == "materialized"
    with pytest.raises(SystemExit):
        bench.parse_args([*common, "--checkpoint-blocks", "some"])
