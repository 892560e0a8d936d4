"""A word-level CLIPTokenizer built from a small vocabulary (no hub download).

CLIP's tokenizer is byte-level BPE: a word is split into characters (the last one marked ``</w>``) and
merged by ranked rules. Writing one merge rule per prefix of every vocabulary word makes each known word
a single token, while unknown words fall back to characters, so the result is a real ``CLIPTokenizer``
that ``from_pretrained`` loads like SD's.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs)[1]
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 16):
    """Write vocab.json/merges.txt for ``words`` into ``out_dir`` and return the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + "-'.,"
    vocab: list[str] = [*chars, *(c + "</w>" for c in chars)]
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words}):
        # BPE applies the lowest-ranked pair first, so rules written for earlier words can split this one
        # ("ri" from "right" breaks "triangle"'s t+r chain). Add rules until the word is one symbol; new
        # rules rank last, so they never change how an earlier word is split.
        while len(symbols := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(f"{pair[0]} {pair[1]}")
            if pair[0] + pair[1] not in vocab:
                vocab.append(pair[0] + pair[1])
    vocab += [BOS, EOS]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=EOS,
    )
    tok.save_pretrained(out_dir)
    return tok
