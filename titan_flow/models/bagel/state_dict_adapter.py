"""Bagel checkpoints <-> our model: the `ema.safetensors` key format and a Bagel directory's files.

One rule table drives both directions: our `layers.{i}.gen.q_proj.weight` is Bagel's
`language_model.model.layers.{i}.self_attn.q_proj_moe_gen.weight`, and so on. Every key must be
matched by a rule and the result must match the model's keys and shapes, so a wrong or partial
checkpoint fails with the offending keys named.

The two fixed sin-cos position tables are stored in the checkpoint (Bagel's own loader drops them
and recomputes them); we keep the stored ones after checking they are that sin-cos table.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from titan_flow.models.bagel.args import BagelArgs, VitArgs
from titan_flow.models.bagel.model import Bagel
from titan_flow.models.common.embeddings import get_2d_sincos_pos_embed
from titan_flow.models.common.state_dict import check_keys, listing

EMA_NAME = "ema.safetensors"
LLM_CONFIG_NAME = "llm_config.json"
VIT_CONFIG_NAME = "vit_config.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image_id": "<|vision_start|>",
    "end_of_image_id": "<|vision_end|>",
}
POS_TABLES = {"latent_pos_embed": "latent_pos_embed.pos_embed", "vit_pos_embed": "vit_pos_embed.pos_embed"}


def _rules() -> list[tuple[str, str]]:
    """(our key template, Bagel key template); {name} placeholders must match in both."""
    layer = "language_model.model.layers.{i}."
    rules = [
        ("embed_tokens.weight", "language_model.model.embed_tokens.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("norm.und.weight", "language_model.model.norm.weight"),
        ("norm.gen.weight", "language_model.model.norm_moe_gen.weight"),
    ]
    for expert, suffix in (("und", ""), ("gen", "_moe_gen")):
        ours = f"layers.{{i}}.{expert}."
        rules += [
            (ours + "input_norm.weight", layer + f"input_layernorm{suffix}.weight"),
            (ours + "post_attention_norm.weight", layer + f"post_attention_layernorm{suffix}.weight"),
            (ours + "{attn}_proj.{param}", layer + f"self_attn.{{attn}}_proj{suffix}.{{param}}"),
            (ours + "{qk}_norm.weight", layer + f"self_attn.{{qk}}_norm{suffix}.weight"),
            (ours + "mlp.{mlp}_proj.weight", layer + f"mlp{suffix}.{{mlp}}_proj.weight"),
        ]
    rules += [
        ("time_embedder.linear_1.{param}", "time_embedder.mlp.0.{param}"),
        ("time_embedder.linear_2.{param}", "time_embedder.mlp.2.{param}"),
        ("vae2llm.{param}", "vae2llm.{param}"),
        ("llm2vae.{param}", "llm2vae.{param}"),
        ("connector.{rest}", "connector.{rest}"),
        ("vit.embeddings.{rest}", "vit_model.vision_model.embeddings.{rest}"),
        ("vit.layers.{rest}", "vit_model.vision_model.encoder.layers.{rest}"),
        ("vit.post_layernorm.{rest}", "vit_model.vision_model.post_layernorm.{rest}"),
    ]
    rules += list(POS_TABLES.items())
    return rules


_GROUPS = {"i": r"\d+", "attn": "q|k|v|o", "qk": "q|k", "mlp": "gate|up|down", "param": "weight|bias", "rest": r".+"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(pattern + "$")


_OURS_TO_BAGEL = [(_compile(ours), bagel) for ours, bagel in _rules()]
_BAGEL_TO_OURS = [(_compile(bagel), ours) for ours, bagel in _rules()]


def _rename(state_dict: dict[str, torch.Tensor], rules, source: str) -> dict[str, torch.Tensor]:
    out, unmatched = {}, []
    for key, value in state_dict.items():
        for pattern, template in rules:
            match = pattern.match(key)
            if match:
                out[template.format(**match.groupdict())] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{source}: keys no rule maps: {listing(sorted(unmatched))}")
    return out



def _count(keys, prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_args(state_dict: dict[str, torch.Tensor], **overrides) -> BagelArgs:
    """BagelArgs whose shapes match a state dict in our key format.

    The ViT head count changes no shape and is not recoverable (one head is assumed). The special
    token ids come from the tokenizer, not the weights: unless `overrides` set them, the last four
    ids of the vocabulary stand in, which is enough to check shapes.
    """
    try:
        vocab, dim = state_dict["embed_tokens.weight"].shape
        head_dim = state_dict["layers.0.und.q_norm.weight"].shape[0]
        latent_dim = state_dict["vae2llm.weight"].shape[1]
        latent_rows = state_dict["latent_pos_embed"].shape[0]
        args = dict(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=state_dict["layers.0.und.mlp.gate_proj.weight"].shape[0],
            num_layers=_count(state_dict, "layers."),
            num_heads=state_dict["layers.0.und.q_proj.weight"].shape[0] // head_dim,
            num_kv_heads=state_dict["layers.0.und.k_proj.weight"].shape[0] // head_dim,
            latent_channels=latent_dim // 4,  # Bagel patches latents 2 x 2
            max_latent_size=math.isqrt(latent_rows),
            vit=None,
            **dict(zip(SPECIAL_TOKENS, range(vocab - len(SPECIAL_TOKENS), vocab))),
        )
        if "vit.embeddings.patch_embedding.weight" in state_dict:
            vit_dim, patch_in = state_dict["vit.embeddings.patch_embedding.weight"].shape
            patch = math.isqrt(patch_in // 3)
            side = math.isqrt(state_dict["vit.embeddings.position_embedding.weight"].shape[0])
            args["vit"] = VitArgs(
                hidden_size=vit_dim,
                intermediate_size=state_dict["vit.layers.0.mlp.fc1.weight"].shape[0],
                num_layers=_count(state_dict, "vit.layers."),
                num_heads=1,
                patch_size=patch,
                image_size=side * patch,
            )
            args["vit_max_num_patch_per_side"] = math.isqrt(state_dict["vit_pos_embed"].shape[0])
    except KeyError as e:
        raise ValueError(f"not a Bagel state dict: key {e} is missing") from None
    args.update(overrides)
    return BagelArgs(**args)


def check_state_dict(state_dict: dict[str, torch.Tensor], args: BagelArgs, source: str = "state dict") -> None:
    """Raise naming every missing, unexpected and mis-shaped key against the model `args` builds."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Bagel(args).state_dict().items()}
    check_keys(state_dict, expected, f"{source} does not match the Bagel model of {args}")


