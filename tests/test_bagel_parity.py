"""Numerical parity of our Bagel port with ByteDance-Seed/Bagel's own code (fp32, CPU). Slow, opt-in.

Needs a reference harness outside the project (nothing of it is committed), named by the
environment variable BAGEL_REF_HARNESS, a directory holding:
  venv/   python -m venv venv && venv/bin/pip install torch==2.13.0 transformers==4.49.0 safetensors einops
  src/    git archive HEAD modeling data | tar -x   (from github.com/ByteDance-Seed/Bagel), patched for fp32:
          sed -i 's/torch\\.bfloat16/torch.float32/g' src/modeling/bagel/{qwen2_navit,siglip_navit}.py
          sed -i 's/SDPBackend\\.EFFICIENT_ATTENTION/SDPBackend.MATH/g' src/modeling/bagel/qwen2_navit.py
  stubs/flash_attn/__init__.py   a flash_attn_varlen_func that loops over the cu_seqlens segments with
          SDPA (GQA by repeat_interleave, bottom-right causal mask), since flash-attn has no CPU build.
The reference half of this file (`make_reference`) runs in that venv as a script; it builds the tiny
Bagel of backbones.md section 7.2 with random weights, writes it as a Bagel directory (ema.safetensors,
configs, a BFL-format ae.safetensors) plus its inputs and outputs, and the tests load that
directory into our model and compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HARNESS = os.environ.get("BAGEL_REF_HARNESS", "")
BOS, EOS, SOI, EOI = 96, 97, 98, 99
PROMPTS = ["5 6 7", "11 12"]


class DigitTokenizer:
    """Prompts are space-separated token ids; the four special tokens sit at the top of the tiny vocab."""

    unk_token_id = None
    _special = {"<|im_start|>": BOS, "<|im_end|>": EOS, "<|vision_start|>": SOI, "<|vision_end|>": EOI}

    def encode(self, text, add_special_tokens=False):
        return [int(word) for word in text.split()]

    def convert_tokens_to_ids(self, token):
        return self._special[token]


# ---------------------------------------------------------------------------------------------
# Reference side (runs in the harness venv, with the patched Bagel sources on sys.path)


def make_reference(out: Path) -> None:
    from copy import deepcopy

    from data.data_utils import patchify, prepare_attention_mask_per_sample
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from modeling.bagel.qwen2_navit import NaiveCache
    from safetensors.torch import save_file

    torch.manual_seed(0)
    llm_config = Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True, tie_word_embeddings=False,
        layer_module="Qwen2MoTDecoderLayer",
    )
    vit_config = SiglipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=2,
        image_size=16, rope=False, layer_norm_eps=1e-6,
    )
    ae_params = AutoEncoderParams(
        resolution=64, in_channels=3, downsample=8, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=1,
        z_channels=4, scale_factor=0.3611, shift_factor=0.1159,
    )
    config = BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config, vae_config=ae_params,
        latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8, connector_act="gelu_pytorch_tanh",
        interpolate_pos=False, timestep_shift=1.0,
    )
    model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    ae = AutoEncoder(ae_params)
    with torch.no_grad():
        for module in (model, ae):
            for name, p in module.named_parameters():
                if "pos_embed" in name:
                    continue
                if p.ndim == 1 and "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(out / "ae.safetensors"))
    (out / "llm_config.json").write_text(llm_config.to_json_string())
    released_vit = vit_config.to_dict()
    released_vit["num_hidden_layers"] += 1  # a released vit_config.json counts the layer Bagel drops
    (out / "vit_config.json").write_text(json.dumps(released_vit))
    specials = {BOS: "<|im_start|>", EOS: "<|im_end|>", SOI: "<|vision_start|>", EOI: "<|vision_end|>"}
    decoder = {str(i): {"content": c, "special": True} for i, c in specials.items()}
    (out / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))

    new_token_ids = dict(bos_token_id=BOS, eos_token_id=EOS, start_of_image=SOI, end_of_image=EOI)
    tensors, meta = {}, {}

    def capture(module, store: dict, key: str, inputs: bool):
        def hook(_, args, output):
            store[key] = (args[0] if inputs else output).detach().clone()

        return module.register_forward_hook(hook)

    # -- training path: two packed samples [text (causal) | noised image (noise)] ---------------
    model.train()
    model.config.visual_und = False  # t2i batches carry no ViT inputs
    texts = [[BOS, 5, 6, 7, EOS], [BOS, 11, 12, EOS]]
    shapes = [(3, 4), (2, 2)]  # latent token grids (48x64 and 32x32 pixels)
    logits = [0.3, -0.5]  # Bagel draws t = sigmoid(N(0,1)); timestep_shift = 1
    seq = dict(text_ids=[], text_index=[], pos=[], vae_index=[], vae_pos=[], t=[], sample_lens=[], masks=[])
    curr = 0
    for ids, (h, w), logit in zip(texts, shapes, logits):
        start = curr
        seq["text_ids"] += ids + [SOI, EOI]
        seq["text_index"] += list(range(curr, curr + len(ids))) + [curr + len(ids), curr + len(ids) + h * w + 1]
        seq["pos"] += list(range(len(ids))) + [len(ids)] * (h * w + 2)
        seq["vae_index"] += range(curr + len(ids) + 1, curr + len(ids) + 1 + h * w)
        seq["vae_pos"] += [r * 8 + c for r in range(h) for c in range(w)]
        seq["t"] += [logit] * (h * w)
        curr += len(ids) + h * w + 2
        seq["sample_lens"].append(curr - start)
        seq["masks"].append(prepare_attention_mask_per_sample([len(ids), h * w + 2], ["causal", "noise"]))
    padded = torch.randn(2, 4, 6, 8)
    mse_index = torch.zeros(curr, dtype=torch.bool)
    mse_index[seq["vae_index"]] = True
    got = {}
    hooks = [capture(model.vae2llm, got, "x", True), capture(model.time_embedder, got, "t", True),
             capture(model.llm2vae, got, "v", False)]
    model(
        sequence_length=curr, packed_text_ids=torch.tensor(seq["text_ids"]), packed_text_indexes=torch.tensor(seq["text_index"]),
        sample_lens=seq["sample_lens"], packed_position_ids=torch.tensor(seq["pos"]), nested_attention_masks=seq["masks"],
        padded_latent=padded, patchified_vae_latent_shapes=shapes, packed_latent_position_ids=torch.tensor(seq["vae_pos"]),
        packed_vae_token_indexes=torch.tensor(seq["vae_index"]), packed_timesteps=torch.tensor(seq["t"]), mse_loss_indexes=mse_index,
    )
    for h in hooks:
        h.remove()
    tensors.update({"train_x": got["x"], "train_t": got["t"], "train_v": got["v"]})
    meta["train"] = {"texts": texts, "shapes": shapes}

    # -- training path with context images: [ViT image | clean VAE image | text | noised image] --
    model.config.visual_und = True
    vit_image = torch.rand(3, 16, 12) * 2 - 1  # 8 x 6 ViT patches
    vit_tokens = patchify(vit_image, 2)
    n_vit = vit_tokens.shape[0]
    text = [BOS, 21, 22, 23, EOS]
    clean_hw, noised_hw = (2, 2), (3, 2)
    n_clean, n_noised = 4, 6
    lens = [n_vit + 2, n_clean + 2, len(text), n_noised + 2]
    modes = ["full", "full", "causal", "noise"]
    text_ids = [SOI, EOI, SOI, EOI] + text + [SOI, EOI]
    text_index = [0, n_vit + 1, n_vit + 2, n_vit + n_clean + 3]
    text_start = n_vit + n_clean + 4
    text_index += list(range(text_start, text_start + len(text)))
    noised_start = text_start + len(text)
    text_index += [noised_start, noised_start + n_noised + 1]
    vit_index = list(range(1, 1 + n_vit))
    vae_index = list(range(n_vit + 3, n_vit + 3 + n_clean)) + list(range(noised_start + 1, noised_start + 1 + n_noised))
    positions = [0] * (n_vit + 2) + [1] * (n_clean + 2) + list(range(2, 2 + len(text))) + [2 + len(text)] * (n_noised + 2)
    total = sum(lens)
    padded = torch.randn(2, 4, 6, 4)
    mse_index = torch.zeros(total, dtype=torch.bool)
    mse_index[vae_index[n_clean:]] = True
    got = {}
    hooks = [capture(model.vae2llm, got, "x", True), capture(model.llm2vae, got, "v", False),
             capture(model.connector, got, "vit", False)]
    model(
        sequence_length=total, packed_text_ids=torch.tensor(text_ids), packed_text_indexes=torch.tensor(text_index),
        sample_lens=[total], packed_position_ids=torch.tensor(positions),
        nested_attention_masks=[prepare_attention_mask_per_sample(lens, modes)],
        packed_vit_tokens=vit_tokens, packed_vit_token_indexes=torch.tensor(vit_index),
        packed_vit_position_ids=torch.tensor([r * 8 + c for r in range(8) for c in range(6)]),
        vit_token_seqlens=torch.tensor([n_vit]),
        padded_latent=padded, patchified_vae_latent_shapes=[clean_hw, noised_hw],
        packed_latent_position_ids=torch.tensor([r * 8 + c for r in range(2) for c in range(2)] + [r * 8 + c for r in range(3) for c in range(2)]),
        packed_vae_token_indexes=torch.tensor(vae_index), packed_timesteps=torch.tensor([float("-inf")] * n_clean + [0.2] * n_noised),
        mse_loss_indexes=mse_index,
    )
    for h in hooks:
        h.remove()
    tensors.update({"mixed_vit": vit_tokens, "mixed_x": got["x"], "mixed_v": got["v"], "mixed_vit_features": got["vit"]})
    meta["mixed"] = {"text": text, "vit_grid": [8, 6], "clean": list(clean_hw), "noised": list(noised_hw), "t": torch.sigmoid(torch.tensor(0.2)).item()}

    # -- inference path: prefill two prompts, then the image block (no CFG) ------------------------
    model.eval()
    model.language_model.model.enable_taylorseer = False  # only generate_image() sets it
    tokenizer = DigitTokenizer()
    gen, newlens, new_rope = model.prepare_prompts([0, 0], [0, 0], PROMPTS, tokenizer, new_token_ids)
    cache = model.forward_cache_update_text(NaiveCache(2), **gen)
    query = model.prepare_vae_latent(newlens, new_rope, [(48, 64), (48, 64)], new_token_ids)
    t = 0.65
    n_tokens = query["packed_init_noises"].shape[0]
    v = model._forward_flow(
        x_t=query["packed_init_noises"], timestep=torch.full((n_tokens,), t), past_key_values=cache,
        **{k: query[k] for k in ("packed_vae_token_indexes", "packed_vae_position_ids", "packed_text_ids", "packed_text_indexes",
                                 "packed_indexes", "packed_position_ids", "packed_seqlens", "key_values_lens", "packed_key_value_indexes")},
    )
    tensors.update({"cache_x": query["packed_init_noises"], "cache_v": v})
    meta["cache"] = {"t": t, "grid": [3, 4]}

    def flow(query, context, t, text_cfg=None, img_cfg=None, text_scale=1.0, img_scale=1.0):
        n = query["packed_init_noises"].shape[0]
        kwargs = {k: query[k] for k in ("packed_vae_token_indexes", "packed_vae_position_ids", "packed_text_ids", "packed_text_indexes",
                                        "packed_indexes", "packed_position_ids", "packed_seqlens", "key_values_lens", "packed_key_value_indexes")}
        for name, branch in (("cfg_text", text_cfg), ("cfg_img", img_cfg)):
            if branch is None:
                continue
            ctx, inputs = branch
            kwargs.update({f"{name}_past_key_values": ctx["past_key_values"],
                           f"{name}_packed_position_ids": inputs["cfg_packed_position_ids"],
                           f"{name}_packed_query_indexes": inputs["cfg_packed_query_indexes"],
                           f"{name}_key_values_lens": inputs["cfg_key_values_lens"],
                           f"{name}_packed_key_value_indexes": inputs["cfg_packed_key_value_indexes"]})
        return model._forward_flow(x_t=query["packed_init_noises"], timestep=torch.full((n,), t), past_key_values=context["past_key_values"],
                                   cfg_text_scale=text_scale, cfg_img_scale=img_scale, cfg_renorm_type="global", cfg_renorm_min=0.0, **kwargs)

    def text_context(context, prompt):
        gen, kv_lens, ropes = model.prepare_prompts(context["kv_lens"], context["ropes"], [prompt], tokenizer, new_token_ids)
        cache = model.forward_cache_update_text(context["past_key_values"], **gen)
        return {"kv_lens": kv_lens, "ropes": ropes, "past_key_values": cache}

    def empty():
        return {"kv_lens": [0], "ropes": [0], "past_key_values": NaiveCache(2)}

    # -- text-to-image CFG at batch 1 (text-uncond context = empty) ----------------------------
    cond = text_context(empty(), PROMPTS[0])
    uncond = empty()
    query = model.prepare_vae_latent(cond["kv_lens"], cond["ropes"], [(48, 48)], new_token_ids)
    cfg_inputs = model.prepare_vae_latent_cfg(uncond["kv_lens"], uncond["ropes"], [(48, 48)])
    v = flow(query, cond, 0.8, text_cfg=(uncond, cfg_inputs), text_scale=4.0)
    tensors.update({"t2i_x": query["packed_init_noises"], "t2i_v": v})
    meta["t2i"] = {"t": 0.8, "scale": 4.0}

    # -- editing: context [VAE image, ViT image, text]; text and image CFG at batch 1 ------------
    class FixedLatentVAE:
        def __init__(self, z):
            self.z = z

        def encode(self, images):
            return self.z

    edit_latent = torch.randn(1, 4, 6, 6)  # a 3 x 3 token grid
    edit_vit = torch.rand(3, 12, 10) * 2 - 1  # 6 x 5 ViT patches
    context = empty()
    gen, kv_lens, ropes = model.prepare_vae_images(context["kv_lens"], context["ropes"], [None],
                                                   lambda _: torch.zeros(3, 48, 48), new_token_ids)
    cache = model.forward_cache_update_vae(FixedLatentVAE(edit_latent), context["past_key_values"], **gen)
    gen, kv_lens, ropes = model.prepare_vit_images(kv_lens, ropes, [None], lambda _: edit_vit, new_token_ids)
    cache = model.forward_cache_update_vit(cache, **gen)
    images_only = {"kv_lens": kv_lens, "ropes": ropes, "past_key_values": cache}
    full = text_context(deepcopy(images_only), PROMPTS[1])
    text_only = text_context(empty(), PROMPTS[1])
    query = model.prepare_vae_latent(full["kv_lens"], full["ropes"], [(48, 48)], new_token_ids)
    text_inputs = model.prepare_vae_latent_cfg(images_only["kv_lens"], images_only["ropes"], [(48, 48)])
    img_inputs = model.prepare_vae_latent_cfg(text_only["kv_lens"], text_only["ropes"], [(48, 48)])
    v = flow(query, full, 0.55, text_cfg=(images_only, text_inputs), img_cfg=(text_only, img_inputs), text_scale=4.0, img_scale=1.5)
    tensors.update({"edit_latent": edit_latent, "edit_vit": edit_vit, "edit_x": query["packed_init_noises"], "edit_v": v})
    meta["edit"] = {"t": 0.55, "text_scale": 4.0, "image_scale": 1.5, "vit_grid": [6, 5]}

    # -- the FLUX-format autoencoder -----------------------------------------------------------
    with torch.no_grad():
        pixels = torch.rand(1, 3, 32, 48) * 2 - 1
        moments = ae.encoder(pixels)
        z = torch.randn(1, 4, 4, 6)
        tensors.update({"ae_pixels": pixels, "ae_mean": moments.chunk(2, dim=1)[0], "ae_z": z, "ae_decoded": ae.decode(z)})

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / "reference_outputs.safetensors"))
    (out / "reference_meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    make_reference(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# Our side

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from titan_flow.models.bagel.model import (  # noqa: E402
    KVCache,
    LatentSplit,
    TextSplit,
    VitSplit,
    patchify_latents,
    patchify_vit_image,
)
from titan_flow.models.bagel.pipeline import BagelPipeline, load_flux_vae  # noqa: E402
from titan_flow.models.bagel.state_dict_adapter import from_pretrained  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HARNESS, reason="set BAGEL_REF_HARNESS to the Bagel reference harness (see this file's docstring)"),
]

TOL = 2e-5  # fp32 on 2-layer models, backbones.md section 1.4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("bagel_reference")
    root = Path(HARNESS)
    env = dict(os.environ, PYTHONPATH=f"{root / 'src'}:{root / 'stubs'}")
    subprocess.run([str(root / "venv" / "bin" / "python"), __file__, str(out)], check=True, env=env, cwd=root / "src")
    return out, load_file(str(out / "reference_outputs.safetensors")), json.loads((out / "reference_meta.json").read_text())


@pytest.fixture(scope="module")
def ours(reference):
    return from_pretrained(reference[0]).eval()


def make_pipeline(directory: Path, **options) -> BagelPipeline:
    """The pipeline around the reference's autoencoder; 48 px = a 3 x 3 latent token grid, as every query block here."""
    vae = load_flux_vae(directory / "ae.safetensors")
    return BagelPipeline(tokenizer=DigitTokenizer(), vae=vae, device="cpu", resolution=48, max_sequence_length=64, **options)


