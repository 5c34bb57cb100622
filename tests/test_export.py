"""`python -m titan_flow.export`: a run's DCP checkpoint -> a diffusers `transformer/` directory.

Two short CPU training runs (full fine-tune, and LoRA) of each family (the debug SD3 and the debug
FLUX, the debug Qwen-Image) write checkpoints with an EMA that differs from the trained weights. The exports
are read back with diffusers' own SD3Transformer2DModel / FluxTransformer2DModel / QwenImageTransformer2DModel
and compared with our model holding the same weights, taken from the checkpoint independently of the export code (DCP's
converter, no process group).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan_flow.checkpoint.manager import step_dir
from titan_flow.peft.lora import apply_lora
from titan_flow.models.common.latents import grid_ids
from titan_flow.models.flux import FLAVORS as FLUX_FLAVORS
from titan_flow.models.flux import FluxTransformer
from titan_flow.models.qwen_image import FLAVORS as QWEN_FLAVORS
from titan_flow.models.qwen_image import QwenImageTransformer
from titan_flow.models.sd3 import FLAVORS, SD3Transformer

REPO = Path(__file__).resolve().parents[1]
TRAIN = [
    "--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml"),  # the tiny random-init debug job
    "--sampling.num_steps", "4", "--sampling.num_image_per_prompt", "4", "--sampling.batch_size", "4",
    "--sampling.num_batches_per_epoch", "1", "--training.gradient_accumulation_steps", "1",
    "--training.steps", "2", "--training.ema_update_interval", "1", "--eval.freq", "0",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0",
    "--checkpoint.enable", "true", "--checkpoint.interval", "1",
]
LORA = ["--lora.enable", "true", "--lora.rank", "4", "--lora.alpha", "8", "--optimizer.lr", "0.05"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TOL = 1e-5  # ours vs diffusers' in fp32 (tests/test_{sd3,flux,qwen_image}_model.py)
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out"]


def run(*args: str, module: str, nproc: int = 0) -> str:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc else []
    proc = subprocess.run([sys.executable, *launcher, "-m", module, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


def train(out: Path, name: str, *extra: str) -> Path:
    run(*TRAIN, "--job.output_dir", str(out), "--job.run_name", name, *extra, module="titan_flow.train", nproc=1)
    return out / name


def checkpoint_weights(run_dir: Path, step: int, scratch: Path) -> tuple[dict, list]:
    """(model state dict, EMA shadows in trainable-parameter order) read straight from the DCP files."""
    converted = scratch / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(str(step_dir(run_dir / "checkpoint", step)), str(converted))
    sd = torch.load(converted, weights_only=False)
    return sd["model"], [sd["ema"][f"shadow.{i}"] for i in range(len(sd["ema"]))]


def sd3_inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    a = FLAVORS["debug"]
    return dict(
        hidden_states=torch.randn(batch, a.in_channels, 8, 12, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, a.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, a.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


def flux_inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    a = FLUX_FLAVORS["debug"]
    ids = torch.cat([grid_ids(4, 6), grid_ids(3, 3, frame=1)])  # with Kontext-style condition tokens
    return dict(
        hidden_states=torch.randn(batch, len(ids), a.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, a.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, a.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=ids,
        txt_ids=torch.zeros(7, 3),
        guidance=torch.full((batch,), 3.5),
    )


def qwen_image_inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    a = QWEN_FLAVORS["debug"]
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 4:] = 0  # a shorter prompt, zero-padded
    return dict(
        hidden_states=torch.randn(batch, 4 * 6 + 3 * 3, a.in_channels, generator=g),  # with edit condition tokens
        encoder_hidden_states=torch.randn(batch, 7, a.joint_attention_dim, generator=g) * mask[..., None],
        encoder_hidden_states_mask=mask,
        timestep=torch.rand(batch, generator=g),
        img_shapes=[[(1, 4, 6), (1, 3, 3)]] * batch,
    )


# family -> (our class and debug args, diffusers' class, test inputs, trainer arguments, LoRA B matrices that
# get no gradient: SD3's last block discards its text queries; Qwen-Image's last block its text output)
FAMILIES = {
    "sd3": (SD3Transformer, FLAVORS["debug"], SD3Transformer2DModel, sd3_inputs, [], 1),
    "flux": (FluxTransformer, FLUX_FLAVORS["debug"], FluxTransformer2DModel, flux_inputs, ["--model.name", "flux"], 0),
    "qwen_image": (QwenImageTransformer, QWEN_FLAVORS["debug"], QwenImageTransformer2DModel, qwen_image_inputs,
                   ["--model.name", "qwen_image"], 2),
}


def our_model(family: str, state: dict, shadows: list | None, lora: bool) -> torch.nn.Module:
    """Our backbone with the checkpoint's weights, and the EMA values on its trainable parameters."""
    cls, args, *_ = FAMILIES[family]
    model = cls(args)
    if lora:
        apply_lora(model, 4, 8.0, LORA_TARGETS)
    model.load_state_dict(state, strict=True)
    if shadows is not None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == len(shadows)
        with torch.no_grad():
            for p, s in zip(trainable, shadows, strict=True):
                p.copy_(s)
    return model.eval()


