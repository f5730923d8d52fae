"""ImageReward v1.0 on current transformers: BLIP ViT + BERT with cross-attention, [CLS] -> 5-layer head.

The original `ImageReward.pt` keys are renamed onto transformers' BlipVisionModel / BlipTextModel
(`rename_checkpoint`) and loaded strictly. Settings strict loading cannot catch are fixed here: vision
layer_norm_eps 1e-6, the text heads from med_config.json (12), no pooling layer, eval() always
(BLIP's ViT hard-wires drop-path 0.1).
"""
from __future__ import annotations

import json
import os
import re
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from rewards.common import (
    MLPHead,
    checkpoint_layers,
    follow_device,
    freeze,
    load_strict,
    read_state_dict,
    resolve_file,
    resolve_folder,
    torch_dtype,
)
from rewards.preprocess import ClipPreprocess
from rlr_cli.errors import UserError
from rlr_cli.prompts import count_overlong
from rlr_cli.ranges import Positive

SCORE_MEAN = 0.16717362830052426  # ImageReward's standardisation of the head output
SCORE_STD = 1.0333394966054072
VIT_LARGE_16 = {  # BLIP ViT-L/16 at 224, as ImageReward builds it (create_vit('large', 224))
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 16,
    "image_size": 224,
}
EMBED_DIM = 256  # BLIP's vision_proj / text_proj width (unused by the score, present in the checkpoint)

# original key (after the `blip.visual_encoder.` prefix) -> transformers BlipVisionModel key
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
_PREFIXES = [  # original prefix -> ours; text encoder keys are the same below the prefix
    ("blip.visual_encoder.", "vision_model."),
    ("blip.text_encoder.", "text_model."),
    ("blip.vision_proj.", "vision_proj."),
    ("blip.text_proj.", "text_proj."),
    ("mlp.", "head."),
]
_DROPPED = {"blip.text_encoder.embeddings.position_ids"}  # a buffer transformers rebuilds (non-persistent)
_VISION_TO_ORIGINAL = [  # the inverse of _VISION_RENAMES
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]


def original_key(key: str) -> str:
    """An ImageRewardModel key -> its name in ImageReward.pt (blip.visual_encoder.*, mlp.layers.*, ...)."""
    prefix, rest = key.split(".", 1)
    if prefix == "vision_model":
        for pattern, replacement in _VISION_TO_ORIGINAL:
            rest = re.sub(pattern, replacement, rest)
    original = {new.rstrip("."): old for old, new in _PREFIXES}.get(prefix, prefix + ".")
    return original + rest


def rename_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ImageReward.pt keys -> ImageRewardModel keys; unknown keys pass unchanged (strict loading flags them)."""
    renamed = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue
        new = key
        for old_prefix, new_prefix in _PREFIXES:
            if key.startswith(old_prefix):
                rest = key[len(old_prefix):]
                if old_prefix == "blip.visual_encoder.":
                    for pattern, replacement in _VISION_RENAMES:
                        rest = re.sub(pattern, replacement, rest)
                new = new_prefix + rest
                break
        renamed[new] = value
    return renamed


class ImageRewardModel(nn.Module):
    """BLIP vision tower + cross-attending text tower + head: (pixels (B,3,224,224), ids, mask) -> (B,)."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_model = BlipTextModel(text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(vision_config.hidden_size, EMBED_DIM)
        self.text_proj = nn.Linear(text_config.hidden_size, EMBED_DIM)
        self.head = MLPHead(text_config.hidden_size)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,  # bidirectional self-attention, as BLIP's text encoder
        ).last_hidden_state
        return self.head(text[:, 0])


def build_configs(med_config: dict, vision_config: dict | None):
    """med_config.json (BERT) + ViT settings -> (BlipVisionConfig, BlipTextConfig)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(**{**VIT_LARGE_16, **(vision_config or {}), "layer_norm_eps": 1e-6, "hidden_act": "gelu"})
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None,  # generation ids: unused by the encoder, and out of range in small vocabularies
        sep_token_id=None,
        encoder_hidden_size=vision.hidden_size,  # BLIP sets encoder_width to the ViT width
        is_decoder=True,  # builds the cross-attention layers; forward runs with is_decoder=False
    )
    return vision, text


def load_tokenizer(path: str, cache_dir: str | None, what: str):
    """BERT tokenizer with ImageReward's [DEC] (bos) and [ENC] tokens added."""
    from transformers import BertTokenizer

    folder = resolve_folder(path, cache_dir=cache_dir, key="tokenizer_path", what=what, patterns=["*.json", "*.txt"])
    try:
        tokenizer = BertTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"{what}: no BERT tokenizer in {folder!r} (set reward.tokenizer_path=): {error}") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward:
    """ImageReward v1.0; images (B,3,H,W) in [0,1], prompts -> (B,), standardised (SD 1.4 about 0.13)."""

    differentiable = True

    def __init__(
        self,
        *,
        path: str,
        tokenizer_path: str,
        cache_dir: str | None,
        dtype: Literal["fp32", "bf16", "fp16"],
        gradient_checkpointing: bool,
        vision_config: dict | None,
        max_length: Positive,
    ):
        what = "reward imagereward"
        self.dtype = torch_dtype(dtype)
        # path: a folder (local or hub repo) holding ImageReward.pt and med_config.json, or the .pt file
        base = os.path.dirname(path) if os.path.isfile(path) else path.rstrip("/")
        weights = path if os.path.isfile(path) else f"{base}/ImageReward.pt"
        weights = resolve_file(weights, cache_dir=cache_dir, key="path", what=what)
        config_file = resolve_file(f"{base}/med_config.json", cache_dir=cache_dir, key="path", what=what)
        with open(config_file) as file:
            med_config = json.load(file)
        vision, text = build_configs(med_config, vision_config)
        self.tokenizer = load_tokenizer(tokenizer_path, cache_dir, what)
        if len(self.tokenizer) != text.vocab_size:
            raise UserError(
                f"{what}: tokenizer has {len(self.tokenizer)} tokens with [DEC]/[ENC], the text model "
                f"{text.vocab_size}; set reward.tokenizer_path= to bert-base-uncased"
            )
        model = ImageRewardModel(vision, text)
        load_strict(model, rename_checkpoint(read_state_dict(weights, what)), f"{what} {weights}", original_key)
        self.model = freeze(model, self.dtype)
        if gradient_checkpointing:
            checkpoint_layers(self.model.vision_model.encoder.layers)
            checkpoint_layers(self.model.text_model.encoder.layer)
        side = int(vision.image_size)  # type: ignore[arg-type]  (an int in every BLIP config)
        self.preprocess = ClipPreprocess(side, side)
        self.max_length = max_length

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        return count_overlong(self.tokenizer, prompts, self.max_length), self.max_length

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        follow_device([self.model], images.device)
        pixels = self.preprocess(images.float()).to(self.dtype)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        raw = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        return ((raw - SCORE_MEAN) / SCORE_STD).float()
