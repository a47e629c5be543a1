"""Issue 13: nothing lost, nothing silently wrong. Each test fails on the code before the fix.

CLI behaviour is checked through ``subprocess`` where the command line itself is the subject
(exit status, one ``error:`` line, no traceback); the rest through the API.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minisparse as ms
from minisparse import cli

pytest.importorskip("safetensors")

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(400))


def run_cli(*argv, timeout=120):
    """``python -m minisparse.cli ARGV`` -> (returncode, stdout, stderr)."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("MINISPARSE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "minisparse.cli", *map(str, argv)], capture_output=True,
                       text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_one_error_line(rc, err, *needles):
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "code.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture
def nano_ckpt(tmp_path):
    return ms.save(ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0), tmp_path / "base")


# --------------------------------------------------------------------------------------
# 1. shifted ReLU is a registry name that round-trips
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, base", [("drelu_shift:0.05", "drelu"), ("reglu_shift:0.05", "reglu"),
                                        ("relu_shift:0.1", "relu"), ("reglu_shift:0.5:0.6", "reglu"),
                                        ("relu2glu_shift:0.25", "relu2glu")])
def test_shifted_relu_is_a_parameterised_registry_name(name, base):
    act = ms.get_activation(name)
    assert act.name == name and ms.get_activation(name) is act
    g = np.array([1.0, 0.2, 2.0, -1.0, 0.3])
    u = np.array([2.0, 2.0, 0.4, 3.0, -0.5])
    b = float(name.split(":")[1])
    t = float(name.split(":")[2]) if name.count(":") == 2 else 0.0

    def r(z):
        s = z - b
        return np.where(s > t, s, 0.0)
    want = {"drelu": r(g) * r(u), "reglu": r(g) * u, "relu": r(g), "relu2glu": np.maximum(g - b, 0) ** 2 * u}[base]
    got = act(g, u) if act.gated else act(g)
    assert np.array_equal(got, want)
    cfg = ms.preset("nano", activation=name)                # ModelConfig accepts it (no registration step)
    assert cfg.activation == name


def test_old_shift_spelling_still_loads():
    assert ms.get_activation("drelu-shift0.05") is ms.get_activation("drelu_shift:0.05")
    assert ms.get_activation("reglu-shift0.5-t0.6").name == "reglu_shift:0.5:0.6"


@pytest.mark.parametrize("bad", ["drelu_shift:nan", "drelu_shift:inf", "drelu_shift:-inf", "relu_shift:x",
                                 "swiglu_shift:0.1", "fatrelu:-1", "drelu:nan", "drelu_shift:0.1:-0.2",
                                 "drelu-shiftnan"])
def test_bad_activation_parameters_are_refused(bad):
    with pytest.raises((ValueError, KeyError)):
        ms.get_activation(bad)
    with pytest.raises(ValueError, match="activation"):
        ms.preset("nano", activation=bad)


def test_shifted_model_round_trips_through_checkpoint_and_hf(tmp_path):
    pytest.importorskip("ml_dtypes")
    from minisparse.sparsity import relufy
    m = relufy(ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0), "drelu", shift=0.05).model
    assert m.config.activation == "drelu_shift:0.05"
    x = np.arange(1, 9)[None]
    assert np.array_equal(ms.load(ms.save(m, tmp_path / "c")).__call__(x), m(x))
    with pytest.warns(UserWarning, match="stock transformers"):
        ms.save_hf(m, tmp_path / "hf")
    back = ms.load_hf(tmp_path / "hf")
    assert back.config.activation == "drelu_shift:0.05"
    assert np.allclose(back(x), m(x), atol=1e-6)


def test_cli_relufy_shift_writes_a_model_generate_and_resume_open(tmp_path, nano_ckpt, data):
    out = tmp_path / "relshift"
    rc, _, err = run_cli("relufy", nano_ckpt, "--shift", "0.05", "--steps", 1, "--data", data, "--batch-size", 2,
                         "--seq-len", 16, "--eval-batches", 1, "--out", out, "--no-progress")
    assert rc == 0, err
    assert ms.load(out).config.activation == "drelu_shift:0.05"
    rc, outp, err = run_cli("generate", "--model", out, "--prompt", "def ", "--max-new-tokens", 3,
                            "--temperature", 0)
    assert rc == 0 and "Traceback" not in err, err
    rc, _, err = run_cli("train", "--resume", out, "--steps", 2, "--no-progress")
    assert_one_error_line(rc, err, "no training config")       # relufy saves no optimizer: said plainly
    run = tmp_path / "run"                                    # a run trained with the shifted name resumes
    argv = ["--data", data, "--batch-size", 2, "--seq-len", 16, "--no-progress", "--eval-every", 0]
    rc, _, err = run_cli("train", "--preset", "nano", "--activation", "drelu_shift:0.05", "--steps", 1,
                         "--out", run, *argv)
    assert rc == 0, err
    rc, _, err = run_cli("train", "--resume", run, "--steps", 2, "--no-progress")
    assert rc == 0, err


