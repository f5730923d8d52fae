"""Install the reference packages the parity tests compare the rewards with, where they can install here.

    python scripts/install_reference_packages.py      (make venv runs it)

hpsv2 1.2.0 pins pytest==7.2.0 and protobuf<4 and its wheel lacks open_clip's BPE vocabulary, so it goes in
without its dependencies (the ones its transforms need are ours too) and gets the vocabulary from our
open_clip. image-reward cannot run here (it needs OpenAI's `clip` package from git and fairscale, and
pins timm 0.6.13); its preprocessing is BLIP's torchvision transform, tested as such.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def main() -> None:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "hpsv2==1.2.0", "clint", "args"]
    if subprocess.run(pip).returncode != 0:  # the parity test then skips, saying why; nothing else needs it
        print("hpsv2 could not be installed: its parity test will skip", flush=True)
        return
    open_clip, hpsv2 = importlib.util.find_spec("open_clip"), importlib.util.find_spec("hpsv2")
    assert open_clip and open_clip.origin and hpsv2 and hpsv2.origin
    target = Path(hpsv2.origin).parent / "src" / "open_clip" / VOCAB
    if not target.exists():
        shutil.copy(Path(open_clip.origin).parent / VOCAB, target)
    print(f"hpsv2 installed without its pins; {target.name} copied in", flush=True)


if __name__ == "__main__":
    main()
