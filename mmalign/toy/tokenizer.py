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


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 16):
    """Write vocab.json/merges.txt for ``words`` into ``out_dir`` and return the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + "-'.,"
    vocab: list[str] = [*chars, *(c + "</w>" for c in chars)]
    merges: list[str] = []
    for word in sorted({w.lower() for w in words}):
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            rule = f"{current} {nxt}"
            if rule not in merges:
                merges.append(rule)
            if merged not in vocab:
                vocab.append(merged)
            current = merged
    vocab += [BOS, EOS]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=model_max_length,
        pad_token=EOS,
    )
    tok.save_pretrained(out_dir)
    return tok
