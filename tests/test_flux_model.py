"""FLUX.1 transformer port: parity with diffusers' FluxTransformer2DModel and both checkpoint formats.

Every reference parameter is re-drawn from N(0, 0.2): real checkpoints have large adaLN/proj_out
weights, and small random ones would hide mistakes. Two configs: text-to-image with the guidance
embedding (out_channels != in_channels, to catch mix-ups), and Kontext-style, where condition tokens
(frame 1, a grid of another size than the target's) follow the noisy ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from titan_flow.models import get_model_spec
from titan_flow.models.common.latents import grid_ids
from titan_flow.models.flux import FLAVORS, FluxArgs, FluxTransformer
from titan_flow.models.flux.state_dict_adapter import (
    from_diffusers,
    from_original,
    from_pretrained,
    save_diffusers,
    to_diffusers,
    to_original,
)

REL_TOL = 1e-5  # ||ours - diffusers|| / ||diffusers|| in fp32

T2I = dict(patch_size=1, in_channels=16, out_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))
KONTEXT = dict(T2I, out_channels=None, num_layers=1, num_single_layers=3)
CONFIGS = {"t2i": T2I, "kontext": KONTEXT}
# (target token grid, condition token grid or None): non-square grids, a condition of another size
GRIDS = {"t2i": [((4, 4), None), ((3, 5), None), ((1, 7), None)],
         "kontext": [((4, 4), (4, 6)), ((3, 5), (5, 3)), ((4, 4), (4, 4))]}


def make_reference(config: dict, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def make_inputs(config: dict, batch: int, grid, cond_grid=None, seed: int = 1, text_len: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = grid_ids(*grid, frame=0)
    if cond_grid is not None:
        ids = torch.cat([ids, grid_ids(*cond_grid, frame=1)])
    inputs = dict(
        hidden_states=torch.randn(batch, ids.shape[0], config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=ids,
        txt_ids=torch.zeros(text_len, 3),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = 1 + 4 * torch.rand(batch, generator=g)
    return inputs


@torch.no_grad()
def run_ref(ref: FluxTransformer2DModel, inputs: dict) -> torch.Tensor:
    return ref(**inputs, return_dict=False)[0]


@torch.no_grad()
def run_ours(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, tmp_path_factory):
    """(name, config, diffusers model, its save_pretrained directory)."""
    config = CONFIGS[request.param]
    ref = make_reference(config)
    directory = tmp_path_factory.mktemp(f"ref_{request.param}")
    ref.save_pretrained(directory)
    return request.param, config, ref, directory


def test_parity_with_diffusers(reference):
    name, config, ref, directory = reference
    model = get_model_spec("flux").from_pretrained(directory)
    assert model.args == FluxArgs(**config)
    for grid, cond_grid in GRIDS[name]:
        inputs = make_inputs(config, batch=2, grid=grid, cond_grid=cond_grid)
        expected = run_ref(ref, inputs)
        ours = run_ours(model, inputs)
        err, diff = rel_err(ours, expected), (ours - expected).abs().max().item()
        print(f"[{name}] tokens {grid} + condition {cond_grid}: rel err {err:.3e}, max|diff| {diff:.3e} "
              f"(max|out| {expected.abs().max():.1f})")
        assert err <= REL_TOL


def test_condition_tokens_matter():
    """Kontext: the condition changes the target's velocity, and so does its frame id 1 -> 0."""
    config = KONTEXT
    model = FluxTransformer(FluxArgs(**config)).eval()
    model.load_state_dict(make_reference(config).state_dict())
    inputs = make_inputs(config, batch=2, grid=(4, 4), cond_grid=(4, 6))
    n = 16
    with_cond = run_ours(model, inputs)[:, :n]
    alone = run_ours(model, {**inputs, "hidden_states": inputs["hidden_states"][:, :n], "img_ids": inputs["img_ids"][:n]})
    ids = inputs["img_ids"].clone()
    ids[n:, 0] = 0
    frame0 = run_ours(model, {**inputs, "img_ids": ids})[:, :n]
    print(f"removing the condition moves v by {(with_cond - alone).abs().max():.3g}, frame 1 -> 0 by "
          f"{(with_cond - frame0).abs().max():.3g}")
    assert (with_cond - alone).abs().max() > 0.1 and (with_cond - frame0).abs().max() > 1e-3


