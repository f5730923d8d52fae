"""How closely does the toy shortcut's k-step chain follow the 50-step chain? (and: does a ShortFT adapter help?)

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python scripts/evaluate_shortcut.py
    python scripts/evaluate_shortcut.py --adapter outputs/<run>/adapter     # + long-chain scores with the adapter

From the same x_T and prompt (held-out captions of scripts/distill_shortcut.py, fresh seeds), samples
  long:         the base model's 50-step DDIM chain (eta 0, guidance 4): what evaluation and the saved adapter use
  shortcut:     the k-step chain with the shortcut LoRA active (what estimator=shortft trains through)
  no_shortcut:  the same k-step chain without the shortcut LoRA (the baseline a shortcut must beat)
and reports the mean squared pixel distance (images in [0,1]) of each short chain to the long one, and
toy_clipscore (logit_scale.exp() * cosine of the toy CLIP) and toy_aesthetic of every chain. All three
run through the policy and ShortFT's own chain, as training does. JSON next to the shortcut.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from rlr_cli.build import component

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "rlr_cli" / "assets" / "toy"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", default=str(TOY), help="toy world folder (pipeline/, clip/, aesthetic_head.safetensors)")
    p.add_argument("--shortcut", default=str(TOY / "shortcut"))
    p.add_argument("--adapter", default=None, help="a run's adapter/ folder: also score the long chain with it")
    p.add_argument("--adapter-rank", type=int, default=4, help="rank of that adapter's LoRA (model.lora.rank)")
    p.add_argument("--adapter-alpha", type=float, default=4.0)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="long chain DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--n", type=int, default=256, help="held-out prompts (one image each)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=2_000_000, help="noise seeds: seed + batch index")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path; default <shortcut>/evaluation.json")
    return p.parse_args()


def heldout_prompts(args) -> list[str]:
    """n prompts drawn (seeded) from the captions the distillation held out (all captions if no log)."""
    log = Path(args.shortcut) / "distill_log.json"
    if log.exists():
        captions = json.loads(log.read_text())["heldout_captions"]
    else:
        captions = [c for c in (Path(args.toy) / "train_prompts.txt").read_text().splitlines() if c.strip()]
    picks = torch.randint(len(captions), (args.n,), generator=torch.Generator().manual_seed(args.seed))
    return [captions[i] for i in picks.tolist()]


def stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": values.mean().item(), "se": values.std().item() / math.sqrt(len(values))}


@torch.no_grad()
def sample(policy, prompts, args, chain=None) -> tuple[torch.Tensor, float]:
    """images (N,3,H,W) in [0,1] and seconds; batch b starts from the noise of seed + b in every chain."""
    images, start = [], time.time()
    for b, i in enumerate(range(0, len(prompts), args.batch)):
        generator = torch.Generator().manual_seed(args.seed + b)
        rollout = policy.sample(prompts[i:i + args.batch], generator=generator, chain=chain)
        images.append(policy.decode(rollout.final))
    return torch.cat(images), time.time() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    toy = Path(args.toy)
    policy = component(  # the trainable LoRA at zero (default init): the base model
        "model=toy", f"model.path={toy / 'pipeline'}", f"model.num_steps={args.steps}", "model.eta=0.0",
        f"model.guidance_scale={args.guidance}", f"model.lora.rank={args.adapter_rank}",
        f"model.lora.alpha={args.adapter_alpha}", "model.lora.init=default",
        f"model.lora.target_modules=[{','.join(ATTENTION)}]")
    estimator = component("estimator=shortft", f"estimator.k={args.k}", "estimator.timesteps=even",
                          "estimator.scheduler=ddim", f"estimator.shortcut_path={args.shortcut}")
    chain = estimator.attach(policy)
    clipscore = component("reward=toy_clipscore", f"reward.path={toy / 'clip'}")
    aesthetic = component("reward=toy_aesthetic", f"reward.path={toy / 'clip'}",
                          f"reward.head={toy / 'aesthetic_head.safetensors'}")
    prompts = heldout_prompts(args)

    runs = {"long": sample(policy, prompts, args),
            "shortcut": sample(policy, prompts, args, chain),
            "no_shortcut": sample(policy, prompts, args, chain.without_adapter())}
    if args.adapter:
        policy.load_adapter(args.adapter)
        runs["long_with_adapter"] = sample(policy, prompts, args)
    report = {"settings": vars(args), "shortcut_timesteps": chain.timesteps.tolist(), "chains": {}}
    for name, (images, seconds) in runs.items():
        def scored(reward, images=images):
            return stats(torch.cat([reward(images[i:i + 64], prompts[i:i + 64]) for i in range(0, len(prompts), 64)]))

        entry = {"seconds": seconds, "toy_clipscore": scored(clipscore), "toy_aesthetic": scored(aesthetic)}
        if name != "long":
            entry["mse_to_long"] = stats(((images - runs["long"][0]) ** 2).flatten(1).mean(1))
        report["chains"][name] = entry
    out = Path(args.out or Path(args.shortcut) / "evaluation.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.n} held-out prompts, long chain {args.steps} DDIM steps (eta 0), k = {args.k}, guidance {args.guidance}")
    print(f"{'chain':<20}{'MSE to long (px)':>20}{'toy_clipscore':>18}{'toy_aesthetic':>18}{'seconds':>9}")
    for name, entry in report["chains"].items():
        mse = entry.get("mse_to_long")
        mse_text = f"{mse['mean']:.5f} +- {mse['se']:.5f}" if mse else "-"
        clip, aes = entry["toy_clipscore"], entry["toy_aesthetic"]
        print(f"{name:<20}{mse_text:>20}{clip['mean']:>11.3f} +- {clip['se']:.3f}"
              f"{aes['mean']:>11.3f} +- {aes['se']:.3f}{entry['seconds']:>9.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