@pytest.mark.parametrize("shift", ["nan", "inf", "-inf"])
def test_cli_relufy_refuses_non_finite_shift(tmp_path, nano_ckpt, shift):
    with pytest.raises(SystemExit) as e:
        cli.main(["relufy", str(nano_ckpt), f"--shift={shift}", "--out", str(tmp_path / "o")])
    assert e.value.code == 2


# --------------------------------------------------------------------------------------
# 5, 7, 8, 12: checkpoints (stray .tmp, header first, digest over metadata, crafted headers)
# --------------------------------------------------------------------------------------
def _rewrite_meta(path, edit, resign=False):
    """Rewrite the minisparse JSON of a checkpoint in place, keeping the tensors and the digest
    (``resign``: store the digest of the new text, as a crafter who knows the format would)."""
    import struct
    import safetensors.numpy
    from minisparse.checkpoint import _digest_tensors
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = header["__metadata__"]["minisparse"] = edit(header["__metadata__"]["minisparse"])
    if resign:
        h = _digest_tensors(safetensors.numpy.load_file(str(path)))
        h.update(text.encode())
        header["__metadata__"]["minisparse_sha256"] = h.hexdigest()
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_stray_tmp_files_are_removed_by_the_next_save(tmp_path):
    m = ms.Transformer(ms.preset("nano"), seed=0)
    p = ms.save(m, tmp_path)
    stray = tmp_path / ".checkpoint.safetensors.k1ll3d.tmp"        # what a kill -9 mid-save leaves
    stray.write_bytes(b"\0" * 100)
    other = tmp_path / ".notes.txt.x.tmp"                              # another file's: not ours to remove
    other.write_text("x")
    ms.save(m, p, step=2)
    assert not stray.exists() and other.exists()


def test_edited_metadata_is_detected(tmp_path):
    p = ms.save(ms.Transformer(ms.preset("nano"), seed=0), tmp_path / "c.safetensors")
    _rewrite_meta(p, lambda s: s.replace('"norm_eps": 1e-05', '"norm_eps": 9e-05'))
    assert ms.checkpoint.read_metadata(p)["config"]["norm_eps"] == 9e-05       # the edit is there
    with pytest.raises(ValueError, match="checksum"):
        ms.load(p)


@pytest.mark.parametrize("edit, match", [
    (lambda d: {**d, "version": "abc"}, "version"),
    (lambda d: {**d, "version": True}, "version"),
    (lambda d: {**d, "version": 99}, "newer minisparse"),
    (lambda d: {k: v for k, v in d.items() if k != "config"}, "config"),
    (lambda d: {**d, "config": [1, 2]}, "config"),
    (lambda d: {**d, "config": {**d["config"], "dim": "64"}}, "config is invalid"),
    (lambda d: {**d, "step": "many"}, "step"),
    (lambda d: [d], "not an object"),
])
def test_crafted_metadata_gives_value_errors(tmp_path, edit, match):
    p = ms.save(ms.Transformer(ms.preset("nano"), seed=0), tmp_path / "c.safetensors")
    _rewrite_meta(p, lambda s: json.dumps(edit(json.loads(s))), resign=True)
    with pytest.raises(ValueError, match=match):
        ms.load(p)


def test_deeply_nested_header_is_refused_cleanly(tmp_path):
    import struct
    p = ms.save(ms.Transformer(ms.preset("nano"), seed=0), tmp_path / "c.safetensors")
    _rewrite_meta(p, lambda s: s[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        ms.load(p)
    deep = tmp_path / "deep.safetensors"
    hb = ("[" * 100_000 + "]" * 100_000).encode()
    deep.write_bytes(struct.pack("<Q", len(hb)) + hb)
    with pytest.raises(ValueError, match="not a readable"):
        ms.load(deep)
    rc, _, err = run_cli("generate", "--model", deep)
    assert_one_error_line(rc, err, "deep.safetensors")


def test_malformed_tensor_table_is_refused(tmp_path):
    import struct
    p = ms.save(ms.Transformer(ms.preset("nano"), seed=0), tmp_path / "c.safetensors")
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["norm"]["data_offsets"] = [0, 10**12]                      # points far past the end
    hb = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(ValueError, match="'norm'"):
        ms.load(p)


RSS_SCRIPT = r"""
import sys
def rss_mb(key="VmRSS"):              # VmHWM: the peak (ru_maxrss can report the parent's after a fork)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
import numpy, minisparse, minisparse.checkpoint as c
before = rss_mb()
try:
    m = minisparse.load(sys.argv[1])
    weights = sum(a.nbytes for a in m.params.values()) / 2**20
except ValueError as e:
    weights = 0.0
    print("ValueError", e, file=sys.stderr)
print(before, rss_mb("VmHWM"), weights)
"""


def _load_rss(path):
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    before, peak, weights = map(float, p.stdout.split())
    return peak - before, weights, p.stderr


def test_a_large_non_minisparse_file_is_refused_from_its_header(tmp_path):
    """An HF weights file (here 1 GiB, sparse on disk) is refused without reading its tensors."""
    import struct
    f = tmp_path / "model.safetensors"
    n = 2**30
    hb = json.dumps({"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [n // 4],
                                                               "data_offsets": [0, n]}}).encode()
    hb += b" " * (-len(hb) % 8)
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb)
        fh.truncate(8 + len(hb) + n)
    grown, _, err = _load_rss(f)
    assert "no minisparse metadata" in err
    assert grown < 50, f"RSS grew {grown:.0f} MB while refusing a 1 GiB file"


