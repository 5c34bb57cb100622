"""Our hand-ported backbone vs diffusers' class: forward + backward time and peak memory, side by side.

    python -m titan_flow.bench --backbone qwen_image [--device cpu] [--dtype float32] [--iters 10]
    python -m titan_flow.bench.backbone --backbone qwen_image

Both implementations get the same small config, the same weights (ours loads diffusers' state dict) and
the same inputs. Time: one process runs `--iters` fwd+bwd steps of each, alternating, after one warm-up
step each, so a machine whose load drifts slows both alike; the median and the minimum are printed.
Peak memory: each implementation in a fresh process (one's allocations cannot hide the other's), the
CUDA allocator's peak over one fwd+bwd step above what the model, its inputs and the warm-up's
gradients hold (on the CPU: the growth of the process's peak resident set over its size before the step).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

MIB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Comparison:
    """How to build diffusers' model, ours from its weights, and one batch of inputs for each."""

    description: str
    diffusers_model: Callable[[], torch.nn.Module]
    ours_from: Callable[[torch.nn.Module], torch.nn.Module]
    inputs: Callable[[torch.device], dict]  # our forward's keyword arguments
    diffusers_inputs: Callable[[dict], dict]  # ours -> diffusers' keyword arguments


# Qwen-Image at a size a CPU runs in seconds: 2 blocks of width 256 (4 heads of 64, the published head
# split scaled), a 256 px target's 256 image tokens plus 64 text tokens (one prompt padded), batch 2.
QWEN_SMALL = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=256, axes_dims_rope=(8, 28, 28))


def _qwen_diffusers():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**QWEN_SMALL)


def _qwen_ours(reference: torch.nn.Module) -> torch.nn.Module:
    from titan_flow.models.qwen_image import QwenImageArgs, QwenImageTransformer

    model = QwenImageTransformer(QwenImageArgs(**QWEN_SMALL))
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def _qwen_inputs(device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    batch, grid, text = 2, 16, 64
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[1, 40:] = 0
    return dict(
        hidden_states=torch.randn(batch, grid * grid, QWEN_SMALL["in_channels"], generator=g).to(device),
        encoder_hidden_states=torch.randn(batch, text, QWEN_SMALL["joint_attention_dim"], generator=g).to(device),
        encoder_hidden_states_mask=mask.to(device),
        timestep=torch.rand(batch, generator=g).to(device),
        img_shapes=[(1, grid, grid)],
    )


def _qwen_diffusers_inputs(ours: dict) -> dict:
    batch = ours["hidden_states"].shape[0]
    return {**ours, "img_shapes": [ours["img_shapes"]] * batch, "return_dict": False}


COMPARISONS = {
    "qwen_image": Comparison(
        "Qwen-Image MMDiT, 2 blocks x 256 wide, batch 2 x (256 image + 64 text tokens), masked padding",
        _qwen_diffusers, _qwen_ours, _qwen_inputs, _qwen_diffusers_inputs,
    ),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _build(name: str, impl: str, device: torch.device, dtype: torch.dtype):
    """(model, step) of one implementation; `step()` runs one fwd+bwd and waits for the device."""
    comparison = COMPARISONS[name]
    torch.manual_seed(0)
    reference = comparison.diffusers_model()
    model = comparison.ours_from(reference) if impl == "ours" else reference
    model = model.to(device=device).train()
    if dtype != torch.float32:  # (diffusers warns on any .to(dtype), even a no-op one)
        model = model.to(dtype)
    inputs = comparison.inputs(device)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
              for k, v in inputs.items()}
    if impl == "diffusers":
        inputs = comparison.diffusers_inputs(inputs)

    def step():
        out = model(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return model, step


def peak_memory(name: str, impl: str, device: torch.device, dtype: torch.dtype) -> float:
    """MiB one fwd+bwd step allocates at its peak above the steady state (run in a fresh process)."""
    _, step = _build(name, impl, device, dtype)
    step()  # warm-up: allocator, lazily built tables, the gradients' storage
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    base = _rss_mib()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def times(name: str, device: torch.device, dtype: torch.dtype, iters: int) -> dict[str, list[float]]:
    """Seconds of each fwd+bwd step of both implementations, interleaved, after one warm-up each."""
    steps = {impl: _build(name, impl, device, dtype)[1] for impl in ("diffusers", "ours")}
    for step in steps.values():
        step()
    out = {impl: [] for impl in steps}
    for _ in range(iters):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            out[impl].append(time.perf_counter() - t0)
    return out


def run(name: str, device: str, dtype: str, iters: int) -> list[dict]:
    """Both implementations' step times (this process) and peak memory (a fresh interpreter each)."""
    measured = times(name, torch.device(device), DTYPES[dtype], iters)
    results = []
    for impl in ("diffusers", "ours"):
        cmd = [sys.executable, "-m", "titan_flow.bench.backbone", "--backbone", name, "--device", device,
               "--dtype", dtype, "--worker", impl]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"bench worker {impl} failed:\n{proc.stderr[-3000:]}")
        results.append({"impl": impl, "ms": 1000 * statistics.median(measured[impl]),
                        "ms_min": 1000 * min(measured[impl]),
                        "peak_mib": json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]})
    return results


def report(name: str, device: str, dtype: str, iters: int, results: list[dict]) -> str:
    ref, ours = results
    lines = [f"[bench] {COMPARISONS[name].description}; {device}, {dtype}, median of {iters} fwd+bwd steps each, "
             "interleaved"]
    for r in results:
        lines.append(f"[bench]   {r['impl']:>9}: {r['ms']:9.1f} ms (min {r['ms_min']:.1f})   "
                     f"peak memory above the model {r['peak_mib']:8.1f} MiB")
    lines.append(f"[bench]   ours / diffusers: time {ours['ms'] / ref['ms']:.3f}x, "
                 f"peak memory {ours['peak_mib'] / max(ref['peak_mib'], 1e-9):.3f}x")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, choices=sorted(COMPARISONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--iters", type=int, default=10, help="timed fwd+bwd steps of each (after one warm-up)")
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.iters < 1:
        raise SystemExit(f"--iters must be >= 1, got {a.iters}")
    if a.worker:
        print(json.dumps({"peak_mib": peak_memory(a.backbone, a.worker, torch.device(a.device), DTYPES[a.dtype])}))
        return 0
    print(report(a.backbone, a.device, a.dtype, a.iters, run(a.backbone, a.device, a.dtype, a.iters)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
