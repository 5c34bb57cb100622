"""Qwen-Image MMDiT port: parity with diffusers' QwenImageTransformer2DModel, MSRoPE, text masks and the
checkpoint format.

Every reference parameter is re-drawn from N(0, 0.2): real checkpoints have large modulation and
proj_out weights, and small random ones would hide mistakes.

Tolerance: fp32 relative error (max |ours - diffusers| / max |diffusers|) <= 1e-5. The two
implementations do the same operations in a few different orders (RoPE as a real rotation instead
of a complex product, one joint attention over [text; image] with the same mask), so they differ by
accumulated fp32 rounding: ~1e-7 relative per op over a 2-block model of width 32.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from titan_flow.models import get_model_spec
from titan_flow.models.qwen_image import FLAVORS, QwenImageArgs, QwenImageTransformer
from titan_flow.models.qwen_image.model import msrope_positions, msrope_tables
from titan_flow.models.qwen_image.state_dict_adapter import from_diffusers, from_pretrained, infer_args, save_diffusers

REL_TOL = 1e-5
# backbones.md 1.3 (in 16 = 4 latent channels x 2x2 patches, out 4 != in) and a wider one whose
# MSRoPE split is uneven, like the published (16, 56, 56).
CONFIGS = {
    "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    "wide": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=32,
                 num_attention_heads=3, joint_attention_dim=48, axes_dims_rope=(4, 14, 14)),
}  # fmt: skip


def make_reference(config: dict, seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    ref = QwenImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def make_inputs(config: dict, batch: int, shapes: list, text_lens: list[int], seed: int = 1) -> dict:
    """Packed image tokens for every image in `shapes`, text zero-padded to max(text_lens) with its mask."""
    g = torch.Generator().manual_seed(seed)
    n_tokens = sum(f * h * w for f, h, w in shapes)
    length = max(text_lens)
    text = torch.randn(batch, length, config["joint_attention_dim"], generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(text_lens):
        mask[i, :n] = 1
        text[i, n:] = 0  # what the pipeline's zero padding looks like
    return dict(
        hidden_states=torch.randn(batch, n_tokens, config["in_channels"], generator=g),
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=torch.rand(batch, generator=g),
        img_shapes=shapes,
    )


@torch.no_grad()
def run_ref(ref: QwenImageTransformer2DModel, inputs: dict) -> torch.Tensor:
    batch = inputs["hidden_states"].shape[0]
    mask = inputs["encoder_hidden_states_mask"]
    kwargs = dict(inputs, img_shapes=[inputs["img_shapes"]] * batch)
    kwargs["encoder_hidden_states_mask"] = None if mask is None or bool(mask.all()) else mask
    return ref(**kwargs, return_dict=False)[0]


@torch.no_grad()
def run_ours(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, tmp_path_factory):
    """(name, config, diffusers model, its save_pretrained directory)."""
    config = CONFIGS[request.param]
    ref = make_reference(config)
    directory = tmp_path_factory.mktemp(f"ref_{request.param}")
    ref.save_pretrained(directory)
    return request.param, config, ref, directory


# (img_shapes, text lengths per sample): text-to-image square / non-square / odd grids, editing with
# a condition image of another size (frame 1), and padded text of different lengths in one batch.
CASES = {
    "t2i 4x4": ([(1, 4, 4)], [7, 7]),
    "t2i 3x5 padded": ([(1, 3, 5)], [9, 4]),
    "t2i 6x2": ([(1, 6, 2)], [5, 11]),
    "edit 4x4 + 6x8 padded": ([(1, 4, 4), (1, 6, 8)], [12, 3]),
    "edit 2x6 + 5x3": ([(1, 2, 6), (1, 5, 3)], [6, 6]),
}


def test_parity_with_diffusers(reference):
    name, config, ref, directory = reference
    model = get_model_spec("qwen_image").from_pretrained(directory)
    assert model.args == QwenImageArgs(**config)
    for case, (shapes, text_lens) in CASES.items():
        inputs = make_inputs(config, batch=2, shapes=shapes, text_lens=text_lens)
        expected = run_ref(ref, inputs)
        err = rel_err(run_ours(model, inputs), expected)
        print(f"[{name}] {case}: rel err {err:.2e} (max|out| {expected.abs().max():.2f})")
        assert err <= REL_TOL


def test_padded_batch_equals_one_prompt_at_a_time(reference):
    """The text mask makes a sample's output independent of how far it was padded and of what it is
    batched with: each sample alone, unpadded and unmasked, gives the same image tokens."""
    name, config, _, directory = reference
    model = from_pretrained(directory)
    for shapes in ([(1, 3, 5)], [(1, 4, 4), (1, 2, 6)]):
        inputs = make_inputs(config, batch=3, shapes=shapes, text_lens=[10, 3, 6])
        batched = run_ours(model, inputs)
        for i, n in enumerate([10, 3, 6]):
            alone = {**inputs, "hidden_states": inputs["hidden_states"][i : i + 1],
                     "encoder_hidden_states": inputs["encoder_hidden_states"][i : i + 1, :n],
                     "encoder_hidden_states_mask": None, "timestep": inputs["timestep"][i : i + 1]}
            err = rel_err(batched[i : i + 1], run_ours(model, alone))
            print(f"[{name}] {shapes} sample {i} (text {n} of 10): padded batch vs alone rel err {err:.2e}")
            assert err <= REL_TOL
        # The test can fail: without the mask the padded rows (txt_in's bias after the norm) are attended.
        unmasked = run_ours(model, {**inputs, "encoder_hidden_states_mask": None})
        assert rel_err(unmasked[1:2], batched[1:2]) > 1e-2


def test_msrope_tables_equal_diffusers_qwen_embed_rope():
    """MSRoPE for a target and a condition image: centred rows/columns, frame = image index, text on the
    diagonal after the largest image; our tables equal diffusers' complex fp32 ones bit for bit."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    axes = (16, 56, 56)
    rope = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
    for shapes, text_len in [([(1, 5, 4)], 9), ([(1, 32, 32), (1, 64, 48)], 20), ([(2, 3, 3)], 1)]:
        image_freqs, text_freqs = rope([shapes], device=torch.device("cpu"), max_txt_seq_len=text_len)
        image_pos, text_pos = msrope_positions(shapes, text_len)
        assert torch.equal(msrope_tables(image_pos, axes), image_freqs)
        assert torch.equal(msrope_tables(text_pos, axes), text_freqs)
    image_pos, text_pos = msrope_positions([(1, 5, 4), (1, 2, 8)], 3)
    assert image_pos[:20, 1].unique().tolist() == [-3, -2, -1, 0, 1] and image_pos[:20, 2].unique().tolist() == [-2, -1, 0, 1]
    assert image_pos[:20, 0].unique().tolist() == [0] and image_pos[20:, 0].unique().tolist() == [1]
    assert text_pos.tolist() == [[4, 4, 4], [5, 5, 5], [6, 6, 6]]  # m = max(5 // 2, 4 // 2, 2 // 2, 8 // 2) = 4


