"""Numerical parity of our Bagel port with ByteDance-Seed/Bagel's own code (fp32 and bf16, CPU). Slow, opt-in.

Needs a reference harness outside the project (nothing of it is committed), named by the
environment variable BAGEL_REF_HARNESS, a directory holding:
  venv/   python -m venv venv && venv/bin/pip install torch==2.13.0 transformers==4.49.0 safetensors einops
  src/    git archive HEAD modeling data | tar -x   (from github.com/ByteDance-Seed/Bagel), patched for fp32:
          sed -i 's/torch\\.bfloat16/torch.float32/g' src/modeling/bagel/{qwen2_navit,siglip_navit}.py
          sed -i 's/SDPBackend\\.EFFICIENT_ATTENTION/SDPBackend.MATH/g' src/modeling/bagel/qwen2_navit.py
  stubs/flash_attn/__init__.py   a flash_attn_varlen_func that loops over the cu_seqlens segments with
          SDPA (GQA by repeat_interleave, bottom-right causal mask), since flash-attn has no CPU build.
  src_bf16/  (optional) the same sources with only the SDPBackend patch: the reference's own bf16
          numerics, for the bf16 tests (skipped without it).
The reference half of this file (`make_reference`) runs in that venv as a script; it builds the tiny
Bagel of backbones.md section 7.2 with random weights, writes it as a Bagel directory (ema.safetensors,
configs, a BFL-format ae.safetensors) plus its inputs and outputs, and the tests load that
directory into our model and compare. `make_bf16_reference` loads the same weights into the
unmodified reference in bf16 and runs the generation path under CPU bf16 autocast, as the
reference's inferencer runs it (under CUDA autocast) and as the issue-15 probe did.
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


def build_reference():
    """The tiny reference Bagel (backbones.md section 7.2), its autoencoder and configs, default-initialised."""
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

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
    return model, AutoEncoder(ae_params), llm_config, vit_config


class DigitContext:
    """The reference's prompt / image context helpers (its inferencer's update_context_* and gen_image plumbing)."""

    def __init__(self, model):
        from modeling.bagel.qwen2_navit import NaiveCache

        self.model, self.cache_cls = model, NaiveCache
        self.tokenizer = DigitTokenizer()
        self.new_token_ids = dict(bos_token_id=BOS, eos_token_id=EOS, start_of_image=SOI, end_of_image=EOI)

    def empty(self):
        return {"kv_lens": [0], "ropes": [0], "past_key_values": self.cache_cls(2)}

    def text(self, context, prompt):
        gen, kv_lens, ropes = self.model.prepare_prompts(context["kv_lens"], context["ropes"], [prompt], self.tokenizer,
                                                         self.new_token_ids)
        cache = self.model.forward_cache_update_text(context["past_key_values"], **gen)
        return {"kv_lens": kv_lens, "ropes": ropes, "past_key_values": cache}

    def images(self, context, latent, vit_image):
        """[clean VAE latent (given, as from a VAE), ViT image] appended to the context, as the reference's inferencer."""

        class FixedLatentVAE:
            def encode(self, images):
                return latent

        m, ids = self.model, self.new_token_ids
        shape = (latent.shape[2] * 8, latent.shape[3] * 8)
        gen, kv_lens, ropes = m.prepare_vae_images(context["kv_lens"], context["ropes"], [None],
                                                   lambda _: torch.zeros(3, *shape), ids)
        cache = m.forward_cache_update_vae(FixedLatentVAE(), context["past_key_values"], **gen)
        gen, kv_lens, ropes = m.prepare_vit_images(kv_lens, ropes, [None], lambda _: vit_image, ids)
        cache = m.forward_cache_update_vit(cache, **gen)
        return {"kv_lens": kv_lens, "ropes": ropes, "past_key_values": cache}

    def flow(self, x, context, t, shape, text_cfg=None, img_cfg=None, text_scale=1.0, img_scale=1.0):
        """`_forward_flow` of the image block on `context` (plus its CFG branches), with noise x instead of a draw."""
        m = self.model
        query = m.prepare_vae_latent(context["kv_lens"], context["ropes"], [shape], self.new_token_ids)
        kwargs = {k: query[k] for k in ("packed_vae_token_indexes", "packed_vae_position_ids", "packed_text_ids",
                                        "packed_text_indexes", "packed_indexes", "packed_position_ids", "packed_seqlens",
                                        "key_values_lens", "packed_key_value_indexes")}
        for name, branch in (("cfg_text", text_cfg), ("cfg_img", img_cfg)):
            if branch is None:
                continue
            inputs = m.prepare_vae_latent_cfg(branch["kv_lens"], branch["ropes"], [shape])
            kwargs.update({f"{name}_past_key_values": branch["past_key_values"],
                           f"{name}_packed_position_ids": inputs["cfg_packed_position_ids"],
                           f"{name}_packed_query_indexes": inputs["cfg_packed_query_indexes"],
                           f"{name}_key_values_lens": inputs["cfg_key_values_lens"],
                           f"{name}_packed_key_value_indexes": inputs["cfg_packed_key_value_indexes"]})
        return m._forward_flow(x_t=x, timestep=torch.full((x.shape[0],), t), past_key_values=context["past_key_values"],
                               cfg_text_scale=text_scale, cfg_img_scale=img_scale, cfg_renorm_type="global",
                               cfg_renorm_min=0.0, **kwargs)


