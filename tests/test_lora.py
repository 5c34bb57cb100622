"""LoRA on our own backbones: identity at init, adapter toggles, merge for export, FSDP2 training."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from titan_flow.models import get_model_spec
from titan_flow.peft.lora import (
    LoRALinear,
    active_adapter,
    apply_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merge_lora_state_dict,
    sync_reference_adapter,
)
from titan_flow.rl.sde import sde_step

SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def tiny_sd3(seed=0):
    torch.manual_seed(seed)
    return get_model_spec("sd3").build("debug")


def sd3_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        pooled_projections=torch.randn(batch, 24, generator=g),
        timestep=torch.tensor([999.0, 500.0, 3.0])[:batch],
    )


def perturb_adapters(model, seed=5, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_targets_keys_and_trainable_set():
    model = tiny_sd3()
    base_keys = set(model.state_dict())
    wrapped = apply_lora(model, rank=4, alpha=8, target_modules=SD3_TARGETS, seed=0)
    # block 0 has all eight; the last block is context_pre_only (no to_add_out); attn2 (dual attention) is not targeted
    assert "transformer_blocks.0.attn.to_add_out" in wrapped and len(wrapped) == 8 + 7
    assert not any("attn2" in n for n in wrapped)
    keys = set(model.state_dict())
    assert base_keys <= keys  # base checkpoint keys unchanged
    assert keys - base_keys == {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4) and not layer.lora_B.any()
    # PEFT's "gaussian" init: A ~ N(0, (1/r)^2)
    a = torch.cat([m.flatten() for n, m in model.named_parameters() if n.endswith("lora_A")])
    assert abs(a.std().item() - 1 / 4) < 0.03, a.std()
    # same seed, same adapter (every rank builds the same one)
    other = tiny_sd3()
    apply_lora(other, rank=4, alpha=8, target_modules=SD3_TARGETS, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(model), lora_parameters(other)))


def test_bad_target_names_the_field():
    with pytest.raises(ValueError, match=r"lora.target_modules: \['attn.to_qq'\] match no nn.Linear"):
        apply_lora(tiny_sd3(), rank=4, alpha=8, target_modules=["attn.to_q", "attn.to_qq"])
    with pytest.raises(ValueError, match="lora.rank must be >= 1"):
        apply_lora(tiny_sd3(), rank=0, alpha=8, target_modules=["attn.to_q"])


def test_fresh_adapter_is_the_base_model_and_kl_is_exactly_zero():
    base = tiny_sd3()
    model = tiny_sd3()
    apply_lora(model, rank=4, alpha=8, target_modules=SD3_TARGETS, seed=3)
    inputs = sd3_inputs()
    with torch.no_grad():
        ref = base(**inputs)
        assert torch.equal(model(**inputs), ref)
    # section 15.5: the KL term of a fresh adapter to the adapter-disabled reference is exactly 0
    x = inputs["hidden_states"]
    sigma = inputs["timestep"] / 1000
    v = model(**inputs)
    with torch.no_grad(), active_adapter(model, None):
        v_ref = model(**inputs)
    out = sde_step(v, x, sigma, sigma * 0.9, 0.7, "sde", generator=torch.Generator().manual_seed(0),
                   sigma_fallback=torch.tensor(0.97), v_ref=v_ref)
    assert torch.equal(out.kl, torch.zeros(3))


def test_disabled_adapter_gives_base_outputs_and_merge_matches():
    base = tiny_sd3()
    model = tiny_sd3()
    apply_lora(model, rank=4, alpha=8, target_modules=SD3_TARGETS, seed=3, with_reference=True)
    perturb_adapters(model)
    inputs = sd3_inputs()
    with torch.no_grad():
        ref = base(**inputs)
        adapted = model(**inputs)
        assert (adapted - ref).abs().max() > 1e-2  # the adapter does change the function
        with active_adapter(model, None):
            assert torch.equal(model(**inputs), ref)
        # the reference slot still holds the init (B = 0): the base model, until synced
        with active_adapter(model, "reference"):
            assert torch.equal(model(**inputs), ref)
        sync_reference_adapter(model)
        with active_adapter(model, "reference"):
            assert torch.equal(model(**inputs), adapted)
        assert torch.equal(model(**inputs), adapted)  # the policy adapter is back after the block

    # export: merged state dict and merged module agree with the adapter within fp32 tolerance
    sd = model.state_dict()
    assert set(lora_state_dict(sd)) == {k for k in sd if k.endswith((".lora_A", ".lora_B"))}
    merged_sd = merge_lora_state_dict(sd, scale=8 / 4)
    assert set(merged_sd) == set(base.state_dict())
    base.load_state_dict(merged_sd)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(merged_sd)
    with torch.no_grad():
        from_sd, from_module = base(**inputs), model(**inputs)
    err = max((from_sd - adapted).abs().max().item(), (from_module - adapted).abs().max().item())
    print(f"merged vs adapter max abs diff {err:.2e} (output scale {adapted.abs().max().item():.2f})")
    assert err < 1e-4
    assert torch.equal(from_sd, from_module)


def test_lora_under_compile_switches_adapter():
    model = tiny_sd3()
    apply_lora(model, rank=4, alpha=8, target_modules=SD3_TARGETS, seed=3)
    perturb_adapters(model)
    inputs = sd3_inputs()
    with torch.no_grad():
        eager_on = model(**inputs)
        with active_adapter(model, None):
            eager_off = model(**inputs)
    for block in model.transformer_blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), eager_on, rtol=0, atol=1e-5)
        with active_adapter(model, None):
            torch.testing.assert_close(model(**inputs), eager_off, rtol=0, atol=1e-5)
    loss = model(**inputs).square().mean()
    loss.backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_sd3()
    apply_lora(model, rank=4, alpha=8, target_modules=SD3_TARGETS, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    inputs = sd3_inputs(batch=2, seed=10 + rank)  # different data per rank
    for _ in range(2):
        loss = model(**inputs).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad(), active_adapter(model, None):
        base_out = model(**inputs)
    after = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"before": before, "after": after, "n_trainable": len(params)}, os.path.join(out_dir, "sd.pt"))
    torch.save(base_out, os.path.join(out_dir, f"base_out{rank}.pt"))
    dist.destroy_process_group()


def test_fsdp2_lora_training_step_changes_only_adapters(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "sd.pt")
    before, after = saved["before"], saved["after"]
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if k.endswith((".lora_A", ".lora_B"))}
    assert saved["n_trainable"] == len(lora_keys)
    # the last block is context_pre_only: its text queries feed only dropped text outputs, so that
    # adapter gets no gradient (B stays 0; A moves by weight decay alone)
    dead = {"transformer_blocks.1.attn.add_q_proj.lora_B"}
    assert changed == lora_keys - dead, sorted(changed ^ (lora_keys - dead))[:5]
    # with the adapter off the trained model is still exactly the base model
    base = tiny_sd3()
    for rank in range(2):
        with torch.no_grad():
            expected = base(**sd3_inputs(batch=2, seed=10 + rank))
        torch.testing.assert_close(torch.load(tmp_path / f"base_out{rank}.pt"), expected, rtol=0, atol=1e-6)


def test_bagel_targets_resolve():
    """The reference's Bagel LoRA targets in our module names (gen expert attention + MLP)."""
    spec = get_model_spec("bagel")
    torch.manual_seed(0)
    model = spec.build("debug")
    targets = ["gen.q_proj", "gen.k_proj", "gen.v_proj", "gen.o_proj",
               "gen.mlp.gate_proj", "gen.mlp.up_proj", "gen.mlp.down_proj"]
    wrapped = apply_lora(model, rank=4, alpha=8, target_modules=targets)
    assert wrapped and all(".gen." in n for n in wrapped)
    assert len(wrapped) == 7 * len(model.layers)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in wrapped)


