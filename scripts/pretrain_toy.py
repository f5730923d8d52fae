"""Train the embedded toy world from scratch on CPU: toy CLIP, VAE, UNet (-> StableDiffusionPipeline), judge, aesthetic head.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/pretrain_toy.py   # every stage not yet done (26 min from scratch, 2 idle cores)
    python scripts/pretrain_toy.py --stages judge,aesthetic --force judge,aesthetic  # redo two stages
    python scripts/pretrain_toy.py --unet-minutes 10                        # shorter UNet budget

Stages run in order tokenizer, clip, vae, unet, pipeline, judge, aesthetic; a stage whose output exists is
skipped unless named in --force. The UNet checkpoints every 250 steps into --build-dir and resumes from it.
Each stage's wall time, device and figures are merged into <assets-dir>/pretrain_log.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from rlr_cli.toy import assets, data

STAGES = ("tokenizer", "clip", "vae", "unet", "pipeline", "judge", "aesthetic")



def no_safety_checker(scheduler: Any) -> dict[str, Any]:
    """The pipeline parts that diffusers annotates as required but the toy world does without."""
    return {"scheduler": scheduler, "safety_checker": None, "feature_extractor": None}

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    p.add_argument("--force", default="", help="comma-separated stages to redo even if their output exists")
    p.add_argument("--assets-dir", default=str(assets.ASSETS), help="where the toy world is written")
    p.add_argument("--build-dir", default=".toy_build", help="intermediate files (VAE, UNet checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="device of the clip, vae, unet and judge stages")
    p.add_argument("--clip-steps", type=int, default=500)
    p.add_argument("--clip-minutes", type=float, default=5.0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-minutes", type=float, default=10.0)
    p.add_argument("--unet-steps", type=int, default=10500)
    p.add_argument("--unet-minutes", type=float, default=90.0, help="UNet wall-time budget (resumed runs add to it)")
    p.add_argument("--judge-steps", type=int, default=800)
    p.add_argument("--judge-minutes", type=float, default=6.0)
    p.add_argument("--aesthetic-steps", type=int, default=2000)
    p.add_argument("--aesthetic-minutes", type=float, default=2.0)
    return p.parse_args()


def log_stage(paths: assets.ToyPaths, name: str, seconds: float, figures: dict, device: str) -> None:
    """Merge one stage's wall time, device and figures into the pretrain log."""
    log = json.loads(paths.pretrain_log.read_text()) if paths.pretrain_log.exists() else {}
    log[name] = {"stage_seconds": round(seconds, 1), "device": device, **figures}
    paths.pretrain_log.write_text(json.dumps(log, indent=2) + "\n")
    print(f"[{name}] {seconds:.1f} s on {device} {figures}", flush=True)


def stage_tokenizer(args, paths: assets.ToyPaths) -> dict:
    from rlr_cli.toy.tokenizer import build_tokenizer

    tok = build_tokenizer(paths.clip)
    tok.save_pretrained(paths.clip)
    paths.train_prompts.write_text("\n".join(data.all_captions()) + "\n")
    return {"vocab": len(tok)}


def stage_clip(args, paths: assets.ToyPaths) -> dict:
    from transformers import CLIPTokenizer

    from rlr_cli.toy import clip

    tok = CLIPTokenizer.from_pretrained(paths.clip)
    torch.manual_seed(args.seed)
    model = clip.build_clip(tok)
    stats = clip.train_clip(model, tok, args.clip_steps, args.clip_minutes, seed=args.seed, device=args.device)
    model.save_pretrained(paths.clip)
    clip.image_processor().save_pretrained(paths.clip)
    images, labels, _ = data.eval_batch(1024, seed=11)
    stats["zero_shot_heldout"] = clip.zero_shot(model, tok, images, labels)
    return stats


def stage_vae(args, paths: assets.ToyPaths) -> dict:
    from rlr_cli.toy import vae as toy_vae

    torch.manual_seed(args.seed + 1)
    vae = toy_vae.build_vae()
    stats = toy_vae.train_vae(vae, args.vae_steps, args.vae_minutes, seed=args.seed + 1, device=args.device)
    mean, std = toy_vae.latent_stats(vae)
    toy_vae.fold_latent_normalisation(vae, mean, std)
    new_mean, new_std = toy_vae.latent_stats(vae, seed=8)
    images, _, _ = data.eval_batch(512, seed=12)
    stats.update(raw_latent_mean=mean.tolist(), raw_latent_std=std.tolist(),
                 folded_latent_mean=new_mean.tolist(), folded_latent_std=new_std.tolist(),
                 psnr_heldout=toy_vae.psnr(toy_vae.roundtrip(vae, images), images))
    vae.save_pretrained(Path(args.build_dir) / "vae")
    return stats