@torch.no_grad()
def assert_same_outputs(family: str, ours: torch.nn.Module, exported: Path, label: str) -> None:
    _, _, diffusers_cls, inputs, *_ = FAMILIES[family]
    ref = diffusers_cls.from_pretrained(exported / "transformer").eval()
    x = inputs()
    expected = ref(**x, return_dict=False)[0]
    diff = (ours(**x) - expected).abs().max().item()
    print(f"[{family}] {label}: max|ours - diffusers(exported)| = {diff:.3g} (max|out| {expected.abs().max():.3g})")
    assert diff <= TOL


@pytest.fixture(scope="module", params=["sd3", pytest.param("flux", marks=pytest.mark.slow),
                                        pytest.param("qwen_image", marks=pytest.mark.slow)])
def runs(request, tmp_path_factory):
    family = request.param
    model_args = FAMILIES[family][4]
    out = tmp_path_factory.mktemp(f"export_runs_{family}")
    return family, out, train(out, "full", *model_args), train(out, "lora", *model_args, *LORA)


def test_export_ema_and_raw_load_in_diffusers(runs):
    family, out, full, _ = runs
    state, shadows = checkpoint_weights(full, 2, out)
    ema_model = our_model(family, state, shadows, lora=False)
    assert any(not torch.equal(ema_model.state_dict()[k], v) for k, v in state.items())  # the EMA is not the raw

    log = run("--run", str(full), "--out", str(out / "full_ema"), module="titan_flow.export")
    assert f"step 2 (EMA weights) to {out / 'full_ema' / 'transformer'}" in log
    written = load_file(out / "full_ema" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sorted(written) == sorted(state)
    assert all(torch.equal(written[k], v) for k, v in ema_model.state_dict().items())
    assert_same_outputs(family, ema_model, out / "full_ema", "full fine-tune, EMA")

    run("--run", str(full), "--out", str(out / "full_raw"), "--raw", "--step", "1", module="titan_flow.export")
    raw_state, _ = checkpoint_weights(full, 1, out)
    written = load_file(out / "full_raw" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in raw_state.items())
    assert_same_outputs(family, our_model(family, raw_state, None, lora=False), out / "full_raw",
                        "full fine-tune, raw, step 1")


def test_export_merges_lora(runs):
    family, out, _, lora = runs
    cls, args, *_, frozen_b = FAMILIES[family]
    state, shadows = checkpoint_weights(lora, 2, out)
    assert any(k.endswith(".lora_B") for k in state)
    # Trained B (zero at init) moved, but for adapters that get no gradient.
    assert sum(bool(s.abs().max() > 0) for s in shadows[1::2]) == len(shadows[1::2]) - frozen_b
    run("--run", str(lora), "--out", str(out / "lora"), "--dtype", "float32", module="titan_flow.export")
    written = load_file(out / "lora" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in k for k in written)
    assert sorted(written) == sorted(cls(args).state_dict())
    assert_same_outputs(family, our_model(family, state, shadows, lora=True), out / "lora", "LoRA (EMA), merged")


def test_export_errors_are_clear(runs, tmp_path):
    family, out, full, _ = runs
    if family != "sd3":
        pytest.skip("the CLI's errors do not depend on the family")
    for args, message in [
        (["--run", str(tmp_path)], f"{tmp_path / 'config.json'} does not exist"),
        (["--run", str(full), "--step", "7"], "step 7 is not a complete checkpoint in .*: \\[1, 2\\]"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "titan_flow.export", *args, "--out", str(tmp_path / "x")],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert re.search(message, proc.stderr), proc.stderr[-2000:]
