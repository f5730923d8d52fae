"""Train the toy world's flow model from scratch on CPU: a small SD3 transformer -> StableDiffusion3Pipeline.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/pretrain_toy_flow.py   # every stage not yet done
    python scripts/pretrain_toy_flow.py --force transformer,pipeline    # redo both
    python scripts/pretrain_toy_flow.py --minutes 10                    # 10 more minutes (resumes the checkpoint)

Needs the toy world of scripts/pretrain_toy.py (its CLIP and the VAE of its pipeline folder), which it does not
change. Stages run in order transformer, pipeline; a stage whose output exists is skipped unless named in
--force. The transformer checkpoints every 250 steps into --build-dir and resumes from it (so --force
transformer with a larger --steps trains on; delete <build-dir>/flow_checkpoint.pt to start over).
Each stage's wall time, threads and figures are merged into <assets-dir>/flow_pretrain_log.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

# Before torch loads OpenMP: with the default (spinning) wait policy, 2 threads on 2 cores that another
# process also uses ran 4-20x slower than 1 thread; sleeping waits keep 2 threads near 1 thread's speed there.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

from rlr_cli.toy import assets  # noqa: E402
from scripts.pretrain_toy import log_stage  # noqa: E402

STAGES = ("transformer", "pipeline")


@dataclass(frozen=True)
class FlowPaths(assets.ToyPaths):
    """The toy world's paths plus the flow pipeline; the log is the flow's own."""

    @property
    def flow_pipeline(self) -> Path:  # diffusers StableDiffusion3Pipeline
        from rlr_cli.toy import flow

        return self.root / flow.PIPELINE_DIR.name

    @property
    def pretrain_log(self) -> Path:  # pretrain_toy.log_stage writes here
        return self.root / "flow_pretrain_log.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    p.add_argument("--force", default="", help="comma-separated stages to redo even if their output exists")
    p.add_argument("--assets-dir", default=str(assets.ASSETS), help="the toy world; the pipeline is written here")
    p.add_argument("--build-dir", default=".toy_build", help="intermediate files (transformer checkpoint, EMA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="device of the transformer stage")
    p.add_argument("--steps", type=int, default=12000, help="transformer steps (total, over resumed runs)")
    p.add_argument("--minutes", type=float, default=40.0, help="transformer wall-time budget of this run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args()


def new_pipeline(paths: FlowPaths, transformer):
    """The flow pipeline around a transformer, with the toy world's VAE and CLIP."""
    from rlr_cli.toy import flow

    return flow.build_pipeline(transformer, paths.pipeline / "vae", paths.clip)


def stage_transformer(args, paths: FlowPaths) -> dict:
    from diffusers import AutoencoderKL

    from rlr_cli.toy import flow

    build = Path(args.build_dir)
    checkpoint = build / "flow_checkpoint.pt"
    start = time.time()
    log = json.loads(paths.pretrain_log.read_text()) if paths.pretrain_log.exists() else {}
    before = log.get("transformer", {}) if checkpoint.exists() else {}  # a resumed run: keep the earlier runs
    runs = before.get("runs", [{k: before[k] for k in ("stage_seconds", "steps")}] if before else [])
    tower = flow.text_encoder(paths.clip)
    torch.manual_seed(args.seed + 5)
    transformer = flow.build_transformer(tower.config.hidden_size, tower.text_projection.out_features)
    embeds, pooled = flow.caption_table(new_pipeline(paths, transformer))  # the pipeline's own encode_prompt
    context, copies = flow.compact_context(embeds)
    vae = AutoencoderKL.from_pretrained(paths.pipeline / "vae").eval().requires_grad_(False)
    ema, stats = flow.train_flow(transformer, vae, context, pooled, copies, args.steps, args.minutes, checkpoint,
                                 batch_size=args.batch, lr=args.lr, seed=args.seed + 5, device=args.device)
    ema.save_pretrained(build / "flow_ema", safe_serialization=True)
    runs.append({"stage_seconds": round(time.time() - start, 1), "steps": stats["steps"] - sum(r["steps"] for r in runs)})
    stats.update(runs=runs, params=sum(p.numel() for p in ema.parameters()), batch=args.batch, lr=args.lr,
                 arch={k: ema.config[k] for k in ("patch_size", "num_layers", "num_attention_heads",
                                                  "attention_head_dim", "joint_attention_dim")})
    return stats


def stage_pipeline(args, paths: FlowPaths) -> dict:
    from diffusers import SD3Transformer2DModel

    pipe = new_pipeline(paths, SD3Transformer2DModel.from_pretrained(Path(args.build_dir) / "flow_ema"))
    if paths.flow_pipeline.exists():
        shutil.rmtree(paths.flow_pipeline)
    pipe.save_pretrained(paths.flow_pipeline, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # keep the slow-format files beside tokenizer.json
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(paths.clip / name, paths.flow_pipeline / sub / name)
    size = sum(f.stat().st_size for f in paths.flow_pipeline.rglob("*") if f.is_file())
    return {"folder_bytes": size}


def stage_done(name: str, args, paths: FlowPaths) -> bool:
    """Whether a stage's output already exists."""
    out = {"transformer": Path(args.build_dir) / "flow_ema" / "config.json",
           "pipeline": paths.flow_pipeline / "model_index.json"}[name]
    return out.exists()


def main() -> None:
    args = parse_args()
    transformers.logging.set_verbosity_error()  # CLIPTextModelWithProjection from the CLIPModel folder
    torch.set_num_threads(args.threads)
    paths = FlowPaths(Path(args.assets_dir))
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
        figures = {**globals()[f"stage_{name}"](args, paths), "threads": torch.get_num_threads()}
        device = "cpu" if name == "pipeline" else args.device
        log_stage(paths, name, time.time() - start, figures, f"{device}, {torch.get_num_threads()} threads")
    print(f"all stages done in {time.time() - total:.1f} s", flush=True)


if __name__ == "__main__":
    main()