def report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).abs().max().item()
    print(f"{name}: max |diff| {err:.3g} (reference max |value| {want.abs().max().item():.3g})")
    return err


def test_training_path_matches_reference(ours, reference):
    _, ref, meta = reference
    x, t = ref["train_x"], ref["train_t"]
    (h0, w0), (h1, w1) = meta["train"]["shapes"]
    n0 = h0 * w0
    texts = meta["train"]["texts"]
    with torch.no_grad():
        v = ours([
            [TextSplit(texts[0]), LatentSplit(x[:n0], h0, w0, t[0].item(), noised=True)],
            [TextSplit(texts[1]), LatentSplit(x[n0:], h1, w1, t[n0].item(), noised=True)],
        ])
    assert report("training path (2 packed samples)", torch.cat(v), ref["train_v"]) < TOL


def test_training_path_with_vit_and_clean_image_matches_reference(ours, reference):
    _, ref, meta = reference
    m = meta["mixed"]
    x = ref["mixed_x"]
    n_clean = m["clean"][0] * m["clean"][1]
    with torch.no_grad():
        features = ours.connector(ours.vit(ref["mixed_vit"], torch.tensor([r * 8 + c for r in range(8) for c in range(6)]), [48]))
        v = ours([[
            VitSplit(ref["mixed_vit"], *m["vit_grid"]),
            LatentSplit(x[:n_clean], *m["clean"], timestep=0.0),
            TextSplit(m["text"]),
            LatentSplit(x[n_clean:], *m["noised"], timestep=m["t"], noised=True),
        ]])
    assert report("ViT branch + connector", features, ref["mixed_vit_features"]) < TOL
    assert report("training path [ViT | clean VAE | text | noised]", v[1], ref["mixed_v"]) < TOL


