"""Wan2.1 transformer port: parity with diffusers' WanTransformer3DModel and the checkpoint formats.

Every reference parameter is re-drawn from N(0, 0.2), so the modulation tables, norms and output head
are far from their initial values and a misplaced term cannot hide. Videos have several frames and
non-square frames, so a swapped RoPE axis or a wrong unpatchify order shows.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from titan_flow.models import get_model_spec
from titan_flow.models.wan import FLAVORS, WanArgs, WanTransformer
from titan_flow.models.wan.state_dict_adapter import (
    from_diffusers,
    from_original,
    from_pretrained,
    save_diffusers,
    to_original,
)

# fp32 parity bound: both compute the same operations in the same order up to GEMM blocking, so the
# difference is a few fp32 roundings (2^-24) of O(1) values accumulated over ~100-wide reductions.
REL_TOL = 1e-5

# The notes' verified tiny config (cross-attention norm, 12-wide heads: RoPE bands t/h/w = 4/4/4) and a
# second one with 16-wide heads (8/4/4), no cross-attention norm and out_channels != in_channels.
CONFIGS = {
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32),
    "no_cross_norm": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4,
                          out_channels=8, text_dim=24, freq_dim=16, ffn_dim=40, num_layers=3, cross_attn_norm=False,
                          qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=16),
}  # fmt: skip
# (frames, height, width) of the latent: several frames, non-square; one frame; odd frame counts.
SHAPES = [(3, 8, 12), (1, 4, 6), (5, 6, 10)]


def make_reference(config: dict, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def load_diffusers(directory) -> WanTransformer3DModel:
    """diffusers' class from a transformer directory (config + safetensors, sharded or not).

    `WanTransformer3DModel.from_pretrained` needs `accelerate` (its fp32-kept modules force
    low_cpu_mem_usage), which titan_flow does not depend on; this reads the same files with
    diffusers' own config loader and safetensors.
    """
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(directory))
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "diffusion_pytorch_model.safetensors"]
    state = {k: v for name in files for k, v in load_file(directory / name).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def make_inputs(config: dict, batch: int, frames: int, height: int, width: int, seed: int = 1, text_len: int = 10):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, config["in_channels"], frames, height, width, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, config["text_dim"], generator=g),
    )


@torch.no_grad()
def run_ref(ref: WanTransformer3DModel, inputs: dict) -> torch.Tensor:
    return ref(**inputs, return_dict=False)[0]


@torch.no_grad()
def run_ours(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)


def rel_err(ours: torch.Tensor, expected: torch.Tensor) -> float:
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    return ((ours - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, tmp_path_factory):
    """(name, config, diffusers model, its save_pretrained directory)."""
    config = CONFIGS[request.param]
    ref = make_reference(config)
    directory = tmp_path_factory.mktemp(f"wan_{request.param}")
    ref.save_pretrained(directory)
    return request.param, config, ref, directory


def test_parity_with_diffusers(reference):
    name, config, ref, directory = reference
    model = get_model_spec("wan").from_pretrained(directory)
    assert model.args == WanArgs(**config)
    for frames, height, width in SHAPES:
        inputs = make_inputs(config, batch=2, frames=frames, height=height, width=width)
        expected = run_ref(ref, inputs)
        err = rel_err(run_ours(model, inputs), expected)
        print(f"[{name}] latent {frames}x{height}x{width}: max|ours - diffusers| / max|diffusers| = {err:.2e}")
        assert err <= REL_TOL
    # batch 1 and the exact t = 999 / 0 ends of the schedule
    inputs = make_inputs(config, batch=1, frames=3, height=8, width=12)
    for t in (999, 0):
        inputs["timestep"] = torch.tensor([t])
        assert rel_err(run_ours(model, inputs), run_ref(ref, inputs)) <= REL_TOL


def test_output_depends_on_every_axis_and_the_text_padding(reference):
    """Guards the parity test against a vacuous match: moving one frame, row or column of the input changes
    other tokens' outputs (attention mixes them, RoPE tells them apart), and zero text rows are not ignored."""
    _, config, ref, directory = reference
    model = from_pretrained(directory)
    inputs = make_inputs(config, batch=1, frames=3, height=8, width=12)
    base = run_ours(model, inputs)
    shifted = dict(inputs, hidden_states=inputs["hidden_states"].roll(1, dims=2))
    assert (run_ours(model, shifted) - base.roll(1, dims=2)).abs().max() > 1e-3  # not frame-equivariant: RoPE
    padded = dict(inputs, encoder_hidden_states=torch.cat(
        [inputs["encoder_hidden_states"], torch.zeros(1, 6, config["text_dim"])], dim=1))
    diff = (run_ours(model, padded) - base).abs().max().item()
    assert diff > 1e-3 and rel_err(run_ours(model, padded), run_ref(ref, padded)) <= REL_TOL