SIZES = [(800, 1200), (300, 200), (1024, 1024), (100, 5000), (30, 50), (333, 777), (1080, 1920), (4000, 3000),
         (512, 513), (17, 1000), (720, 1280), (2000, 90), (40, 30), (24, 24)]  # (height, width)


def reference_resize():
    """data/transforms.py's MaxLongEdgeMinShortEdgeResize with its image libraries stubbed out, so that calling it
    on a (C, H, W) tensor returns the (height, width) it would resize to."""
    import types

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = lambda img, size, interpolation=None, antialias=None: tuple(size)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional, transforms.InterpolationMode = functional, types.SimpleNamespace(BICUBIC="bicubic")
    transforms.ToTensor = transforms.Normalize = object
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional, "cv2": types.ModuleType("cv2")})
    from data.transforms import MaxLongEdgeMinShortEdgeResize

    return MaxLongEdgeMinShortEdgeResize


def two_prompt_velocity(model, x, t):
    """The KV-cache path at batch 2: prefill both PROMPTS in one packed call, then their 48 x 64 image blocks at t."""
    from modeling.bagel.qwen2_navit import NaiveCache

    new_token_ids = dict(bos_token_id=BOS, eos_token_id=EOS, start_of_image=SOI, end_of_image=EOI)
    gen, newlens, new_rope = model.prepare_prompts([0, 0], [0, 0], PROMPTS, DigitTokenizer(), new_token_ids)
    cache = model.forward_cache_update_text(NaiveCache(2), **gen)
    query = model.prepare_vae_latent(newlens, new_rope, [(48, 64), (48, 64)], new_token_ids)
    keys = ("packed_vae_token_indexes", "packed_vae_position_ids", "packed_text_ids", "packed_text_indexes", "packed_indexes",
            "packed_position_ids", "packed_seqlens", "key_values_lens", "packed_key_value_indexes")
    return model._forward_flow(x_t=x, timestep=torch.full((x.shape[0],), t), past_key_values=cache,
                               **{k: query[k] for k in keys})


