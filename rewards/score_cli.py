"""rlr-score: score a folder of images with any reward config and write the scores as JSON.

    rlr-score images=/path/to/pngs prompt_file=/path/to/prompts.txt reward=pickscore reward.path=/local/PickScore_v1
    python -m rewards.score_cli images=samples/ reward=aesthetic reward.path=/local/clip reward.head=/local/head.pth

Options are config fields (configs/score.yaml, configs/reward/*.yaml); output format: docs/rewards.md.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

from rlr_cli.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def reward_names() -> list[str]:
    """The reward config group's options (configs/reward/*.yaml)."""
    from rlr_cli.config import group_options

    return group_options("reward")


def list_images(folder: str) -> list[str]:
    """File names of the images in `folder`, sorted."""
    if not folder:
        raise UserError("no image folder given: set images=/path/to/folder")
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder!r} does not exist")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise UserError(f"no .png/.jpg images in {folder!r}")
    return names


def read_prompts(path: str | None, names: list[str]) -> list[str]:
    """One prompt per image: from a text file (one a line, sorted file order) or a JSON {file: prompt}."""
    if path is None:
        return [""] * len(names)
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} does not exist")
    if path.endswith(".json"):
        with open(path) as file:
            mapping = json.load(file)
        if not isinstance(mapping, dict):
            raise UserError(f"{path!r} must hold a JSON object {{file name: prompt}}")
        missing = [name for name in names if name not in mapping]
        if missing:
            raise UserError(f"{path!r} has no prompt for {len(missing)} image(s), e.g. {missing[0]!r}")
        return [str(mapping[name]) for name in names]
    with open(path) as file:
        prompts = [line.rstrip("\n") for line in file if line.strip()]
    if len(prompts) != len(names):
        raise UserError(f"{path!r} has {len(prompts)} prompts for {len(names)} images (need one per image)")
    return prompts


def load_image(path: str):
    """An image file -> (3,H,W) float tensor in [0,1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


def score_folder(reward, folder: str, names: list[str], prompts: list[str], batch_size: int, device: str) -> list[float]:
    """Reward scores of the images, batched when consecutive images share a size."""
    import torch

    scores: list[float] = []
    for start in range(0, len(names), batch_size):
        images = [load_image(os.path.join(folder, name)) for name in names[start : start + batch_size]]
        batch_prompts = prompts[start : start + batch_size]
        groups = [[i] for i in range(len(images))]
        if len({image.shape for image in images}) == 1:
            groups = [list(range(len(images)))]
        for group in groups:
            batch = torch.stack([images[i] for i in group]).to(device)
            with torch.no_grad():
                values = reward(batch, [batch_prompts[i] for i in group])
            scores += values.float().cpu().tolist()
    return scores


def run(overrides: list[str]) -> dict:
    """Score the folder and write the JSON; returns what it wrote."""
    from hydra.core.hydra_config import HydraConfig

    from rlr_cli.build import instantiate
    from rlr_cli.config import check_nodes, compose, to_plain

    config = to_plain(compose(overrides, "score"))
    name = HydraConfig.get().runtime.choices.get("reward", "reward")
    names = list_images(config["images"])
    prompts = read_prompts(config["prompt_file"], names)
    check_nodes(config["reward"], "reward")
    reward = instantiate(config["reward"], "reward")
    scores = score_folder(reward, config["images"], names, prompts, config["batch_size"], config["device"])
    result = {
        "reward": name,
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores),
        "n": len(scores),
        "scores": dict(zip(names, scores)),
    }
    output = config["output"] or os.path.join(config["images"], f"scores_{name}.json")
    with open(output, "w") as file:
        json.dump(result, file, indent=2)
    print(f"{name}: {result['mean']:.4f} +- {result['std']:.4f} (n={result['n']}) -> {output}")
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point: key=value overrides only; exit status 2 with one line on bad input."""
    from rlr_cli.commands import guarded

    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print((__doc__ or "").strip() + f"\n\nRewards: {', '.join(reward_names())}")
        return
    guarded("rlr-score", lambda: run(argv))


if __name__ == "__main__":
    main()
