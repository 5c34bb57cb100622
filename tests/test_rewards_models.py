"""Model-based rewards on tiny random models saved by the test in the real checkpoint layouts.

Each reward is compared with the reference's formula computed independently here (the reference
scorer's own transformers calls, or a plain-torch forward of the original architecture).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from titan_flow.rewards import build_reward

transformers = pytest.importorskip("transformers")

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red cube on a table", "two dogs", "a photo of a cat", 'a sign that says "hello"']


def images(n=4, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def reference_pil(x: torch.Tensor) -> list[Image.Image]:
    """The reference's conversion, written out: round(255 x), NCHW -> NHWC, PIL."""
    a = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    return [Image.fromarray(im) for im in a]


# ---------------------------------------------------------------------------- tiny model builders


def byte_level_vocab(suffix: str = "") -> dict[str, int]:
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    if suffix:
        vocab.update({c + suffix: len(chars) + i for i, c in enumerate(chars)})
    return vocab


def tiny_clip_dir(path, image_size=32, seed=0):
    """A CLIP model + processor in the layout of openai/clip-vit-large-patch14 (and of PickScore)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = byte_level_vocab("</w>")
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
            patch_size=8,
        ),
        projection_dim=24,
        logit_scale_init_value=2.3,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


def load_reference_clip(path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def pooled(out):
    """get_*_features returns a tensor in transformers 4 and a model output (pooler_output) in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------- CLIP family


