"""Human Preference Score v2.0 / v2.1: a fine-tuned open_clip ViT-H-14; score = cosine(image, prompt)."""
from __future__ import annotations

from typing import Any, Literal, Sequence

from torch import Tensor

from rewards.common import (
    checkpoint_layers,
    follow_device,
    freeze,
    load_strict,
    read_state_dict,
    resolve_file,
    torch_dtype,
)
from rewards.preprocess import ClipPreprocess, _rgb
from rlr_cli.errors import UserError

UNCUT = 1024  # tokens: longer than any prompt, to count the ones the reward's context cuts

HUB_FILES = {"v2.0": "xswu/HPSv2/HPS_v2_compressed.pt", "v2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt"}


class HPSv2:
    """cosine of L2-normalised image and text features, no logit scale; images (B,3,H,W) in [0,1] -> (B,).

    About 0.25-0.28 on SD images (papers report x100).
    """

    differentiable = True

    def __init__(
        self,
        *,
        version: Literal["v2.0", "v2.1"],
        path: str | None,
        cache_dir: str | None,
        dtype: Literal["fp32", "bf16", "fp16"],
        gradient_checkpointing: bool,
        model_config: dict | None,
    ):
        import open_clip

        what = f"reward hps {version}"
        if version not in HUB_FILES:
            raise UserError(f"reward hps: version {version!r} is not one of {sorted(HUB_FILES)}")
        self.dtype = torch_dtype(dtype)
        weights = resolve_file(path or HUB_FILES[version], cache_dir=cache_dir, key="path", what=what)
        checkpoint: Any = read_state_dict(weights, what)  # {"state_dict": ...}
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UserError(f"{what}: {weights!r} has no 'state_dict' entry; is it an HPS checkpoint?")
        # model_config (embed_dim / vision_cfg / text_cfg) replaces parts of ViT-H-14: for stand-ins only
        parts: dict[str, Any] = dict(model_config or {})
        model = open_clip.create_model("ViT-H-14", pretrained=None, **parts)
        load_strict(model, checkpoint["state_dict"], f"{what} {weights}")
        self.model = freeze(model, self.dtype)
        if gradient_checkpointing:
            checkpoint_layers(self.model.visual.transformer.resblocks)
            checkpoint_layers(self.model.transformer.resblocks)
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14", context_length=self.model.context_length)
        config = self.model.visual.preprocess_cfg
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        # hpsv2's initialize_model uses light_augmentation=True: ResizeMaxSize, not resize-and-crop
        self.preprocess = ClipPreprocess(size, size, _rgb(config["mean"]), _rgb(config["std"]), resize="longest")

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        limit = int(self.model.context_length)  # start and end tokens included
        lengths = (self.tokenizer(list(prompts), context_length=UNCUT) != 0).sum(dim=1)
        return int((lengths > limit).sum()), limit

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        follow_device([self.model], images.device)
        pixels = self.preprocess(images.float()).to(self.dtype)
        tokens = self.tokenizer(list(prompts)).to(images.device)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        text_features = self.model.encode_text(tokens, normalize=True).float()
        return (image_features * text_features).sum(dim=-1)
