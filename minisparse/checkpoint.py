"""Checkpoints: one safetensors file holding the weights, optionally the optimizer state,
and a JSON header with the config and the training state. Written atomically, read header first.

Layout
------
A checkpoint is **one file** (by convention ``checkpoint.safetensors``; a folder passed
to :func:`load` means ``folder/checkpoint.safetensors``), in the safetensors format
(8-byte little-endian header length, a JSON header, then the raw tensor bytes):

* tensors ``<param name>`` (e.g. ``layers.0.attention.wq``), Llama-style names as in
  :mod:`minisparse.model`;
* tensors ``optimizer.exp_avg.<param name>`` and ``optimizer.exp_avg_sq.<param name>``
  (AdamW moments) when an optimizer was given;
* the ``__metadata__`` entry ``minisparse``: a JSON string with ``format``, ``version``,
  ``config`` (:class:`~minisparse.config.ModelConfig` fields), ``dtype``, ``step``,
  ``optimizer`` (its scalars: step count, betas, eps, weight decay, lr), ``extra`` (what
  the trainer adds: the :class:`~minisparse.train.TrainConfig` and the state of the batch
  random generator);
* the ``__metadata__`` entry ``minisparse_sha256``: a SHA-256 of every tensor's name,
  dtype, shape and bytes **and of the ``minisparse`` JSON string itself**, checked on load,
  so that neither a flipped bit in a tensor nor an edited config (``norm_eps``) loads
  silently. Version-1 files (before December 2026) kept their digest inside the JSON and
  it covered the tensors only: they still load, with their metadata unverified.

Writing: :func:`atomic_write` writes a temporary file in the same folder, flushes it to
disk, then ``os.replace``-s it over the old one: a crash mid-write leaves the previous
checkpoint intact, and the next save of that file removes the stray ``.tmp`` left behind.

Reading never executes code (JSON and raw little-endian numbers only) and never holds
the file in memory: the header is read and checked first (a Hugging Face weights file or
a crafted header is refused before any tensor is read), then each tensor is read into
its final array while the digest is updated; the optimizer moments are read (and kept)
only by :func:`load_training_state`; :func:`load` hashes them in 8 MiB pieces and drops
them. Loading a model for inference peaks at about the size of its weights.
Needs NumPy only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .config import ModelConfig
from .model import Transformer

FORMAT = "minisparse-checkpoint"
VERSION = 2
FILENAME = "checkpoint.safetensors"
_META_KEY = "minisparse"
_SHA_KEY = "minisparse_sha256"
_OPT_M = "optimizer.exp_avg."
_OPT_V = "optimizer.exp_avg_sq."
_MAX_HEADER = 100 * 2**20                      # safetensors' own limit on the JSON header
_CHUNK = 8 * 2**20                              # bytes hashed at a time when a tensor is skipped
# safetensors dtype codes <-> little-endian NumPy dtypes
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}

PathLike = Union[str, os.PathLike]


def checkpoint_path(path: PathLike) -> Path:
    """The checkpoint file for ``path``: itself, or ``path/checkpoint.safetensors`` for a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / FILENAME
    return p


