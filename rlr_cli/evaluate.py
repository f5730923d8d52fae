"""`rlr-eval`: an adapter (or the base model) on held-out prompts with fixed seeds, scored by the trained
reward and by others (reward hacking shows as one going up while the others fall).

    rlr-eval model=toy reward=toy_aesthetic eval.adapter=outputs/.../adapter eval.rewards=[toy_clipscore]
    rlr-eval --run outputs/.../<run folder> [model.num_steps=...]   # the run's model, reward and adapter

Options: configs/eval.yaml. Writes eval.json (the record of rlr_cli/evaluation.py) and grid.png into
eval.out (default: beside the adapter, or ./eval_<timestamp>).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from rlr_cli import evaluation
from rlr_cli.commands import guarded
from rlr_cli.errors import UserError

PROGRAM = "rlr-eval"


@dataclass(frozen=True)
class EvalOptions:
    """The `eval` node of configs/eval.yaml."""

    run: str | None
    adapter: str | None
    rewards: list[str]
    num_prompts: Annotated[int, Field(ge=1)]
    seed: int
    batch_size: Annotated[int, Field(ge=1)]
    out: str | None


def run_config(run_dir: Path, overrides: list[str]) -> dict:
    """A finished run's resolved config with key=value overrides applied (no group choices)."""
    from omegaconf import OmegaConf

    from rlr_cli.config import to_plain

    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise UserError(f"--run {run_dir}: no config.yaml there (not a run folder)")
    groups = [o for o in overrides if "." not in o.partition("=")[0]]
    if groups:
        raise UserError(f"--run takes the run's own groups; {groups[0]} cannot be combined with it")
    config = OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(overrides))
    return to_plain(config)  # type: ignore[arg-type]


def evaluate(argv: list[str]) -> None:
    from rlr_cli.build import instantiate
    from rlr_cli.config import bind, compose, to_plain, trusted_modules, validate

    if "--run" in argv:  # sugar for eval.run=DIR
        index = argv.index("--run")
        if index + 1 >= len(argv):
            raise UserError("--run needs a run folder")
        argv = argv[:index] + [f"eval.run={argv[index + 1]}"] + argv[index + 2 :]
    eval_args = [a for a in argv if a.startswith("eval.")]
    options = EvalOptions(**bind(EvalOptions, to_plain(compose(eval_args, "eval"))["eval"], "eval"))
    overrides = [a for a in argv if not a.startswith("eval.")]
    if options.run is not None:
        plain = run_config(Path(options.run), overrides)
        reward_name, adapter = plain.get("reward_name", "reward"), Path(options.run) / "adapter"
    else:
        plain = validate(compose(overrides, "eval"), across_groups=False)
        reward_name, adapter = plain["reward_name"], None
    adapter = Path(options.adapter) if options.adapter else adapter
    trusted = trusted_modules(plain)
    others = {name: validate(compose([f"reward={name}"]), across_groups=False)["reward"] for name in options.rewards}
    policy = instantiate(plain["model"], "model", trusted)
    if adapter is not None:
        if not adapter.is_dir():
            raise UserError(f"adapter folder {adapter} does not exist")
        policy.load_adapter(str(adapter))
    reward = instantiate(plain["reward"], "reward", trusted)
    metrics = {name: instantiate(node, "reward", trusted) for name, node in others.items()}
    prompts = instantiate(plain["prompts"], "prompts", trusted).eval_prompts(options.num_prompts)
    result = evaluation.evaluate(policy, reward, metrics, prompts, options.seed, options.batch_size, progress=True)
    record = evaluation.record(result, reward_name, adapter=str(adapter) if adapter else None)
    default_out = adapter.parent / "final_eval" if adapter else Path(f"eval_{time.strftime('%Y%m%d_%H%M%S')}")
    out = Path(options.out) if options.out else default_out
    evaluation.write(result, record, out / "eval.json", out / "grid.png", title=str(adapter or "base model"))
    print(f"{reward_name}: {record['reward_mean']:.4f} +- {record['reward_se']:.4f} (se, n={len(prompts)})")
    for name, values in record["metrics"].items():
        print(f"{name}: {values['mean']:.4f} +- {values['se']:.4f} (se, n={len(prompts)})")
    print(f"{PROGRAM}: wrote {out / 'eval.json'} and {out / 'grid.png'}")


def main(argv: list[str] | None = None) -> None:
    guarded(PROGRAM, lambda: evaluate(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