def test_sharded_diffusers_checkpoint_loads(reference, tmp_path):
    name, config, ref, _ = reference
    total_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    ref.save_pretrained(tmp_path, max_shard_size=total_bytes // 3)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = from_pretrained(tmp_path)
    inputs = make_inputs(config, batch=2, shapes=[(1, 4, 4)], text_lens=[5, 3])
    assert rel_err(run_ours(model, inputs), run_ref(ref, inputs)) <= REL_TOL


@pytest.mark.parametrize("max_shard_size", ["10GB", 40_000])
def test_save_diffusers_round_trip(reference, tmp_path, max_shard_size):
    """What export writes loads in diffusers' own class with exactly the same outputs."""
    name, config, ref, directory = reference
    model = from_pretrained(directory)
    save_diffusers(model, model.args, tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert sharded == (max_shard_size != "10GB")
    reloaded = QwenImageTransformer2DModel.from_pretrained(tmp_path).eval()
    assert QwenImageArgs.from_diffusers_config(dict(reloaded.config)) == QwenImageArgs(**config)
    inputs = make_inputs(config, batch=2, shapes=[(1, 4, 4), (1, 2, 2)], text_lens=[5, 2])
    diff = (run_ref(reloaded, inputs) - run_ref(ref, inputs)).abs().max().item()
    print(f"[{name}] save_diffusers (sharded={sharded}) -> diffusers: max|reloaded - original| = {diff:.3e}")
    assert diff == 0.0


def test_published_flavor_matches_diffusers_keys_shapes_and_parameter_count():
    """Qwen-Image / Qwen-Image-Edit (the same transformer config) on the meta device: diffusers' keys and
    shapes, 20,430,401,088 parameters and 1933 keys (backbones.md 5.1)."""
    args = FLAVORS["qwen-image"]
    with torch.device("meta"):
        ours = QwenImageTransformer(args)
        ref = QwenImageTransformer2DModel(**{k: v for k, v in args.to_diffusers_config().items() if not k.startswith("_")})
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(shapes) == 1933 and sum(p.numel() for p in ours.parameters()) == 20_430_401_088
    assert infer_args(ours.state_dict()) == args  # the published MSRoPE split is what shapes-only inference picks
    debug = FLAVORS["debug"]  # the tiny pipeline's text encoder (hidden 32) and VAE (z_dim 4) are built for these
    assert (debug.joint_attention_dim, debug.latent_channels) == (32, 4)


def test_build_debug_from_meta_initialises_everything():
    model = get_model_spec("qwen_image").build("debug")
    assert not any(p.is_meta for p in model.parameters())
    config = CONFIGS["tiny"]
    inputs = make_inputs(config, batch=2, shapes=[(1, 4, 4)], text_lens=[7, 7])
    out = model(**inputs)
    assert out.shape == (2, 16, 16) and torch.isfinite(out).all()
    print(f"debug flavor from meta: output std {out.std():.3f}")
    assert out.std() > 0.1
    # No zero-initialised layer: every parameter gets a gradient, except the last block's text-stream
    # outputs, which nothing reads (the text stream ends there; diffusers computes them too).
    out.square().mean().backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0)
    last = f"transformer_blocks.{model.args.num_layers - 1}"
    assert no_grad == sorted(f"{last}.{n}" for n in (
        "attn.add_q_proj.bias", "attn.add_q_proj.weight", "attn.norm_added_q.weight", "attn.to_add_out.bias",
        "attn.to_add_out.weight", "txt_mlp.net.0.proj.bias", "txt_mlp.net.0.proj.weight", "txt_mlp.net.2.bias",
        "txt_mlp.net.2.weight"))


def test_block_compiles_fullgraph_and_checkpoints():
    """The FSDP/AC/compile unit: one graph per block, and activation checkpointing changes no gradient."""
    torch.manual_seed(0)
    model = get_model_spec("qwen_image").build("debug")
    inputs = make_inputs(CONFIGS["tiny"], 2, [(1, 4, 4), (1, 2, 2)], [6, 3])

    def grads(m):
        m.zero_grad()
        m(**inputs).square().mean().backward()
        # The last block's unused text outputs get None eagerly and zeros through the wrappers.
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}

    plain = grads(model)
    for i, block in enumerate(model.transformer_blocks):
        model.transformer_blocks[i] = torch.compile(checkpoint_wrapper(block), backend="aot_eager", fullgraph=True)
    wrapped = grads(model)
    names = {n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): n for n in wrapped}
    assert sorted(names) == sorted(plain)
    worst = max((plain[n] - wrapped[names[n]]).abs().max().item() for n in plain)
    print(f"compiled + checkpointed blocks: max grad diff {worst:.3e}")
    assert worst <= 1e-6


