"""Qwen-Image and Qwen-Image-Edit as a Policy (models/registry.py): Qwen2.5-VL conditioning, true CFG
with norm rescale, the dynamic-shift schedule and the Qwen-Image VAE around our MMDiT.

The text encoder (Qwen2.5-VL), tokenizer, VL processor (editing) and VAE come from transformers /
diffusers and are loaded from a local diffusers pipeline directory; the backbone is not loaded here
(the trainer builds our own `QwenImageTransformer` and passes it in). Every step follows diffusers'
`QwenImagePipeline` / `QwenImageEditPipeline` (0.42), so sampling with this class reproduces their
images; where flow_grpo differs, this follows diffusers (see `velocity` and `encode`).

Latents are the packed 2x2 patches diffusers and flow_grpo use: x has shape (B, h/2 * w/2, 4 * C)
for a C-channel latent of h x w (resolution / 8); the SDE math of rl/ treats them elementwise.

Text: the prompt is wrapped in the model's chat template, encoded, and the template's leading tokens
are dropped (34 for text-to-image, 64 for editing, diffusers' constants); each sample keeps its own
length, zero-padded to the batch's longest with a 0/1 mask, and the backbone masks the padding out
as attention keys (diffusers >= 0.37), so a prompt's velocity does not depend on what it is batched
with. flow_grpo ran diffusers versions that ignored the mask, so its padded rows did perturb
attention; that is its bug, not reproduced here.

Editing: the source image conditions both networks. Qwen2.5-VL sees it (resized, aspect kept, to about
1024^2 pixels as diffusers does, or to the area `condition_size` says; fed to the VL processor as a PIL image) through the vision tokens of the edit template, for
the instruction and for the negative prompt alike; the backbone sees its VAE latents (the
posterior mean, normalised with the VAE's per-channel mean/std) as extra tokens after the noisy
ones, a second image in `img_shapes`. Only the noisy tokens' outputs are the velocity.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from titan_flow.models.common.images import to_pil_image
from titan_flow.models.common.latents import draw_noise, pack_latents, unpack_latents
from titan_flow.models.common.pipeline_files import check_layout
from titan_flow.models.common.schedules import NUM_TRAIN_TIMESTEPS, dynamic_shift_sigmas, flux_mu
from titan_flow.models.qwen_image.args import FLAVORS
from titan_flow.models.registry import pipeline_defaults

# diffusers' QwenImagePipeline / QwenImageEditPipeline constants.
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
T2I_DROP = 34  # the template's tokens before the prompt
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_DROP = 64
TOKENIZER_MAX_LENGTH = 1024  # text tokens after the dropped prefix (diffusers' tokenizer_max_length)
DEFAULT_SAMPLE_SIZE = 128  # diffusers' default_sample_size: latent pixels, so 1024 px with the 8x VAE
CONDITION_AREA = 1024 * 1024  # the edit pipeline resizes the source image to about this many pixels
# model.condition_size: the source image's area before it becomes condition tokens (its aspect kept):
# the target's (resolution^2), its own, or diffusers' and flow_grpo's ~1024^2.
CONDITION_SIZES = ("resolution", "native", "preferred")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# What `load` needs in each subfolder: any one of the alternatives (a tuple of files that must all exist).
_LAYOUT = {
    "text_encoder": ("Qwen2.5-VL text encoder (Qwen2_5_VLForConditionalGeneration)", [("config.json",)]),
    "tokenizer": ("Qwen2 tokenizer", [("tokenizer.json",), ("vocab.json", "merges.txt")]),
    "vae": ("VAE (AutoencoderKLQwenImage)", [("config.json",)]),
    "scheduler": ("FlowMatchEulerDiscreteScheduler config", [("scheduler_config.json",)]),
}
# Scheduler options that would change the sigma schedule in ways `sigmas()` does not reproduce.
_UNSUPPORTED_SCHEDULER_FLAGS = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height), multiples of 32, of about `target_area` pixels at aspect `ratio` = w / h
    (diffusers' edit pipeline sizes the condition image this way)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def true_cfg(v_cond: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: neg + s (cond - neg), rescaled per token to the conditional velocity's
    L2 norm over the channels (no epsilon, as diffusers and flow_grpo)."""
    combined = v_neg + scale * (v_cond - v_neg)
    cond_norm = torch.norm(v_cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def pad_text(embeds: Sequence[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (L_i, D) hidden states -> zero-padded (B, L, D) and the 0/1 long mask (B, L)."""
    length = length or max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
    mask = torch.stack([(torch.arange(length, device=e.device) < e.shape[0]).long() for e in embeds])
    return padded, mask


def join_text(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor):
    """[a; b] along the batch, the shorter one zero-padded (mask 0) to the longer's length."""
    length = max(a.shape[1], b.shape[1])

    def pad(e, m):
        return torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])), torch.nn.functional.pad(m, (0, length - m.shape[1]))

    (a, a_mask), (b, b_mask) = pad(a, a_mask), pad(b, b_mask)
    return torch.cat([a, b]), torch.cat([a_mask, b_mask])


