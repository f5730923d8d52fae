"""model=tiny: an SD-1.5-shaped pipeline with random weights, built offline and saved once to a cache folder.

It is then loaded through the very same `from_pretrained` path as a hub model, so every loading code
path is exercised without a hub. Its images are noise: it checks plumbing, not learning.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# The tiny model: SD 1.x's classes at toy widths (configs as dicts: diffusers' tuple annotations are too narrow).
TINY_TEXT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 projection_dim=32)
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    sample_size=64,
)


def build_tokenizer(directory: str):
    """A real CLIPTokenizer over byte-level characters (no merges): every word is spelt out."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(chars + [c + "</w>" for c in chars] + list(SPECIAL_TOKENS))}
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    Path(vocab_file).write_text(json.dumps(vocab))
    Path(merges_file).write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token="<|endoftext|>")


def random_sd_pipeline(text: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any], seed: int = 0) -> Any:
    """A StableDiffusionPipeline of SD 1.x's classes and scheduler with random weights, from configs:
    text (CLIPTextConfig fields), unet (UNet2DConditionModel's), vae (AutoencoderKL's)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(scratch)
    fields: dict[str, Any] = text | {"vocab_size": len(tokenizer), "max_position_embeddings": 77,
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(**fields))
    scheduler = DDIMScheduler(  # Stable Diffusion 1.x's schedule
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    components: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "scheduler": scheduler}
    return StableDiffusionPipeline(vae=AutoencoderKL(**vae), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**unet), requires_safety_checker=False, **components)


def build_tiny_pipeline(seed: int = 0) -> Any:
    """StableDiffusionPipeline with SD 1.5's component classes and scheduler, tiny widths, random weights."""
    return random_sd_pipeline(TINY_TEXT, TINY_UNET, TINY_VAE, seed)


def ensure_tiny_pipeline(cache_dir: str, seed: int = 0) -> str:
    """Folder of the tiny pipeline for `seed`, built and saved atomically on first use."""
    folder = Path(cache_dir).expanduser() / f"tiny-sd-seed{seed}"
    if (folder / "model_index.json").exists():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-"))
    build_tiny_pipeline(seed).save_pretrained(scratch, safe_serialization=True)
    try:
        scratch.rename(folder)
    except OSError:  # another process won the race: its folder is as good as ours
        shutil.rmtree(scratch, ignore_errors=True)
    return str(folder)


def ensure_tiny_shortcut(cache_dir: str, seed: int = 0, rank: int = 8) -> str:
    """Folder of a random LoRA of the tiny UNet in diffusers format, built once: a PLUMBING STAND-IN for
    estimator=shortft on model=tiny (it checks loading and gradient flow; it is no few-step model)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from rlr_cli import lora
    from rlr_cli.models.sd import UNetLoraFormat

    folder = Path(cache_dir).expanduser() / f"tiny-shortcut-standin-seed{seed}"
    if (folder / "pytorch_lora_weights.safetensors").exists():
        return str(folder)
    modules = ["to_q", "to_v", "proj_in", "conv1"]
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_pipeline(cache_dir, seed), subfolder="unet")
    torch.manual_seed(seed + 1)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules),
                     adapter_name="standin")
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.05)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-shortcut-"))
    lora.write(scratch, unet, UNetLoraFormat(), lora.metadata(rank, rank, modules), adapter="standin")
    try:
        scratch.rename(folder)
    except OSError:  # another process won the race
        shutil.rmtree(scratch, ignore_errors=True)
    return str(folder)