def test_batch_one_equals_batch_two(reference):
    """Parity holds at batch 1 too; across batch sizes the result moves only by fp32 rounding."""
    name, config, ref, directory = reference
    model = from_pretrained(directory)
    grid, cond_grid = GRIDS[name][0]
    inputs = make_inputs(config, batch=2, grid=grid, cond_grid=cond_grid)
    both = run_ours(model, inputs)
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
    for i in range(2):
        sample = {k: v[i : i + 1] if k in batched else v for k, v in inputs.items()}
        single = run_ours(model, sample)
        parity = rel_err(single, run_ref(ref, sample))
        drift = rel_err(single, both[i : i + 1])
        print(f"[{name}] sample {i}: batch 1 rel err vs diffusers {parity:.3e}, batch 1 vs batch 2 {drift:.3e}")
        assert parity <= REL_TOL and drift <= REL_TOL


def test_sharded_diffusers_checkpoint_loads(reference, tmp_path):
    name, config, ref, _ = reference
    total_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    ref.save_pretrained(tmp_path, max_shard_size=total_bytes // 3)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = from_pretrained(tmp_path)
    inputs = make_inputs(config, 2, *GRIDS[name][0])
    err = rel_err(run_ours(model, inputs), run_ref(ref, inputs))
    print(f"[{name}] sharded ({len(set(index['weight_map'].values()))} files): rel err {err:.3e}")
    assert err <= REL_TOL


def test_bfl_single_file_round_trip(reference, tmp_path):
    name, config, ref, _ = reference
    diffusers_sd = ref.state_dict()
    original = to_original(diffusers_sd)
    assert "double_blocks.0.img_attn.qkv.weight" in original and "single_blocks.0.linear1.weight" in original
    assert ("guidance_in.in_layer.weight" in original) == config["guidance_embeds"]
    back = from_original(original)
    assert sorted(back) == sorted(diffusers_sd) and all(torch.equal(back[k], v) for k, v in diffusers_sd.items())

    # A BFL file, and the same inside a ComfyUI-style bundle whose VAE key is ignored.
    plain, bundle = tmp_path / "flux_tiny.safetensors", tmp_path / "bundle.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(plain))
    save_file({**{f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()},
               "vae.decoder.conv_in.bias": torch.zeros(3)}, str(bundle))
    for file in (plain, bundle):
        model = from_pretrained(file, axes_dims_rope=config["axes_dims_rope"])
        assert model.args == FluxArgs(**config)
        inputs = make_inputs(config, 2, *GRIDS[name][1])
        err = rel_err(run_ours(model, inputs), run_ref(ref, inputs))
        print(f"[{name}] BFL single file {file.name}: rel err {err:.3e}")
        assert err <= REL_TOL


def test_bfl_layout_is_diffusers_converters():
    """Independent check of our BFL table at FLUX.1-dev's size (diffusers' converter hard-codes its width):
    on the meta device every converted key and shape is diffusers', and real-valued biases (split like
    the weights: fused q/k/v, the single blocks' q/k/v/MLP, the swapped final adaLN) land where ours do."""
    with torch.device("meta"):
        ours = FluxTransformer(FLAVORS["flux.1-dev"]).state_dict()
    original = to_original(ours)
    labelled = {k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) + 1e6 * i
                for i, (k, v) in enumerate(original.items()) if k.endswith(".bias")}
    original.update(labelled)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    back = from_original(original)
    biases = [k for k in converted if k.endswith(".bias")]
    assert len(biases) == sum(k.endswith(".bias") for k in ours) == 504
    assert all(torch.equal(converted[k], back[k]) for k in biases)


