"""Wan2.1 text-to-video as a Policy (models/registry.py): UMT5 and the Wan VAE around our transformer.

The UMT5 encoder and tokenizer come from transformers, `AutoencoderKLWan` from diffusers, loaded from
a local diffusers `WanPipeline` directory; the backbone is built by the trainer and passed in. What
flow_grpo's `general_ocr_wan2_1` does, step by step:

- text: UMT5 over 512 tokens (max_length padding, attention mask), the outputs at padded positions
  replaced by zeros; no mask downstream, so the zero rows are part of the conditioning. Prompts are
  not cleaned (diffusers' ftfy/html clean-up), as flow_grpo's `encode_prompt` does not;
- latents: (B, 16, (F-1)/4 + 1, H/8, W/8) fp32;
- CFG: two separate forwards, cond and negative (""), v = v_u + s (v_c - v_u), on when s > 1;
- schedule: UniPC's flow-sigma table (shift from the scheduler config), walked by rl/'s own
  Euler / SDE steps, with the table's *integer* timesteps fed to the transformer; the table of the
  diffusers flow_grpo pins (<= 0.36) by default, `sigma_grid="diffusers"` for today's (>= 0.37),
  which differs by up to 0.003 in sigma and 3 in the integer timesteps;
- decode: z * std + mean per channel, the VAE, then frames (B, F, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from titan_flow.models.common.latents import draw_noise
from titan_flow.models.common.pipeline_files import check_layout, scheduler_config
from titan_flow.models.common.schedules import NUM_TRAIN_TIMESTEPS, UNIPC_GRIDS, unipc_flow_sigmas
from titan_flow.models.common.tiny import seeded, t5_tokenizer
from titan_flow.models.registry import pipeline_defaults
from titan_flow.models.wan.args import FLAVORS

# What `load` needs in each subfolder: any one of the alternatives (a tuple of files that must all exist).
_LAYOUT = {
    "text_encoder": ("UMT5 text encoder (UMT5EncoderModel)", [("config.json",)]),
    "tokenizer": ("UMT5 tokenizer", [("tokenizer.json",), ("spiece.model",)]),
    "vae": ("Wan VAE (AutoencoderKLWan)", [("config.json",)]),
    "scheduler": ("UniPCMultistepScheduler config", [("scheduler_config.json",)]),
}
# Scheduler options that would change the sigma table in ways `sigmas()` does not reproduce.
_UNSUPPORTED_SCHEDULER_FLAGS = (
    "use_dynamic_shifting",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift_terminal",
)
# WanPipeline.__call__'s defaults (diffusers 0.42.1).
PIPELINE_HEIGHT, PIPELINE_WIDTH, PIPELINE_FRAMES = 480, 832, 81
PIPELINE_STEPS, PIPELINE_GUIDANCE, PIPELINE_TEXT_LENGTH = 50, 5.0, 512


def _check_layout(root: Path) -> None:
    check_layout(root, _LAYOUT, "WanPipeline", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def read_flow_shift(root: Path) -> float:
    """The scheduler's flow_shift, checked to be a plain UniPC flow-sigma table (what `sigmas()` builds)."""
    path, config = scheduler_config(root, _UNSUPPORTED_SCHEDULER_FLAGS, "Wan")
    if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
        raise ValueError(
            f"{path}: Wan samples on UniPC's flow-sigma table; the scheduler must have use_flow_sigmas = true and "
            f"prediction_type = 'flow_prediction', got {config.get('use_flow_sigmas')!r} and "
            f"{config.get('prediction_type')!r}"
        )
    if config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"{path}: num_train_timesteps must be {NUM_TRAIN_TIMESTEPS}, got {config['num_train_timesteps']}")
    return float(config.get("flow_shift", 1.0))


def pretrained_defaults(pretrained_path: str) -> dict:
    """`WanPipeline.__call__`'s defaults: 480 x 832, 81 frames, 50 steps, CFG 5.0, 512 UMT5 tokens. They are
    the pipeline's, not the weights', so any existing path (a pipeline, a bare transformer or an original
    checkpoint, what the backbone loader accepts) takes them."""
    if not Path(pretrained_path).exists():
        raise FileNotFoundError(f"model.pretrained_path: {pretrained_path!r} does not exist")
    return pipeline_defaults(
        resolution=PIPELINE_HEIGHT,
        width=PIPELINE_WIDTH,
        num_frames=PIPELINE_FRAMES,
        max_sequence_length=PIPELINE_TEXT_LENGTH,
        num_steps=PIPELINE_STEPS,
        guidance_scale=PIPELINE_GUIDANCE,
    )


