import numpy as np
import pytest

import minisparse as ms
from minisparse.generate import sample_next


def model(seed=0):
    return ms.Transformer(ms.ModelConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=24, max_seq_len=40,
                                         activation="drelu"), seed=seed)


def test_greedy_equals_argmax_of_full_forward():
    m = model()
    prompt = [256, 10, 20, 30]
    new = ms.generate(m, prompt, max_new_tokens=8, temperature=0)
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(np.argmax(m(np.array([seq]))[0, -1])))
    assert new == seq[len(prompt):]


def test_streaming_callback_and_iterator_agree():
    m = model()
    got = []
    out = ms.generate(m, [1, 2], max_new_tokens=6, temperature=0.9, seed=5, callback=got.append)
    assert got == out == list(ms.stream(m, [1, 2], 6, temperature=0.9, seed=5))


def test_seeded_sampling_is_reproducible_and_varies():
    m = model()
    a = ms.generate(m, [1], 15, temperature=1.5, seed=1)
    assert a == ms.generate(m, [1], 15, temperature=1.5, seed=1)
    assert a != ms.generate(m, [1], 15, temperature=1.5, seed=2)


def test_eos_stops_early():
    m = model()
    first = ms.generate(m, [1], 1, temperature=0)[0]
    assert ms.generate(m, [1], 10, temperature=0, eos_id=first) == [first]


def test_top_k_and_top_p_restrict_support(rng):
    logits = np.array([5.0, 4.0, 3.0, 0.0, -1.0])
    draws = {sample_next(logits, 1.0, top_k=2, rng=rng) for _ in range(300)}
    assert draws == {0, 1}
    p = np.exp(logits) / np.exp(logits).sum()   # p ~ [.66, .24, .09, ...]
    draws = {sample_next(logits, 1.0, top_p=0.8, rng=rng) for _ in range(300)}
    assert draws == {0, 1} and p[0] < 0.8 <= p[0] + p[1]
    assert sample_next(logits, 0.0) == 0
    assert sample_next(np.array([1.0, 3.0, 3.0]), 0.0) == 1   # ties -> lowest id


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=[[1, 2]]), "1-D"),
    (dict(prompt_ids=[1], max_new_tokens=50), "exceeds max_seq_len"),
    (dict(prompt_ids=[1], temperature=-1), "temperature"),
    (dict(prompt_ids=[1], top_p=1.5), "top_p"),
    (dict(prompt_ids=[1], top_k=0), "top_k"),
    (dict(prompt_ids=[999]), "outside"),
])
def test_bad_arguments(kwargs, match):
    kw = dict(max_new_tokens=3, temperature=1.0, seed=0)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ms.generate(model(), **kw)


def test_byte_tokenizer_round_trip():
    tok = ms.ByteTokenizer()
    s = "héllo, wörld ✓"
    ids = tok.encode(s, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == s
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"      # truncated UTF-8 does not crash
    with pytest.raises(ValueError):
        tok.decode([300])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
