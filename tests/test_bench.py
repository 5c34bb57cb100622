"""The benches: the GPU suite's dry run (every case at toy sizes, on the CPU), its fail-soft driver, the backbone
harness (same weights, FLOPs counted from the architecture, alternated timing), and the reference way of the
CPU side-by-side bench doing the same math as ours. Speeds are printed by the benches, never asserted here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from tolerances import chain_length, rounding_bound
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from titan_flow.bench import backbone, gpu
from titan_flow.bench import kernels as kernel_bench

REPO = Path(__file__).resolve().parents[1]
FP32_UNIT_ROUNDOFF = 2.0**-24
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------ GPU suite
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, str]:
    """`launch/gpu_suite.sh OUT --dry-run`: the suite's own driver, every case, toy sizes on the CPU."""
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run(["bash", "launch/gpu_suite.sh", str(out), "--dry-run"], cwd=REPO,
                          env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    print(proc.stdout)
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text(), proc.stdout


def test_dry_run_exercises_every_case(dry_run):
    report, md, _ = dry_run
    assert report["dry_run"] is True and list(report["cases"]) == [c.name for c in gpu.CASES]
    ported = backbone.ported_families()
    for name, result in report["cases"].items():
        family = next((f for f in backbone.FAMILIES if name in (f"backbone_{f}", f"compile_{f}")), None)
        expected = "skipped" if family is not None and family not in ported else "ok"
        assert result["status"] == expected, (name, result.get("error"), result.get("traceback"))
        assert f"## {name}: " in md
    assert "Dry run: toy sizes on the CPU; the figures mean nothing." in md


def test_dry_run_checks_kernels_and_the_on_policy_ratio(dry_run):
    cases = dry_run[0]["cases"]
    checks = cases["triton_compile"]["checks"]
    assert len(checks) == 6 and all(checks.values())  # both kernels x bf16, fp16, fp32
    assert cases["grpo_epoch"]["checks"] == {
        "on-policy ratio == 1 exactly (rollout then re-score, Triton, bf16 compute)": True}
    split = cases["grpo_epoch"]["rows"]["split_seconds"]
    assert {"rollout forward", "re-score forward", "backward", "decode", "AdamW step"} <= set(split)
    assert cases["grpo_epoch"]["rows"]["computed_memory_gib"]["total"] > 0


def test_dry_run_tables_hold_the_figures(dry_run):
    cases = dry_run[0]["cases"]
    kernels_rows = cases["kernels"]["rows"]
    assert kernels_rows["copy_gbs"] > 0
    for row in kernels_rows["sde"] + kernels_rows["loss"]:
        assert set(row["us"]) == {"triton", "eager", "compile"} and row["triton_gbs"] > 0
    for family in backbone.ported_families():
        (row,) = cases[f"backbone_{family}"]["rows"]
        assert row["ms"]["ours"] > 0 and row["ms"]["diffusers"] > 0
        assert row["flops"]["ours"] == row["flops"]["diffusers"] > 0  # the same architecture
        (compiled,) = cases[f"compile_{family}"]["rows"]
        assert compiled["mode"] == "compile (eager)" and set(compiled["compile_s"]) == {"ours", "diffusers"}
    rollout = {r["impl"]: r for r in cases["rollout_sd3"]["rows"]}
    assert set(rollout) == {"ours", "reference way"} and all(r["images_per_s"] > 0 for r in rollout.values())
    backends = {r["backend"] for r in cases["packed_attention"]["rows"]}
    assert {"sdpa", "flex"} <= backends
    assert "flash-attn is not importable here" in cases["packed_attention"]["notes"][0] or "flash" in backends


def _raises(ctx):
    raise ValueError("a broken case")


def _dies(ctx):
    os._exit(3)


def _hangs(ctx):
    time.sleep(60)


def _fine(ctx):
    return {"table": "| a |\n|---|\n| 1 |", "rows": [1], "checks": {"holds": True}}


def _check_fails(ctx):
    return {"checks": {"holds": False}}


def test_one_failing_case_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    fakes = {n: gpu.SuiteCase(n, n, fn, 30) for n, fn in
             (("raises", _raises), ("dies", _dies), ("fine", _fine), ("check", _check_fails))}
    monkeypatch.setattr(gpu, "BY_NAME", {**gpu.BY_NAME, **fakes})
    report = gpu.run_suite(list(fakes), tmp_path, dry_run=True, time_limit_s=300, command="test")
    cases = report["cases"]
    assert cases["raises"]["status"] == "error" and "ValueError: a broken case" in cases["raises"]["error"]
    assert cases["dies"]["status"] == "crashed" and "exit code 3" in cases["dies"]["error"]
    assert cases["fine"]["status"] == "ok" and cases["fine"]["rows"] == [1]
    assert cases["check"]["status"] == "check failed"
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "ValueError: a broken case" in md and "- check: holds: NO" in md and "| 1 |" in md
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["cases"].keys() == fakes.keys()


def test_a_hanging_case_is_stopped_at_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "BY_NAME", {**gpu.BY_NAME, "hangs": gpu.SuiteCase("hangs", "hangs", _hangs, 1)})
    start = time.monotonic()
    result = gpu.run_case(gpu.BY_NAME["hangs"], dry_run=False, limit_s=1.0, out=tmp_path)
    assert result["status"] == "timeout" and "time limit of 1 s" in result["error"]
    assert time.monotonic() - start < 30


