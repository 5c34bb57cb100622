"""Bagel-7B-MoT family: Mixture-of-Transformers backbone, ema.safetensors adapter, KV-cache Policy, parallelism."""

from pathlib import Path

from titan_flow.models.bagel.args import FLAVORS, BagelArgs, VitArgs
from titan_flow.models.bagel.model import Bagel
from titan_flow.models.bagel.parallelize import parallelize_bagel
from titan_flow.models.bagel.pipeline import BagelPipeline, pretrained_defaults
from titan_flow.models.bagel.state_dict_adapter import (
    from_bagel,
    from_pretrained,
    load_checkpoint,
    save_pretrained,
    to_bagel,
)
from titan_flow.models.registry import ModelSpec

SPEC = ModelSpec(
    name="bagel",
    flavors=FLAVORS,
    model_cls=Bagel,
    from_pretrained_fn=from_pretrained,
    to_diffusers=to_bagel,  # Bagel has no diffusers format: its published format is ema.safetensors
    from_diffusers=from_bagel,
    pipeline_cls=BagelPipeline,
    parallelize=parallelize_bagel,
    pretrained_defaults=pretrained_defaults,
    load_checkpoint_fn=load_checkpoint,
    # Bagel's own format (ema.safetensors + llm/vit configs); copy the tokenizer and ae.safetensors beside it.
    export_fn=lambda sd, args, out, max_shard_size: save_pretrained(sd, args, out) or Path(out),
    pipeline_options=lambda cfg: dict(
        image_guidance_scale=cfg.sampling.image_guidance_scale,
        cfg_interval=tuple(cfg.sampling.cfg_interval),
        cfg_renorm_min=cfg.sampling.cfg_renorm_min,
        attention_backend=cfg.model.attention_backend,
    ),
)

__all__ = ["FLAVORS", "SPEC", "Bagel", "BagelArgs", "BagelPipeline", "VitArgs"]
