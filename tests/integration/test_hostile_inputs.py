"""Hostile input through the real commands (subprocesses): one line on stderr, exit status 2 (130 for
Ctrl-C), no traceback, and the run folder left as the README's "Safety nets" paragraph promises."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import ROOT, rlr_train, user_error_line
from rlr_cli.lora import WEIGHTS as LORA_WEIGHTS

FAST = ["trainer.batch_size=2", "logger=none", "model.num_steps=6", "trainer.eval_every=0", "trainer.progress=false"]
HANG_GUARD = 900  # seconds: a hang guard, not a speed requirement


def start(*args: str, run_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "rlr_cli.cli", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"run ended before {what}"
        time.sleep(0.05)


def steps_logged(run_dir: Path) -> list[int]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def same_adapter(a: Path, b: Path) -> bool:
    first, second = load_file(str(a / "adapter" / LORA_WEIGHTS)), load_file(str(b / "adapter" / LORA_WEIGHTS))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def make_unwritable(folder: Path) -> bool:
    """Make folder unwritable: by its mode, and for root (whom modes do not stop) immutable with chattr +i.
    False when neither holds here."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def make_writable(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint after each step."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    rlr_train(*FAST, "trainer.max_steps=2", "trainer.checkpoint_every=1", run_dir=run_dir)
    return run_dir


# 1. numeric ranges --------------------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=-3", "trainer.max_steps=-3: must be >= 0"),
    ("optimizer.lr=-1", "optimizer.lr=-1: must be > 0"),
    ("trainer.batch_size=0", "trainer.batch_size=0: must be >= 1"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0: must be >= 1"),
    ("model.lora.dropout=1.5", "model.lora.dropout=1.5: must be < 1"),
])
def test_out_of_range_values_stop_before_the_run_folder_exists(tmp_path, override, expected):
    line = user_error_line(rlr_train(override, run_dir=tmp_path / "run", check=False))
    assert expected in line
    assert not (tmp_path / "run").exists()


# 2. undecodable files, 6. no debris from errors found after Hydra made the folder -------------------------
def test_prompt_file_not_utf8_names_file_and_byte_and_leaves_no_folder(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe a blue square\n")
    result = rlr_train(*FAST, f"prompts.train_file={prompts}", run_dir=tmp_path / "run", check=False)
    line = user_error_line(result)
    assert str(prompts) in line and "not UTF-8" in line and "byte 13" in line
    assert not (tmp_path / "run").exists()


# 3. over-long prompts ----------------------------------------------------------------------------
def test_overlong_prompts_are_counted_in_one_warning(tmp_path):
    long_prompt = " ".join(["a red circle on a blue background"] * 4)
    result = rlr_train(*FAST, "trainer.max_steps=1", f"prompts.train=[{long_prompt},a red circle]",
                       "prompts.eval=null", run_dir=tmp_path / "run")
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == ["rlr-train: warning: 1 of 2 prompts are longer than the text encoder's 16 tokens and are "
                        "cut to 16"]


# 4. a checkpoint that does not fit, 8. a changed config on resume ------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("model.lora.rank=8", "its LoRA rank is 4, this model's 8 (set model.lora.rank=4)"),
    ("model.lora.target_modules=[to_q,to_k]", "set model.lora.target_modules=[to_k,to_out.0,to_q,to_v]"),
])
def test_checkpoint_that_does_not_fit_the_model_names_the_key(checkpointed, tmp_path, override, expected):
    checkpoint = checkpointed / "checkpoints" / "step_2"
    result = rlr_train(*FAST, "trainer.max_steps=3", override, f"trainer.resume_from={checkpoint}",
                       "trainer.resume_allow=[model.lora]", run_dir=tmp_path / "run", check=False)
    assert expected in user_error_line(result)
    assert not (tmp_path / "run").exists()


def test_resume_with_a_changed_value_is_refused_unless_allowed(checkpointed, tmp_path):
    checkpoint = checkpointed / "checkpoints" / "step_1"
    args = [*FAST, "trainer.max_steps=2", "optimizer.lr=0.5", f"trainer.resume_from={checkpoint}"]
    line = user_error_line(rlr_train(*args, run_dir=tmp_path / "refused", check=False))
    assert "optimizer.lr 0.005 -> 0.5" in line and "trainer.resume_allow=[optimizer.lr]" in line
    assert steps_logged(checkpointed) == [1, 2]  # the checkpoint's run is untouched
    copy = tmp_path / "copy"
    shutil.copytree(checkpointed, copy)
    args[-1] = f"trainer.resume_from={copy / 'checkpoints' / 'step_1'}"
    rlr_train(*args, "trainer.resume_allow=[optimizer.lr]", run_dir=tmp_path / "allowed")
    assert not (tmp_path / "allowed").exists()  # the resumed run wrote into the checkpoint's folder
    assert steps_logged(copy) == [1, 2]


# 5. output that cannot be written ----------------------------------------------------------------
def test_run_folder_under_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = rlr_train(*FAST, f"paths.output_root={tmp_path / 'a_file' / 'runs'}", run_dir=tmp_path / "a_file" / "run",
                       check=False)
    assert "is a file, not a folder" in user_error_line(result)


def test_unwritable_output_folder_is_refused_before_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not make_unwritable(locked):
        pytest.skip("this user can write into any folder (root without chattr)")
    try:
        result = rlr_train(*FAST, run_dir=locked / "run", check=False)
    finally:
        make_writable(locked)
    assert "cannot write in" in user_error_line(result) and str(locked) in result.stderr


