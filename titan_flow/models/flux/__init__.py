"""FLUX.1-dev / FLUX.1-Kontext-dev family: double/single-stream transformer, checkpoint adapter (diffusers and
BFL single files), Policy pipeline (text-to-image and Kontext editing) and parallelism plan."""

from pathlib import Path

from titan_flow.models.flux.args import FLAVORS, FluxArgs
from titan_flow.models.flux.model import FluxTransformer
from titan_flow.models.flux.parallelize import parallelize_flux
from titan_flow.models.flux.pipeline import FluxPipeline, pretrained_defaults
from titan_flow.models.flux.state_dict_adapter import (
    from_diffusers,
    from_pretrained,
    load_checkpoint,
    save_diffusers,
    to_diffusers,
)
from titan_flow.models.registry import ModelSpec

SPEC = ModelSpec(
    name="flux",
    flavors=FLAVORS,
    model_cls=FluxTransformer,
    from_pretrained_fn=from_pretrained,
    to_diffusers=to_diffusers,
    from_diffusers=from_diffusers,
    pipeline_cls=FluxPipeline,
    parallelize=parallelize_flux,
    pretrained_defaults=pretrained_defaults,
    pipeline_options=lambda cfg: dict(flavor=cfg.model.flavor, condition_size=cfg.model.condition_size),
    load_checkpoint_fn=load_checkpoint,
    export_fn=lambda sd, args, out, max_shard_size: save_diffusers(sd, args, Path(out) / "transformer", max_shard_size),
)

__all__ = ["FLAVORS", "SPEC", "FluxArgs", "FluxPipeline", "FluxTransformer"]
