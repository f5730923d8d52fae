"""rlr-score on a folder of generated PNGs with a stand-in reward; bad input stops with one line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewards import score_cli
from rewards.standins import hydra_overrides, write_standin

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog", "a green cow"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three 64x48 PNGs of random colours, a prompt file, a JSON prompt map and PickScore stand-in overrides."""
    root = tmp_path_factory.mktemp("score")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = [f"sample_{i}.png" for i in range(3)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / name)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "prompts.json").write_text(json.dumps(dict(zip(names, PROMPTS))))
    overrides = ["reward=pickscore", *hydra_overrides(write_standin("pickscore", str(root / "pickscore")))]
    return root, names, overrides


def test_rlr_score_module_writes_json_and_prints_mean_std(folder):
    root, names, overrides = folder
    output = root / "scores.json"
    command = [sys.executable, "-m", "rewards.score_cli", f"images={root / 'images'}",
               f"prompt_file={root / 'prompts.txt'}", f"output={output}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    assert result["reward"] == "pickscore" and result["n"] == 3 and list(result["scores"]) == names
    scores = np.array(list(result["scores"].values()))
    assert np.isfinite(scores).all()
    assert result["mean"] == pytest.approx(scores.mean()) and result["std"] == pytest.approx(scores.std())
    assert f"{result['mean']:.4f} +- {result['std']:.4f}" in done.stdout


def test_json_prompt_map_gives_the_same_scores_as_the_text_file(folder, capsys):
    root, names, overrides = folder
    by_text = score_cli.run([f"images={root / 'images'}", f"prompt_file={root / 'prompts.txt'}",
                             f"output={root / 'a.json'}", *overrides])
    by_json = score_cli.run([f"images={root / 'images'}", f"prompt_file={root / 'prompts.json'}",
                             f"output={root / 'b.json'}", *overrides])
    assert by_json["scores"] == pytest.approx(by_text["scores"])
    swapped = dict(zip(names, reversed(PROMPTS)))
    (root / "swapped.json").write_text(json.dumps(swapped))
    by_swapped = score_cli.run([f"images={root / 'images'}", f"prompt_file={root / 'swapped.json'}",
                                f"output={root / 'c.json'}", *overrides])
    assert by_swapped["scores"][names[0]] != pytest.approx(by_text["scores"][names[0]])  # prompts matter


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "no .png/.jpg images"),
        ("mismatch", "has 2 prompts for 3 images"),
        ("unknown", "unknown reward 'nope'; choose one of: aesthetic, hps, imagereward, jpeg_compressibility"),
        ("no_weights", "hf download yuvalkirstain/PickScore_v1"),
        ("bad_key", "reward.nokey"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(folder, tmp_path, capsys, monkeypatch, case, expected):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root, _, overrides = folder
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    images = f"images={root / 'images'}"
    argv = {
        "empty": [f"images={tmp_path}", *overrides],
        "mismatch": [images, f"prompt_file={tmp_path / 'two.txt'}", *overrides],
        "unknown": [images, "reward=nope"],
        "no_weights": [images, "reward=pickscore", f"reward.cache_dir={tmp_path}"],
        "bad_key": [images, "reward.nokey=3", *overrides],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        score_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlr-score: error: ") and expected in err
    assert "Traceback" not in err
