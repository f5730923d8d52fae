"""Toy CLIP: a transformers `CLIPModel` trained contrastively on the toy captions.

Scores are PickScore-style: `logit_scale.exp() * cosine(image_embeds, text_embeds)`.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from rlr_cli.toy import data
from rlr_cli.toy.tokenizer import MAX_LENGTH

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics, written to preprocessor_config.json
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
WIDTH = 64  # hidden and projection width of both towers


def build_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    """An untrained toy CLIPModel (~254 k params) whose text config carries the tokenizer's special ids."""
    ids: dict[str, Any] = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=WIDTH, **ids)
    vision = dict(image_size=data.IMAGE_SIZE, patch_size=4, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=WIDTH)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH, **ids)
    return CLIPModel(config)


def image_processor() -> CLIPImageProcessor:
    """The preprocessing the toy CLIP was trained with (32 px, no crop effect, OpenAI mean/std)."""
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": data.IMAGE_SIZE}, do_center_crop=True,
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


def normalize(images: Tensor) -> Tensor:
    """images (B,3,32,32) in [0,1] -> pixel_values (B,3,32,32) as the processor would give."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def text_embeds(model: Any, tokenizer: CLIPTokenizer, texts: list[str]) -> Tensor:
    """texts -> L2-normalised text embeddings (N, WIDTH)."""
    tok = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    tok = tok.to(model.device)
    feats = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
    return F.normalize(feats, dim=-1)


def image_embeds(model: Any, images: Tensor) -> Tensor:
    """images (B,3,32,32) in [0,1] -> L2-normalised image embeddings (B, WIDTH)."""
    pixels = normalize(images.to(model.device))
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def contrastive_loss(model: Any, tokenizer: CLIPTokenizer, images: Tensor, texts: list[str]) -> Tensor:
    """Symmetric InfoNCE where every item with the same caption is a positive (soft targets)."""
    img = image_embeds(model, images)
    txt = text_embeds(model, tokenizer, texts)
    logits = model.logit_scale.exp() * img @ txt.T
    index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = torch.tensor([index[t] for t in texts], device=logits.device)
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())


def train_clip(model: Any, tokenizer: CLIPTokenizer, steps: int, minutes: float, batch_size: int = 256,
               lr: float = 1e-3, seed: int = 0, device: str = "cpu") -> dict:
    """Train in place for `steps` or `minutes`, whichever ends first; returns {"steps", "seconds", "loss"}."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, step, loss = time.time(), 0, torch.tensor(0.0)
    with tqdm(total=steps, desc="toy CLIP", unit="step") as bar:
        while step < steps and time.time() - start < minutes * 60:
            images, _, texts = data.batch(batch_size, seed=seed * 1_000_003 + step)
            loss = contrastive_loss(model, tokenizer, images, texts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().cpu()
    return {"steps": step, "seconds": time.time() - start, "loss": loss.item()}


@torch.no_grad()
def zero_shot(model: Any, tokenizer: CLIPTokenizer, images: Tensor, labels: data.Labels) -> dict[str, float]:
    """Zero-shot accuracy over all 192 captions: exact caption and each attribute of the argmax caption."""
    prompts = data.all_captions()
    txt = text_embeds(model, tokenizer, prompts)
    pred = (image_embeds(model, images) @ txt.T).argmax(1).cpu()
    parsed = [data.parse_caption(prompts[int(i)]) for i in pred]
    acc = {}
    for attr in ("shape", "colour", "background", "size"):
        truth = getattr(labels, attr)
        acc[attr] = float((torch.tensor([p[attr] for p in parsed]) == truth).float().mean())
    truth_caps = data.captions(labels)
    acc["caption"] = sum(prompts[int(i)] == t for i, t in zip(pred, truth_caps)) / len(truth_caps)
    return acc
