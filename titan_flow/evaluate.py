"""Score a model on a whole prompt set: the trainer's evaluation as a command of its own.

    python -m titan_flow.evaluate --run outputs/<run> [--step N] [--raw] --out eval/
    python -m titan_flow.evaluate --pretrained_path titan_flow/assets/shapes/model --data.path DIR \\
        --reward.fns shapes_geneval=1 --out eval/
    torchrun --nproc-per-node 8 -m titan_flow.evaluate --pretrained_path /models/sd3.5-medium \\
        --data.path dataset/geneval --reward.fns geneval=1 --eval.num_steps 40 --out eval/

Every rank samples its share of `data.test_split` with the ODE (no SDE noise), from the run's
newest complete checkpoint (its EMA weights when it kept an EMA, unless --raw) or from a pretrained
directory, and the rewards score them exactly as the trainer's eval does (rl/evaluate.py: the same
per-prompt seeds, so a run's checkpoint scores what the run logged at that step). Any job-config
field can be overridden as `--section.key value` (the prompt set, the rewards and their servers,
`eval.num_steps`, `eval.guidance_scale`, `eval.max_prompts`, `eval.batch_size`, `job.seed`).

Rank 0 writes to --out: `results.json` (every eval scalar, with what was evaluated),
`results.md` (the per-task table for GenEval-style rewards, then every reward's mean) and
`grid.png` (the first --grid images with their prompts and rewards).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from titan_flow.checkpoint.manager import CheckpointError, load_model_weights
from titan_flow.config import build_job_config
from titan_flow.distributed.utils import destroy_distributed, init_distributed
from titan_flow.export import run_config
from titan_flow.metrics import image_grid
from titan_flow.rewards import MultiReward
from titan_flow.rl.evaluate import evaluate
from titan_flow.train import build_dataset, build_model, build_policy


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m titan_flow.evaluate", description=__doc__.split("\n\n")[0],
                                epilog="Other options are job-config overrides: --section.key value")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a training run directory (outputs/<run_name>) with checkpoints")
    src.add_argument("--pretrained_path", help="a pretrained model directory of the family")
    p.add_argument("--model", default="sd3", help="model family for --pretrained_path (default sd3)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step with --run (default: newest complete)")
    p.add_argument("--raw", action="store_true", help="with --run: the raw trained weights, not the EMA")
    p.add_argument("--out", default="eval", help="folder for results.json, results.md and grid.png")
    p.add_argument("--grid", type=int, default=16, help="images in grid.png (0: no grid)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_known_args(argv)


def markdown_table(scalars: dict[str, float]) -> str:
    """The GenEval-style per-task table (strict, and standard when computed), then the reward means."""
    lines = []
    tasks = [k[len("eval/geneval/"):-len("_strict")] for k in scalars
             if k.startswith("eval/geneval/") and k.endswith("_strict")]
    if tasks:
        has_standard = all(f"eval/geneval/{t}" in scalars for t in tasks)
        lines += ["| task | strict accuracy |" + (" accuracy |" if has_standard else ""),
                  "|---|---|" + ("---|" if has_standard else "")]
        for t in tasks:
            row = f"| {t} | {scalars[f'eval/geneval/{t}_strict']:.3f} |"
            lines.append(row + (f" {scalars[f'eval/geneval/{t}']:.3f} |" if has_standard else ""))
        lines.append("")
    lines += ["| reward | mean |", "|---|---|"]
    for key, value in scalars.items():
        name = key[len("eval/reward_"):]
        if key.startswith("eval/reward_") and not any(name.startswith(f"{t}_") for t in tasks):  # in the table
            lines.append(f"| {name} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.run:
        cfg = run_config(Path(args.run), args.device, overrides)
    else:
        cfg = build_job_config(["--model.name", args.model, "--model.pretrained_path", args.pretrained_path,
                                "--training.device", args.device, *overrides])
    cfg.metrics.num_log_images = max(args.grid, 1)
    dims = init_distributed(cfg)
    r = cfg.reward
    reward_fn = MultiReward(
        r.fns, r.model_paths, r.device or dims.device, urls=r.urls, timeout_seconds=r.timeout_seconds,
        max_retries=r.max_retries, retry_backoff_seconds=r.retry_backoff_seconds, options=r.options,
    )
    try:
        policy = build_policy(cfg, dims.device)
        source: dict = {"pretrained_path": args.pretrained_path}
        if args.run:
            model = build_model(cfg, dims, trainable=True, load_weights=False)
            use_ema = cfg.training.ema and not args.raw
            try:
                step = load_model_weights(model, Path(args.run) / cfg.checkpoint.folder, args.step, use_ema=use_ema)
            except CheckpointError as e:
                raise SystemExit(f"evaluate: {e}") from None
            source = {"run": args.run, "step": step, "weights": "EMA" if use_ema else "raw"}
        else:
            model = build_model(cfg, dims, trainable=False)
        dataset = build_dataset(cfg, cfg.data.test_split)
        scalars, images, captions = evaluate(cfg, dims, policy, model, None, reward_fn, dataset)
        if dims.is_main:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            setting = {"data.path": cfg.data.path, "split": cfg.data.test_split, "reward.fns": cfg.reward.fns,
                       "eval.num_steps": cfg.eval.num_steps, "eval.guidance_scale": cfg.eval.guidance_scale,
                       "job.seed": cfg.job.seed, "world_size": dims.world_size}
            (out / "results.json").write_text(json.dumps({**source, **setting, "scalars": scalars}, indent=2) + "\n")
            what = f"{args.run} step {source['step']} ({source['weights']})" if args.run else args.pretrained_path
            table = markdown_table(scalars)
            (out / "results.md").write_text(
                f"{what}: {int(scalars['eval/num_prompts'])} prompts of {cfg.data.path or 'the built-in prompts'} "
                f"({cfg.data.test_split}), {cfg.eval.num_steps} ODE steps, CFG {cfg.eval.guidance_scale}\n\n{table}"
            )
            if args.grid > 0:
                Image.fromarray(image_grid(images, captions, gap=4)).save(out / "grid.png")
            print(table, end="")
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'grid.png'}" if args.grid else ""))
    finally:
        reward_fn.close()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
