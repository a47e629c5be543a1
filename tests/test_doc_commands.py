"""Every command the README, the Home page and the how-to guides show runs, as printed.

Each ```bash / ```python block of README.md, docs/index.md and docs/howto/*.md is extracted and run, the
blocks of one page in order, in one fresh working folder (a later block sees the files an
earlier one wrote, e.g. ``runs/drelu``) and, for Python blocks, one namespace (a later
block sees the names an earlier one defined, as when pasting into one interpreter). So a
page cannot drift from the code: a renamed function, flag or file fails here.

Quick sizes. With ``MINISPARSE_QUICK=1`` (the default here) the sizes in the commands are
shrunk before running (``--steps 600`` -> ``--steps 2``, ``steps=300`` -> ``steps=2``,
``minisparse demo`` -> ``minisparse demo --quick --steps 2`` ...; see ``QUICK_RULES``),
and the rewritten block is printed. ``MINISPARSE_QUICK=0 pytest tests/test_doc_commands.py``
runs the pages' real sizes (long).

What a reader brings: the pages train on "your text"; the working folder holds
``my_notes.txt`` and a folder ``my_texts/`` (Python sources of the standard library). The
Hugging Face guide loads ``~/models/Mistral-7B-v0.1``, which needs the Hub (network): it
runs on a stand-in, a tiny random Mistral-architecture model with a trained byte-level BPE
``tokenizer.json`` at that path, under a temporary HOME.

Never silent: the set-up commands (``python3 -m venv``, ``pip install``) and the test
command are dropped from their lines (CI runs exactly those lines in .ci/run) and each test
prints what it dropped; a block that needs a CUDA GPU and CuPy is SKIPPED, with the reason,
where there is none.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "index.md"] + sorted((ROOT / "docs" / "howto").glob("*.md"))
QUICK = os.environ.get("MINISPARSE_QUICK", "1") != "0"
BLOCK_TIMEOUT = 300            # seconds per block
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>bash|sh|python)[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)

# (pattern, replacement): shrink the sizes of pasted commands in quick mode
QUICK_RULES = [
    (r"\bminisparse demo(?: --quick)?\b", "minisparse demo --quick --steps 2"),
    (r"--steps \d+", "--steps 2"),
    (r"--save-every \d+", "--save-every 1"),
    (r"--batches \d+", "--batches 2"),
    (r"--max-new-tokens \d+", "--max-new-tokens 8"),
    (r"--dim \d{4,}", "--dim 256"),
    (r"--ffn-dim \d{4,}", "--ffn-dim 768"),
    (r"\bminisparse bench\b", "minisparse bench --repeats 2"),
    (r"\bsteps=\d+", "steps=2"),
    (r"\bn_batches=\d+", "n_batches=2"),
    (r"\bmax_new_tokens=\d+", "max_new_tokens=8"),
]

# flags added in quick mode to a command that leaves them to their (large) defaults
QUICK_DEFAULTS = {
    "train": [("--steps", 2)],
    "relufy": [("--steps", 2), ("--eval-batches", 2)],
    "profile": [("--batches", 2)],
}

# parts of a shell line that are not run here, and why (a line is split at "&&")
DROPPED = [
    (re.compile(r"^python3? -m venv\b"), "set-up: the test runs inside the environment this creates"),
    (re.compile(r"^(\.|source) \S*activate$"), "set-up: the test runs inside the environment this creates"),
    (re.compile(r"^pip install\b"), "set-up: CI runs exactly this install (.ci/run)"),
    (re.compile(r"^python3? -m pytest\b|^pytest\b"), "the test suite itself"),
]

# a block that needs a CUDA GPU: imports CuPy, asks for the cupy backend, or asks the driver
GPU_BLOCK = re.compile(r"import cupy|backend=[\"']cupy|--backend cupy|\.to\([\"']cupy|nvidia-smi|\bcp\.")


def extract_blocks(path: Path) -> list:
    """[(line, lang, code)] of the ```bash / ```python blocks of a Markdown file, dedented."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        lang = "python" if m.group("lang") == "python" else "bash"
        out.append((line, lang, textwrap.dedent(m.group("code"))))
    return out


