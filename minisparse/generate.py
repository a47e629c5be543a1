"""Sampling and the decode loop (greedy, temperature, top-k, nucleus/top-p).

Prefill the prompt once, then feed one token at a time through the KV cache.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import numpy as np

from .model import KVCache, Transformer


def sample_next(logits, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, rng: Optional[np.random.Generator] = None) -> int:
    """Pick one token from logits (V,).

    temperature 0 is greedy (argmax; ties go to the lowest id). top_k keeps the k largest
    logits; top_p keeps the smallest set of tokens whose probability sums to >= top_p
    (nucleus sampling, Holtzman et al. 2020).

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

    Examples
    --------
    >>> import numpy as np
    >>> sample_next(np.array([0.1, 2.0, 0.3]), temperature=0)
    1
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1:
        raise ValueError(f"logits must be (V,), got shape {logits.shape}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(np.argmax(logits))
    if rng is None:
        rng = np.random.default_rng()
    z = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < len(z):
            kth = np.partition(z, -top_k)[-top_k]
            z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(csum, top_p) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def stream(model: Transformer, prompt_ids, max_new_tokens: int = 64, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
           backend: Optional[str] = None, eos_id: Optional[int] = None) -> Iterator[int]:
    """Yield new token ids one at a time (see :func:`generate` for the arguments)."""
    prompt = np.asarray(list(prompt_ids) if not isinstance(prompt_ids, np.ndarray) else prompt_ids)
    if prompt.ndim != 1:
        raise ValueError(f"prompt_ids must be a 1-D sequence of ints, got shape {prompt.shape}")
    if prompt.size == 0:
        raise ValueError("prompt_ids is empty; start from at least one token (e.g. the tokenizer's BOS)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt.size + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({prompt.size}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    rng = np.random.default_rng(seed)
    old_backend = model.backend
    if backend is not None:
        model.backend = backend
    try:
        cache = KVCache(model.config, 1, model.dtype, max_len=total)
        logits = model.forward(prompt[None, :].astype(np.int64), cache=cache)     # prefill
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[0, -1], temperature, top_k, top_p, rng)
            yield nxt
            if eos_id is not None and nxt == eos_id:
                return
            if cache.pos >= total:
                return
            logits = model.forward(np.array([[nxt]], dtype=np.int64), cache=cache)
    finally:
        model.backend = old_backend


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
