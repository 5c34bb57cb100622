"""Bagel backbone and checkpoint adapter on the tiny random "debug" flavor (fp32, CPU, seconds).

Numerical parity with ByteDance-Seed/Bagel itself is in test_bagel_parity.py (opt-in harness).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from titan_flow.models.bagel.args import FLAVORS, BagelArgs
from titan_flow.models.bagel.model import (
    Bagel,
    KVCache,
    LatentSplit,
    Routing,
    TextSplit,
    VitSplit,
    patchify_latents,
    patchify_vit_image,
    unpatchify_latents,
)
from titan_flow.models.bagel.pipeline import byte_level_tokenizer
from titan_flow.models.bagel.state_dict_adapter import (
    EMA_NAME,
    from_bagel,
    from_pretrained,
    load_checkpoint,
    save_pretrained,
    to_bagel,
)
from titan_flow.models.common.attention import split_mask
from titan_flow.models.common.rope import apply_rope, rope_cos_sin

ARGS = FLAVORS["debug"]
BOS, EOS = ARGS.bos_token_id, ARGS.eos_token_id
PD = ARGS.patch_latent_dim


def random_model(seed: int = 0, args: BagelArgs = ARGS) -> Bagel:
    """The debug model with every weight redrawn (init zeros/ones would hide routing and norm bugs)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Bagel(args)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name and p.ndim == 1 else 0.1 * torch.randn_like(p))
    return model.eval()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text(*ids):
    return TextSplit([BOS, *ids, EOS])


# --- building blocks ----------------------------------------------------------------------------


def test_rope_matches_transformers_qwen2():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, rope_theta=1e6, max_position_embeddings=4096)
    positions = torch.tensor([0, 1, 2, 7, 7, 7, 8, 300, 3000])
    q, k = rand(9, 4, 16, seed=1), rand(9, 2, 16, seed=2)
    cos_hf, sin_hf = Qwen2RotaryEmbedding(config)(q, positions[None])
    cos, sin = rope_cos_sin(positions, 16, 1e6)
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=1e-6)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_hf, sin_hf)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf[0].transpose(0, 1), rtol=0, atol=1e-6)


def test_latent_patching_is_row_col_channel_order():
    z = rand(2, 4, 6, 8, seed=3)  # (B, C, H, W)
    tokens = patchify_latents(z, 2)
    assert tokens.shape == (2, 12, 16)
    for r, c, pr, pc, ch in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 3), (2, 3, 1, 1, 2), (2, 0, 0, 1, 1)]:
        assert tokens[1, r * 4 + c, (pr * 2 + pc) * 4 + ch] == z[1, ch, 2 * r + pr, 2 * c + pc]
    assert torch.equal(unpatchify_latents(tokens, 3, 4, 2), z)
    image = rand(3, 4, 6, seed=4)
    vit = patchify_vit_image(image, 2)
    assert (vit.height, vit.width) == (2, 3) and vit.patches[4, (1 * 2 + 0) * 3 + 2] == image[2, 3, 2]