# --------------------------------------------------------------------------------------
# writing: one atomic writer for every file minisparse writes
# --------------------------------------------------------------------------------------
def remove_stale_tmp(path: PathLike) -> List[Path]:
    """Delete the ``.<name>.*.tmp`` files an interrupted :func:`atomic_write` of ``path`` left.

    One writer per file is assumed (a save in progress in another process would lose its
    temporary file). Returns the files removed.
    """
    p = Path(path)
    removed = []
    if p.parent.is_dir():
        for tmp in p.parent.glob(f".{p.name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(fh)`` fills a temporary file in the same
    folder, which is flushed to disk and renamed over ``path``.

    A crash (or an exception, or a full disk) at any point leaves the old ``path`` as it
    was; stray temporary files of ``path`` from an earlier crash are removed first.
    Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise IsADirectoryError(21, "not a regular file: refusing to replace it", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600 files; use the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _tensor_line(name: str, dtype: np.dtype, shape: tuple) -> bytes:
    return f"{name}|{np.dtype(dtype).str}|{tuple(int(n) for n in shape)}\n".encode()


def _digest_tensors(tensors: Dict[str, np.ndarray]) -> "hashlib._Hash":
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(_tensor_line(name, a.dtype, a.shape))
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h


def write_safetensors(fh: BinaryIO, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write ``tensors`` (C-contiguous, little-endian arrays) as a safetensors file to ``fh``,
    in name order, one tensor at a time (no copy of the whole model is made)."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(tensors):
        a = tensors[name]
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)                    # the data starts 8-byte aligned
    fh.write(struct.pack("<Q", len(hb)))
    fh.write(hb)
    for name in sorted(tensors):
        if tensors[name].size:
            fh.write(memoryview(tensors[name]).cast("B"))


def _little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` (NumPy, or CuPy: copied to the host) as a C-contiguous little-endian array."""
    from .xp import to_numpy
    a = to_numpy(a)
    out = np.ascontiguousarray(a, dtype=np.dtype(a.dtype).newbyteorder("<"))
    if out.dtype not in _CODES:
        raise TypeError(f"cannot store arrays of dtype {a.dtype} in a checkpoint")
    return out


def save(model: Transformer, path: PathLike, optimizer=None, step: Optional[int] = None,
         extra: Optional[dict] = None) -> Path:
    """Save a model (and optionally its optimizer state) to one safetensors file, atomically.

    Parameters
    ----------
    model : Transformer
    path : file or existing folder
        A folder means ``folder/checkpoint.safetensors``; parent folders are created.
    optimizer : minisparse.train.AdamW, optional
        Its moments go in as tensors, its scalars in the JSON header.
    step : int, optional
        Training steps done so far.
    extra : dict, optional
        Anything JSON-serialisable (the trainer stores its config and generator state).

    Returns
    -------
    Path of the file written.

    Raises
    ------
    OSError
        The file cannot be written (no space, no permission); the previous file at
        ``path``, if any, is left as it was.

    Examples
    --------
    >>> import tempfile, minisparse as ms
    >>> m = ms.Transformer(ms.preset("nano"), seed=0)
    >>> d = tempfile.mkdtemp()
    >>> p = save(m, d)
    >>> load(p).num_parameters() == m.num_parameters()
    True
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"save() takes a minisparse Transformer, got {type(model).__name__}")
    p = checkpoint_path(path)
    tensors: Dict[str, np.ndarray] = {k: _little_endian(v) for k, v in model.params.items()}
    opt_meta = None
    if optimizer is not None:
        try:
            sd = optimizer.state_dict(copy=False)          # AdamW: the moments themselves, no copy
        except TypeError:
            sd = optimizer.state_dict()
        for k, v in sd["exp_avg"].items():
            tensors[_OPT_M + k] = _little_endian(v)
        for k, v in sd["exp_avg_sq"].items():
            tensors[_OPT_V + k] = _little_endian(v)
        opt_meta = {k: v for k, v in sd.items() if k not in ("exp_avg", "exp_avg_sq")}
    meta = {
        "format": FORMAT, "version": VERSION,
        "config": model.config.to_dict(), "dtype": str(model.dtype),
        "step": None if step is None else int(step),
        "optimizer": opt_meta, "extra": extra or {},
    }
    try:
        header = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save(): extra must be JSON-serialisable ({e})") from None
    h = _digest_tensors(tensors)
    h.update(header.encode())
    metadata = {_META_KEY: header, _SHA_KEY: h.hexdigest()}
    return atomic_write(p, lambda fh: write_safetensors(fh, tensors, metadata))


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """Everything :func:`load_training_state` reads back: the model and how to resume it."""

    model: Transformer
    step: Optional[int]
    optimizer: Optional[dict] = None          # for AdamW.load_state_dict
    extra: dict = field(default_factory=dict)  # train_config, rng_state, ...
    path: Optional[Path] = None


class _Header:
    """What the first bytes of a checkpoint say: metadata, tensor table, where the data starts."""

    def __init__(self, path: Path, meta: dict, entries: Dict[str, Tuple[np.dtype, tuple, int, int]],
                 data_start: int, meta_text: str, sha: Optional[str]):
        self.path, self.meta, self.entries = path, meta, entries
        self.data_start, self.meta_text, self.sha = data_start, meta_text, sha


def _bad(p: Path) -> str:
    return f"{str(p)!r} is not a readable minisparse checkpoint"


def _json(text, what: str, p: Path):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{_bad(p)}: its {what} is nested too deeply to be a checkpoint's") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{_bad(p)}: its {what} is not valid JSON ({e})") from None


def _read_header(path: PathLike) -> _Header:
    """Read and check the header of a checkpoint; no tensor is read."""
    p = checkpoint_path(path)
    if not p.exists():
        hint = ""
        if p.name == FILENAME and (p.parent / "config.json").is_file():
            hint = " (that folder looks like a Hugging Face model: use minisparse.load_hf)"
        raise FileNotFoundError(f"no checkpoint at {str(p)!r}{hint}")
    if not p.is_file():
        raise ValueError(f"{_bad(p)}: it is not a regular file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        if size < 8:
            raise ValueError(f"{_bad(p)}: the file is {size} bytes long (truncated or empty)")
        (n_header,) = struct.unpack("<Q", f.read(8))
        if n_header > size - 8 or n_header > _MAX_HEADER:
            raise ValueError(f"{_bad(p)}: the header claims {n_header} bytes but the file has only "
                             f"{size - 8} after the length field (truncated, or not a safetensors file)")
        raw = f.read(n_header)
    header = _json(raw, "header", p)
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(md, dict) or not isinstance(md.get(_META_KEY), str):
        raise ValueError(f"{_bad(p)}: its header has no minisparse metadata (is it a Hugging Face "
                         "weights file? use minisparse.load_hf for those)")
    meta = _json(md[_META_KEY], "minisparse metadata", p)
    _check_meta(meta, p)
    entries = _tensor_table(header, p, size - 8 - n_header)
    return _Header(p, meta, entries, 8 + n_header, md[_META_KEY], md.get(_SHA_KEY))


def _check_meta(meta, p: Path) -> None:
    """The metadata has the fields and types this reader needs, or a ValueError names the one that is wrong."""
    if not isinstance(meta, dict):
        raise ValueError(f"{_bad(p)}: its metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{_bad(p)}: format {meta.get('format')!r}, expected {FORMAT!r}")
    v = meta.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{_bad(p)}: version {v!r} is not a format version (a positive integer)")
    if v > VERSION:
        raise ValueError(f"{_bad(p)}: written by a newer minisparse (format version {v}; this one reads "
                         f"up to {VERSION}): upgrade minisparse")
    kinds = {"config": (dict,), "step": (int, type(None)), "optimizer": (dict, type(None)),
             "extra": (dict, type(None)), "dtype": (str, type(None))}
    if "config" not in meta:
        raise ValueError(f"{_bad(p)}: its metadata has no 'config' (the model's shape)")
    for key, ok in kinds.items():
        if not isinstance(meta.get(key), ok) or isinstance(meta.get(key), bool):
            raise ValueError(f"{_bad(p)}: metadata field {key!r} is {type(meta.get(key)).__name__}, expected "
                             + " or ".join(t.__name__ for t in ok))


def _tensor_table(header: dict, p: Path, n_data: int) -> Dict[str, Tuple[np.dtype, tuple, int, int]]:
    """name -> (dtype, shape, begin, end) from a safetensors header, every entry checked."""
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = np.dtype(_DTYPES[e["dtype"]])
            shape = tuple(e["shape"])
            begin, end = e["data_offsets"]
            ok = (all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*shape, begin, end))
                  and end - begin == math.prod(shape) * dt.itemsize and end <= n_data)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            detail = "its data lies past the end of the file (truncated)" if _past_end(e, n_data) else \
                "its dtype, shape or offsets are malformed"
            raise ValueError(f"{_bad(p)}: tensor {name!r}: {detail}")
        out[name] = (dt, shape, begin, end)
    return out


def _past_end(e, n_data: int) -> bool:
    try:
        return int(e["data_offsets"][1]) > n_data
    except (KeyError, TypeError, ValueError, IndexError):
        return False


def _read_tensors(h: _Header, keep: Callable[[str], bool]) -> Dict[str, np.ndarray]:
    """Read the tensors ``keep(name)`` accepts into fresh arrays; hash every tensor (and the
    metadata) on the way and compare with the stored digest."""
    h_sha = hashlib.sha256()
    out: Dict[str, np.ndarray] = {}
    with open(h.path, "rb") as f:
        for name in sorted(h.entries):
            dt, shape, begin, end = h.entries[name]
            h_sha.update(_tensor_line(name, dt, shape))
            f.seek(h.data_start + begin)
            if keep(name):
                a = np.empty(shape, dtype=dt)
                if a.size and f.readinto(memoryview(a).cast("B")) != end - begin:
                    raise ValueError(f"{_bad(h.path)}: tensor {name!r} is cut short (the file is truncated)")
                h_sha.update(memoryview(a).cast("B") if a.size else b"")
                out[name] = a
                continue
            left = end - begin
            while left:
                piece = f.read(min(left, _CHUNK))
                if not piece:
                    raise ValueError(f"{_bad(h.path)}: tensor {name!r} is cut short (the file is truncated)")
                h_sha.update(piece)
                left -= len(piece)
    _verify(h, h_sha, out)
    return out


def _verify(h: _Header, h_sha, tensors: Dict[str, np.ndarray]) -> None:
    if h.meta["version"] >= 2 or h.sha is not None:     # digest over tensors + the metadata text
        h_sha.update(h.meta_text.encode())
        ok = h_sha.hexdigest() == h.sha
    else:                                                # version 1: tensors only (metadata unverified)
        ok = h_sha.hexdigest() == h.meta.get("sha256")
    if not ok:
        raise ValueError(f"{_bad(h.path)}: its tensors or metadata do not match the checksum stored at save "
                         "time (the file is corrupt or was edited)")


def _build(h: _Header, tensors: dict, backend: Optional[str]) -> Transformer:
    try:
        config = ModelConfig.from_dict(h.meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{_bad(h.path)}: its config is invalid: {e}") from None
    params = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    order = Transformer.param_shapes(config)
    params = {k: params[k] for k in order if k in params} | {k: v for k, v in params.items() if k not in order}
    return Transformer(config, backend=backend, params=params)


def _is_param(name: str) -> bool:
    return not name.startswith("optimizer.")


def load(path: PathLike, backend: Optional[str] = None) -> Transformer:
    """Load a model saved by :func:`save` (a file, or a folder holding checkpoint.safetensors).

    Reads the header first, then the weights one tensor at a time (the optimizer state is
    hashed and skipped). Raises ``FileNotFoundError`` when there is no file and
    ``ValueError`` when the file is truncated, corrupt, edited, crafted or not a minisparse
    checkpoint.
    """
    h = _read_header(path)
    return _build(h, _read_tensors(h, _is_param), backend)


def load_training_state(path: PathLike) -> TrainingState:
    """Model, step, optimizer state and the trainer's extras, to resume a run exactly."""
    h = _read_header(path)
    tensors = _read_tensors(h, lambda name: True)
    model = _build(h, tensors, None)
    meta = h.meta
    opt = None
    if meta.get("optimizer") is not None:
        opt = dict(meta["optimizer"])
        opt["exp_avg"] = {k[len(_OPT_M):]: v for k, v in tensors.items() if k.startswith(_OPT_M)}
        opt["exp_avg_sq"] = {k[len(_OPT_V):]: v for k, v in tensors.items() if k.startswith(_OPT_V)}
    return TrainingState(model=model, step=meta.get("step"), optimizer=opt,
                         extra=meta.get("extra") or {}, path=h.path)


def read_metadata(path: PathLike) -> dict:
    """The JSON header of a checkpoint (config, step, extra, ...) without reading any tensor.

    The header's structure is checked; the checksum is not (:func:`load` checks it).
    """
    return _read_header(path).meta
