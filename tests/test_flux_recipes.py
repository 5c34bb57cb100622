"""The FLUX recipes carry the reference's hyper-parameters (flow_grpo config/grpo.py: pickscore_flux,
geneval_flux_fast, pickscore_flux_fast, counting_flux_kontext; flow_grpo_algorithm.md section 8 and
edit_and_video.md section 2) and run one epoch when shrunk onto the tiny debug FLUX (Kontext: on the
built-in counting-edit set)."""

import json
from pathlib import Path

import pytest
import torch
from test_recipes import SHRINK

from titan_flow.config import ConfigError, build_job_config
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora
from titan_flow.rewards import reward_names
from titan_flow.train import main

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
T2I_TARGETS = [*ATTN, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
KONTEXT_TARGETS = [*T2I_TARGETS, "proj_mlp"]  # the Kontext script also adapts the single blocks' MLP input

GRPO = dict(num_steps=6, eval_steps=28, guidance=3.5, noise=0.9, sde_type="sde", G=24, B=3, n_b=12, ga=6, gpus=32,
            window=(0, None), clip=1e-4, fraction=0.99, global_std=True, targets=T2I_TARGETS)
FAST = dict(GRPO, noise=0.8, sde_type="cps", window=(3, [0, 3]), clip=1e-5, fraction=1.0)
EXPECTED = {
    "flux_pickscore": dict(GRPO, rewards={"pickscore": 1.0}, data="pickscore", fmt="text", test_bs=16),
    "flux_geneval": dict(GRPO, rewards={"geneval": 1.0}, data="geneval", fmt="geneval", test_bs=14),
    "flux_geneval_fast": dict(FAST, rewards={"geneval": 1.0}, data="geneval", fmt="geneval", test_bs=14),
    "flux_pickscore_fast": dict(FAST, global_std=False, rewards={"pickscore": 1.0}, data="pickscore", fmt="text",
                                test_bs=16),
    "flux_kontext_counting": dict(GRPO, guidance=2.5, G=21, gpus=28, targets=KONTEXT_TARGETS, data="counting_edit",
                                  fmt="geneval", rewards={"image_similarity": 0.5, "geneval": 0.5}, test_bs=2),
}
DEBUG_JOBS = ["flux_kontext_debug_cpu"]


def load(name, *overrides):
    return build_job_config(["--job.config_file", str(CONFIGS / f"{name}.toml"), *overrides])


def test_every_flux_recipe_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("flux_*.toml")) == sorted([*EXPECTED, *DEBUG_JOBS])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_has_the_reference_hyper_parameters(name):
    e, cfg = EXPECTED[name], load(name)
    s, rl, m = cfg.sampling, cfg.rl, cfg.model
    assert cfg.job.run_name == name and m.name == "flux" and (m.resolution, m.max_sequence_length) == (512, 128)
    assert (m.dtype, m.compute_dtype, m.encoder_dtype) == ("float32", "bfloat16", "bfloat16")  # bf16, never fp16
    kontext = "kontext" in name
    assert m.pretrained_path == ("models/FLUX.1-Kontext-dev" if kontext else "models/FLUX.1-dev")
    assert m.vae_dtype == ("bfloat16" if kontext else "float32")  # the reference's VAE precision per script
    assert m.condition_size == "resolution"  # Kontext: the source resized to 512 x 512, as the reference
    if kontext:
        assert (cfg.data.image_key, cfg.reward.model_paths) == ("image", {"image_similarity": "models/clip-vit-large-patch14"})
    assert (s.num_steps, cfg.eval.num_steps) == (e["num_steps"], e["eval_steps"])
    assert (s.guidance_scale, cfg.eval.guidance_scale, rl.train_cfg) == (e["guidance"], e["guidance"], True)
    assert (s.noise_level, s.sde_type, s.same_latent, s.negative_prompt) == (e["noise"], e["sde_type"], False, "")
    assert (s.num_image_per_prompt, s.batch_size, s.num_batches_per_epoch) == (e["G"], e["B"], e["n_b"])
    assert e["gpus"] * s.batch_size * s.num_batches_per_epoch // s.num_image_per_prompt == 48  # groups per epoch
    assert e["gpus"] * s.batch_size % s.num_image_per_prompt == 0  # whole groups every round
    assert cfg.training.gradient_accumulation_steps * 2 == s.num_batches_per_epoch == 2 * e["ga"]  # two updates
    assert s.sde_window_size == e["window"][0]
    if s.sde_window_size:
        assert s.sde_window_range == e["window"][1] and s.branch_prefix is False
    assert (rl.algorithm, rl.beta, rl.clip_range, rl.adv_clip_max) == ("grpo", 0.0, e["clip"], 5.0)
    assert (rl.timestep_fraction, rl.global_std) == (e["fraction"], e["global_std"])
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.max_grad_norm, o.beta1, o.beta2, o.eps) == (3e-4, 1e-4, 1.0, 0.9, 0.999, 1e-8)
    assert cfg.training.ema and (cfg.training.ema_max_decay, cfg.training.ema_update_interval) == (0.9, 8)
    assert (cfg.checkpoint.interval, cfg.eval.freq, cfg.eval.batch_size) == (30, 30, e["test_bs"])
    assert cfg.reward.fns == e["rewards"] and set(cfg.reward.fns) <= set(reward_names())
    assert (cfg.data.path, cfg.data.format) == (f"dataset/{e['data']}", e["fmt"])
    lora = cfg.lora
    assert (lora.enable, lora.rank, lora.alpha, lora.target_modules) == (True, 64, 128.0, e["targets"])


def test_lora_targets_resolve_on_the_backbone():
    torch.manual_seed(0)
    model = get_model_spec("flux").build("debug")
    wrapped = apply_lora(model, 4, 8.0, T2I_TARGETS)
    # attention of both block kinds (single blocks have q/k/v only) and both streams' MLPs of the double blocks
    assert {n.split(".", 2)[2] for n in wrapped if n.startswith("transformer_blocks.0.")} == set(T2I_TARGETS)
    assert {n.split(".", 2)[2] for n in wrapped if n.startswith("single_transformer_blocks.0.")} == {
        "attn.to_q", "attn.to_k", "attn.to_v"}


def test_fp16_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model.compute_dtype: FLUX overflows in float16"):
        main(["--model.name", "flux", "--model.compute_dtype", "float16", "--training.steps", "0",
              "--job.output_dir", str(tmp_path), "--checkpoint.enable", "false"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs_one_epoch_shrunk_to_the_tiny_model(tmp_path, name):
    """Everything but the sizes, the reward and the data stays as the recipe says (sampler, window, guidance,
    LoRA, clip range, bf16 compute on the CPU, Kontext's source images through the loader's workers)."""
    shrink = [*SHRINK, "--model.compute_dtype", "bfloat16", "--sampling.num_steps", "6",
              "--sampling.sde_window_range", "0,3"]
    if "kontext" in name:
        shrink += ["--model.flavor", "kontext-debug", "--data.path", "builtin:counting_edit"]
    assert main(["--job.config_file", str(CONFIGS / f"{name}.toml"), *shrink, "--job.output_dir", str(tmp_path)]) == 0
    (epoch,) = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert epoch["step"] == 0 and epoch["optim/global_step"] == 1
    losses = {k: v for k, v in epoch.items() if k.startswith("loss/")}
    assert losses and all(abs(v) < 1e6 for v in losses.values()), losses
