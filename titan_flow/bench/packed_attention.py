"""Packed attention at Bagel's shapes: flash-attn varlen vs FlexAttention vs the SDPA loop, in tokens/s.

    python -m titan_flow.bench.packed_attention             # on a CUDA machine: the table at bagel_full's shapes
    python -m titan_flow.bench.packed_attention --dry-run   # anywhere: toy shapes, every backend that runs here

The kernels are models/common/attention.py's (what `model.attention_backend` selects), on the packed
layouts the Bagel model builds, in bf16 with BAGEL-7B-MoT's heads (28 query, 4 key/value, 128 wide):
  - bagel_full denoise: the attention of one denoising step of bagel_full.toml's per-rank batch:
    6 samples x 2 CFG branches = 12 image blocks of 32 x 32 latent tokens + 2 markers (512 px), each
    attending to its context (a 64-token prompt for the conditional branch, nothing for the
    text-unconditional one) and to itself. Forward (rollout) and forward + backward (training).
  - bagel_full prefill: the batch's 6 prompts of 64 tokens, causal (the prompt KV cache).
  - edit 1024 denoise: one editing step at Bagel's default 1024 px: 3 CFG branches of a 64 x 64 block
    over [VAE image 4098 | ViT image 4902 | text 64], [VAE | ViT] and [text].
Each row: median milliseconds (CUDA events), query tokens per second, and max |output - SDPA loop's|.
`run()` returns the rows for the GPU suite (`python -m titan_flow.bench.gpu`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from titan_flow.models.common import attention as attn
from titan_flow.models.common.attention import PackedAttention, PackedLayout


@dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    causal: bool
    backward: bool
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128

    @property
    def layout(self) -> PackedLayout:
        return PackedLayout.varlen(self.q_lens, self.k_lens, self.causal)

    @property
    def tokens(self) -> int:
        return sum(self.q_lens)


def bagel_cases(toy: bool = False) -> list[Case]:
    """The cases of the module docstring; `toy` shrinks every length and width for a CPU dry run."""
    if toy:
        block, prompt, small = 4 * 4 + 2, 6, {"heads": 4, "kv_heads": 2, "head_dim": 16}
        vae, vit, edit_block = 3 * 3 + 2, 4 * 5 + 2, 3 * 3 + 2
    else:
        block, prompt, small = 32 * 32 + 2, 64, {}
        vae, vit, edit_block = 64 * 64 + 2, 70 * 70 + 2, 64 * 64 + 2
    rows = 6
    denoise_q = (block,) * (2 * rows)
    denoise_k = tuple(block + prompt for _ in range(rows)) + (block,) * rows
    edit_k = (edit_block + vae + vit + prompt, edit_block + vae + vit, edit_block + prompt)
    return [
        Case("bagel_full denoise fwd", denoise_q, denoise_k, False, False, **small),
        Case("bagel_full denoise fwd+bwd", denoise_q, denoise_k, False, True, **small),
        Case("bagel_full prefill fwd", (prompt,) * rows, (prompt,) * rows, True, False, **small),
        Case("edit 1024 denoise fwd", (edit_block,) * 3, edit_k, False, False, **small),
    ]


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = ["flex", "sdpa"]
    if attn._flash_varlen is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        names.insert(0, "flash")
    return names


def _inputs(case: Case, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(n, heads):
        return torch.randn(n, heads, case.head_dim, generator=g).to(device, dtype).requires_grad_(case.backward)

    q = rand(case.tokens, case.heads)
    k, v = rand(sum(case.k_lens), case.kv_heads), rand(sum(case.k_lens), case.kv_heads)
    return q, k, v, torch.randn(case.tokens, case.heads, case.head_dim, generator=g).to(device, dtype)


def _step(kernel: PackedAttention, case: Case, q, k, v, grad):
    """One call as the model makes it: forward under no_grad (rollout), or forward + backward (training)."""

    def step():
        if not case.backward:
            with torch.no_grad():
                return kernel(q.detach(), k.detach(), v.detach())
        out = kernel(q, k, v)
        out.backward(grad)
        return out

    return step


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of fn() after `warmup` calls (which include FlexAttention's compile)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run(
    cases: list[Case] | None = None,
    backends: list[str] | None = None,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 20,
    warmup: int = 3,
) -> list[dict]:
    """One row per (case, backend): ms, query tokens/s and max |out - the SDPA loop's| (forward output)."""
    device = torch.device(device)
    cases = bagel_cases() if cases is None else cases
    backends = available_backends(device, dtype) if backends is None else backends
    rows = []
    for case in cases:
        q, k, v, grad = _inputs(case, device, dtype)
        with torch.no_grad():
            reference = PackedAttention(case.layout, "sdpa", device, dtype)(q.detach(), k.detach(), v.detach()).float()
        for backend in backends:
            kernel = PackedAttention(case.layout, backend, device, dtype)
            if case.backward and kernel.backend == "flex" and device.type != "cuda":
                continue  # FlexAttention has no CPU backward
            with torch.no_grad():
                diff = (kernel(q.detach(), k.detach(), v.detach()).float() - reference).abs().max().item()
            ms = _timed(_step(kernel, case, q, k, v, grad), device, repeats, warmup)
            rows.append({"case": case.name, "backend": kernel.backend, "tokens": case.tokens, "ms": ms,
                         "tokens_per_s": case.tokens / ms * 1e3, "max_abs_diff_vs_sdpa": diff})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| case | backend | query tokens | ms | tokens/s | max abs diff vs sdpa |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['backend']} | {r['tokens']} | {r['ms']:.3f} | {r['tokens_per_s']:.3g} | "
                     f"{r['max_abs_diff_vs_sdpa']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy shapes on whatever device is here (CPU: fp32)")
    parser.add_argument("--backends", default="", help="comma-separated subset of flash,flex,sdpa (default: all available)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b] or None
    if args.dry_run:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = run(bagel_cases(toy=True), backends, device, dtype, repeats=2, warmup=1)
        print(f"dry run on {device} ({dtype}), toy shapes:\n{format_table(rows)}")
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU here: the tokens/s figures need one. `--dry-run` runs the toy shapes on the CPU.")
        return 0
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  flash-attn "
          f"{'installed' if attn._flash_varlen is not None else 'not installed'}\n")
    print(format_table(run(backends=backends, repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
