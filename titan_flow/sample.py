"""Prompts -> PNGs, from a pretrained pipeline directory or from a training run's checkpoint.

    python -m titan_flow.sample --pretrained_path /models/sd3.5-medium --prompt "a red cube" --out samples/
    python -m titan_flow.sample --run outputs/debug [--step 20] [--raw] --prompt_file prompts.txt --out samples/

With --run, the run's config.json rebuilds the same model and pipeline, and the weights come from
its newest complete DCP checkpoint (EMA weights when the run kept an EMA, unless --raw); the sampler
defaults to the run's eval settings. With --pretrained_path it defaults to the family's published
pipeline (for SD3: the directory's native resolution, 28 steps, CFG 7.0, 256 T5 tokens), so the PNGs
are the ones diffusers' pipeline makes from the same seed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from titan_flow.checkpoint.manager import load_model_weights
from titan_flow.config import build_job_config
from titan_flow.distributed.utils import destroy_distributed, init_distributed
from titan_flow.export import run_config
from titan_flow.metrics import image_grid
from titan_flow.rewards.registry import to_uint8
from titan_flow.rl.rollout import generate_images, step_noise_levels
from titan_flow.train import build_model, build_policy


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m titan_flow.sample", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained_path", help="local diffusers pipeline directory")
    src.add_argument("--run", help="a training run directory (outputs/<run_name>) with checkpoints")
    p.add_argument("--model", default="sd3", help="model family for --pretrained_path (default sd3)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step with --run (default: newest complete)")
    p.add_argument("--raw", action="store_true", help="with --run: use the raw trained weights, not the EMA")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt_file", help="text file, one prompt per line")
    p.add_argument("--out", default="samples", help="output folder for the PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="denoising steps (default: the run's eval steps, or the pipeline's)")
    p.add_argument("--guidance", type=float, help="CFG scale, <= 1 disables CFG (default: the run's eval, or the pipeline's)")
    p.add_argument("--noise_level", type=float, default=0.0, help="SDE noise level (0 = deterministic ODE)")
    p.add_argument("--sde_type", default="sde", choices=["sde", "cps"])
    p.add_argument("--resolution", type=int, help="image size (default: the run's, or the pipeline's)")
    p.add_argument("--max_sequence_length", type=int, help="text tokens (default: the run's, or the pipeline's)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grid", help="also write every image in one PNG grid, each captioned with its prompt, to this file")
    p.add_argument("--grid_columns", type=int, default=6, help="images per row of --grid")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"--prompt_file: {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("no prompts: give --prompt TEXT (repeatable) or --prompt_file FILE")
    return prompts


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "prompt"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(args)
    if args.run:
        cfg = run_config(Path(args.run), args.device)
    else:
        cfg = build_job_config(["--model.name", args.model, "--model.pretrained_path", args.pretrained_path or "",
                                "--training.device", args.device])
    for value, section, key in ((args.resolution, cfg.model, "resolution"),
                                (args.max_sequence_length, cfg.model, "max_sequence_length"),
                                (args.steps, cfg.eval, "num_steps"), (args.guidance, cfg.eval, "guidance_scale")):
        if value is not None:
            setattr(section, key, value)
    dims = init_distributed(cfg)
    try:
        policy = build_policy(cfg, dims.device)
        if args.run:
            model = build_model(cfg, dims, trainable=True, load_weights=False)
            use_ema = cfg.training.ema and not args.raw
            step = load_model_weights(model, Path(args.run) / cfg.checkpoint.folder, args.step, use_ema=use_ema)
            print(f"loaded {args.run} step {step} ({'EMA' if use_ema else 'raw'} weights)")
        else:
            model = build_model(cfg, dims, trainable=False)
        model.eval()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator(device=dims.device).manual_seed(args.seed)
        steps = cfg.eval.num_steps
        sigmas = policy.sigmas(steps)
        levels = step_noise_levels(steps, args.noise_level, None)
        every = []
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            images = generate_images(policy, model, batch, generator, sigmas, levels, args.sde_type, cfg.eval.guidance_scale,
                                     generator)
            every.append(images.cpu())
            for i, (prompt, img) in enumerate(zip(batch, to_uint8(images))):
                path = out / f"{start + i:04d}_{slug(prompt)}.png"
                Image.fromarray(img).save(path)
                print(path)
        if args.grid:
            Image.fromarray(image_grid(torch.cat(every), prompts, cols=args.grid_columns)).save(args.grid)
            print(args.grid)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
