"""Qwen-Image / Qwen-Image-Edit family: MMDiT backbone with MSRoPE, diffusers-format adapter, Policy
pipeline (Qwen2.5-VL conditioning, true CFG, editing) and parallelism plan."""

from pathlib import Path

from titan_flow.models.qwen_image.args import FLAVORS, QwenImageArgs
from titan_flow.models.qwen_image.model import QwenImageTransformer
from titan_flow.models.qwen_image.parallelize import parallelize_qwen_image
from titan_flow.models.qwen_image.pipeline import QwenImagePipeline, pretrained_defaults
from titan_flow.models.qwen_image.state_dict_adapter import (
    from_diffusers,
    from_pretrained,
    load_checkpoint,
    save_diffusers,
    to_diffusers,
)
from titan_flow.models.registry import ModelSpec

SPEC = ModelSpec(
    name="qwen_image",
    flavors=FLAVORS,
    model_cls=QwenImageTransformer,
    from_pretrained_fn=from_pretrained,
    to_diffusers=to_diffusers,
    from_diffusers=from_diffusers,
    pipeline_cls=QwenImagePipeline,
    parallelize=parallelize_qwen_image,
    pretrained_defaults=pretrained_defaults,
    pipeline_options=lambda cfg: dict(condition_size=cfg.model.condition_size),
    load_checkpoint_fn=load_checkpoint,
    export_fn=lambda sd, args, out, max_shard_size: save_diffusers(sd, args, Path(out) / "transformer", max_shard_size),
)

__all__ = ["FLAVORS", "SPEC", "QwenImageArgs", "QwenImagePipeline", "QwenImageTransformer"]
