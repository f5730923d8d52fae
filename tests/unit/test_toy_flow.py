"""Fast checks of the toy flow model (toy_flow) on its committed StableDiffusion3Pipeline folder (CPU, seconds)."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import CLIPModel, CLIPTokenizer

from rlr_cli.toy import assets, data, flow

PROMPTS = ["a large red circle on a white background", "a small blue cross on a black background"]


@pytest.fixture(scope="module")
def pipe() -> Any:
    pipe: Any = StableDiffusion3Pipeline.from_pretrained(flow.PIPELINE_DIR, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_small_safetensors_only_and_sd3_shaped(pipe):
    files = [f for f in flow.PIPELINE_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert len(weights) == 4 and all(f.suffix == ".safetensors" for f in weights)  # transformer, vae, 2 CLIPs
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    cfg = pipe.transformer.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels) == (8, 4, 4)
    assert cfg.joint_attention_dim == 2 * pipe.text_encoder.config.hidden_size
    assert cfg.pooled_projection_dim == 2 * pipe.text_encoder.config.projection_dim
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae.config.scaling_factor == 1.0 and pipe.vae.config.shift_factor == 0.0


def test_both_text_encoders_are_the_toy_clip_text_tower(pipe):
    clip: Any = CLIPModel.from_pretrained(assets.CLIP_DIR).eval()
    ids = CLIPTokenizer.from_pretrained(assets.CLIP_DIR)(PROMPTS + [""], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        want = clip.get_text_features(ids.input_ids)
        want = getattr(want, "pooler_output", want)  # transformers 5 returns an output object
        hidden = clip.text_model(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            assert torch.equal(tokenizer(PROMPTS + [""], padding="max_length", return_tensors="pt").input_ids,
                               ids.input_ids)
            out = encoder(ids.input_ids, output_hidden_states=True)
            assert torch.allclose(out.text_embeds, want, atol=1e-6)
            assert torch.allclose(out.hidden_states[-2], hidden, atol=1e-6)


def test_compact_context_attention_equals_the_full_context(pipe):
    """Training's 17-token context (RepeatedTokenAttnProcessor) computes what the pipeline's 272 tokens do."""
    embeds, pooled = flow.caption_table(pipe)
    assert embeds.shape == (len(data.all_captions()) + 1, 16 + flow.T5_PAD_TOKENS, 128)
    context, copies = flow.compact_context(embeds)
    idx = torch.tensor([0, 77, 191, 192])
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 700, 300, 5])
    compact = copy.deepcopy(pipe.transformer)
    compact.set_attn_processor(flow.RepeatedTokenAttnProcessor(copies))
    with torch.no_grad():
        full = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds[idx],
                                pooled_projections=pooled[idx], return_dict=False)[0]
        short = compact(hidden_states=x, timestep=t, encoder_hidden_states=context[idx],
                        pooled_projections=pooled[idx], return_dict=False)[0]
    assert torch.allclose(full, short, atol=1e-4)


def test_pipeline_samples_two_32px_images(pipe):
    out: Any = pipe(PROMPTS, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    assert out.shape == (2, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
