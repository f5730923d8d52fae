"""Distil a few-step, trajectory-preserving LoRA ("shortcut") of the toy model, for estimator=shortft.

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python scripts/distill_shortcut.py            # k = 4, ~15 min on 2 cores
    python scripts/distill_shortcut.py --k 2 --minutes 5 --out /tmp/shortcut_k2

Teacher: the toy pipeline sampled as it is for evaluation: DDIM with eta 0 (the probability-flow ODE),
50 steps, classifier-free guidance 4. Student: the same UNet plus a LoRA, sampled with the same guidance
(both CFG passes through the student). The 50-step grid is cut into k phases at the long chain's own
timesteps (shortcut timesteps "even": 981, 721, 481, 221 and x_0 for k = 4), and the student is trained so
that ONE student DDIM step from any grid point x_s of a phase lands where the teacher's DDIM steps from
x_s land at the phase's end (phased trajectory distillation, as PCM / Hyper-SD's trajectory-segmented
consistency distillation do; with s at the phase start half of the time, where the shortcut is used).
Teacher trajectories are sampled once into a bank (prompts x noise), so each target is one lookup.

The k-step student chain then starts from the same x_T as the 50-step chain and visits (approximately)
the same states at the phase boundaries: it is a shortcut of the teacher's trajectory, not just a
sampler of the same distribution. One caption in `--holdout-every` is never used here (evaluation:
scripts/evaluate_shortcut.py). Output: <out>/pytorch_lora_weights.safetensors (diffusers LoRA format)
and <out>/distill_log.json (settings, measured seconds, losses, held-out captions).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlr_cli import lora
from rlr_cli.models.sd import StableDiffusion
from rlr_cli.sampling import DDIMChain
from rlr_cli.shortcut import even_indices

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "rlr_cli" / "assets" / "toy"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "time_emb_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=str(TOY / "pipeline"), help="the teacher: a StableDiffusionPipeline folder")
    p.add_argument("--prompts", default=str(TOY / "train_prompts.txt"), help="captions, one a line")
    p.add_argument("--out", default=str(TOY / "shortcut"))
    p.add_argument("--k", type=int, default=4, help="shortcut steps")
    p.add_argument("--teacher-steps", type=int, default=50, help="DDIM steps of the long chain")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of teacher and student")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--trajectories", type=int, default=1024, help="teacher trajectories in the bank")
    p.add_argument("--batch", type=int, default=64, help="student pairs per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=12.0, help="time budget of the student training")
    p.add_argument("--at-start", type=float, default=0.5, help="share of pairs starting at a phase start")
    p.add_argument("--holdout-every", type=int, default=6, help="caption i is held out when i %% this == 0")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out k-step checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a contended CPU")
    return p.parse_args()


def split_prompts(path: str, every: int) -> tuple[list[str], list[str]]:
    """(distillation captions, held-out captions): caption i is held out when i % every == 0."""
    captions = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return [c for i, c in enumerate(captions) if i % every], [c for i, c in enumerate(captions) if not i % every]


class Guided:
    """eps of a UNet with classifier-free guidance; embeddings precomputed per caption."""

    def __init__(self, pipe, captions: list[str], guidance: float):
        ids = pipe.tokenizer(captions + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = pipe.text_encoder(ids)[0]
        self.text, self.empty, self.guidance = embeds[:-1], embeds[-1:], guidance

    def __call__(self, unet, x, t, caption_idx):
        """x (B,C,h,w), t (B,) long, caption_idx (B,) -> guided eps (B,C,h,w)."""
        text = self.text[caption_idx]
        both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.empty.expand_as(text), text])).sample
        uncond, cond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)


def alpha_at(chain: DDIMChain, index: int) -> torch.Tensor:
    """alpha_cumprod at grid index (index = T: x_0, the chain's final alpha)."""
    if index >= chain.num_steps:
        return torch.tensor(chain.final_alpha, dtype=torch.float64)
    return chain.alphas_cumprod[int(chain.timesteps[index])]


def ddim_jump(x, eps, a_from, a_to):
    """Deterministic DDIM from alpha a_from to a_to; a_* (B,1,1,1)."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@torch.no_grad()
def teacher_bank(unet, guided, chain, n, batch, generator, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """n DDIM (eta 0) trajectories -> (states (n, T+1, C, h, w) x_T..x_0, caption indices (n,))."""
    states, captions = [], []
    for start in tqdm(range(0, n, batch), desc="teacher trajectories"):
        b = min(batch, n - start)
        idx = torch.randint(len(guided.text), (b,), generator=generator)
        x = torch.randn((b, *shape), generator=generator)
        path = [x]
        for i in range(chain.num_steps):
            t = chain.timesteps[i].repeat(b)
            x = chain.mean(torch.full((b,), i), x, guided(unet, x, t, idx))
            path.append(x)
        states.append(torch.stack(path, 1))
        captions.append(idx)
    return torch.cat(states), torch.cat(captions)


def student_step(unet, guided, chain, x, start, end, idx):
    """One student DDIM step from grid index start (B,) to end (B,) -> x at end (B,C,h,w)."""
    t = chain.timesteps[start]
    a_from = torch.stack([alpha_at(chain, int(s)) for s in start]).float().view(-1, 1, 1, 1)
    a_to = torch.stack([alpha_at(chain, int(e)) for e in end]).float().view(-1, 1, 1, 1)
    return ddim_jump(x, guided(unet, x, t, idx), a_from, a_to)


@torch.no_grad()
def k_step_error(unet, guided, chain, bounds, states, captions) -> float:
    """Mean squared latent distance between the k-step student chain and the teacher's x_0, same x_T."""
    x, idx = states[:, 0], captions
    for j in range(len(bounds) - 1):
        start = torch.full((len(x),), bounds[j])
        x = student_step(unet, guided, chain, x, start, torch.full_like(start, bounds[j + 1]), idx)
    return float(((x - states[:, -1]) ** 2).mean())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, requires_safety_checker=False)
    teacher = pipe.unet.eval().requires_grad_(False)
    chain = DDIMChain(DDIMScheduler.from_config(pipe.scheduler.config), args.teacher_steps, 0.0)
    bounds = even_indices(chain.num_steps, args.k)
    train_caps, held_caps = split_prompts(args.prompts, args.holdout_every)
    shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    weights = Path(args.pipeline) / "unet" / "diffusion_pytorch_model.safetensors"
    teacher_hash = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None
    log = {"settings": vars(args), "teacher_unet_sha256": teacher_hash,
           "shortcut_timesteps": [int(chain.timesteps[b]) for b in bounds[:-1]],
           "phase_bounds": bounds, "train_captions": len(train_caps), "heldout_captions": held_caps}

    # ---- 1. teacher trajectories (distillation captions) and a held-out check set ------------------------
    t0 = time.time()
    guided = Guided(pipe, train_caps, args.guidance)
    states, captions = teacher_bank(teacher, guided, chain, args.trajectories, 256, generator, shape)
    held_guided = Guided(pipe, held_caps, args.guidance)
    held_generator = torch.Generator().manual_seed(10_000 + args.seed)
    held_states, held_idx = teacher_bank(teacher, held_guided, chain, 128, 128, held_generator, shape)
    log["teacher_seconds"] = time.time() - t0

    # ---- 2. the student: the same UNet plus a LoRA, trained phase by phase -------------------------------
    student = copy.deepcopy(teacher)
    student.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                                   target_modules=TARGET_MODULES))
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    log["lora_parameters"] = sum(p.numel() for p in params)
    log["k_step_mse_before"] = k_step_error(student, held_guided, chain, bounds, held_states, held_idx)
    phase_starts, phase_ends = torch.tensor(bounds[:-1]), torch.tensor(bounds[1:])
    t1, step, history = time.time(), 0, []
    bar = tqdm(total=args.max_steps, desc="distilling")
    while step < args.max_steps and time.time() - t1 < args.minutes * 60:
        rows = torch.randint(len(states), (args.batch,), generator=generator)
        phase = torch.randint(args.k, (args.batch,), generator=generator)
        inside = phase_starts[phase] + (torch.rand(args.batch, generator=generator)
                                        * (phase_ends[phase] - phase_starts[phase]).float()).long()
        start = torch.where(torch.rand(args.batch, generator=generator) < args.at_start, phase_starts[phase], inside)
        end = phase_ends[phase]
        x = states[rows, start]
        loss = ((student_step(student, guided, chain, x, start, end, captions[rows]) - states[rows, end]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        progress = min(max(step / args.max_steps, (time.time() - t1) / (args.minutes * 60)), 1.0)
        for group in optimizer.param_groups:  # cosine decay over whichever budget (steps, time) runs out first
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.eval_every == 0:
            student.eval()
            error = k_step_error(student, held_guided, chain, bounds, held_states, held_idx)
            student.train()
            history.append({"step": step, "loss": loss.item(), "heldout_k_step_mse": error,
                            "seconds": time.time() - t1})
            bar.write(f"step {step}: pair loss {loss.item():.4f}, held-out {args.k}-step latent MSE {error:.4f}")
    bar.close()
    student.eval()
    log |= {"train_seconds": time.time() - t1, "steps": step, "history": history,
            "k_step_mse_after": k_step_error(student, held_guided, chain, bounds, held_states, held_idx)}
    log["total_seconds"] = time.time() - t0

    # ---- 3. save (diffusers LoRA format) -----------------------------------------------------------------
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lora.write(out, student, StableDiffusion.lora_format, lora.metadata(args.rank, args.alpha, TARGET_MODULES))
    (out / "distill_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"held-out {args.k}-step latent MSE to the 50-step x_0: {log['k_step_mse_before']:.4f} without the "
          f"LoRA (student at init), {log['k_step_mse_after']:.4f} after {step} steps; "
          f"{log['total_seconds'] / 60:.1f} min in all; wrote {out}")


if __name__ == "__main__":
    main()
