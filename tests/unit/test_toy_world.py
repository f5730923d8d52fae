"""Fast checks of the embedded toy world on its real, committed weights (CPU, seconds each)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from rlr_cli.toy import aesthetic, assets, clip, data, judge
from rlr_cli.toy.unet import NOISE_SCHEDULE


def test_generator_is_deterministic_and_seeds_matter():
    a, la, ca = data.batch(32, seed=5)
    b, lb, cb = data.batch(32, seed=5)
    c, _, _ = data.batch(32, seed=6)
    assert torch.equal(a, b) and ca == cb and torch.equal(la.cx, lb.cx)
    assert not torch.equal(a, c)
    assert a.shape == (32, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and 0 <= a.min() and a.max() <= 1


def test_eval_seeds_are_held_out():
    with pytest.raises(ValueError):
        data.batch(4, seed=data.EVAL_SEED_BASE)
    assert data.eval_prompts(16, seed=3) == data.eval_batch(16, seed=3)[2]
    assert not torch.equal(data.eval_batch(8, seed=0)[0], data.batch(8, seed=0)[0])


def test_captions_match_labels_and_pixels():
    images, labels, captions = data.batch(256, seed=9)
    fg = torch.tensor([data.COLOUR_RGB[c] for c in data.COLOURS]).float()[labels.colour] / 255
    bg = torch.tensor([data.BACKGROUND_RGB[b] for b in data.BACKGROUNDS]).float()[labels.background] / 255
    for i, text in enumerate(captions):
        parsed = data.parse_caption(text)
        assert parsed == {k: int(getattr(labels, k)[i]) for k in ("shape", "colour", "background", "size")}
        centre = images[i, :, int(labels.cy[i]), int(labels.cx[i])]
        assert torch.allclose(centre, fg[i], atol=0.02), text  # the shape covers its centre
        assert torch.allclose(images[i, :, 0, 0], bg[i], atol=1e-6), text  # and never reaches a corner
    assert set(captions) <= set(assets.train_prompts())
    assert assets.train_prompts() == data.all_captions() and len(set(data.all_captions())) == 192


@pytest.mark.parametrize("folder", [assets.CLIP_DIR, assets.PIPELINE_DIR / "tokenizer"])
def test_tokenizer_makes_every_caption_word_one_token(folder):
    tok = CLIPTokenizer.from_pretrained(folder)
    words = {w for c in data.all_captions() for w in c.split()}
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"]
    ids = tok(data.all_captions()[0]).input_ids
    assert len(ids) == 10 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_clip_folder_is_ordinary_and_scores_matching_captions_highest():
    model: Any = CLIPModel.from_pretrained(assets.CLIP_DIR).eval()
    tok = CLIPTokenizer.from_pretrained(assets.CLIP_DIR)
    proc = CLIPImageProcessor.from_pretrained(assets.CLIP_DIR)
    assert proc.crop_size == {"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}
    assert tuple(proc.image_mean) == pytest.approx(clip.IMAGE_MEAN)
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    images, labels, _ = data.eval_batch(64, seed=77)
    acc = clip.zero_shot(model, tok, images, labels)
    assert acc["colour"] > 0.9 and acc["background"] > 0.9


def test_pipeline_folder_loads_and_samples_a_32px_image():
    pipe: Any = StableDiffusionPipeline.from_pretrained(assets.PIPELINE_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == 1.0
    assert {k: pipe.scheduler.config[k] for k in NOISE_SCHEDULE} == NOISE_SCHEDULE
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and not pipe.scheduler.config.clip_sample
    out: Any = pipe(["a large red circle on a white background"], num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01


def test_judge_loads_and_reads_fresh_images():
    the_judge = judge.load_judge()
    images, labels, captions = data.eval_batch(128, seed=5)
    acc = judge.prompt_following(images, captions, the_judge)
    assert acc["all_three"] >= 0.95
    assert acc == judge.label_accuracy(the_judge, images, labels)


def test_aesthetic_head_has_the_laion_layout_and_follows_its_rule():
    keys = set(load_file(assets.AESTHETIC_HEAD))
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    images, labels, _ = data.eval_batch(256, seed=8)
    rule = aesthetic.rule_score(labels)
    assert 0 <= rule.min() and rule.max() <= 10
    assert aesthetic.pearson(aesthetic.predict(images), rule) > 0.5


def test_unet_pretraining_resumes_from_its_checkpoint(tmp_path):
    """The UNet stage checkpoints and resumes (the checkpoint loads with weights_only=True)."""
    from rlr_cli.toy import unet as toy_unet
    from rlr_cli.toy import vae as toy_vae
    from rlr_cli.toy.tokenizer import MAX_LENGTH

    torch.manual_seed(0)
    vae = toy_vae.build_vae().eval().requires_grad_(False)
    table = torch.randn(len(data.all_captions()) + 1, MAX_LENGTH, 64)  # caption embeddings; any will do here
    checkpoint = tmp_path / "unet_checkpoint.pt"

    def train(steps: int):
        return toy_unet.train_unet(toy_unet.build_unet(64), vae, table, steps, 5.0, checkpoint, batch_size=4)

    first, stats = train(2)
    assert stats["steps"] == 2 and checkpoint.exists()
    resumed, stats = train(3)
    assert stats["steps"] == 3
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 3
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved["ema"].items())
    # one more EMA step (decay 0.999) from step 2's weights, not a new random UNet
    gaps = [(resumed.state_dict()[k] - v).abs().max().item() for k, v in first.state_dict().items()]
    assert 0 < max(gaps) < 1e-2