def quick(code: str) -> str:
    for pat, rep in QUICK_RULES:
        code = re.sub(pat, rep, code)
    # sizes a command leaves to its defaults: small ones (not for a resumed run, which
    # continues to the step count saved in its checkpoint)
    lines = []
    for line in code.split("\n"):
        m = re.search(r"\bminisparse (\w+)\b", line)
        if m and not re.search(r"--resume|--help", line):
            for flag, value in QUICK_DEFAULTS.get(m.group(1), []):
                if flag not in line:
                    line += f" {flag} {value}"
        lines.append(line)
    return "\n".join(lines)


def drop_setup(code: str):
    """The shell block without its set-up / test-suite commands, and what was dropped, why."""
    kept, dropped = [], []
    lines = code.replace("\\\n", " ").splitlines()          # join continued lines
    for line in lines:
        parts = [p.strip() for p in re.split(r"\s&&\s", line)]
        keep = []
        for part in parts:
            bare = part.split("#", 1)[0].strip()
            why = next((w for pat, w in DROPPED if pat.search(bare)), None)
            if why:
                dropped.append((part, why))
            elif part:
                keep.append(part)
        if keep:
            kept.append(" && ".join(keep))
    return "\n".join(kept), dropped


_GPU = None


def gpu_available() -> bool:
    global _GPU
    if _GPU is None:
        _GPU = False
        if importlib.util.find_spec("cupy") is not None:
            try:
                import cupy
                _GPU = cupy.cuda.runtime.getDeviceCount() > 0
            except Exception:
                _GPU = False
    return _GPU


def plan(path: Path) -> list:
    """The blocks of a page as they will be run: dicts with line, lang, code, skip, dropped."""
    blocks = []
    for line, lang, code in extract_blocks(path):
        b = dict(line=line, lang=lang, code=code, skip=None, dropped=[])
        if GPU_BLOCK.search(code) and not gpu_available():
            b["skip"] = "needs a CUDA GPU and CuPy (none here)"
        if lang == "bash":
            b["code"], b["dropped"] = drop_setup(code)
            if not b["code"].strip() and b["skip"] is None:
                b["skip"] = "only set-up / test-suite commands: " + "; ".join(sorted({w for _, w in b["dropped"]}))
        if QUICK:
            b["code"] = quick(b["code"])
        blocks.append(b)
    return blocks


# the driver runs one page's blocks in order in a subprocess; python blocks share a namespace
DRIVER = r'''
import json, subprocess, sys, traceback, io, contextlib, os, time
blocks = json.load(open(sys.argv[1]))
results = []
ns = {"__name__": "__main__"}
failed = None
for b in blocks:
    if b["skip"]:
        results.append(dict(status="skip", reason=b["skip"], out=""))
        continue
    if failed is not None:
        results.append(dict(status="skip", reason=f"not run: the block at line {failed} failed", out=""))
        continue
    t0 = time.perf_counter()
    if b["lang"] == "bash":
        try:
            p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b["code"]], capture_output=True, text=True,
                               timeout=b["timeout"])
            ok, out = p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        except subprocess.TimeoutExpired as e:
            ok, out = False, f"timed out after {b['timeout']} s"
    else:
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                exec(compile(b["code"], f"{b['page']}:{b['line']}", "exec"), ns)
            ok = True
        except BaseException:
            ok = False
            buf.write(traceback.format_exc())
        out = buf.getvalue()[-8000:]
    results.append(dict(status="ok" if ok else "fail", out=out, secs=round(time.perf_counter() - t0, 1)))
    print(f"{b['page']}:{b['line']}: {'ok' if ok else 'FAILED'} in {results[-1]['secs']} s", file=sys.stderr)
    if not ok:
        failed = b["line"]
json.dump(results, open(sys.argv[2], "w"))
'''