def test_integer_and_float_timesteps_agree(reference):
    _, config, _, directory = reference
    model = from_pretrained(directory)
    inputs = make_inputs(config, batch=2, frames=2, height=4, width=6)
    as_float = dict(inputs, timestep=inputs["timestep"].float())
    assert torch.equal(run_ours(model, inputs), run_ours(model, as_float))


def test_sharded_diffusers_checkpoint_loads(reference, tmp_path):
    name, config, ref, _ = reference
    total_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    ref.save_pretrained(tmp_path, max_shard_size=total_bytes // 3)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    inputs = make_inputs(config, batch=2, frames=3, height=8, width=12)
    assert rel_err(run_ours(from_pretrained(tmp_path), inputs), run_ref(ref, inputs)) <= REL_TOL


@pytest.mark.parametrize("max_shard_size", ["10GB", 20_000])
def test_save_diffusers_round_trip(reference, tmp_path, max_shard_size):
    """Our writer's directory loads in diffusers' class with exactly our weights: zero difference."""
    _, config, _, directory = reference
    model = from_pretrained(directory)
    out = save_diffusers(model, model.args, tmp_path / "transformer", max_shard_size=max_shard_size)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    reloaded = load_diffusers(out)
    ours = model.state_dict()
    assert reloaded.state_dict().keys() == ours.keys()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.items())
    inputs = make_inputs(config, batch=2, frames=3, height=8, width=12)
    assert rel_err(run_ours(model, inputs), run_ref(reloaded, inputs)) <= REL_TOL


