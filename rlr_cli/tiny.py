"""model=tiny, tiny_sdxl, tiny_sd3, tiny_flux: pipelines of each family's real classes at toy widths with
random weights, built offline and saved once to a cache folder.

They are then loaded through the very same `from_pretrained` path as a hub model, so every loading code
path is exercised without a hub. Their images are noise: they check plumbing, not learning.
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
TINY_SHIFTED_VAE: dict[str, Any] = TINY_VAE | dict(shift_factor=0.1, scaling_factor=1.5)  # SD3 / FLUX VAEs shift latents


def build_t5_tokenizer():
    """A real T5 tokenizer (tokenizers backend) over a character-level unigram vocabulary (pad 0, eos 1, unk 2, as T5's)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in string.printable] + [("\u2581" + c, -1.0) for c in string.ascii_letters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5Tokenizer(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


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


def _clip_parts(tokenizer: Any) -> tuple[dict[str, Any], Any]:
    """(CLIPTextConfig fields of the tiny text tower for tokenizer, the tokenizer)."""
    return TINY_TEXT | {"vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}, tokenizer


def _tokenizer() -> Any:
    with tempfile.TemporaryDirectory() as scratch:
        return build_tokenizer(scratch)


def _tiny_t5(width: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(build_t5_tokenizer()), d_model=width, d_kv=8, d_ff=2 * width,
                                   num_layers=2, num_heads=4))


def _sd_scheduler(scheduler_class: Any) -> Any:
    return scheduler_class(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           set_alpha_to_one=False, steps_offset=1)


def build_tiny_sdxl(seed: int = 0) -> Any:
    """StableDiffusionXLPipeline of SDXL's classes: two CLIP towers (the second with projection, pooled), a UNet
    with text_time micro-conditioning; tiny widths, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    fields, tokenizer = _clip_parts(_tokenizer())
    width = TINY_TEXT["hidden_size"]
    unet = UNet2DConditionModel(**TINY_UNET | dict(  # cross-attention reads both towers' hidden states side by side
        cross_attention_dim=2 * width, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TINY_TEXT["projection_dim"] + 6 * 8))
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**fields)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**fields)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=_sd_scheduler(DDIMScheduler), add_watermarker=False)


def build_tiny_sd3(seed: int = 0) -> Any:
    """StableDiffusion3Pipeline of SD3's classes: MMDiT, two CLIP towers with projection, a T5 encoder, a VAE
    with a latent shift, the flow-matching scheduler (shift 3, as SD3.5); tiny widths, random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    fields, tokenizer = _clip_parts(_tokenizer())
    joint = 2 * TINY_TEXT["hidden_size"]  # both CLIP towers' hidden states side by side; T5's width matches
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint, caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_TEXT["projection_dim"], pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=AutoencoderKL(**TINY_SHIFTED_VAE),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**fields)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**fields)), tokenizer_2=tokenizer,
        text_encoder_3=_tiny_t5(joint), tokenizer_3=build_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def build_tiny_flux(seed: int = 0) -> Any:
    """FluxPipeline of FLUX.1-dev's classes: guidance-embedding MMDiT on packed latents, CLIP (pooled) and T5,
    the dynamically shifted flow scheduler; tiny widths, random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    fields, tokenizer = _clip_parts(_tokenizer())
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * TINY_VAE["latent_channels"], num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
        pooled_projection_dim=TINY_TEXT["hidden_size"], guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, vae=AutoencoderKL(**TINY_SHIFTED_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**fields)), tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(64), tokenizer_2=build_t5_tokenizer(), scheduler=scheduler)


def build_tiny_pipeline(seed: int = 0) -> Any:
    """StableDiffusionPipeline with SD 1.5's component classes and scheduler, tiny widths, random weights."""
    return random_sd_pipeline(TINY_TEXT, TINY_UNET, TINY_VAE, seed)


BUILDERS = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def ensure_tiny_pipeline(cache_dir: str, family: str, seed: int = 0) -> str:
    """Folder of the tiny pipeline of `family` (sd | sdxl | sd3 | flux) for `seed`, built and saved atomically
    on first use."""
    folder = Path(cache_dir).expanduser() / f"tiny-{family}-seed{seed}"
    if (folder / "model_index.json").exists():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-"))
    BUILDERS[family](seed).save_pretrained(scratch, safe_serialization=True)
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
    from rlr_cli.models.sd import StableDiffusion

    folder = Path(cache_dir).expanduser() / f"tiny-shortcut-standin-seed{seed}"
    if (folder / "pytorch_lora_weights.safetensors").exists():
        return str(folder)
    modules = ["to_q", "to_v", "proj_in", "conv1"]
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_pipeline(cache_dir, "sd", seed), subfolder="unet")
    torch.manual_seed(seed + 1)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules),
                     adapter_name="standin")
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.05)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-shortcut-"))
    lora.write(scratch, unet, StableDiffusion.lora_format, lora.metadata(rank, rank, modules), adapter="standin")
    try:
        scratch.rename(folder)
    except OSError:  # another process won the race
        shutil.rmtree(scratch, ignore_errors=True)
    return str(folder)