def test_cases_left_when_the_time_is_spent_are_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "BY_NAME", {**gpu.BY_NAME, "fine": gpu.SuiteCase("fine", "fine", _fine, 30)})
    report = gpu.run_suite(["fine"], tmp_path, dry_run=True, time_limit_s=gpu.MIN_CASE_S - 1, command="test")
    assert report["cases"]["fine"]["status"] == "not run" and "--only fine" in report["cases"]["fine"]["error"]


def test_suite_cli_errors_name_the_cases(tmp_path):
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path), "--only", "kernels,nonsense"])


# ------------------------------------------------------------------------------------ backbone harness
@pytest.mark.parametrize("family", backbone.ported_families())
def test_flops_counted_from_the_architecture_match_torch_flop_counter(family):
    """Every matmul and attention of a forward is counted: equal to torch's FlopCounterMode, which sees the
    aten ops (attention through the math backend, whose matmuls it counts), for ours and for diffusers'."""
    pair = backbone.build(backbone.Case(family, "toy"))
    counts = {}
    for which, model in pair.models.items():
        counter, reference = backbone.FlopCounter(), FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            backbone.output(model, pair.inputs[which])
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), reference:
            backbone.output(model, pair.inputs[which])
        assert counter.flops == reference.get_total_flops() > 0
        counts[which] = backbone.count_flops(model, pair.inputs[which])
        assert counts[which] == 3 * counter.flops
    assert counts["ours"] == counts["diffusers"]


@pytest.mark.parametrize("family", backbone.ported_families())
def test_both_implementations_hold_the_same_weights(family):
    """The comparison is between implementations of one function: fp32 outputs agree to rounding."""
    pair = backbone.build(backbone.Case(family, "toy"))
    diff, scale = backbone.max_output_diff(pair)
    ours = pair.models["ours"]
    with torch.no_grad():
        out = backbone.output(ours, pair.inputs["ours"])
    bound = 2 * rounding_bound(chain_length(ours), FP32_UNIT_ROUNDOFF, elements=out.numel())
    assert diff <= bound * scale, (diff, bound * scale)


@pytest.mark.parametrize("family", backbone.ported_families())
def test_ours_saves_no_more_for_backward_than_diffusers(family):
    pair = backbone.build(backbone.Case(family, "toy"))
    saved = {w: backbone.saved_for_backward_mib(pair.models[w], pair.inputs[w]) for w in backbone.IMPLEMENTATIONS}
    assert 0 < saved["ours"] <= saved["diffusers"]


@pytest.mark.parametrize("family", backbone.ported_families())
def test_ours_holds_no_more_live_tensors_than_diffusers(family):
    """The peak of live tensors over one step: at least what autograd saves for backward, and ours is no larger."""
    pair = backbone.build(backbone.Case(family, "toy"))
    peak = {w: backbone.tensor_peak_mib(pair.models[w], pair.inputs[w]) for w in backbone.IMPLEMENTATIONS}
    saved = backbone.saved_for_backward_mib(pair.models["ours"], pair.inputs["ours"])
    assert saved <= peak["ours"] <= peak["diffusers"]


def test_live_tensor_peak_counts_what_is_held_not_what_was_freed():
    x = torch.ones(1024)  # 4 KiB, created outside: not counted
    counter = backbone._LiveTensorBytes()
    with counter:
        a = x * 3  # 4 KiB held
        b = x * 4  # 4 KiB held: peak 8 KiB
        del b
        c = x * 5  # the peak stays 8 KiB
    assert counter.peak == 2 * 4096 and counter.live == 2 * 4096 and a.numel() == c.numel()


