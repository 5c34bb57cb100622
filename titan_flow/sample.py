"""Prompts -> PNGs (images) or videos, from a pretrained pipeline directory or a training run's checkpoint.

    python -m titan_flow.sample --pretrained_path /models/sd3.5-medium --prompt "a red cube" --out samples/
    python -m titan_flow.sample --run outputs/debug [--step 20] [--raw] --prompt_file prompts.txt --out samples/
    python -m titan_flow.sample --model flux --pretrained_path /models/FLUX.1-Kontext-dev --image cat.png \
        --prompt "Change the number of cats in the image to two." --out samples/
    python -m titan_flow.sample --model wan --pretrained_path /models/Wan2.1-T2V-1.3B-Diffusers \
        --prompt 'a neon sign that says "titan"' --resolution 240 --width 416 --num_frames 33 --reward video_ocr

Videos are written as .mp4 when opencv-python is installed (it comes with the `ocr` extra), else as
animated .gif (PIL); `--video_format` forces one. `samples.jsonl` in the output folder lists every
file with its prompt and, with `--reward`, its rewards; `--grid FILE` also writes the images in one
captioned PNG grid (e.g. a before/after picture of two checkpoints from the same seed).

With --run, the run's config.json rebuilds the same model and pipeline, and the weights come from
its newest complete DCP checkpoint (EMA weights when the run kept an EMA, unless --raw); the sampler
defaults to the run's eval settings. With --pretrained_path it defaults to the family's published
pipeline (for SD3: the directory's native resolution, 28 steps, CFG 7.0, 256 T5 tokens), so the PNGs
are the ones diffusers' pipeline makes from the same seed. Edit models (FLUX.1-Kontext) take `--image`, one
source image for every prompt or one per prompt, and also write each result beside its source
(`*_source_edited.png`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from titan_flow.checkpoint.manager import load_model_weights
from titan_flow.config import build_job_config
from titan_flow.data.prompts import load_image
from titan_flow.distributed.utils import destroy_distributed, init_distributed
from titan_flow.export import run_config
from titan_flow.metrics import VIDEO_FORMATS, image_grid, write_video
from titan_flow.models import get_model_spec
from titan_flow.rewards import MultiReward
from titan_flow.rewards.registry import to_uint8
from titan_flow.rl.metrics import beside_sources, first_images
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
    p.add_argument("--sde_type", default="sde", choices=["sde", "cps", "wan"])
    p.add_argument("--resolution", type=int, help="image size, a video's height (default: the run's, or the pipeline's)")
    p.add_argument("--width", type=int, help="video width (default: the run's, or the pipeline's)")
    p.add_argument("--num_frames", type=int, help="video frames (default: the run's, or the pipeline's)")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second of the written videos (Wan: 16)")
    p.add_argument("--video_format", default="auto", choices=VIDEO_FORMATS,
                   help="auto = mp4 when opencv-python is installed, else gif")
    p.add_argument("--reward", default="",
                   help="comma-separated rewards to score the samples with (e.g. video_ocr), written to samples.jsonl; "
                        "model paths, options and server URLs come from the run's [reward] section")
    p.add_argument("--max_sequence_length", type=int, help="text tokens (default: the run's, or the pipeline's)")
    p.add_argument("--image", action="append", default=[],
                   help="edit models: a source image, for every prompt or (repeated) one per prompt")
    p.add_argument("--condition_size", choices=["resolution", "native", "preferred"],
                   help="edit models: how the source is resized (model.condition_size; default: the run's, or with "
                   "--pretrained_path the pipeline's own: preferred)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grid", help="images: also write them all in one PNG grid, each captioned with its prompt "
                   "(edits: beside their sources), to this file")
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


def read_images(args, n_prompts: int) -> list | None:
    """The source images of an edit, one per prompt (float (3, H, W) in [0, 1], as the data loader reads them)."""
    if not args.image:
        return None
    if len(args.image) not in (1, n_prompts):
        raise SystemExit(f"--image: give one source image for all {n_prompts} prompts or one per prompt, "
                         f"got {len(args.image)}")
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"--image: {missing[0]} does not exist")
    images = [load_image(Path(p)) for p in args.image]
    return images * n_prompts if len(images) == 1 else images


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "prompt"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(args)
    sources = read_images(args, len(prompts))
    if args.run:
        cfg = run_config(Path(args.run), args.device)
    else:
        cfg = build_job_config(["--model.name", args.model, "--model.pretrained_path", args.pretrained_path or "",
                                "--training.device", args.device])
    if args.resolution is not None and args.width is None and not get_model_spec(cfg.model.name).video:
        args.width = args.resolution  # image families are square
    for value, section, key in ((args.resolution, cfg.model, "resolution"), (args.width, cfg.model, "width"),
                                (args.num_frames, cfg.model, "num_frames"),
                                (args.max_sequence_length, cfg.model, "max_sequence_length"),
                                (args.steps, cfg.eval, "num_steps"), (args.guidance, cfg.eval, "guidance_scale"),
                                (args.condition_size or (None if args.run else "preferred"), cfg.model,
                                 "condition_size")):
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
        r = cfg.reward
        names = [n.strip() for n in args.reward.split(",") if n.strip()]
        reward_fn = MultiReward({n: 1.0 for n in names}, r.model_paths, r.device or dims.device, urls=r.urls,
                                options=r.options) if names else None
        manifest, shown = [], []
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            batch_sources = sources[start : start + args.batch_size] if sources is not None else None
            images = generate_images(policy, model, batch, generator, sigmas, levels, args.sde_type, cfg.eval.guidance_scale,
                                     generator, images=batch_sources)
            rewards = reward_fn(images, batch, only_strict=False) if reward_fn else {}
            pairs = to_uint8(beside_sources(batch_sources, images)) if batch_sources is not None else [None] * len(batch)
            if args.grid:
                if images.ndim != 4:
                    raise SystemExit(f"sample: --grid {args.grid} is for images, but the model made videos of shape "
                                     f"{tuple(images.shape)}; drop --grid (the videos are written one per prompt)")
                shown.append(beside_sources(batch_sources, images).float().cpu())
            for i, (prompt, pixels, pair) in enumerate(zip(batch, to_uint8(images), pairs)):
                path = out / f"{start + i:04d}_{slug(prompt)}"
                if pixels.ndim == 4:  # a video: (F, H, W, 3)
                    path = write_video(path, pixels, args.fps, args.video_format)
                else:
                    path = path.with_suffix(".png")
                    Image.fromarray(pixels).save(path)
                entry = {"file": path.name, "prompt": prompt, "seed": args.seed}
                if pair is not None:  # source | edited
                    pair_path = path.with_name(path.stem + "_source_edited.png")
                    Image.fromarray(pair).save(pair_path)
                    entry["source_edited"] = pair_path.name
                scores = {k: v[i].item() for k, v in rewards.items() if k != "avg"}
                manifest.append({**entry, "reward": scores})
                print(path, *(f"{k} {v:.4f}" for k, v in scores.items()))
        if args.grid:
            Image.fromarray(image_grid(first_images(shown, len(prompts)), prompts, cols=args.grid_columns, gap=4)).save(args.grid)
            print(args.grid)
        if reward_fn is not None:
            reward_fn.close()
        with (out / "samples.jsonl").open("w") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in manifest)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
