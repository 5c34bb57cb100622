"""Our backbones vs diffusers' classes, one harness: fwd+bwd time, peak memory, activations, FLOPs.

    python -m titan_flow.bench --backbone sd3 [--configs small,wide] [--iters 5] [--device cuda] [--dtype bfloat16]
    python -m titan_flow.bench --backbone wan --configs full --device cuda --dtype bfloat16 --compile
    python -m titan_flow.bench.versus          # every family at both CPU configs, and the GRPO epoch comparison
    python -m titan_flow.bench.gpu --out DIR   # the full-width configs on a GPU, with MFU

A case is one family at one config. Diffusers' model is built with random weights (N(0, 0.02), so
deep stacks stay finite in bf16) and ours loads them through the family's checkpoint adapter
(`spec.from_diffusers`), so both compute the same function (their largest output difference is
reported) on the same inputs in the same dtype. A step is forward + backward of mean(output^2) with
every weight trained.

- time: one process holds both models and alternates their steps (ours, diffusers, ours, ...) after a
  warm-up step each, so load drift on a shared machine hits both alike; the median is reported (CUDA:
  synchronised around each step). With compile, each block is then compiled in place as training
  does (ours with fullgraph=True, diffusers' blocks without) and the same is timed again.
- peak memory: on CUDA, the allocator's peak during one step above what was allocated before it
  (torch.cuda.max_memory_allocated), in the same process; on the CPU, the growth of the resident
  set's high-water mark over one step (VmHWM, reset first) in a fresh process per implementation,
  since in one process the C allocator would reuse the other model's freed memory.
- saved for backward: the bytes of the distinct storages autograd keeps for backward (saved-tensor
  hooks), a property of the graph that machine load cannot blur.
- peak of live tensors (CPU): the peak bytes of the tensors one step creates and still holds (a dispatch
  mode sees every op's output and when its storage is freed), the implementation's own memory without
  the C allocator's caching and fragmentation that the resident-set figure includes.
- FLOPs: counted from the architecture by `count_flops`: every matmul (F.linear, matmul, mm, bmm,
  addmm, baddbmm, convolutions) and every scaled_dot_product_attention of one forward, as executed,
  at 2 FLOPs per multiply-add (attention: 4 B H Sq Sk D); forward + backward is 3x the forward (the
  backward computes gradients w.r.t. both inputs and weights), the usual MFU convention; elementwise
  ops are not counted. MFU = achieved FLOP/s / the device's dense bf16 tensor-core peak (PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLEMENTATIONS = ("ours", "diffusers")
MIB = 2**20

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; the first name
# contained in torch.cuda.get_device_name() wins, so the specific variants come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "GH200": 989.4, "H200": 989.4, "H100": 989.4,
    "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "A10G": 125.0, "L4": 121.0,
}


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in device_name), None)


# --------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Config:
    """One size of a family: diffusers' config (ours is built from the same fields) and the input shape."""

    model: dict
    batch: int
    latent: tuple[int, ...]  # one sample's latent: (C, H, W), (C, F, H, W), or FLUX/Qwen packed (tokens, C)
    text: int  # text tokens
    note: str = ""  # what the config stands for (e.g. which layers of the published model)


@dataclass(frozen=True)
class Family:
    diffusers_class: str
    configs: dict[str, Config]  # "small", "wide": the CPU pair; "full": full width for a GPU; "toy": its dry run
    inputs: Callable[[Config, torch.Generator], dict]  # our forward's keyword arguments, fp32 on the CPU
    image_tokens: Callable[[Config], int]  # tokens of one sample's latent after patching
    diffusers_inputs: Callable[[dict], dict] = dict  # ours -> diffusers' keyword arguments (return_dict added)
    block_lists: tuple[str, ...] = ("transformer_blocks",)  # attributes of both models holding the blocks