@cache
def _pil_processor_class():
    """transformers' Qwen2VLProcessor without a video processor: its video processor (and the fast image
    processor) need torchvision, which the CPU machines do not have; images take the PIL image
    processor, `Qwen2VLImageProcessorPil`, whose output the pipeline tests check against diffusers'."""
    from transformers import Qwen2VLProcessor

    class PilQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return PilQwen2VLProcessor


def vl_processor(image_processor, tokenizer):
    """The Qwen2.5-VL processor (text + images) built from its image processor and tokenizer."""
    return _pil_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def load_processor(directory: Path):
    """Qwen-Image-Edit's `processor/` folder (preprocessor_config.json + the tokenizer), PIL backend."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if not (directory / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained_path: {directory} must hold the Qwen2.5-VL image processor (preprocessor_config.json) "
            "of a Qwen-Image-Edit pipeline directory"
        )
    return vl_processor(Qwen2VLImageProcessorPil.from_pretrained(directory), Qwen2Tokenizer.from_pretrained(directory))


def _check_layout(root: Path) -> None:
    check_layout(root, _LAYOUT, "QwenImagePipeline / QwenImageEditPipeline", "Qwen/Qwen-Image or Qwen/Qwen-Image-Edit")


def _scheduler_settings(config: dict, source: str) -> dict:
    """The dynamic-shift schedule's parameters, after checking the scheduler is the one `sigmas()` computes."""
    enabled = [flag for flag in _UNSUPPORTED_SCHEDULER_FLAGS if config.get(flag)]
    if enabled:
        raise ValueError(f"{source}: {enabled} are not supported for Qwen-Image")
    if not config.get("use_dynamic_shifting") or config.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(
            f"{source}: Qwen-Image samples with use_dynamic_shifting = true and time_shift_type = 'exponential', "
            f"got {config.get('use_dynamic_shifting')!r} / {config.get('time_shift_type')!r}"
        )
    if config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"{source}: num_train_timesteps must be {NUM_TRAIN_TIMESTEPS}, got {config['num_train_timesteps']}")
    return dict(
        base_seq=config.get("base_image_seq_len", 256),
        max_seq=config.get("max_image_seq_len", 4096),
        base_shift=config.get("base_shift", 0.5),
        max_shift=config.get("max_shift", 1.15),
        shift_terminal=config.get("shift_terminal") or None,
    )


def pretrained_defaults(pretrained_path: str) -> dict:
    """`QwenImagePipeline.__call__`'s defaults for this directory: 50 steps, true CFG 4.0, 512 text tokens,
    and height = width = 128 x the VAE's downsampling (1024 px); the edit pipeline's output defaults to
    the ~1024^2 condition size, the same 1024 px for a square source.

    The path may also be a bare transformer directory (what the backbone loader accepts); without a
    vae/config.json the published 8x VAE is assumed.
    """
    root = Path(pretrained_path)
    if not root.exists():
        raise FileNotFoundError(f"model.pretrained_path: {str(root)!r} does not exist")
    vae_config = root / "vae" / "config.json"
    downsample = json.loads(vae_config.read_text())["temperal_downsample"] if vae_config.is_file() else [0, 0, 0]
    return pipeline_defaults(resolution=DEFAULT_SAMPLE_SIZE * 2 ** len(downsample), max_sequence_length=512,
                             num_steps=50, guidance_scale=4.0)


