"""The algorithm table on the shapes world: accuracy gained per wall-clock minute, same weights, same budget.

    python -m titan_flow.bench.shapes [--epochs 60] [--nproc 2] [--algorithms grpo,fast,cps,guard,awm,dpo,online_sft]
                                      [--out outputs/bench_shapes] [--section.key value ...]

Every algorithm starts from the shipped shapes model and runs the shapes GRPO recipe
(train_configs/shapes_grpo.toml, or --config: its model, prompts, reward, rollout batch and eval set;
run from the repository root) for the same number of epochs, i.e. the same number of sampled images,
with only its own settings changed (below). Each run evaluates the shipped model before its first
epoch (the same weights and seeds for every run, so the same figure) and its EMA weights after the
last (ODE, the held-out eval set), and the table gives the overall strict accuracy before and after, the
gain, the training wall time (the trainer's per-epoch step times: rollout, rewards and updates,
without start-up and eval) and the gain per minute of it. Extra `--section.key value` options apply
to every run (e.g. `--training.steps` is set by --epochs; `--optimizer.lr 1e-4`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> (what it is, the overrides of the default job that make it)
ALGORITHMS = {
    "grpo": ("Flow-GRPO (SDE on every step)", []),
    "fast": ("Flow-GRPO-Fast (SDE window of 2 in the first 5 steps)",
             ["--sampling.sde_window_size", "2", "--sampling.sde_window_range", "0,5"]),
    "cps": ("Flow-CPS sampling", ["--sampling.sde_type", "cps"]),
    "guard": ("GRPO-Guard (RatioNorm + gradient reweighting)", ["--rl.ratio_norm", "true", "--rl.grad_reweight", "true"]),
    "awm": ("AWM: GRPO's advantages on the flow-matching loss at noise levels >= 0.6 (independent initial noise)",
            ["--rl.algorithm", "awm", "--rl.fm_sigma_min", "0.6", "--sampling.same_latent", "false"]),
    "dpo": ("Flow-DPO (rollouts of the initial model)", ["--rl.algorithm", "dpo"]),
    "online_dpo": ("Online Flow-DPO", ["--rl.algorithm", "online_dpo"]),
    "sft": ("Flow-SFT on each group's best (rollouts of the initial model)", ["--rl.algorithm", "sft"]),
    "online_sft": ("Online Flow-SFT on each group's best", ["--rl.algorithm", "online_sft"]),
}
DEFAULT = "grpo,fast,cps,guard,awm,dpo,online_sft"
STRICT = "eval/geneval/overall_strict"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.shapes", description=__doc__.split("\n\n")[0],
                                epilog="Other options are job-config overrides applied to every run: --section.key value")
    p.add_argument("--epochs", type=int, default=60, help="epochs per algorithm (the same sampled images for all)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun --nproc-per-node)")
    p.add_argument("--algorithms", default=DEFAULT, help=f"comma-separated, from {', '.join(ALGORITHMS)}")
    p.add_argument("--out", default="outputs/bench_shapes", help="folder for the runs, table.md and results.json")
    p.add_argument("--config", default="train_configs/shapes_grpo.toml", help="the job every algorithm varies")
    args, overrides = p.parse_known_args(argv)
    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ALGORITHMS]
    if unknown or not names:
        p.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    if args.epochs < 1 or args.nproc < 1:
        p.error(f"--epochs and --nproc must be >= 1, got {args.epochs} and {args.nproc}")
    return args, names, overrides


def train(out: Path, name: str, config: str, nproc: int, epochs: int, extra: list[str]) -> list[dict]:
    """One run of the job under torchrun; its metrics.jsonl records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "titan_flow.train", "--job.config_file", config, "--job.output_dir", str(out), "--job.run_name", name,
           "--training.steps", str(epochs), "--eval.freq", str(epochs), "--eval.at_end", "true",
           "--checkpoint.enable", "false", "--metrics.image_log_freq", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = out / f"{name}.log"
    out.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench: the {name} run failed (exit {proc.returncode}); its log: {log}")
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def evals(metrics: list[dict]) -> tuple[dict, dict]:
    """(the eval before the first epoch, the eval after the last)."""
    found = [m for m in metrics if STRICT in m]
    return found[0], found[-1]


def table(rows: list[dict], base: float, epochs: int, nproc: int) -> str:
    lines = [f"Overall strict accuracy on the held-out eval set, base model {base:.3f}; {epochs} epochs each, "
             f"{nproc} processes.", "",
             "| algorithm | strict after | gain (points) | train minutes | points per minute |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']}: {r['what']} | {r['after']:.3f} | {100 * r['gain']:+.1f} | {r['minutes']:.1f} "
                     f"| {100 * r['gain'] / r['minutes']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, names, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    rows, base = [], None
    for name in names:
        what, settings = ALGORITHMS[name]
        metrics = train(out, name, args.config, args.nproc, args.epochs, [*overrides, *settings])
        before, after = evals(metrics)
        if base is None:
            base = before
            print(f"[bench] base model: overall strict {base[STRICT]:.3f}", flush=True)
        elif before[STRICT] != base[STRICT]:
            raise SystemExit(f"bench: the {name} run's base eval {before[STRICT]} differs from the first run's "
                             f"{base[STRICT]}: the runs do not start from the same weights and eval")
        minutes = sum(m["perf/step_s"] for m in metrics if "perf/step_s" in m) / 60
        row = {"name": name, "what": what, "settings": settings, "before": base[STRICT], "after": after[STRICT],
               "gain": after[STRICT] - base[STRICT], "minutes": minutes,
               "per_task_after": {k: v for k, v in after.items() if k.startswith("eval/geneval/")}}
        rows.append(row)
        print(f"[bench] {name}: strict {row['before']:.3f} -> {row['after']:.3f} in {minutes:.1f} train minutes",
              flush=True)
    text = table(rows, base[STRICT], args.epochs, args.nproc)
    (out / "table.md").write_text(text)
    per_task_base = {k: v for k, v in base.items() if k.startswith("eval/geneval/")}
    (out / "results.json").write_text(json.dumps({"epochs": args.epochs, "nproc": args.nproc, "overrides": overrides,
                                                  "base": per_task_base, "runs": rows}, indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