def _sd3_inputs(c: Config, g: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(c.batch, *c.latent, generator=g),
        encoder_hidden_states=torch.randn(c.batch, c.text, c.model["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(c.batch, c.model["pooled_projection_dim"], generator=g),
        timestep=torch.rand(c.batch, generator=g) * 1000,
    )


def _sd3_config(**kw) -> dict:
    base = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=32,
                pooled_projection_dim=64, joint_attention_dim=128)
    return {**base, **kw}


_SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                    qk_norm="rms_norm")

SD3 = Family(
    "SD3Transformer2DModel",
    {
        "small": Config(_sd3_config(num_layers=4, attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
                                    dual_attention_layers=(0, 1), qk_norm="rms_norm"), 2, (16, 32, 32), 32,
                        "SD3.5-shaped (dual attention, RMS q/k norm)"),
        "wide": Config(_sd3_config(num_layers=4, attention_head_dim=64, num_attention_heads=6, caption_projection_dim=384,
                                   dual_attention_layers=(), qk_norm=None), 2, (16, 32, 32), 64, "SD3-shaped"),
        # The SD3 recipe's training forward at 512 px: 1024 image tokens, 77 CLIP + 128 T5 text tokens.
        "full": Config(_SD35_MEDIUM, 8, (16, 64, 64), 205, "SD3.5-Medium, all 24 layers, 512 px"),
        "toy": Config(_sd3_config(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                                  dual_attention_layers=(0,), qk_norm="rms_norm", pooled_projection_dim=16,
                                  joint_attention_dim=32), 2, (16, 8, 8), 8, "the full config's layout, tiny"),
    },
    _sd3_inputs,
    lambda c: c.latent[1] * c.latent[2] // c.model["patch_size"] ** 2,
)


def _wan_config(**kw) -> dict:
    base = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    return {**base, **kw}


def _wan_inputs(c: Config, g: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(c.batch, *c.latent, generator=g),
        timestep=torch.randint(0, 1000, (c.batch,), generator=g),
        encoder_hidden_states=torch.randn(c.batch, c.text, c.model["text_dim"], generator=g),
    )