def make_reference(out: Path) -> None:
    from copy import deepcopy

    from data.data_utils import patchify, prepare_attention_mask_per_sample
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, ae, llm_config, vit_config = build_reference()
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
    ctx = DigitContext(model)
    x = torch.randn(24, 16)
    tensors.update({"cache_x": x, "cache_v": two_prompt_velocity(model, x, 0.65)})
    meta["cache"] = {"t": 0.65, "grid": [3, 4]}

    # -- text-to-image CFG at batch 1 (text-uncond context = empty) ----------------------------
    cond = ctx.text(ctx.empty(), PROMPTS[0])
    x = torch.randn(9, 16)
    v = ctx.flow(x, cond, 0.8, (48, 48), text_cfg=ctx.empty(), text_scale=4.0)
    tensors.update({"t2i_x": x, "t2i_v": v})
    meta["t2i"] = {"t": 0.8, "scale": 4.0}

    # -- editing: context [VAE image, ViT image, text]; text and image CFG at batch 1 ------------
    edit_latent = torch.randn(1, 4, 6, 6)  # a 3 x 3 token grid
    edit_vit = torch.rand(3, 12, 10) * 2 - 1  # 6 x 5 ViT patches
    images_only = ctx.images(ctx.empty(), edit_latent, edit_vit)
    full = ctx.text(deepcopy(images_only), PROMPTS[1])
    text_only = ctx.text(ctx.empty(), PROMPTS[1])
    x = torch.randn(9, 16)
    v = ctx.flow(x, full, 0.55, (48, 48), text_cfg=images_only, img_cfg=text_only, text_scale=4.0, img_scale=1.5)
    tensors.update({"edit_latent": edit_latent, "edit_vit": edit_vit, "edit_x": x, "edit_v": v})
    meta["edit"] = {"t": 0.55, "text_scale": 4.0, "image_scale": 1.5, "vit_grid": [6, 5]}

    # -- editing a non-square image, generated at its shape: a 32 x 48 source (2 x 3 tokens), 5 x 7 ViT patches --
    wide_latent = torch.randn(1, 4, 4, 6)
    wide_vit = torch.rand(3, 10, 14) * 2 - 1
    images_only = ctx.images(ctx.empty(), wide_latent, wide_vit)
    full = ctx.text(deepcopy(images_only), PROMPTS[0])
    text_only = ctx.text(ctx.empty(), PROMPTS[0])
    x = torch.randn(6, 16)
    v = ctx.flow(x, full, 0.45, (32, 48), text_cfg=images_only, img_cfg=text_only, text_scale=4.0, img_scale=1.5)
    tensors.update({"wide_latent": wide_latent, "wide_vit": wide_vit, "wide_x": x, "wide_v": v})

    # -- the image transforms' resize rule (data/transforms.py), on sizes of every aspect ----------------
    resize = reference_resize()
    meta["resize"] = {
        f"{mx},{mn},{stride}": [[h, w, *resize(mx, mn, stride, 14 * 14 * 9 * 1024)(torch.zeros(1, h, w))] for h, w in SIZES]
        for mx, mn, stride in ((1024, 512, 16), (980, 224, 14), (64, 32, 16), (48, 24, 16))
    }

    # -- the FLUX-format autoencoder -----------------------------------------------------------
    with torch.no_grad():
        pixels = torch.rand(1, 3, 32, 48) * 2 - 1
        moments = ae.encoder(pixels)
        z = torch.randn(1, 4, 4, 6)
        tensors.update({"ae_pixels": pixels, "ae_mean": moments.chunk(2, dim=1)[0], "ae_z": z, "ae_decoded": ae.decode(z)})

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / "reference_outputs.safetensors"))
    (out / "reference_meta.json").write_text(json.dumps(meta))


def make_bf16_reference(out: Path) -> None:
    """The generation path of the unmodified reference in bf16 under CPU autocast, on make_reference's weights and inputs."""
    from copy import deepcopy

    from safetensors.torch import load_file, save_file

    model = build_reference()[0]
    # bf16 weights, as load_checkpoint_and_dispatch(dtype=bf16) gives them: buffers outside the checkpoint
    # (the rotary inv_freq) stay fp32 (a model.to(bf16) would round the RoPE frequencies too)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(out / "ema.safetensors")).items()}
    model.load_state_dict(state, assign=True)
    model.eval()
    model.language_model.model.enable_taylorseer = False
    ref = load_file(str(out / "reference_outputs.safetensors"))
    ctx = DigitContext(model)
    tensors = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tensors["cache_v"] = two_prompt_velocity(model, ref["cache_x"], 0.65)
        cond, empty = ctx.text(ctx.empty(), PROMPTS[0]), ctx.empty()
        x = ref["t2i_x"]
        tensors["t2i_cond_v"] = ctx.flow(x, cond, 0.8, (48, 48))
        tensors["t2i_uncond_v"] = ctx.flow(x, empty, 0.8, (48, 48))
        tensors["t2i_cfg5_v"] = ctx.flow(x, cond, 0.8, (48, 48), text_cfg=empty, text_scale=5.0)
        images_only = ctx.images(ctx.empty(), ref["edit_latent"], ref["edit_vit"])
        full = ctx.text(deepcopy(images_only), PROMPTS[1])
        text_only = ctx.text(ctx.empty(), PROMPTS[1])
        x = ref["edit_x"]
        tensors["edit_cond_v"] = ctx.flow(x, full, 0.55, (48, 48))
        tensors["edit_v"] = ctx.flow(x, full, 0.55, (48, 48), text_cfg=images_only, img_cfg=text_only, text_scale=4.0,
                                     img_scale=1.5)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference_bf16_outputs.safetensors"))