def test_attention_mask_follows_bagel_split_rules():
    # [causal text (2) | noised image (3) | clean image (2)]: text is causal, the noised image sees the
    # text and itself, and nobody else sees the noised image.
    mask = split_mask([2, 3, 2], ["causal", "noise", "full"]).int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1],
        [1, 1, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(mask, expected)


def test_routing_restores_packed_order():
    gen = torch.tensor([False, True, True, False, True])
    routing = Routing(gen)
    x = torch.arange(5.0)[:, None]
    out = routing.apply(lambda u: u + 100, lambda g: g - 100, x)
    assert out.flatten().tolist() == [100, -99, -98, 103, -96]


# --- the two execution paths --------------------------------------------------------------------


def mixed_samples():
    """Three packed samples of different shapes, one with ViT and clean-latent context splits."""
    return [
        [text(5, 6, 7), LatentSplit(rand(12, PD, seed=10), 3, 4, 0.7, noised=True)],
        [
            VitSplit(rand(48, 12, seed=11), 8, 6),
            LatentSplit(rand(4, PD, seed=12), 2, 2, 0.0),
            text(21, 22),
            LatentSplit(rand(6, PD, seed=13), 3, 2, 0.35, noised=True),
        ],
        [text(9), LatentSplit(rand(4, PD, seed=14), 2, 2, 0.05, noised=True)],
    ]


def test_packed_forward_equals_per_sample_forward():
    model = random_model()
    samples = mixed_samples()
    with torch.no_grad():
        packed = model(samples)
        alone = [v for sample in samples for v in model([sample])]
    assert len(packed) == len(alone) == 4
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_cached_prefill_and_denoise_equal_the_full_sequence_forward():
    model = random_model()
    x = rand(2, 12, PD, seed=20)
    t = torch.tensor([0.9, 0.4])
    prompts = [text(5, 6, 7, 8), text(11)]
    with torch.no_grad():
        full = model([[prompts[i], LatentSplit(x[i], 3, 4, t[i].item(), noised=True)] for i in range(2)])
        cache = model.extend(KVCache.empty(2), [0, 1], prompts)
        cached = model.denoise(cache, [0, 1], x, t, (3, 4))
    assert cache.lens == [6, 3] and cache.positions == [6, 3]
    for i in range(2):
        torch.testing.assert_close(cached[i], full[i], rtol=0, atol=2e-6)

    # Editing-style context: [clean VAE image | ViT image | text], prefilled split by split.
    vit, clean = VitSplit(rand(48, 12, seed=21), 8, 6), LatentSplit(rand(4, PD, seed=22), 2, 2, 0.0)
    with torch.no_grad():
        full = model([[clean, vit, prompts[0], LatentSplit(x[0], 3, 4, 0.6, noised=True)]])[1]
        cache = model.extend(KVCache.empty(1), [0], [clean])
        cache = model.extend(cache, [0], [vit])
        cache = model.extend(cache, [0], [prompts[0]])
        cached = model.denoise(cache, [0], x[:1], torch.tensor([0.6]), (3, 4))
    assert cache.positions == [2 + 6]  # one position per image, one per text token
    torch.testing.assert_close(cached[0], full, rtol=0, atol=2e-6)


def test_cache_contexts_can_be_selected_repeated_and_concatenated():
    model = random_model()
    x = rand(3, 4, PD, seed=30)
    t = torch.tensor([0.5, 0.5, 0.5])
    with torch.no_grad():
        cache = model.extend(KVCache.empty(2), [0, 1], [text(5, 6), text(7, 8, 9)])
        direct = model.denoise(cache.cat(KVCache.empty(1)), [1, 0, 2], x, t, (2, 2))
        picked = model.denoise(KVCache.empty(1).cat(cache.select([1, 0, 1])), [1, 2, 0], x, t, (2, 2))
        empty_alone = model.denoise(KVCache.empty(1), [0], x[2:], t[2:], (2, 2))
    torch.testing.assert_close(picked[:2], direct[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(picked[2], empty_alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(direct[2], empty_alone[0], rtol=0, atol=1e-6)


def test_generation_expert_routing_touches_only_generation_weights():
    model = random_model()
    rows_seen = {}

    def count(name):
        def hook(module, inputs, output):
            rows_seen[name] = rows_seen.get(name, 0) + inputs[0].shape[0]

        return hook

    for i, layer in enumerate(model.layers):
        for expert in ("und", "gen"):
            for sub in ("q_proj", "k_proj", "v_proj", "o_proj", "input_norm", "post_attention_norm"):
                getattr(layer, expert).get_submodule(sub).register_forward_hook(count(f"{i}.{expert}.{sub}"))
    prompts = [text(5, 6, 7), text(8, 9)]
    with torch.no_grad():
        cache = model.extend(KVCache.empty(2), [0, 1], prompts)
    assert not any(".gen." in name for name in rows_seen)  # prefill: text only
    assert rows_seen["0.und.q_proj"] == 5 + 4
    rows_seen.clear()
    with torch.no_grad():
        model.denoise(cache, [0, 1], rand(2, 12, PD, seed=40), torch.tensor([0.3, 0.3]), (3, 4))
    for name, rows in rows_seen.items():
        assert rows == (2 * 12 if ".gen." in name else 2 * 2), name  # latents -> gen, the two markers -> und

    # The prompt cache depends on the und expert only; the velocity on both.
    x, t = rand(2, 12, PD, seed=41), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        v = model.denoise(cache, [0, 1], x, t, (3, 4))
        for p in model.gen_expert_parameters():
            p.add_(0.05 * torch.randn_like(p))
        cache_after = model.extend(KVCache.empty(2), [0, 1], prompts)
        v_after = model.denoise(cache, [0, 1], x, t, (3, 4))
    assert all(torch.equal(a, b) for a, b in zip(cache.keys + cache.values, cache_after.keys + cache_after.values))
    assert not torch.allclose(v, v_after)


def test_generation_expert_is_every_moe_gen_weight():
    # flow_grpo trains the language-model parameters whose Bagel name contains "moe_gen".
    model = random_model()
    bagel = to_bagel(model.state_dict(), ARGS)
    moe_gen = {t.data_ptr() for k, t in bagel.items() if "moe_gen" in k}
    gen_expert = {p.data_ptr() for p in model.gen_expert_parameters()}
    assert gen_expert == moe_gen
    assert len(gen_expert) == ARGS.num_layers * 14 + 1  # 14 tensors per layer, plus the final gen norm


def test_extend_and_denoise_reject_bad_input():
    model = random_model()
    with pytest.raises(ValueError, match=r"got \['LatentSplit', 'TextSplit'\] in one call; pass one kind of split"):
        model.extend(KVCache.empty(2), [0, 1], [text(5), LatentSplit(rand(4, PD), 2, 2)])
    with pytest.raises(ValueError, match="one kind of split per call"):
        model.extend(KVCache.empty(2), [0, 1], [VitSplit(rand(4, 12), 2, 2), LatentSplit(rand(4, PD), 2, 2)])
    with pytest.raises(ValueError, match="noised LatentSplit"):
        model.extend(KVCache.empty(1), [0], [LatentSplit(rand(4, PD), 2, 2, 0.5, noised=True)])
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        model.denoise(KVCache.empty(1), [0], rand(1, 4, PD), torch.tensor([0.5]), (3, 3))
    with pytest.raises(ValueError, match=r"expected \(4, 16\)"):
        model([[text(5), LatentSplit(rand(4, 8), 2, 2, 0.5, noised=True)]])
    with pytest.raises(ValueError, match="does not fit the 8x8 position table"):
        model([[text(5), LatentSplit(rand(18, PD), 9, 2, 0.5, noised=True)]])


# --- checkpoint format ----------------------------------------------------------------------------


def test_checkpoint_round_trips_every_key(tmp_path):
    model = random_model(seed=3)
    save_pretrained(model.state_dict(), ARGS, tmp_path / "a")
    byte_level_tokenizer().save_pretrained(tmp_path / "a")  # the special token ids come from here
    ema = load_file(str(tmp_path / "a" / EMA_NAME))
    # The tiny reference Bagel of backbones.md section 7.2 has 111 keys; spot-check Bagel's names.
    assert len(ema) == 111
    assert ema["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"].shape == (64, 64)
    assert ema["language_model.model.layers.0.mlp_moe_gen.down_proj.weight"].shape == (64, 128)
    assert ema["time_embedder.mlp.2.bias"].shape == (64,)
    assert ema["vit_model.vision_model.encoder.layers.1.self_attn.out_proj.weight"].shape == (24, 24)
    assert ema["vit_model.vision_model.embeddings.patch_embedding.weight"].shape == (24, 12)
    assert ema["latent_pos_embed.pos_embed"].shape == (64, 64)

    args, state = load_checkpoint(tmp_path / "a")
    assert args == ARGS
    save_pretrained(state, args, tmp_path / "b")
    again = load_file(str(tmp_path / "b" / EMA_NAME))
    assert again.keys() == ema.keys()
    assert all(torch.equal(again[k], ema[k]) for k in ema)
    for name in ("llm_config.json", "vit_config.json"):
        assert json.loads((tmp_path / "a" / name).read_text()) == json.loads((tmp_path / "b" / name).read_text())

    loaded = from_pretrained(tmp_path / "a")
    x = rand(1, 4, PD, seed=5)
    with torch.no_grad():
        want = model([[text(5), LatentSplit(x[0], 2, 2, 0.5, noised=True)]])[0]
        got = loaded([[text(5), LatentSplit(x[0], 2, 2, 0.5, noised=True)]])[0]
    assert torch.equal(got, want)


def test_adapter_names_what_is_wrong(tmp_path):
    model = random_model()
    ema = to_bagel(model.state_dict(), ARGS)
    missing = {k: v for k, v in ema.items() if k != "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys: layers\.1\.gen\.mlp\.up_proj\.weight"):
        from_bagel(missing, ARGS)
    with pytest.raises(ValueError, match="keys no rule maps: language_model.model.layers.0.self_attn.rotary"):
        from_bagel(ema | {"language_model.model.layers.0.self_attn.rotary.inv_freq": torch.zeros(8)}, ARGS)
    shifted = dict(ema, **{"latent_pos_embed.pos_embed": ema["latent_pos_embed.pos_embed"].roll(1, 0)})
    with pytest.raises(ValueError, match="latent_pos_embed.pos_embed differs from the 8x8 2-D sin-cos table"):
        from_bagel(shifted, ARGS)
    # bf16 checkpoints store the tables rounded; that is still the standard table.
    from_bagel({k: v.bfloat16() for k, v in ema.items()}, ARGS)
    (tmp_path / "llm_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="must be a Bagel directory holding ema.safetensors"):
        load_checkpoint(tmp_path)
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp_path / EMA_NAME))
    llm, _ = ARGS.to_configs()
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(FileNotFoundError, match="holds ViT weights but .*vit_config.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "vit_config.json").write_text(json.dumps(ARGS.to_configs()[1]))
    with pytest.raises(ValueError, match="lie outside the vocabulary of 272; .*tokenizer files"):
        load_checkpoint(tmp_path)  # no tokenizer files: the Qwen2.5 ids do not fit the tiny vocabulary


def test_7b_mot_from_released_configs_matches_the_published_checkpoint_layout():
    # llm_config.json / vit_config.json values of ByteDance-Seed/BAGEL-7B-MoT (backbones.md section 6.1).
    llm = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu")
    vit = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
               image_size=980, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    args = BagelArgs.from_configs(llm, vit)
    assert args == FLAVORS["7b_mot"]
    with torch.device("meta"):
        model = Bagel(args)
    state = model.state_dict()
    # Counts verified on Bagel's own code (section 6.4): 1223 keys, 14,607,260,128 elements, gen expert 6,525,628,928.
    assert len(state) == 1223
    assert sum(t.numel() for t in state.values()) == 14_607_260_128
    assert sum(p.numel() for p in model.gen_expert_parameters()) == 6_525_628_928
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        BagelArgs.from_configs(dict(llm, hidden_act="gelu"), vit)