def check_position_tables(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """The stored position tables must be the 2-D sin-cos tables the model computes (to the stored precision)."""
    for ours, bagel in POS_TABLES.items():
        if ours not in state_dict:
            continue
        stored = state_dict[ours]
        side = math.isqrt(stored.shape[0])
        expected = get_2d_sincos_pos_embed(stored.shape[1], side, side, device=stored.device)
        err = (stored.float() - expected).abs().max().item()
        if err > torch.finfo(stored.dtype).eps:
            raise ValueError(
                f"{source}: {bagel} differs from the {side}x{side} 2-D sin-cos table Bagel uses by up to {err:.3g}; "
                "this is not a Bagel checkpoint with the standard position tables"
            )


def from_bagel(state_dict: dict[str, torch.Tensor], args: BagelArgs | None = None) -> dict[str, torch.Tensor]:
    """`ema.safetensors` keys -> ours, validated against `args` (or the layout the shapes imply)."""
    ours = _rename(state_dict, _BAGEL_TO_OURS, "Bagel checkpoint")
    check_state_dict(ours, args or infer_args(ours), source="Bagel checkpoint")
    check_position_tables(ours, source="Bagel checkpoint")
    return ours


def to_bagel(state_dict: dict[str, torch.Tensor], args: BagelArgs | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> `ema.safetensors` keys; inverse of from_bagel."""
    check_state_dict(state_dict, args or infer_args(state_dict), source="Bagel state dict")
    return _rename(state_dict, _OURS_TO_BAGEL, "Bagel state dict")


# --- a Bagel directory ------------------------------------------------------------------------


def special_token_ids(directory: Path) -> dict[str, int]:
    """Ids of the context and image-marker tokens, read from the tokenizer files (no tokenizer import).

    Looks in tokenizer.json ("added_tokens") and tokenizer_config.json ("added_tokens_decoder");
    returns only the ids found. The released Qwen2.5 tokenizer gives BagelArgs' defaults.
    """
    by_content = {}
    tokenizer_json = directory / TOKENIZER_NAME
    if tokenizer_json.is_file():
        for entry in json.loads(tokenizer_json.read_text()).get("added_tokens", []):
            by_content[entry["content"]] = int(entry["id"])
    config = directory / TOKENIZER_CONFIG_NAME
    if config.is_file():
        for i, entry in json.loads(config.read_text()).get("added_tokens_decoder", {}).items():
            by_content.setdefault(entry["content"], int(i))
    return {field: by_content[token] for field, token in SPECIAL_TOKENS.items() if token in by_content}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[BagelArgs, dict[str, torch.Tensor]]:
    """(args, our state dict) from a Bagel directory: llm_config.json, vit_config.json, ema.safetensors."""
    directory = Path(path)
    if not (directory / EMA_NAME).is_file() or not (directory / LLM_CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"model.pretrained_path: {directory} must be a Bagel directory holding {EMA_NAME} and {LLM_CONFIG_NAME} "
            "(e.g. a snapshot of ByteDance-Seed/BAGEL-7B-MoT)"
        )
    llm_config = json.loads((directory / LLM_CONFIG_NAME).read_text())
    vit_path = directory / VIT_CONFIG_NAME
    vit_config = json.loads(vit_path.read_text()) if vit_path.is_file() else None
    with safe_open(str(directory / EMA_NAME), framework="pt", device=str(device)) as reader:
        raw = {key: reader.get_tensor(key) for key in reader.keys()}
    has_vit = any(k.startswith("vit_model.") for k in raw)
    if has_vit and vit_config is None:
        raise FileNotFoundError(f"{directory / EMA_NAME} holds ViT weights but {vit_path} is missing")
    try:
        ours = _rename(raw, _BAGEL_TO_OURS, f"{directory / EMA_NAME}")
        shapes = infer_args(ours)
        args = BagelArgs.from_configs(
            llm_config,
            vit_config if has_vit else None,
            latent_channels=shapes.latent_channels,
            max_latent_size=shapes.max_latent_size,
            vit_max_num_patch_per_side=shapes.vit_max_num_patch_per_side,
            **special_token_ids(directory),
        )
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None
    check_state_dict(ours, args, source=f"{directory / EMA_NAME}")
    check_position_tables(ours, source=f"{directory / EMA_NAME}")
    return args, ours


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Bagel:
    """Our model with a Bagel directory's weights, built on meta so no memory goes to a throwaway init."""
    args, state_dict = load_checkpoint(path, device)
    with torch.device("meta"):
        model = Bagel(args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def save_pretrained(state_dict: dict[str, torch.Tensor], args: BagelArgs, path: str | Path) -> None:
    """Write ema.safetensors (Bagel keys) and the two config files that `load_checkpoint` reads back."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    bagel = to_bagel(state_dict, args)
    save_file({k: v.detach().contiguous().cpu() for k, v in bagel.items()}, str(directory / EMA_NAME))
    llm_config, vit_config = args.to_configs()
    (directory / LLM_CONFIG_NAME).write_text(json.dumps(llm_config, indent=2))
    if vit_config is not None:
        (directory / VIT_CONFIG_NAME).write_text(json.dumps(vit_config, indent=2))