@pytest.mark.parametrize("max_shard_size", ["10GB", 40_000])
def test_save_diffusers_round_trip(reference, tmp_path, max_shard_size):
    name, config, ref, directory = reference
    model = from_pretrained(directory)
    save_diffusers(model, model.args, tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert sharded == (max_shard_size != "10GB")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    assert FluxArgs.from_diffusers_config(dict(reloaded.config)) == FluxArgs(**config)
    inputs = make_inputs(config, 2, *GRIDS[name][0])
    diff = (run_ref(reloaded, inputs) - run_ref(ref, inputs)).abs().max().item()
    print(f"[{name}] save_diffusers (sharded={sharded}) -> diffusers: max|reloaded - original| = {diff:.3e}")
    assert diff == 0.0
    # Tensors sharing storage (q/k/v split out of a fused BFL tensor) save too.
    save_diffusers(from_original(to_original(model.state_dict())), model.args, tmp_path / "from_views")
    assert from_pretrained(tmp_path / "from_views").args == model.args


def test_flavors_match_diffusers_keys_and_shapes():
    """Full-size flavors on the meta device: diffusers' keys and shapes, FLUX.1-dev's 11.9 B parameters."""
    for flavor in ("flux.1-dev", "flux.1-schnell"):
        args = FLAVORS[flavor]
        with torch.device("meta"):
            ours = FluxTransformer(args)
            ref = FluxTransformer2DModel(**{k: v for k, v in args.to_diffusers_config().items() if k[0] != "_"})
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        if flavor == "flux.1-dev":
            assert sum(p.numel() for p in ours.parameters()) == 11_901_408_320
    assert FLAVORS["flux.1-kontext-dev"] == FLAVORS["flux.1-dev"] and FLAVORS["kontext-debug"] == FLAVORS["debug"]
    debug = FLAVORS["debug"]  # the tiny debug pipeline's encoders and VAE are built for these widths
    assert (debug.joint_attention_dim, debug.pooled_projection_dim, debug.in_channels) == (32, 24, 16)


def test_build_debug_from_meta_initialises_everything():
    model = get_model_spec("flux").build("debug")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.transformer_blocks[0].attn.norm_q.weight, torch.ones(16))
    inputs = make_inputs(T2I | {"out_channels": None}, batch=2, grid=(4, 3))
    out = model(**inputs)
    assert out.shape == (2, 12, 16) and torch.isfinite(out).all()
    print(f"debug flavor from meta: output std {out.std():.3f}")
    assert out.std() > 0.1
    # No zero-initialised layer: every parameter gets a gradient from the first step.
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0] == []


@pytest.mark.slow  # ~17 s of compiling; the parallel tests run the same wrapping eagerly
def test_blocks_compile_fullgraph_and_checkpoint():
    """The FSDP/AC/compile units (double and single blocks): one graph each, and activation
    checkpointing changes no gradient."""
    torch.manual_seed(0)
    model = get_model_spec("flux").build("debug")
    inputs = make_inputs(T2I, batch=2, grid=(2, 3))

    def grads(m):
        m.zero_grad()
        m(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads(model)
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(checkpoint_wrapper(block), backend="aot_eager", fullgraph=True)
    wrapped = grads(model)
    names = {n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): n for n in wrapped}
    assert sorted(names) == sorted(plain)
    worst = max((plain[n] - wrapped[names[n]]).abs().max().item() for n in plain)
    print(f"compiled + checkpointed blocks: max grad diff {worst:.3e}")
    assert worst <= 1e-6


def test_bf16_matches_diffusers_rounding_point_for_rounding_point(reference):
    """In bf16 the port rounds where diffusers rounds: sigma and the guidance to bf16 before the x1000
    (0.9993 becomes 1.0), qk-norm scaled in fp32, RoPE in fp32. Same bf16 inputs, the same output bits."""
    name, config, _, directory = reference
    model = from_pretrained(directory, dtype=torch.bfloat16)
    ref16 = FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.bfloat16).eval()
    inputs = make_inputs(config, 2, *GRIDS[name][0])
    inputs = {k: v.bfloat16() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
              for k, v in inputs.items()}
    inputs["timestep"] = torch.tensor([0.9993, 0.5005])
    ours, expected = run_ours(model, inputs), run_ref(ref16, inputs)
    assert ours.dtype == expected.dtype == torch.bfloat16
    print(f"[{name}] bf16: max|ours - diffusers| {(ours.float() - expected.float()).abs().max():.3g}")
    assert torch.equal(ours, expected)
    # The timestep really is rounded: fp32 inputs 0.9993 and 1.0 give the same bf16 output.
    assert torch.equal(run_ours(model, {**inputs, "timestep": torch.tensor([1.0, 0.5005])}), ours)


