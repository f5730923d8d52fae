"""One rank of a multi-process run: `python -m rlr_cli.worker RUN_DIR/config.yaml RUN_DIR` (via accelerate).

Each rank builds from the resolved config the Hydra job wrote (validated there) and never composes.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(config_file: str, run_dir: str) -> None:
    from omegaconf import OmegaConf

    from rlr_cli.build import build
    from rlr_cli.commands import guarded
    from rlr_cli.config import to_plain
    from rlr_cli.trainer import Trainer

    config = OmegaConf.load(config_file)
    guarded("rlr-train", lambda: Trainer(build(to_plain(config)), Path(run_dir)).train())  # type: ignore[arg-type]


if __name__ == "__main__":
    main(*sys.argv[1:3])
