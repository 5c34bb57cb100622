"""SD3 / SD3.5 family: MMDiT backbone, checkpoint adapter, Policy pipeline and parallelism plan."""

from pathlib import Path

from titan_flow.models.registry import ModelSpec
from titan_flow.models.sd3.args import FLAVORS, SD3Args
from titan_flow.models.sd3.model import SD3Transformer
from titan_flow.models.sd3.parallelize import parallelize_sd3
from titan_flow.models.sd3.pipeline import SD3Pipeline, pretrained_defaults
from titan_flow.models.sd3.shapes import is_pixel_space, save_pretrained as save_shapes_pipeline
from titan_flow.models.sd3.state_dict_adapter import (
    from_diffusers,
    from_pretrained,
    load_checkpoint,
    save_diffusers,
    to_diffusers,
)

SPEC = ModelSpec(
    name="sd3",
    flavors=FLAVORS,
    model_cls=SD3Transformer,
    from_pretrained_fn=from_pretrained,
    to_diffusers=to_diffusers,
    from_diffusers=from_diffusers,
    pipeline_cls=SD3Pipeline,
    parallelize=parallelize_sd3,
    pretrained_defaults=pretrained_defaults,
    load_checkpoint_fn=load_checkpoint,
    pipeline_options=lambda cfg: {"flavor": cfg.model.flavor},
    export_fn=lambda sd, args, out, max_shard_size: (
        save_shapes_pipeline(out, sd, args, max_shard_size) if is_pixel_space(args)
        else save_diffusers(sd, args, Path(out) / "transformer", max_shard_size)
    ),
)

__all__ = ["FLAVORS", "SPEC", "SD3Args", "SD3Transformer"]
