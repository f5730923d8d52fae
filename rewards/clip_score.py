"""CLIP score for any transformers CLIPModel: PickScore v1, and `toy_clipscore` on the toy CLIP."""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from rewards.common import check_loading_info, checkpoint_layers, follow_device, freeze, resolve_folder, torch_dtype
from rewards.preprocess import clip_preprocess
from rlr_cli.errors import UserError
from rlr_cli.prompts import count_overlong
from rlr_cli.ranges import Positive

CONFIG_FILES = ["*.json", "*.txt"]  # configs, tokenizer, preprocessor config: never a repo's other weights


def load_clip(path: str, cache_dir: str | None, what: str, key: str = "path"):
    """A transformers CLIPModel from a local folder or hub id, loaded strictly -> (model, local folder)."""
    from transformers import CLIPModel

    folder = resolve_folder(path, cache_dir=cache_dir, key=key, what=what, patterns=CONFIG_FILES, weights=True)
    try:
        loaded: Any = CLIPModel.from_pretrained(folder, output_loading_info=True)
        model, info = loaded
    except (OSError, ValueError) as error:
        raise UserError(f"{what}: cannot load a CLIPModel from {folder!r}: {str(error).splitlines()[0]}") from None
    check_loading_info(info, what)
    return model, folder


class ClipScore:
    """logit_scale.exp() * cosine(image, own prompt) of a CLIPModel; images (B,3,H,W) in [0,1] -> (B,).

    Preprocessing follows the processor folder's preprocessor_config.json (PickScore: the LAION CLIP-H
    processor, OpenAI CLIP values at 224; the toy CLIP: its own folder) unless overridden.
    """

    differentiable = True

    def __init__(
        self,
        *,
        path: str,
        processor_path: str | None,
        cache_dir: str | None,
        dtype: Literal["fp32", "bf16", "fp16"],
        gradient_checkpointing: bool,
        image_size: Positive | None,
        crop_size: Positive | None,
        mean: list[float] | None,
        std: list[float] | None,
        max_length: Positive,
    ):
        from transformers import AutoTokenizer

        what = "reward clip score"
        self.dtype = torch_dtype(dtype)
        model, folder = load_clip(path, cache_dir, what)
        processor = folder if processor_path is None else resolve_folder(
            processor_path, cache_dir=cache_dir, key="processor_path", what=what, patterns=CONFIG_FILES
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor)
        except (OSError, ValueError) as error:
            raise UserError(f"{what}: no tokenizer in {processor!r} (set reward.processor_path=): {error}") from None
        self.model = freeze(model, self.dtype)
        if gradient_checkpointing:
            checkpoint_layers(self.model.vision_model.encoder.layers)
            checkpoint_layers(self.model.text_model.encoder.layers)
        self.preprocess = clip_preprocess(  # PickScore's reference is transformers' CLIPProcessor: floored crop
            processor, model.config.vision_config.image_size, image_size, crop_size, mean, std, crop_offset="floor"
        )
        # A text tower with fewer positions (the toy CLIP has 16) cannot take longer token sequences.
        self.max_length = min(max_length, model.config.text_config.max_position_embeddings)

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        return count_overlong(self.tokenizer, prompts, self.max_length), self.max_length

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        follow_device([self.model], images.device)
        pixels = self.preprocess(images.float()).to(self.dtype)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        image_features = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
        text_features = self.model.get_text_features(**tokens).pooler_output.float()
        cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        return self.model.logit_scale.float().exp() * cosine
