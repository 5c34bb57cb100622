"""Every SD3 recipe in train_configs/ loads, validates, carries the reference's hyper-parameters
(flow_grpo_algorithm.md sections 5-8), and runs one epoch when shrunk onto the tiny debug SD3."""

import json
from pathlib import Path

import pytest
import torch

from titan_flow.config import build_job_config
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora
from titan_flow.rewards import reward_names
from titan_flow.train import main

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

# What each recipe must say: the reference config's values (config/grpo.py, grpo_guard.py, dpo.py,
# sft.py at upstream 9745241) and the GPU count its batches per epoch were computed for.
GRPO = dict(algorithm="grpo", num_steps=10, eval_steps=40, guidance=4.5, eval_guidance=4.5, train_cfg=True,
            noise=0.7, sde_type="sde", G=24, B=9, n_b=4, ga=2, gpus=32, groups=48, window=(0, [0, 10]),
            branch=False, clip=1e-4, fraction=0.99, global_std=True, lr=3e-4, freq=60, same_latent=False,
            ratio_norm=False)
FAST_NOCFG = dict(GRPO, guidance=1.0, eval_guidance=1.0, train_cfg=False, noise=0.8, sde_type="cps",
                  window=(3, [0, 5]), clip=1e-5, beta=0.0, fraction=1.0)
GUARD = dict(GRPO, n_b=8, ga=4, gpus=16, clip=2e-6, lr=1e-4, beta=0.0, global_std=False, freq=30, ratio_norm=True)
PREFERENCE = dict(GRPO, num_steps=40, B=24, n_b=1, ga=1, gpus=1, groups=1, freq=60)
EXPECTED = {
    "sd3_geneval": dict(GRPO, beta=0.04, rewards={"geneval": 1.0}, data="geneval", test_bs=14),
    "sd3_ocr": dict(GRPO, beta=0.04, rewards={"ocr": 1.0}, data="ocr", test_bs=16),
    "sd3_pickscore": dict(GRPO, beta=0.01, rewards={"pickscore": 1.0}, data="pickscore", test_bs=16),
    "sd3_pickscore_sfw": dict(GRPO, beta=0.01, rewards={"pickscore": 1.0}, data="pickscore_sfw", test_bs=16),
    "sd3_clipscore": dict(GRPO, beta=0.02, rewards={"clipscore": 1.0}, data="pickscore", test_bs=16,
                          same_latent=True),
    "sd3_geneval_fast_nocfg": dict(FAST_NOCFG, rewards={"geneval": 1.0}, data="geneval", test_bs=14),
    "sd3_pickscore_fast_nocfg": dict(FAST_NOCFG, G=18, groups=64, rewards={"pickscore": 1.0}, data="pickscore",
                                     test_bs=16),
    "sd3_pickscore_fast": dict(GRPO, noise=0.8, window=(2, [0, 7]), branch=True, clip=1e-5, beta=0.0,
                               rewards={"pickscore": 1.0}, data="pickscore", test_bs=16),
    "sd3_ocr_guard": dict(GUARD, rewards={"ocr": 1.0, "pickscore": 0.0}, data="ocr", test_bs=16),
    "sd3_pickscore_guard": dict(GUARD, clip=4e-6, rewards={"pickscore": 1.0}, data="pickscore", test_bs=16),
    "sd3_geneval_guard": dict(GUARD, rewards={"geneval": 1.0, "pickscore": 0.0}, data="geneval", test_bs=14),
    "sd3_geneval_dpo": dict(PREFERENCE, algorithm="dpo", beta=0.0, freq=40, rewards={"geneval": 1.0},
                            data="geneval", test_bs=14),
    "sd3_pickscore_dpo": dict(PREFERENCE, algorithm="dpo", beta=0.0, rewards={"pickscore": 1.0}, data="pickscore",
                              test_bs=16),
    "sd3_pickscore_online_dpo": dict(PREFERENCE, algorithm="online_dpo", beta=0.0, rewards={"pickscore": 1.0},
                                     data="pickscore", test_bs=16),
    "sd3_geneval_sft": dict(PREFERENCE, algorithm="sft", beta=100.0, freq=40, rewards={"geneval": 1.0},
                            data="geneval", test_bs=14),
    "sd3_pickscore_sft": dict(PREFERENCE, algorithm="sft", beta=100.0, rewards={"pickscore": 1.0},
                              data="pickscore", test_bs=16),
    "sd3_pickscore_online_sft": dict(PREFERENCE, algorithm="online_sft", beta=100.0, rewards={"pickscore": 1.0},
                                     data="pickscore", test_bs=16),
}


def load(name):
    return build_job_config(["--job.config_file", str(CONFIGS / f"{name}.toml")])


