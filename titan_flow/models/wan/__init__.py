"""Wan2.1 text-to-video family: the 3-D diffusion transformer, its checkpoint adapter (diffusers and the
original Wan-AI layout), the video Policy pipeline (UMT5, Wan VAE, UniPC flow sigmas) and parallelism."""

from pathlib import Path

from titan_flow.models.registry import ModelSpec
from titan_flow.models.wan.args import FLAVORS, WanArgs
from titan_flow.models.wan.model import WanTransformer
from titan_flow.models.wan.parallelize import parallelize_wan
from titan_flow.models.wan.pipeline import WanT2VPipeline, pretrained_defaults
from titan_flow.models.wan.state_dict_adapter import (
    from_diffusers,
    from_pretrained,
    load_checkpoint,
    save_diffusers,
    to_diffusers,
)

SPEC = ModelSpec(
    name="wan",
    flavors=FLAVORS,
    model_cls=WanTransformer,
    from_pretrained_fn=from_pretrained,
    to_diffusers=to_diffusers,
    from_diffusers=from_diffusers,
    pipeline_cls=WanT2VPipeline,
    parallelize=parallelize_wan,
    pretrained_defaults=pretrained_defaults,
    pipeline_options=lambda cfg: {"width": cfg.model.width, "num_frames": cfg.model.num_frames},
    video=True,
    # The debug job's video: 9 frames (3 latent frames) of 32 x 48 pixels (2 x 3 tokens per frame).
    debug_defaults={"model.resolution": 32, "model.width": 48, "model.num_frames": 9},
    load_checkpoint_fn=load_checkpoint,
    export_fn=lambda sd, args, out, max_shard_size: save_diffusers(sd, args, Path(out) / "transformer", max_shard_size),
)

__all__ = ["FLAVORS", "SPEC", "WanArgs", "WanT2VPipeline", "WanTransformer"]