def stage_unet(args, paths: assets.ToyPaths) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from rlr_cli.toy import unet as toy_unet

    build = Path(args.build_dir)
    vae = AutoencoderKL.from_pretrained(build / "vae").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(paths.clip).eval()
    table = toy_unet.caption_table(text_encoder, CLIPTokenizer.from_pretrained(paths.clip))
    torch.manual_seed(args.seed + 2)
    unet = toy_unet.build_unet(text_encoder.config.hidden_size)
    ema, stats = toy_unet.train_unet(unet, vae, table, args.unet_steps, args.unet_minutes,
                                     checkpoint=build / "unet_checkpoint.pt", seed=args.seed + 2,
                                     device=args.device)
    ema.save_pretrained(build / "unet_ema")
    stats["params"] = sum(p.numel() for p in ema.parameters())
    return stats


def stage_pipeline(args, paths: assets.ToyPaths) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from rlr_cli.toy import unet as toy_unet

    build = Path(args.build_dir)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(build / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(paths.clip),
        tokenizer=CLIPTokenizer.from_pretrained(paths.clip),
        unet=UNet2DConditionModel.from_pretrained(build / "unet_ema"),
        requires_safety_checker=False, **no_safety_checker(toy_unet.ddim_scheduler()),
    )
    if paths.pipeline.exists():
        shutil.rmtree(paths.pipeline)
    pipe.save_pretrained(paths.pipeline, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # keep the slow-format files beside tokenizer.json
        shutil.copy(paths.clip / name, paths.pipeline / "tokenizer" / name)
    return {}


def stage_judge(args, paths: assets.ToyPaths) -> dict:
    from diffusers import AutoencoderKL

    from rlr_cli.toy import judge

    vae_dir = Path(args.build_dir) / "vae"  # the same weights as the pipeline's vae/
    vae_dir = vae_dir if vae_dir.exists() else paths.pipeline / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    torch.manual_seed(args.seed + 3)
    model = judge.build_judge()
    stats = judge.train_judge(model, vae, args.judge_steps, args.judge_minutes, seed=args.seed + 3,
                              device=args.device)
    judge.save_judge(model, paths.judge_weights, paths.judge_config)
    return stats


def stage_aesthetic(args, paths: assets.ToyPaths) -> dict:
    from rlr_cli.toy import aesthetic

    torch.manual_seed(args.seed + 4)
    return aesthetic.train_and_save(args.aesthetic_steps, args.aesthetic_minutes, paths.clip, paths.aesthetic_head,
                                    seed=args.seed + 4)


def stage_done(name: str, args, paths: assets.ToyPaths) -> bool:
    """Whether a stage's output already exists."""
    build = Path(args.build_dir)
    out = {
        "tokenizer": paths.clip / "vocab.json", "clip": paths.clip / "model.safetensors",
        "vae": build / "vae" / "config.json", "unet": build / "unet_ema" / "config.json",
        "pipeline": paths.pipeline / "model_index.json", "judge": paths.judge_weights,
        "aesthetic": paths.aesthetic_head,
    }[name]
    return out.exists()


def main() -> None:
    args = parse_args()
    transformers.logging.set_verbosity_error()  # CLIPTextModel from the CLIPModel folder lists the vision keys
    torch.set_num_threads(args.threads)
    paths = assets.ToyPaths(Path(args.assets_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    Path(args.build_dir).mkdir(parents=True, exist_ok=True)
    wanted, force = set(args.stages.split(",")), set(filter(None, args.force.split(",")))
    unknown = (wanted | force) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    total = time.time()
    for name in STAGES:
        if name not in wanted:
            continue
        if stage_done(name, args, paths) and name not in force:
            print(f"[{name}] output exists, skipped (use --force {name} to redo)", flush=True)
            continue
        start = time.time()
        figures = globals()[f"stage_{name}"](args, paths)
        device = "cpu" if name in ("tokenizer", "pipeline", "aesthetic") else args.device
        log_stage(paths, name, time.time() - start, figures, f"{device}, {torch.get_num_threads()} threads")
    print(f"all stages done in {time.time() - total:.1f} s", flush=True)


if __name__ == "__main__":
    main()
