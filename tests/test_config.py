from pathlib import Path

import pytest

from titan_flow.config import ConfigError, build_job_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "job.toml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_toml_cli(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\n[optimizer]\nlr = 1e-3\n")
    cfg = build_job_config(["--job.config_file", path, "--training.steps", "9"])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.optimizer.lr == 1e-3  # TOML beats default
    assert cfg.optimizer.weight_decay == 1e-4  # default
    assert cfg.job.config_file == path


def test_cli_forms(tmp_path):
    cfg = build_job_config(
        ["--sampling.same_latent", "--rl.beta=0.04", "--reward.fns", "pickscore=1.0,ocr=0",
         "--sampling.sde_window_range", "0,5"]
    )
    assert cfg.sampling.same_latent is True
    assert cfg.rl.beta == 0.04
    assert cfg.reward.fns == {"pickscore": 1.0, "ocr": 0}
    assert cfg.sampling.sde_window_range == [0, 5]
    cfg = build_job_config(["--reward.fns", '{"aesthetic": 0.5}'])
    assert cfg.reward.fns == {"aesthetic": 0.5}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training.stepz", "3"], "unknown config field training.stepz"),
        (["--trainig.steps", "3"], "unknown config section [trainig]"),
        (["--training.steps", "three"], "training.steps: expected an integer, got 'three'"),
        (["--sampling.sde_type", "ddim"], "sampling.sde_type: 'ddim' is not allowed; choose one of 'sde', 'cps'"),
        (["--sampling.same_latent", "maybe"], "sampling.same_latent: expected true or false"),
        (["--sampling.num_batches_per_epoch", "3", "--training.gradient_accumulation_steps", "2"],
         "must be a multiple of training.gradient_accumulation_steps"),
        (["--rl.timestep_fraction", "1.5"], "rl.timestep_fraction must be in (0, 1]"),
        (["--reward.fns", "pickscore"], "reward.fns: expected key=value pairs"),
        (["steps"], "unexpected argument 'steps'"),
    ],
)
def test_bad_values_name_the_field(argv, message):
    with pytest.raises(ConfigError) as err:
        build_job_config(argv)
    assert message in str(err.value)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_job_config(["--job.config_file", str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_job_config(["--job.config_file", write(tmp_path, "[training\n")])
    with pytest.raises(ConfigError, match="unknown config field model.nme"):
        build_job_config(["--job.config_file", write(tmp_path, "[model]\nnme = 'sd3'\n")])
    with pytest.raises(ConfigError, match="optimizer.lr: expected a number, got 'fast'"):
        build_job_config(["--job.config_file", write(tmp_path, "[optimizer]\nlr = 'fast'\n")])


@pytest.mark.parametrize("path", sorted((REPO / "train_configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = build_job_config(["--job.config_file", str(path)])
    assert cfg.job.run_name


def test_auto_fields_take_the_debug_values_for_a_random_flavor():
    cfg = build_job_config([])
    assert (cfg.model.resolution, cfg.model.max_sequence_length) == (64, 16)
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale) == (8, 4.5)
    assert (cfg.eval.num_steps, cfg.eval.guidance_scale, cfg.optimizer.lr) == (16, 4.5, 5e-3)


def test_auto_fields_take_the_pretrained_pipelines_defaults(tmp_path):
    """A recipe that leaves out the text length or resolution gets the published pipeline's, never the
    debug job's 16 tokens at 64 px; what the recipe sets wins, and "auto" can be written explicitly."""
    from titan_flow.models.sd3.pipeline import build_tiny_sd3_pipeline_dir

    pipe = build_tiny_sd3_pipeline_dir(tmp_path / "pipe")
    cfg = build_job_config(["--model.pretrained_path", str(pipe)])
    assert cfg.model.resolution == 16 * 8  # the tiny transformer's sample_size x the VAE's 8x
    assert cfg.model.max_sequence_length == 256
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale) == (28, 7.0)
    assert (cfg.eval.num_steps, cfg.eval.guidance_scale, cfg.optimizer.lr) == (28, 7.0, 3e-4)
    path = write(tmp_path, "[model]\nmax_sequence_length = 128\nresolution = 'auto'\n")
    cfg = build_job_config(["--job.config_file", path, "--model.pretrained_path", str(pipe), "--eval.num_steps", "40"])
    assert (cfg.model.max_sequence_length, cfg.model.resolution, cfg.eval.num_steps) == (128, 128, 40)


def test_auto_fields_fail_naming_the_cause(tmp_path):
    with pytest.raises(ConfigError, match=r"model.pretrained_path: .*missing' does not exist"):
        build_job_config(["--model.pretrained_path", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="model.resolution: expected an integer, got 'big'"):
        build_job_config(["--model.resolution", "big"])