def test_original_wan_layout(reference, tmp_path):
    name, config, ref, _ = reference
    ours = ref.state_dict()
    original = to_original(ours)
    assert "head.head.weight" in original and "blocks.0.self_attn.q.weight" in original
    assert ("blocks.0.norm3.weight" in original) == config["cross_attn_norm"]  # diffusers' norm2 is the original norm3
    assert not any(k.startswith(("condition_embedder", "attn1", "proj_out")) for k in original)
    # Independent check of our key table: diffusers' own converter maps it back exactly.
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert sorted(converted) == sorted(ours)
    assert all(converted[k] is ours[k] for k in ours)  # renamed, not copied or reshaped
    heads = config["num_attention_heads"]
    back = from_original({"model.diffusion_model." + k: v for k, v in original.items()}, num_heads=heads)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)

    # An original Wan-AI directory (config.json of class WanModel) and a single original file load too.
    original_dir = tmp_path / "Wan2.1-T2V-original"
    original_dir.mkdir()
    save_file({k: v.contiguous() for k, v in original.items()}, str(original_dir / "diffusion_pytorch_model.safetensors"))
    (original_dir / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": heads}))
    inputs = make_inputs(config, batch=2, frames=3, height=8, width=12)
    expected = run_ref(ref, inputs)
    model = from_pretrained(original_dir)
    assert model.args == replace(WanArgs(**config), rope_max_seq_len=1024)  # the original's fixed RoPE table
    assert rel_err(run_ours(model, inputs), expected) <= REL_TOL
    if config["attention_head_dim"] == 128:  # a single file does not record the heads; Wan's are 128 wide
        assert rel_err(run_ours(from_pretrained(original_dir / "diffusion_pytorch_model.safetensors"), inputs),
                       expected) <= REL_TOL


def test_single_original_file_assumes_wan_heads(tmp_path):
    """A bare original .safetensors carries no head split; Wan2.1 heads are 128 wide."""
    args = WanArgs(num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=8,
                   freq_dim=8, ffn_dim=16, num_layers=1)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanTransformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    path = tmp_path / "wan_t2v.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in to_original(model.state_dict()).items()},
              str(path))
    loaded = from_pretrained(path)
    assert loaded.args == args
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_bad_checkpoints_name_the_problem(reference, tmp_path):
    _, config, ref, _ = reference
    state = ref.state_dict()
    broken = {k: v for k, v in state.items() if k != "blocks.0.attn2.norm_k.weight"}
    broken["blocks.0.extra.weight"] = torch.zeros(1)
    broken["proj_out.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.0\.attn2\.norm_k\.weight; unexpected keys: "
                                         r"blocks\.0\.extra\.weight; wrong shapes: proj_out\.bias \(3,\)"):
        from_diffusers(broken, WanArgs(**config))
    with pytest.raises(ValueError, match=r"original Wan checkpoint: unexpected keys: img_emb\.proj\.0\.weight"):
        from_original({**to_original(state), "img_emb.proj.0.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="Wan checkpoint not found"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .* expected a diffusers Wan transformer"):
        from_pretrained(tmp_path)


def test_args_validation():
    with pytest.raises(ValueError, match=r"\['image_dim'\] are image-to-video fields"):
        WanArgs(image_dim=1280)
    with pytest.raises(ValueError, match="qk_norm='rms_norm' is not supported"):
        WanArgs(qk_norm="rms_norm")
    with pytest.raises(ValueError, match=r"attention_head_dim=5 gives RoPE bands \(t, h, w\) = \(5, 0, 0\)"):
        WanArgs(attention_head_dim=5)
    with pytest.raises(ValueError, match=r"unsupported keys \['window_size'\]"):
        WanArgs.from_diffusers_config({"_class_name": "WanTransformer3DModel", "window_size": [-1, -1]})
    with pytest.raises(ValueError, match="_class_name is 'FluxTransformer2DModel'"):
        WanArgs.from_diffusers_config({"_class_name": "FluxTransformer2DModel"})
    config = FLAVORS["1.3B"].to_diffusers_config()
    assert WanArgs.from_diffusers_config(json.loads(json.dumps(config))) == FLAVORS["1.3B"]
    assert FLAVORS["1.3B"].rope_axes_dims == (44, 42, 42)


def test_video_larger_than_the_rope_table_is_refused():
    model = get_model_spec("wan").build("debug")  # rope_max_seq_len 64 positions per axis
    x = torch.zeros(1, 4, 65, 2, 2)
    with pytest.raises(ValueError, match=r"65 x 1 x 1 tokens .* exceeds the RoPE table of rope_max_seq_len=64"):
        model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="must be divisible by the patch size"):
        model(hidden_states=torch.zeros(1, 4, 2, 3, 4), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.zeros(1, 3, 32))


@pytest.mark.parametrize(("flavor", "params", "keys"), [("1.3B", 1_418_996_800, 825), ("14B", 14_288_491_584, 1095)])
def test_published_flavors_have_the_published_sizes(flavor, params, keys):
    """Counted on the meta device: the parameter and key counts of the Wan-AI checkpoints (notes section 4.1)."""
    with torch.device("meta"):
        model = WanTransformer(FLAVORS[flavor])
        ref = WanTransformer3DModel(**{k: v for k, v in FLAVORS[flavor].to_diffusers_config().items() if k[0] != "_"})
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_debug_flavor_builds_on_meta_and_runs():
    torch.manual_seed(0)
    model = get_model_spec("wan").build("debug")
    x = torch.randn(2, 4, 3, 4, 6)
    out = model(hidden_states=x, timestep=torch.tensor([999, 10]), encoder_hidden_states=torch.randn(2, 16, 32))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 0.01
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
def test_block_compiles_fullgraph_and_checkpoints():
    """The FSDP/AC/compile unit (parallelize.py): one graph per block, and activation checkpointing and
    compilation change no gradient."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = get_model_spec("wan").build("debug")
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 4, 6, generator=g), timestep=torch.tensor([999, 250]),
                  encoder_hidden_states=torch.randn(2, 16, 32, generator=g))

    def grads(m):
        m.zero_grad()
        m(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads(model)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(checkpoint_wrapper(block), backend="aot_eager", fullgraph=True)
    wrapped = grads(model)
    names = {n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): n for n in wrapped}
    assert sorted(names) == sorted(plain)
    worst = max((plain[n] - wrapped[names[n]]).abs().max().item() for n in plain)
    print(f"compiled + checkpointed Wan blocks: max grad diff {worst:.3e}")
    assert worst <= 1e-6
