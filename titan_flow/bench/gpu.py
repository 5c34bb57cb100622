"""The GPU suite: every speed and memory figure titan_flow lacks, from one unattended command.

    python -m titan_flow.bench.gpu --out DIR             # on one H100/H200: about 8 minutes
    ./launch/gpu_suite.sh DIR                            # the same
    python -m titan_flow.bench.gpu --out DIR --dry-run   # anywhere: every case at toy sizes on the CPU
    python -m titan_flow.bench.gpu --out DIR --only kernels,rollout_sd3 --time-limit 300
    python -m titan_flow.bench.gpu --list

It writes DIR/gpu_suite.json (every figure) and DIR/gpu_suite.md (the tables, for kernels/README.md
and the README), rewritten after every case, and each case's log to DIR/logs/<case>.log. Each case
runs in a child process of its own (forked from this one, which never touches CUDA) with a time
limit, so a case that raises, crashes the process, runs out of GPU memory or hangs is reported and
the others still run; the cases run in the order below, the most wanted figures first, until the
suite's time limit (--time-limit, 480 s) is spent, and those left are reported as not run.

`--dry-run` runs the same cases through the same driver on the CPU at toy sizes: the Triton kernels
in Triton's interpreter, torch.compile with dynamo's "eager" backend (tracing, no code generation),
no peak-memory measurement. Its figures mean nothing; it exists so the suite cannot be broken
before a GPU arrives (tests/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
GIB, MIB = 2**30, 2**20
DEFAULT_TIME_LIMIT_S = 480.0
MIN_CASE_S = 20.0  # a case is not started with less than this left


@dataclass(frozen=True)
class Context:
    dry_run: bool
    limit_s: float  # this case's time limit
    started: float  # time.monotonic() when the case started

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    @property
    def deadline(self) -> float:
        """When a case with an inner loop should stop starting new rows (a margin before its limit)."""
        return self.started + 0.85 * self.limit_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


@dataclass(frozen=True)
class SuiteCase:
    name: str
    what: str
    run: Callable[[Context], dict]  # -> {"table": markdown, "rows": data, "notes": [...], "checks": {name: ok}}
    limit_s: float  # its time limit on the GPU


# --------------------------------------------------------------------------------------------- cases
def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def case_environment(ctx: Context) -> dict:
    import platform

    from titan_flow.bench.backbone import peak_tflops

    versions = {p: _version(p) for p in ("torch", "triton", "diffusers", "transformers", "flash-attn")}
    if ctx.dry_run:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), dry run"
        peak = None
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible to torch: run the suite on a GPU machine, or pass --dry-run")
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / GIB:.0f} GiB, "
                  f"{torch.cuda.device_count()} visible, CUDA {torch.version.cuda}")
        peak = peak_tflops(props.name)
    rows = {"device": device, "peak_bf16_tflops": peak, **versions}
    table = "\n".join(["| what | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())])
    return {"rows": rows, "table": table, "device": device}


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


# Largest relative difference (to the reference's largest magnitude) accepted: fp32 results differ by
# summation order only; gradients stored in bf16/fp16 may differ by one unit in the last place.
_GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def case_triton_compile(ctx: Context) -> dict:
    """Both Triton kernels compiled for this device in bf16, fp16 and fp32, forward and backward vs the reference."""
    from functools import partial

    import kernels
    from kernels.ratio_loss import clipped_ratio_loss_reference
    from kernels.sde_logprob import sde_log_prob_reference
    from titan_flow.bench.kernels import SdeCase, sde_inputs, sde_runner

    device = ctx.device
    rows, checks = [], {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        case = SdeCase("sd3.5-m", 2 if ctx.dry_run else 8, dtype, dtype, True, True,
                       latent=(4, 8, 8) if ctx.dry_run else None)
        inp = sde_inputs(case, str(device), torch.Generator(device=device).manual_seed(0))
        triton_op = partial(kernels.sde_log_prob, backend="triton")
        start = time.perf_counter()
        grads = sde_runner(case, triton_op, inp)()  # the first call compiles forward and backward
        ctx.sync()
        first_s = time.perf_counter() - start
        want_grads = sde_runner(case, sde_log_prob_reference, inp)()
        with torch.no_grad():
            got, want = triton_op(**inp), sde_log_prob_reference(**inp)
        forward = max(_rel_diff(getattr(got, f), getattr(want, f)) for f in ("log_prob", "kl", "ratio_bias"))
        backward = max(_rel_diff(a, b) for a, b in zip(grads, want_grads))
        ok = forward <= _GRAD_TOL[torch.float32] and backward <= _GRAD_TOL[dtype]
        rows.append({"kernel": "sde_log_prob (lp+kl+bias, fwd+bwd)", "dtype": name, "first_call_s": first_s,
                     "forward_rel_diff": forward, "backward_rel_diff": backward, "ok": ok})
        checks[f"sde_log_prob {name} matches the reference"] = ok

        g = torch.Generator(device="cpu").manual_seed(1)
        vec = [(-1 + 0.01 * torch.randn(32, generator=g)), (-1 + 0.01 * torch.randn(32, generator=g)),
               torch.randn(32, generator=g), 0.5 + 0.1 * torch.randn(32, generator=g).abs(),
               1e-3 * torch.randn(32, generator=g).abs()]
        lp, old, adv, scale, bias = (t.to(device, dtype) for t in vec)
        lp.requires_grad_(True)
        outs = {}
        for impl, op in (("triton", partial(kernels.clipped_ratio_loss, backend="triton")),
                         ("reference", clipped_ratio_loss_reference)):
            start = time.perf_counter()
            out = op(lp, old, adv, 1e-4, 1e-4, 5.0, ratio_scale=scale, ratio_bias=bias, loss_weight=2.0)
            outs[impl] = (out.loss.detach(), *torch.autograd.grad(out.loss, lp))
            ctx.sync()
            if impl == "triton":
                first_s = time.perf_counter() - start
        forward, backward = (_rel_diff(outs["triton"][i], outs["reference"][i]) for i in (0, 1))
        ok = forward <= _GRAD_TOL[dtype] and backward <= _GRAD_TOL[dtype]
        rows.append({"kernel": "clipped_ratio_loss (ratio-norm, fwd+bwd)", "dtype": name, "first_call_s": first_s,
                     "forward_rel_diff": forward, "backward_rel_diff": backward, "ok": ok})
        checks[f"clipped_ratio_loss {name} matches the reference"] = ok
    arch = "CPU (Triton interpreter)" if ctx.dry_run else "sm_%d%d" % torch.cuda.get_device_capability()
    table = "\n".join(["| kernel | dtype | first call (compile) s | forward rel diff | backward rel diff | ok |",
                       "|---|---|---|---|---|---|"] + [
        f"| {r['kernel']} | {r['dtype']} | {r['first_call_s']:.2f} | {r['forward_rel_diff']:.2e} | "
        f"{r['backward_rel_diff']:.2e} | {'yes' if r['ok'] else 'NO'} |" for r in rows])
    return {"rows": rows, "table": table, "checks": checks,
            "notes": [f"compiled for {arch}, triton {_version('triton')}; differences relative to the reference's "
                      "largest magnitude; tolerance 1e-5 for fp32 results, one unit in the last place of the "
                      "stored dtype for bf16/fp16 ones"]}


def _debug_memory_counts():
    """memory.py's counts for the debug SD3 job (the backbone on meta, the tiny encoders and VAE as built)."""
    from titan_flow.bench import memory
    from titan_flow.models import get_model_spec
    from titan_flow.models.sd3.pipeline import SD3Pipeline

    spec = get_model_spec("sd3")
    pipe = SD3Pipeline.load("", device="cpu", resolution=64, max_sequence_length=16)
    family = memory.Family("SD3 debug", lambda: spec.model_cls(spec.args("debug")), lambda m: [m.transformer_blocks],
                           tuple((lambda e=e: e) for e in [*pipe.clip_encoders, pipe.t5_encoder]), lambda: pipe.vae,
                           tuple(memory.SD3_LORA), 32)
    return memory.count(family)


