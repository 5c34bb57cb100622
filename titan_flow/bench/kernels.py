"""Benchmark of the fused RL kernels (kernels/): Triton vs the eager PyTorch reference vs torch.compile of it.

    python -m titan_flow.bench.kernels                 # on a CUDA machine: the tables for kernels/README.md
    python -m titan_flow.bench.kernels --no-compile    # skip torch.compile (its compiles take minutes)

Sizes are the SD3.5-M (16x64x64 latents, 512^2 images) and FLUX (16x128x128, 1024^2) training steps at
batch 8 and 32. Each row gives the median time (triton.testing.do_bench, L2 flushed between runs) and
the bandwidth achieved against the bytes-moved floor: every input of each kernel read once, every output
written once (the backward re-reads v, x, x_next and writes d/dv). The copy bandwidth of the device
(dst.copy_(src) over 1 GiB) is measured first; the targets are >= 80% of it and >= 2x eager.

Without a GPU it says so, prints the bytes-moved floors and runs a small correctness check of the Triton
kernels in Triton's interpreter against the references, and exits 0. `run()` returns the rows as data
and `format_tables()` prints them: the GPU suite (`python -m titan_flow.bench.gpu`) calls both, and its
dry run calls them with `toy=True` (tiny latents, perf_counter timing, the interpreter on the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

LATENTS = {"sd3.5-m": (16, 64, 64), "flux": (16, 128, 128)}
BATCHES = (8, 32)
LOSS_BATCHES = (8, 32, 1024)


@dataclass(frozen=True)
class SdeCase:
    model: str
    batch: int
    v_dtype: torch.dtype  # the model's velocity (and the reference policy's)
    latent_dtype: torch.dtype  # x, x_next, mean_old as stored by the rollout
    extras: bool  # KL to a reference velocity and GRPO-Guard's ratio bias in the same pass
    backward: bool  # forward + backward (d/dv), the training call
    latent: tuple[int, ...] | None = None  # one sample's latent; None = LATENTS[model] (set: a dry run's toy size)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.latent or LATENTS[self.model]

    @property
    def elements(self) -> int:
        return self.batch * math.prod(self.shape)

    def label(self) -> str:
        dtypes = "bf16" if self.latent_dtype == torch.bfloat16 else "v bf16, x fp32"
        what = ("lp+kl+bias" if self.extras else "lp") + (" fwd+bwd" if self.backward else " fwd")
        model = self.model if self.latent is None else "toy " + "x".join(map(str, self.latent))
        return f"{model} B={self.batch} {dtypes} {what}"

    def bytes_floor(self) -> int:
        v, lat, n, b = _size(self.v_dtype), _size(self.latent_dtype), self.elements, self.batch
        reads = n * (v + 2 * lat) + 3 * 4 * b  # v, x, x_next; coef_x, coef_v, std
        writes = 4 * b  # log_prob
        if self.extras:
            reads += n * (v + lat) + 4 * b  # v_ref, mean_old; kl_std
            writes += 2 * 4 * b  # kl, ratio_bias
        if self.backward:
            reads += n * (v + 2 * lat) + 3 * 4 * b + 4 * b  # again, plus d/dlog_prob
            if self.extras:
                reads += n * (v + lat) + 2 * 4 * b
            writes += n * v  # d/dv
        return reads + writes


def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.2f} kB"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sde_cases(toy: bool = False) -> list[SdeCase]:
    """Every benchmark case; `toy`: both dtype layouts, the lightest and the heaviest pass, on 2 x 4x8x8 latents."""
    if toy:
        return [SdeCase("sd3.5-m", 2, torch.bfloat16, latent_dtype, extras, extras, latent=(4, 8, 8))
                for latent_dtype in (torch.float32, torch.bfloat16) for extras in (False, True)]
    return [
        SdeCase(model, batch, torch.bfloat16, latent_dtype, extras, backward)
        for model in LATENTS
        for batch in BATCHES
        for latent_dtype in (torch.float32, torch.bfloat16)
        for extras, backward in ((False, False), (True, False), (False, True), (True, True))
    ]


def sde_inputs(case: SdeCase, device: str, generator: torch.Generator | None = None) -> dict:
    b, shape = case.batch, (case.batch, *case.shape)

    def rand(dtype, *s):
        return torch.randn(*s, generator=generator, device=device).to(dtype)

    inp = dict(
        v=rand(case.v_dtype, *shape).requires_grad_(case.backward), x=rand(case.latent_dtype, *shape),
        x_next=rand(case.latent_dtype, *shape),
        coef_x=1 + 0.01 * rand(torch.float32, b), coef_v=-0.05 + 0.01 * rand(torch.float32, b),
        std=0.5 + 0.1 * rand(torch.float32, b).abs(), kind="gaussian",
    )
    if case.extras:
        inp.update(v_ref=rand(case.v_dtype, *shape), kl_std=1 + 0.1 * rand(torch.float32, b).abs(),
                   mean_old=rand(case.latent_dtype, *shape))
    return inp


def sde_runner(case: SdeCase, op, inp: dict):
    """A no-argument callable running `op` on `inp` (forward, or forward + d/dv)."""
    if not case.backward:
        return lambda: op(**inp)
    upstream = [torch.linspace(0.5, 1.5, case.batch, device=inp["v"].device) * w for w in (1.0, 0.1, -0.3)]

    def step():
        out = op(**inp)
        outs = [out.log_prob] + ([out.kl, out.ratio_bias] if case.extras else [])
        return torch.autograd.grad(outs, inp["v"], upstream[: len(outs)])

    return step


@dataclass(frozen=True)
class LossCase:
    batch: int
    ratio_norm: bool
    backward: bool

    def label(self) -> str:
        loss = "ratio-norm" if self.ratio_norm else "ppo-clip"
        return f"B={self.batch} {loss} {'fwd+bwd' if self.backward else 'fwd'}"

    def bytes_floor(self) -> int:
        n_in = 5 if self.ratio_norm else 3
        total = 4 * self.batch * n_in + 4 * self.batch + 4 * 5  # inputs; ratio; loss and 4 statistics
        if self.backward:
            total += 4 * self.batch * n_in + 4 + 4 * self.batch  # inputs again, d/dloss; d/dlog_prob
        return total


def loss_cases(toy: bool = False) -> list[LossCase]:
    if toy:
        return [LossCase(8, False, False), LossCase(8, True, True)]
    return [LossCase(b, rn, bwd) for b in LOSS_BATCHES for rn in (False, True) for bwd in (False, True)]


def loss_runner(case: LossCase, op, device: str, generator: torch.Generator | None = None):
    r = lambda: torch.randn(case.batch, generator=generator, device=device)  # noqa: E731
    log_prob = (-1 + 0.01 * r()).requires_grad_(case.backward)
    old, adv = -1 + 0.01 * r(), r()
    extra = dict(ratio_scale=0.5 + 0.1 * r().abs(), ratio_bias=1e-3 * r().abs()) if case.ratio_norm else {}

    def step():
        out = op(log_prob, old, adv, 1e-4, 1e-4, 5.0, loss_weight=2.0, **extra)
        return torch.autograd.grad(out.loss, log_prob) if case.backward else out

    return step


def gpu_timer(fn) -> float:
    """Median microseconds of fn() on CUDA (triton.testing.do_bench: warm-up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def cpu_timer(fn, repeats: int = 3) -> float:
    """Median microseconds of fn() after one warm-up call (the dry run's stand-in for do_bench)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def copy_bandwidth(device: str, timer=gpu_timer, elements: int = 1 << 28) -> float:
    """GB/s of dst.copy_(src) (1 GiB of fp32 by default): the practical ceiling for a streaming kernel here."""
    src = torch.empty(elements, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer(lambda: dst.copy_(src)) / 1e3


def implementations(compile_backend: str | None) -> tuple[dict, dict]:
    """{name: op} for the log-prob and the loss: Triton, the eager reference and (with a backend) its torch.compile."""
    import kernels
    from kernels.ratio_loss import clipped_ratio_loss_reference
    from kernels.sde_logprob import sde_log_prob_reference

    sde = {"triton": partial(kernels.sde_log_prob, backend="triton"), "eager": sde_log_prob_reference}
    loss = {"triton": partial(kernels.clipped_ratio_loss, backend="triton"), "eager": clipped_ratio_loss_reference}
    if compile_backend:
        torch._dynamo.config.cache_size_limit = 64
        sde["compile"] = torch.compile(sde_log_prob_reference, backend=compile_backend)
        loss["compile"] = torch.compile(clipped_ratio_loss_reference, backend=compile_backend)
    return sde, loss


def bench_rows(cases, impls: dict, make_runner, timer, copy_gbs: float, deadline: float | None = None) -> list[dict]:
    """One row per case: microseconds per implementation and Triton's GB/s against the bytes-moved floor.
    Cases not started before `deadline` (time.monotonic) are listed as not reached."""
    rows = []
    for case in cases:
        row = {"case": case.label(), "floor_bytes": case.bytes_floor()}
        if deadline is not None and time.monotonic() > deadline:
            rows.append({**row, "not_reached": True})
            continue
        us = {name: timer(make_runner(case, impl)) for name, impl in impls.items()}
        gbs = case.bytes_floor() / us["triton"] / 1e3
        rows.append({**row, "us": us, "triton_gbs": gbs, "copy_share": gbs / copy_gbs})
    return rows


def run(device: str = "cuda", compile_backend: str | None = "inductor", toy: bool = False,
        deadline: float | None = None) -> dict:
    """The benchmark as data: copy bandwidth, then the log-prob and loss rows (`toy`: the dry run's cases,
    timed with perf_counter, for CPU tensors in Triton's interpreter)."""
    timer = gpu_timer if torch.device(device).type == "cuda" else partial(cpu_timer, repeats=1 if toy else 3)
    copy_gbs = copy_bandwidth(device, timer, 1 << 16 if toy else 1 << 28)
    sde_impls, loss_impls = implementations(compile_backend)
    return {
        "copy_gbs": copy_gbs,
        "sde": bench_rows(sde_cases(toy), sde_impls, lambda c, op: sde_runner(c, op, sde_inputs(c, device)), timer,
                          copy_gbs, deadline),
        "loss": bench_rows(loss_cases(toy), loss_impls, lambda c, op: loss_runner(c, op, device), timer, copy_gbs,
                           deadline),
    }


def format_tables(result: dict) -> str:
    """Markdown tables of `run`'s rows (the layout kernels/README.md shows)."""
    out = [f"copy bandwidth (dst.copy_(src)): {result['copy_gbs']:.0f} GB/s\n"]
    for title, key in (("SDE log-prob (kernels.sde_log_prob)", "sde"),
                       ("Clipped ratio loss (kernels.clipped_ratio_loss)", "loss")):
        rows = result[key]
        cols = next((list(r["us"]) for r in rows if "us" in r), ["triton", "eager"])
        head = ["case", "floor"] + [f"{c} us" for c in cols] + ["triton GB/s", "% of copy"]
        head += [f"speedup vs {c}" for c in cols[1:]]
        out += [f"### {title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if r.get("not_reached"):
                out.append(f"| {r['case']} | {_bytes(r['floor_bytes'])} | not reached (time limit) |")
                continue
            us = r["us"]
            row = [r["case"], _bytes(r["floor_bytes"])] + [f"{us[c]:.1f}" for c in cols]
            row += [f"{r['triton_gbs']:.0f}", f"{100 * r['copy_share']:.0f}%"]
            row += [f"{us[c] / us['triton']:.2f}x" for c in cols[1:]]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def bench_gpu(compile_reference: bool, device: str = "cuda") -> None:
    print(f"{datetime.date.today().isoformat()}  {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}\n")
    print(format_tables(run(device, "inductor" if compile_reference else None)), flush=True)


def smoke_cpu() -> None:
    """The Triton kernels in the interpreter vs the references, on one small case of each op."""
    import kernels
    from kernels.ratio_loss import clipped_ratio_loss_reference
    from kernels.sde_logprob import sde_log_prob_reference

    g = torch.Generator().manual_seed(0)
    for backward in (False, True):
        case = SdeCase("sd3.5-m", 2, torch.bfloat16, torch.float32, True, backward, latent=(16, 8, 8))
        inp = sde_inputs(case, "cpu", g)
        got = sde_runner(case, lambda **kw: kernels.sde_log_prob(**kw, backend="triton"), inp)()
        want = sde_runner(case, sde_log_prob_reference, inp)()
        diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(got, want) if a is not None]
        print(f"  sde_log_prob {'fwd+bwd' if backward else 'fwd'} (2x16x8x8, v bf16, x fp32): "
              f"max abs diff {max(diffs):.2e}")
    for ratio_norm, backward in ((False, False), (True, True)):
        case = LossCase(32, ratio_norm, backward)
        got = loss_runner(case, lambda *a, **kw: kernels.clipped_ratio_loss(*a, **kw, backend="triton"), "cpu",
                          torch.Generator().manual_seed(1))()
        want = loss_runner(case, clipped_ratio_loss_reference, "cpu", torch.Generator().manual_seed(1))()
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
        print(f"  clipped_ratio_loss {case.label()}: max abs diff {diff:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        bench_gpu(compile_reference=not args.no_compile)
        return 0
    print("No CUDA GPU here: the timings and GB/s figures need one (run this on an H100/H200).")
    print("\nBytes-moved floor per case (each input read once, each output written once):")
    for case in sde_cases():
        print(f"  sde_log_prob {case.label():44s} {_bytes(case.bytes_floor()):>10s}")
    for case in loss_cases():
        print(f"  clipped_ratio_loss {case.label():38s} {_bytes(case.bytes_floor()):>10s}")
    # Triton reads TRITON_INTERPRET when the kernels are defined (on first use, below)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print("\nCorrectness smoke test, Triton interpreter vs the PyTorch reference:")
    smoke_cpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())
