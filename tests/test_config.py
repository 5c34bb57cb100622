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
