"""Pixel-space SD3 for the shapes world (titan_flow/data/shapes.py): the "shapes" flavor's pipeline.

The backbone is our SD3 MMDiT unchanged (flavor "shapes": 16 x 16 RGB pixels as the latent, 2 x 2
patches, 64 image tokens). What differs from `SD3Pipeline` is only what surrounds it:

* no VAE: the latent is the picture scaled to [-1, 1], so `decode` is x / 2 + 0.5 and every sample is
  a real picture, whatever the weights;
* the text encoder has no weights: a prompt is split into words of the world's vocabulary, and
  token i becomes [one-hot(word) ; one-hot(i)] (the backbone's `context_embedder` then learns one
  vector per word and per position, exactly a learned embedding table) and the pooled vector is the
  bag of words (counted). The empty prompt (CFG's unconditional branch) is all padding.

Velocity (CFG), noise and sigmas are SD3Pipeline's, so rollout, training and the on-policy ratio
check go through the same code as SD3.5. A shapes pipeline directory is

    model_index.json         {"_class_name": "ShapesPipeline", resolution, max_sequence_length, shift,
                              num_inference_steps, guidance_scale, learning_rate}
    tokenizer/vocab.json     the word list, padding first
    transformer/             a diffusers SD3Transformer2DModel directory (config.json + safetensors)

which `model.pretrained_path` loads like any SD3 directory (the SD3 loaders dispatch on
`model_index.json`), and `python -m titan_flow.export` writes for a run of this flavor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from titan_flow.models.registry import pipeline_defaults
from titan_flow.models.sd3.args import FLAVORS, SD3Args
from titan_flow.models.sd3.pipeline import SD3Pipeline

CLASS_NAME = "ShapesPipeline"
PAD = "<pad>"
# The variant's defaults, written to model_index.json: the world's canvas, its longest prompt (7 words)
# plus one, no time shift at this resolution, the steps/CFG that rollouts and eval sample with, and the
# learning rate RL fine-tunes all 2.3 M weights at (the reference's 3e-4 is a LoRA rate).
DEFAULTS = {
    "resolution": 16,
    "max_sequence_length": 8,
    "shift": 1.0,
    "num_inference_steps": 10,
    "guidance_scale": 4.5,
    "learning_rate": 1e-4,
}


def is_shapes_dir(path: str | Path) -> bool:
    """True for a directory written by `save_pretrained` (its model_index.json names ShapesPipeline)."""
    index = Path(path) / "model_index.json"
    return bool(path) and index.is_file() and json.loads(index.read_text()).get("_class_name") == CLASS_NAME


def is_pixel_space(args: SD3Args) -> bool:
    """SD3 latents have 16 (or the debug VAE's 4) channels; 3 channels in and out means RGB pixels."""
    return args.in_channels == 3 and args.out_channels == 3


def world_vocabulary() -> list[str]:
    from titan_flow.data.shapes import vocabulary

    return [PAD, *vocabulary()]


def _read_index(root: Path) -> dict:
    config = json.loads((root / "model_index.json").read_text())
    missing = [key for key in DEFAULTS if key not in config]
    if missing:
        raise ValueError(f"{root / 'model_index.json'}: missing {missing}; a shapes pipeline records {list(DEFAULTS)}")
    return config


def pretrained_defaults(pretrained_path: str) -> dict:
    """The "auto" fields for a shapes directory: its recorded resolution, text length, steps, CFG and
    fine-tuning learning rate."""
    config = _read_index(Path(pretrained_path))
    defaults = pipeline_defaults(resolution=config["resolution"], max_sequence_length=config["max_sequence_length"],
                                 num_steps=config["num_inference_steps"], guidance_scale=config["guidance_scale"])
    return {**defaults, "optimizer.lr": config["learning_rate"]}


class ShapesPipeline(SD3Pipeline):
    """Word one-hot conditioning and identity "VAE" around the SD3 backbone (see the module docstring)."""

    def __init__(
        self,
        *,
        vocab: Sequence[str],
        args: SD3Args,
        device: torch.device | str,
        resolution: int,
        max_sequence_length: int,
        shift: float,
        negative_prompt: str = "",
    ):
        self.device = torch.device(device)
        if not is_pixel_space(args):
            raise ValueError(
                f"ShapesPipeline: the backbone must take and return RGB pixels (in/out channels 3), got "
                f"{args.in_channels}/{args.out_channels}"
            )
        if not vocab or vocab[0] != PAD or len(set(vocab)) != len(vocab):
            raise ValueError(f"ShapesPipeline: the vocabulary must list distinct words with {PAD!r} first, got {vocab}")
        self.vocab = list(vocab)
        self.word_index = {word: i for i, word in enumerate(self.vocab)}
        if max_sequence_length < 1:
            raise ValueError(f"model.max_sequence_length must be >= 1, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        if len(self.vocab) + max_sequence_length > args.joint_attention_dim or len(self.vocab) > args.pooled_projection_dim:
            raise ValueError(
                f"ShapesPipeline: {len(self.vocab)} words + {max_sequence_length} positions do not fit the backbone's "
                f"text width {args.joint_attention_dim} (pooled {args.pooled_projection_dim}); lower "
                "model.max_sequence_length or widen the flavor"
            )
        self.text_width, self.pooled_width = args.joint_attention_dim, args.pooled_projection_dim
        largest = args.pos_embed_max_size * args.patch_size
        if resolution <= 0 or resolution % args.patch_size or resolution > largest:
            raise ValueError(
                f"model.resolution: {resolution} must be a positive multiple of the patch size {args.patch_size} "
                f"and at most {largest} (the backbone's position table); the shapes world is {DEFAULTS['resolution']}"
            )
        self.resolution = resolution
        self.vae_scale_factor = 1
        self.shift, self.shift_terminal = shift, None
        self.negative_prompt_embeds, self.negative_pooled_prompt_embeds = self._encode_text([negative_prompt])

    @classmethod
    def load(
        cls,
        pretrained_path: str,
        *,
        device: torch.device | str,
        resolution: int = DEFAULTS["resolution"],
        max_sequence_length: int = DEFAULTS["max_sequence_length"],
        negative_prompt: str = "",
        flavor: str = "shapes",
        **_dtypes_and_seed,  # encoder/VAE dtypes and the random-encoder seed: nothing here has weights or randomness
    ) -> ShapesPipeline:
        """From a shapes directory, or ('') for the random-init `flavor` with the world's vocabulary."""
        common = dict(device=device, resolution=resolution, max_sequence_length=max_sequence_length,
                      negative_prompt=negative_prompt)
        if not pretrained_path:
            if flavor not in FLAVORS or not is_pixel_space(FLAVORS[flavor]):
                raise ValueError(f"model.flavor: {flavor!r} is not a pixel-space SD3 flavor (e.g. 'shapes')")
            return cls(vocab=world_vocabulary(), args=FLAVORS[flavor], shift=DEFAULTS["shift"], **common)
        root = Path(pretrained_path)
        if not is_shapes_dir(root):
            raise FileNotFoundError(
                f"model.pretrained_path: {root} is not a shapes pipeline directory (model_index.json with "
                f"_class_name {CLASS_NAME!r}); write one with `python -m titan_flow.export` from a shapes run"
            )
        config = _read_index(root)
        vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
        args = SD3Args.from_diffusers_config(json.loads((root / "transformer" / "config.json").read_text()))
        return cls(vocab=vocab, args=args, shift=float(config["shift"]), **common)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_sequence_length) word indices, padded with 0; unknown words and long prompts raise."""
        ids = torch.zeros(len(prompts), self.max_sequence_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.word_index]
            if unknown:
                raise ValueError(
                    f"the shapes text encoder cannot read {unknown} in {prompt!r}; it knows only the shapes "
                    f"world's words: {' '.join(self.vocab[1:])}"
                )
            if len(words) > self.max_sequence_length:
                raise ValueError(
                    f"{prompt!r} has {len(words)} words, more than model.max_sequence_length = {self.max_sequence_length}"
                )
            ids[row, : len(words)] = torch.tensor([self.word_index[w] for w in words], dtype=torch.long)
        return ids

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(prompts)
        batch, length = ids.shape
        n_words = len(self.vocab)
        embeds = torch.zeros(batch, length, self.text_width)
        embeds.scatter_(2, ids.unsqueeze(-1), 1.0)
        embeds[:, torch.arange(length), n_words + torch.arange(length)] = 1.0
        pooled = torch.zeros(batch, self.pooled_width)
        pooled.scatter_add_(1, ids, (ids > 0).float())
        return embeds.to(self.device), pooled.to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, torch.float32) * 2 - 1


def save_pretrained(out_dir: str | Path, state_dict: dict[str, torch.Tensor], args: SD3Args,
                    max_shard_size: int | str = "10GB") -> Path:
    """Write a shapes pipeline directory: the backbone as a diffusers transformer/, the world's vocabulary
    and the variant's defaults (what `python -m titan_flow.export` writes for a pixel-space SD3 run)."""
    from titan_flow.models.sd3.state_dict_adapter import save_diffusers

    out = Path(out_dir)
    save_diffusers(state_dict, args, out / "transformer", max_shard_size)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(world_vocabulary()) + "\n")
    (out / "model_index.json").write_text(json.dumps({"_class_name": CLASS_NAME, **DEFAULTS}, indent=2) + "\n")
    return out
