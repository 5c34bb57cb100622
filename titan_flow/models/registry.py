"""Model families by name: what the trainer, sampler and exporter need to know about each backbone.

A family's package (`titan_flow/models/<name>/__init__.py`) defines `SPEC = ModelSpec(...)`; the
registry imports it only when asked, so loading a config never imports diffusers or transformers.

The Policy interface every `pipeline_cls` implements (all rl/ ever sees of a family):

    pipe = pipeline_cls.load(pretrained_path, device=..., encoder_dtype=..., vae_dtype=...,
                             resolution=..., max_sequence_length=..., negative_prompt=..., seed=...)
    cond   = pipe.encode(prompts, images=None, model=None)  # dict of tensors (and caches), batch-first
    x      = pipe.initial_noise(n, generator, cond=cond)    # fp32 latents; generator or one per sample
    v      = pipe.velocity(model, x, sigma, cond, guidance_scale)   # fp32, CFG inside, sigma (B,) in [0,1]
    images = pipe.decode(x)                                 # float [0, 1]: images (B, 3, H, W), videos (B, F, 3, H, W)
    sigmas = pipe.sigmas(num_steps)                         # (T+1,) fp32, ends with 0

`model` is passed to `encode` because some families (Bagel) encode the prompt with the backbone
itself; families with separate text encoders ignore it. `cond` is passed to `initial_noise` because a
latent's shape may depend on the condition (Bagel edits at the source image's aspect ratio); families
with a fixed latent shape ignore it. A batch's latents are one tensor, so one encode call yields one
latent shape (a family whose batch would mix shapes raises in `encode`). `images` are the source images of an edit,
one per prompt: float (3, H, W) tensors in [0, 1] at each file's own size (what the data loader
yields) or PIL images; the family resizes them as its published pipeline does. Text-to-image
families raise when given images.

A pipeline whose `guidance_distilled` attribute is true (FLUX.1-dev) takes `guidance_scale` as an
input of the network (a distilled guidance embedding) rather than as CFG: code that runs the model
"without CFG" (DPO/SFT losses) then passes the sampling guidance scale instead of 1.

Generation settings whose right value depends on the weights (resolution, text length, steps,
guidance, learning rate) are "auto" in the job config until `config_defaults` fills them: the
published pipeline's defaults for a pretrained directory, the debug job's values for a random flavor.
So a debug value never silently applies to a real model when a recipe leaves a field out. A default
may be a function of the config resolved so far (fields resolve in declaration order): the image
families' `model.width` is `square`, i.e. whatever model.resolution became, and their
`model.num_frames` is 1, whatever the weights (`ModelSpec.fixed_defaults`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

FAMILIES = ("sd3", "flux", "qwen_image", "bagel", "wan")
PORTED = ("sd3", "flux", "bagel", "wan")


def square(cfg) -> int:
    """The "auto" model.width of the image families: model.resolution, whatever set it (square images)."""
    return cfg.model.resolution


# The frame-size fields of the image families, which do not depend on the weights.
IMAGE_FRAME_DEFAULTS = {"model.width": square, "model.num_frames": 1}

# The embedded debug job's values of the "auto" fields, for every random-init flavor.
DEBUG_DEFAULTS = {
    "model.resolution": 64,
    "model.max_sequence_length": 16,
    "sampling.num_steps": 8,
    "sampling.guidance_scale": 4.5,
    "eval.num_steps": 16,
    "eval.guidance_scale": 4.5,
    "optimizer.lr": 5e-3,
}
# Pretrained weights are fine-tuned at the reference's base learning rate (flow_grpo config/base.py),
# not at the debug job's 5e-3, which is sized for a random-init toy.
PRETRAINED_LR = 3e-4


def pipeline_defaults(
    resolution: int,
    max_sequence_length: int,
    num_steps: int,
    guidance_scale: float,
    width: int | None = None,
    num_frames: int | None = None,
) -> dict[str, Any]:
    """The "auto" fields for a pretrained family, from its published pipeline's call defaults: rollout and
    eval sample as the pipeline does unless the recipe says otherwise. Video families also give the
    width and the number of frames (their `resolution` is the height)."""
    video = {} if width is None else {"model.width": width, "model.num_frames": num_frames}
    return {
        "model.resolution": resolution,
        **video,
        "model.max_sequence_length": max_sequence_length,
        "sampling.num_steps": num_steps,
        "sampling.guidance_scale": guidance_scale,
        "eval.num_steps": num_steps,
        "eval.guidance_scale": guidance_scale,
        "optimizer.lr": PRETRAINED_LR,
    }


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, Any]  # flavor name -> args dataclass instance
    model_cls: type[nn.Module]  # built as model_cls(args); has init_weights()
    from_pretrained_fn: Callable[..., nn.Module]  # (path, dtype, device) -> loaded model
    to_diffusers: Callable[[dict], dict]  # our state dict -> the family's published key format
    from_diffusers: Callable[[dict], dict]  # the published key format -> ours
    pipeline_cls: type
    parallelize: Callable[..., nn.Module]  # (model, dims, cfg, trainable) -> model
    # pretrained_path (a non-empty local directory) -> `pipeline_defaults(...)` read from that directory
    # (e.g. the resolution its transformer was trained at); random flavors get DEBUG_DEFAULTS.
    pretrained_defaults: Callable[[str], dict[str, Any]]
    pipeline_options: Callable[[Any], dict] = lambda cfg: {}  # JobConfig -> family-specific load() keywords
    # Video families generate (B, F, 3, H, W) with any width and number of frames; image families
    # make square images (model.width = model.resolution, model.num_frames = 1).
    video: bool = False
    # The random-init flavor's "auto" values that differ from DEBUG_DEFAULTS (e.g. a video's frames).
    debug_defaults: dict[str, Any] = field(default_factory=dict)
    # (path, device) -> (args, our state dict) without building the model; on the CPU the tensors are
    # safetensors' memory maps, so a rank that copies only its shard reads only that shard's bytes.
    load_checkpoint_fn: Callable[..., tuple[Any, dict]] | None = None
    # (our full state dict, args, out_dir, max_shard_size) -> the directory written in the family's
    # published format (diffusers families: <out_dir>/transformer); used by `python -m titan_flow.export`.
    export_fn: Callable[..., Path] | None = None

    def fixed_defaults(self) -> dict[str, Any]:
        """The "auto" fields whose value does not depend on the weights (an image family's frame size)."""
        return {} if self.video else dict(IMAGE_FRAME_DEFAULTS)

    def config_defaults(self, pretrained_path: str) -> dict[str, Any]:
        """{"section.field": value} for the job-config fields left on "auto" (reads the pretrained directory)."""
        if pretrained_path:
            return {**self.fixed_defaults(), **self.pretrained_defaults(pretrained_path)}
        return {**DEBUG_DEFAULTS, **self.fixed_defaults(), **self.debug_defaults}

    def args(self, flavor: str):
        if flavor not in self.flavors:
            raise KeyError(
                f"model.flavor: {flavor!r} is not a flavor of {self.name}; choose one of {', '.join(self.flavors)}"
            )
        return self.flavors[flavor]

    def build(self, flavor: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """Random-init model: constructed on the meta device, then materialised and initialised."""
        with torch.device("meta"):
            model = self.model_cls(self.args(flavor))
        model.to_empty(device=device)
        model.init_weights()
        return model.to(dtype)

    def from_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        return self.from_pretrained_fn(path, dtype=dtype, device=device)

    def load_checkpoint(self, path: str | Path) -> tuple[Any, dict]:
        """(args, our state dict) of a pretrained checkpoint, tensors memory-mapped on the CPU."""
        if self.load_checkpoint_fn is None:
            raise NotImplementedError(f"the {self.name} family does not provide load_checkpoint_fn in its ModelSpec")
        return self.load_checkpoint_fn(path, device="cpu")


def get_model_spec(name: str) -> ModelSpec:
    if name not in FAMILIES:
        raise KeyError(f"model.name: unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    if name not in PORTED:
        raise NotImplementedError(
            f"model.name: the {name!r} backbone is not ported yet; ported families: {', '.join(PORTED)}"
        )
    return importlib.import_module(f"titan_flow.models.{name}").SPEC

