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
from pathlib import Path

from rlr_cli.errors import UserError
from rlr_cli.interfaces import TextLimited
from rlr_cli.prompts import overlong_warning, read_text
from rlr_cli.run_folder import write_json

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
    files = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
    names = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise UserError(f"no .png/.jpg images in {folder!r}")
    others = [name for name in files if name not in names and not name.startswith(("scores_", "."))]
    if others:
        print(f"rlr-score: {len(others)} file(s) in {folder!r} are not .png/.jpg and are not scored "
              f"(e.g. {others[0]!r})", file=sys.stderr)
    return names


def read_prompts(path: str | None, names: list[str]) -> list[str]:
    """One prompt per image: from a text file (one a line, sorted file order) or a JSON {file: prompt}."""
    if path is None:
        return [""] * len(names)
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} does not exist")
    text = read_text(Path(path), "prompt file")
    if path.endswith(".json"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"prompt file {path!r} is not valid JSON: {error}") from None
        if not isinstance(mapping, dict):
            raise UserError(f"{path!r} must hold a JSON object {{file name: prompt}}")
        missing = [name for name in names if name not in mapping]
        if missing:
            raise UserError(f"{path!r} has no prompt for {len(missing)} image(s), e.g. {missing[0]!r}")
        return [str(mapping[name]) for name in names]
    prompts = [line for line in text.splitlines() if line.strip()]
    if len(prompts) != len(names):
        raise UserError(f"{path!r} has {len(prompts)} prompts for {len(names)} images (need one per image)")
    return prompts


def load_image(path: str):
    """An image file -> (3,H,W) float tensor in [0,1]."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    except (OSError, SyntaxError) as error:  # PIL's errors for a corrupt file
        raise UserError(f"{path} cannot be decoded ({error})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def is_image(path: str) -> bool:
    """Whether PIL can open and verify the file (a truncated or corrupt image fails)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises many types for a bad file; every one means "not an image"
        return False
    return True


def readable(folder: str, names: list[str], prompts: list[str]) -> tuple[list[str], list[str]]:
    """The images that verify, with their prompts; each one that does not is named on stderr."""
    kept = [(name, prompt) for name, prompt in zip(names, prompts) if is_image(os.path.join(folder, name))]
    for name in sorted(set(names) - {name for name, _ in kept}):
        print(f"rlr-score: warning: {os.path.join(folder, name)} is not a readable image; skipped", file=sys.stderr)
    if not kept:
        raise UserError(f"none of the {len(names)} images in {folder!r} can be read")
    return [name for name, _ in kept], [prompt for _, prompt in kept]


def score_folder(reward, folder: str, names: list[str], prompts: list[str], batch_size: int, device: str) -> list[float]:
    """Reward scores of the images, batched when consecutive images share a size."""
    import torch

    scores: list[float] = []
    for start in range(0, len(names), batch_size):
        chunk = [load_image(os.path.join(folder, name)) for name in names[start : start + batch_size]]
        batch_prompts = prompts[start : start + batch_size]
        groups = [[i] for i in range(len(chunk))]
        if len({image.shape for image in chunk}) == 1:
            groups = [list(range(len(chunk)))]
        for group in groups:
            batch = torch.stack([chunk[i] for i in group]).to(device)
            with torch.no_grad():
                values = reward(batch, [batch_prompts[i] for i in group])
            scores += values.float().cpu().tolist()
    return scores


def run(overrides: list[str]) -> dict:
    """Score the folder and write the JSON; returns what it wrote."""
    from hydra.core.hydra_config import HydraConfig

    from rlr_cli.build import instantiate
    from rlr_cli.commands import check_writable
    from rlr_cli.config import check_nodes, compose, to_plain

    config = to_plain(compose(overrides, "score"))
    name = HydraConfig.get().runtime.choices.get("reward", "reward")
    names = list_images(config["images"])
    prompts = read_prompts(config["prompt_file"], names)
    check_nodes(config["reward"], "reward")
    names, prompts = readable(config["images"], names, prompts)
    output = Path(config["output"] or os.path.join(config["images"], f"scores_{name}.json"))
    check_writable(output.parent, "output")
    reward = instantiate(config["reward"], "reward")
    if isinstance(reward, TextLimited) and config["prompt_file"] is not None:
        cut, limit = reward.overlong(prompts)
        if cut:
            print(overlong_warning("rlr-score", cut, len(prompts), limit, f"{name}'s tokenizer"), file=sys.stderr)
    scores = score_folder(reward, config["images"], names, prompts, config["batch_size"], config["device"])
    result = {
        "reward": name,
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores),
        "n": len(scores),
        "scores": dict(zip(names, scores)),
    }
    write_json(output, result)
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
