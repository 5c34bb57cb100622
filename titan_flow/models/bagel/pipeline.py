"""Bagel as a Policy (models/registry.py): the backbone encodes its own prompt into a KV cache.

There is no separate text encoder: `encode(prompts, model=model)` prefills each distinct prompt
once into a `KVCache` (und expert, causal), and every denoising step of every group member runs
only the image block against it. Text CFG runs the same block against the text-unconditional
context (empty for text-to-image; the images without the instruction for editing) and, for
editing, image CFG against the instruction without the images, all in one packed forward.

Latents are Bagel's patched tokens on their grid: x has shape (B, h, w, 4*C), each token a 2 x 2
patch of the C-channel FLUX-VAE latent in (patch row, patch col, channel) order, so the token grid
travels with the latents (decode reads it off them). The SDE math of rl/ treats them elementwise,
and the reference's (h*w, 4*C) token rows are the same numbers in the same order.

Text-to-image generates resolution x resolution images (h = w = resolution / 16). Editing does as
Bagel's inferencer: the source image is resized by `ImageTransform(1024, 512, 16)` (long side at
most 1024, short side at least 512, multiples of 16; here `resolution` and `resolution / 2`, which
are Bagel's numbers at its default 1024), encoded at that size, and the edit is generated at that
same shape; the ViT sees the resized source through `ImageTransform(980, 224, 14)`. One encode call
(one sampling batch) generates at one shape, because rl/ stacks a batch's latents into one tensor:
edits whose sources resize to different shapes must come in different batches (`encode` says so).

The tokenizer is transformers' Qwen2 tokenizer; the VAE is diffusers' AutoencoderKL loaded from
Bagel's `ae.safetensors` (the FLUX VAE in BFL key format) through diffusers' LDM converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from titan_flow.models.bagel.args import FLAVORS, BagelArgs
from titan_flow.models.bagel.model import (
    KVCache,
    LatentSplit,
    TextSplit,
    patchify_latents,
    patchify_vit_image,
    unpatchify_latents,
)
from titan_flow.models.bagel.state_dict_adapter import SPECIAL_TOKENS
from titan_flow.models.common import tiny
from titan_flow.models.common.images import to_pil_image
from titan_flow.models.common.attention import ATTENTION_BACKENDS
from titan_flow.models.common.schedules import shifted_linear_sigmas
from titan_flow.models.registry import pipeline_defaults

AE_NAME = "ae.safetensors"
# Bagel's `load_ae`: the FLUX VAE's latent normalisation, applied outside the network.
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
VAE_NORM_GROUPS = 32  # the BFL autoencoder hard-codes GroupNorm(32, ...)
VIT_MIN_SIDE = 224  # Bagel's ViT transform: ImageTransform(980, 224, 14)
MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform's default pixel budget (both transforms)


# ---------------------------------------------------------------------------------------------
# CFG


def guide(
    v_cond: torch.Tensor,
    v_text_uncond: torch.Tensor,
    v_image_uncond: torch.Tensor | None,
    text_scale: float,
    image_scale: float,
    renorm_min: float,
) -> torch.Tensor:
    """Bagel's text (then image) CFG with "global" renormalisation (`_forward_flow`).

    v_t = v_tu + s_txt (v_c - v_tu); v' = v_iu + s_img (v_t - v_iu); v = v' * clamp(|v_c| / |v'|, min, 1).
    The reference takes the norms over the whole packed batch (it only supports batch 1); here
    they are taken per sample, over all of a sample's latent tokens and channels, so that a
    sample's velocity does not depend on what else is in the batch. At batch 1 the two agree.
    """
    v = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    if v_image_uncond is not None:
        v = v_image_uncond + image_scale * (v - v_image_uncond)
    dims = tuple(range(1, v.ndim))
    norm_cond = torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True)
    norm_guided = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return v * (norm_cond / (norm_guided + 1e-8)).clamp(min=renorm_min, max=1.0)


# ---------------------------------------------------------------------------------------------
# VAE and tokenizer loading


def flux_vae_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """diffusers AutoencoderKL config of a BFL-format autoencoder, read off its weights."""
    try:
        levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
        channels = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        blocks = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block."))
        config = dict(
            in_channels=state_dict["encoder.conv_in.weight"].shape[1],
            out_channels=state_dict["decoder.conv_out.weight"].shape[0],
            latent_channels=state_dict["encoder.conv_out.weight"].shape[0] // 2,
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a BFL-format (FLUX) autoencoder state dict: {e!r}") from None
    return dict(
        config,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(channels),
        layers_per_block=blocks,
        norm_num_groups=VAE_NORM_GROUPS,
        act_fn="silu",
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state_dict,
        use_quant_conv="quant_conv.weight" in state_dict,
        use_post_quant_conv="post_quant_conv.weight" in state_dict,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
    )


def load_flux_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """diffusers AutoencoderKL with the weights of a BFL-format `ae.safetensors`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    state_dict = load_file(str(path))
    config = flux_vae_config(state_dict)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(state_dict, config)
    expected = vae.state_dict()
    for key, value in converted.items():
        # BFL stores the mid-block attention projections as 1x1 convolutions; diffusers as linears.
        if key in expected and value.ndim == 4 and expected[key].ndim == 2:
            converted[key] = value[:, :, 0, 0]
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the FLUX VAE conversion left missing keys {missing[:10]} and unexpected keys {unexpected[:10]}")
    vae.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return vae.to(device).eval().requires_grad_(False)


def byte_level_tokenizer():
    """A Qwen2 tokenizer with one token per UTF-8 byte and the Qwen chat / vision special tokens.

    Built offline (no merges, no download) for the debug flavor and tests: 256 byte tokens,
    <|endoftext|> = 256, then <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> = 257..260.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS.values())})
    return tokenizer


def tiny_flux_vae(latent_channels: int, seed: int = 0):
    """A random FLUX-architecture VAE (8x downsampling, 32 channels per level) for the debug flavor."""
    vae = tiny.with_seed(seed, lambda: tiny.autoencoder(
        latent_channels, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR, block_out_channels=(32,) * 4,
        norm_num_groups=VAE_NORM_GROUPS))
    return vae.eval().requires_grad_(False)


def bagel_resize(height: int, width: int, max_side: int, min_side: int, stride: int) -> tuple[int, int]:
    """(height, width) after Bagel's `MaxLongEdgeMinShortEdgeResize(max_side, min_side, stride, MAX_PIXELS)`.

    Scale so the long side is at most max_side (never up) and the short side at least min_side (the
    short-side bound wins), round each side to a multiple of stride, then shrink again if the pixel
    budget or the long-side bound is exceeded. Python's round (half to even), as the reference.
    """

    def scaled(w: float, h: float, scale: float) -> tuple[int, int]:
        return (max(stride, int(round(round(w * scale) / stride) * stride)),
                max(stride, int(round(round(h * scale) / stride) * stride)))

    scale = max(min(max_side / max(width, height), 1.0), min_side / min(width, height))
    w, h = scaled(width, height, scale)
    if w * h > MAX_PIXELS:
        w, h = scaled(w, h, MAX_PIXELS / (w * h))
    if max(w, h) > max_side:
        w, h = scaled(w, h, max_side / max(w, h))
    return h, w


def _pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Bicubic resize, then (3, H, W) normalised to [-1, 1] as Bagel's transforms do."""
    resized = image.resize((width, height), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return array * 2 - 1


# ---------------------------------------------------------------------------------------------
# The Policy


def pretrained_defaults(pretrained_path: str) -> dict:
    """Bagel's inferencer defaults: 1024 x 1024, 50 timesteps (49 steps), text CFG 4.0; it never truncates
    prompts, so the text limit (512) only guards runaway ones."""
    if not Path(pretrained_path).exists():
        raise FileNotFoundError(f"model.pretrained_path: {pretrained_path!r} does not exist")
    return pipeline_defaults(resolution=1024, max_sequence_length=512, num_steps=49, guidance_scale=4.0)


class BagelPipeline:
    """Prompt KV caches, CFG velocity, noise, decoding and sigmas for Bagel."""

    def __init__(
        self,
        *,
        tokenizer,
        vae: torch.nn.Module,
        device: torch.device | str,
        resolution: int,
        max_sequence_length: int,
        latent_patch_size: int = 2,
        timestep_shift: float = 3.0,
        image_guidance_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_renorm_min: float = 0.0,
        attention_backend: str = "auto",
    ):
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.latent_channels = self.vae.config.latent_channels
        self.patch_size = latent_patch_size
        downsample = 2 ** (len(self.vae.config.block_out_channels) - 1) * latent_patch_size
        if resolution <= 0 or resolution % downsample:
            raise ValueError(
                f"model.resolution: {resolution} must be a positive multiple of {downsample} (VAE downsampling x latent patch)"
            )
        self.resolution = resolution
        self.downsample = downsample  # pixels per latent token along a side
        self.grid = (resolution // downsample, resolution // downsample)
        self.max_sequence_length = max_sequence_length
        self.timestep_shift = timestep_shift
        self.image_guidance_scale = image_guidance_scale
        if not 0.0 <= cfg_interval[0] < cfg_interval[1] <= 1.0:
            raise ValueError(f"sampling.cfg_interval: {list(cfg_interval)} must be [lo, hi] with 0 <= lo < hi <= 1")
        self.cfg_interval = tuple(cfg_interval)
        self.cfg_renorm_min = cfg_renorm_min
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"model.attention_backend: {attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        self.attention_backend = attention_backend
        self.special_ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in SPECIAL_TOKENS.items()}
        unknown = [SPECIAL_TOKENS[f] for f, i in self.special_ids.items() if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"the Bagel tokenizer lacks the special tokens {unknown}")

    @classmethod
    def load(
        cls,
        pretrained_path: str,
        *,
        device: torch.device | str,
        encoder_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        resolution: int = 512,
        max_sequence_length: int = 128,
        negative_prompt: str = "",
        seed: int = 0,
        **options,
    ) -> BagelPipeline:
        """Tokenizer and VAE from a Bagel directory; '' builds the debug flavor's byte tokenizer and tiny VAE.

        `encoder_dtype` is unused: the backbone is Bagel's text encoder. `options` are the
        constructor's Bagel-specific settings (timestep_shift, image_guidance_scale, cfg_interval,
        cfg_renorm_min, attention_backend).
        """
        if negative_prompt:
            raise ValueError(
                f"sampling.negative_prompt: Bagel's unconditional branch is the empty context, not a negative prompt; "
                f"set it to '' (got {negative_prompt!r})"
            )
        kwargs = dict(device=device, resolution=resolution, max_sequence_length=max_sequence_length, **options)
        if not pretrained_path:
            vae = tiny_flux_vae(FLAVORS["debug"].latent_channels, seed=seed)
            vae = vae if vae_dtype == torch.float32 else vae.to(vae_dtype)
            return cls(tokenizer=byte_level_tokenizer(), vae=vae, **kwargs)

        from transformers import AutoTokenizer

        root = Path(pretrained_path)
        if not (root / AE_NAME).is_file():
            raise FileNotFoundError(
                f"model.pretrained_path: {root / AE_NAME} does not exist; give a Bagel directory "
                "(e.g. a snapshot of ByteDance-Seed/BAGEL-7B-MoT) holding ae.safetensors and the Qwen2 tokenizer"
            )
        tokenizer = AutoTokenizer.from_pretrained(root)
        return cls(tokenizer=tokenizer, vae=load_flux_vae(root / AE_NAME, vae_dtype, device), **kwargs)

    # -- conditioning ---------------------------------------------------------------------------

    def text_ids(self, prompt: str) -> list[int]:
        """Bagel's context text: <|im_start|> prompt <|im_end|>, no chat template; long prompts are truncated."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)[: self.max_sequence_length]
        return [self.special_ids["bos_token_id"], *ids, self.special_ids["eos_token_id"]]

    def _check_model(self, model: torch.nn.Module) -> BagelArgs:
        args = model.args
        mismatched = [f"{f}: tokenizer {i}, model {getattr(args, f)}" for f, i in self.special_ids.items() if getattr(args, f) != i]
        if mismatched:
            raise ValueError(f"the tokenizer's special tokens disagree with the model's args ({'; '.join(mismatched)})")
        if args.latent_channels != self.latent_channels or args.latent_patch_size != self.patch_size:
            raise ValueError(
                f"the VAE has {self.latent_channels} latent channels (patch {self.patch_size}) but the model expects "
                f"{args.latent_channels} (patch {args.latent_patch_size}); the VAE and backbone come from different checkpoints"
            )
        return args

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images=None, model: torch.nn.Module | None = None) -> dict:
        """Prefill the prompt contexts once; returns the cache, per sample its context for each CFG
        branch, and the latent token grid the batch generates at.

        Text-to-image: one cond context per distinct prompt (group members share it) plus one
        empty text-unconditional context; the grid is resolution / 16 square. Editing (`images`,
        one per prompt): per sample the context [VAE latents, ViT tokens, instruction], the same
        without the instruction (text-uncond) and the instruction alone (image-uncond); the grid is
        the resized sources' (all sources of one call must resize to one shape).
        """
        if model is None:
            raise ValueError("Bagel encodes prompts with the backbone itself: call encode(prompts, model=model)")
        self._check_model(model)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = len(prompts)
        attention = self.attention_backend
        if images is None:
            unique = list(dict.fromkeys(prompts))
            texts = [TextSplit(self.text_ids(p)) for p in unique]
            cond = model.extend(KVCache.empty(len(unique)), list(range(len(unique))), texts, attention)
            cache = cond.cat(KVCache.empty(1))
            index = torch.tensor([unique.index(p) for p in prompts])
            return {
                "cache": cache,
                "cond_context": index,
                "text_uncond_context": torch.full((batch,), len(unique)),
                "image_uncond_context": index,
                "grid": self.grid,
            }
        if len(images) != batch:
            raise ValueError(f"encode: got {len(images)} images for {batch} prompts; editing takes one image per prompt")
        sources = self.edit_sources(images)
        grid = self.edit_grid(sources)
        rows = list(range(batch))
        images_only = model.extend(KVCache.empty(batch), rows, self._latent_splits(sources), attention)
        images_only = model.extend(images_only, rows, self._vit_splits(model, sources), attention)
        texts = [TextSplit(self.text_ids(p)) for p in prompts]
        full = model.extend(images_only, rows, texts, attention)
        text_only = model.extend(KVCache.empty(batch), rows, texts, attention)
        return {
            "cache": full.cat(images_only).cat(text_only),
            "cond_context": torch.arange(batch),
            "text_uncond_context": torch.arange(batch) + batch,
            "image_uncond_context": torch.arange(batch) + 2 * batch,
            "grid": grid,
        }

    def edit_sources(self, images) -> list[Image.Image]:
        """Source images resized as Bagel's VAE transform does (aspect ratio kept; see the module docstring)."""
        out = []
        for image in images:
            pil = to_pil_image(image)
            height, width = bagel_resize(pil.height, pil.width, self.resolution, self.resolution // 2, self.downsample)
            out.append(pil.resize((width, height), Image.BICUBIC))
        return out

    def edit_grid(self, sources: Sequence[Image.Image]) -> tuple[int, int]:
        """The latent token grid of resized sources, which must agree: one batch generates at one shape."""
        grids = [(im.height // self.downsample, im.width // self.downsample) for im in sources]
        if len(set(grids)) > 1:
            sizes = sorted({f"{im.height}x{im.width}" for im in sources})
            raise ValueError(
                f"encode: Bagel edits at each source image's aspect ratio, and one batch is generated at one shape, "
                f"but this batch's sources resize to {', '.join(sizes)} (height x width). Give the dataset's images "
                "one aspect ratio (resize or crop them offline), or make each sampling batch one group "
                "(sampling.batch_size x world size = sampling.num_image_per_prompt) and set eval.batch_size = 1"
            )
        return grids[0]

    def _latent_splits(self, sources: Sequence[Image.Image]) -> list[LatentSplit]:
        """Clean VAE context images at their (already resized) size: the VAE posterior mean, not a sample.

        Encoded one at a time, so that a sample's context does not depend on what else is in its batch.
        """
        splits = []
        for source in sources:
            pixels = _pixels(source, source.height, source.width)[None]
            latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean.float()
            tokens = patchify_latents(VAE_SCALING_FACTOR * (latents - VAE_SHIFT_FACTOR), self.patch_size)[0]
            splits.append(LatentSplit(tokens, source.height // self.downsample, source.width // self.downsample))
        return splits

    def _vit_splits(self, model: torch.nn.Module, sources: Sequence[Image.Image]) -> list:
        """ViT patches of the resized sources, resized again by Bagel's ViT transform (as its inferencer does)."""
        vit = model.args.vit
        if vit is None:
            raise ValueError("image editing needs the ViT, but this Bagel model was built without one (args.vit is None)")
        splits = []
        for source in sources:
            height, width = bagel_resize(
                source.height, source.width, vit.image_size, min(VIT_MIN_SIDE, vit.image_size), vit.patch_size
            )
            splits.append(patchify_vit_image(_pixels(source, height, width).to(self.device), vit.patch_size))
        return splits

    # -- sampling -------------------------------------------------------------------------------

    @property
    def token_dim(self) -> int:
        return self.patch_size**2 * self.latent_channels

    def initial_noise(
        self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None, cond: dict | None = None
    ) -> torch.Tensor:
        """N(0, I) latent tokens (n, h, w, 4*C) on the grid of `cond` (text-to-image: resolution / 16 square),
        drawn on the generator's device, then moved."""
        shape = (*(cond["grid"] if cond is not None else self.grid), self.token_dim)
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"initial_noise: got {len(generator)} generators for {n} samples; pass one per sample")
            noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
        else:
            device = generator.device if generator is not None else self.device
            noise = torch.randn((n, *shape), generator=generator, device=device)
        return noise.to(self.device)

    def velocity(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict,
        guidance_scale: float,
    ) -> torch.Tensor:
        """fp32 velocity (B, h, w, 4*C) at flow time sigma (B,), with text (and image) CFG in one packed forward.

        CFG applies to the samples whose sigma lies in (cfg_interval[0], cfg_interval[1]]; with
        guidance <= 1 only the conditional branch runs. Differentiable in the generation expert
        through every branch (training reuses it; the caches are constants).

        The branches come out of the backbone in its compute dtype; CFG and the renorm (`guide`) run
        in fp32, where the reference runs them in bf16. Kept on purpose: rl/ computes the SDE step and
        its log-prob in fp32, and a bf16 guided velocity adds the rounding of s (v_c - v_u), s times
        larger than the branches' own. Measured against the unmodified reference in bf16 (CPU
        autocast; the 2-layer parity model of tests/test_bagel_parity.py; both branches bitwise
        equal to the reference's; text CFG 5, global renorm): max |difference| 1.15e-2 where
        max |v| = 2.3, i.e. 5.0e-3 of it (one bf16 ulp at 2.3 is 1.56e-2).
        """
        grid = tuple(x.shape[1:3])
        if grid != tuple(cond["grid"]):
            raise ValueError(
                f"velocity: latents on a {grid[0]}x{grid[1]} token grid, but the condition was encoded for "
                f"{cond['grid'][0]}x{cond['grid'][1]}; draw the noise with initial_noise(n, generator, cond)"
            )
        t = sigma.float().to(x.device)
        lo, hi = self.cfg_interval
        guided = (t > lo) & (t <= hi)
        text_cfg = guidance_scale > 1 and bool(guided.any())
        image_cfg = text_cfg and self.image_guidance_scale > 1
        branches = [cond["cond_context"]]
        if text_cfg:
            branches.append(cond["text_uncond_context"])
        if image_cfg:
            branches.append(cond["image_uncond_context"])
        contexts = torch.cat(branches).tolist()
        repeats = len(branches)
        tokens = x.flatten(1, 2).repeat(repeats, 1, 1)
        v = model.denoise(cond["cache"], contexts, tokens, t.repeat(repeats), grid, self.attention_backend)
        v = v.float().unflatten(1, grid)
        if not text_cfg:
            return v
        parts = v.chunk(repeats)
        v_guided = guide(
            parts[0],
            parts[1],
            parts[2] if image_cfg else None,
            guidance_scale,
            self.image_guidance_scale,
            self.cfg_renorm_min,
        )
        return torch.where(guided.view(-1, 1, 1, 1), v_guided, parts[0])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent tokens (B, h, w, 4*C) -> float NCHW images (B, 3, 16h, 16w) in [0, 1]."""
        _, height, width, _ = latents.shape
        z = unpatchify_latents(latents.float().flatten(1, 2), height, width, self.patch_size)
        z = z / VAE_SCALING_FACTOR + VAE_SHIFT_FACTOR
        images = self.vae.decode(z.to(self.device, self.vae.dtype), return_dict=False)[0]
        return (images.float() * 0.5 + 0.5).clamp(0, 1)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Bagel's schedule: linspace(1, 0) with the static shift (its "T timesteps" are T-1 steps)."""
        return shifted_linear_sigmas(num_steps, self.timestep_shift).to(self.device)
