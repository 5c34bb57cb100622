"""Our backbone vs diffusers' at the same small config: forward + backward time and peak memory, side by side.

    python -m titan_flow.bench --backbone flux            # the same as:
    python -m titan_flow.bench.backbone --model flux [--batch 2] [--side 16] [--text 64] [--iters 5]

Both models hold the same random weights (ours loads diffusers' state dict) and see the same inputs, in
the same dtype (bf16 on CUDA, fp32 on the CPU unless --dtype says otherwise). Each side runs in a fresh
subprocess so that neither inherits the other's allocator state: after `--warmup` untimed iterations,
`--iters` timed forward + backward passes (loss = mean of the squared output) give the median time, and
the peak memory above what the weights and inputs already held is CUDA's max_memory_allocated, or on
the CPU the growth of the process's peak resident set. The max |difference| of the two outputs is
printed too: a speed comparison between models that disagree would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

MIB = 2**20


@dataclass(frozen=True)
class Case:
    """How to build a family's two backbones and their inputs at the bench size."""

    config: Callable[[argparse.Namespace], dict]  # diffusers config of the small model
    ours: Callable[[dict], torch.nn.Module]
    reference: Callable[[dict], torch.nn.Module]
    inputs: Callable[[dict, argparse.Namespace, torch.Generator], dict]


def _flux_config(a: argparse.Namespace) -> dict:
    third = max(2, a.head_dim // 16 * 2)  # (frame, row, col) RoPE split in FLUX's proportions (16, 56, 56) of 128
    rest = (a.head_dim - third) // 4 * 2  # even
    return dict(patch_size=1, in_channels=64, num_layers=a.layers, num_single_layers=2 * a.layers,
                attention_head_dim=a.head_dim, num_attention_heads=a.heads, joint_attention_dim=4 * a.heads * a.head_dim,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(third, rest, a.head_dim - third - rest))


def _flux_ours(config: dict) -> torch.nn.Module:
    from titan_flow.models.flux import FluxArgs, FluxTransformer

    with torch.device("meta"):
        return FluxTransformer(FluxArgs(**config))


def _flux_reference(config: dict) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config)


def _flux_inputs(config: dict, a: argparse.Namespace, g: torch.Generator) -> dict:
    from titan_flow.models.common.latents import grid_ids

    return dict(
        hidden_states=torch.randn(a.batch, a.side * a.side, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(a.batch, a.text, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(a.batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.rand(a.batch, generator=g),
        img_ids=grid_ids(a.side, a.side),
        txt_ids=torch.zeros(a.text, 3),
        guidance=torch.full((a.batch,), 3.5),
    )


CASES = {"flux": Case(_flux_config, _flux_ours, _flux_reference, _flux_inputs)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux", choices=sorted(CASES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--side", type=int, default=16, help="image tokens per side (16: a 256 px FLUX image; 32: 512 px)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--layers", type=int, default=2, help="double-stream blocks (FLUX: twice as many single blocks)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device == "cuda" else "float32"
    return a


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def worker(a: argparse.Namespace) -> dict:
    """One side's measurement (run in its own process); returns times, peak memory and an output checksum."""
    case, device, dtype = CASES[a.model], torch.device(a.device), getattr(torch, a.dtype)
    config = case.config(a)
    torch.manual_seed(0)
    reference = case.reference(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.02)
    if a.worker == "ours":
        model = case.ours(config)
        model.load_state_dict(reference.state_dict(), strict=True, assign=True)
        del reference
    else:
        model = reference
    model = model.to(device=device, dtype=dtype).train()
    inputs = case.inputs(config, a, torch.Generator().manual_seed(1))
    inputs = {k: v.to(device, dtype) if v.is_floating_point() and k.endswith(("states", "projections")) else v.to(device)
              for k, v in inputs.items()}

    def step() -> torch.Tensor:
        out = model(**inputs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(a.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_mib() * MIB
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # Linux reports KiB
    with torch.no_grad():
        probe = model(**inputs)
        probe = (probe if isinstance(probe, torch.Tensor) else probe[0]).float().cpu()
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_mib": peak / MIB,
            "params": sum(p.numel() for p in model.parameters()), "output": probe.flatten()[:4096].tolist()}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    argv = [arg for arg in (sys.argv[1:] if argv is None else argv)]
    results = {}
    for side in ("ours", "diffusers"):
        proc = subprocess.run([sys.executable, "-m", "titan_flow.bench.backbone", *argv, "--worker", side],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench worker {side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    ours, ref = results["ours"], results["diffusers"]
    diff = max(abs(x - y) for x, y in zip(ours["output"], ref["output"]))
    memory = "CUDA max_memory_allocated above weights + inputs" if a.device == "cuda" else "peak RSS growth (CPU)"
    print(f"[bench] {a.model} fwd+bwd, {ours['params'] / 1e6:.1f} M params, batch {a.batch}, {a.side}x{a.side} image + "
          f"{a.text} text tokens, {a.dtype} on {a.device}; median of {a.iters} after {a.warmup} warm-up")
    print(f"[bench] {'':10s} {'time (ms)':>10s} {'peak (MiB)':>11s}   ({memory})")
    for name, r in (("titan_flow", ours), ("diffusers", ref)):
        print(f"[bench] {name:10s} {1e3 * r['median_s']:10.1f} {r['peak_mib']:11.1f}")
    print(f"[bench] ratio ours/diffusers: time {ours['median_s'] / ref['median_s']:.3f}, "
          f"peak memory {ours['peak_mib'] / max(ref['peak_mib'], 1e-9):.3f}; max |output diff| {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
