"""`rlr-train`: the Hydra entry point.

    rlr-train                                    # toy defaults on this machine
    rlr-train model=sd15 estimator=rlr reward=aesthetic
    rlr-train -m estimator=rlr,truncated_bp seed=0,1,2

Every job a command would run is validated before Hydra starts any of them (config.validate: one
line and exit status 2 for a user error, before any weight loads).
"""
from __future__ import annotations

import sys
from pathlib import Path

from rlr_cli.commands import check_writable, fail, guarded
from rlr_cli.config import config_dir

PROGRAM = "rlr-train"
# Flags after which Hydra does something other than run a job: leave them to Hydra untouched.
HYDRA_ONLY_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                    "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}


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


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (each swept key varied alone), so every value is checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else str(o.input_line)
            for o in parsed]
    variants = [base]
    for index, override in enumerate(parsed):
        if override.is_sweep_override():
            for value in list(override.sweep_string_iterator())[1:]:
                variants.append(base[:index] + [f"{override.get_key_element()}={value}"] + base[index + 1:])
    return variants


def precheck(argv: list[str]) -> None:
    """The validation pass of every job this command would run."""
    from hydra.errors import HydraException

    from rlr_cli.config import check_group_choices, compose, first_line, validate

    overrides = split_overrides(argv)
    if overrides is None:
        return
    check_group_choices(overrides)
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        variants = sweep_variants(job_overrides)
    except HydraException as error:
        fail(PROGRAM, first_line(error))
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    for variant in variants:
        plain = validate(compose(variant))
        check_writable(*output_folder(overrides, plain, multirun))


def output_folder(overrides: list[str], plain: dict, multirun: bool) -> tuple[Path, str]:
    """Where Hydra will create this job's run folder, and the key that sets it."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.partition("=")[2] for o in overrides if o.lstrip("+").partition("=")[0] == key]
    if given:
        return Path(given[-1]), key
    return (Path("multirun"), key) if multirun else (Path(plain["paths"]["output_root"]), "paths.output_root")


def run_job(cfg) -> None:
    """Build the run from the composed (already validated) config and train, in this process."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlr_cli.build import build
    from rlr_cli.checkpoint import check_resume_config, resume_point
    from rlr_cli.config import to_plain
    from rlr_cli.launch import inside_group, launch_group
    from rlr_cli.run_folder import RunFolder
    from rlr_cli.trainer import Trainer, plan_only

    run_dir = Path(HydraConfig.get().runtime.output_dir)

    def job() -> dict:
        RunFolder(run_dir).claim()
        plain = to_plain(cfg)
        trainer = plain["trainer"]
        resumed = resume_point(trainer["resume_from"], run_dir)
        if resumed is not None:
            check_resume_config(resumed, plain)
            RunFolder(resumed.parent.parent).claim()
        if trainer["plan"]:
            return plan_only(build(plain))
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        if trainer["num_processes"] * trainer["num_machines"] > 1 and not inside_group():
            status = launch_group(plain, run_dir)
            if status != 0:
                sys.exit(status)
            return {"run_dir": str(run_dir)}
        return Trainer(build(plain), run_dir).train()

    def body() -> dict:
        try:
            return job()
        finally:  # a job stopped before its work, or one resumed into another folder, leaves no folder of its own
            RunFolder(run_dir).discard_if_unused()

    result = guarded(PROGRAM, body)
    print(f"{PROGRAM}: done; run folder {result['run_dir']}", flush=True)


def main() -> None:
    import hydra

    guarded(PROGRAM, lambda: precheck(sys.argv[1:]))
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(run_job)()


if __name__ == "__main__":
    main()
