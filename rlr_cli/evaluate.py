"""`rlr-eval`: an adapter (or the base model) on held-out prompts with fixed seeds, scored by the trained
reward and by others (reward hacking shows as one going up while the others fall).

    rlr-eval model=toy reward=toy_aesthetic eval.adapter=outputs/.../adapter eval.rewards=[toy_clipscore]
    rlr-eval --run outputs/.../<run folder>          # the run's own model, reward and final adapter

Writes eval.json (mean +- standard error per reward) and grid.png into eval.out (default: beside the
adapter, or ./eval_<timestamp>).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from rlr_cli.cli import compose, fail


def score_policy(policy, rewards: dict, prompts: list[str], seed: int, batch_size: int):
    """Sample prompts with one fixed generator; -> images (N,3,H,W), {reward name: scores (N,)}."""
    generator = torch.Generator().manual_seed(seed)
    images, scores = [], {name: [] for name in rewards}
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = policy.decode(policy.sample(chunk, generator=generator).final)
            images.append(batch.float().cpu())
            for name, reward in rewards.items():
                scores[name].append(reward(batch, chunk).float().cpu())
    return torch.cat(images), {name: torch.cat(values) for name, values in scores.items()}


def summarise(scores: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {
        name: {"mean": v.mean().item(), "std": v.std().item(), "se": v.std().item() / math.sqrt(len(v)),
               "scores": v.tolist()}
        for name, v in scores.items()
    }


def load_run_overrides(run_dir: Path) -> tuple[list[str], Path]:
    """Group choices of a finished run (from its Hydra record) and its final adapter."""
    from omegaconf import OmegaConf

    record = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(record)) if record.exists() else []
    return [o for o in overrides if not o.startswith(("trainer.", "hydra"))], run_dir / "adapter"


def main(argv: list[str] | None = None) -> None:
    from rlr_cli.build import instantiate_node, validate
    from rlr_cli.errors import UserError
    from rlr_cli.images import save_grid

    argv = list(sys.argv[1:] if argv is None else argv)
    adapter = None
    if "--run" in argv:
        index = argv.index("--run")
        run_overrides, adapter = load_run_overrides(Path(argv[index + 1]))
        argv = run_overrides + argv[:index] + argv[index + 2 :]
    eval_args = dict(a.split("=", 1) for a in argv if a.startswith("eval."))
    overrides = [a for a in argv if not a.startswith("eval.")]
    adapter = eval_args.get("eval.adapter", adapter)
    try:
        plain = validate(compose(overrides))
        from hydra.core.hydra_config import HydraConfig

        trained_reward = HydraConfig.get().runtime.choices["reward"]
        extra = [n for n in eval_args.get("eval.rewards", "[]").strip("[]").split(",") if n.strip()]
        reward_nodes = {trained_reward: plain["reward"]}
        for name in extra:
            reward_nodes[name.strip()] = validate(compose(overrides + [f"reward={name.strip()}"]))["reward"]
        policy = instantiate_node(plain["model"])
        if adapter not in (None, "null"):
            policy.load_adapter(str(adapter))
        rewards = {name: instantiate_node(node) for name, node in reward_nodes.items()}
        prompts = instantiate_node(plain["prompts"]).eval_prompts(int(eval_args.get("eval.num_prompts", 16)))
        images, scores = score_policy(policy, rewards, prompts, int(eval_args.get("eval.seed", 1234)),
                                      int(eval_args.get("eval.batch_size", 8)))
    except UserError as error:
        fail(str(error))
    default_out = Path(adapter).parent / "final_eval" if adapter else Path(f"eval_{time.strftime('%Y%m%d_%H%M%S')}")
    out = Path(eval_args.get("eval.out", default_out))
    out.mkdir(parents=True, exist_ok=True)
    summary = {"adapter": str(adapter) if adapter else None, "prompts": prompts, "rewards": summarise(scores)}
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    first = next(iter(scores))
    captions = [f"{p}\n{first}={s:.3g}" for p, s in zip(prompts, scores[first].tolist())]
    save_grid(images, captions, out / "grid.png", title=str(adapter or "base model"))
    for name, stats in summary["rewards"].items():
        print(f"{name}: {stats['mean']:.4f} +- {stats['se']:.4f} (se, n={len(prompts)})")
    print(f"rlr-eval: wrote {out / 'eval.json'} and {out / 'grid.png'}")


if __name__ == "__main__":
    main()