def test_pickscore_matches_reference_formula(clip_dir):
    x = images()
    ours = build_reward("pickscore", str(clip_dir), "cpu")(x, PROMPTS, [{}] * 4)["score"]

    model, processor = load_reference_clip(clip_dir)
    with torch.no_grad():
        img_in = processor(images=reference_pil(x), padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt_in = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = pooled(model.get_image_features(**img_in))
        txt = pooled(model.get_text_features(**txt_in))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * (txt @ img.T)).diag() / 26
    print("pickscore", ours.tolist(), "max abs diff", (ours - expected).abs().max().item())
    assert ours.shape == (4,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert ours.std() > 0  # different prompts/images give different scores


def test_pickscore_batches_do_not_change_scores(clip_dir):
    x = images()
    full = build_reward("pickscore", str(clip_dir), "cpu")(x, PROMPTS, [{}] * 4)["score"]
    small = build_reward("pickscore", str(clip_dir), "cpu", batch_size=3)(x, PROMPTS, [{}] * 4)["score"]
    torch.testing.assert_close(full, small, atol=1e-6, rtol=1e-5)


def test_clipscore_matches_reference_formula(clip_dir):
    x = images()  # already crop-sized: the tensor transform is only the normalisation
    ours = build_reward("clipscore", str(clip_dir), "cpu")(x, PROMPTS, [{}] * 4)["score"]

    model, processor = load_reference_clip(clip_dir)
    with torch.no_grad():
        text = processor(text=PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
        logits = model(pixel_values=(x - CLIP_MEAN) / CLIP_STD, **text).logits_per_image
    expected = logits.diagonal() / 30
    print("clipscore max abs diff", (ours - expected).abs().max().item())
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_clip_tensor_transform_resizes_short_edge_then_center_crops(clip_dir):
    from titan_flow.rewards.clip import load_processor, tensor_transform

    transform = tensor_transform(load_processor(clip_dir).image_processor)
    x = images(2, h=48, w=64)
    # short edge 48 -> 32, long edge int(32 * 64 / 48) = 42, then a 32 x 32 crop starting at column round(10 / 2) = 5
    resized = F.interpolate(x, size=(32, 42), mode="bilinear", align_corners=False, antialias=True)
    expected = (resized[..., :, 5:37] - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(transform(x), expected, atol=0, rtol=0)
    tall = images(1, h=70, w=32)  # short edge already 32: no resize, crop rows round(38 / 2) = 19 ...
    torch.testing.assert_close(transform(tall), (tall[..., 19:51, :] - CLIP_MEAN) / CLIP_STD, atol=0, rtol=0)


def test_image_similarity(clip_dir):
    reward = build_reward("image_similarity", str(clip_dir), "cpu")
    x = images()
    same = reward(x, PROMPTS, [{}] * 4, ref_images=x)["score"]
    torch.testing.assert_close(same, torch.ones(4), atol=1e-6, rtol=0)

    refs = images(seed=1)
    by_tensor = reward(x, PROMPTS, [{}] * 4, ref_images=refs)["score"]
    by_pil = reward(x, PROMPTS, [{}] * 4, ref_images=reference_pil(refs))["score"]
    torch.testing.assert_close(by_tensor, by_pil, atol=2e-3, rtol=0)  # PIL refs are 8-bit

    model, _ = load_reference_clip(clip_dir)
    with torch.no_grad():
        a = pooled(model.get_image_features(pixel_values=(x - CLIP_MEAN) / CLIP_STD))
        b = pooled(model.get_image_features(pixel_values=(refs - CLIP_MEAN) / CLIP_STD))
    expected = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)
    torch.testing.assert_close(by_tensor, expected, atol=1e-6, rtol=1e-5)
    assert (by_tensor < 1 - 1e-4).all()

    with pytest.raises(ValueError, match="ref_images"):
        reward(x, PROMPTS, [{}] * 4)


class LaionHead(nn.Module):
    """The improved-aesthetic-predictor MLP, as LAION's checkpoint stores it (keys layers.N.*)."""

    def __init__(self, dim):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
            nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )


def test_aesthetic_matches_reference(tmp_path):
    path = tiny_clip_dir(tmp_path / "aesthetic")
    torch.manual_seed(3)
    head = LaionHead(24).eval()
    torch.save(head.state_dict(), path / "sac+logos+ava1-l14-linearMSE.pth")
    x = images()
    ours = build_reward("aesthetic", str(path), "cpu")(x, PROMPTS, [{}] * 4)["score"]

    model, processor = load_reference_clip(path)
    with torch.no_grad():
        u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
        inputs = processor(images=u8, return_tensors="pt")
        embed = pooled(model.get_image_features(**inputs))
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        expected = head.layers(embed).squeeze(1)
    print("aesthetic", ours.tolist(), "max abs diff", (ours - expected).abs().max().item())
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_missing_weights_name_the_config_field(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match=r"reward\.model_paths\.pickscore"):
        build_reward("pickscore", None, "cpu")
    with pytest.raises(FileNotFoundError, match=r"reward\.model_paths\.clipscore = .*does not exist"):
        build_reward("clipscore", str(tmp_path / "nowhere"), "cpu")
    # a CLIP directory without LAION's head file
    with pytest.raises(FileNotFoundError, match=r"reward\.model_paths\.aesthetic .*sac\+logos\+ava1-l14-linearMSE\.pth"):
        build_reward("aesthetic", str(clip_dir), "cpu")


# ---------------------------------------------------------------------------- ImageReward

IR_VISION, IR_TEXT, IR_DEPTH, IR_PATCH, IR_IMAGE = 128, 32, 2, 16, 32  # 2 vision heads of 64, as BLIP
IR_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "on", "table", "two", "dogs", "photo",
            "of", "cat", "sign", "that", "says", "hello", '"']