if __name__ == "__main__":
    (make_bf16_reference if sys.argv[2:] == ["bf16"] else make_reference)(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# Our side

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tolerances import rounding_bound  # noqa: E402

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


def grid_latents(tokens: torch.Tensor) -> torch.Tensor:
    """The reference's (9, 16) token rows of a 48 px image as the pipeline's (1, 3, 3, 16) latents."""
    return tokens.view(1, 3, 3, -1)


def edit_cond(model, latent: torch.Tensor, vit_image: torch.Tensor, prompt: str) -> dict:
    """The editing condition BagelPipeline.encode builds, from a VAE latent (1, C, 2h, 2w) and a ViT image."""
    tokens = patchify_latents(latent, 2)[0]
    grid = (latent.shape[2] // 2, latent.shape[3] // 2)
    ids = [BOS, *map(int, prompt.split()), EOS]
    with torch.no_grad():
        images_only = model.extend(KVCache.empty(1), [0], [LatentSplit(tokens, *grid)])
        images_only = model.extend(images_only, [0], [patchify_vit_image(vit_image, 2)])
        full = model.extend(images_only, [0], [TextSplit(ids)])
        text_only = model.extend(KVCache.empty(1), [0], [TextSplit(ids)])
    # [cond | text-uncond | image-uncond] contexts
    return {"cache": full.cat(images_only).cat(text_only), "cond_context": torch.tensor([0]),
            "text_uncond_context": torch.tensor([1]), "image_uncond_context": torch.tensor([2]), "grid": grid}


def test_text_cfg_velocity_matches_reference(ours, reference):
    out, ref, meta = reference
    pipeline = make_pipeline(out)
    cond = pipeline.encode([PROMPTS[0]], model=ours)
    with torch.no_grad():
        v = pipeline.velocity(ours, grid_latents(ref["t2i_x"]), torch.tensor([meta["t2i"]["t"]]), cond, meta["t2i"]["scale"])
    assert report("pipeline velocity, text CFG 4 + global renorm", v[0].flatten(0, 1), ref["t2i_v"]) < TOL


def test_editing_cfg_velocity_matches_reference(ours, reference):
    out, ref, meta = reference
    e = meta["edit"]
    pipeline = make_pipeline(out, image_guidance_scale=e["image_scale"])
    with torch.no_grad():
        cond = edit_cond(ours, ref["edit_latent"], ref["edit_vit"], PROMPTS[1])
        v = pipeline.velocity(ours, grid_latents(ref["edit_x"]), torch.tensor([e["t"]]), cond, e["text_scale"])
    assert report("editing velocity, text CFG 4 + image CFG 1.5", v[0].flatten(0, 1), ref["edit_v"]) < TOL


def test_non_square_editing_matches_reference(ours, reference):
    """A 32 x 48 source edited at its shape: the reference's query block at (32, 48) and ours on the 2 x 3 grid."""
    out, ref, _ = reference
    pipeline = make_pipeline(out, image_guidance_scale=1.5)
    with torch.no_grad():
        cond = edit_cond(ours, ref["wide_latent"], ref["wide_vit"], PROMPTS[0])
        x = ref["wide_x"].view(1, 2, 3, -1)
        v = pipeline.velocity(ours, x, torch.tensor([0.45]), cond, 4.0)
    assert report("non-square editing velocity (2 x 3 tokens), CFG 4 / 1.5", v[0].flatten(0, 1), ref["wide_v"]) < TOL


def test_resize_rule_is_the_reference_image_transform(reference):
    """bagel_resize against data/transforms.py's MaxLongEdgeMinShortEdgeResize, sizes of every aspect, four settings."""
    from titan_flow.models.bagel.pipeline import bagel_resize

    for setting, rows in reference[2]["resize"].items():
        mx, mn, stride = map(int, setting.split(","))
        for h, w, want_h, want_w in rows:
            assert bagel_resize(h, w, mx, mn, stride) == (want_h, want_w), (setting, h, w)


def test_flux_vae_from_bfl_checkpoint_matches_reference_autoencoder(reference):
    out, ref, _ = reference
    vae = load_flux_vae(out / "ae.safetensors")
    with torch.no_grad():
        mean = vae.encode(ref["ae_pixels"]).latent_dist.mean
        decoded = vae.decode(ref["ae_z"] / 0.3611 + 0.1159).sample
    assert report("VAE encoder mean", mean, ref["ae_mean"]) < TOL
    assert report("VAE decode", decoded, ref["ae_decoded"]) < TOL


# ---------------------------------------------------------------------------------------------
# bf16: the unmodified reference under CPU autocast


@pytest.fixture(scope="module")
def reference_bf16(reference):
    out, root = reference[0], Path(HARNESS)
    if not (root / "src_bf16").is_dir():
        pytest.skip(f"{root / 'src_bf16'} is missing: the unpatched reference sources the bf16 tests run")
    env = dict(os.environ, PYTHONPATH=f"{root / 'src_bf16'}:{root / 'stubs'}")
    subprocess.run([str(root / "venv" / "bin" / "python"), __file__, str(out), "bf16"], check=True, env=env,
                   cwd=root / "src_bf16")
    return load_file(str(out / "reference_bf16_outputs.safetensors"))


@pytest.fixture(scope="module")
def ours_bf16(reference):
    return from_pretrained(reference[0], dtype=torch.bfloat16).eval()


def bitwise(name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    differ = (got.float() != want.float()).float().mean().item()
    err = (got.float() - want.float()).abs().max().item()
    print(f"{name}: {100 * differ:.1f}% of elements differ, max |diff| {err:.3g}")
    return torch.equal(got.float(), want.float())


def test_generation_path_in_bf16_is_the_reference_bitwise(ours_bf16, reference, reference_bf16):
    """Prefill (text; VAE + ViT image) and the denoising step in bf16 round where the reference rounds (issue 15)."""
    out, ref, _ = reference
    ids = [[BOS, *map(int, p.split()), EOS] for p in PROMPTS]
    pipeline = make_pipeline(out)
    t2i = pipeline.encode([PROMPTS[0]], model=ours_bf16)
    edit = edit_cond(ours_bf16, ref["edit_latent"].to(torch.bfloat16), ref["edit_vit"].to(torch.bfloat16), PROMPTS[1])
    x_t2i, x_edit, t2i_t, edit_t = ref["t2i_x"][None], ref["edit_x"][None], torch.tensor([0.8]), torch.tensor([0.55])
    with torch.no_grad():
        cache = ours_bf16.extend(KVCache.empty(2), [0, 1], [TextSplit(i) for i in ids])
        v = ours_bf16.denoise(cache, [0, 1], ref["cache_x"].view(2, 12, -1), torch.full((2,), 0.65), (3, 4))
        cond = ours_bf16.denoise(t2i["cache"], [0], x_t2i, t2i_t, (3, 3))
        uncond = ours_bf16.denoise(t2i["cache"], [1], x_t2i, t2i_t, (3, 3))
        edited = ours_bf16.denoise(edit["cache"], [0], x_edit, edit_t, (3, 3))
    results = [
        bitwise("bf16 KV-cache path (prefill 2 prompts + image block)", v.flatten(0, 1), reference_bf16["cache_v"]),
        bitwise("bf16 text-to-image, conditional branch", cond[0], reference_bf16["t2i_cond_v"]),
        bitwise("bf16 text-to-image, unconditional branch", uncond[0], reference_bf16["t2i_uncond_v"]),
        bitwise("bf16 editing [VAE | ViT | text], conditional branch", edited[0], reference_bf16["edit_cond_v"]),
    ]
    assert all(results)


def test_fp32_cfg_differs_from_the_reference_bf16_cfg_by_bf16_rounding(ours_bf16, reference, reference_bf16):
    """The pipeline guides in fp32 (BagelPipeline.velocity); the reference in bf16. Same branches, so the difference
    is the reference's rounding of u + s (c - u) and of the renorm: a few bf16 roundings of |u| + s |c - u|."""
    out, ref, _ = reference
    pipeline = make_pipeline(out)
    cond = pipeline.encode([PROMPTS[0]], model=ours_bf16)
    x = grid_latents(ref["t2i_x"])
    with torch.no_grad():
        v = pipeline.velocity(ours_bf16, x, torch.tensor([0.8]), cond, 5.0)[0].flatten(0, 1)
    c, u = reference_bf16["t2i_cond_v"].float(), reference_bf16["t2i_uncond_v"].float()
    want = reference_bf16["t2i_cfg5_v"].float()
    err = report("fp32 CFG 5 + renorm vs the reference's bf16 CFG", v, want)
    print(f"  relative to max |v|: {err / want.abs().max().item():.3g}")
    assert err <= rounding_bound(4, elements=v.numel()) * (u.abs() + 5.0 * (c - u).abs()).max().item()
