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


# --------------------------------------------------------------------------------------
# 2. a fresh run does not silently replace another
# --------------------------------------------------------------------------------------
TRAIN = ["train", "--preset", "nano", "--batch-size", 2, "--seq-len", 16, "--eval-every", 0, "--no-progress"]


def test_train_refuses_a_folder_that_holds_a_run(tmp_path, data):
    out = tmp_path / "run"
    assert cli.main([str(a) for a in TRAIN + ["--steps", 3, "--data", data, "--out", out]]) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    rc, _, err = run_cli(*TRAIN, "--steps", 1, "--data", data, "--out", out)
    assert_one_error_line(rc, err, "--resume", "--overwrite")
    assert (out / "checkpoint.safetensors").read_bytes() == before           # the step-3 run is intact
    rc, _, err = run_cli(*TRAIN, "--steps", 1, "--data", data, "--out", out, "--overwrite")
    assert rc == 0, err
    assert ms.checkpoint.read_metadata(out)["step"] == 1
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0]                                    # nothing of the old run mixed in


# --------------------------------------------------------------------------------------
# 3. OSError: one line naming the path and the cause; outputs checked before the work
# --------------------------------------------------------------------------------------
def test_profile_and_bench_check_their_output_before_working(tmp_path, nano_ckpt):
    import time
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    rc, out, err = run_cli("profile", nano_ckpt, "--out", blocker / "prof", "--no-progress")
    assert_one_error_line(rc, err, str(blocker))
    assert "layer" not in out                                                  # no table: no work was done
    rc, out, err = run_cli("bench", "--quick", "--backend", "numpy", "--json", blocker / "b.json")
    assert_one_error_line(rc, err, str(blocker))
    assert "numpy skip" not in out
    rc, out, err = run_cli("bench", "--quick", "--backend", "numpy", "--json", tmp_path / "missing" / "b.json")
    assert_one_error_line(rc, err, "does not exist")
    assert time.perf_counter() - t0 < 30


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch, capsys):
    import errno
    out = tmp_path / "run"
    assert cli.main([str(a) for a in TRAIN + ["--steps", 2, "--data", data, "--out", out]]) == 0
    good = (out / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    rc = cli.main(["train", "--resume", str(out), "--steps", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert_one_error_line(rc, err, "No space left on device", "checkpoint.safetensors", "last good checkpoint")
    assert (out / "checkpoint.safetensors").read_bytes() == good
    assert not list(out.glob(".*.tmp"))


def test_permission_and_missing_paths_are_one_line(tmp_path, monkeypatch, capsys):
    import errno
    from minisparse.cli import bench

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "b.json"))
    monkeypatch.setattr(bench, "run_bench", denied)
    rc = cli.main(["bench", "--quick", "--backend", "numpy", "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert_one_error_line(rc, err, "Permission denied", "b.json")


# --------------------------------------------------------------------------------------
# 4. a torn last line of metrics.jsonl
# --------------------------------------------------------------------------------------
def test_torn_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert cli.main([str(a) for a in TRAIN + ["--steps", 2, "--data", data, "--out", out]]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 1.2')                                    # killed mid-line
    with pytest.warns(UserWarning, match="torn last line"):
        assert cli.main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]


def test_a_bad_metrics_line_in_the_middle_names_the_file(tmp_path):
    from minisparse.train import read_metrics
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        read_metrics(p)


# --------------------------------------------------------------------------------------
# 6. the corpus reader reads what is asked, as uint16, regular files only
# --------------------------------------------------------------------------------------
CORPUS_RSS = r"""
import sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
import numpy, minisparse.data as d
before = hwm()
c = d.load_corpus(sys.argv[1], max_bytes=int(sys.argv[2]))
print(hwm() - before, c.n_bytes / 2**20, c.train.dtype)
"""


def test_corpus_reader_reads_only_what_is_asked(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        for _ in range(40):
            f.write(b"def f(x):\n    return x + 1\n" * 40_000)                # ~40 MB
    p = subprocess.run([sys.executable, "-c", CORPUS_RSS, str(big), "1000000"], capture_output=True, text=True)
    grown, used, dtype = p.stdout.split()
    assert dtype == "uint16", p.stderr
    assert float(grown) < 2 * float(used) + 8, f"{grown} MB of RSS for {used} MB of text"
    p = subprocess.run([sys.executable, "-c", CORPUS_RSS, str(big), "100000000"], capture_output=True, text=True)
    grown, used, _ = p.stdout.split()
    assert float(grown) <= 2 * float(used) + 8, f"{grown} MB of RSS for {used} MB of text"


def test_corpus_reader_refuses_devices_and_fifos(tmp_path):
    from minisparse.data import load_corpus
    with pytest.raises(ValueError, match="not a regular file"):
        load_corpus("/dev/zero", max_bytes=1000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        load_corpus(fifo)                                                      # used to hang
    rc, _, err = run_cli("train", "--data", "/dev/zero", "--out", tmp_path / "o")
    assert_one_error_line(rc, err, "/dev/zero")


# --------------------------------------------------------------------------------------
# 9, 10: generate's inputs, ModelConfig, Transformer(backend=...)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[1.7, 2.2], [True, False], np.array([1.5]), ["a"]])
def test_generate_refuses_non_integer_prompts(prompt):
    m = ms.Transformer(ms.preset("nano"), seed=0)
    with pytest.raises((ValueError, TypeError)):
        ms.generate(m, prompt, 2, temperature=0)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_generate_refuses_bad_temperatures(temperature):
    m = ms.Transformer(ms.preset("nano"), seed=0)
    with pytest.raises(ValueError, match="temperature"):
        ms.generate(m, [256, 1], 2, temperature=temperature)


def test_tiny_temperature_is_greedy():
    m = ms.Transformer(ms.preset("nano"), seed=0)
    assert ms.generate(m, [256, 1], 4, temperature=1e-320, seed=0) == ms.generate(m, [256, 1], 4, temperature=0)


def test_nan_weights_are_reported_not_sampled(tmp_path):
    m = ms.Transformer(ms.preset("nano"), seed=0)
    m.params["norm"][:] = np.nan
    for t in (0, 0.8):
        with pytest.raises(FloatingPointError, match="NaN"):
            ms.generate(m, [256, 1], 2, temperature=t, seed=0)
    ms.save(m, tmp_path)
    rc, _, err = run_cli("generate", "--model", tmp_path, "--prompt", "a", "--max-new-tokens", 2, "--temperature", 0)
    assert_one_error_line(rc, err, "NaN")


@pytest.mark.parametrize("kw, field", [
    (dict(norm_eps=float("inf")), "norm_eps"), (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(norm_eps=float("nan")), "norm_eps"), (dict(activation="fatrelu:-1"), "activation"),
    (dict(n_experts=4, moe_layers=(1.7,)), "moe_layers"), (dict(n_experts=4, moe_layers="01"), "moe_layers"),
    (dict(n_experts=4, moe_layers=(True,)), "moe_layers"), (dict(n_experts=4, moe_layers=(0, 0)), "moe_layers"),
    (dict(n_experts=True), "n_experts"), (dict(n_experts=4, top_k=True), "top_k"),
    (dict(n_shared_experts=True, n_experts=2), "n_shared_experts"), (dict(dim=64.0), "dim"),
    (dict(tie_embeddings=1), "tie_embeddings"), (dict(router_aux_loss_coef=float("inf")), "router_aux_loss_coef"),
    (dict(capacity_factor=float("nan")), "capacity_factor"), (dict(activation=3), "activation"),
])
def test_model_config_refuses_non_finite_and_mistyped_values(kw, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ms.preset("nano", **kw)


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="bogus"):
        ms.Transformer(ms.preset("nano"), backend="bogus")


def test_kv_cache_overflow_says_so():
    m = ms.Transformer(ms.preset("nano"), seed=0)
    cache = ms.KVCache(m.config, 1, m.dtype, max_len=4)
    m(np.array([[256, 1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        m(np.array([[3, 4]]), cache=cache)


# --------------------------------------------------------------------------------------
# 12 and the done-criterion: every subcommand, a battery of bad arguments, one error line each
# --------------------------------------------------------------------------------------
BATTERY = {
    "demo": [["--steps", "0"], ["--steps", "x"], ["--seed", "-1"], ["--threads", "0"], ["--bogus"],
             ["--out", "{file}"]],
    "train": [["--lr", "-1e-3"], ["--lr", "nan"], ["--lr", "inf"], ["--steps", "0"], ["--dtype", "float16"],
              ["--preset", "huge"], ["--activation", "nope"], ["--activation", "drelu_shift:nan"],
              ["--heads", "3", "--preset", "nano"], ["--data", "/dev/zero"], ["--data", "/does/not/exist"],
              ["--val-fraction", "1.5"], ["--resume", "/does/not/exist"], ["--resume", "{file}"],
              ["--out", "{file}"], ["--experts", "-2"], ["--max-bytes", "0"]],
    "generate": [[], ["--model", "/does/not/exist"], ["--model", "{file}"], ["--model", "{ckpt}", "--top-p", "1.5"],
                 ["--model", "{ckpt}", "--temperature", "nan"], ["--model", "{ckpt}", "--temperature", "-1"],
                 ["--model", "{ckpt}", "--top-k", "0"], ["--model", "{ckpt}", "--backend", "bogus"],
                 ["--model", "{ckpt}", "--max-new-tokens", "-5"]],
    "profile": [[], ["/does/not/exist"], ["{file}"], ["{ckpt}", "--topk", "2"], ["{ckpt}", "--batches", "0"],
                ["{ckpt}", "--out", "{file}"], ["{ckpt}", "--cett", "-1"], ["{ckpt}", "--data", "/dev/zero"]],
    "relufy": [[], ["{ckpt}", "--shift", "nan"], ["{ckpt}", "--shift", "inf"], ["{ckpt}", "--to", "bogus", "--steps", "0"],
               ["{ckpt}", "--steps", "-1"], ["{ckpt}", "--lr", "-1e-3"], ["{ckpt}", "--out", "{file}"],
               ["/does/not/exist"]],
    "bench": [["--activation", "bogus"], ["--dtype", "float16", "--backend", "numba"], ["--dim", "100000000"],
              ["--repeats", "0"], ["--backend", "bogus"], ["--sparsity", "1.5"], ["--activation", "swiglu"],
              ["--dim", "-4"], ["--json", "{file}/x.json"], ["--tokens", "0"]],
}


@pytest.mark.parametrize("command", sorted(BATTERY))
def test_every_subcommand_answers_bad_arguments_with_one_error_line(command, tmp_path, nano_ckpt, capsys):
    """In process (a traceback would be an exception escaping main); see the subprocess tests above
    for the same through the console script."""
    afile = tmp_path / "a_file.txt"
    afile.write_text("x")
    for argv in BATTERY[command]:
        argv = [a.format(file=afile, ckpt=nano_ckpt) for a in argv]
        try:
            rc = cli.main([command, *argv, *(["--out", str(tmp_path / "o")] if command == "train"
                                              and "--out" not in argv else [])])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc not in (0, None), (command, argv, err)
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "Traceback" not in err, (command, argv, err)


def test_bad_arguments_through_the_console_script(tmp_path):
    for argv in (["bench", "--activation", "bogus"], ["bench", "--dim", "100000000"], ["bench", "--repeats", "0"],
                 ["train", "--lr", "-1e-3"], ["bench", "--dtype", "float16", "--backend", "numba"]):
        rc, out, err = run_cli(*argv)
        assert_one_error_line(rc, err)
        assert "nan us" not in out