def test_every_sd3_recipe_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("sd3_*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_has_the_reference_hyper_parameters(name):
    e, cfg = EXPECTED[name], load(name)
    s, rl = cfg.sampling, cfg.rl
    assert cfg.job.run_name == name and cfg.model.name == "sd3" and cfg.model.resolution == 512
    assert cfg.model.max_sequence_length == 128 and cfg.model.compute_dtype == "float16"
    assert (s.num_steps, cfg.eval.num_steps) == (e["num_steps"], e["eval_steps"])
    assert (s.guidance_scale, cfg.eval.guidance_scale, rl.train_cfg) == (e["guidance"], e["eval_guidance"],
                                                                          e["train_cfg"])
    assert (s.noise_level, s.sde_type, s.same_latent) == (e["noise"], e["sde_type"], e["same_latent"])
    assert (s.num_image_per_prompt, s.batch_size, s.num_batches_per_epoch) == (e["G"], e["B"], e["n_b"])
    assert cfg.training.gradient_accumulation_steps == e["ga"]
    assert e["gpus"] * s.batch_size * s.num_batches_per_epoch // s.num_image_per_prompt == e["groups"]
    assert (s.sde_window_size, s.sde_window_range, s.branch_prefix) == (*e["window"], e["branch"])
    assert rl.algorithm == e["algorithm"] and rl.beta == e["beta"]
    assert (rl.timestep_fraction, rl.global_std, rl.adv_clip_max) == (e["fraction"], e["global_std"], 5.0)
    assert (rl.ratio_norm, rl.grad_reweight, rl.ratio_norm_batch_bias) == (e["ratio_norm"], e["ratio_norm"], False)
    if rl.algorithm == "grpo":
        assert rl.clip_range == e["clip"]
        assert cfg.training.gradient_accumulation_steps * 2 == s.num_batches_per_epoch  # two updates an epoch
    if rl.algorithm.endswith("dpo"):
        assert rl.dpo_beta == 100.0
    if rl.algorithm.startswith("online_"):
        assert rl.ref_update_interval == 40
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.max_grad_norm, o.beta1, o.beta2, o.eps) == (e["lr"], 1e-4, 1.0, 0.9, 0.999, 1e-8)
    assert cfg.training.ema and (cfg.training.ema_max_decay, cfg.training.ema_update_interval) == (0.9, 8)
    assert (cfg.checkpoint.interval, cfg.eval.freq, cfg.eval.batch_size) == (e["freq"], e["freq"], e["test_bs"])
    assert cfg.reward.fns == e["rewards"] and set(cfg.reward.fns) <= set(reward_names())
    assert cfg.data.path == f"dataset/{e['data']}"
    assert cfg.data.format == ("geneval" if e["data"] == "geneval" else "text")
    lora = cfg.lora
    assert (lora.enable, lora.rank, lora.alpha, lora.target_modules) == (True, 32, 64.0, SD3_TARGETS)


def test_sd3_lora_targets_resolve_on_the_backbone():
    torch.manual_seed(0)
    model = get_model_spec("sd3").build("debug")
    wrapped = apply_lora(model, 32, 64.0, load("sd3_geneval").lora.target_modules)
    assert {name.split("attn.")[1] for name in wrapped} == set(t.split("attn.")[1] for t in SD3_TARGETS)


SHRINK = [
    "--model.pretrained_path", "", "--model.flavor", "debug", "--model.resolution", "64",
    "--model.max_sequence_length", "16", "--model.compute_dtype", "float32", "--model.encoder_dtype", "float32",
    "--sampling.num_steps", "10", "--sampling.num_image_per_prompt", "4", "--sampling.batch_size", "4",
    "--sampling.num_batches_per_epoch", "2", "--training.gradient_accumulation_steps", "2",
    "--lora.rank", "4", "--lora.alpha", "8", "--training.steps", "1",
    "--reward.fns", "jpeg_compressibility=1.0", "--data.path", "", "--data.format", "auto",
    "--eval.freq", "0", "--checkpoint.enable", "false", "--metrics.image_log_freq", "0",
    "--metrics.enable_tensorboard", "false",
]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs_one_epoch_shrunk_to_the_tiny_model(tmp_path, name):
    """Everything but the sizes, the reward and the data stays as the recipe says (algorithm, sampler,
    window, CFG, LoRA, Guard, KL, clip range)."""
    assert main(["--job.config_file", str(CONFIGS / f"{name}.toml"), *SHRINK,
                 "--job.output_dir", str(tmp_path)]) == 0
    (epoch,) = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert epoch["step"] == 0 and epoch["optim/global_step"] == 1
    losses = {k: v for k, v in epoch.items() if k.startswith("loss/")}
    assert losses and all(abs(v) < 1e6 for v in losses.values()), losses
