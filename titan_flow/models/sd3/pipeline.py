"""SD3 / SD3.5 as a Policy (models/registry.py): frozen text encoders and VAE around our MMDiT.

The text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL), tokenizers and VAE come from transformers /
diffusers and are loaded from a local diffusers pipeline directory; the backbone is not loaded
here (the trainer builds our own `SD3Transformer` and passes it in). Every step follows
`StableDiffusion3Pipeline`'s recipe so that sampling with this class reproduces diffusers' images.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from titan_flow.models.common import tiny
from titan_flow.models.common.latents import draw_noise
from titan_flow.models.common.pipeline_files import check_layout, scheduler_config
from titan_flow.models.common.schedules import NUM_TRAIN_TIMESTEPS, static_shift_sigmas
from titan_flow.models.registry import pipeline_defaults
from titan_flow.models.sd3.args import FLAVORS

# What `load` needs in each subfolder: any one of the alternatives (a tuple of files that must all exist).
_LAYOUT = {
    "text_encoder": ("CLIP-L text encoder (CLIPTextModelWithProjection)", [("config.json",)]),
    "text_encoder_2": ("CLIP-G text encoder (CLIPTextModelWithProjection)", [("config.json",)]),
    "text_encoder_3": ("T5 text encoder (T5EncoderModel)", [("config.json",)]),
    "tokenizer": ("CLIP-L tokenizer", [("tokenizer.json",), ("vocab.json", "merges.txt")]),
    "tokenizer_2": ("CLIP-G tokenizer", [("tokenizer.json",), ("vocab.json", "merges.txt")]),
    "tokenizer_3": ("T5 tokenizer", [("tokenizer.json",), ("spiece.model",)]),
    "vae": ("VAE (AutoencoderKL)", [("config.json",)]),
    "scheduler": ("FlowMatchEulerDiscreteScheduler config", [("scheduler_config.json",)]),
}

# Scheduler options that would change the sigma schedule in ways `sigmas()` does not reproduce.
_UNSUPPORTED_SCHEDULER_FLAGS = (
    "use_dynamic_shifting",
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
)


def _check_layout(root: Path) -> None:
    check_layout(root, _LAYOUT, "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium")


def _read_scheduler_config(root: Path) -> tuple[float, float | None]:
    path, config = scheduler_config(root, _UNSUPPORTED_SCHEDULER_FLAGS, "SD3; only the static `shift` schedule is")
    if config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"{path}: num_train_timesteps must be {NUM_TRAIN_TIMESTEPS}, got {config['num_train_timesteps']}"
        )
    return float(config.get("shift", 1.0)), config.get("shift_terminal")


def pretrained_defaults(pretrained_path: str) -> dict:
    """`StableDiffusion3Pipeline.__call__`'s defaults for this directory: 28 steps, CFG 7.0, 256 T5 tokens,
    and height = width = the transformer's `sample_size` x the VAE's downsampling (1024 for SD3.5).

    The path may also be a bare transformer directory or a single-file checkpoint (what the backbone
    loader accepts); what it does not hold takes the published SD3 values (sample_size 128, VAE 8x).
    A pixel-space shapes directory records its own (models/sd3/shapes.py).
    """
    from titan_flow.models.sd3 import shapes

    if shapes.is_shapes_dir(pretrained_path):
        return shapes.pretrained_defaults(pretrained_path)
    root = Path(pretrained_path)
    if not root.exists():
        raise FileNotFoundError(f"model.pretrained_path: {str(root)!r} does not exist")
    configs = [root / "transformer" / "config.json", root / "config.json"]
    transformer_config = next((c for c in configs if c.is_file()), None)
    sample_size = json.loads(transformer_config.read_text())["sample_size"] if transformer_config else 128
    vae_config = root / "vae" / "config.json"
    vae_scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1) if vae_config.is_file() else 8
    return pipeline_defaults(resolution=sample_size * vae_scale, max_sequence_length=256, num_steps=28,
                             guidance_scale=7.0)


class SD3Pipeline:
    """Conditioning, CFG velocity, noise, decoding and sigmas for SD3-family backbones."""

    def __init__(
        self,
        *,
        clip_tokenizers: Sequence,
        clip_encoders: Sequence[torch.nn.Module],
        t5_tokenizer,
        t5_encoder: torch.nn.Module,
        vae: torch.nn.Module,
        shift: float,
        shift_terminal: float | None,
        device: torch.device | str,
        resolution: int,
        max_sequence_length: int,
        negative_prompt: str,
    ):
        self.device = torch.device(device)
        self.clip_tokenizers = list(clip_tokenizers)
        self.clip_encoders = [encoder.to(self.device).eval().requires_grad_(False) for encoder in clip_encoders]
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.shift = shift
        self.shift_terminal = shift_terminal
        self.max_sequence_length = max_sequence_length
        # Both CLIPs read 77 tokens (their position table), like diffusers' `tokenizer_max_length`.
        self.clip_max_length = self.clip_encoders[0].config.max_position_embeddings

        clip_width = sum(encoder.config.hidden_size for encoder in self.clip_encoders)
        t5_width = self.t5_encoder.config.d_model
        if clip_width > t5_width:
            raise ValueError(
                f"SD3 text encoders: the CLIP widths sum to {clip_width}, more than the T5 width {t5_width}; "
                "SD3 zero-pads CLIP features up to the T5 width, so this combination cannot be used"
            )

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        patch_pixels = 2 * self.vae_scale_factor  # SD3 patchifies the latent 2x2
        if resolution <= 0 or resolution % patch_pixels:
            raise ValueError(
                f"model.resolution: {resolution} must be a positive multiple of {patch_pixels} "
                f"(VAE downsampling {self.vae_scale_factor} x SD3 patch size 2)"
            )
        self.resolution = resolution

        self.negative_prompt_embeds, self.negative_pooled_prompt_embeds = self._encode_text([negative_prompt])

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
        flavor: str = "debug",
    ) -> SD3Pipeline:
        """Load from a diffusers SD3 pipeline directory; '' builds the tiny random pipeline from `seed`.

        A shapes directory, or '' with a pixel-space `flavor` ("shapes"), gives the pixel-space
        `ShapesPipeline` (models/sd3/shapes.py) instead.
        """
        from titan_flow.models.sd3 import shapes

        pixel_flavor = flavor in FLAVORS and shapes.is_pixel_space(FLAVORS[flavor])
        if shapes.is_shapes_dir(pretrained_path) or (not pretrained_path and pixel_flavor):
            return shapes.ShapesPipeline.load(pretrained_path, device=device, resolution=resolution,
                                              max_sequence_length=max_sequence_length,
                                              negative_prompt=negative_prompt, flavor=flavor)
        kwargs = dict(
            device=device,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            negative_prompt=negative_prompt,
        )
        if not pretrained_path:  # built in memory: under torchrun, transformers saves on rank 0 only
            tiny = build_tiny_sd3_pipeline(seed)
            return cls(
                clip_tokenizers=[tiny.tokenizer, tiny.tokenizer_2],
                clip_encoders=[tiny.text_encoder.to(encoder_dtype), tiny.text_encoder_2.to(encoder_dtype)],
                t5_tokenizer=tiny.tokenizer_3,
                t5_encoder=tiny.text_encoder_3.to(encoder_dtype),
                vae=tiny.vae.to(vae_dtype),
                shift=tiny.scheduler.config.shift,
                shift_terminal=None,
                **kwargs,
            )

        from diffusers import AutoencoderKL
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        root = Path(pretrained_path)
        _check_layout(root)
        shift, shift_terminal = _read_scheduler_config(root)
        return cls(
            clip_tokenizers=[CLIPTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")],
            clip_encoders=[
                CLIPTextModelWithProjection.from_pretrained(root / name, dtype=encoder_dtype)
                for name in ("text_encoder", "text_encoder_2")
            ],
            t5_tokenizer=T5TokenizerFast.from_pretrained(root / "tokenizer_3"),
            t5_encoder=T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=encoder_dtype),
            vae=AutoencoderKL.from_pretrained(root / "vae", dtype=vae_dtype),
            shift=shift,
            shift_terminal=shift_terminal,
            **kwargs,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.vae.config.latent_channels, side, side)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's conditioning: [CLIP-L || CLIP-G penultimate states, zero-padded to T5 width ; T5] and pooled CLIPs."""
        clip_states, clip_pooled = [], []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders):
            ids = tokenizer(
                prompts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            clip_pooled.append(out.text_embeds)
        ids = self.t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        t5_states = self.t5_encoder(ids.to(self.device)).last_hidden_state

        clip_states = torch.cat(clip_states, dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        prompt_embeds = torch.cat([clip_states, t5_states], dim=1)
        return prompt_embeds.float(), torch.cat(clip_pooled, dim=-1).float()

    def encode(self, prompts: Sequence[str], images=None, model=None) -> dict[str, torch.Tensor]:
        """fp32 conditioning for a batch of prompts; the cached negative prompt is expanded to the batch."""
        if images is not None:
            raise ValueError("SD3 is text-to-image only: encode() takes no conditioning images (got images)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompt_embeds, pooled = self._encode_text(prompts)
        batch = len(prompts)
        return {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": self.negative_prompt_embeds.expand(batch, -1, -1),
            "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds.expand(batch, -1),
        }

    def initial_noise(
        self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None, cond: dict | None = None
    ) -> torch.Tensor:
        """N(0, I) latents drawn on the generator's device (as diffusers' randn_tensor does), then moved;
        `cond` is unused (the latent shape is the resolution's)."""
        return draw_noise(n, self.latent_shape, generator, self.device)

    def velocity(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """fp32 velocity at noise level sigma (B,); with guidance > 1, one forward over [uncond; cond].

        Differentiable in the model's parameters through both CFG branches (training reuses it).
        """
        prompt_embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        timestep = sigma.float() * NUM_TRAIN_TIMESTEPS
        use_cfg = guidance_scale > 1
        if use_cfg:
            x = torch.cat([x, x])
            timestep = torch.cat([timestep, timestep])
            prompt_embeds = torch.cat([cond["negative_prompt_embeds"], prompt_embeds])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
        v = model(hidden_states=x, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=timestep)
        v = v.float()
        if not use_cfg:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float NCHW images in [0, 1]."""
        config = self.vae.config
        latents = latents / config.scaling_factor + config.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Float NCHW images in [0, 1] -> fp32 latents, the inverse of `decode`: the VAE posterior's mode,
        shifted and scaled as SD3 trains (what offline flow matching regresses towards)."""
        config = self.vae.config
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return (z.float() - config.shift_factor) * config.scaling_factor

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return static_shift_sigmas(num_steps, self.shift, self.shift_terminal).to(self.device)


# ---------------------------------------------------------------------------------------------
# The tiny random pipeline (tests, the debug job): a complete diffusers-format directory that
# diffusers' StableDiffusion3Pipeline.from_pretrained and SD3Pipeline.load both read, no downloads.

def build_tiny_sd3_pipeline(seed: int = 0):
    """A random diffusers `StableDiffusion3Pipeline` whose shapes match the "debug" backbone flavor.

    T5 width = joint_attention_dim (32), CLIP widths 8 + 16 (zero-padded to 32), CLIP projections
    8 + 16 = pooled_projection_dim (24), a 4-channel VAE with 8x downsampling. The transformer/ is a
    random diffusers `SD3Transformer2DModel` with the debug config so diffusers can run the whole
    pipeline as a reference. Every component is seeded from `seed`, so the directory is reproducible.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    debug = FLAVORS["debug"]
    # CLIP-L gets a third of the pooled width, CLIP-G the rest (SD3: 768 + 1280); hidden = projection width.
    clip_l_width = debug.pooled_projection_dim // 3
    clip_widths = (clip_l_width, debug.pooled_projection_dim - clip_l_width)
    clip_tokenizer, t5_tokenizer = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=tiny.seeded(seed, 1, lambda: SD3Transformer2DModel(**asdict(debug))),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        # SD3's VAE constants
        vae=tiny.seeded(seed, 2, lambda: tiny.autoencoder(debug.in_channels, 1.5305, 0.0609, debug.sample_size * 8)),
        text_encoder=tiny.seeded(seed, 3, lambda: tiny.clip_text_encoder(clip_tokenizer, clip_widths[0], "quick_gelu")),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny.seeded(seed, 4, lambda: tiny.clip_text_encoder(clip_tokenizer, clip_widths[1], "gelu")),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny.seeded(seed, 5, lambda: tiny.t5_encoder(t5_tokenizer, debug.joint_attention_dim)),
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_sd3_pipeline_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `build_tiny_sd3_pipeline(seed)` as a diffusers pipeline directory (what tests load)."""
    return tiny.save_pipeline_dir(build_tiny_sd3_pipeline(seed), out_dir, ("tokenizer", "tokenizer_2"))
