"""Build a JobConfig from a TOML file plus `--section.key value` command-line overrides.

Precedence: dataclass defaults < TOML file < command line. Every error names the field, the bad
value and what is allowed, so a typo in a 32-node launch fails in the first second.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from titan_flow.config.job_config import JobConfig


class ConfigError(ValueError):
    """A job configuration value is missing, unknown or invalid."""


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _sections(cfg: JobConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _field_types(section_obj) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_obj)}


def _optional_inner(typ: Any) -> Any | None:
    """T for a field typed `T | None` (an "auto" field), else None."""
    args = typing.get_args(typ)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def _coerce(name: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Convert `value` to `typ`; CLI values arrive as strings, TOML values already typed."""
    inner = _optional_inner(typ)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        return _coerce(name, value, inner, from_cli)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if typ in (list, dict):
        if from_cli and isinstance(value, str):
            value = _parse_cli_container(name, value, typ)
        if not isinstance(value, typ):
            raise ConfigError(f"{name}: expected a {typ.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {typ!r}")  # pragma: no cover


def _parse_cli_container(name: str, text: str, typ: type) -> Any:
    """Lists: JSON or comma-separated; dicts: JSON or `a=1,b=2` (numbers parsed when they look like numbers)."""
    text = text.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: could not parse {text!r} as JSON: {e}") from None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if typ is list:
        return [_scalar(t) for t in items]
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{name}: expected key=value pairs like 'pickscore=1.0,ocr=0.5', got {text!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _scalar(v.strip())
    return out


def _scalar(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _set(cfg: JobConfig, section: str, key: str, value: Any, from_cli: bool) -> None:
    sections = _sections(cfg)
    if section not in sections:
        raise ConfigError(f"unknown config section [{section}]; sections are: {', '.join(sections)}")
    section_obj = sections[section]
    fields = _field_types(section_obj)
    if key not in fields:
        raise ConfigError(
            f"unknown config field {section}.{key}; fields of [{section}] are: {', '.join(fields)}"
        )
    typ, f = fields[key]
    name = f"{section}.{key}"
    value = _coerce(name, value, typ, from_cli)
    allowed = f.metadata.get("choices")
    if allowed and value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    setattr(section_obj, key, value)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job.config_file: {str(path)!r} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job.config_file: {str(path)!r} is not valid TOML: {e}") from None


def parse_cli_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """`--a.b value`, `--a.b=value`, and bare `--a.b` (= true) -> [(section, key, text)]."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value")
        body = arg[2:]
        if "=" in body:
            dotted, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            dotted, value = body, argv[i + 1]
            i += 2
        else:
            dotted, value = body, "true"
            i += 1
        if "." not in dotted:
            raise ConfigError(f"option --{dotted} must be --section.key, e.g. --training.steps 10")
        section, key = dotted.split(".", 1)
        out.append((section.replace("-", "_"), key.replace("-", "_"), value))
    return out


def auto_fields(cfg: JobConfig) -> list[str]:
    """"section.field" of every field still on auto (None)."""
    return [
        f"{section}.{f.name}"
        for section, obj in _sections(cfg).items()
        for f in dataclasses.fields(obj)
        if getattr(obj, f.name) is None
    ]


def resolve_auto(cfg: JobConfig) -> None:
    """Fill the auto fields from the model family: the published pipeline's defaults for
    model.pretrained_path, the debug job's values for a random-init flavor. A default that is a
    function is called with the config as resolved so far (fields resolve in declaration order)."""
    pending = auto_fields(cfg)
    if not pending:
        return
    from titan_flow.models import get_model_spec

    try:
        spec = get_model_spec(cfg.model.name)
        defaults = spec.fixed_defaults()
        if any(p not in defaults for p in pending):  # only then is the pretrained directory read
            defaults = spec.config_defaults(cfg.model.pretrained_path)
    except (KeyError, NotImplementedError, FileNotFoundError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"cannot fill {', '.join(pending)} (auto) from model {cfg.model.name!r}: {message}") from None
    sections = _sections(cfg)
    for dotted in pending:
        if dotted not in defaults:
            raise ConfigError(f"{dotted} is auto but the {cfg.model.name!r} family gives it no default; set it")
        section, key = dotted.split(".")
        value = defaults[dotted]
        _set(cfg, section, key, value(cfg) if callable(value) else value, from_cli=False)
        if getattr(sections[section], key) is None:
            raise ConfigError(f"{dotted}: the {cfg.model.name!r} family's default is None")


def _validate_frame_size(cfg: JobConfig, need) -> None:
    """Image families make square single frames; only a video family takes model.width and num_frames."""
    m = cfg.model
    need(m.width % 16 == 0 and m.width > 0, f"model.width must be a positive multiple of 16, got {m.width}")
    need(m.num_frames >= 1, f"model.num_frames must be >= 1, got {m.num_frames}")
    from titan_flow.models import get_model_spec

    try:
        video = get_model_spec(m.name).video
    except (KeyError, NotImplementedError):
        return  # resolve_auto names an unknown or unported family
    if not video:
        need(
            m.width == m.resolution and m.num_frames == 1,
            f"model.width = {m.width} and model.num_frames = {m.num_frames}: the {m.name!r} family makes square "
            f"images (model.resolution = {m.resolution}), so leave them on auto (or set width = resolution and "
            "num_frames = 1)",
        )


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that a single field's type cannot express."""
    s, rl = cfg.sampling, cfg.rl

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(s.num_steps >= 1, f"sampling.num_steps must be >= 1, got {s.num_steps}")
    need(s.num_image_per_prompt >= 1, f"sampling.num_image_per_prompt must be >= 1, got {s.num_image_per_prompt}")
    need(s.batch_size >= 1, f"sampling.batch_size must be >= 1, got {s.batch_size}")
    need(s.num_batches_per_epoch >= 1, f"sampling.num_batches_per_epoch must be >= 1, got {s.num_batches_per_epoch}")
    need(s.noise_level >= 0, f"sampling.noise_level must be >= 0, got {s.noise_level}")
    need(s.sde_window_size >= 0, f"sampling.sde_window_size must be >= 0, got {s.sde_window_size}")
    if s.sde_window_size > 0:
        need(
            len(s.sde_window_range) == 2 and 0 <= s.sde_window_range[0] < s.sde_window_range[1] <= s.num_steps,
            f"sampling.sde_window_range must be [lo, hi) with 0 <= lo < hi <= sampling.num_steps "
            f"({s.num_steps}), got {s.sde_window_range}",
        )
        width = s.sde_window_range[1] - s.sde_window_range[0]
        need(
            s.sde_window_size <= width,
            f"sampling.sde_window_size ({s.sde_window_size}) must fit in sampling.sde_window_range "
            f"{s.sde_window_range} (width {width})",
        )
    if s.branch_prefix:
        need(
            s.sde_window_size > 0,
            "sampling.branch_prefix (legacy Fast) branches at the SDE window; set sampling.sde_window_size > 0",
        )
    _validate_algorithm(cfg, need)
    need(0 < rl.timestep_fraction <= 1, f"rl.timestep_fraction must be in (0, 1], got {rl.timestep_fraction}")
    need(rl.clip_range > 0, f"rl.clip_range must be > 0, got {rl.clip_range}")
    need(rl.beta >= 0, f"rl.beta must be >= 0, got {rl.beta}")
    need(cfg.optimizer.lr > 0, f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    ga = cfg.training.gradient_accumulation_steps
    need(ga >= 1, f"training.gradient_accumulation_steps must be >= 1, got {ga}")
    need(
        s.num_batches_per_epoch % ga == 0,
        f"sampling.num_batches_per_epoch ({s.num_batches_per_epoch}) must be a multiple of "
        f"training.gradient_accumulation_steps ({ga}) so every epoch ends on an optimizer step",
    )
    need(cfg.training.steps >= 0, f"training.steps must be >= 0, got {cfg.training.steps}")
    need(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    need(cfg.training.max_nonfinite_skips >= 1,
         f"training.max_nonfinite_skips must be >= 1, got {cfg.training.max_nonfinite_skips}")
    need(cfg.model.resolution % 16 == 0, f"model.resolution must be a multiple of 16, got {cfg.model.resolution}")
    _validate_frame_size(cfg, need)
    for name, w in cfg.reward.fns.items():
        need(isinstance(w, (int, float)) and not isinstance(w, bool), f"reward.fns.{name}: weight must be a number, got {w!r}")
    need(len(cfg.reward.fns) > 0, "reward.fns is empty; give at least one reward, e.g. {jpeg_compressibility = 1.0}")


def _validate_algorithm(cfg: JobConfig, need) -> None:
    """The algorithm family's cross-field rules (rl, lora, and the sampling they depend on)."""
    s, rl, lora = cfg.sampling, cfg.rl, cfg.lora
    if not rl.train_cfg:
        need(
            s.guidance_scale <= 1,
            f"rl.train_cfg = false trains without CFG, but sampling.guidance_scale = {s.guidance_scale} samples "
            "with it, so the importance ratio could never be 1; the no-CFG recipe sets sampling.guidance_scale = 1",
        )
    if rl.ratio_norm or rl.grad_reweight:
        need(
            rl.algorithm == "grpo",
            f"rl.ratio_norm / rl.grad_reweight (GRPO-Guard) need rl.algorithm = 'grpo', got {rl.algorithm!r}",
        )
    if rl.ratio_norm:
        need(
            s.sde_type in ("sde", "wan"),
            f"rl.ratio_norm: the RatioNorm bias cancels the Gaussian log-prob's quadratic term, so it needs "
            f"sampling.sde_type = 'sde' or 'wan', got {s.sde_type!r}",
        )
    need(not rl.ratio_norm_batch_bias or rl.ratio_norm, "rl.ratio_norm_batch_bias only applies with rl.ratio_norm = true")
    need(rl.ref_update_interval >= 1, f"rl.ref_update_interval must be >= 1, got {rl.ref_update_interval}")
    need(rl.dpo_beta > 0, f"rl.dpo_beta must be > 0, got {rl.dpo_beta}")
    need(0 <= rl.caption_dropout < 1, f"rl.caption_dropout must be in [0, 1), got {rl.caption_dropout}")
    if rl.algorithm == "supervised":
        need(
            s.num_image_per_prompt == 1,
            "rl.algorithm = 'supervised' trains on dataset records, not on groups of samples: set "
            f"sampling.num_image_per_prompt = 1 (got {s.num_image_per_prompt})",
        )
    need(0 <= rl.fm_sigma_min < 1, f"rl.fm_sigma_min must be in [0, 1), got {rl.fm_sigma_min}")
    need(
        rl.fm_sigma_min == 0 or rl.algorithm != "grpo",
        f"rl.fm_sigma_min = {rl.fm_sigma_min} shapes the flow-matching loss of awm / dpo / sft / supervised; "
        "rl.algorithm = 'grpo' trains on the sampled steps (use sampling.sde_window_range to choose them)",
    )
    if rl.algorithm in ("dpo", "online_dpo", "awm"):
        need(
            s.num_image_per_prompt >= 2,
            f"rl.algorithm = {rl.algorithm!r} compares the images of a group; "
            f"sampling.num_image_per_prompt must be >= 2, got {s.num_image_per_prompt}",
        )
    if rl.algorithm == "online_sft" and rl.beta > 0:
        need(
            lora.enable,
            "rl.algorithm = 'online_sft' with rl.beta > 0 keeps its KL to the initial model while the rollouts "
            "come from a moving reference; with full fine-tuning that needs two frozen copies, so set "
            "lora.enable = true (the KL then uses the adapter-disabled base) or rl.beta = 0",
        )
    if lora.enable:
        need(lora.rank >= 1, f"lora.rank must be >= 1, got {lora.rank}")
        need(lora.alpha > 0, f"lora.alpha must be > 0, got {lora.alpha}")
        need(
            len(lora.target_modules) > 0 and all(isinstance(t, str) and t for t in lora.target_modules),
            f"lora.target_modules must be a non-empty list of module names, got {lora.target_modules!r}",
        )


def build_job_config(argv: list[str] | None = None) -> JobConfig:
    """Defaults, then `--job.config_file` (TOML), then the other command-line overrides."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = parse_cli_overrides(argv)
    cfg = JobConfig()
    config_files = [v for s, k, v in overrides if (s, k) == ("job", "config_file")]
    if config_files:
        data = load_toml(config_files[-1])
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{config_files[-1]}: top-level key {section!r} must be a [section] table"
                )
            for key, value in table.items():
                _set(cfg, section, key, value, from_cli=False)
    for section, key, value in overrides:
        _set(cfg, section, key, value, from_cli=True)
    resolve_auto(cfg)
    validate(cfg)
    return cfg


def job_config_from_dict(data: dict, overrides: list[str] = ()) -> JobConfig:
    """Rebuild a JobConfig from `to_dict` output (a run's config.json), then apply `--section.key value`
    command-line `overrides`, validating every field."""
    cfg = JobConfig()
    for section, table in data.items():
        for key, value in table.items():
            _set(cfg, section, key, value, from_cli=False)
    for section, key, value in parse_cli_overrides(list(overrides)):
        _set(cfg, section, key, value, from_cli=True)
    resolve_auto(cfg)
    validate(cfg)
    return cfg


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)