def test_errors_name_the_problem(reference, tmp_path):
    _, config, _, directory = reference
    spec = get_model_spec("qwen_image")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        spec.from_pretrained(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*empty .*QwenImageTransformer2DModel directory"):
        spec.from_pretrained(tmp_path / "empty")

    sd = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    partial = {k: v for k, v in sd.items() if k not in ("proj_out.bias", "transformer_blocks.1.img_mod.1.weight")}
    save_file({**partial, "transformer_blocks.0.attn.extra.weight": torch.zeros(2)},
              str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="broken") as err:
        spec.from_pretrained(broken)
    assert "missing keys: proj_out.bias, transformer_blocks.1.img_mod.1.weight" in str(err.value)
    assert "unexpected keys: transformer_blocks.0.attn.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match=r"wrong shapes: txt_in\.weight \(3, 3\)"):
        from_diffusers(dict(sd, **{"txt_in.weight": torch.zeros(3, 3)}), QwenImageArgs(**config))

    model = from_pretrained(directory)
    inputs = make_inputs(config, batch=2, shapes=[(1, 4, 4)], text_lens=[5, 5])
    with pytest.raises(ValueError, match=r"img_shapes \[\(1, 4, 5\)\] describe 20 image tokens, but hidden_states has 16"):
        model(**{**inputs, "img_shapes": [(1, 4, 5)]})
    with pytest.raises(ValueError, match="img_shapes differ between samples"):
        model(**{**inputs, "img_shapes": [[(1, 4, 4)], [(1, 2, 8)]]})
    with pytest.raises(ValueError, match=r"encoder_hidden_states_mask has shape \(2, 4\), expected .* \(2, 5\)"):
        model(**{**inputs, "encoder_hidden_states_mask": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="timestep is required"):
        model(**{**inputs, "timestep": None})
    # diffusers' per-sample img_shapes form is accepted when the samples agree
    assert torch.equal(model(**{**inputs, "img_shapes": [[(1, 4, 4)]] * 2}), model(**inputs))


def test_config_validation():
    tiny = QwenImageArgs(**CONFIGS["tiny"])
    assert QwenImageArgs.from_diffusers_config(tiny.to_diffusers_config()) == tiny
    metadata = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.36.0", "_name_or_path": "x"}
    published = {**metadata, "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
                 "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
                 "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
    assert QwenImageArgs.from_diffusers_config(published) == FLAVORS["qwen-image"]
    with pytest.raises(ValueError, match=r"\['zero_cond_t'\] = True is not supported"):
        QwenImageArgs.from_diffusers_config({**published, "zero_cond_t": True})
    with pytest.raises(ValueError, match=r"unsupported keys \['use_magic'\]"):
        QwenImageArgs.from_diffusers_config({**published, "use_magic": True})
    with pytest.raises(ValueError, match="_class_name is 'FluxTransformer2DModel'"):
        QwenImageArgs.from_diffusers_config({**published, "_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match=r"axes_dims_rope \[4, 6, 8\] sum to 18, but must equal attention_head_dim=16"):
        QwenImageArgs(**{**CONFIGS["tiny"], "axes_dims_rope": (4, 6, 8)})
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        QwenImageArgs(**{**CONFIGS["tiny"], "num_layers": 0})
    with pytest.raises(KeyError, match="choose one of qwen-image, debug"):
        get_model_spec("qwen_image").args("qwen-image-edit")
