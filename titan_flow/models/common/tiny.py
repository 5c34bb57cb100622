"""Tiny random components for the test/debug pipelines: real tokenizer classes with small vocabularies,
and seeded construction, no downloads.

Whole words of `TINY_WORDS` are single tokens, anything else is spelled out, so prompts have
realistic, prompt-dependent lengths.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

TINY_WORDS = (
    "a an the of on in with and photo picture image cat dog red blue green sign that says "
    "two three four car tree house person"
).split()


def tiny_clip_tokenizer(out_dir: Path) -> None:
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


def tiny_t5_tokenizer(out_dir: Path):
    """Unigram vocabulary in T5's layout (pad 0, eos 1, unk 2): whole words beat spelling them out."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -2.0) for word in TINY_WORDS]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def seeded(seed: int, offset: int, build: Callable[[], T]) -> T:
    """`build()` with the global RNG seeded from (seed, offset) and restored afterwards, so each component
    of a tiny pipeline is reproducible on its own and building it disturbs no other stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + offset)
        return build()
