"""A real `CLIPTokenizer` for the toy captions: byte-level BPE whose merges make every caption word one token.

Vocabulary layout follows OpenAI CLIP: 256 byte characters, their "</w>" forms, one entry per learned
merge, then <|startoftext|> and <|endoftext|> (pad = eos, as in Stable Diffusion's tokenizer).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rlr_cli.toy import data

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # token positions; captions use 10 (bos + 8 words + eos)


def caption_words() -> list[str]:
    """Every word that appears in a toy caption, sorted."""
    words = {"a", "on", "background", *data.SHAPES, *data.COLOURS, *data.BACKGROUNDS, *data.SIZES}
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair until every word is a single symbol."""
    byte_char = bytes_to_unicode()
    seqs = []
    for w in words:
        chars = [byte_char[b] for b in w.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + kv[0][1]]))[0]
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


def write_tokenizer_files(directory: str | Path) -> None:
    """Write vocab.json and merges.txt (with its #version header) for the caption vocabulary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = learn_merges(caption_words())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """Write the vocabulary files into directory and load a CLIPTokenizer from them."""
    write_tokenizer_files(directory)
    tok = CLIPTokenizer(
        vocab=str(Path(directory) / "vocab.json"), merges=str(Path(directory) / "merges.txt"),
        model_max_length=MAX_LENGTH,
    )
    return tok