WAN = Family(
    "WanTransformer3DModel",
    {
        "small": Config(_wan_config(num_attention_heads=4, attention_head_dim=64, text_dim=256, ffn_dim=1024, num_layers=4),
                        2, (16, 5, 16, 24), 64, "4 blocks of width 256"),
        "wide": Config(_wan_config(num_attention_heads=6, attention_head_dim=64, text_dim=512, ffn_dim=1536, num_layers=2),
                       2, (16, 3, 16, 16), 64, "2 blocks of width 384"),
        # The wan_ocr recipe's video: 33 x 240 x 416 -> 9 x 30 x 52 latents, 512 UMT5 tokens.
        "full": Config(_wan_config(num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960,
                                   num_layers=30), 2, (16, 9, 30, 52), 512, "Wan2.1-T2V-1.3B, all 30 layers, 33x240x416"),
        "toy": Config(_wan_config(num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2),
                      2, (16, 2, 4, 4), 8, "the full config's layout, tiny"),
    },
    _wan_inputs,
    lambda c: math.prod(n // p for n, p in zip(c.latent[1:], c.model["patch_size"])),
    block_lists=("blocks",),
)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """(frame, row, column) RoPE widths in FLUX's and Qwen-Image's proportions (16, 56, 56) of 128."""
    first = max(2, head_dim // 16 * 2)
    rest = (head_dim - first) // 4 * 2
    return first, rest, head_dim - first - rest


def _flux_config(heads: int, head_dim: int, double: int, single: int) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
                num_attention_heads=heads, joint_attention_dim=4096 if heads * head_dim == 3072 else 4 * heads * head_dim,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=_rope_axes(head_dim))


def _flux_inputs(c: Config, g: torch.Generator) -> dict:
    from titan_flow.models.common.latents import grid_ids

    side = math.isqrt(c.latent[0])
    return dict(
        hidden_states=torch.randn(c.batch, *c.latent, generator=g),
        encoder_hidden_states=torch.randn(c.batch, c.text, c.model["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(c.batch, c.model["pooled_projection_dim"], generator=g),
        timestep=torch.rand(c.batch, generator=g),
        img_ids=grid_ids(side, side),
        txt_ids=torch.zeros(c.text, 3),
        guidance=torch.full((c.batch,), 3.5),
    )


FLUX = Family(
    "FluxTransformer2DModel",
    {
        "small": Config(_flux_config(4, 64, 2, 4), 2, (256, 64), 64, "2 double + 4 single blocks of width 256"),
        "wide": Config(_flux_config(6, 64, 1, 2), 2, (256, 64), 64, "1 double + 2 single blocks of width 384"),
        "full": Config(_flux_config(24, 128, 4, 8), 4, (1024, 64), 512,
                       "FLUX.1-dev width, 4 of 19 double + 8 of 38 single blocks, 512 px"),
        "toy": Config(_flux_config(2, 16, 1, 1), 2, (16, 64), 8, "the full config's layout, tiny"),
    },
    _flux_inputs,
    lambda c: c.latent[0],
    block_lists=("transformer_blocks", "single_transformer_blocks"),
)


def _qwen_config(heads: int, head_dim: int, layers: int, joint: int) -> dict:
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=head_dim,
                num_attention_heads=heads, joint_attention_dim=joint, axes_dims_rope=_rope_axes(head_dim))


def _qwen_inputs(c: Config, g: torch.Generator) -> dict:
    side = math.isqrt(c.latent[0])
    mask = torch.ones(c.batch, c.text, dtype=torch.long)
    mask[-1, c.text * 5 // 8:] = 0  # one prompt padded
    return dict(
        hidden_states=torch.randn(c.batch, *c.latent, generator=g),
        encoder_hidden_states=torch.randn(c.batch, c.text, c.model["joint_attention_dim"], generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.rand(c.batch, generator=g),
        img_shapes=[(1, side, side)],
    )


QWEN_IMAGE = Family(
    "QwenImageTransformer2DModel",
    {
        "small": Config(_qwen_config(4, 64, 2, 256), 2, (256, 64), 64, "2 blocks of width 256, masked padding"),
        "wide": Config(_qwen_config(6, 64, 1, 384), 2, (256, 64), 64, "1 block of width 384, masked padding"),
        "full": Config(_qwen_config(24, 128, 6, 3584), 4, (1024, 64), 128, "Qwen-Image width, 6 of 60 blocks, 512 px"),
        "toy": Config(_qwen_config(2, 16, 1, 32), 2, (16, 64), 8, "the full config's layout, tiny, masked padding"),
    },
    _qwen_inputs,
    lambda c: c.latent[0],
    diffusers_inputs=lambda ours: {**ours, "img_shapes": [ours["img_shapes"]] * ours["hidden_states"].shape[0]},
)

# Every family with a diffusers class; a family is benchmarked once models/registry.py lists it as ported.
FAMILIES = {"sd3": SD3, "flux": FLUX, "qwen_image": QWEN_IMAGE, "wan": WAN}
CPU_CONFIGS = ("small", "wide")


def ported_families() -> list[str]:
    from titan_flow.models.registry import PORTED

    return [name for name in FAMILIES if name in PORTED]


@dataclass(frozen=True)
class Case:
    family: str
    config: str

    @property
    def spec(self) -> Config:
        return FAMILIES[self.family].configs[self.config]

    @property
    def tokens(self) -> int:
        """Tokens through the blocks per step: batch x (image tokens + text tokens)."""
        return self.spec.batch * (FAMILIES[self.family].image_tokens(self.spec) + self.spec.text)

    def describe(self) -> str:
        c, fam = self.spec, FAMILIES[self.family]
        heads, head_dim = c.model["num_attention_heads"], c.model["attention_head_dim"]
        return (f"{self.family} {self.config}: {c.note}; width {heads * head_dim}, batch {c.batch} x "
                f"({fam.image_tokens(c)} image + {c.text} text tokens)")


def cases(families: list[str] | None = None, configs: tuple[str, ...] = CPU_CONFIGS) -> list[Case]:
    families = ported_families() if families is None else families
    return [Case(f, c) for f in families for c in configs]


# ------------------------------------------------------------------------------------------- building
@dataclass
class Pair:
    """Both implementations of one case with the same weights, and each one's inputs."""

    models: dict[str, nn.Module]
    inputs: dict[str, dict]


def _args_class(spec):
    return type(next(iter(spec.flavors.values())))


def _cast(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Activations to the compute dtype; timesteps, guidance, ids and masks keep theirs."""
    def cast(key, value):
        if not torch.is_tensor(value):
            return value
        if value.is_floating_point() and key.endswith(("states", "projections")):
            return value.to(device, dtype)
        return value.to(device)

    return {k: cast(k, v) for k, v in inputs.items()}


@torch.no_grad()
def build(case: Case, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          which: tuple[str, ...] = IMPLEMENTATIONS) -> Pair:
    """Diffusers' model with seeded N(0, 0.02) weights and ours holding the same weights, on `device` in `dtype`."""
    import diffusers

    from titan_flow.models import get_model_spec

    device = torch.device(device)
    family, config = FAMILIES[case.family], case.spec
    torch.manual_seed(0)
    with torch.device(device):
        reference = getattr(diffusers, family.diffusers_class)(**config.model)
    g = torch.Generator(device=device).manual_seed(0)
    for p in reference.parameters():
        p.normal_(0.0, 0.02, generator=g)
    models = {}
    if "ours" in which:
        spec = get_model_spec(case.family)
        args = _args_class(spec)(**config.model)
        with torch.device(device):
            ours = spec.model_cls(args)
        ours.init_weights()  # buffers that are not in the state dict
        ours.load_state_dict(spec.from_diffusers(reference.state_dict(), args), strict=True)
        models["ours"] = ours.to(dtype).train()
    if "diffusers" in which:
        models["diffusers"] = (reference if dtype == torch.float32 else reference.to(dtype)).train()  # built in fp32
    ours_inputs = _cast(family.inputs(config, torch.Generator().manual_seed(1)), device, dtype)
    inputs = {"ours": ours_inputs, "diffusers": {**family.diffusers_inputs(ours_inputs), "return_dict": False}}
    return Pair(models, {k: inputs[k] for k in models})


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out[0]  # diffusers returns a tuple


def fwd_bwd(model: nn.Module, inputs: dict) -> None:
    output(model, inputs).float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def max_output_diff(pair: Pair) -> tuple[float, float]:
    """(max |ours - diffusers|, max |diffusers|) of one forward."""
    with torch.no_grad():
        ours, ref = (output(pair.models[w], pair.inputs[w]).float() for w in IMPLEMENTATIONS)
    return (ours - ref).abs().max().item(), ref.abs().max().item()


def saved_for_backward_mib(model: nn.Module, inputs: dict) -> float:
    """MiB of the distinct storages autograd keeps for backward in one step (each storage counted once)."""
    storages: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = output(model, inputs)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / MIB


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the distinct storages created inside it that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def tensor_peak_mib(model: nn.Module, inputs: dict) -> float:
    """MiB of the peak of live tensors one step creates (activations, gradients, temporaries; every op of the
    forward and the backward counted at its output): what an implementation holds, without the allocator's
    caching and fragmentation that blur a resident-set measurement on the CPU."""
    counter = _LiveTensorBytes()
    with counter:
        out = output(model, inputs)
        out.float().square().mean().backward()
    del out
    model.zero_grad(set_to_none=True)
    return counter.peak / MIB


# ---------------------------------------------------------------------------------------------- FLOPs
def _matmul_flops(out: torch.Tensor, inner: int) -> int:
    return 2 * out.numel() * inner


class FlopCounter(TorchFunctionMode):
    """Counts matmul and attention FLOPs of the torch functions called inside it (2 per multiply-add)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)

        def arg(i: int, name: str) -> torch.Tensor:
            return args[i] if len(args) > i else kwargs[name]

        if func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
                    torch.bmm, torch.Tensor.bmm):
            self.flops += _matmul_flops(out, arg(0, "input").shape[-1])
        elif func in (torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm):
            self.flops += _matmul_flops(out, arg(1, "batch1" if "bmm" in func.__name__ else "mat1").shape[-1])
        elif func in (F.conv1d, F.conv2d, F.conv3d):
            self.flops += _matmul_flops(out, arg(1, "weight")[0].numel())
        elif func is F.scaled_dot_product_attention:
            q, k, v = arg(0, "query"), arg(1, "key"), arg(2, "value")
            rows = q.numel() // q.shape[-1]  # B x H x Sq
            self.flops += 2 * rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return out


def count_flops(model: nn.Module, inputs: dict) -> int:
    """FLOPs of one forward + backward counted from the architecture (3 x the forward's; see the module docstring)."""
    counter = FlopCounter()
    with torch.no_grad(), counter:
        output(model, inputs)
    return 3 * counter.flops


# ------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step, the steps taking turns (one warm-up round first, not timed)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats + 1):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def compile_blocks(model: nn.Module, attributes: tuple[str, ...], fullgraph: bool, backend: str = "inductor") -> None:
    """Each block compiled in place, as distributed/parallelize.py compiles the trained model's blocks."""
    for name in attributes:
        for block in getattr(model, name):
            block.compile(fullgraph=fullgraph, backend=backend)


# ------------------------------------------------------------------------------------------- memory
def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def cpu_peak_growth_here(case: Case, which: str, dtype: torch.dtype) -> float:
    """In this fresh process: MiB the resident set's high-water mark grows by over one step of one implementation."""
    pair = build(case, "cpu", dtype, which=(which,))
    model, inputs = pair.models[which], pair.inputs[which]
    fwd_bwd(model, inputs)  # lazily created state belongs to the baseline
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed activations back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _vm_hwm_bytes()
    fwd_bwd(model, inputs)
    return (_vm_hwm_bytes() - before) / MIB


def cpu_peak_growth(case: Case, which: str, dtype: str) -> float:
    """`cpu_peak_growth_here` in a fresh interpreter."""
    cmd = [sys.executable, "-m", "titan_flow.bench.backbone", "--_peak", f"{case.family}:{case.config}:{which}:{dtype}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the peak-memory process of {which} {case.family} {case.config} failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def cuda_peak_above(step: Callable[[], None], device: torch.device) -> float:
    """MiB the CUDA allocator's peak during `step` rises above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


# ------------------------------------------------------------------------------------------- compare
@dataclass
class Result:
    case: str
    description: str
    device: str
    dtype: str
    mode: str  # "eager" or "compile"
    tokens: int
    params: int
    max_abs_diff: float
    max_abs_output: float
    ms: dict[str, float] = field(default_factory=dict)  # median per step
    ms_range: dict[str, tuple[float, float]] = field(default_factory=dict)  # fastest and slowest step
    peak_mib: dict[str, float] = field(default_factory=dict)
    saved_mib: dict[str, float] = field(default_factory=dict)
    tensor_peak_mib: dict[str, float] = field(default_factory=dict)  # CPU: peak of live tensors in one step
    flops: dict[str, int] = field(default_factory=dict)  # per step, forward + backward
    compile_s: dict[str, float] = field(default_factory=dict)  # first compiled step (compile mode)
    peak_tflops: float | None = None  # the device's, for MFU

    def tokens_per_s(self, which: str) -> float:
        return self.tokens / self.ms[which] * 1e3

    def tflops(self, which: str) -> float:
        return self.flops[which] / self.ms[which] / 1e9

    def mfu(self, which: str) -> float | None:
        return None if self.peak_tflops is None else self.tflops(which) / self.peak_tflops

    def ratio(self, what: str) -> float:
        values = getattr(self, what)
        return values["ours"] / values["diffusers"] if values.get("diffusers") else float("nan")


def compare(case: Case, device: str = "cpu", dtype: str = "float32", iters: int = 5, modes: tuple[str, ...] = ("eager",),
            compile_backend: str = "inductor", memory: bool = True) -> list[Result]:
    """One Result per mode: "eager", and "compile" (each block compiled with `compile_backend`, timed after the
    compiling step). `memory`: measure peak memory (CUDA: in this process; CPU: a fresh process per implementation)."""
    dev, dt = torch.device(device), DTYPES[dtype]
    pair = build(case, dev, dt)
    diff, scale = max_output_diff(pair)
    params = sum(p.numel() for p in pair.models["ours"].parameters())
    peak = peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" and dt != torch.float32 else None
    flops = {w: count_flops(pair.models[w], pair.inputs[w]) for w in IMPLEMENTATIONS}
    steps = {w: (lambda w=w: fwd_bwd(pair.models[w], pair.inputs[w])) for w in IMPLEMENTATIONS}
    results = []
    for mode in modes:
        r = Result(f"{case.family} {case.config}", case.describe(), str(dev), dtype, mode, case.tokens, params, diff,
                   scale, flops=flops, peak_tflops=peak)
        if mode == "compile":
            r.mode = f"compile ({compile_backend})"
            for w, model in pair.models.items():
                compile_blocks(model, FAMILIES[case.family].block_lists, fullgraph=w == "ours", backend=compile_backend)
                _sync(dev)
                start = time.perf_counter()
                steps[w]()  # compiles the forward and the backward
                _sync(dev)
                r.compile_s[w] = time.perf_counter() - start
        elif mode != "eager":
            raise ValueError(f"modes: {mode!r} is not 'eager' or 'compile'")
        times = time_interleaved(steps, iters, dev)
        r.ms = {w: 1e3 * statistics.median(t) for w, t in times.items()}
        r.ms_range = {w: (1e3 * min(t), 1e3 * max(t)) for w, t in times.items()}
        if mode == "eager":
            r.saved_mib = {w: saved_for_backward_mib(pair.models[w], pair.inputs[w]) for w in IMPLEMENTATIONS}
            if dev.type == "cpu":
                r.tensor_peak_mib = {w: tensor_peak_mib(pair.models[w], pair.inputs[w]) for w in IMPLEMENTATIONS}
        if memory and dev.type == "cuda":
            r.peak_mib = {w: cuda_peak_above(steps[w], dev) for w in IMPLEMENTATIONS}
        elif memory and mode == "eager":
            r.peak_mib = {w: cpu_peak_growth(case, w, dtype) for w in IMPLEMENTATIONS}
        results.append(r)
    return results


# ------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec) + suffix


def table(results: list[Result]) -> str:
    """Markdown: one row per (case, mode), ours and diffusers side by side with their ratios."""
    lines = ["| case | mode | ms ours | ms diffusers | time ratio | tokens/s ours | TFLOP/s ours | MFU ours | "
             "MFU diffusers | peak MiB ours | peak MiB diffusers | memory ratio | saved MiB ours / diffusers | "
             "compile s ours / diffusers | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = {w: None if r.mfu(w) is None else 100 * r.mfu(w) for w in IMPLEMENTATIONS}
        pair = {what: " / ".join(_fmt(getattr(r, what).get(w), ".1f") for w in IMPLEMENTATIONS)
                for what in ("saved_mib", "compile_s")}
        lines.append(
            f"| {r.case} | {r.mode} | {r.ms['ours']:.1f} | {r.ms['diffusers']:.1f} | {r.ratio('ms'):.2f}x | "
            f"{r.tokens_per_s('ours'):.4g} | {r.tflops('ours'):.3g} | {_fmt(mfu['ours'], '.1f', '%')} | "
            f"{_fmt(mfu['diffusers'], '.1f', '%')} | {_fmt(r.peak_mib.get('ours'), '.0f')} | "
            f"{_fmt(r.peak_mib.get('diffusers'), '.0f')} | {_fmt(r.ratio('peak_mib') if r.peak_mib else None, '.2f', 'x')} | "
            f"{pair['saved_mib']} | {pair['compile_s']} | {r.max_abs_diff:.2g} |")
    return "\n".join(lines)


def report(results: list[Result], iters: int) -> str:
    first = results[0]
    memory = "CUDA allocator peak above the resident weights" if first.device.startswith("cuda") else \
        "growth of the peak resident set, each implementation in its own process"
    lines = [f"[bench] forward+backward, {first.dtype} on {first.device}, median of {iters} alternated steps each (fastest-slowest in brackets); "
             f"peak memory = {memory}; FLOPs counted from the architecture (3 x forward matmuls + attention)"]
    for r in results:
        lines.append(f"[bench] {r.description}, {r.params / 1e6:.2f} M params, {r.mode}; outputs agree to "
                     f"{r.max_abs_diff:.2g} (largest |output| {r.max_abs_output:.3g})")
        for w in IMPLEMENTATIONS:
            peak = r.peak_mib.get(w)
            spread = "({:.0f}-{:.0f})".format(*r.ms_range[w]) if r.ms_range else ""
            lines.append(f"[bench]   {w:9s} {r.ms[w]:9.1f} ms {spread:13s} {r.tokens_per_s(w):10.4g} tokens/s  "
                         f"{r.tflops(w):8.3g} TFLOP/s  peak {_fmt(peak, '8.1f')} MiB  "
                         f"saved for backward {_fmt(r.saved_mib.get(w), '8.1f')} MiB  "
                         f"peak of live tensors {_fmt(r.tensor_peak_mib.get(w), '8.1f')} MiB")
        lines.append(f"[bench]   ours / diffusers: time {r.ratio('ms'):.2f}x, peak memory "
                     f"{_fmt(r.ratio('peak_mib') if r.peak_mib else None, '.2f', 'x')}, saved for backward "
                     f"{_fmt(r.ratio('saved_mib') if r.saved_mib else None, '.2f', 'x')}, peak of live tensors "
                     f"{_fmt(r.ratio('tensor_peak_mib') if r.tensor_peak_mib else None, '.2f', 'x')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench --backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=sorted(FAMILIES), help="family (must be ported: models/registry.py PORTED)")
    p.add_argument("--configs", default=",".join(CPU_CONFIGS), help="comma-separated of small, wide (CPU) and full (GPU)")
    p.add_argument("--iters", type=int, default=5, help="timed forward+backward steps per implementation (after a warm-up)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time both with their blocks compiled (inductor)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--_peak", help=argparse.SUPPRESS)  # family:config:which:dtype, in a fresh process
    a = p.parse_args(argv)
    if a._peak:
        family, config, which, dtype = a._peak.split(":")
        print(cpu_peak_growth_here(Case(family, config), which, DTYPES[dtype]))
        return 0
    if a.backbone is None:
        p.error("--backbone is required")
    if a.backbone not in ported_families():
        p.error(f"--backbone: {a.backbone!r} is not ported in this tree yet; ported: {', '.join(ported_families())}")
    configs = [c for c in a.configs.split(",") if c]
    unknown = sorted(set(configs) - set(FAMILIES[a.backbone].configs))
    if unknown:
        p.error(f"--configs: {unknown} are not configs of {a.backbone}; choose from {', '.join(FAMILIES[a.backbone].configs)}")
    modes = ("eager", "compile") if a.compile else ("eager",)
    results = [r for c in configs for r in compare(Case(a.backbone, c), a.device, a.dtype, a.iters, modes)]
    print(report(results, a.iters), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps([vars(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
