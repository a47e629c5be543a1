"""Tokenizers: the embedded byte-level default, and a wrapper for Hugging Face ``tokenizer.json``.

The byte tokenizer needs no file and no training: every UTF-8 byte is a token (0..255),
plus BOS (256) and EOS (257). It is what the demo and the tutorials use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Union


class ByteTokenizer:
    """256 byte tokens + BOS + EOS: every UTF-8 byte is its own token.

    Examples
    --------
    >>> tok = ByteTokenizer()
    >>> tok.encode("hi")
    [256, 104, 105]
    >>> tok.decode([256, 104, 105, 257])
    'hi'
    """

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers`` library, the ``hf`` extra)."""

    def __init__(self, path: Union[str, Path]):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("reading tokenizer.json needs the 'tokenizers' package: "
                              "pip install 'minisparse[hf]'") from None
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id = None
        self.eos_id = None
        cfg = path.parent / "tokenizer_config.json"
        if cfg.is_file():
            import json
            d = json.loads(cfg.read_text())
            for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id")):
                tok = d.get(key)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if tok is not None:
                    setattr(self, attr, self._tok.token_to_id(tok))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path=None):
    """``ByteTokenizer()`` when ``path`` is None or has no tokenizer.json, else :class:`HFTokenizer`."""
    if path is None:
        return ByteTokenizer()
    p = Path(path).expanduser()
    if (p.is_dir() and (p / "tokenizer.json").is_file()) or (p.is_file() and p.name.endswith(".json")):
        return HFTokenizer(p)
    return ByteTokenizer()
