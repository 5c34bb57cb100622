"""FLUX.1-dev and FLUX.1-Kontext-dev as a Policy (models/registry.py): frozen CLIP-L, T5 and VAE around our transformer.

The text encoders, tokenizers and VAE come from transformers / diffusers and are loaded from a local
diffusers FluxPipeline or FluxKontextPipeline directory; the backbone is not loaded here (the trainer
builds our `FluxTransformer` and passes it in). Every step follows diffusers' pipelines, so sampling
with this class reproduces their images:

- latents are the packed 2x2-patch tokens (B, h/2 * w/2, 4C), the layout the reference stores;
- the distilled guidance scale is an input of the network (there is no true CFG, as in the
  reference), so `velocity` runs one forward whatever `guidance_scale` is;
- sigmas are linspace(1, 1/T, T) shifted by mu(image tokens) (`dynamic_shift_sigmas`, `flux_mu`).

Kontext (editing): `encode(prompts, images=...)` VAE-encodes one source image per prompt (the
posterior mode, normalised like the target latents), packs it into condition tokens with position
ids (1, row, col), and `velocity` appends them after the noisy tokens and cuts their outputs off.
The condition's size follows `condition_size`: "resolution" (the target's square, flow_grpo's rule,
the default), "native" (the image's own size floored to 16 px, diffusers with `_auto_resize=False`)
or "preferred" (the ~1 MP size of FLUX.1-Kontext's list closest to the image's aspect ratio,
diffusers' default). mu comes from the target tokens only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from titan_flow.models.common import tiny
from titan_flow.models.common.images import to_pil_image
from titan_flow.models.common.latents import draw_noise, grid_ids, pack_latents, unpack_latents
from titan_flow.models.common.pipeline_files import check_layout, pipeline_class_name, scheduler_config
from titan_flow.models.common.schedules import NUM_TRAIN_TIMESTEPS, dynamic_shift_sigmas, flux_mu
from titan_flow.models.flux.args import FLAVORS, FluxArgs, is_kontext_flavor
from titan_flow.models.registry import pipeline_defaults

T2I_CLASS, KONTEXT_CLASS = "FluxPipeline", "FluxKontextPipeline"
CONDITION_SIZES = ("resolution", "native", "preferred")
DEFAULT_SAMPLE_SIZE = 128  # diffusers' FLUX pipelines: height = width = 128 x the VAE's downsampling

_LAYOUT = {
    "text_encoder": ("CLIP-L text encoder (CLIPTextModel)", [("config.json",)]),
    "text_encoder_2": ("T5 text encoder (T5EncoderModel)", [("config.json",)]),
    "tokenizer": ("CLIP tokenizer", [("tokenizer.json",), ("vocab.json", "merges.txt")]),
    "tokenizer_2": ("T5 tokenizer", [("tokenizer.json",), ("spiece.model",)]),
    "vae": ("VAE (AutoencoderKL)", [("config.json",)]),
    "scheduler": ("FlowMatchEulerDiscreteScheduler config", [("scheduler_config.json",)]),
}
# Scheduler options that would change the sigma schedule in ways `sigmas()` does not reproduce.
_UNSUPPORTED_SCHEDULER_FLAGS = (
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)
# FLUX.1-dev's scheduler_config.json: mu rises linearly from 0.5 at 256 image tokens to 1.15 at 4096.
FLUX_SHIFT = dict(base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.15)


def _check_layout(root: Path) -> str:
    check_layout(root, _LAYOUT, f"{T2I_CLASS} or {KONTEXT_CLASS}", "black-forest-labs/FLUX.1-dev")
    class_name = pipeline_class_name(root) or T2I_CLASS
    if class_name not in (T2I_CLASS, KONTEXT_CLASS):
        raise ValueError(
            f"model.pretrained_path: {root / 'model_index.json'} names {class_name!r}; the flux family loads "
            f"{T2I_CLASS} (FLUX.1-dev) and {KONTEXT_CLASS} (FLUX.1-Kontext-dev) directories"
        )
    return class_name


def _read_shift(root: Path) -> dict:
    path, config = scheduler_config(root, _UNSUPPORTED_SCHEDULER_FLAGS, "FLUX")
    if not config.get("use_dynamic_shifting") or config.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(
            f"{path}: FLUX samples with use_dynamic_shifting = true and the exponential time shift; got "
            f"use_dynamic_shifting={config.get('use_dynamic_shifting')}, time_shift_type={config.get('time_shift_type')}"
        )
    if config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"{path}: num_train_timesteps must be {NUM_TRAIN_TIMESTEPS}, got {config['num_train_timesteps']}")
    keys = dict(base_seq="base_image_seq_len", max_seq="max_image_seq_len", base_shift="base_shift", max_shift="max_shift")
    return {ours: config.get(theirs, FLUX_SHIFT[ours]) for ours, theirs in keys.items()}


def pretrained_defaults(pretrained_path: str) -> dict:
    """`FluxPipeline.__call__`'s (and `FluxKontextPipeline.__call__`'s) defaults: 28 steps, guidance 3.5,
    512 T5 tokens, height = width = 128 x the VAE's downsampling (1024).

    The path may also be a bare transformer directory or a BFL single file (what the backbone loader
    accepts); without a vae/config.json the published VAE's 8x downsampling is used.
    """
    root = Path(pretrained_path)
    if not root.exists():
        raise FileNotFoundError(f"model.pretrained_path: {str(root)!r} does not exist")
    vae_config = root / "vae" / "config.json"
    vae_scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1) if vae_config.is_file() else 8
    return pipeline_defaults(resolution=DEFAULT_SAMPLE_SIZE * vae_scale, max_sequence_length=512, num_steps=28,
                             guidance_scale=3.5)


def preferred_kontext_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of FLUX.1-Kontext's preferred resolution whose aspect ratio is closest to the image's."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


class FluxPipeline:
    """Conditioning, velocity, noise, decoding and sigmas for FLUX.1 (text-to-image) and FLUX.1-Kontext (editing)."""

    def __init__(
        self,
        *,
        clip_tokenizer,
        clip_encoder: torch.nn.Module,
        t5_tokenizer,
        t5_encoder: torch.nn.Module,
        vae: torch.nn.Module,
        shift: dict,
        device: torch.device | str,
        resolution: int,
        max_sequence_length: int,
        guidance_embeds: bool,
        kontext: bool = False,
        condition_size: str = "resolution",
    ):
        self.device = torch.device(device)
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.clip_encoder = clip_encoder.to(self.device).eval().requires_grad_(False)
        self.t5_encoder = t5_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.shift = shift
        self.guidance_embeds = guidance_embeds
        # FLUX's guidance scale is an input of the network, not CFG (see models/registry.py).
        self.guidance_distilled = guidance_embeds
        self.kontext = kontext
        if condition_size not in CONDITION_SIZES:
            raise ValueError(f"model.condition_size: {condition_size!r} is not one of {CONDITION_SIZES}")
        self.condition_size = condition_size
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"model.max_sequence_length: FLUX's T5 reads 1 to 512 tokens, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.latent_channels = self.vae.config.latent_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.multiple = 2 * self.vae_scale_factor  # pixels per packed token side
        if resolution <= 0 or resolution % self.multiple:
            raise ValueError(
                f"model.resolution: {resolution} must be a positive multiple of {self.multiple} "
                f"(VAE downsampling {self.vae_scale_factor} x FLUX's 2x2 latent packing)"
            )
        self.resolution = resolution
        self.latent_side = resolution // self.vae_scale_factor
        self.image_ids = grid_ids(self.latent_side // 2, self.latent_side // 2, frame=0, device=self.device)

    @classmethod
    def load(
        cls,
        pretrained_path: str,
        *,
        device: torch.device | str,
        encoder_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        resolution: int = 512,
        max_sequence_length: int = 512,
        negative_prompt: str = "",
        seed: int = 0,
        flavor: str = "debug",
        condition_size: str = "resolution",
    ) -> FluxPipeline:
        """Load from a diffusers FluxPipeline / FluxKontextPipeline directory (Kontext when model_index.json
        says so); '' builds the tiny random pipeline of the debug `flavor` ("kontext-debug": editing) from `seed`."""
        if negative_prompt:
            raise ValueError(
                f"sampling.negative_prompt: FLUX.1-dev is guidance-distilled and samples without a negative prompt "
                f"(as the reference); set it to '' (got {negative_prompt!r})"
            )
        kwargs = dict(device=device, resolution=resolution, max_sequence_length=max_sequence_length,
                      condition_size=condition_size)
        if not pretrained_path:
            args = FLAVORS.get(flavor)
            if args is None or args.in_channels != FLAVORS["debug"].in_channels:
                raise ValueError(
                    f"model.flavor: the random-init FLUX pipeline (empty model.pretrained_path) has tiny text encoders "
                    f"and VAE for the 'debug' and 'kontext-debug' flavors only, got {flavor!r}; set "
                    "model.pretrained_path for a full-size model"
                )
            kontext = is_kontext_flavor(flavor)
            pipe = build_tiny_flux_pipeline(seed, kontext)
            return cls(
                clip_tokenizer=pipe.tokenizer,
                clip_encoder=pipe.text_encoder.to(encoder_dtype),
                t5_tokenizer=pipe.tokenizer_2,
                t5_encoder=pipe.text_encoder_2.to(encoder_dtype),
                vae=pipe.vae.to(vae_dtype),
                shift=dict(FLUX_SHIFT),
                guidance_embeds=args.guidance_embeds,
                kontext=kontext,
                **kwargs,
            )

        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        root = Path(pretrained_path)
        class_name = _check_layout(root)
        transformer_config = root / "transformer" / "config.json"
        # Without a diffusers transformer/ (a BFL single file), the published dev/Kontext configs embed guidance.
        guidance_embeds = (
            FluxArgs.from_diffusers_config(json.loads(transformer_config.read_text())).guidance_embeds
            if transformer_config.is_file()
            else True
        )
        return cls(
            clip_tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            clip_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", dtype=encoder_dtype),
            t5_tokenizer=T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
            t5_encoder=T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=encoder_dtype),
            vae=AutoencoderKL.from_pretrained(root / "vae", dtype=vae_dtype),
            shift=_read_shift(root),
            guidance_embeds=guidance_embeds,
            kontext=class_name == KONTEXT_CLASS,
            **kwargs,
        )

    # -- conditioning ---------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(tokens, channels) of one packed latent."""
        return ((self.latent_side // 2) ** 2, 4 * self.latent_channels)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's last hidden states (padded to max_sequence_length, no mask) and CLIP-L's pooled output."""
        ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        ids = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = self.t5_encoder(ids.to(self.device), output_hidden_states=False)[0]
        return embeds.float(), pooled.float()

    def condition_hw(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) in pixels the condition image is resized to, by `condition_size`."""
        if self.condition_size == "resolution":
            return self.resolution, self.resolution
        width, height = image.width, image.height
        if self.condition_size == "preferred":
            width, height = preferred_kontext_size(width, height)
        height, width = height // self.multiple * self.multiple, width // self.multiple * self.multiple
        if not height or not width:
            raise ValueError(
                f"a {image.width}x{image.height} condition image is smaller than one {self.multiple}x{self.multiple} "
                "token; use model.condition_size = 'resolution' or a larger image"
            )
        return height, width

    @torch.no_grad()
    def _encode_images(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition tokens (B, Nc, 4C) fp32, their position ids (Nc, 3)) of one source image per sample."""
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=self.multiple)
        pils = [to_pil_image(im) for im in images]
        if self.condition_size == "resolution":  # flow_grpo's dataset resizes with Pillow's bicubic first
            pils = [im.resize((self.resolution, self.resolution), Image.BICUBIC) for im in pils]
        sizes = [self.condition_hw(im) for im in pils]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"the condition images of one batch map to different sizes {sorted(set(sizes))} (model.condition_size "
                f"= {self.condition_size!r}); FLUX shares position ids over a batch, so give same-sized images or "
                "use model.condition_size = 'resolution'"
            )
        height, width = sizes[0]
        pixels = torch.cat([processor.preprocess(im, height, width) for im in pils])
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        config = self.vae.config
        latents = (latents.float() - config.shift_factor) * config.scaling_factor
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        return pack_latents(latents), grid_ids(h // 2, w // 2, frame=1, device=self.device)

    def encode(self, prompts: Sequence[str], images=None, model=None) -> dict[str, torch.Tensor]:
        """fp32 conditioning; Kontext also takes one source image per prompt (PIL, uint8 HWC or float CHW in [0, 1])."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled = self._encode_text(prompts)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if not self.kontext:
            if images is not None:
                raise ValueError(
                    "FLUX.1-dev is text-to-image: encode() takes no images; edit with a FLUX.1-Kontext directory "
                    "or the 'kontext-debug' flavor"
                )
            return cond
        if images is None or len(images) != len(prompts):
            got = "no images" if images is None else f"{len(images)} images"
            raise ValueError(f"FLUX.1-Kontext edits one source image per prompt: got {got} for {len(prompts)} prompts")
        tokens, ids = self._encode_images(images)
        cond["condition_latents"] = tokens
        cond["condition_ids"] = ids.expand(len(prompts), -1, -1)  # batch-first, so batches slice like the rest
        return cond

    # -- sampling -------------------------------------------------------------------------------

    def initial_noise(
        self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None, cond: dict | None = None
    ) -> torch.Tensor:
        """N(0, I) latents of shape (C, h, w) per sample, drawn as diffusers does, then packed; `cond` is
        unused (Kontext generates at model.resolution whatever the source's size)."""
        noise = draw_noise(n, (self.latent_channels, self.latent_side, self.latent_side), generator, self.device)
        return pack_latents(noise)

    def velocity(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """fp32 velocity of the packed latents x (B, N, 4C) at noise level sigma (B,): one forward, the distilled
        guidance embedding set to `guidance_scale`; Kontext's condition tokens ride along and are cut off."""
        n_tokens = x.shape[1]
        hidden, img_ids = x, self.image_ids
        if "condition_latents" in cond:
            hidden = torch.cat([x, cond["condition_latents"].to(x.dtype)], dim=1)
            img_ids = torch.cat([img_ids, cond["condition_ids"][0]])
        prompt_embeds = cond["prompt_embeds"]
        guidance = torch.full((x.shape[0],), float(guidance_scale), device=x.device) if self.guidance_embeds else None
        v = model(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=sigma.float(),
            img_ids=img_ids,
            txt_ids=prompt_embeds.new_zeros(prompt_embeds.shape[1], 3),
            guidance=guidance,
        )
        return v[:, :n_tokens].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> float NCHW images in [0, 1]."""
        config = self.vae.config
        latents = unpack_latents(latents, self.latent_side, self.latent_side) / config.scaling_factor + config.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        mu = flux_mu(self.latent_shape[0], **self.shift)
        return dynamic_shift_sigmas(num_steps, mu).to(self.device)


# ---------------------------------------------------------------------------------------------
# The tiny random pipeline (tests, the debug jobs): a complete diffusers-format directory that
# diffusers' FluxPipeline / FluxKontextPipeline.from_pretrained and FluxPipeline.load both read.


def build_tiny_flux_pipeline(seed: int = 0, kontext: bool = False):
    """A random diffusers `FluxPipeline` (or `FluxKontextPipeline`) whose shapes match the "debug" flavor.

    CLIP-L width 24 = pooled_projection_dim, T5 width 32 = joint_attention_dim, a 4-channel VAE with 8x
    downsampling and FLUX's latent constants (4 x 4 = 16 packed channels), FLUX.1-dev's scheduler
    config. The transformer/ is a random diffusers `FluxTransformer2DModel` with the debug config so
    diffusers can run the whole pipeline as a reference. Every component is seeded from `seed`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    debug = FLAVORS["debug"]
    config = {k: v for k, v in debug.to_diffusers_config().items() if not k.startswith("_")}
    clip_tokenizer, t5_tokenizer = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=FLUX_SHIFT["base_shift"], max_shift=FLUX_SHIFT["max_shift"],
        base_image_seq_len=FLUX_SHIFT["base_seq"], max_image_seq_len=FLUX_SHIFT["max_seq"],
    )
    pipeline_cls = FluxKontextPipeline if kontext else DiffusersFluxPipeline
    return pipeline_cls(
        transformer=tiny.seeded(seed, 1, lambda: FluxTransformer2DModel(**config)),
        scheduler=scheduler,
        # FLUX's VAE constants (scaling 0.3611, shift 0.1159)
        vae=tiny.seeded(seed, 2, lambda: tiny.autoencoder(debug.in_channels // 4, 0.3611, 0.1159, 64)),
        text_encoder=tiny.seeded(
            seed, 3, lambda: tiny.clip_text_encoder(clip_tokenizer, debug.pooled_projection_dim, with_projection=False)
        ),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny.seeded(seed, 5, lambda: tiny.t5_encoder(t5_tokenizer, debug.joint_attention_dim)),
        tokenizer_2=t5_tokenizer,
    )


def build_tiny_flux_pipeline_dir(out_dir: str | Path, seed: int = 0, kontext: bool = False) -> Path:
    """Write `build_tiny_flux_pipeline(seed, kontext)` as a diffusers pipeline directory (what tests load)."""
    return tiny.save_pipeline_dir(build_tiny_flux_pipeline(seed, kontext), out_dir, ("tokenizer",))