def test_errors_name_the_problem(reference, tmp_path):
    name, config, _, directory = reference
    spec = get_model_spec("flux")
    model = from_pretrained(directory)
    inputs = make_inputs(config, 1, *GRIDS[name][0])
    with pytest.raises(ValueError, match="guidance_embeds=True, so `guidance` must be a"):
        model(**{k: v for k, v in inputs.items() if k != "guidance"})
    with pytest.raises(ValueError, match=r"img_ids must have shape \(tokens, 3\)"):
        model(**{**inputs, "img_ids": inputs["img_ids"][None]})
    with pytest.raises(ValueError, match="img_ids for .* image tokens"):
        model(**{**inputs, "img_ids": inputs["img_ids"][:-1]})

    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        spec.from_pretrained(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*empty"):
        spec.from_pretrained(tmp_path / "empty")
    sd = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    partial = {k: v for k, v in sd.items() if k not in ("proj_out.bias", "single_transformer_blocks.1.proj_mlp.weight")}
    save_file({**partial, "single_transformer_blocks.0.attn.to_out.0.weight": torch.zeros(2)},
              str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="broken") as err:
        spec.from_pretrained(broken)
    assert "missing keys: proj_out.bias, single_transformer_blocks.1.proj_mlp.weight" in str(err.value)
    assert "unexpected keys: single_transformer_blocks.0.attn.to_out.0.weight" in str(err.value)
    with pytest.raises(ValueError, match=r"wrong shapes: context_embedder\.weight \(3, 3\)"):
        from_diffusers(dict(sd, **{"context_embedder.weight": torch.zeros(3, 3)}), FluxArgs(**config))
    with pytest.raises(ValueError, match="missing keys: .*norm_out.linear.weight"):
        to_diffusers({k: v for k, v in sd.items() if k != "norm_out.linear.weight"})

    original = to_original(sd)
    single = tmp_path / "single.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(single))
    with pytest.raises(ValueError, match="heads are 16 wide.*pass axes_dims_rope"):
        spec.from_pretrained(single)
    del original["final_layer.linear.bias"]
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "bad_single.safetensors"))
    with pytest.raises(ValueError, match=r"bad_single\.safetensors.*missing keys: final_layer\.linear\.bias"):
        from_pretrained(tmp_path / "bad_single.safetensors", axes_dims_rope=(4, 6, 6))


def test_config_validation():
    assert FluxArgs.from_diffusers_config(FluxArgs(**T2I).to_diffusers_config()) == FluxArgs(**T2I)
    metadata = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0", "_name_or_path": "x"}
    assert FluxArgs.from_diffusers_config({**metadata, **KONTEXT}).out_channels == 16  # None = in_channels
    with pytest.raises(ValueError, match=r"axes_dims_rope \[4, 6, 8\] sums to 18, but it must equal attention_head_dim=16"):
        FluxArgs(**{**T2I, "axes_dims_rope": (4, 6, 8)})
    with pytest.raises(ValueError, match="patch_size=2 is not supported"):
        FluxArgs(**{**T2I, "patch_size": 2})
    with pytest.raises(ValueError, match=r"unsupported keys \['use_magic'\]"):
        FluxArgs.from_diffusers_config({**T2I, "use_magic": True})
    with pytest.raises(ValueError, match="_class_name is 'SD3Transformer2DModel'"):
        FluxArgs.from_diffusers_config({**T2I, "_class_name": "SD3Transformer2DModel"})
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        FluxArgs(**{**T2I, "num_layers": 0})
    with pytest.raises(KeyError, match="choose one of flux.1-dev"):
        get_model_spec("flux").args("flux-dev")