def test_steps_alternate_and_the_warm_up_is_not_timed():
    calls = []
    times = backbone.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                                      torch.device("cpu"))
    assert calls == ["a", "b"] * 4 and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_peak_of_the_device_for_mfu():
    assert backbone.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert backbone.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert backbone.peak_tflops("NVIDIA H200") == 989.4
    assert backbone.peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_kernel_rows_past_the_deadline_are_listed_as_not_reached():
    result = kernel_bench.run("cpu", None, toy=True, deadline=0.0)
    assert all(r.get("not_reached") for r in result["sde"] + result["loss"])
    assert "not reached (time limit)" in kernel_bench.format_tables(result)


# ---------------------------------------------------------------------------------------- versus
def test_the_reference_way_computes_what_ours_computes():
    """The epoch comparison is fair only if both sides do the same math: the reference's velocity (diffusers'
    transformer, CFG by concat) and its SDE step give ours' values to fp32 rounding."""
    from diffusers import SD3Transformer2DModel

    from titan_flow.bench.versus import reference_sde_step, reference_velocity
    from titan_flow.models import get_model_spec
    from titan_flow.models.sd3.pipeline import SD3Pipeline
    from titan_flow.rl.sde import sde_step

    spec = get_model_spec("sd3")
    torch.manual_seed(0)
    ours = spec.build("debug")
    theirs = SD3Transformer2DModel(**asdict(spec.args("debug")))
    theirs.load_state_dict(spec.to_diffusers(ours.state_dict()))
    pipe = SD3Pipeline.load("", device="cpu", resolution=64, max_sequence_length=16)
    cond = pipe.encode(["a red cube", "two cats"])
    sigmas = pipe.sigmas(4)
    x = pipe.initial_noise(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for j in (0, 2):
            v = pipe.velocity(ours, x, sigmas[j].expand(2), cond, 4.5)
            v_ref = reference_velocity(theirs, x, sigmas[j], cond, 4.5)
            # each branch errs by the model's rounding; v = u + 4.5 (c - u) weighs them by at most 1 + 2 x 4.5
            branches = [pipe.velocity(ours, x, sigmas[j].expand(2), {**cond, **negative}, 1.0) for negative in
                        ({}, {"prompt_embeds": cond["negative_prompt_embeds"],
                              "pooled_prompt_embeds": cond["negative_pooled_prompt_embeds"]})]
            scale = max(b.abs().max().item() for b in branches)
            bound = 2 * rounding_bound(chain_length(ours), FP32_UNIT_ROUNDOFF, elements=v.numel()) * 10 * scale
            assert (v - v_ref).abs().max() <= bound
            nxt, lp_ref = reference_sde_step(v, x, sigmas, j, 0.7, torch.Generator().manual_seed(2))
            out = sde_step(v, x, sigmas[j].expand(2), sigmas[j + 1].expand(2), 0.7, "sde", prev_sample=nxt,
                           sigma_fallback=sigmas[1])
            torch.testing.assert_close(out.log_prob, lp_ref, rtol=1e-5, atol=1e-5 * lp_ref.abs().max().item())


def test_phase_timer_counts_only_labelled_unpaused_calls():
    from titan_flow.bench.versus import PhaseTimer

    class Owner:
        @staticmethod
        def work(n):
            return n + 1

    syncs = []
    timer = PhaseTimer(sync=lambda: syncs.append(1))
    labels = iter(["a", None, "a"])
    timer.wrap(Owner, "work", lambda: next(labels))
    assert [Owner.work(1), Owner.work(2)] == [2, 3]
    timer.paused = True
    assert Owner.work(3) == 4
    timer.restore()
    assert set(timer.seconds) == {"a"} and len(syncs) == 2
    counted = dict(timer.seconds)
    assert Owner.work(4) == 5 and timer.seconds == counted  # restored: no longer timed


@pytest.mark.slow
def test_versus_prints_the_ratios():
    """`python -m titan_flow.bench.versus`: backbone ratios for every ported family and the epoch comparison."""
    proc = subprocess.run([sys.executable, "-m", "titan_flow.bench.versus", "--repeats", "1", "--epochs", "1"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    print(proc.stdout)
    for family in backbone.ported_families():
        assert len(re.findall(rf"\[bench\] {family} (small|wide): ", proc.stdout)) == 2
    assert len(re.findall(r"ours / diffusers: time [\d.]+x, peak memory [\d.]+x, saved for backward [\d.]+x",
                          proc.stdout)) == 2 * len(backbone.ported_families())
    for phase in ("rollout", "train"):
        assert re.search(rf"GRPO epoch {phase}: ours [\d.]+ images/s vs the reference way [\d.]+ images/s = "
                         r"[\d.]+x as fast", proc.stdout)
    assert "waiting for rewards (not overlapped)" in proc.stdout
