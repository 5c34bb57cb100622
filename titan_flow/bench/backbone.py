"""Our backbone vs diffusers' implementation: forward + backward time and peak memory at the same config.

    python -m titan_flow.bench --backbone wan [--iters 5] [--dtype bfloat16] [--device cuda]
    python -m titan_flow.bench --backbone flux

Both models are built with the same config and run on the same inputs; a step is forward + backward
of mean(output^2). Time: one process holds both models and alternates their steps (one warm-up step
each, then `--iters` timed steps each), so a machine whose load drifts slows both alike; the median
step is reported. Memory: each model in a fresh process of its own, one warm-up and one measured
step; on CUDA the allocator's peak above what the model and inputs took, on the CPU the growth of the
process's peak resident set (which the C allocator's caching blurs by some MiB), and on both the
activations autograd keeps for backward (distinct storages, counted once). The config is small enough for a CPU; the figures compare
implementations, they do not predict full-size throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLEMENTATIONS = ("ours", "diffusers")
MIB = 2**20


@dataclass(frozen=True)
class Case:
    description: str
    ours: Callable[[], torch.nn.Module]
    diffusers: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.device, torch.dtype], dict]  # keyword inputs both forwards take


def _wan_config() -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                text_dim=256, freq_dim=256, ffn_dim=1024, num_layers=4, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _wan_ours() -> torch.nn.Module:
    from titan_flow.models.wan import WanArgs, WanTransformer

    model = WanTransformer(WanArgs(**_wan_config()))
    model.init_weights()
    return model


def _wan_diffusers() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**_wan_config())


def _wan_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 16, 5, 16, 24, generator=g).to(device, dtype),
        timestep=torch.tensor([999, 500]).to(device),
        encoder_hidden_states=torch.randn(2, 64, 256, generator=g).to(device, dtype),
    )


def _flux_config() -> dict:
    # (frame, row, col) RoPE split in FLUX.1's proportions (16, 56, 56) of its 128-wide heads
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(8, 28, 28))


def _flux_diffusers() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxTransformer2DModel(**_flux_config())


def _flux_ours() -> torch.nn.Module:
    """Ours holding diffusers' weights (the same seeded init), so both compute the same function."""
    from titan_flow.models.flux import FluxArgs, FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(FluxArgs(**_flux_config()))
    model.load_state_dict(_flux_diffusers().state_dict(), strict=True, assign=True)
    return model


def _flux_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    from titan_flow.models.common.latents import grid_ids

    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16 * 16, 64, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(2, 64, 1024, generator=g).to(device, dtype),
        pooled_projections=torch.randn(2, 768, generator=g).to(device, dtype),
        timestep=torch.rand(2, generator=g).to(device),
        img_ids=grid_ids(16, 16).to(device),
        txt_ids=torch.zeros(64, 3, device=device),
        guidance=torch.full((2,), 3.5, device=device),
    )


CASES = {
    "flux": Case("FLUX.1, 2 double + 4 single blocks of width 256 (4 x 64 heads), batch 2, 16 x 16 = 256 image + "
                 "64 text tokens, guidance embedding", _flux_ours, _flux_diffusers, _flux_inputs),
    "wan": Case("Wan2.1 T2V, 4 blocks of width 256 (4 x 64 heads), batch 2, latent 16 x 5 x 16 x 24 = 480 tokens, "
                "64 text tokens", _wan_ours, _wan_diffusers, _wan_inputs),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / MIB


def _build(family: str, which: str, dev: torch.device, dt: torch.dtype):
    """(model, a function taking one forward + backward step and returning the MiB autograd saved for backward)."""
    case = CASES[family]
    torch.manual_seed(0)
    model = getattr(case, which)()
    if (dev.type, dt) != ("cpu", torch.float32):  # where it was built
        model = model.to(dev, dt)
    model.train()
    inputs = case.inputs(dev, dt)

    def step() -> float:
        storages: dict[int, int] = {}  # distinct storages the graph keeps, each counted once

        def keep(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = model(**inputs)
        out = out if isinstance(out, torch.Tensor) else out[0]  # diffusers returns an output object
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return sum(storages.values()) / MIB

    return model, step


def _time_both(family: str, device: str, dtype: str, iters: int, queue) -> None:
    """Child process: both implementations, steps alternated; reports {which: [ms per step]}."""
    dev, dt = torch.device(device), DTYPES[dtype]
    steps = {which: _build(family, which, dev, dt)[1] for which in IMPLEMENTATIONS}
    times = {which: [] for which in IMPLEMENTATIONS}
    for i in range(iters + 1):  # the first round warms up
        for which, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i:
                times[which].append((time.perf_counter() - t0) * 1000)
    queue.put(times)


def _peak_memory(family: str, which: str, device: str, dtype: str, queue) -> None:
    """Child process: one implementation's (peak MiB over a warm-up and a measured step, MiB saved for backward)."""
    dev, dt = torch.device(device), DTYPES[dtype]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _, step = _build(family, which, dev, dt)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _rss_mib() * MIB
    step()
    saved = step()
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / MIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base / MIB  # Linux reports KiB
    queue.put((peak, saved))


def _in_child(target, *args):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get(timeout=1800)
    child.join()
    return result


def compare(family: str, device: str = "cpu", dtype: str = "float32", iters: int = 5) -> dict[str, tuple]:
    """{"ours" | "diffusers": (median ms per forward+backward, peak MiB, MiB saved for backward)}."""
    if family not in CASES:
        raise SystemExit(f"--backbone: no comparison for {family!r}; available: {', '.join(CASES)}")
    times = _in_child(_time_both, family, device, dtype, iters)
    return {which: (statistics.median(times[which]), *_in_child(_peak_memory, family, which, device, dtype))
            for which in IMPLEMENTATIONS}


def report(family: str, results: dict[str, tuple], device: str, dtype: str, iters: int) -> str:
    peak = "peak CUDA memory above the model" if device.startswith("cuda") else "peak RSS growth"
    rows = [f"[bench]   {which:9s} {ms:9.1f} ms   {peak} {mib:8.1f} MiB   saved for backward {saved:8.1f} MiB"
            for which, (ms, mib, saved) in results.items()]
    (ours_ms, ours_mib, ours_saved), (ref_ms, ref_mib, ref_saved) = results["ours"], results["diffusers"]
    return "\n".join([
        f"[bench] {family} forward+backward, {CASES[family].description}, {dtype} on {device}, "
        f"median of {iters} alternated steps each:",
        *rows,
        f"[bench]   ours / diffusers: time {ours_ms / ref_ms:.2f}x, peak memory {ours_mib / max(ref_mib, 1e-9):.2f}x, "
        f"saved for backward {ours_saved / max(ref_saved, 1e-9):.2f}x",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench --backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, choices=sorted(CASES))
    p.add_argument("--iters", type=int, default=5, help="timed forward+backward steps (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    print(report(a.backbone, compare(a.backbone, a.device, a.dtype, a.iters), a.device, a.dtype, a.iters), flush=True)
    return 0
