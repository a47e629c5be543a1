"""Sampling and the decode loop (greedy, temperature, top-k, nucleus/top-p).

Prefill the prompt once, then feed one token at a time through the KV cache.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, Iterator, List, Optional

import numpy as np

from .model import Transformer
from .xp import array_module, to_numpy


def _check_sampling(temperature, top_k, top_p) -> None:
    """Refuse sampling settings that would fail deep inside NumPy (or silently misbehave)."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")


def sample_next(logits, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, rng: Optional[np.random.Generator] = None) -> int:
    """Pick one token from logits (V,), NumPy or CuPy (then only the chosen id leaves the GPU).

    temperature 0 is greedy (argmax; ties go to the lowest id). top_k keeps the k largest
    logits; top_p keeps the smallest set of tokens whose probability sums to >= top_p
    (nucleus sampling, Holtzman et al. 2020). The draw is ``Generator.choice``'s: one
    uniform number from ``rng`` against the cumulative distribution, so NumPy and CuPy
    logits give the same token for the same seed.

    Parameters
    ----------
    logits : (V,) float array
    temperature : float >= 0
    top_k : int >= 1, optional
    top_p : float in (0, 1], optional
    rng : numpy.random.Generator, optional

    Returns
    -------
    int, the token id.

    Raises
    ------
    ValueError
        Bad settings (temperature NaN, negative ...), logits not (V,).
    FloatingPointError
        Logits that are NaN or +inf (non-finite weights or activations upstream).

    Examples
    --------
    >>> import numpy as np
    >>> sample_next(np.array([0.1, 2.0, 0.3]), temperature=0)
    1
    """
    _check_sampling(temperature, top_k, top_p)
    xp = array_module(logits)
    logits = (logits if hasattr(logits, "astype") else np.asarray(logits)).astype(np.float64)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be (V,) with V >= 1, got shape {logits.shape}")
    # one device->host transfer: the argmax and a "not finite" flag together
    best, bad = (int(v) for v in to_numpy(xp.stack([xp.argmax(logits), xp.any(~(logits < np.inf))])))
    if bad:
        raise FloatingPointError("the model produced NaN or +inf logits: its weights or activations are "
                                 "not finite (check the checkpoint, or train with a lower learning rate)")
    if temperature == 0:
        return best
    if rng is None:
        rng = np.random.default_rng()
    with np.errstate(over="ignore"):                                  # T -> 0: the others go to -inf (greedy)
        z = (logits - logits[best]) / temperature                    # max first: no inf - inf, any T > 0
    if top_k is not None and top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p, kind="stable") if xp is np else xp.argsort(-p)
        csum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(csum, top_p)) + 1]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    cdf = np.cumsum(p)                                               # Generator.choice(len(p), p=p):
    cdf /= cdf[-1]                                                   # one uniform, searched in the cdf
    return int(np.searchsorted(cdf, xp.asarray([rng.random()]), side="right")[0])


def _check_prompt(prompt_ids) -> np.ndarray:
    """A 1-D int64 array of token ids, or a clear error (no silent truncation of floats)."""
    if isinstance(prompt_ids, (str, bytes)):
        raise TypeError("prompt_ids must be token ids, not text: encode it first, e.g. "
                        "ByteTokenizer().encode(text)")
    prompt = to_numpy(prompt_ids) if hasattr(prompt_ids, "shape") else np.asarray(list(prompt_ids))
    if prompt.ndim != 1:
        raise ValueError(f"prompt_ids must be a 1-D sequence of ints, got shape {prompt.shape}")
    if prompt.size == 0:
        raise ValueError("prompt_ids is empty; start from at least one token (e.g. the tokenizer's BOS)")
    if prompt.dtype == bool or prompt.dtype.kind not in "iu":
        raise TypeError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype} "
                        "(floats and bools are refused rather than truncated)")
    return prompt.astype(np.int64)


def stream(model: Transformer, prompt_ids, max_new_tokens: int = 64, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
           backend: Optional[str] = None, eos_id: Optional[int] = None) -> Iterator[int]:
    """Yield new token ids one at a time (see :func:`generate` for the arguments).

    On a model moved to the GPU (``model.to("cupy")``) the KV cache lives there too and
    each step sends one token id each way.
    """
    prompt = _check_prompt(prompt_ids)
    _check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = prompt.size + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt.size}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    rng = np.random.default_rng(seed)
    cache = model.new_cache(1, max_len=total)
    logits = model.forward(prompt[None, :], cache=cache, backend=backend)          # prefill
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[0, -1], temperature, top_k, top_p, rng)
        yield nxt
        if eos_id is not None and nxt == eos_id:
            return
        if cache.pos >= total:
            return
        logits = model.forward(np.array([[nxt]], dtype=np.int64), cache=cache, backend=backend)


def generate(model: Transformer, prompt_ids, max_new_tokens: int = 64, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             callback: Optional[Callable[[int], None]] = None, backend: Optional[str] = None,
             eos_id: Optional[int] = None) -> List[int]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``; returns the new ids.

    The prompt is run once (prefill) into a :class:`~minisparse.model.KVCache`, then one
    token at a time is sampled and fed back.

    Parameters
    ----------
    model : Transformer
    prompt_ids : 1-D sequence of int
        At least one token (e.g. the tokenizer's BOS, 256 for the byte tokenizer).
    max_new_tokens : int
        Prompt plus new tokens must fit in ``max_seq_len``.
    temperature : float
        0 is greedy; otherwise logits are divided by it before sampling.
    top_k, top_p : optional
        Keep the k most likely tokens / the smallest nucleus of probability >= top_p.
    seed : int, optional
        Seed of the sampler (same seed, same tokens).
    callback : callable, optional
        ``callback(token_id)`` is called as each token is produced (streaming);
        :func:`stream` gives the same tokens as an iterator.
    backend : str, optional
        Run the FFNs through that sparse-kernel backend (``"numpy"``, ``"numba"``,
        ``"cupy"``) for this call; greedy output equals the dense model's for ReLU-family
        activations.
    eos_id : int, optional
        Stop after producing this token.

    Returns
    -------
    list of int, the new token ids (without the prompt).

    Examples
    --------
    >>> import minisparse as ms
    >>> m = ms.Transformer(ms.preset("nano"), seed=0)
    >>> len(ms.generate(m, [256], max_new_tokens=5, temperature=0))
    5
    """
    out = []
    for t in stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, backend, eos_id):
        out.append(t)
        if callback is not None:
            callback(t)
    return out
