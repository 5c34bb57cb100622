"""A training run's DCP checkpoint -> the family's published format (diffusers `transformer/` + safetensors).

    python -m titan_flow.export --run outputs/<run> --out exported/ [--step 20] [--raw] [--dtype bfloat16]
    torchrun --nproc-per-node 8 -m titan_flow.export --run outputs/<run> --out exported/   # big models

The run's config.json rebuilds the model exactly as training built it (LoRA adapters included);
the checkpoint (from any world size) fills it with the EMA weights when the run kept an EMA, else
(or with --raw) the trained weights; LoRA adapters are merged into their base weights. The full
state dict is gathered on rank 0 and written with the family's own writer: for SD3, a directory
that `diffusers.SD3Transformer2DModel.from_pretrained(out / "transformer")` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from titan_flow.checkpoint.manager import CheckpointError, load_model_weights
from titan_flow.config.manager import job_config_from_dict
from titan_flow.distributed.parallelize import DTYPES
from titan_flow.distributed.utils import destroy_distributed, init_distributed
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import has_lora, merge_lora_state_dict
from titan_flow.train import build_model


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m titan_flow.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a training run directory (outputs/<run_name>) with checkpoints")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--raw", action="store_true", help="export the trained weights, not the EMA")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: model.dtype)")
    p.add_argument("--max_shard_size", default="10GB", help="split the safetensors above this size (e.g. 5GB)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the shards live while gathering")
    return p.parse_args(argv)


def run_config(run: Path, device: str = "cpu", overrides: list[str] = ()):
    """The run's config.json (with `--section.key value` overrides), set up to rebuild its model."""
    config_file = run / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"--run: {config_file} does not exist; is {run} a titan_flow run directory?")
    cfg = job_config_from_dict(json.loads(config_file.read_text()), overrides)
    # The model's structure is all that matters here: no compile, no offload, one flat shard mesh.
    cfg.training.device = device
    cfg.compile.enable = False
    cfg.parallelism.fsdp_cpu_offload = False
    cfg.parallelism.data_parallel_replicate_degree, cfg.parallelism.data_parallel_shard_degree = 1, -1
    return cfg


def export(run: Path, out: Path, step: int = -1, raw: bool = False, dtype: str | None = None,
           max_shard_size: str = "10GB", device: str = "cpu") -> Path | None:
    """Collective under torchrun; rank 0 writes and returns the written directory (other ranks: None)."""
    cfg = run_config(run, device)
    spec = get_model_spec(cfg.model.name)
    if spec.export_fn is None:
        raise SystemExit(f"the {spec.name} family has no export writer (ModelSpec.export_fn)")
    dims = init_distributed(cfg)
    try:
        model = build_model(cfg, dims, trainable=True, load_weights=False)
        use_ema = cfg.training.ema and not raw
        step = load_model_weights(model, run / cfg.checkpoint.folder, step, use_ema=use_ema)
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not dims.is_main:
            return None
        if has_lora(model):
            state_dict = merge_lora_state_dict(state_dict, cfg.lora.alpha / cfg.lora.rank)
        target = DTYPES[dtype or cfg.model.dtype]
        state_dict = {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}
        written = spec.export_fn(state_dict, model.args, out, max_shard_size)
        what = "raw" if not use_ema else "EMA"
        print(f"exported {run} step {step} ({what} weights{', LoRA merged' if has_lora(model) else ''}) to {written}")
        return written
    finally:
        destroy_distributed()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export(Path(args.run), Path(args.out), args.step, args.raw, args.dtype, args.max_shard_size, args.device)
    except CheckpointError as e:
        raise SystemExit(f"export: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
