"""Reading a family's hyper-parameters from a diffusers config.json, checked the same way for every family."""

from __future__ import annotations

from dataclasses import fields


def check_positive_ints(args, family: str) -> None:
    """Every field of the `args` dataclass annotated `int` must be a positive integer (bools are not)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{family} config: {f.name} must be a positive integer, got {value!r}")


def diffusers_config_kwargs(cls, config: dict, class_name: str, family: str) -> dict:
    """The keyword arguments of the args dataclass `cls` in a diffusers config.json dict.

    Metadata keys (leading `_`) are ignored, but `_class_name` must be `class_name`. An unknown key
    raises: it would be an architecture option the port does not implement, and silently dropping it
    could build a different network. `out_channels: None` means "same as in_channels", as in diffusers.
    """
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"{family} config: _class_name is {found!r}, expected {class_name!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
    if unknown:
        raise ValueError(f"{family} config: unsupported keys {unknown}; this port implements only {sorted(names)}")
    kwargs = {k: v for k, v in config.items() if k in names}
    if "out_channels" in names and kwargs.get("out_channels", 0) is None:
        kwargs["out_channels"] = kwargs.get("in_channels", getattr(cls, "in_channels", None))
    return kwargs