def _stand_in_hf_model(home: Path) -> None:
    """A tiny random Mistral-architecture folder with a tokenizer.json at ~/models/Mistral-7B-v0.1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import minisparse as ms
    folder = home / "models" / "Mistral-7B-v0.1"
    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris.", "sparse neurons fire rarely"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    cfg = ms.preset("nano", vocab_size=tok.get_vocab_size(), tie_embeddings=False)
    ms.save_hf(ms.Transformer(cfg, seed=0), folder, architecture="MistralForCausalLM")


def _reader_files(work: Path) -> None:
    """The text a reader would bring: my_notes.txt and a folder my_texts/."""
    import os as _os
    src = Path(_os.__file__).read_text(encoding="utf-8")            # ~40 KB of Python
    (work / "my_notes.txt").write_text(src * 2, encoding="utf-8")
    (work / "my_texts").mkdir()
    (work / "my_texts" / "a.txt").write_text(src, encoding="utf-8")
    (work / "my_texts" / "b.txt").write_text(Path(textwrap.__file__).read_text(encoding="utf-8") * 3,
                                              encoding="utf-8")


_RESULTS: dict = {}


def run_page(path: Path, tmp_root: Path) -> tuple:
    if path in _RESULTS:
        return _RESULTS[path]
    blocks = plan(path)
    rel = str(path.relative_to(ROOT))
    work = tmp_root / re.sub(r"\W", "_", rel)
    home = tmp_root / (work.name + "_home")
    work.mkdir(parents=True)
    home.mkdir()
    _reader_files(work)
    if "huggingface" in path.name and any(not b["skip"] and "~/models/" in b["code"] for b in blocks):
        pytest.importorskip("tokenizers")
        _stand_in_hf_model(home)
    for b in blocks:
        b.update(page=rel, timeout=BLOCK_TIMEOUT)
    (work / ".blocks.json").write_text(json.dumps(blocks))
    (work / ".driver.py").write_text(DRIVER)
    env = dict(os.environ, HOME=str(home), MPLBACKEND="Agg", MINISPARSE_QUICK="1" if QUICK else "0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.pop("MINISPARSE_DEBUG", None)
    subprocess.run([sys.executable, str(work / ".driver.py"), str(work / ".blocks.json"),
                    str(work / ".results.json")], cwd=work, env=env, timeout=BLOCK_TIMEOUT * (len(blocks) + 1))
    results = json.loads((work / ".results.json").read_text())
    _RESULTS[path] = (blocks, results)
    return _RESULTS[path]


# pages whose blocks train models: over ~20 s even at quick sizes (deselect with -m "not slow")
SLOW_PAGES = {"train.md", "profile.md", "relufy.md", "huggingface.md"}
CASES = [pytest.param(page, i, marks=[pytest.mark.slow] if page.name in SLOW_PAGES else [],
                      id=f"{page.relative_to(ROOT)}:{line}")
         for page in PAGES for i, (line, _, _) in enumerate(extract_blocks(page))]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("doc_commands")


@pytest.mark.parametrize("page,index", CASES)
def test_documented_block_runs(page, index, tmp_root):
    blocks, results = run_page(page, tmp_root)
    b, r = blocks[index], results[index]
    for part, why in b["dropped"]:
        print(f"not run here: {part!r} ({why})")
    print(f"--- {b['page']}:{b['line']} ({b['lang']}){' quick sizes' if QUICK else ''} ---\n{b['code']}")
    if "~/models/" in b["code"]:
        print("~/models/Mistral-7B-v0.1 is a stand-in here (the real one needs the Hub): a tiny random "
              "Mistral-architecture folder with a trained byte-level BPE tokenizer.json")
    if r["status"] == "skip":
        pytest.skip(f"{b['page']}:{b['line']}: {r['reason']}")
    assert r["status"] == "ok", (f"the {b['lang']} block at {b['page']}:{b['line']} failed when run as printed"
                                 f"{' (quick sizes)' if QUICK else ''}:\n{b['code']}\n--- output ---\n{r['out']}")


def test_extraction_and_rewrites():
    """The parser finds indented blocks, and the quick rules and set-up filter do what they say."""
    assert quick("minisparse train --data x --steps 600 --out r") == "minisparse train --data x --steps 2 --out r"
    assert quick("minisparse demo") == quick("minisparse demo --quick") == "minisparse demo --quick --steps 2"
    assert quick("TrainConfig(steps=300, out_dir='r')") == "TrainConfig(steps=2, out_dir='r')"
    assert quick("--ffn-dim 172 --ffn-dim 14336") == "--ffn-dim 172 --ffn-dim 768"
    assert quick("minisparse train --experts 8 --out r\nminisparse train --resume r/c") == \
        "minisparse train --experts 8 --out r --steps 2\nminisparse train --resume r/c"
    assert quick("minisparse profile runs/x") == "minisparse profile runs/x --batches 2"
    code, dropped = drop_setup('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" '
                               "&& minisparse demo\n. .venv/bin/activate && python -m pytest\n")
    assert code == "minisparse demo" and len(dropped) == 5
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        n_fences = len(re.findall(r"^[ \t]*```(?:bash|sh|python)[ \t]*$", text, re.M))
        assert len(extract_blocks(page)) == n_fences, f"{page.name}: a block was not parsed"


# ======================================================================================
# copy-paste traps found by students, each pinned
# ======================================================================================
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def _doc_code() -> list:
    return [(p, line, code) for p in DOC_FILES for line, _, code in extract_blocks(p)]


def test_save_paths_say_file_or_folder():
    """ms.save(model, "runs/x/model") writes an extension-less *file*; pages name a .safetensors file."""
    for page, line, code in _doc_code():
        for m in re.finditer(r"\b(?:ms|minisparse)\.save\(\s*\w+\s*,\s*[\"']([^\"']+)[\"']", code):
            assert m.group(1).endswith((".safetensors", "/")), (
                f"{page.relative_to(ROOT)}:{line}: ms.save(..., {m.group(1)!r}) writes a file named "
                f"{Path(m.group(1)).name!r}; write 'x.safetensors' (or an existing folder)")


def test_reader_files_have_one_name():
    """The text a reader brings has one name across the pages (my_text/ vs my_texts/ was a trap)."""
    names = {m.group(0) for p in DOC_FILES for m in re.finditer(r"\bmy_\w+(?:\.\w+|/)?", p.read_text())}
    assert names <= {"my_notes.txt", "my_texts/"}, names


def test_runs_that_are_resumed_are_started_with_their_architecture():
    """A resume example must start its run with the activation the page is about (else: SwiGLU)."""
    for page, line, code in _doc_code():
        text = code.replace("\\\n", " ")
        for m in re.finditer(r"--resume\s+(\S+?)/checkpoint\.safetensors", text):
            out = m.group(1)
            starts = [c for c in text.splitlines() if f"--out {out}" in c and "--resume" not in c]
            for c in starts:
                assert "--activation" in c, (f"{page.relative_to(ROOT)}:{line}: the run resumed from {out} "
                                             f"is started without --activation (it would be SwiGLU): {c}")


def test_readme_says_the_quick_start_model_is_untrained():
    readme = (ROOT / "README.md").read_text()
    block = next(code for _, lang, code in extract_blocks(ROOT / "README.md")
                 if lang == "python" and "ms.generate" in code)
    assert "untrained" in block, "the quick start prints gibberish from an untrained model: say so"
    assert "tiny.py" in readme.split("## ")[0], "the README should point to minisparse/tiny.py first"


def test_clone_folder_shadowing_is_explained(tmp_path):
    """Running from the folder that holds a clone named minisparse: not "module 'minisparse' has
    no attribute 'Transformer'" but a warning that says what happened, and a working import."""
    parent = tmp_path / "work"
    parent.mkdir()
    (parent / "minisparse").symlink_to(ROOT, target_is_directory=True)
    (parent / "script.py").write_text("import minisparse as ms\nprint(ms.Transformer.__name__, ms.sparse_ffn.__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "script.py"], cwd=parent, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["Transformer", "sparse_ffn"], proc.stderr
    assert "found the repository folder" in proc.stderr and "clone under another name" in proc.stderr, proc.stderr
    # from inside the clone, the package itself is imported, silently
    proc = subprocess.run([sys.executable, "-c", "import minisparse as ms; print(ms.Transformer.__name__)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "Transformer" and "repository folder" not in proc.stderr, proc.stderr
