"""`rlr-train`: the Hydra entry point.

    rlr-train                                    # toy defaults on this machine
    rlr-train model=sd15 estimator=rlr reward=aesthetic
    rlr-train -m estimator=rlr,truncated_bp seed=0,1,2

User errors (unknown option, wrong type, missing value, missing weights) print one line and exit 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Flags after which Hydra does something other than run a job: leave them to Hydra untouched.
HYDRA_ONLY_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                    "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}


def fail(message: str) -> None:
    print(f"rlr-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception or of the exceptions that caused it."""
    while error is not None:
        lines = [line for line in str(error).splitlines() if line.strip()]
        if lines:
            return lines[0].strip()
        error = error.__cause__ or error.__context__
    return "invalid configuration"


def split_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides of argv, or None when a flag hands control to Hydra itself."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in HYDRA_ONLY_FLAGS:
            return None
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(overrides: list[str]) -> None:
    """`estimator=nope` -> one line with the valid choices (before Hydra's multi-line report)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "." in key or key.startswith("hydra") or not (CONFIG_DIR / key).is_dir():
            continue
        for choice in value.split(","):
            if choice and choice != "null" and not (CONFIG_DIR / key / f"{choice}.yaml").exists():
                fail(f"unknown {key} '{choice}'; choose one of: {', '.join(group_options(key))}")


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (each swept key varied alone), so every value is checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
            for o in parsed]
    variants = [base]
    for index, override in enumerate(parsed):
        if override.is_sweep_override():
            for value in list(override.sweep_string_iterator())[1:]:
                variants.append(base[:index] + [f"{override.get_key_element()}={value}"] + base[index + 1:])
    return variants


def compose(overrides: list[str]):
    """The job config for these overrides, with the hydra node set so ${hydra:...} resolves."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def unknown_key_message(overrides: list[str], error: BaseException) -> str | None:
    """For `group.key=value` where key does not exist: name the key and list the valid ones."""
    from omegaconf import OmegaConf

    text = str(error)
    for override in overrides:
        key = override.partition("=")[0]
        if f"'{key}'" in text and "Could not override" in text and "." in key:
            parent, _, leaf = key.rpartition(".")
            groups = [o for o in overrides if "." not in o.partition("=")[0]]
            node = OmegaConf.select(compose(groups), parent)
            if node is not None and leaf not in node:
                valid = ", ".join(k for k in node.keys() if not str(k).startswith("_"))
                return f"{key}: unknown option; valid options: {valid}"
    return None


def precheck(argv: list[str]) -> None:
    """Validate every job a command would run, before Hydra starts any of them."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlr_cli.build import validate
    from rlr_cli.errors import UserError

    overrides = split_overrides(argv)
    if overrides is None:
        return
    check_group_choices(overrides)
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        for variant in sweep_variants(job_overrides):
            validate(compose(variant))
    except UserError as error:
        fail(str(error))
    except (HydraException, OmegaConfBaseException) as error:
        fail(unknown_key_message(job_overrides, error) or first_line(error))


def run_job(cfg) -> None:
    """Build the run from the composed config and train, in this process."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlr_cli.build import build, validate
    from rlr_cli.errors import UserError
    from rlr_cli.launch import inside_group, launch_group
    from rlr_cli.trainer import Trainer

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        plain = validate(cfg)
        if plain["trainer"]["num_processes"] * plain["trainer"]["num_machines"] > 1 and not inside_group():
            status = launch_group(plain, run_dir)
            if status != 0:
                sys.exit(status)
            result = {"run_dir": str(run_dir)}
        else:
            result = Trainer(build(cfg), run_dir).train()
    except UserError as error:
        fail(str(error))
    print(f"rlr-train: done; run folder {result['run_dir']}", flush=True)


def main() -> None:
    import hydra

    precheck(sys.argv[1:])
    hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")(run_job)()


if __name__ == "__main__":
    main()
