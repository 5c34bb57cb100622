"""Without a GPU, run Triton kernels in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module imports one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
