"""One rank of a multi-process run: `python -m rlr_cli.worker RUN_DIR/config.yaml RUN_DIR` (via accelerate)."""
from __future__ import annotations

import sys
from pathlib import Path


def main(config_file: str, run_dir: str) -> None:
    from omegaconf import OmegaConf

    from rlr_cli.build import build
    from rlr_cli.cli import fail
    from rlr_cli.errors import UserError
    from rlr_cli.trainer import Trainer

    try:
        Trainer(build(OmegaConf.load(config_file)), Path(run_dir)).train()
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main(*sys.argv[1:3])
