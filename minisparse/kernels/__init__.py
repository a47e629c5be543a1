"""Neuron-skipping FFN kernels behind one interface, and the backend registry.

    y = down(act(gate(x), up(x)))   with weights neuron-major (F, D): row f = neuron f

With ReLU-family activations most neurons of a token are exactly zero, so their rows of
``w_up`` and ``w_down`` need never be read (Deja Vu, Liu et al. 2023; PowerInfer, Song et
al. 2023; TurboSparse, Song et al. 2024). :func:`sparse_ffn` computes the FFN output while
skipping that work, on the backend you name:

========  ==========================================  =====================================
backend   where                                       needs
========  ==========================================  =====================================
numpy     the readable reference (the definition)     NumPy
numba     CPU, ``@njit(parallel=True, cache=True)``   ``pip install 'minisparse[numba]'``
cupy      GPU, CUDA RawKernels (``sparse_ffn.cu``)    ``pip install cupy-cuda12x`` (or 13x)
========  ==========================================  =====================================

Every backend is held to the NumPy reference by the tests. Asking for a backend that
cannot run here raises ``ImportError`` with the install command: there is **no silent
fallback** (a fallback would let a test pass while testing nothing).

Dimension keys: T tokens, D model dim, F ffn neurons, A active neurons.
"""
from __future__ import annotations

from importlib import import_module
from typing import Dict, List, Optional

import numpy as np

from ..activations import Activation, get_activation
from .base import check_inputs  # the one validator, shared by every backend

# name -> (module path, install hint). Explicit on purpose: no plugin discovery, no magic.
_REGISTRY: Dict[str, tuple] = {
    "numpy": ("minisparse.kernels.numpy_", "NumPy is a core dependency: pip install numpy"),
    "numba": ("minisparse.kernels.numba_", "pip install 'minisparse[numba]'  (or: pip install numba)"),
    "cupy": ("minisparse.kernels.cupy_",
             "pip install cupy-cuda12x  (CUDA 12 drivers) or cupy-cuda13x (CUDA 13), "
             "on a machine with an NVIDIA GPU; 'minisparse[gpu]' installs cupy-cuda12x"),
}
_LOADED: Dict[str, object] = {}


def _unknown(name) -> ValueError:
    return ValueError(f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)} "
                      f"(minisparse.backends() lists those usable on this machine)")


def get_backend(name: str):
    """The backend module for ``name`` (imported on first use).

    Raises
    ------
    ValueError
        ``name`` is not a registered backend.
    ImportError
        the backend is registered but cannot run here (its package is missing, or no GPU);
        the message names the install command. Nothing falls back to another backend.

    Examples
    --------
    >>> get_backend("numpy").NAME
    'numpy'
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str), got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise _unknown(name)
    if key in _LOADED:
        return _LOADED[key]
    path, hint = _REGISTRY[key]
    try:
        mod = import_module(path)
        mod.check_usable()          # e.g. cupy installed but no GPU visible -> ImportError
    except ImportError as e:
        raise ImportError(f"backend {key!r} is not usable here: {e}. Install it with: {hint}") from e
    _LOADED[key] = mod
    return mod


def backends() -> List[str]:
    """Names of the backends usable on this machine (``numpy`` is always there).

    >>> "numpy" in backends()
    True
    """
    out = []
    for name in _REGISTRY:
        try:
            get_backend(name)
        except ImportError:
            continue
        out.append(name)
    return out


def registered_backends() -> List[str]:
    """Every registered backend name, usable here or not."""
    return list(_REGISTRY)


def sparse_ffn(x, w_gate, w_up, w_down, activation, *, backend: str = "numpy", active=None,
               threshold: Optional[float] = None, stats: Optional[dict] = None):
    """FFN output ``down(act(gate(x), up(x)))`` computing only the neurons that matter.

    Parameters
    ----------
    x : (D,) or (T, D) float array (NumPy; CuPy arrays too for ``backend="cupy"``).
    w_gate, w_up, w_down : (F, D) each, **neuron-major** (row f = neuron f). ``w_up`` is
        None for plain activations (``h = f(x @ w_gate.T)``). ``w_down`` is stored (F, D)
        too: ``y = h @ w_down``.
    activation : a registry name (``"drelu"``, ``"reglu"``, ``"swiglu"``, ``"relu"``,
        ``"drelu:0.05"`` ...) or an :class:`~minisparse.activations.Activation`.
    backend : ``"numpy"`` (reference), ``"numba"`` or ``"cupy"``; see :func:`backends`.
    active : None, or the neurons to compute (an index array, or a boolean mask of length
        F), e.g. from a :mod:`minisparse.predictor`. Then gate, up and down are computed
        for those neurons only and every other neuron is taken as zero.
    threshold : None, or skip neuron f for token t when ``|a(g_tf)| <= threshold`` (``a``
        the gate's activation; CATS, Lee et al. 2024). Without it a neuron is skipped only
        when its gate activation is exactly zero, which for the ReLU family (relu, reglu,
        drelu, relu2glu, FATReLU) is exact, and for swiglu/geglu skips nothing.
    stats : optional dict, filled with ``path`` ("sparse" or "dense"), ``n_active`` (union
        over the T tokens), ``ffn_dim``, ``fraction``, ``tokens``, ``backend``,
        ``predicted`` (True when ``active`` was given).

    Returns
    -------
    y : x's shape and dtype (and array kind: CuPy in, CuPy out).

    Per token t the result is ``sum_f m_tf * a(g_tf) * b(u_tf) * w_down[f]`` with
    ``m_tf = not(|a(g_tf)| <= threshold or 0)`` (and ``f in active`` when given). With
    several tokens the rows read are the *union* of the tokens' active neurons.

    Examples
    --------
    >>> import numpy as np, minisparse as ms
    >>> rng = np.random.default_rng(0)
    >>> wg, wu, wd = (rng.normal(size=(16, 8)) for _ in range(3))
    >>> x = rng.normal(size=8)
    >>> st = {}
    >>> y = ms.sparse_ffn(x, wg, wu, wd, "reglu", stats=st)
    >>> dense = (np.maximum(wg @ x, 0) * (wu @ x)) @ wd
    >>> bool(np.allclose(y, dense)), st["path"], st["ffn_dim"]
    (True, 'sparse', 16)
    """
    mod = get_backend(backend)
    cached = getattr(mod, "sparse_ffn_cached", None)       # validation once per weight set (cupy)
    if cached is not None:
        y = cached(x, w_gate, w_up, w_down, activation, active=active, threshold=threshold, stats=stats)
        if y is not None:
            return y
    act = get_activation(activation) if not isinstance(activation, Activation) else activation
    info = check_inputs(x, w_gate, w_up, w_down, act, active=active, threshold=threshold,
                        weight_dtypes=mod.WEIGHT_DTYPES, backend=mod.NAME)
    if stats is not None:
        stats.update(backend=mod.NAME, ffn_dim=info["F"], tokens=info["T"], predicted=active is not None)
    y = mod.ffn(info["x2"], info["w_gate"], info["w_up"], info["w_down"], act, active=info["active"],
                threshold=info["threshold"], stats=stats)           # (T, D)
    if stats is not None and isinstance(stats.get("n_active"), int):
        stats["fraction"] = stats["n_active"] / info["F"]
    return y.reshape(info["x_shape"])


__all__ = ["sparse_ffn", "backends", "get_backend", "registered_backends"]
