"""Checkpoints: round trips, optimizer state, atomic writes, corrupt and truncated files."""
import json
import os

import numpy as np
import pytest

import minisparse as ms
from minisparse.checkpoint import FILENAME, load_training_state, read_metadata, save
from minisparse.train import AdamW

# checkpoints need NumPy only (minisparse reads and writes the safetensors format itself); the
# tests that compare with the safetensors package import it themselves


def model_of(dtype=np.float32, **kw):
    cfg = ms.preset("nano", **{"activation": "drelu", **kw})
    return ms.Transformer(cfg, seed=3, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(activation="swiglu", tie_embeddings=False, qkv_bias=True),
                                dict(norm_offset=True, embed_scale=True, activation="drelu:0.05")])
def test_roundtrip_model(tmp_path, dtype, kw):
    m = model_of(dtype, **kw)
    rng = np.random.default_rng(0)
    for p in m.params.values():
        p += rng.standard_normal(p.shape).astype(dtype) * 0.01     # not just the seeded init
    path = save(m, tmp_path / "ck.safetensors")
    m2 = ms.load(path)
    assert m2.config == m.config and m2.dtype == m.dtype
    assert list(m2.params) == list(m.params)
    for k in m.params:
        assert np.array_equal(m.params[k], m2.params[k]), k
    tokens = np.array([[256, 1, 2, 3, 200]])
    assert np.array_equal(m(tokens), m2(tokens))


def test_folder_means_checkpoint_file_and_lazy_export(tmp_path):
    m = model_of()
    p = ms.save(m, tmp_path)
    assert p == tmp_path / FILENAME
    assert ms.load(tmp_path).num_parameters() == m.num_parameters()
    # parent folders are created
    p2 = save(m, tmp_path / "a" / "b" / "c.safetensors")
    assert p2.is_file()


def test_optimizer_state_step_and_extra_roundtrip(tmp_path):
    m = model_of()
    opt = AdamW(m.params, lr=1e-3, weight_decay=0.05)
    loss, grads = m.loss_and_grads(np.array([[256, 5, 6, 7, 8]]))
    opt.step(m.params, grads, 1e-3)
    rng = np.random.default_rng(7)
    rng.random(3)
    extra = {"rng_state": rng.bit_generator.state, "note": "hi"}
    save(m, tmp_path / "c.safetensors", optimizer=opt, step=17, extra=extra)
    st = load_training_state(tmp_path / "c.safetensors")
    assert st.step == 17 and st.extra["note"] == "hi"
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = st.extra["rng_state"]
    assert rng2.random() == rng.random()                             # the generator continues exactly
    opt2 = AdamW(st.model.params)
    opt2.load_state_dict(st.optimizer)
    assert opt2.t == 1 and opt2.weight_decay == 0.05
    for k in m.params:
        assert np.array_equal(opt2.exp_avg[k], opt.exp_avg[k]) and np.array_equal(opt2.exp_avg_sq[k], opt.exp_avg_sq[k])
    meta = read_metadata(tmp_path / "c.safetensors")
    assert meta["step"] == 17 and meta["config"]["activation"] == "drelu"


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    m = model_of()
    path = save(m, tmp_path / "ck.safetensors", step=1)
    before = path.read_bytes()
    m.params["norm"][:] = 42.0

    class Crash(Exception):
        pass

    real_fsync = os.fsync

    def crash(fd):                           # the process dies after writing, before the rename
        raise Crash

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(Crash):
        save(m, path, step=2)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert read_metadata(path)["step"] == 1 and np.all(ms.load(path).params["norm"] == 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]    # no temp file left

    def crash_replace(src, dst):             # a crash at the rename itself
        raise Crash

    monkeypatch.setattr(os, "replace", crash_replace)
    with pytest.raises(Crash):
        save(m, path, step=3)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("cut", [0, 5, 100, -10])
def test_truncated_files_give_clear_errors(tmp_path, cut):
    path = save(model_of(), tmp_path / "ck.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(ValueError, match="not a readable minisparse checkpoint"):
        ms.load(bad)


def test_corrupted_bytes_are_detected(tmp_path):
    path = save(model_of(), tmp_path / "ck.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF                                          # flip bits inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        ms.load(path)


def test_other_files_give_clear_errors(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ms.load(tmp_path / "missing.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="load_hf"):
        ms.load(tmp_path)
    import safetensors.numpy
    (tmp_path / "plain.safetensors").write_bytes(safetensors.numpy.save({"w": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match="no minisparse metadata"):
        ms.load(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, this is not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        ms.load(tmp_path / "text.safetensors")
    with pytest.raises(TypeError, match="Transformer"):
        save({"w": np.ones(3)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="JSON"):
        save(model_of(), tmp_path / "y.safetensors", extra={"f": object()})


def test_checkpoints_need_numpy_only(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_st(name, *a, **kw):
        if name.startswith("safetensors"):
            raise ImportError("no safetensors")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_st)
    m = model_of()
    p = save(m, tmp_path / "z.safetensors", optimizer=AdamW(m.params), step=3)
    assert load_training_state(p).step == 3 and np.array_equal(ms.load(p).params["norm"], m.params["norm"])


def test_files_are_safetensors_that_the_safetensors_package_reads(tmp_path):
    pytest.importorskip("safetensors")
    import safetensors
    import safetensors.numpy
    m = model_of(np.float64)
    p = save(m, tmp_path / "c.safetensors", optimizer=AdamW(m.params), step=1)
    got = safetensors.numpy.load_file(str(p))
    assert set(got) == set(m.params) | {f"optimizer.exp_avg{s}.{k}" for s in ("", "_sq") for k in m.params}
    assert all(np.array_equal(got[k], v) for k, v in m.params.items())
    with safetensors.safe_open(str(p), framework="np") as f:
        assert json.loads(f.metadata()["minisparse"])["step"] == 1


def test_version_1_checkpoints_still_load(tmp_path):
    """Files written before the digest covered the metadata (safetensors.numpy.save, sha256 in the JSON)."""
    pytest.importorskip("safetensors")
    import hashlib
    import safetensors.numpy
    m = model_of()
    tensors = {k: np.ascontiguousarray(v) for k, v in m.params.items()}
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}|{tensors[name].dtype.str}|{tensors[name].shape}\n".encode())
        h.update(tensors[name].tobytes())
    meta = {"format": "minisparse-checkpoint", "version": 1, "config": m.config.to_dict(), "dtype": "float32",
            "step": 5, "optimizer": None, "extra": {}, "sha256": h.hexdigest()}
    p = tmp_path / "v1.safetensors"
    p.write_bytes(safetensors.numpy.save(tensors, metadata={"minisparse": json.dumps(meta)}))
    back = ms.load(p)
    assert all(np.array_equal(back.params[k], v) for k, v in m.params.items())
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        ms.load(p)
