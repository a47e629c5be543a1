"""Corpora for training: the embedded default, a text file, or a folder of text files.

Text is byte-tokenized (:class:`minisparse.tokenizer.ByteTokenizer`: every UTF-8 byte is a
token 0..255) and every document starts with the BOS token (256), so the model sees where
files begin. The token stream is cut into fixed-size chunks and a seeded draw sends a
``val_fraction`` of the chunks to validation: the split is deterministic and the two
splits never share a byte.

The **embedded default corpus** is the Python standard library's own ``.py`` sources
found on this machine (the folder of ``os.py``): always there, no download, sorted by file
name and capped at ``max_bytes``. It is code, so a small byte-level model learns its
indentation, keywords and identifiers within minutes.

Dimension key: B batch, T time (sequence length).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from .tokenizer import ByteTokenizer

Array = np.ndarray
BOS = ByteTokenizer.bos_id
DEFAULT_CORPUS = "python-stdlib"


@dataclass
class Corpus:
    """Byte-token ids of a training and a validation split.

    Attributes
    ----------
    train, val : np.ndarray, 1-D uint16
        Token ids (bytes 0..255 and BOS 256 at each document start).
    name : str
        Where the text came from (a path or ``"python-stdlib"``).
    n_bytes : int
        Bytes of text read (before the split; BOS tokens not counted).
    n_docs : int
        Number of documents (files) read.
    source : dict or None
        How :func:`load_corpus` was called (path, max_bytes, val_fraction, seed), so that a
        resumed run can load the same corpus again.

    Examples
    --------
    >>> import numpy as np
    >>> c = corpus_from_text("hello world, " * 100)
    >>> x, y = c.get_batch("train", 2, 8, np.random.default_rng(0))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    ((2, 8), True)
    """

    train: Array
    val: Array
    name: str
    n_bytes: int
    n_docs: int = 1
    source: Optional[dict] = None

    def split(self, split: str) -> Array:
        """The token array of ``"train"`` or ``"val"``."""
        if split == "train":
            return self.train
        if split in ("val", "validation"):
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def check_seq_len(self, seq_len: int, split: str = "train") -> None:
        """Raise a clear error when a split is too short for one sequence of ``seq_len``."""
        n = len(self.split(split))
        if n < seq_len + 1:
            raise ValueError(
                f"the {split} split of corpus {self.name!r} has {n} tokens, but one training sequence "
                f"of seq_len={seq_len} needs at least {seq_len + 1} (inputs plus the shifted target); "
                f"the whole text is {self.n_bytes} bytes. Use more text, a smaller --seq-len, "
                f"or (for the val split) a larger val_fraction")

    def get_batch(self, split: str, batch_size: int, seq_len: int,
                  rng: np.random.Generator) -> Tuple[Array, Array]:
        """A batch of random windows: x (B, T) int64 and y = x shifted left by one.

        The windows start at ``rng.integers(0, n - T, size=B)``: the same generator state
        gives the same batch (which is what makes resuming a run exact).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        data = self.split(split)
        self.check_seq_len(seq_len, split)
        starts = rng.integers(0, len(data) - seq_len, size=batch_size)     # (B,)
        idx = starts[:, None] + np.arange(seq_len + 1)                      # (B, T+1)
        window = data[idx].astype(np.int64)                                 # (B, T+1)
        return window[:, :-1], window[:, 1:]                                # (B, T), (B, T)

    def __repr__(self) -> str:
        return (f"Corpus(name={self.name!r}, n_bytes={self.n_bytes}, n_docs={self.n_docs}, "
                f"train={len(self.train)} tokens, val={len(self.val)} tokens)")


# --------------------------------------------------------------------------------------
# reading text
# --------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The folder of the Python standard library's sources (where ``os.py`` lives)."""
    return Path(os.path.dirname(os.__file__))


def _stdlib_files() -> List[Path]:
    d = stdlib_dir()
    files = sorted(p for p in d.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"the embedded corpus reads the Python standard library's .py files, but {d} has none "
            "(is this a zip-only Python install?); pass a text file or folder instead")
    return files


