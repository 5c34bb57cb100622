"""Our backbone vs diffusers' implementation: forward + backward time and peak memory at the same config.

    python -m titan_flow.bench --backbone wan [--iters 5] [--dtype bfloat16] [--device cuda]

Both models are built with the same config and run on the same inputs; each runs in a fresh process
(so one's allocations do not count against the other), takes one warm-up step, then `--iters` timed
steps of forward + backward of mean(output^2). Peak memory: on CUDA the allocator's peak over the
steps; on the CPU the growth of the process's peak resident set over the steps (above what the model
and inputs already took). The config is small enough for a CPU; the figures compare implementations,
they do not predict full-size throughput.
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


CASES = {
    "wan": Case("Wan2.1 T2V, 4 blocks of width 256 (4 x 64 heads), batch 2, latent 16 x 5 x 16 x 24 = 480 tokens, "
                "64 text tokens", _wan_ours, _wan_diffusers, _wan_inputs),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / MIB


def _measure(family: str, which: str, device: str, dtype: str, iters: int, queue) -> None:
    """Child process: build one implementation, time its steps, report (ms per step list, peak MiB)."""
    torch.manual_seed(0)
    case, dev, dt = CASES[family], torch.device(device), DTYPES[dtype]
    model = getattr(case, which)()
    if (dev.type, dt) != ("cpu", torch.float32):  # where it was built
        model = model.to(dev, dt)
    model.train()
    inputs = case.inputs(dev, dt)

    def step():
        out = model(**inputs)
        out = out if isinstance(out, torch.Tensor) else out[0]  # diffusers returns an output object
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_mib()
    step()  # warm-up
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - t0) * 1000)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / MIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # Linux reports KiB
    queue.put((times, peak))


def compare(family: str, device: str = "cpu", dtype: str = "float32", iters: int = 5) -> dict[str, tuple[float, float]]:
    """{"ours" | "diffusers": (median ms per forward+backward, peak MiB)}, each measured in its own process."""
    if family not in CASES:
        raise SystemExit(f"--backbone: no comparison for {family!r}; available: {', '.join(CASES)}")
    context = multiprocessing.get_context("spawn")
    results = {}
    for which in ("ours", "diffusers"):
        queue = context.Queue()
        child = context.Process(target=_measure, args=(family, which, device, dtype, iters, queue))
        child.start()
        times, peak = queue.get(timeout=1800)
        child.join()
        results[which] = (statistics.median(times), peak)
    return results


def report(family: str, results: dict[str, tuple[float, float]], device: str, dtype: str, iters: int) -> str:
    (ours_ms, ours_mib), (ref_ms, ref_mib) = results["ours"], results["diffusers"]
    memory = "peak CUDA memory above the model" if device.startswith("cuda") else "peak RSS growth"
    return (
        f"[bench] {family} forward+backward, {CASES[family].description}, {dtype} on {device}, median of {iters}:\n"
        f"[bench]   ours      {ours_ms:9.1f} ms   {memory} {ours_mib:8.1f} MiB\n"
        f"[bench]   diffusers {ref_ms:9.1f} ms   {memory} {ref_mib:8.1f} MiB\n"
        f"[bench]   ours / diffusers: time {ours_ms / ref_ms:.2f}x, memory {ours_mib / max(ref_mib, 1e-9):.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench --backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, choices=sorted(CASES))
    p.add_argument("--iters", type=int, default=5, help="timed forward+backward steps (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    print(report(a.backbone, compare(a.backbone, a.device, a.dtype, a.iters), a.device, a.dtype, a.iters), flush=True)
    return 0