def tiny_imagereward_dir(path, seed=0):
    """ImageReward.pt with the original key names, med_config.json and a bert-style vocab.txt."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(IR_WORDS) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": IR_TEXT, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(IR_WORDS) + 2,
           "encoder_width": 768, "add_cross_attention": True}
    (path / "med_config.json").write_text(json.dumps(med))
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=g)

    D, H, P, n_pos = IR_VISION, IR_TEXT, IR_PATCH, (IR_IMAGE // IR_PATCH) ** 2 + 1
    sd = {"blip.visual_encoder.cls_token": r(1, 1, D), "blip.visual_encoder.pos_embed": r(1, n_pos, D),
          "blip.visual_encoder.patch_embed.proj.weight": r(D, 3, P, P, scale=0.05),
          "blip.visual_encoder.patch_embed.proj.bias": r(D)}
    for i in range(IR_DEPTH):
        b = f"blip.visual_encoder.blocks.{i}."
        sd.update({b + "norm1.weight": r(D, offset=1), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D, scale=0.1),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D, scale=0.1), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": r(D, offset=1), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D, scale=0.1),
                   b + "mlp.fc1.bias": r(4 * D), b + "mlp.fc2.weight": r(D, 4 * D, scale=0.05), b + "mlp.fc2.bias": r(D)})
    sd.update({"blip.visual_encoder.norm.weight": r(D, offset=1), "blip.visual_encoder.norm.bias": r(D),
               "blip.vision_proj.weight": r(256, D), "blip.vision_proj.bias": r(256),
               "blip.text_proj.weight": r(256, H), "blip.text_proj.bias": r(256)})
    t = "blip.text_encoder."
    sd.update({t + "embeddings.word_embeddings.weight": r(med["vocab_size"], H, scale=1),
               t + "embeddings.position_embeddings.weight": r(40, H, scale=1),
               t + "embeddings.LayerNorm.weight": r(H, offset=1), t + "embeddings.LayerNorm.bias": r(H),
               t + "embeddings.position_ids": torch.arange(40)[None]})
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        for att, kv_dim in (("attention", H), ("crossattention", D)):
            sd.update({b + f"{att}.self.query.weight": r(H, H), b + f"{att}.self.query.bias": r(H),
                       b + f"{att}.self.key.weight": r(H, kv_dim), b + f"{att}.self.key.bias": r(H),
                       b + f"{att}.self.value.weight": r(H, kv_dim), b + f"{att}.self.value.bias": r(H),
                       b + f"{att}.output.dense.weight": r(H, H), b + f"{att}.output.dense.bias": r(H),
                       b + f"{att}.output.LayerNorm.weight": r(H, offset=1), b + f"{att}.output.LayerNorm.bias": r(H)})
        sd.update({b + "intermediate.dense.weight": r(64, H), b + "intermediate.dense.bias": r(64),
                   b + "output.dense.weight": r(H, 64), b + "output.dense.bias": r(H),
                   b + "output.LayerNorm.weight": r(H, offset=1), b + "output.LayerNorm.bias": r(H)})
    for idx, (o, i_) in zip((0, 2, 4, 6, 7), ((1024, H), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"mlp.layers.{idx}.weight"] = r(o, i_, scale=1 / math.sqrt(i_))
        sd[f"mlp.layers.{idx}.bias"] = r(o)
    torch.save(sd, path / "ImageReward.pt")
    return path, sd


def reference_imagereward(sd, pixels, input_ids, attention_mask):
    """ImageReward's score written out from the original BLIP definitions (timm ViT + BERT with cross-attention)."""
    v, t, D, H = "blip.visual_encoder.", "blip.text_encoder.", IR_VISION, IR_TEXT

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])

    def ln(x, key, eps):
        return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps)

    def heads_split(x, n):
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    B = pixels.shape[0]
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=IR_PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(IR_DEPTH):
        b = f"{v}blocks.{i}."
        y = ln(x, b + "norm1", 1e-6)
        q, k, val = lin(y, b + "attn.qkv").view(B, -1, 3, D // 64, 64).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * 64**-0.5).softmax(-1) @ val
        x = x + lin(y.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    L = input_ids.shape[1]
    h = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0

    def attention(prefix, h, kv, bias):
        q, k, val = (heads_split(lin(a, f"{prefix}.self.{n}"), 2) for a, n in ((h, "query"), (kv, "key"), (kv, "value")))
        ctx = ((q @ k.transpose(-2, -1)) / math.sqrt(H // 2) + bias).softmax(-1) @ val
        return ln(lin(ctx.transpose(1, 2).reshape(B, L, H), f"{prefix}.output.dense") + h, f"{prefix}.output.LayerNorm", 1e-12)

    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        h = attention(b + "attention", h, h, pad_bias)
        h = attention(b + "crossattention", h, image, 0.0)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    x = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        x = lin(x, f"mlp.layers.{idx}")
    return (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_matches_original_architecture(tmp_path):
    from transformers import BertTokenizer

    path, sd = tiny_imagereward_dir(tmp_path / "imagereward")
    x = images()
    prompts = ["a red cube on a table", "two dogs", "a photo of a cat", 'a sign that says "hello"']
    ours = build_reward("imagereward", str(path), "cpu")(x, prompts, [{}] * 4)["score"]

    tok = BertTokenizer.from_pretrained(str(path))
    text = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (text["attention_mask"] == 0).any()  # padding is exercised
    pixels = (x * 255).round().clamp(0, 255) / 255  # 32 px images: resize and crop are identities
    with torch.no_grad():
        expected = reference_imagereward(sd, (pixels - CLIP_MEAN) / CLIP_STD, text["input_ids"], text["attention_mask"])
    print("imagereward", ours.tolist(), "max abs diff", (ours - expected).abs().max().item())
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-3


def test_imagereward_preprocess_geometry():
    from titan_flow.rewards.imagereward import preprocess

    im = reference_pil(images(1, h=48, w=64))[0]
    # short edge 48 -> 32 (bicubic), long edge int(32 * 64 / 48) = 42, then columns 5..37
    expected = np.asarray(im.resize((42, 32), Image.BICUBIC), dtype=np.float32)[:, 5:37] / 255.0
    expected = (torch.from_numpy(expected).permute(2, 0, 1)[None] - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(preprocess([im], 32), expected, atol=1e-6, rtol=0)


def test_imagereward_rejects_unknown_checkpoint_keys(tmp_path):
    path, sd = tiny_imagereward_dir(tmp_path / "imagereward")
    sd["blip.visual_encoder.extra_layer.weight"] = torch.zeros(1)
    torch.save(sd, path / "ImageReward.pt")
    with pytest.raises(KeyError, match="extra_layer"):
        build_reward("imagereward", str(path), "cpu")


# ---------------------------------------------------------------------------- QwenVL

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwenvl_dir(path, seed=0):
    """Qwen2.5-VL in the hub layout: model, byte-level tokenizer with a Qwen chat template, image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE(vocab=byte_level_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS, chat_template=QWEN_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}, **special,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[1],
            window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **special,
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "text, score",
    [
        ("<Thought>sharp and vivid</Thought>\n<Score>4</Score>", 0.8),
        ("<Score>5</Score>", 1.0),
        ("<Score>1</Score> and later <Score>3</Score>", 0.2),  # the first one counts
        ("no tags at all", 0.0),
        ("<Score>4.5</Score>", 0.0),  # decimals do not parse, as upstream
        ("<Score> 4 </Score>", 0.0),
        ("<score>4</score>", 0.0),
        ("<Score>X</Score>", 0.0),
        ("", 0.0),
        ("<Score>10</Score>", 2.0),  # upstream does not clamp
    ],
)
def test_qwenvl_score_parser(text, score):
    from titan_flow.rewards.qwenvl import parse_score

    assert parse_score(text) == pytest.approx(score)


def test_qwenvl_tiny_model_scores_its_own_answers(tmp_path):
    from titan_flow.rewards.qwenvl import RUBRIC, parse_score

    path = tiny_qwenvl_dir(tmp_path / "qwenvl")
    reward = build_reward("qwenvl", str(path), "cpu", dtype="float32", max_new_tokens=6, batch_size=2)
    assert RUBRIC.strip() in reward.prompt and reward.prompt.endswith("<|im_start|>assistant\n")
    x = images(3, h=32, w=48)
    out = reward(x, PROMPTS[:3], [{}] * 3)["score"]
    answers = reward.generate(reference_pil(x))  # greedy: the same answers again
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out.tolist() == [parse_score(a) for a in answers]
    assert out.tolist() == [0.0, 0.0, 0.0]  # a random tiny model writes no <Score> tag