class WanT2VPipeline:
    """Conditioning, CFG velocity, noise, decoding and sigmas for Wan2.1 text-to-video."""

    def __init__(
        self,
        *,
        tokenizer,
        text_encoder: torch.nn.Module,
        vae: torch.nn.Module,
        flow_shift: float,
        device: torch.device | str,
        resolution: int,
        width: int,
        num_frames: int,
        max_sequence_length: int,
        negative_prompt: str,
        sigma_grid: str = "flow_grpo",
    ):
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.flow_shift = flow_shift
        self.max_sequence_length = max_sequence_length
        if sigma_grid not in UNIPC_GRIDS:
            raise ValueError(f"sigma_grid: {sigma_grid!r} is not one of {UNIPC_GRIDS}")
        self.sigma_grid = sigma_grid

        config = self.vae.config
        self.scale_spatial, self.scale_temporal = config.scale_factor_spatial, config.scale_factor_temporal
        multiple = 2 * self.scale_spatial  # the VAE's downsampling x the transformer's 2x2 patches
        for name, value in (("model.resolution", resolution), ("model.width", width)):
            if value <= 0 or value % multiple:
                raise ValueError(
                    f"{name}: {value} must be a positive multiple of {multiple} (VAE downsampling "
                    f"{self.scale_spatial} x Wan patch size 2)"
                )
        if num_frames < 1 or (num_frames - 1) % self.scale_temporal:
            raise ValueError(
                f"model.num_frames: {num_frames} must be {self.scale_temporal}k+1 (the Wan VAE keeps frame 0 and "
                f"compresses every {self.scale_temporal} after it), e.g. 33 or 81"
            )
        self.height, self.width, self.num_frames = resolution, width, num_frames
        # latent normalisation, written as the pipeline does: z = z_norm / (1 / std) + mean
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._timesteps: dict[float, int] = {}  # fp32 sigma -> the scheduler's integer timestep
        self.negative_prompt_embeds = self._encode_text([negative_prompt])

    @classmethod
    def load(
        cls,
        pretrained_path: str,
        *,
        device: torch.device | str,
        encoder_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        resolution: int = 32,
        width: int = 48,
        num_frames: int = 9,
        max_sequence_length: int = 16,
        negative_prompt: str = "",
        seed: int = 0,
        sigma_grid: str = "flow_grpo",
    ) -> WanT2VPipeline:
        """Load from a diffusers WanPipeline directory; '' builds the tiny random pipeline from `seed`."""
        kwargs = {
            "device": device,
            "resolution": resolution,
            "width": width,
            "num_frames": num_frames,
            "max_sequence_length": max_sequence_length,
            "negative_prompt": negative_prompt,
            "sigma_grid": sigma_grid,
        }
        if not pretrained_path:  # built in memory: under torchrun, transformers saves on rank 0 only
            tiny = build_tiny_wan_pipeline(seed)
            return cls(
                tokenizer=tiny.tokenizer,
                text_encoder=tiny.text_encoder.to(encoder_dtype),
                vae=tiny.vae if tiny.vae.dtype == vae_dtype else tiny.vae.to(vae_dtype),
                flow_shift=tiny.scheduler.config.flow_shift,
                **kwargs,
            )

        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(pretrained_path)
        _check_layout(root)
        return cls(
            tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=encoder_dtype),
            vae=AutoencoderKLWan.from_pretrained(root / "vae", dtype=vae_dtype),
            flow_shift=read_flow_shift(root),
            **kwargs,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        frames = (self.num_frames - 1) // self.scale_temporal + 1
        return (self.vae.config.z_dim, frames, self.height // self.scale_spatial, self.width // self.scale_spatial)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 states (B, max_sequence_length, d_model) fp32, rows past each prompt's tokens set to zero."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        states = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        return (states * mask[..., None].to(states.dtype)).float()

    def encode(self, prompts: Sequence[str], images=None, model=None) -> dict[str, torch.Tensor]:
        """fp32 conditioning for a batch of prompts; the cached negative prompt is expanded to the batch."""
        if images is not None:
            raise ValueError("Wan2.1-T2V is text-to-video only: encode() takes no conditioning images (got images)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {
            "prompt_embeds": self._encode_text(prompts),
            "negative_prompt_embeds": self.negative_prompt_embeds.expand(len(prompts), -1, -1),
        }

    def initial_noise(
        self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None, cond: dict | None = None
    ) -> torch.Tensor:
        """N(0, I) video latents (n, C, F', H/8, W/8), drawn on the generator's device (as diffusers), then moved;
        `cond` is unused (the latent shape is the configured size's)."""
        return draw_noise(n, self.latent_shape, generator, self.device)

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer timesteps the transformer is fed for sigmas (B,): the scheduler's value for a sigma
        of a table `sigmas()` returned, else int64(1000 sigma)."""
        values = [self._timesteps.get(s, math.floor(s * NUM_TRAIN_TIMESTEPS)) for s in sigma.float().tolist()]
        return torch.tensor(values, dtype=torch.int64, device=sigma.device)

    def velocity(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """fp32 velocity at noise level sigma (B,); with guidance > 1, a conditional and a negative forward.

        Differentiable in the model's parameters through both CFG branches (training reuses it).
        """
        timestep = self.timesteps(sigma)
        v = model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"]).float()
        if guidance_scale <= 1:
            return v
        v_uncond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["negative_prompt_embeds"])
        v_uncond = v_uncond.float()
        return v_uncond + guidance_scale * (v - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', h, w) -> video frames (B, F, 3, H, W) float in [0, 1]."""
        dtype = self.vae.dtype
        z = latents.to(dtype) / self.latents_inv_std.to(self.device, dtype) + self.latents_mean.to(self.device, dtype)
        video = self.vae.decode(z, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """UniPC's flow-sigma table on the chosen grid (T+1,); remembers its integer timesteps for `velocity`."""
        sigmas, timesteps = unipc_flow_sigmas(num_steps, self.flow_shift, self.sigma_grid)
        self._timesteps.update(zip(sigmas[:-1].tolist(), timesteps.tolist()))
        return sigmas.to(self.device)


# ---------------------------------------------------------------------------------------------
# The tiny random pipeline (tests, the debug job): a complete diffusers-format directory that
# diffusers' WanPipeline.from_pretrained and WanT2VPipeline.load both read, no downloads.

# Per-channel latent statistics of the tiny VAE: not 0 / 1, so the normalisation is exercised.
TINY_LATENTS_MEAN = [0.25, -0.5, 0.125, 0.75]
TINY_LATENTS_STD = [1.5, 0.75, 2.0, 1.25]


def build_tiny_wan_pipeline(seed: int = 0):
    """A random diffusers `WanPipeline` whose shapes match the "debug" backbone flavor.

    UMT5 width = the debug text_dim (32), a 4-channel Wan VAE (8x spatial, 4x temporal), Wan2.1's
    scheduler (UniPC flow sigmas, shift 3), and a random diffusers `WanTransformer3DModel` with the
    debug config so diffusers can run the whole pipeline as a reference. Every component is seeded
    from `seed`, so the directory is reproducible.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    debug = FLAVORS["debug"]
    tokenizer = t5_tokenizer()  # UMT5 uses T5's tokenizer layout

    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=debug.text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vae_args = {
        "base_dim": 8,
        "z_dim": debug.in_channels,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "latents_mean": TINY_LATENTS_MEAN,
        "latents_std": TINY_LATENTS_STD,
    }
    config = debug.to_diffusers_config()
    del config["_class_name"]
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=seeded(seed, 1, lambda: UMT5EncoderModel(text_config)),
        vae=seeded(seed, 2, lambda: AutoencoderKLWan(**vae_args)),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        ),
        transformer=seeded(seed, 3, lambda: WanTransformer3DModel(**config)),
    )


def build_tiny_wan_pipeline_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `build_tiny_wan_pipeline(seed)` as a diffusers pipeline directory (what tests load)."""
    out_dir = Path(out_dir)
    build_tiny_wan_pipeline(seed).save_pretrained(out_dir, is_main_process=True)
    return out_dir
