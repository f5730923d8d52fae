"""Published rewards on tiny stand-ins with the real architectures, key names and file formats.

Everything runs offline on CPU in seconds: each stand-in is written in the real on-disk format and
loaded by the same code users get with `reward.path=...`, through the Hydra configs.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from helpers import ROOT
from rewards.imagereward import rename_checkpoint
from rewards.simple import Saturation
from rewards.standins import (
    hydra_overrides,
    imagereward_original_keys,
    write_clip_folder,
    write_clip_tokenizer,
    write_head,
    write_standin,
)
from rewards.weighted import WeightedSum
from rlr_cli.build import component, compose_plain
from rlr_cli.config import import_target
from rlr_cli.errors import UserError

REPO = ROOT
CONFIG_DIR = REPO / "configs"
REAL_HEAD = REPO.parent / "shared" / "data" / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a photo of a cute cat", "a red painting of a dog"]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """name -> config overrides of its stand-in, written once per module."""
    written = {}

    def get(name: str) -> dict:
        if name not in written:
            written[name] = write_standin(name, str(tmp_path_factory.mktemp(name)))
        return written[name]

    return get


def compose_reward(name: str, overrides: list[str]):
    """configs/reward/<name>.yaml with overrides, instantiated as the trainer and rlr-score do."""
    return component(f"reward={name}", *overrides)


def make(name: str, **options):
    """The class of reward option `name` built with its YAML values, `options` replacing some of them."""
    node = compose_plain(f"reward={name}")["reward"]
    values = {key: value for key, value in node.items() if not key.startswith("_")}
    return import_target(node["_target_"], "reward")(**(values | options))


@pytest.fixture(scope="module")
def built(standin):
    """name -> the reward built from its config with its stand-in (once per module)."""
    rewards = {}

    def get(name: str):
        if name not in rewards:
            rewards[name] = compose_reward(name, hydra_overrides(standin(name)))
        return rewards[name]

    return get


def images(batch: int = 2, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator).requires_grad_(True)


# ---------------------------------------------------------------- scores and gradients


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pickscore", "imagereward", "weighted"])
def test_standin_scores_a_batch_with_gradients_to_the_images(built, name):
    reward = built(name)
    x = images()
    scores = reward(x, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and scores.device == x.device
    assert torch.isfinite(scores).all()
    assert reward.differentiable is True
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in _parameters(reward))  # frozen, yet not under no_grad


def _parameters(reward):
    if isinstance(reward, WeightedSum):
        return [p for _, _, r in reward.components for p in _parameters(r)]
    return [p for name in ("model", "head") if hasattr(reward, name) for p in getattr(reward, name).parameters()]


def test_scores_depend_on_the_prompt_for_text_rewards(built):
    x = images(1).detach()
    for name in ("hps", "pickscore", "imagereward"):
        reward = built(name)
        assert not torch.equal(reward(x, PROMPTS[:1]), reward(x, PROMPTS[1:])), name


@pytest.mark.parametrize("name", ["hps", "pickscore", "imagereward"])
def test_text_rewards_count_the_prompts_their_tokenizer_cuts(built, name):
    """overlong agrees with the tokens the reward really feeds its text tower (rlr-score's warning)."""
    reward = built(name)
    cut, limit = reward.overlong(["a cat", " ".join(["cat"] * 200), "a dog"])
    assert (cut, limit) == (1, reward.model.context_length if name == "hps" else reward.max_length)


def test_non_differentiable_rewards_give_no_gradient_and_weighted_says_so():
    x = images()
    jpeg = make("jpeg_compressibility")
    assert jpeg.differentiable is False and not jpeg(x, PROMPTS).requires_grad
    mixed = WeightedSum(components={"sat": {"weight": 1.0, "reward": Saturation()}, "jpeg": {"weight": 2.0, "reward": jpeg}})
    assert mixed.differentiable is False
    expected = Saturation()(x, PROMPTS) + 2.0 * jpeg(x, PROMPTS)
    torch.testing.assert_close(mixed(x, PROMPTS), expected)
    assert WeightedSum(components={"sat": {"weight": 3.0, "reward": Saturation()}}).differentiable is True


def test_weighted_default_is_half_aesthetic_plus_7_5_hps(built):
    weighted = built("weighted")
    weights = {name: weight for name, weight, _ in weighted.components}
    assert weights == {"aesthetic": 0.5, "hps": 7.5}  # (aesthetic + 15 * hps) / 2, the released RLR objective
    x = images().detach()
    parts = {name: reward(x, PROMPTS) for name, _, reward in weighted.components}
    torch.testing.assert_close(weighted(x, PROMPTS), 0.5 * parts["aesthetic"] + 7.5 * parts["hps"])


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pickscore", "imagereward"])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(standin, name):
    results = {}
    for checkpointing in (False, True):
        reward = make(name, **standin(name), gradient_checkpointing=checkpointing)
        calls = []
        handles = [m.register_forward_hook(lambda *_, calls=calls: calls.append(1)) for m in reward.model.modules()
                   if isinstance(m, torch.nn.Linear)]
        x = images()
        scores = reward(x, PROMPTS)
        scores.sum().backward()
        for handle in handles:
            handle.remove()
        results[checkpointing] = (scores.detach(), x.grad, len(calls))
    torch.testing.assert_close(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    assert results[True][2] > results[False][2]  # the layers really ran again in backward


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pickscore", "imagereward"])
def test_bf16_weights_return_float32_and_gradients(standin, name):
    reward = make(name, **standin(name), dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in reward.model.parameters())
    x = images()
    scores = reward(x, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- strict loading


def _corrupt(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "missing":
        state.pop(sorted(state)[-1])
    else:
        state["extra.weight"] = torch.zeros(2)
    return state


def _rewrite_safetensors(folder: str, out: Path, how: str) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    save_file(_corrupt(load_file(out / "model.safetensors"), how), out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def _rewrite_torch(path: str, out: Path, how: str, nested: bool = False) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {"state_dict": _corrupt(state["state_dict"], how)} if nested else _corrupt(state, how)
    torch.save(state, out)
    return str(out)


@pytest.mark.parametrize("how", ["missing", "extra"])
@pytest.mark.parametrize("part", ["aesthetic.head", "aesthetic.clip", "hps", "pickscore.clip", "imagereward"])
def test_strict_loading_rejects_a_missing_or_extra_key(standin, tmp_path, part, how):
    name = part.split(".")[0]
    overrides = dict(standin(name))
    if part == "aesthetic.head":
        overrides["head"] = _rewrite_torch(overrides["head"], tmp_path / "head.pth", how)
    elif part.endswith(".clip"):
        overrides["path"] = _rewrite_safetensors(overrides["path"], tmp_path / "clip", how)
    elif part == "hps":
        overrides["path"] = _rewrite_torch(overrides["path"], tmp_path / "hps.pt", how, nested=True)
    else:
        shutil.copytree(overrides["path"], tmp_path / "ir")
        _rewrite_torch(str(tmp_path / "ir" / "ImageReward.pt"), tmp_path / "ir" / "ImageReward.pt", how)
        overrides["path"] = str(tmp_path / "ir")
    with pytest.raises(UserError, match="missing keys" if how == "missing" else "unexpected keys") as error:
        make(name, **overrides)
    assert "\n" not in str(error.value)
    if how == "extra" and part != "aesthetic.clip" and part != "pickscore.clip":
        assert "extra.weight" in str(error.value)
    if part == "imagereward" and how == "missing":  # named as ImageReward.pt names it, not as we renamed it
        assert "mlp.layers.7.weight" in str(error.value) and "head.layers" not in str(error.value)


def test_clip_checkpoints_with_old_persistent_position_ids_still_load(standin, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "clip"
    shutil.copytree(standin("aesthetic")["path"], folder)
    state = load_file(folder / "model.safetensors")
    for tower, length in (("text_model", 77), ("vision_model", 50)):  # as in 2021-era CLIP checkpoints
        state[f"{tower}.embeddings.position_ids"] = torch.arange(length)[None]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    reward = make("aesthetic", path=str(folder), head=standin("aesthetic")["head"])
    assert torch.isfinite(reward(images(1), PROMPTS[:1])).all()


@pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"real aesthetic head not found at {REAL_HEAD}")
def test_real_aesthetic_head_loads_strictly_on_a_768_d_clip(standin):
    reward = make("aesthetic", path=standin("aesthetic")["path"], head=str(REAL_HEAD))
    assert reward.head.layers[0].weight.shape == (1024, 768) and reward.head.layers[7].weight.shape == (1, 16)
    real = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)  # saved from CUDA
    assert set(real) == set(reward.head.state_dict())
    torch.testing.assert_close(reward.head.layers[6].weight, real["layers.6.weight"])
    x = images()
    scores = reward(x, PROMPTS)
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_imagereward_standin_uses_the_original_checkpoint_layout(standin):
    overrides = standin("imagereward")
    state = torch.load(os.path.join(overrides["path"], "ImageReward.pt"), weights_only=True)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    width, text = overrides["vision_config"]["hidden_size"], 48
    assert shapes["blip.visual_encoder.cls_token"] == (1, 1, width)
    assert shapes["blip.visual_encoder.pos_embed"] == (1, 197, width)  # 14 x 14 patches of 16 px + CLS
    assert shapes["blip.visual_encoder.patch_embed.proj.weight"] == (width, 3, 16, 16)
    assert shapes["blip.visual_encoder.blocks.1.attn.qkv.weight"] == (3 * width, width)
    assert shapes["blip.visual_encoder.blocks.1.attn.proj.weight"] == (width, width)
    assert shapes["blip.visual_encoder.norm.weight"] == (width,)
    assert shapes["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"] == (text, width)
    assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"][0] == json.load(
        open(os.path.join(overrides["path"], "med_config.json")))["vocab_size"]
    assert "blip.text_encoder.embeddings.position_ids" in shapes
    assert shapes["blip.vision_proj.weight"] == (256, width) and shapes["blip.text_proj.weight"] == (256, text)
    assert shapes["mlp.layers.0.weight"] == (1024, text) and shapes["mlp.layers.7.weight"] == (1, 16)
    assert not any("pooler" in key or "itm_head" in key or "token_type" in key for key in state)
    renamed = rename_checkpoint(state)
    assert imagereward_original_keys(renamed).keys() == state.keys() - {"blip.text_encoder.embeddings.position_ids"}


def test_imagereward_settings_strict_loading_cannot_catch(standin):
    reward = make("imagereward", **standin("imagereward"))
    assert reward.model.vision_model.config.layer_norm_eps == 1e-6
    assert reward.model.text_model.config.num_attention_heads == 12
    assert reward.model.text_model.pooler is None
    assert not reward.model.training and not any(m.training for m in reward.model.modules())
    ids = reward.tokenizer(["a cat"], padding="max_length", max_length=35)["input_ids"][0]
    assert len(ids) == 35 and ids[0] == reward.tokenizer.cls_token_id  # [CLS] stays first (no [ENC] swap)
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(reward.tokenizer) - 2,
                                                                        len(reward.tokenizer) - 1]


# ---------------------------------------------------------------- missing weights


@pytest.mark.parametrize(
    "name, kwargs, hub_id, key",
    [
        ("aesthetic", {}, "openai/clip-vit-large-patch14", "reward.path="),
        ("hps", {"version": "v2.0"}, "xswu/HPSv2 HPS_v2_compressed.pt", "reward.path="),
        ("hps", {"version": "v2.1"}, "xswu/HPSv2 HPS_v2.1_compressed.pt", "reward.path="),
        ("pickscore", {}, "yuvalkirstain/PickScore_v1", "reward.path="),
        ("imagereward", {}, "THUDM/ImageReward ImageReward.pt", "reward.path="),
    ],
)
def test_missing_weights_offline_fail_fast_with_hub_id_and_config_key(monkeypatch, tmp_path, name, kwargs, hub_id, key):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(UserError) as error:
        make(name, cache_dir=str(tmp_path), **kwargs)
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert hub_id in message and key in message and "\n" not in message


@pytest.mark.parametrize("name", ["aesthetic", "hps", "imagereward"])  # hub folder, hub file, hub file + folder
def test_unreachable_hub_fails_fast_without_retries(monkeypatch, tmp_path, name):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"cannot get hub .*hf download .*reward\.path="):
        make(name, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5  # the hub client's own retries would take ~25 s


def test_missing_head_names_the_head_key(monkeypatch, standin, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth.*reward\.head="):
        make("aesthetic", path=standin("aesthetic")["path"], cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"is not an existing file.*reward\.head="):
        make("aesthetic", path=standin("aesthetic")["path"], head=str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------- toy world and tokenizers


def test_clip_classes_serve_the_toy_clip_with_its_own_preprocessing(tmp_path):
    toy = write_clip_folder(str(tmp_path / "toy_clip"), projection_dim=64, image_size=32, patch_size=4, tokenizer=True)
    head = write_head(str(tmp_path / "toy_head.safetensors"), 64)
    clip_score = make("toy_clipscore", path=toy, processor_path=None)
    aesthetic = make("aesthetic", path=toy, head=head)
    for reward in (clip_score, aesthetic):
        assert (reward.preprocess.size, reward.preprocess.crop_size) == (32, 32)
        x = images(3, 40, 32)
        scores = reward(x, ["a red square on a blue background"] * 3)
        assert scores.shape == (3,) and torch.isfinite(scores).all()
        scores.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    overridden = make("toy_clipscore", path=toy, processor_path=None, image_size=48, crop_size=40, mean=[0.5] * 3, std=[0.5] * 3)
    assert overridden.preprocess == type(overridden.preprocess)(48, 40, (0.5,) * 3, (0.5,) * 3, crop_offset="floor")


def test_clip_tokenizer_built_from_open_clip_vocabulary_matches_open_clip(tmp_path):
    import open_clip
    from transformers import AutoTokenizer

    write_clip_tokenizer(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    reference = open_clip.get_tokenizer("ViT-H-14")
    assert len(tokenizer) == 49408
    for prompt in ["a photo of an astronaut riding a horse", "Cute  kittens!! 123", "a cat, trending on artstation, 4k"]:
        expected = [int(i) for i in reference([prompt])[0] if i != 0]
        assert tokenizer(prompt)["input_ids"] == expected


# ---------------------------------------------------------------- preprocessing vs the PIL processors


def _photos() -> dict[str, Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return {name: Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea")}


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _reference_processors(built, standin, odd_crop: bool):
    """label -> (reward name, the processor its authors score with: PIL image -> (3,224,224) normalised).

    The aesthetic predictor and ImageReward crop as torchvision does (OpenAI CLIP's and BLIP's transforms),
    PickScore as transformers' CLIPImageProcessor; on even crop borders the two agree. HPS v2's reference
    resizes the tensor, not the PIL image: test_hps_preprocessing_matches_hpsv2_itself checks it.
    """
    from torchvision import transforms
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    def processor(cls, folder):
        loaded = cls.from_pretrained(folder)
        return lambda image: loaded(images=image, return_tensors="pt")["pixel_values"][0]

    blip = transforms.Compose([  # ImageReward's BLIP transform (its `_transform(224)`); OpenAI CLIP's is the same
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    clip_folders = {"pickscore": standin("pickscore")["processor_path"]}
    if not odd_crop:  # trl's DDPO aesthetic scorer uses CLIPProcessor: equal to OpenAI CLIP's crop here
        clip_folders["aesthetic"] = standin("aesthetic")["path"]
    references: dict[str, tuple[str, Any]] = {
        f"{name} ({cls.__name__})": (name, processor(cls, folder))
        for name, folder in clip_folders.items()
        for cls in (CLIPImageProcessorPil, CLIPImageProcessor)
    }
    references["aesthetic (OpenAI CLIP transform)"] = ("aesthetic", blip)
    references["imagereward (BLIP transform)"] = ("imagereward", blip)
    return references


@pytest.mark.parametrize("odd_crop", [False, True])
def test_tensor_preprocessing_matches_each_rewards_pil_processor_on_photos(built, standin, odd_crop):
    """skimage's photos, and (odd_crop) the same photos at 427 x 640 and 640 x 427: resized to 224 x 335
    their crop border is odd (111 px), where torchvision rounds the offset and transformers floors it."""
    photos = _photos()
    if odd_crop:
        photos = {f"{name} {w}x{h}": photo.resize((w, h), Image.Resampling.BICUBIC)
                  for name, photo in photos.items() for w, h in ((640, 427), (427, 640))}
    lines = []
    for label, (name, reference) in _reference_processors(built, standin, odd_crop).items():
        ours = built(name).preprocess
        worst = 0.0
        for photo in photos.values():
            expected = reference(photo)
            actual = ours(_as_tensor(photo))[0]
            assert actual.shape == expected.shape == (3, 224, 224)
            worst = max(worst, (actual - expected).abs().max().item())
        lines.append(f"{label}: max |tensor - processor| = {worst:.4f}")
        assert worst < 0.05, label
    print("\n" + "\n".join(lines))


def test_pickscore_matches_transformers_clipprocessor_scoring_end_to_end(standin):
    """PickScore's own scoring code path (CLIPProcessor + CLIPModel, logit_scale.exp() * cosine) on the
    stand-in's weights, against ours on the same pixels, where the crop border is odd (427 x 640)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    overrides = standin("pickscore")
    reward = make("pickscore", **overrides)
    model: Any = CLIPModel.from_pretrained(overrides["path"]).eval()  # its features are output objects
    image_processor = CLIPImageProcessor.from_pretrained(overrides["processor_path"])
    tokenizer = AutoTokenizer.from_pretrained(overrides["processor_path"])
    photo = _photos()["astronaut"].resize((640, 427), Image.Resampling.BICUBIC)
    prompts = ["an astronaut", "a red painting of a dog"]
    with torch.no_grad():
        pixels = image_processor(images=[photo, photo], return_tensors="pt")
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = model.get_image_features(**pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text)
        ours = reward(_as_tensor(photo).repeat(2, 1, 1, 1), prompts)
    assert (ours - expected).abs().max() < 0.01 * expected.abs().max(), (ours, expected)


def test_hps_preprocessing_resizes_the_longest_side_and_pads_black():
    """The geometry of HPS v2's ResizeMaxSize: a 100 x 200 image fills 112 x 224 in the middle rows; the
    56 rows above and below are black (normalised), whatever the image holds."""
    from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess

    ours = ClipPreprocess(224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize="longest")
    out = ours(torch.full((1, 3, 100, 200), 0.8))[0]
    black = (-torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)).view(3, 1, 1)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[:, :56], black.expand(3, 56, 224))
    torch.testing.assert_close(out[:, -56:], black.expand(3, 56, 224))
    assert (out[:, 56:-56] - black).abs().min() > 1.0  # the image itself


def test_hps_preprocessing_matches_hpsv2_itself():
    """hpsv2's own transform (initialize_model's light_augmentation=True: ResizeMaxSize on the ToTensor
    image) against ours, on non-square photos."""
    try:
        from hpsv2.src.open_clip.transform import image_transform
    except Exception as error:  # noqa: BLE001  (any failure to import it means the same here)
        pytest.skip(f"hpsv2 cannot be imported here ({type(error).__name__}: {str(error)[:80]}): its pins "
                    "(pytest==7.2.0, protobuf<4) keep it out of our dependencies; "
                    "scripts/install_reference_packages.py (run by make venv) installs it without them")
    from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess

    theirs = image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_longest_max=True)
    ours = ClipPreprocess(224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize="longest")
    for photo in _photos().values():
        for size in ((640, 427), (427, 640), photo.size):
            image = photo.resize(size, Image.Resampling.BICUBIC)
            torch.testing.assert_close(ours(_as_tensor(image))[0], theirs(image), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- configs


def _target_nodes(node, where="reward"):
    """(where, node) for every `_target_` node under node, depth first."""
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield where, node
        for key, value in node.items_ex(resolve=False):
            yield from _target_nodes(value, f"{where}.{key}")
    elif OmegaConf.is_list(node):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{where}[{i}]")


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONFIG_DIR / "reward").glob("*.yaml")))
def test_reward_config_keys_match_the_init_signature_exactly(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose("score", overrides=[f"reward={name}"])
    nodes = list(_target_nodes(config.reward))
    assert nodes, f"configs/reward/{name}.yaml has no _target_ node"
    for where, node in nodes:
        parameters = inspect.signature(import_target(node._target_, where)).parameters  # classes or functions
        keys = {key for key in node if key != "_target_"}
        assert keys == set(parameters) - {"args", "kwargs"}, where  # every option is visible (and commented) in the file


@pytest.mark.parametrize("scale", [0.2, 0.005])  # 0.2 exposes a wrong GELU, 0.005 a wrong LayerNorm eps
def test_imagereward_vision_mapping_matches_a_timm_vit_with_blips_layout(scale):
    """BLIP's ViT is timm's VisionTransformer (qkv bias, LayerNorm eps 1e-6, exact GELU, CLS token): a
    timm ViT's weights, renamed from the ImageReward.pt layout, must give the same hidden states."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer
    from transformers import BlipVisionModel

    from rewards.imagereward import build_configs

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0).eval()
    for name, parameter in vit.named_parameters():  # no parameter left at a symmetric init (LayerNorm 1/0)
        torch.nn.init.normal_(parameter, std=0.5 if "norm" in name else scale)
    original = {f"blip.visual_encoder.{key}": value for key, value in vit.state_dict().items()}
    renamed = {key.removeprefix("vision_model."): value for key, value in rename_checkpoint(original).items()}
    med = {"vocab_size": 10, "hidden_size": 12, "intermediate_size": 24, "num_hidden_layers": 1,
           "num_attention_heads": 12, "max_position_embeddings": 40}
    vision, _ = build_configs(med, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4})
    blip = BlipVisionModel(vision).eval()
    blip.load_state_dict(renamed, strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    # measured: ~1e-6 when right; eps 1e-5 gives 4e-2 at scale 0.005, tanh-GELU 3e-4 at scale 0.2
    torch.testing.assert_close(blip(pixel_values=pixels).last_hidden_state, vit.forward_features(pixels),
                               rtol=0, atol=2e-5)