SHARDED_LORA_SCRIPT = r"""
import sys
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from titan_flow.config import build_job_config
from titan_flow.distributed.utils import destroy_distributed, init_distributed
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora
from titan_flow.train import build_model

directory = sys.argv[1]
cfg = build_job_config(["--model.pretrained_path", directory, "--lora.enable", "true", "--lora.rank", "4",
                        "--lora.alpha", "8"])
dims = init_distributed(cfg)
model = build_model(cfg, dims, trainable=True)  # meta build, sharded load of weights and adapters
assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dims.rank == 0:
    reference = get_model_spec("sd3").from_pretrained(directory)  # the whole model in one piece
    apply_lora(reference, 4, 8.0, cfg.lora.target_modules, seed=cfg.job.seed)
    expected = reference.state_dict()
    assert sorted(full) == sorted(expected), sorted(set(full) ^ set(expected))
    assert all(torch.equal(full[k], expected[k]) for k in expected)
    print("IDENTICAL", len(expected), "tensors")
destroy_distributed()
"""


def test_lora_on_pretrained_weights_loads_shard_by_shard(tmp_path):
    """With LoRA, pretrained weights still go straight into the shards (no full copy on a rank), and
    the adapters start exactly where apply_lora on the whole model starts them."""
    import subprocess
    import sys
    from pathlib import Path

    from titan_flow.models.sd3.state_dict_adapter import save_diffusers

    model = tiny_sd3()
    directory = save_diffusers(model, model.args, tmp_path / "transformer")
    script = tmp_path / "sharded_lora.py"
    script.write_text(SHARDED_LORA_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(directory)], cwd=repo, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "IDENTICAL" in proc.stdout