def test_inference_load_skips_the_optimizer_state(tmp_path):
    """Weights W MB + optimizer 2W MB on disk: loading the model peaks near W, not 3W."""
    cfg = ms.ModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=1024, activation="drelu", vocab_size=258)
    m = ms.Transformer(cfg, seed=0)
    from minisparse.train import AdamW
    p = ms.save(m, tmp_path, optimizer=AdamW(m.params), step=1)
    grown, weights, err = _load_rss(p)
    assert weights > 10, err
    assert grown <= 1.25 * weights + 8, f"load grew RSS by {grown:.1f} MB for {weights:.1f} MB of weights"


# --------------------------------------------------------------------------------------
# 11. load_hf: wrong dtypes, wrong config values, crafted indexes
# --------------------------------------------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path):
    pytest.importorskip("ml_dtypes")
    folder = tmp_path / "hf"
    ms.save_hf(ms.Transformer(ms.preset("nano", activation="swiglu"), seed=0), folder)
    return folder


def _edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size=64.7), "hidden_size"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(rope_scaling={"factor": 8.0}), "names no type"),
    (dict(rms_norm_eps=None, rope_theta="big", rope_parameters=None), "rope_theta"),
    (dict(minisparse_activation=["drelu"]), "minisparse_activation"),
    (dict(minisparse_activation="nope"), "minisparse_activation"),
    (dict(architectures=["MixtralForCausalLM"]), "num_local_experts"),
])
def test_load_hf_refuses_bad_config_values(hf_folder, changes, match):
    from minisparse.hf import HFFormatError
    _edit_config(hf_folder, **changes)
    with pytest.raises(HFFormatError, match=match):
        ms.load_hf(hf_folder)


def test_load_hf_refuses_a_json_list_config(hf_folder):
    from minisparse.hf import HFFormatError
    (hf_folder / "config.json").write_text("[1, 2]")
    with pytest.raises(HFFormatError, match="JSON object"):
        ms.load_hf(hf_folder)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64])
def test_load_hf_refuses_non_float_weights(hf_folder, dtype):
    import safetensors.numpy
    from minisparse.hf import HFFormatError
    f = hf_folder / "model.safetensors"
    t = safetensors.numpy.load_file(str(f))
    t["model.norm.weight"] = t["model.norm.weight"].astype(dtype)
    try:
        f.write_bytes(safetensors.numpy.save(t))
    except Exception:                                          # noqa: BLE001  (safetensors has no complex)
        pytest.skip(f"safetensors cannot store {np.dtype(dtype)}")
    with pytest.raises(HFFormatError, match="model.norm.weight.*floating point"):
        ms.load_hf(hf_folder)


def _shard(hf_folder, weight_map_edit):
    import safetensors.numpy
    t = safetensors.numpy.load_file(str(hf_folder / "model.safetensors"))
    (hf_folder / "model.safetensors").unlink()
    names = sorted(t)
    safetensors.numpy.save_file({k: t[k] for k in names[:3]}, str(hf_folder / "a.safetensors"))
    safetensors.numpy.save_file({k: t[k] for k in names[3:]}, str(hf_folder / "b.safetensors"))
    wm = {k: ("a.safetensors" if i < 3 else "b.safetensors") for i, k in enumerate(names)}
    weight_map_edit(wm, names)
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def test_shard_paths_are_confined_to_the_folder(hf_folder, tmp_path):
    import shutil
    from minisparse.hf import HFFormatError
    _shard(hf_folder, lambda wm, names: None)
    assert ms.load_hf(hf_folder).config.dim == 64                  # the sharded folder loads
    outside = tmp_path / "outside.safetensors"
    shutil.copy(hf_folder / "a.safetensors", outside)
    for bad in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        wm = json.loads((hf_folder / "model.safetensors.index.json").read_text())["weight_map"]
        first = sorted(wm)[0]
        wm[first] = bad
        (hf_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(HFFormatError, match="outside the model folder"):
            ms.load_hf(hf_folder)


@pytest.mark.parametrize("value", [3, None, ["a.safetensors"], ""])
def test_non_string_weight_map_values_are_refused(hf_folder, value):
    from minisparse.hf import HFFormatError

    def edit(wm, names):
        wm[names[0]] = value
    _shard(hf_folder, edit)
    with pytest.raises(HFFormatError, match="not a file name"):
        ms.load_hf(hf_folder)