def _looks_binary(head: bytes) -> bool:
    return b"\0" in head


def _head(p: Path, n: int = 8192) -> bytes:
    with open(p, "rb") as f:
        return f.read(n)


def _text_files(folder: Path) -> List[Path]:
    """Every non-hidden regular file under ``folder`` that does not look binary, sorted by path."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue                                  # is_file(): regular files only (no FIFOs, devices)
        if _looks_binary(_head(p)):
            continue
        out.append(p)
    return out


def _plan_docs(files: List[Path], max_bytes: Optional[int]) -> List[Tuple[Path, int]]:
    """(file, bytes to read) in order, stopping (and cutting the last one) at ``max_bytes``.
    Sizes come from ``stat``: nothing is read yet."""
    plan, total = [], 0
    for p in files:
        n = p.stat().st_size
        if max_bytes is not None:
            n = min(n, max_bytes - total)
        if n > 0:
            plan.append((p, n))
            total += n
        if max_bytes is not None and total >= max_bytes:
            break
    return plan


_BLOCK = 1 << 20                                      # bytes read at a time


def _token_pieces(plan: List[Tuple[Path, int]]):
    """The token stream of the planned documents, BOS before each, in pieces of <= 1 MiB:
    yields uint8/uint16 arrays (never more than one block of a file in memory)."""
    bos = np.array([BOS], dtype=np.uint16)
    for p, n in plan:
        yield bos
        with open(p, "rb") as f:
            left = n
            while left:
                block = f.read(min(left, _BLOCK))
                if not block:
                    raise ValueError(f"{str(p)!r} became shorter while it was read ({n - left} of {n} bytes); "
                                     "is another program writing it?")
                yield np.frombuffer(block, dtype=np.uint8)
                left -= len(block)


def _split_plan(n: int, val_fraction: float, seed: int, chunk_size: Optional[int]) -> Tuple[int, Array]:
    """(chunk_size, is_val per chunk) of :func:`split_tokens` for a stream of n tokens."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if chunk_size is None:
        chunk_size = max(1, min(8192, n // 20))
    n_chunks = max(1, -(-n // chunk_size))
    n_val = int(round(n_chunks * val_fraction))
    if val_fraction > 0 and n_chunks > 1:
        n_val = min(max(n_val, 1), n_chunks - 1)
    else:
        n_val = 0
    is_val = np.zeros(n_chunks, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_chunks)[:n_val]] = True
    return chunk_size, is_val


def _stream_split(pieces, n: int, val_fraction: float, seed: int) -> Tuple[Array, Array]:
    """:func:`split_tokens` of a stream given as pieces, written straight into the two
    uint16 splits: peak memory is the splits (2 bytes a token) plus one piece."""
    chunk, is_val = _split_plan(n, val_fraction, seed, None)
    lengths = np.full(len(is_val), chunk)
    lengths[-1] = n - chunk * (len(is_val) - 1)                             # the last chunk may be short
    n_val = int(lengths[is_val].sum())
    out = {False: np.empty(n - n_val, dtype=np.uint16), True: np.empty(n_val, dtype=np.uint16)}
    at = {False: 0, True: 0}
    pos = 0
    for piece in pieces:
        i = 0
        while i < len(piece):
            c = pos // chunk
            take = min(len(piece) - i, (c + 1) * chunk - pos)
            dest = bool(is_val[c])
            out[dest][at[dest]:at[dest] + take] = piece[i:i + take]
            at[dest] += take
            pos += take
            i += take
    if pos != n:
        raise ValueError(f"expected {n} tokens, read {pos} (a file changed while it was read)")
    return out[False], out[True]


def _encode_docs(docs: List[bytes]) -> Array:
    """Documents -> one token stream, BOS before each: (sum(len) + n_docs,) uint16."""
    parts = []
    for d in docs:
        parts.append(np.array([BOS], dtype=np.uint16))
        parts.append(np.frombuffer(d, dtype=np.uint8).astype(np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def split_tokens(tokens: Array, val_fraction: float = 0.1, seed: int = 0,
                 chunk_size: Optional[int] = None) -> Tuple[Array, Array]:
    """Deterministic train/validation split of a token stream.

    The stream is cut into chunks (default: 8192 tokens, smaller for short texts so that
    there are at least 20); ``round(n_chunks * val_fraction)`` of them (at least one when
    ``val_fraction > 0``), drawn with ``seed``, form the validation split. Chunks keep
    their order inside each split.
    """
    n = len(tokens)
    chunk_size, is_val = _split_plan(n, val_fraction, seed, chunk_size)
    mask = np.repeat(is_val, chunk_size)[:n]                                # (n,) bool
    return tokens[~mask], tokens[mask]


def corpus_from_text(text: Union[str, bytes], val_fraction: float = 0.1, seed: int = 0,
                     name: str = "<text>") -> Corpus:
    """A :class:`Corpus` from an in-memory string (one document)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        raise ValueError(f"corpus {name!r} is empty: there is no text to train on")
    train, val = split_tokens(_encode_docs([data]), val_fraction, seed)
    return Corpus(train, val, name, len(data), 1)


def load_corpus(path: Union[str, os.PathLike, None] = None, max_bytes: Optional[int] = 2_000_000,
                val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Load a corpus: ``None`` (the embedded default), a text file, or a folder of text files.

    Parameters
    ----------
    path : None, file or folder
        None: the Python standard library's ``.py`` files on this machine, sorted.
        A folder: every non-hidden file under it, recursively, sorted by path; files that
        contain NUL bytes in their first 8 KiB are taken for binary and skipped.
    max_bytes : int or None
        Stop reading after this many bytes (None: read everything).
    val_fraction : float in [0, 1)
        Share of the text held out for validation (see :func:`split_tokens`).
    seed : int
        Seed of the split (not of the batches).

    Returns
    -------
    Corpus

    Examples
    --------
    >>> c = load_corpus(max_bytes=100_000)
    >>> c.name, c.n_bytes
    ('python-stdlib', 100000)
    """
    if max_bytes is not None and (not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    name, files = _corpus_files(path)
    plan = _plan_docs(files, max_bytes)
    n_bytes = sum(n for _, n in plan)
    if n_bytes == 0:
        raise ValueError(f"corpus {name!r} is empty ({len(files)} file(s), 0 bytes of text); "
                         "nothing to train on")
    if path is not None and len(files) == 1 and _looks_binary(_head(plan[0][0], min(8192, plan[0][1]))):
        raise ValueError(f"{name!r} looks like a binary file (it contains NUL bytes); pass text")
    train, val = _stream_split(_token_pieces(plan), n_bytes + len(plan), val_fraction, seed)
    source = {"path": None if path is None else str(Path(path).expanduser().resolve()),
              "max_bytes": None if max_bytes is None else int(max_bytes),
              "val_fraction": float(val_fraction), "seed": int(seed)}
    return Corpus(train, val, name, n_bytes, len(plan), source)


def _corpus_files(path) -> Tuple[str, List[Path]]:
    """(name, files) of a corpus path: the stdlib, a folder's text files, or one regular file."""
    if path is None:
        return DEFAULT_CORPUS, _stdlib_files()
    p = Path(path).expanduser()
    name = str(p)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist; pass a text file, a folder "
                                "of text files, or nothing for the embedded Python-stdlib corpus")
    if p.is_dir():
        files = _text_files(p)
        if not files:
            raise ValueError(f"folder {str(p)!r} contains no text files (hidden and binary files "
                             "are skipped); nothing to train on")
        return name, files
    if not p.is_file():
        raise ValueError(f"data path {str(p)!r} is not a regular file (a device, FIFO or socket); "
                         "pass a text file or a folder of text files")
    return name, [p]
