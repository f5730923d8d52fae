"""Tiny random-init stand-ins with the real architectures, parameter names and on-disk formats.

Each `write_<reward>(directory)` writes files into `directory` (seconds on a CPU) and returns the
reward config overrides that load them, e.g. `rewards.aesthetic.AestheticScore(**write_aesthetic(d))`;
`hydra_overrides(overrides)` turns them into command-line overrides (`reward.path=...`).
No weights are real: scores are meaningless, loading code and gradients are what they exercise.
"""
from __future__ import annotations

import gzip
import json
import os

import torch

from rewards.common import MLPHead

TINY_CLIP_TEXT = {  # the real CLIP vocabulary and special ids, tiny transformer
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
TINY_OPEN_CLIP = {  # open_clip ViT-H-14 key layout, 2 layers of width 64 (HPS stand-in)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_BLIP_VIT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_BERT_WORDS = "a an the of on in with and photo picture painting cat dog cow bird red blue green cute".split()


def write_clip_folder(
    directory: str, *, projection_dim: int, image_size: int = 224, patch_size: int = 32,
    tokenizer: bool = False, processor: bool = True, seed: int = 0,
) -> str:
    """A tiny transformers CLIPModel folder (config.json + model.safetensors), optionally with the CLIP
    tokenizer and a preprocessor_config.json for `image_size`."""
    from transformers import CLIPConfig, CLIPModel

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=TINY_CLIP_TEXT,
        vision_config={**TINY_CLIP_TEXT, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(directory)
    if tokenizer:
        write_clip_tokenizer(directory)
    if processor:
        write_clip_processor(directory, image_size)
    return directory


def write_clip_processor(directory: str, image_size: int) -> None:
    """preprocessor_config.json of a CLIP processor at `image_size` (OpenAI CLIP mean/std, bicubic)."""
    from transformers import CLIPImageProcessor

    square = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square).save_pretrained(directory)


def write_clip_tokenizer(directory: str) -> None:
    """The real CLIP BPE tokenizer (49408 entries), built offline from the vocabulary in open_clip's wheel."""
    import open_clip
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe_file = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe_file).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as file:
        json.dump({token: i for i, token in enumerate(tokens)}, file)
    with open(merges_file, "w") as file:
        file.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(vocab_file, merges_file, pad_token="<|endoftext|>").save_pretrained(directory)


def write_head(path: str, in_features: int, seed: int = 0) -> str:
    """A random aesthetic head (keys layers.{0,2,4,6,7}); `.safetensors` or a torch `.pth` state dict."""
    torch.manual_seed(seed)
    state = MLPHead(in_features).state_dict()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def write_aesthetic(directory: str) -> dict:
    """Tiny CLIP with projection_dim 768 (the real head fits it) + a random head -> {path, head}."""
    clip = write_clip_folder(os.path.join(directory, "clip"), projection_dim=768)
    return {"path": clip, "head": write_head(os.path.join(directory, "aesthetic-model.pth"), 768)}


def write_hps(directory: str) -> dict:
    """open_clip CLIP with the ViT-H-14 layout, tiny, saved as {"state_dict": ...} -> {path, model_config}."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_OPEN_CLIP)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": model.state_dict()}, path)
    return {"path": path, "model_config": json.loads(json.dumps(TINY_OPEN_CLIP))}


def write_pickscore(directory: str) -> dict:
    """Tiny CLIPModel folder + a processor folder (CLIP tokenizer, 224 preprocessing) -> {path, processor_path}."""
    model = write_clip_folder(os.path.join(directory, "model"), projection_dim=64, processor=False)
    processor = os.path.join(directory, "processor")
    write_clip_tokenizer(processor)
    write_clip_processor(processor, 224)
    return {"path": model, "processor_path": processor}


def imagereward_original_keys(state: dict) -> dict:
    """ImageRewardModel state dict -> the `ImageReward.pt` layout (blip.visual_encoder.*, mlp.layers.*, ...)."""
    from rewards.imagereward import original_key

    return {original_key(key): value for key, value in state.items()}


def write_imagereward(directory: str) -> dict:
    """2-layer BLIP ViT + 2-layer BERT with cross-attention, small vocabulary, as ImageReward.pt +
    med_config.json, and a BERT tokenizer folder -> {path, tokenizer_path, vision_config}."""
    from transformers import BertTokenizer

    from rewards.imagereward import ImageRewardModel, build_configs

    os.makedirs(directory, exist_ok=True)
    tokenizer_dir = os.path.join(directory, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    with open(os.path.join(tokenizer_dir, "vocab.txt"), "w") as file:
        file.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_BERT_WORDS]) + "\n")
    BertTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tokenizer_dir)
    med_config = {  # the fields of BLIP's med_config.json, tiny; 12 heads as the real one
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 48,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": 5 + len(TINY_BERT_WORDS) + 2,  # + [DEC] and [ENC]
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    with open(os.path.join(directory, "med_config.json"), "w") as file:
        json.dump(med_config, file, indent=2)
    torch.manual_seed(0)
    vision, text = build_configs(med_config, TINY_BLIP_VIT)
    model = ImageRewardModel(vision, text)
    for module in model.modules():  # BERT's std-0.02 init makes a tiny model ignore its inputs; widen it
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=module.weight.shape[-1] ** -0.5)
    state = imagereward_original_keys(model.state_dict())
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(text.max_position_embeddings)[None]
    torch.save(state, os.path.join(directory, "ImageReward.pt"))
    return {"path": directory, "tokenizer_path": tokenizer_dir, "vision_config": dict(TINY_BLIP_VIT)}


def write_weighted(directory: str) -> dict:
    """Stand-ins for the default weighted reward (aesthetic + hps) -> {components: {name: {reward: ...}}}."""
    return {
        "components": {
            "aesthetic": {"reward": write_aesthetic(os.path.join(directory, "aesthetic"))},
            "hps": {"reward": write_hps(os.path.join(directory, "hps"))},
        }
    }


WRITERS = {
    "aesthetic": write_aesthetic,
    "hps": write_hps,
    "pickscore": write_pickscore,
    "imagereward": write_imagereward,
    "weighted": write_weighted,
}


def write_standin(name: str, directory: str) -> dict:
    """Write the stand-in of reward config `name` (configs/reward/<name>.yaml) -> its config overrides."""
    return WRITERS[name](directory)


def _hydra_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def hydra_overrides(overrides: dict, prefix: str = "reward") -> list[str]:
    """Stand-in overrides -> Hydra command-line overrides, e.g. ["reward.path='/tmp/x/clip'", ...]."""
    lines = []
    for key, value in overrides.items():
        if key == "components" and isinstance(value, dict):  # the weighted reward's nested rewards
            for name, entry in value.items():
                lines += hydra_overrides(entry["reward"], f"{prefix}.components.{name}.reward")
        else:
            lines.append(f"{prefix}.{key}={_hydra_value(value)}")
    return lines