def test_kv_cache_path_matches_reference(ours, reference):
    _, ref, meta = reference
    ids = [[BOS, *map(int, p.split()), EOS] for p in PROMPTS]
    x = ref["cache_x"].view(2, -1, ref["cache_x"].shape[-1])
    with torch.no_grad():
        cache = ours.extend(KVCache.empty(2), [0, 1], [TextSplit(i) for i in ids])
        v = ours.denoise(cache, [0, 1], x, torch.full((2,), meta["cache"]["t"]), tuple(meta["cache"]["grid"]))
    assert report("KV-cache path (prefill 2 prompts + image block)", v.flatten(0, 1), ref["cache_v"]) < TOL


def test_text_cfg_velocity_matches_reference(ours, reference):
    out, ref, meta = reference
    pipeline = make_pipeline(out)
    cond = pipeline.encode([PROMPTS[0]], model=ours)
    x = ref["t2i_x"][None]
    with torch.no_grad():
        v = pipeline.velocity(ours, x, torch.tensor([meta["t2i"]["t"]]), cond, meta["t2i"]["scale"])
    assert report("pipeline velocity, text CFG 4 + global renorm", v[0], ref["t2i_v"]) < TOL


def test_editing_cfg_velocity_matches_reference(ours, reference):
    out, ref, meta = reference
    e = meta["edit"]
    pipeline = make_pipeline(out, image_guidance_scale=e["image_scale"])
    latents = patchify_latents(ref["edit_latent"], 2)[0]
    ids = [BOS, *map(int, PROMPTS[1].split()), EOS]
    with torch.no_grad():
        images_only = ours.extend(KVCache.empty(1), [0], [LatentSplit(latents, *pipeline.grid)])
        images_only = ours.extend(images_only, [0], [patchify_vit_image(ref["edit_vit"], 2)])
        full = ours.extend(images_only, [0], [TextSplit(ids)])
        text_only = ours.extend(KVCache.empty(1), [0], [TextSplit(ids)])
        # the layout BagelPipeline.encode builds for editing: [cond | text-uncond | image-uncond] contexts
        cond = {"cache": full.cat(images_only).cat(text_only), "cond_context": torch.tensor([0]),
                "text_uncond_context": torch.tensor([1]), "image_uncond_context": torch.tensor([2])}
        v = pipeline.velocity(ours, ref["edit_x"][None], torch.tensor([e["t"]]), cond, e["text_scale"])
    assert report("editing velocity, text CFG 4 + image CFG 1.5", v[0], ref["edit_v"]) < TOL


def test_flux_vae_from_bfl_checkpoint_matches_reference_autoencoder(reference):
    out, ref, _ = reference
    vae = load_flux_vae(out / "ae.safetensors")
    with torch.no_grad():
        mean = vae.encode(ref["ae_pixels"]).latent_dist.mean
        decoded = vae.decode(ref["ae_z"] / 0.3611 + 0.1159).sample
    assert report("VAE encoder mean", mean, ref["ae_mean"]) < TOL
    assert report("VAE decode", decoded, ref["ae_decoded"]) < TOL