class QwenImagePipeline:
    """Conditioning, true-CFG velocity, noise, decoding and sigmas for Qwen-Image(-Edit) backbones.

    `processor` (Qwen2VLProcessor) makes the policy an editing one: `encode` then takes one source
    image per prompt. The tiny random pipeline has one and also encodes plain prompts, so the debug
    job runs either task.
    """

    def __init__(
        self,
        *,
        tokenizer,
        text_encoder: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler_config: dict,
        device: torch.device | str,
        resolution: int,
        max_sequence_length: int,
        negative_prompt: str,
        processor=None,
        text_to_image: bool = True,
        condition_area: int | None = CONDITION_AREA,
    ):
        from diffusers.image_processor import VaeImageProcessor

        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.text_to_image = text_to_image
        self.condition_area = condition_area
        self.schedule = _scheduler_settings(scheduler_config, "scheduler config")
        if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(
                f"model.max_sequence_length: {max_sequence_length} must lie in [1, {TOKENIZER_MAX_LENGTH}] "
                "(Qwen-Image's text limit)"
            )
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt

        self.latent_channels = self.vae.config.z_dim
        self.vae_scale_factor = 2 ** len(self.vae.config.temperal_downsample)
        patch_pixels = 2 * self.vae_scale_factor  # latents are packed 2x2
        if resolution <= 0 or resolution % patch_pixels:
            raise ValueError(
                f"model.resolution: {resolution} must be a positive multiple of {patch_pixels} "
                f"(VAE downsampling {self.vae_scale_factor} x the 2x2 latent packing)"
            )
        self.resolution = resolution
        self.latent_size = resolution // self.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=patch_pixels)
        config = self.vae.config
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        if self.text_to_image:
            negative = self._encode_text([negative_prompt])
            self.negative_prompt_embeds, self.negative_prompt_embeds_mask = negative

    # -- loading --------------------------------------------------------------------------------

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
        condition_size: str | None = None,
        condition_area: int | None = None,
    ) -> QwenImagePipeline:
        """Load from a diffusers QwenImagePipeline or QwenImageEditPipeline directory (editing iff it has a
        `processor/`); '' builds the tiny random pipeline from `seed`, which does both.

        The edit source image is resized (aspect kept, sides multiples of 32) to about `condition_area`
        pixels if given, else by `condition_size` (model.condition_size): "resolution" = resolution^2,
        "native" = its own area, "preferred" = diffusers' 1024^2 (flow_grpo's too). Default: "preferred"
        for a published directory, "resolution" for the tiny one (CPU).
        """
        if condition_size is not None and condition_size not in CONDITION_SIZES:
            raise ValueError(f"model.condition_size: {condition_size!r} is not one of {CONDITION_SIZES}")
        if condition_area is None:
            size = condition_size or ("preferred" if pretrained_path else "resolution")
            condition_area = {"resolution": resolution**2, "native": None, "preferred": CONDITION_AREA}[size]
        kwargs = dict(
            device=device, resolution=resolution, max_sequence_length=max_sequence_length,
            negative_prompt=negative_prompt,
        )
        if not pretrained_path:  # built in memory: under torchrun, transformers saves on rank 0 only
            tiny = build_tiny_qwen_image_pipeline(seed, edit=True)
            return cls(
                tokenizer=tiny.tokenizer,
                text_encoder=tiny.text_encoder.to(encoder_dtype),
                vae=tiny.vae if vae_dtype == torch.float32 else tiny.vae.to(vae_dtype),
                scheduler_config=dict(tiny.scheduler.config),
                processor=tiny.processor,
                condition_area=condition_area,
                **kwargs,
            )

        from diffusers import AutoencoderKLQwenImage
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        root = Path(pretrained_path)
        _check_layout(root)
        editing = (root / "processor").is_dir()
        return cls(
            tokenizer=Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=encoder_dtype),
            vae=AutoencoderKLQwenImage.from_pretrained(root / "vae", dtype=vae_dtype),
            scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
            processor=load_processor(root / "processor") if editing else None,
            text_to_image=not editing,
            condition_area=condition_area,
            **kwargs,
        )

    # -- conditioning ---------------------------------------------------------------------------

    @property
    def editing(self) -> bool:
        return self.processor is not None

    def _hidden_states(self, inputs) -> list[torch.Tensor]:
        """Qwen2.5-VL's last hidden states (after the final norm) of each sample's real tokens."""
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        # logits_to_keep=1: the LM head's logits are not needed, only the hidden states.
        out = self.text_encoder(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        mask = inputs["attention_mask"].bool()
        return [h[m] for h, m in zip(hidden, mask)]

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-image: (B, L, D) fp32 hidden states after the template's 34 tokens, cut to
        max_sequence_length, zero-padded to the batch's longest, and the 0/1 mask."""
        tokens = self.tokenizer(
            [T2I_TEMPLATE.format(p) for p in prompts],
            max_length=TOKENIZER_MAX_LENGTH + T2I_DROP,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        hidden = [h[T2I_DROP:][: self.max_sequence_length].float() for h in self._hidden_states(tokens)]
        return pad_text(hidden)

    def condition_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) the source image is resized to: about `condition_area` pixels (None: its own)
        at its aspect, each side a multiple of 32 (the VAE's 8 x the 2x2 packing divides it)."""
        area = self.condition_area or image.width * image.height
        width, height = calculate_dimensions(area, image.width / image.height)
        if not width or not height:
            raise ValueError(
                f"encode: a {image.width} x {image.height} source image at about {area} pixels rounds to a "
                f"{width} x {height} condition (sides are multiples of 32); use a larger image or model.condition_size"
            )
        return height, width

    @torch.no_grad()
    def _encode_edit(self, prompts: list[str], images: Sequence) -> dict[str, torch.Tensor]:
        pils = [to_pil_image(image) for image in images]
        sizes = {self.condition_size(p) for p in pils}
        if len(sizes) > 1:
            raise ValueError(
                f"encode: the source images of one batch must share their condition size (one img_shapes per batch), "
                f"got sizes {sorted(sizes)} (height, width); batch images of the same aspect ratio together"
            )
        height, width = sizes.pop()
        resized = [self.image_processor.resize(p, height, width) for p in pils]

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = self.processor(
                text=[EDIT_TEMPLATE.format(t) for t in texts], images=resized, padding=True, return_tensors="pt"
            )
            return pad_text([h[EDIT_DROP:].float() for h in self._hidden_states(inputs)])

        prompt_embeds, prompt_mask = encode(prompts)
        negative_embeds, negative_mask = encode([self.negative_prompt] * len(prompts))
        pixels = self.image_processor.preprocess(resized, height, width).unsqueeze(2)  # (B, 3, 1, H, W) in [-1, 1]
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        latents = posterior.mode()[:, :, 0].float()  # the posterior mean, not a sample
        mean, std = self.latents_mean.to(latents.device), self.latents_std.to(latents.device)
        return {
            "prompt_embeds": prompt_embeds,
            "prompt_embeds_mask": prompt_mask,
            "negative_prompt_embeds": negative_embeds,
            "negative_prompt_embeds_mask": negative_mask,
            "image_latents": (latents - mean) / std,  # (B, C, Hc/8, Wc/8), normalised
        }

    def encode(self, prompts: Sequence[str], images=None, model=None) -> dict[str, torch.Tensor]:
        """fp32 conditioning: prompt and negative hidden states with their masks (each zero-padded to its
        own batch maximum); for editing also the source images' normalised VAE latents."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images is not None:
            if not self.editing:
                raise ValueError(
                    "encode got source images, but this is a text-to-image Qwen-Image directory (no processor/); "
                    "editing needs a Qwen-Image-Edit pipeline directory"
                )
            if len(images) != len(prompts):
                raise ValueError(f"encode: got {len(images)} images for {len(prompts)} prompts; editing takes one per prompt")
            return self._encode_edit(prompts, images)
        if not self.text_to_image:
            raise ValueError("Qwen-Image-Edit edits a source image: call encode(prompts, images=[one per prompt])")
        prompt_embeds, prompt_mask = self._encode_text(prompts)
        batch = len(prompts)
        return {
            "prompt_embeds": prompt_embeds,
            "prompt_embeds_mask": prompt_mask,
            "negative_prompt_embeds": self.negative_prompt_embeds.expand(batch, -1, -1),
            "negative_prompt_embeds_mask": self.negative_prompt_embeds_mask.expand(batch, -1),
        }

    # -- sampling -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.num_tokens, 4 * self.latent_channels)

    def initial_noise(
        self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None, cond: dict | None = None
    ) -> torch.Tensor:
        """N(0, I) latents drawn as diffusers draws them ((B, 1, C, h, w) on the generator's device), packed;
        `cond` is unused (the target is square at model.resolution, an edit's source image included)."""
        shape = (1, self.latent_channels, self.latent_size, self.latent_size)
        return pack_latents(draw_noise(n, shape, generator, self.device)[:, 0])

    def velocity(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """fp32 velocity at noise level sigma (B,); with guidance > 1, true CFG with the norm rescale from one
        forward over [cond; negative] (texts zero-padded to a common length and masked).

        Editing appends the condition tokens after the noisy ones and keeps the first N outputs.
        Differentiable in the model's parameters through both branches (training reuses it).
        """
        batch, n_tokens = x.shape[:2]
        grid = self.latent_size // 2
        shapes = [(1, grid, grid)]
        hidden = x
        if "image_latents" in cond:
            condition = cond["image_latents"]
            shapes.append((1, condition.shape[-2] // 2, condition.shape[-1] // 2))
            hidden = torch.cat([x, pack_latents(condition).to(x.dtype)], dim=1)
        # diffusers feeds the scheduler's timestep 1000 * sigma, divided by 1000 again, in fp32.
        timestep = sigma.float().to(x.device) * NUM_TRAIN_TIMESTEPS / NUM_TRAIN_TIMESTEPS
        text, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        use_cfg = guidance_scale > 1
        if use_cfg:
            text, mask = join_text(text, mask, cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
        v = model(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as diffusers: all real -> no mask
            timestep=timestep,
            img_shapes=shapes,
        )[:, :n_tokens].float()
        if not use_cfg:
            return v
        v_cond, v_neg = v.chunk(2)
        return true_cfg(v_cond, v_neg, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> float NCHW images in [0, 1]."""
        z = unpack_latents(latents.float(), self.latent_size, self.latent_size)
        z = z / (1.0 / self.latents_std.to(z.device)) + self.latents_mean.to(z.device)  # diffusers' rounding
        images = self.vae.decode(z[:, :, None].to(self.device, self.vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """linspace(1, 1/T, T), exponentially shifted with mu from the target's token count (condition tokens
        do not count), stretched to the scheduler's shift_terminal (0.02)."""
        s = self.schedule
        mu = flux_mu(self.num_tokens, s["base_seq"], s["max_seq"], s["base_shift"], s["max_shift"])
        return dynamic_shift_sigmas(num_steps, mu, s["shift_terminal"]).to(self.device)


# ---------------------------------------------------------------------------------------------
# The tiny random pipeline (tests, the debug job): a complete diffusers-format directory that
# diffusers' QwenImagePipeline / QwenImageEditPipeline.from_pretrained and our load both read.

_TINY_WORDS = (
    "a an the of on in with and photo picture image cat dog red blue green sign that says two three four car "
    "tree house person change number to make add remove one"
)
# The published scheduler_config.json of Qwen/Qwen-Image (the edit model's is the same).
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


def tiny_tokenizer():
    """A byte-level BPE in Qwen2's format whose vocabulary holds every pre-token of the two templates
    (and a few prompt words) whole, so the templates cost what they cost the real tokenizer: the
    text-to-image prefix is exactly the 34 tokens the pipeline drops."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    texts = [T2I_TEMPLATE, EDIT_TEMPLATE, _TINY_WORDS, " " + _TINY_WORDS]
    special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS) + "|\\{\\}")
    pieces = [p for text in texts for part in special.split(text) for p, _ in split.pre_tokenize_str(part)]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    # Merges build each piece left to right. Pieces with a leading space ("Ġ...") go first: their
    # merges then outrank the bare words', so " user" becomes one token rather than " " + "user".
    for piece in sorted(dict.fromkeys(pieces), key=lambda p: not p.startswith("\u0120")):
        current = piece[0]
        for char in piece[1:]:
            if (current, char) not in merges:
                merges.append((current, char))
            current += char
            vocab.setdefault(current, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def tiny_image_processor():
    """Qwen2.5-VL's image processor settings (patch 14, merge 2, CLIP mean/std, >= 56^2 pixels), PIL backend."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def build_tiny_qwen_image_pipeline(seed: int = 0, edit: bool = False):
    """A random diffusers `QwenImagePipeline` (or, with `edit`, `QwenImageEditPipeline`) whose shapes
    match the "debug" backbone flavor: Qwen2.5-VL with hidden size 32 (= joint_attention_dim) and a
    2-layer vision tower, a Qwen-Image VAE with z_dim 4 (in_channels 16 / 4) and 8x downsampling.
    The transformer is a random diffusers `QwenImageTransformer2DModel` with the debug config, so
    diffusers can run the whole pipeline as a reference. Every component is seeded from `seed`.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImagePipeline as DiffusersQwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    debug = FLAVORS["debug"]
    tokenizer = tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=debug.joint_attention_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=debug.joint_attention_dim,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
    )
    encoder_config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)
    latent_channels = debug.latent_channels
    vae_args = dict(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 3 spatial halvings: 8x, as the real VAE
        latents_mean=[0.3, -0.2, 0.1, -0.4][:latent_channels],
        latents_std=[1.5, 0.8, 2.0, 1.2][:latent_channels],
    )

    def seeded(offset: int, build):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + offset)
            return build()

    components = dict(
        transformer=seeded(1, lambda: QwenImageTransformer2DModel(**{
            k: v for k, v in debug.to_diffusers_config().items() if not k.startswith("_")})),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=seeded(2, lambda: AutoencoderKLQwenImage(**vae_args)),
        text_encoder=seeded(3, lambda: Qwen2_5_VLForConditionalGeneration(encoder_config)).eval(),
        tokenizer=tokenizer,
    )
    if not edit:
        return DiffusersQwenImagePipeline(**components)
    return QwenImageEditPipeline(processor=vl_processor(tiny_image_processor(), tokenizer), **components)


def build_tiny_qwen_image_pipeline_dir(out_dir: str | Path, seed: int = 0, edit: bool = False) -> Path:
    """Write `build_tiny_qwen_image_pipeline(seed, edit)` as a diffusers pipeline directory (what tests load).

    transformers cannot save a Qwen2VLProcessor without its (torchvision) video processor, so the
    edit pipeline's `processor/` is written as its parts: the tokenizer and preprocessor_config.json,
    which is what the published Qwen-Image-Edit folder holds besides the video settings.
    """
    out_dir = Path(out_dir)
    pipe = build_tiny_qwen_image_pipeline(seed, edit)
    processor = getattr(pipe, "processor", None)
    if processor is not None:
        pipe.register_modules(processor=None)  # saved by hand below
    pipe.save_pretrained(out_dir, is_main_process=True)
    if processor is not None:
        processor.tokenizer.save_pretrained(out_dir / "processor")
        processor.image_processor.save_pretrained(out_dir / "processor")
        index = json.loads((out_dir / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir
