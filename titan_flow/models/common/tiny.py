"""Tiny random text encoders, tokenizers and VAEs for the debug flavors and the tests.

Everything is built offline (no download) from transformers/diffusers classes with tiny configs,
each component seeded on its own so that a pipeline built twice from the same seed is identical.
The tokenizers know a few dozen whole words and spell everything else out, so prompts of different
content give different embeddings and long prompts really get truncated.
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

TINY_WORDS = (
    "a an the of on in with and photo picture image cat dog red blue green sign that says "
    "two three four car tree house person"
).split()


def with_seed(torch_seed: int, build: Callable[[], T]) -> T:
    """`build()` under torch seed `torch_seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        return build()


def seeded(seed: int, offset: int, build: Callable[[], T]) -> T:
    """Component number `offset` of a pipeline seeded with `seed`: built under torch seed seed * 1000 + offset."""
    return with_seed(seed * 1000 + offset, build)


def write_clip_tokenizer(out_dir: Path) -> None:
    """Byte-level BPE in CLIP's format (vocab.json + merges.txt): every byte, plus whole-word merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    bytes_alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(bytes_alphabet + [c + "</w>" for c in bytes_alphabet])}
    merges = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    out_dir.mkdir(parents=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special_tokens = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special_tokens}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def clip_tokenizer():
    """The tiny CLIP tokenizer, loaded through its files as a published one would be."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(Path(scratch) / "clip")
        return CLIPTokenizer.from_pretrained(Path(scratch) / "clip")


def t5_tokenizer():
    """Unigram vocabulary in T5's layout (pad 0, eos 1, unk 2): whole words beat spelling them out."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -2.0) for word in TINY_WORDS]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_text_encoder(tokenizer, width: int, hidden_act: str = "quick_gelu", with_projection: bool = True):
    """A 2-layer CLIP text encoder of hidden width `width` (and projection width `width`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        hidden_act=hidden_act,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_encoder(tokenizer, width: int):
    """A 2-layer T5 encoder of width `width` (T5 v1.1's gated-GELU, like T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def autoencoder(latent_channels: int, scaling_factor: float, shift_factor: float, sample_size: int = 32,
                block_out_channels: tuple[int, ...] = (8, 8, 16, 16), norm_num_groups: int = 4):
    """A 4-level AutoencoderKL (8x downsampling, by default 8-16 channels) with the family's latent constants."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: 8x
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        latent_channels=latent_channels,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def save_pipeline_dir(pipeline, out_dir: str | Path, clip_tokenizer_folders: tuple[str, ...]) -> Path:
    """`pipeline.save_pretrained(out_dir)`, with the CLIP tokenizers rewritten in the published layout
    (vocab.json + merges.txt) that the family's pipeline loader reads."""
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir, is_main_process=True)
    for name in clip_tokenizer_folders:
        shutil.rmtree(out_dir / name)
        write_clip_tokenizer(out_dir / name)
    return out_dir
