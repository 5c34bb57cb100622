"""What the Triton versions of the ops share: where they can run, and how they allocate their outputs.

Imported only when a Triton op is called, so CPU-only use of kernels/ never imports triton. Whether the
kernels are interpreted is decided by triton when they are decorated (TRITON_INTERPRET=1 must be set
before triton is first imported), so it is read once here, at the same moment.
"""

from __future__ import annotations

import torch
import triton

INTERPRETED = bool(triton.knobs.runtime.interpret)


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors when its interpreter is on; say which to use otherwise."""
    devices = sorted({str(t.device) for t in tensors if t is not None})
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")
    device = torch.device(devices[0])
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    raise ValueError(
        f"{op}: the Triton backend was asked for tensors on {device}, but Triton runs only on CUDA tensors "
        "(or on CPU when TRITON_INTERPRET=1 is set before triton is imported). Use kernels.set_backend('auto') "
        "or set training.kernel_backend = 'auto' (or 'torch') in the job config."
    )


def check_no_grad(op: str, **tensors: torch.Tensor | None) -> None:
    """The fused backward does not differentiate the named per-sample constants."""
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{op}: {name} requires grad, but the Triton op treats it as a constant; "
                "detach it, or call with backend='torch' to differentiate through it"
            )


def flat(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """(B, ...) -> contiguous (B, N) (a copy only when the layout is not already contiguous)."""
    return None if t is None else t.reshape(rows, -1).contiguous()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a Triton op hands back or reduces through; the tests poison it to prove full coverage."""
    return torch.empty(shape, dtype=dtype, device=device)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (as kernels.accumulate does)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def triton_dtype(dtype: torch.dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32
