"""Seconds and peak memory of one training step of every estimator, as ratios to one no-grad sampling pass.

    python scripts/bench_estimators.py                          # tiny model, CPU, T = 50, batch 4
    python scripts/bench_estimators.py --model tiny_sd3 --num-steps 10   # also tiny_flux, tiny_sdxl, toy, toy_flow
    python scripts/bench_estimators.py --device cuda            # + SD-1.5-shaped UNet (random weights), 512 px, batch 1 and 4
    python scripts/bench_estimators.py --out bench.md

Every estimator is built from its configs/estimator/*.yaml defaults (the published ones, but rlr's
fo_steps is 3 and its baseline the state one) as `rlr-train model=tiny estimator=NAME` composes it, and
the reward is saturation (differentiable, no weights). An estimator that cannot run on the benched model
(a ShortFT shortcut of another model, or one whose hub weights are not here) is listed under the table
with its one-line reason. One training
step = one estimator call + backward + AdamW step (a buffered estimator's batch is collected, then trained
with its updates: rlr_official's step time is half of sampling + its FO and HO steps). Times are the fastest
of --steps repeats, the sampling pass's the fastest of its runs beside every estimator (machines here are shared). Peak memory:
torch.cuda.max_memory_allocated on CUDA (ratio to the sampling pass's); on CPU the peak bytes saved for
backward (autograd saved-tensor hooks; a no-grad sampling pass saves none, so no ratio), with the model's
gradient checkpointing as chosen by --checkpointing.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.simple import Saturation  # noqa: E402
from rlr_cli.build import component  # noqa: E402
from rlr_cli.errors import UserError  # noqa: E402
from rlr_cli.estimators.checks import SavedTensorMeter, estimate  # noqa: E402
from rlr_cli.estimators.common import KL_ESTIMATORS  # noqa: E402
from rlr_cli.estimators.shortft import ShortFT  # noqa: E402
from rlr_cli.interfaces import BufferedEstimator  # noqa: E402

SD15_TEXT: dict[str, Any] = dict(  # CLIP ViT-L/14 text tower
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    hidden_act="quick_gelu")
SD15_UNET: dict[str, Any] = dict(  # SD 1.5's unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE: dict[str, Any] = dict(  # SD 1.5's vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def sd15_pipeline_folder(directory: str) -> str:
    """An SD-1.5-shaped pipeline (UNet, VAE, CLIP-L text encoder from SD 1.5's configs), random weights."""
    from rlr_cli.tiny import random_sd_pipeline

    folder = Path(directory) / "sd15-random"
    if not (folder / "model_index.json").exists():
        random_sd_pipeline(SD15_TEXT, SD15_UNET, SD15_VAE).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def make_policy(model: str, device: str, num_steps: int, checkpointing: bool):
    """model=MODEL as rlr-train builds it (its own guidance and eta), or model=sd15 at the SD-1.5-shaped random
    folder with CFG 5 and eta 1."""
    options = [f"model.num_steps={num_steps}", f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    if model != "sd15":
        return component(f"model={model}", *options).to(device)
    cache = os.environ.get("RLR_CACHE_DIR", os.path.expanduser("~/.cache/rlr-train"))
    return component("model=sd15", f"model.path={sd15_pipeline_folder(cache)}", "model.dtype=bf16", "model.eta=1.0",
                     "model.guidance_scale=5.0", *options).to(device)


class Meter:
    """Peak memory of a block: CUDA allocator peak, or saved-for-backward bytes on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def run(self, fn) -> tuple[float, float]:
        """(seconds, peak MB) of fn()."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
        meter = SavedTensorMeter()
        start = time.perf_counter()
        with meter.measure():
            fn()
        return time.perf_counter() - start, meter.peak / 2**20


def load_estimator(name: str, model: str, num_steps: int, batch: int, *overrides: str):
    """The estimator as `rlr-train model=MODEL estimator=NAME` builds it, checked against the benched chain."""
    extra = [f"estimator.train_batch_size={min(4, batch)}"] if name in ("ddpo", "grpo") else []
    return component(f"estimator={name}", f"model={model}", f"model.num_steps={num_steps}", "reward=saturation",
                     f"trainer.batch_size={batch}", *extra, *overrides)


def training_steps(estimator, policy, reward, prompts, generator, optimizer) -> int:
    """One sampled batch's optimizer steps (a buffered estimator: collect, then each update); how many."""
    def backward(term):
        term.backward()

    if not isinstance(estimator, BufferedEstimator):
        optimizer.zero_grad(set_to_none=True)
        estimate(estimator, policy, reward, prompts, generator)
        optimizer.step()
        return 1
    updates = estimator.collect(policy, reward, prompts, generator)
    for update in updates:
        optimizer.zero_grad(set_to_none=True)
        estimator.update(policy, reward, update, backward)
        optimizer.step()
    return len(updates)


def bench(model: str, device: str, batch: int, num_steps: int, steps: int, checkpointing: bool, only: list[str],
          kl_beta: float):
    policy = make_policy(model, device, num_steps, checkpointing)
    reward, prompts = Saturation(), [f"a photo of a {animal}" for animal in ("cat", "dog", "fox", "owl")] * batch
    prompts = prompts[:batch]
    meter = Meter(device)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    generator = torch.Generator().manual_seed(0)

    def sample():
        with torch.no_grad():
            policy.sample(prompts, generator=generator)

    sample()  # warm-up
    base = [meter.run(sample) for _ in range(steps)]
    rows, skipped = {}, {}
    names = [Path(config).stem for config in sorted(glob.glob(str(ROOT / "configs/estimator/*.yaml")))]
    variants = [(name, name, ()) for name in names if not only or name in only]  # (row, estimator, overrides)
    if kl_beta > 0:  # the KL term's cost: one more denoiser call (no grad) per regularised step
        variants += [(f"{name} + kl", name, (f"regularizer.kl_beta={kl_beta}",))
                     for name, _, _ in variants if name in KL_ESTIMATORS]
    if any(name == "rlr" for name, _, _ in variants):  # the state baseline's cost: decoder + reward passes only
        variants += [("rlr, leave-one-out baseline", "rlr", ("estimator.baseline=leave_one_out_prompt",)),
                     ("rlr, state baseline every 3", "rlr", ("estimator.baseline_every=3",))]
    for name, estimator_name, overrides in variants:
        try:
            estimator = load_estimator(estimator_name, model, num_steps, batch, *overrides)
            if isinstance(estimator, ShortFT):  # its shortcut must fit this model's UNet
                estimator.attach(policy)
        except UserError as error:
            skipped[name] = str(error)
            print(f"{name}: skipped: {error}", file=sys.stderr, flush=True)
            continue

        steps_per_batch: list[int] = []

        def step(estimator=estimator, steps_per_batch=steps_per_batch):
            steps_per_batch.append(training_steps(estimator, policy, reward, prompts, generator, optimizer))

        base.append(meter.run(sample))  # the baseline is re-timed beside every estimator (shared machines)
        saved = [p.detach().clone() for p in params]
        repeats = [meter.run(step) for _ in range(steps)]
        for p, saved_p in zip(params, saved):
            p.data.copy_(saved_p)
        # the fastest repeat (the machine may be shared) per optimizer step, and the peak memory
        rows[name] = (min(r[0] for r in repeats) / steps_per_batch[0], max(r[1] for r in repeats))
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    base_seconds, base_mem = min(b[0] for b in base), max(b[1] for b in base)
    rows = {"sampling (no grad)": (base_seconds, base_mem)} | rows
    cuda = device.startswith("cuda")
    memory = "peak MB: torch.cuda.max_memory_allocated" if cuda else (
        "peak MB: bytes saved for backward (saved-tensor hooks; checkpointed activations are not saved)")
    chain = type(policy.chain).__name__
    lines = [
        f"**{model}** on {device}, batch {batch}, {chain} T = {num_steps}, guidance {policy.guidance_scale}, "
        f"LoRA r={policy.lora.rank if policy.lora else 'none'}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}; {memory}; step = estimator call + backward + AdamW",
        "",
        "| estimator | seconds | x sampling | peak MB | x sampling |",
        "|---|---|---|---|---|",
    ]
    for name, (seconds, mem) in rows.items():
        mem_ratio = f"{mem / base_mem:.2f}" if base_mem > 0 else "n/a"
        lines.append(f"| {name} | {seconds:.2f} | {seconds / base_seconds:.2f} | {mem:.1f} | {mem_ratio} |")
    if skipped:
        lines += ["", "Not run on this model:", *(f"- {name}: {reason}" for name, reason in skipped.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny | tiny_sdxl | tiny_sd3 | tiny_flux | toy | toy_flow")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2, help="repeats timed per estimator (the fastest is reported)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--only", default="", help="comma-separated estimator names (default: all configs)")
    parser.add_argument("--kl-beta", type=float, default=0.0, help="also bench the KL-regularised estimators at this beta")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the machines here are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = [n for n in args.only.split(",") if n]
    checkpointing = args.checkpointing == "on"
    tables = [bench(args.model, args.device, 4, args.num_steps, args.steps, checkpointing, only, args.kl_beta)]
    if args.device.startswith("cuda"):
        for batch in (1, 4):
            tables.append(bench("sd15", args.device, batch, args.num_steps, args.steps, checkpointing, only, args.kl_beta))
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
