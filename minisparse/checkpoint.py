"""Checkpoints: one safetensors file holding the weights, optionally the optimizer state,
and a JSON header with the config and the training state. Written atomically.

Layout
------
A checkpoint is **one file** (by convention ``checkpoint.safetensors``; a folder passed
to :func:`load` means ``folder/checkpoint.safetensors``):

* tensors ``<param name>`` (e.g. ``layers.0.attention.wq``), Llama-style names as in
  :mod:`minisparse.model`;
* tensors ``optimizer.exp_avg.<param name>`` and ``optimizer.exp_avg_sq.<param name>``
  (AdamW moments) when an optimizer was given;
* the safetensors ``__metadata__`` entry ``minisparse``: a JSON string with ``format``,
  ``version``, ``config`` (:class:`~minisparse.config.ModelConfig` fields), ``dtype``,
  ``step``, ``optimizer`` (its scalars: step count, betas, eps, weight decay, lr),
  ``extra`` (what the trainer adds: the :class:`~minisparse.train.TrainConfig` and the
  state of the batch random generator) and ``sha256``, a digest of every tensor's name,
  dtype, shape and bytes, checked on load.

One file can be replaced atomically: :func:`save` writes a temporary file in the same
folder, flushes it to disk, then ``os.replace``-s it over the old one. A crash mid-write
leaves the previous checkpoint intact (and at most a stray ``.tmp`` file).

Needs the ``safetensors`` package (``pip install 'minisparse[hf]'``).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from .config import ModelConfig
from .model import Transformer

FORMAT = "minisparse-checkpoint"
VERSION = 1
FILENAME = "checkpoint.safetensors"
_META_KEY = "minisparse"
_OPT_M = "optimizer.exp_avg."
_OPT_V = "optimizer.exp_avg_sq."

PathLike = Union[str, os.PathLike]


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError:
        raise ImportError("minisparse checkpoints are safetensors files and need the 'safetensors' "
                          "package: pip install 'minisparse[hf]'") from None
    return stn


def checkpoint_path(path: PathLike) -> Path:
    """The checkpoint file for ``path``: itself, or ``path/checkpoint.safetensors`` for a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / FILENAME
    return p


def _digest(tensors: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600 files; use the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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

    Examples
    --------
    >>> import tempfile, minisparse as ms
    >>> m = ms.Transformer(ms.preset("nano"), seed=0)
    >>> d = tempfile.mkdtemp()
    >>> p = save(m, d)
    >>> load(p).num_parameters() == m.num_parameters()
    True
    """
    stn = _safetensors_numpy()
    if not isinstance(model, Transformer):
        raise TypeError(f"save() takes a minisparse Transformer, got {type(model).__name__}")
    p = checkpoint_path(path)
    tensors: Dict[str, np.ndarray] = {k: np.ascontiguousarray(v) for k, v in model.params.items()}
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for k, v in sd["exp_avg"].items():
            tensors[_OPT_M + k] = np.ascontiguousarray(v)
        for k, v in sd["exp_avg_sq"].items():
            tensors[_OPT_V + k] = np.ascontiguousarray(v)
        opt_meta = {k: v for k, v in sd.items() if k not in ("exp_avg", "exp_avg_sq")}
    meta = {
        "format": FORMAT, "version": VERSION,
        "config": model.config.to_dict(), "dtype": str(model.dtype),
        "step": None if step is None else int(step),
        "optimizer": opt_meta, "extra": extra or {},
        "sha256": _digest(tensors),
    }
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"save(): extra must be JSON-serialisable ({e})") from None
    data = stn.save(tensors, metadata={_META_KEY: header})
    _atomic_write(p, data)
    return p


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


def _read(path: PathLike):
    """-> (metadata dict, tensors dict, file path); clear errors for missing/corrupt files."""
    stn = _safetensors_numpy()
    p = checkpoint_path(path)
    if not p.exists():
        hint = ""
        if p.name == FILENAME and (p.parent / "config.json").is_file():
            hint = " (that folder looks like a Hugging Face model: use minisparse.load_hf)"
        raise FileNotFoundError(f"no checkpoint at {str(p)!r}{hint}")
    raw = p.read_bytes()
    bad = f"{str(p)!r} is not a readable minisparse checkpoint"
    if len(raw) < 8:
        raise ValueError(f"{bad}: the file is {len(raw)} bytes long (truncated or empty)")
    (n_header,) = struct.unpack("<Q", raw[:8])
    if n_header > len(raw) - 8:
        raise ValueError(f"{bad}: the header claims {n_header} bytes but the file has only "
                         f"{len(raw) - 8} after the length field (truncated, or not a safetensors file)")
    try:
        header = json.loads(raw[8:8 + n_header])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{bad}: its header has no minisparse metadata (is it a Hugging Face "
                         "weights file? use minisparse.load_hf for those)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{bad}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{bad}: written by a newer minisparse (format version {meta['version']})")
    try:
        tensors = stn.load(raw)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{bad}: {type(e).__name__}: {e} (the file is corrupt or truncated)") from None
    if _digest(tensors) != meta.get("sha256"):
        raise ValueError(f"{bad}: the tensors do not match the checksum stored at save time "
                         "(the file is corrupt)")
    return meta, tensors, p


def _build(meta: dict, tensors: dict, backend: Optional[str]) -> Transformer:
    config = ModelConfig.from_dict(meta["config"])
    params = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    order = Transformer.param_shapes(config)
    params = {k: params[k] for k in order if k in params} | {k: v for k, v in params.items() if k not in order}
    return Transformer(config, backend=backend, params=params)


def load(path: PathLike, backend: Optional[str] = None) -> Transformer:
    """Load a model saved by :func:`save` (a file, or a folder holding checkpoint.safetensors).

    Raises ``FileNotFoundError`` when there is no file and ``ValueError`` when the file is
    truncated, corrupt or not a minisparse checkpoint.
    """
    meta, tensors, _ = _read(path)
    return _build(meta, tensors, backend)


def load_training_state(path: PathLike) -> TrainingState:
    """Model, step, optimizer state and the trainer's extras, to resume a run exactly."""
    meta, tensors, p = _read(path)
    model = _build(meta, tensors, None)
    opt = None
    if meta.get("optimizer") is not None:
        opt = dict(meta["optimizer"])
        opt["exp_avg"] = {k[len(_OPT_M):]: v for k, v in tensors.items() if k.startswith(_OPT_M)}
        opt["exp_avg_sq"] = {k[len(_OPT_V):]: v for k, v in tensors.items() if k.startswith(_OPT_V)}
    return TrainingState(model=model, step=meta.get("step"), optimizer=opt,
                         extra=meta.get("extra") or {}, path=p)


def read_metadata(path: PathLike) -> dict:
    """The JSON header of a checkpoint (config, step, extra, ...) without building a model."""
    return _read(path)[0]