def case_grpo_epoch(ctx: Context) -> dict:
    """The debug-shaped job on the device: bf16 compute, Triton kernels; a warm-up epoch, then one measured."""
    import tempfile

    from titan_flow import train
    from titan_flow.bench import memory
    from titan_flow.bench.versus import EPOCH_ARGS, PhaseTimer, timed_phases

    args = [*EPOCH_ARGS, "--training.device", ctx.device.type, "--model.compute_dtype", "bfloat16",
            "--training.kernel_backend", "triton", "--training.steps", "1" if ctx.dry_run else "2"]
    if ctx.dry_run:
        args += ["--sampling.num_steps", "3", "--sampling.batch_size", "4", "--sampling.num_image_per_prompt", "4"]
    timer = PhaseTimer(sync=ctx.sync)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="titan_flow_gpu_suite_") as scratch:
        with timed_phases(timer):
            train.main([*args, "--job.output_dir", scratch, "--job.run_name", "epoch"])
        metrics = [json.loads(line) for line in (Path(scratch) / "epoch" / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in metrics if "perf/step_s" in m]
    ratio_one = all(m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0 for m in epochs)
    last = epochs[-1]
    if ctx.device.type == "cuda":
        measured = f"{torch.cuda.max_memory_allocated() / MIB:.1f} MiB (torch.cuda.max_memory_allocated)"
    else:
        measured = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB (peak RSS of the process)"
    computed = memory.per_gpu(_debug_memory_counts(), lora=False, gpus=1, master="float32", compute="bfloat16",
                              encoder="float32", vae="float32")
    split = sorted(timer.seconds.items(), key=lambda kv: -kv[1])
    table = "\n".join(["| phase (the measured epoch) | seconds |", "|---|---|",
                       *(f"| {k} | {v:.4f} |" for k, v in split),
                       f"| **epoch: rollout (incl. decode and reward wait)** | {last['perf/rollout_s']:.4f} |",
                       f"| **epoch: train** | {last['perf/train_s']:.4f} |",
                       f"| **epoch: total** | {last['perf/step_s']:.4f} |"])
    return {
        "rows": {"split_seconds": dict(split), "epoch_metrics": last, "peak_memory": measured,
                 "computed_memory_gib": computed},
        "table": table,
        "checks": {"on-policy ratio == 1 exactly (rollout then re-score, Triton, bf16 compute)": ratio_one},
        "notes": [f"train_configs/debug_cpu.toml on {ctx.device.type}, model.compute_dtype bfloat16, kernels Triton; "
                  f"{last['perf/rollout_images_per_s']:.1f} rollout images/s, {last['perf/images_per_s']:.1f} images/s "
                  f"end to end; ratio min/max per epoch: "
                  + ", ".join(f"{m['ratio/min']!r}/{m['ratio/max']!r}" for m in epochs),
                  f"peak memory measured {measured}; the memory table's formula for this job (1 GPU, fp32 master, "
                  f"bf16 compute, fp32 encoders and VAE, EMA) gives {computed['total'] * 1024:.2f} MiB before "
                  "activations and the CUDA context"],
    }


def case_kernels(ctx: Context) -> dict:
    from titan_flow.bench import kernels as kernel_bench

    result = kernel_bench.run(str(ctx.device), "eager" if ctx.dry_run else "inductor", toy=ctx.dry_run,
                              deadline=ctx.deadline)
    return {"rows": result, "table": kernel_bench.format_tables(result),
            "notes": ["Triton vs the eager PyTorch reference vs torch.compile of it; GB/s against the bytes-moved floor "
                      "and as a share of the measured copy bandwidth (kernels/README.md: targets >= 80% and >= 2x eager)"]}


def backbone_case(family: str, mode: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        from titan_flow.bench import backbone

        if family not in backbone.ported_families():
            return {"status": "skipped", "notes": [f"{family} is not ported in this tree (models/registry.py PORTED)"]}
        case = backbone.Case(family, "toy" if ctx.dry_run else "full")
        dtype = "float32" if ctx.dry_run else "bfloat16"
        results = backbone.compare(case, str(ctx.device), dtype, iters=1 if ctx.dry_run else 5, modes=(mode,),
                                   compile_backend="eager" if ctx.dry_run else "inductor", memory=not ctx.dry_run)
        r = results[0]
        grads_mib = r.params * torch.empty((), dtype=backbone.DTYPES[dtype]).element_size() / MIB
        notes = [f"{r.description}; {r.params / 1e9:.3f} B params, {dtype}, every weight trained, "
                 f"outputs agree to {r.max_abs_diff:.2g} (largest |output| {r.max_abs_output:.3g})",
                 f"FLOPs per step {r.flops['ours'] / 1e12:.3f} T (ours) / {r.flops['diffusers'] / 1e12:.3f} T "
                 "(diffusers), counted from the architecture: 3 x the forward's matmuls and attention "
                 "(backbone.count_flops); MFU against the device's dense bf16 peak",
                 f"peak memory = the allocator's peak during a step above the resident weights; computed: the "
                 f"gradients alone take {grads_mib:.0f} MiB (params x {dtype} bytes), the rest is activations "
                 "and workspace"]
        if mode == "compile":
            notes.append("each block compiled in place (ours fullgraph=True, as training; diffusers' without); "
                         "compile s = the first, compiling step")
        return {"rows": [asdict(x) for x in results], "table": backbone.table(results), "notes": notes}

    return run


class _EncoderFreeSD3Policy:
    """SD3's Policy around a VAE, without text encoders: what a rollout does per denoising step (velocity with
    CFG, decode) at full size, fed random prompt embeddings (encoding happens once per batch, outside the loop)."""

    def __init__(self, vae, device: torch.device):
        from titan_flow.models.sd3.pipeline import SD3Pipeline

        self.vae, self.device = vae, device
        self.velocity = lambda *a: SD3Pipeline.velocity(self, *a)
        self.decode = lambda x: SD3Pipeline.decode(self, x)


def _sd3_vae(toy: bool):
    """SD3.5's VAE (random weights), or a two-level one of the same kind for the dry run."""
    from titan_flow.bench.memory import _sd3_vae as sd3_vae

    if toy:
        return sd3_vae(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return sd3_vae()


def case_rollout_sd3(ctx: Context) -> dict:
    """sd3_pickscore's rollout at its resolution, steps, CFG, noise and per-GPU batch: ours vs the reference way."""
    from titan_flow.bench import backbone
    from titan_flow.bench.versus import reference_rollout
    from titan_flow.models.common.schedules import static_shift_sigmas
    from titan_flow.rl.rollout import sample_trajectory, step_noise_levels

    recipe = tomllib.loads((REPO / "train_configs" / "sd3_pickscore.toml").read_text())
    s, m = recipe["sampling"], recipe["model"]
    steps, guidance, noise, batch = s["num_steps"], s["guidance_scale"], s["noise_level"], s["batch_size"]
    resolution, text, dtype = m["resolution"], 77 + m["max_sequence_length"], m["compute_dtype"]
    config = "full"
    if ctx.dry_run:
        steps, batch, resolution, text, dtype, config = 2, 2, 32, 8, "float32", "toy"
    device = ctx.device
    pair = backbone.build(backbone.Case("sd3", config), device, backbone.DTYPES[dtype])
    for model in pair.models.values():
        model.eval()
    args = backbone.FAMILIES["sd3"].configs[config].model
    with torch.device(device):
        vae = _sd3_vae(ctx.dry_run).to(backbone.DTYPES[m["vae_dtype"]]).eval()
    policy = _EncoderFreeSD3Policy(vae, device)
    g = torch.Generator().manual_seed(0)
    embeds = lambda *shape: torch.randn(batch, *shape, generator=g).to(device)  # noqa: E731
    cond = {"prompt_embeds": embeds(text, args["joint_attention_dim"]),
            "pooled_prompt_embeds": embeds(args["pooled_projection_dim"]),
            "negative_prompt_embeds": embeds(text, args["joint_attention_dim"]),
            "negative_pooled_prompt_embeds": embeds(args["pooled_projection_dim"])}
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    x0 = torch.randn(batch, args["in_channels"], side, side, generator=g).to(device)
    sigmas = static_shift_sigmas(steps, 3.0).to(device)  # SD3.5's scheduler shift
    levels = step_noise_levels(steps, noise, None)
    noise_gen = torch.Generator(device=device).manual_seed(1)

    def ours():
        traj = sample_trajectory(policy, pair.models["ours"], cond, x0, sigmas, levels, "sde", guidance, noise_gen)
        policy.decode(traj.latents[:, -1])

    def reference_way():
        latents, _ = reference_rollout(pair.models["diffusers"], cond, x0, sigmas, noise, guidance, noise_gen)
        policy.decode(latents[-1])

    runs = {"ours": ours, "reference way": reference_way}
    times = backbone.time_interleaved(runs, 1 if ctx.dry_run else 3, device)
    peak = {k: backbone.cuda_peak_above(fn, device) for k, fn in runs.items()} if device.type == "cuda" else {}
    median = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    params = sum(p.numel() for p in pair.models["ours"].parameters())
    weights_mib = (params * backbone.DTYPES[dtype].itemsize + sum(p.numel() for p in vae.parameters())
                   * backbone.DTYPES[m["vae_dtype"]].itemsize) / MIB
    rows = [{"impl": k, "seconds": median[k], "images_per_s": batch / median[k], "peak_mib_above_weights": peak.get(k)}
            for k in runs]
    table = "\n".join(["| implementation | s per rollout | images/s | peak MiB above the weights |", "|---|---|---|---|"]
                      + [f"| {r['impl']} | {r['seconds']:.3f} | {r['images_per_s']:.2f} | "
                         f"{'-' if r['peak_mib_above_weights'] is None else format(r['peak_mib_above_weights'], '.0f')} |"
                         for r in rows]
                      + [f"| ours / reference way | | {median['reference way'] / median['ours']:.2f}x | |"])
    return {"rows": rows, "table": table, "notes": [
        f"sd3_pickscore.toml: {batch} images of {resolution} px, {steps} SDE steps (noise {noise}), CFG {guidance} "
        f"(one forward over [uncond; cond]), {dtype} transformer ({backbone.Case('sd3', config).describe()}), "
        f"{m['vae_dtype']} VAE decode included; random weights and random prompt embeddings ({text} tokens)",
        "ours: rl.rollout.sample_trajectory with SD3Pipeline.velocity and our transformer (kernels: Triton on CUDA); "
        "reference way: diffusers' SD3Transformer2DModel with the same weights, CFG by batch concat, the SDE "
        "log-prob in eager PyTorch (bench/versus.py reference_rollout)",
        f"computed resident weights: {weights_mib:.0f} MiB (transformer in {dtype} + VAE in {m['vae_dtype']})"]}


def case_packed_attention(ctx: Context) -> dict:
    from titan_flow.bench import packed_attention as bench
    from titan_flow.models.common import attention as attn

    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    rows = bench.run(bench.bagel_cases(toy=ctx.dry_run), None, ctx.device, dtype,
                     repeats=1 if ctx.dry_run else 20, warmup=1 if ctx.dry_run else 3)
    flash = attn._flash_varlen is not None
    note = ("flash-attn is installed: its varlen kernel is the 'flash' rows" if flash else
            "flash-attn is not importable here, so there are no 'flash' rows (pip install '.[gpu]' adds it)")
    return {"rows": rows, "table": bench.format_table(rows), "notes": [note]}


CASES = [
    SuiteCase("environment", "device, versions, the peak used for MFU", case_environment, 60),
    SuiteCase("triton_compile", "both Triton kernels compiled for this GPU in bf16/fp16/fp32, checked against the "
              "reference", case_triton_compile, 120),
    SuiteCase("grpo_epoch", "one GRPO epoch of the debug-shaped job on the device (bf16, Triton): time split, "
              "on-policy ratio == 1, peak memory", case_grpo_epoch, 150),
    SuiteCase("kernels", "Triton vs eager vs torch.compile at SD3.5-M and FLUX latents: GB/s, share of copy "
              "bandwidth", case_kernels, 180),
    SuiteCase("backbone_sd3", "SD3.5-M training fwd+bwd at full width, bf16: ours vs diffusers, eager",
              backbone_case("sd3", "eager"), 150),
    SuiteCase("rollout_sd3", "rollout images/s at 512 px (sd3_pickscore recipe): ours vs the reference way",
              case_rollout_sd3, 150),
    SuiteCase("backbone_flux", "FLUX.1 training fwd+bwd at full width (layers reduced), bf16, eager",
              backbone_case("flux", "eager"), 120),
    SuiteCase("backbone_qwen_image", "Qwen-Image training fwd+bwd at full width (layers reduced), bf16, eager",
              backbone_case("qwen_image", "eager"), 120),
    SuiteCase("backbone_wan", "Wan2.1-1.3B training fwd+bwd at full width, bf16, eager", backbone_case("wan", "eager"),
              120),
    SuiteCase("packed_attention", "Bagel's packed attention: flash-attn varlen vs FlexAttention vs the SDPA loop",
              case_packed_attention, 120),
    SuiteCase("compile_sd3", "SD3.5-M fwd+bwd with torch.compile per block: ours vs diffusers",
              backbone_case("sd3", "compile"), 300),
    SuiteCase("compile_flux", "FLUX.1 fwd+bwd with torch.compile per block", backbone_case("flux", "compile"), 240),
    SuiteCase("compile_qwen_image", "Qwen-Image fwd+bwd with torch.compile per block",
              backbone_case("qwen_image", "compile"), 240),
    SuiteCase("compile_wan", "Wan2.1-1.3B fwd+bwd with torch.compile per block", backbone_case("wan", "compile"), 240),
]
BY_NAME = {c.name: c for c in CASES}


# -------------------------------------------------------------------------------------------- driver
def _child(name: str, dry_run: bool, limit_s: float, result_path: str, log_path: str) -> None:
    """Runs one case in a forked process (its own process group, so the driver can end it and any compile
    workers it started), its output to its log, its result to a JSON file."""
    os.setpgrp()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    ctx = Context(dry_run, limit_s, time.monotonic())
    try:
        out = BY_NAME[name].run(ctx)
        out.setdefault("status", "ok")
        if not all(out.get("checks", {}).values()):
            out["status"] = "check failed"
    except BaseException as e:  # noqa: BLE001 - everything a case raises is its result
        out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]}
        traceback.print_exc()
    out["seconds"] = time.monotonic() - ctx.started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    Path(result_path).write_text(json.dumps(out, default=str, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no atexit handlers inherited from the driver


def run_case(case: SuiteCase, dry_run: bool, limit_s: float, out: Path) -> dict:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    result_path, log_path = out / "logs" / f"{case.name}.json", out / "logs" / f"{case.name}.log"
    result_path.unlink(missing_ok=True)
    start = time.monotonic()
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(case.name, dry_run, limit_s, str(result_path), str(log_path)), name=f"suite-{case.name}")
    child.start()
    child.join(limit_s)
    if child.is_alive():
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the case and whatever it started
        except ProcessLookupError:
            pass
        child.join()
        return {"status": "timeout", "seconds": time.monotonic() - start,
                "error": f"stopped after its time limit of {limit_s:.0f} s (see logs/{case.name}.log)"}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"status": "crashed", "seconds": time.monotonic() - start,
            "error": f"the case's process died with exit code {child.exitcode} before reporting (see logs/{case.name}.log)"}


def markdown(report: dict) -> str:
    env = report["cases"].get("environment", {})
    lines = [f"# titan_flow GPU suite, {report['date']}", "",
             f"Device: {env.get('device', 'unknown (the environment case did not report)')}. "
             + ("**Dry run: toy sizes on the CPU; the figures mean nothing.** " if report["dry_run"] else "")
             + f"Total {report['total_s']:.0f} s of a {report['time_limit_s']:.0f} s limit. Command: "
             f"`{report['command']}`", "",
             "| case | status | seconds | CPU seconds | what |", "|---|---|---|---|---|"]
    for name, r in report["cases"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | {r.get('cpu_seconds', 0):.1f} | "
                     f"{BY_NAME[name].what} |")
    for name, r in report["cases"].items():
        lines += ["", f"## {name}: {BY_NAME[name].what}", "", f"Status: {r['status']}, {r.get('seconds', 0):.1f} s."]
        lines += [f"- {n}" for n in r.get("notes", [])]
        lines += [f"- check: {k}: {'yes' if ok else 'NO'}" for k, ok in r.get("checks", {}).items()]
        if r.get("table"):
            lines += ["", r["table"]]
        if r.get("error"):
            lines += ["", "```", r.get("traceback") or r["error"], "```"]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_suite.md").write_text(markdown(report))


def run_suite(names: list[str], out: Path, dry_run: bool, time_limit_s: float, command: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:  # the Triton kernels run on CPU tensors in the interpreter; Triton reads this when a kernel is defined
        os.environ["TRITON_INTERPRET"] = "1"
    _preload()
    start = time.monotonic()
    report = {"date": datetime.date.today().isoformat(), "dry_run": dry_run, "time_limit_s": time_limit_s,
              "command": command, "total_s": 0.0, "cases": {}}
    for name in names:
        case = BY_NAME[name]
        left = time_limit_s - (time.monotonic() - start)
        if left < MIN_CASE_S:
            report["cases"][name] = {"status": "not run", "error": f"the suite's {time_limit_s:.0f} s were spent; "
                                     f"run it alone with --only {name}"}
        else:
            limit = left if dry_run else min(case.limit_s, left)
            print(f"[gpu suite] {name}: {case.what} (limit {limit:.0f} s)", flush=True)
            report["cases"][name] = result = run_case(case, dry_run, limit, out)
            print(f"[gpu suite] {name}: {result['status']} in {result.get('seconds', 0):.1f} s"
                  + (f": {result['error']}" if result.get("error") else ""), flush=True)
        report["total_s"] = time.monotonic() - start
        write(report, out)
    return report


def _preload() -> None:
    """Import what the cases import, once, before forking them (the imports cost more than most toy cases)."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import kernels  # noqa: F401
    from titan_flow import train  # noqa: F401
    from titan_flow.bench import backbone, kernels as kernel_bench, memory, packed_attention, versus  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for gpu_suite.json, gpu_suite.md and logs/")
    p.add_argument("--dry-run", action="store_true", help="every case at toy sizes on the CPU (the test of the suite)")
    p.add_argument("--only", default="", help="comma-separated case names (default: all, in order)")
    p.add_argument("--skip", default="", help="comma-separated case names to leave out")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="seconds for the whole suite")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    a = p.parse_args(argv)
    if a.list:
        for c in CASES:
            print(f"{c.name:20s} {c.limit_s:5.0f} s  {c.what}")
        return 0
    if not a.out:
        p.error("--out DIR is required")
    only, skip = ([n for n in s.split(",") if n] for s in (a.only, a.skip))
    unknown = sorted(set(only + skip) - set(BY_NAME))
    if unknown:
        p.error(f"--only/--skip: unknown cases {unknown}; the cases are {', '.join(BY_NAME)}")
    names = [c.name for c in CASES if (not only or c.name in only) and c.name not in skip]
    report = run_suite(names, Path(a.out), a.dry_run, a.time_limit, "python -m titan_flow.bench.gpu " + " ".join(argv))
    bad = [n for n, r in report["cases"].items() if r["status"] not in ("ok", "skipped")]
    print(f"[gpu suite] wrote {Path(a.out) / 'gpu_suite.md'} and gpu_suite.json; "
          + (f"not ok: {', '.join(bad)}" if bad else "every case ok"), flush=True)
    return 0  # fail soft: the report says what failed


if __name__ == "__main__":
    sys.exit(main())
