"""Corpora: the embedded default, files and folders, the split, batches, and clear errors."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisparse.data import BOS, Corpus, corpus_from_text, load_corpus, split_tokens, stdlib_dir


def test_embedded_corpus_is_the_stdlib_sorted_and_capped():
    c = load_corpus(max_bytes=50_000)
    assert c.name == "python-stdlib"
    assert c.n_bytes == 50_000
    tokens = np.concatenate([c.train, c.val])
    assert tokens.dtype == np.uint16 and len(tokens) == 50_000 + c.n_docs
    assert int(tokens.max()) <= BOS
    # the documents are the stdlib's .py files in name order, cut at max_bytes
    expect, total = [], 0
    for p in sorted(stdlib_dir().glob("*.py")):
        data = p.read_bytes()[: 50_000 - total]
        if data:
            expect += [BOS] + list(data)
            total += len(data)
        if total >= 50_000:
            break
    # the split moves whole chunks: the multiset of tokens is the same
    assert np.array_equal(np.sort(tokens), np.sort(np.array(expect, dtype=np.uint16)))
    assert np.array_equal(c.train[: 100], np.array(expect[: 100], dtype=np.uint16)) or \
        np.array_equal(c.val[: 100], np.array(expect[: 100], dtype=np.uint16))
    # deterministic
    c2 = load_corpus(max_bytes=50_000)
    assert np.array_equal(c.train, c2.train) and np.array_equal(c.val, c2.val)


def test_text_file_roundtrip(tmp_path):
    text = "héllo wörld\n" * 300
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    c = load_corpus(f, val_fraction=0.0)
    assert c.n_bytes == len(text.encode()) and c.n_docs == 1 and len(c.val) == 0
    assert bytes(c.train[1:].astype(np.uint8)) == text.encode()
    assert c.train[0] == BOS


def test_folder_sorted_recursive_skipping_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / ".hidden").write_text("never")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\0\0\0binary")
    (tmp_path / "empty.txt").write_text("")
    c = load_corpus(tmp_path, val_fraction=0.0)
    assert c.n_docs == 2
    assert bytes(c.train[c.train < 256].astype(np.uint8)) == b"firstsecond"
    assert list(np.flatnonzero(c.train == BOS)) == [0, 6]


@given(n=st.integers(2, 5000), frac=st.sampled_from([0.0, 0.05, 0.1, 0.5]), seed=st.integers(0, 99))
def test_split_is_a_deterministic_partition(n, frac, seed):
    tokens = np.arange(n, dtype=np.int64)
    tr, va = split_tokens(tokens, frac, seed)
    tr2, va2 = split_tokens(tokens, frac, seed)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), tokens)          # a partition
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)               # order kept
    if frac == 0:
        assert len(va) == 0
    else:
        assert len(va) > 0 and len(tr) > 0
        assert abs(len(va) / n - frac) < 0.1 + 2 * (n // 20 + 1) / n         # about the asked share


def test_split_depends_on_seed():
    t = np.arange(100_000)
    assert not np.array_equal(split_tokens(t, 0.1, 0)[1], split_tokens(t, 0.1, 1)[1])


@given(B=st.integers(1, 5), T=st.integers(1, 40), seed=st.integers(0, 1000))
def test_get_batch_shapes_shift_and_seeding(B, T, seed):
    c = corpus_from_text("".join(chr(97 + i % 26) for i in range(3000)))
    x, y = c.get_batch("train", B, T, np.random.default_rng(seed))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    # every window is a contiguous slice of the split
    data = c.train.astype(np.int64)
    for row_x, row_y in zip(x, y):
        full = np.concatenate([row_x, row_y[-1:]])
        starts = [s for s in range(len(data) - T) if data[s] == full[0]]
        assert any(np.array_equal(data[s:s + T + 1], full) for s in starts)
    x2, _ = c.get_batch("train", B, T, np.random.default_rng(seed))
    assert np.array_equal(x, x2)
    xv, _ = c.get_batch("val", B, min(T, len(c.val) - 1), np.random.default_rng(seed))
    assert xv.shape[0] == B


def test_bad_paths_and_empty_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "d")
    (tmp_path / "d" / "x.bin").write_bytes(b"\0\0\0")
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "d")
    (tmp_path / "bin").write_bytes(b"ab\0cd" * 10)
    with pytest.raises(ValueError, match="binary"):
        load_corpus(tmp_path / "bin")
    with pytest.raises(ValueError, match="empty"):
        corpus_from_text("")


def test_text_shorter_than_a_sequence_says_how_long(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("x" * 50)
    c = load_corpus(f, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"has 51 tokens.*seq_len=64 needs at least 65.*50 bytes"):
        c.get_batch("train", 2, 64, np.random.default_rng(0))


@pytest.mark.parametrize("kw, match", [
    (dict(val_fraction=1.0), "val_fraction"), (dict(val_fraction=-0.1), "val_fraction"),
    (dict(max_bytes=0), "max_bytes"), (dict(max_bytes=-5), "max_bytes"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(**kw)


def test_bad_split_and_batch_args():
    c = corpus_from_text("abc" * 100)
    with pytest.raises(ValueError, match="split"):
        c.get_batch("test", 1, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 1"):
        c.get_batch("train", 0, 4, np.random.default_rng(0))
    assert isinstance(c, Corpus) and "train=" in repr(c)
