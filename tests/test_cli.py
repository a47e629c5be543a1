"""The minisparse command: train, resume, generate, demo --quick, plugins, clear errors."""
import json
import sys
import types

import numpy as np
import pytest

import minisparse as ms
from helpers import tiny_tokenizer
from minisparse import cli


TEXT = "".join(f"class C{i}:\n    def m(self):\n        return {i}\n\n" for i in range(300))


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "code.txt"
    f.write_text(TEXT)
    return f


def run(argv):
    return cli.main([str(a) for a in argv])


def test_train_resume_generate(tmp_path, data, capsys):
    out = tmp_path / "run"
    rc = run(["train", "--preset", "nano", "--activation", "drelu", "--steps", 6, "--batch-size", 2,
              "--seq-len", 32, "--warmup", 2, "--eval-every", 3, "--data", data, "--out", out, "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "zeros in h" in text
    assert (out / "checkpoint.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    meta = ms.checkpoint.read_metadata(out)
    assert meta["step"] == 6 and meta["config"]["activation"] == "drelu"
    assert meta["extra"]["train_config"]["seq_len"] == 32

    # resume and extend to 9 steps: the saved config and corpus are reused, --steps overrides
    assert run(["train", "--resume", out / "checkpoint.safetensors", "--steps", 9, "--no-progress"]) == 0
    assert str(data) in capsys.readouterr().out                      # the run's own text, not the stdlib
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(9))
    assert ms.checkpoint.read_metadata(out)["step"] == 9

    assert run(["generate", "--model", out, "--prompt", "class ", "--max-new-tokens", 20,
                "--temperature", 0, "--seed", 1]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("class ") and len(sample) > len("class ")
    # greedy decoding is deterministic and equals the library's generate
    model = ms.load(out)
    ids = ms.generate(model, ms.ByteTokenizer().encode("class "), 20, temperature=0)
    assert sample.rstrip("\n") == "class " + ms.ByteTokenizer().decode(ids)


def test_model_flags_reach_the_config(tmp_path, data, capsys):
    out = tmp_path / "r"
    assert run(["train", "--preset", "nano", "--dim", 32, "--layers", 1, "--heads", 4, "--kv-heads", 1,
                "--ffn-dim", 40, "--activation", "reglu", "--steps", 2, "--batch-size", 2, "--seq-len", 16,
                "--dtype", "float64", "--lr", "1e-3", "--l1", "0.1", "--data", data, "--out", out,
                "--no-progress"]) == 0
    m = ms.load(out)
    c = m.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.activation) == (32, 1, 4, 1, 40, "reglu")
    assert m.dtype == np.float64
    tc = ms.checkpoint.read_metadata(out)["extra"]["train_config"]
    assert tc["lr"] == 1e-3 and tc["l1"] == 0.1


def test_moe_flags(tmp_path, data, capsys):
    pytest.importorskip("minisparse.moe")
    out = tmp_path / "moe"
    assert run(["train", "--preset", "nano", "--experts", 4, "--top-k", 2, "--steps", 2, "--batch-size", 2,
                "--seq-len", 16, "--data", data, "--out", out, "--no-progress"]) == 0
    c = ms.load(out).config
    assert (c.n_experts, c.top_k) == (4, 2)


@pytest.mark.parametrize("argv, match", [
    (["train", "--steps", "0"], "positive integer"),
    (["train", "--lr", "-1"], "number > 0"),
    (["train", "--lr", "abc"], "positive number"),
    (["generate", "--model", "x", "--top-p", "1.5"], r"\(0, 1\]"),
    (["train", "--dtype", "float16"], "invalid choice"),
])
def test_bad_flag_values_exit_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


@pytest.mark.parametrize("argv, match", [
    (["train", "--preset", "huge"], "unknown --preset"),
    (["train", "--preset", "nano", "--heads", "3"], "n_heads"),
    (["train", "--preset", "nano", "--activation", "nope"], "unknown activation"),
    (["train", "--data", "/does/not/exist.txt"], "does not exist"),
    (["generate", "--model", "/does/not/exist"], "does not exist"),
])
def test_user_errors_are_one_line_messages(argv, match, capsys, tmp_path):
    rc = run(argv + ["--out", tmp_path / "o"] if argv[0] == "train" else argv)
    assert rc in (1, 2)
    err = capsys.readouterr().err
    assert __import__("re").search(match, err) and "Traceback" not in err


def test_short_text_error_says_lengths(tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("x = 1\n")
    rc = run(["train", "--preset", "nano", "--data", f, "--seq-len", 64, "--out", tmp_path / "o", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "needs at least 65" in err and "6 bytes" in err


def test_resume_refuses_architecture_flags(tmp_path, data, capsys):
    out = tmp_path / "r"
    run(["train", "--preset", "nano", "--steps", 1, "--batch-size", 1, "--seq-len", 8, "--data", data,
         "--out", out, "--no-progress"])
    rc = run(["train", "--resume", out, "--dim", 32, "--data", data])
    assert rc == 2 and "--dim" in capsys.readouterr().err


def test_generate_dispatches_hf_folders(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    model = ms.Transformer(ms.preset("nano"), seed=0)
    seen = {}

    def fake_load_hf(path):
        seen["path"] = path
        return model

    monkeypatch.setitem(sys.modules, "minisparse.hf", types.SimpleNamespace(load_hf=fake_load_hf))
    assert run(["generate", "--model", folder, "--prompt", "ab", "--max-new-tokens", 3, "--seed", 0]) == 0
    assert str(seen["path"]) == str(folder)
    assert capsys.readouterr().out.startswith("ab")


def test_max_new_tokens_is_capped_by_max_seq_len(tmp_path, capsys):
    ms.save(ms.Transformer(ms.preset("nano", max_seq_len=16), seed=0), tmp_path)
    assert run(["generate", "--model", tmp_path, "--prompt", "abc", "--max-new-tokens", 100]) == 0
    assert "lowered from 100 to 12" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "zeros in h" in text and "sample" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < summary["first_loss"] - 1.0          # it learned something
    assert len(summary["ffn_zero_fraction"]) == 2 and all(0 < f < 1 for f in summary["ffn_zero_fraction"])
    assert (out / "checkpoint.safetensors").is_file() and (out / "metrics.jsonl").is_file()


# --------------------------------------------------------------------------------------
# the package: every subcommand module registers itself, plainly imported
# --------------------------------------------------------------------------------------
def test_every_subcommand_is_registered(capsys):
    ap = cli.build_parser()
    sub = next(a for a in ap._actions if a.dest == "command")
    assert set(sub.choices) == {"demo", "train", "generate", "profile", "relufy", "bench"}
    for name, p in sub.choices.items():
        assert callable(p.get_default("func")), name


def test_the_cli_modules_import_no_module_dynamically():
    """The subcommand modules import each other plainly: common.py imports none of them."""
    import pathlib
    import minisparse.cli.common as common
    src = pathlib.Path(common.__file__).read_text()
    assert "from .main" not in src and "from .profile" not in src and "import_module" not in src
    for mod in ("main", "profile", "relufy", "bench"):
        text = (pathlib.Path(common.__file__).parent / f"{mod}.py").read_text()
        assert "import_module" not in text, mod


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_threads_flag(tmp_path, data, capsys):
    assert run(["train", "--preset", "nano", "--steps", 1, "--batch-size", 1, "--seq-len", 8, "--data", data,
                "--out", tmp_path / "t", "--threads", 1, "--no-progress"]) == 0
    assert "threads: 1\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(["demo", "--threads", 0])


@pytest.mark.parametrize("argv", [["demo", "--quick"], ["train", "--preset", "nano", "--steps", "2"]])
def test_out_that_is_a_file_is_refused(tmp_path, capsys, argv):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert cli.main([*argv, "--out", str(taken)]) != 0
    assert "is a file, not a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# generate on Hugging Face folders (moved here from tests/interop/test_hf.py; no torch needed:
# the folder is written by save_hf and the truth is the library's own greedy decode)
# --------------------------------------------------------------------------------------
def test_cli_generate_on_hf_folder(tmp_path, capsys):
    """`minisparse generate --model DIR --prompt ...` prints the model's greedy continuation, with the
    folder's own tokenizer."""
    pytest.importorskip("ml_dtypes")
    pytest.importorskip("safetensors")
    folder = tmp_path / "hfmodel"
    folder.mkdir()
    tok = tiny_tokenizer(folder)
    model = ms.Transformer(ms.preset("nano", vocab_size=tok.get_vocab_size()), seed=0)
    ms.save_hf(model, folder)
    prompt = "the cat"
    ids = [tok.token_to_id("<s>")] + tok.encode(prompt).ids
    want = tok.decode(ms.generate(ms.load_hf(folder), ids, 8, temperature=0))
    assert run(["generate", "--model", folder, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 0]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out[len(prompt):].strip() == want.strip(), (out, want)


def test_cli_generate_refuses_hf_folder_without_tokenizer(tmp_path, capsys):
    """No tokenizer.json and a vocabulary that is not bytes: refuse instead of printing garbage."""
    pytest.importorskip("ml_dtypes")
    pytest.importorskip("safetensors")
    folder = tmp_path / "hfmodel"
    ms.save_hf(ms.Transformer(ms.preset("nano", vocab_size=300), seed=0), folder)
    assert run(["generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", 2]) != 0
    assert "tokenizer.json" in capsys.readouterr().err


def test_version_is_set_in_one_place():
    import pathlib
    import tomllib
    root = pathlib.Path(ms.__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "minisparse.__version__"}
    assert cli.build_parser().format_help() and ms.__version__.count(".") == 2


def test_demo_quick_help_matches_the_preset(capsys):
    from minisparse.cli.main import DEMO_QUICK
    with pytest.raises(SystemExit):
        run(["demo", "--help"])
    assert f"{DEMO_QUICK['steps']} steps" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------
# help and output (issue 16)
# --------------------------------------------------------------------------------------
def _help(command, capsys):
    with pytest.raises(SystemExit):
        run([command, "--help"])
    return capsys.readouterr().out


def test_help_texts_are_clean(capsys):
    assert "%%" not in _help("profile", capsys) and "10% of neurons" in " ".join(_help("profile", capsys).split())
    text = _help("bench", capsys)
    assert "``" not in text
    assert text.count("Time a sparse FFN") == 1 and "examples:" in text
    gen = " ".join(_help("generate", capsys).split())
    for flag, default in (("--max-new-tokens", "default 200"), ("--top-k", "default: all"),
                          ("--top-p", "default: off"), ("--seed", "default: a fresh one")):
        assert f"{flag} {flag[2:].upper().replace('-', '_')} " in gen and default in gen, flag


def test_train_reports_nats_per_byte_with_bits_per_byte(tmp_path, data, capsys):
    assert run(["train", "--preset", "nano", "--steps", 1, "--batch-size", 2, "--seq-len", 16, "--data", data,
                "--out", tmp_path / "r", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nats/byte" in out and "bits/byte" in out and "nats/token" not in out


def test_moe_training_prints_and_plots_routing(tmp_path, data, capsys):
    out = tmp_path / "moe"
    assert run(["train", "--preset", "nano", "--experts", 4, "--top-k", 2, "--steps", 2, "--eval-every", 1,
                "--batch-size", 2, "--seq-len", 16, "--data", data, "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.count("routing at step") == 2 and "busiest/idlest" in text and "entropy" in text
    recs = [json.loads(x) for x in (out / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for L in recs[-1]["layers"]:
        assert abs(sum(L["load"]) - 1) < 1e-9 and L["busiest_idlest"] >= 1
        assert 0 <= L["router_entropy"] <= np.log(4) + 1e-9
    if pytest.importorskip("matplotlib"):
        assert (out / "routing.png").stat().st_size > 1000
