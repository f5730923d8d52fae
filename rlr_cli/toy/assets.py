"""Where the toy world's weights live, and loaders for them (weights load when called, never at import)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"


@dataclass(frozen=True)
class ToyPaths:
    """The files of one toy world under root (the committed one is ToyPaths(ASSETS))."""

    root: Path

    @property
    def clip(self) -> Path:  # transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor
        return self.root / "clip"

    @property
    def pipeline(self) -> Path:  # diffusers StableDiffusionPipeline (unet, vae, text_encoder, tokenizer, scheduler)
        return self.root / "pipeline"

    @property
    def judge_weights(self) -> Path:
        return self.root / "judge.safetensors"

    @property
    def judge_config(self) -> Path:
        return self.root / "judge.json"

    @property
    def aesthetic_head(self) -> Path:  # LAION-aesthetic-shaped MLP on toy CLIP image features
        return self.root / "aesthetic_head.safetensors"

    @property
    def train_prompts(self) -> Path:  # the 192 training captions, one per line
        return self.root / "train_prompts.txt"

    @property
    def pretrain_log(self) -> Path:  # measured stage times and figures of the run that made the weights
        return self.root / "pretrain_log.json"


COMMITTED = ToyPaths(ASSETS)
CLIP_DIR = COMMITTED.clip
PIPELINE_DIR = COMMITTED.pipeline
JUDGE_WEIGHTS = COMMITTED.judge_weights
JUDGE_CONFIG = COMMITTED.judge_config
AESTHETIC_HEAD = COMMITTED.aesthetic_head
TRAIN_PROMPTS = COMMITTED.train_prompts
PRETRAIN_LOG = COMMITTED.pretrain_log


def train_prompts() -> list[str]:
    """The training prompts (every caption of the toy world), read from TRAIN_PROMPTS."""
    return [line for line in TRAIN_PROMPTS.read_text().splitlines() if line.strip()]


def load_pipeline(device: str = "cpu", folder: Path = PIPELINE_DIR):
    """The toy StableDiffusionPipeline (from PIPELINE_DIR unless folder is given)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder).to(device)


def load_clip(folder: Path = CLIP_DIR):
    """(CLIPModel, CLIPTokenizer, CLIPImageProcessor) of the toy CLIP (from CLIP_DIR unless folder is given)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    return (CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder),
            CLIPImageProcessor.from_pretrained(folder))


def asset_path(name: str) -> str:
    """Path of a committed toy asset as a string, for configs (`path: {_target_: ...asset_path, name: clip}`)."""
    path = ASSETS / name
    if not path.exists():
        from rlr_cli.errors import UserError

        raise UserError(f"toy asset {path} is missing; rebuild it with `python scripts/pretrain_toy.py`")
    return str(path)
