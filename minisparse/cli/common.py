"""What every subcommand shares: the error type, argument types, output checks, model loading.

``main``, ``profile``, ``relufy`` and ``bench`` import from here; nothing here imports them.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A mistake in the command line or the inputs: printed without a traceback."""


# --------------------------------------------------------------------------------------
# output locations: checked before any long work
# --------------------------------------------------------------------------------------
def check_out_dir(path: str, flag: str = "--out") -> Path:
    """The output folder of a command, checked before any long work.

    It may exist (as a folder) or not; when it does not, its nearest existing parent must
    be a writable folder. Raises :class:`UserError` naming the path and the cause.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file, not a folder; pass a folder path for the outputs")
    _check_writable(out if out.exists() else out.parent, flag, path)
    return out


def check_out_file(path: str, flag: str) -> Path:
    """An output file, checked before any long work: not a folder, in a writable folder."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder; pass a file path")
    if out.exists() and not out.is_file():
        raise UserError(f"{flag} {str(path)!r} is not a regular file (a device or FIFO); pass a file path")
    if not out.parent.is_dir() and out.parent.exists():
        raise UserError(f"{flag} {str(path)!r}: {str(out.parent)!r} is a file, not a folder")
    if not out.parent.exists():
        raise UserError(f"{flag} {str(path)!r}: the folder {str(out.parent)!r} does not exist")
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"{flag} {str(path)!r}: permission denied (the file is not writable)")
    _check_writable(out.parent, flag, path)
    return out


def _check_writable(folder: Path, flag: str, given) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we may write into."""
    p = folder if str(folder) else Path(".")
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {str(given)!r}: {str(p)!r} is a file, not a folder")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(given)!r}: permission denied (cannot write into {str(p)!r})")


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError``: the cause and the path it concerns."""
    cause = e.strerror or str(e) or type(e).__name__
    where = e.filename if e.filename is not None else None
    if where is None:
        return f"{cause} ({type(e).__name__})"
    extra = f" -> {e.filename2!r}" if getattr(e, "filename2", None) else ""
    return f"{cause}: {str(where)!r}{extra}"


def loss_text(loss: float, byte_level: bool, digits: int = 4) -> str:
    """``"1.2340 nats/byte (1.780 bits/byte)"`` for byte-level tokens (minisparse's own corpora),
    ``"1.2340 nats/token"`` for a model with its own tokenizer: one unit everywhere."""
    if byte_level:
        return f"{loss:.{digits}f} nats/byte ({loss / math.log(2):.{digits - 1}f} bits/byte)"
    return f"{loss:.{digits}f} nats/token"


# --------------------------------------------------------------------------------------
# argument types: say what was wrong
# --------------------------------------------------------------------------------------
def _arg_type(cast, ok, what: str, in_range: str = ""):
    """An argparse type: ``cast`` the text, then require ``ok(value)``; errors say ``what``
    (or ``in_range``, when given, for a value of the right type outside the range)."""
    def parse(s: str):
        try:
            v = cast(s)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {in_range or what}, got {s}")
        return v
    return parse


positive_int = _arg_type(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _arg_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _arg_type(float, lambda v: v > 0 and np.isfinite(v), "a positive number", "a finite number > 0")
nonneg_float = _arg_type(float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0", "a finite number >= 0")
unit_float = _arg_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
finite_float = _arg_type(float, math.isfinite, "a number", "a finite number")
fraction = _arg_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def float_list(s: str):
    """``"0,0.5,0.9"`` -> [0.0, 0.5, 0.9] (each in [0, 1))."""
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.5,0.9, got {s!r}") from None
    if not v or not all(0 <= x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1) such as 0,0.5,0.9, got {s!r}")
    return v


# --------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------
def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def load_any(path: str):
    """(model, tokenizer) from a minisparse checkpoint or a Hugging Face folder."""
    from ..checkpoint import FILENAME, load
    from ..tokenizer import ByteTokenizer, load_tokenizer
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--model {path!r} does not exist; pass a checkpoint file, a training output "
                        "folder, or a Hugging Face model folder")
    if p.is_file() or (p / FILENAME).is_file():
        return load(p), ByteTokenizer()
    if _is_hf_folder(p):
        from ..hf import load_hf
        model, tok = load_hf(p), load_tokenizer(p)
        if isinstance(tok, ByteTokenizer) and model.config.vocab_size != tok.vocab_size:
            raise UserError(f"{path!r} has no tokenizer.json, and its vocabulary ({model.config.vocab_size} "
                            f"tokens) is not minisparse's byte vocabulary ({tok.vocab_size}): text would be "
                            "garbled. Copy the model's tokenizer.json into the folder.")
        return model, tok
    raise UserError(f"{path!r} holds neither {FILENAME} (minisparse) nor config.json + *.safetensors "
                    "(Hugging Face)")


def load_data(path, tokenizer, max_bytes: int):
    """A Corpus for the model: byte tokens via load_corpus, or the model's own tokenizer."""
    from ..data import Corpus, load_corpus, split_tokens
    from ..tokenizer import ByteTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return load_corpus(path, max_bytes=max_bytes)
    byte_corpus = load_corpus(path, max_bytes=max_bytes)      # reads the same files, deterministically
    text = bytes(int(t) for t in byte_corpus.train if t < 256) + bytes(int(t) for t in byte_corpus.val if t < 256)
    ids = np.asarray(tokenizer.encode(text.decode("utf-8", errors="replace")), dtype=np.int64)
    train, val = split_tokens(ids, 0.1, 0)
    return Corpus(train, val, byte_corpus.name + " (model tokenizer)", byte_corpus.n_bytes, byte_corpus.n_docs)