def test_checkpoint_folder_unwritable_mid_run_stops_with_the_last_checkpoint_intact(tmp_path):
    run_dir = tmp_path / "run"
    process = start(*FAST, "trainer.max_steps=40", "trainer.checkpoint_every=1", run_dir=run_dir)
    checkpoints = run_dir / "checkpoints"
    wait_for(lambda: (checkpoints / "step_1" / "state.json").exists(), process, "its first checkpoint")
    unwritable = make_unwritable(checkpoints)
    try:
        _, stderr = process.communicate(timeout=HANG_GUARD)
    finally:
        make_writable(checkpoints)
    if not unwritable:
        pytest.skip("this user can write into any folder (root without chattr)")
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    line = user_error_line(result)
    last = sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    assert "cannot write" in line and f"The last complete checkpoint is {last}." in line
    assert {"adapter", "optimizer.pt", "state.json"} <= {p.name for p in last.iterdir()}


# 7. Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_saves_the_last_step_exits_130_and_resumes_bit_exact(tmp_path):
    args = [*FAST, "trainer.max_steps=6", "trainer.checkpoint_every=0", "seed=3"]
    reference = tmp_path / "reference"
    rlr_train(*args, run_dir=reference)

    stopped = tmp_path / "stopped"
    process = start(*args, run_dir=stopped)
    wait_for(lambda: len(steps_logged(stopped)) >= 2, process, "its second step")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=HANG_GUARD)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    step = steps_logged(stopped)[-1]
    assert 2 <= step < 6 and f"stopped by Ctrl-C after step {step}" in lines[0]
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"step_{step}"]

    rlr_train(*args, "trainer.resume_from=latest", run_dir=stopped)
    assert same_adapter(reference, stopped)
    assert steps_logged(stopped) == [1, 2, 3, 4, 5, 6]


# 8. two runs in one folder ----------------------------------------------------------------------------
def test_second_run_into_a_busy_run_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = start(*FAST, "trainer.max_steps=100", run_dir=run_dir)
    wait_for(lambda: len(steps_logged(run_dir)) >= 1, first, "its first step")
    line = user_error_line(rlr_train(*FAST, "trainer.max_steps=100", run_dir=run_dir, check=False))
    assert f"run folder {run_dir} is in use by another run (pid {first.pid})" in line
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=HANG_GUARD)
    assert first.returncode == 130
    steps = steps_logged(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # each step once: the refused run wrote nothing


# 9. precision the device cannot do ------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is possible on this machine's GPU")
def test_fp16_without_a_gpu_is_refused(tmp_path):
    line = user_error_line(rlr_train("trainer.mixed_precision=fp16", run_dir=tmp_path / "run", check=False))
    assert "trainer.mixed_precision=fp16 needs a GPU" in line


# 10. config targets --------------------------------------------------------------------------------
def test_target_from_the_command_line_outside_the_project_is_refused(tmp_path):
    line = user_error_line(rlr_train("+foo._target_=shutil.copyfile", run_dir=tmp_path / "run", check=False))
    assert "foo._target_='shutil.copyfile'" in line and "trusted_modules" in line


# 11. rlr-score and rlr-eval ----------------------------------------------------------------------------
def score(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rewards.score_cli", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)


def test_rlr_score_names_a_corrupt_image_and_a_text_file_and_scores_the_rest(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "2.png").write_bytes((images / "0.png").read_bytes()[:60])  # truncated
    (images / "notes.txt").write_text("not an image")
    prompts = tmp_path / "prompts.txt"
    long_prompt = " ".join(["a red circle on a blue background"] * 4)
    prompts.write_text(f"{long_prompt}\na blue square\na green star\n")
    result = score(f"images={images}", f"prompt_file={prompts}", "reward=toy_clipscore")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{images / '2.png'} is not a readable image; skipped" in result.stderr
    assert "'notes.txt'" in result.stderr and "(n=2)" in result.stdout
    assert "1 of 2 prompts are longer than toy_clipscore's tokenizer's 16 tokens" in result.stderr

    prompts.write_text("a red circle\n")
    (images / "notes.txt").unlink()
    line = user_error_line(score(f"images={images}", f"prompt_file={prompts}", "reward=toy_clipscore"))
    assert "has 1 prompts for 3 images" in line


def test_rlr_eval_on_a_missing_run_folder_is_one_line():
    result = subprocess.run([sys.executable, "-m", "rlr_cli.evaluate", "--run", "/nonexistent"], cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_GUARD)
    assert "--run /nonexistent: no config.yaml there" in user_error_line(result)


# 12. feedback ------------------------------------------------------------------------------------
def test_first_evaluation_shows_progress_and_the_eta_counts_evaluations(tmp_path):
    result = rlr_train("trainer.batch_size=2", "logger=none", "model.num_steps=6", "trainer.max_steps=2",
                       "trainer.eval_every=1", "trainer.eval_prompts=4", "trainer.eval_batch_size=2",
                       run_dir=tmp_path / "run")
    output = result.stderr.replace("\r", "\n")
    assert output.index("evaluate:") < output.index("| 1/2 [")  # the step-0 evaluation shows progress
    assert "eta=" in output


def test_offline_hub_message_names_the_current_download_command(tmp_path):
    line = user_error_line(rlr_train("model=sd15", run_dir=tmp_path / "run", check=False, timeout=HANG_GUARD))
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in line
