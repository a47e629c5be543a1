"""The documentation site builds in strict mode, and the tutorials it shows are current.

* ``mkdocs build --strict`` passes (every nav entry exists, no broken link, every
  mkdocstrings reference resolves) and the built site has the pages we expect;
* each ``docs/tutorials/NN_*.ipynb`` (pre-executed by docs/scripts/execute_tutorials.py,
  rendered by mkdocs-jupyter without executing) has exactly the code cells of its
  ``tutorials/NN_*.py`` source, was executed in full mode, and is in the nav;
* the Home page shows the README's two commands;
* the built site works offline: no page loads a script, stylesheet or font from another
  host (MathJax is vendored by docs/scripts/hooks.py, the theme uses system fonts).

Skipped only when mkdocs (or jupytext, for the notebook checks) is not installed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
NOTEBOOKS = ROOT / "docs" / "tutorials"

pytestmark = pytest.mark.docs


def _nav_files(nav) -> list:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for v in item.values():
                out.extend(_nav_files(v) if isinstance(v, list) else [v])
    return out


def _mkdocs_config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once with ``mkdocs build --strict`` (about 10 s)."""
    pytest.importorskip("mkdocs")
    tmp = tmp_path_factory.mktemp("docs")
    site = tmp / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # run from tmp so that nothing (caches, site/) is written into the repository
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return site


# what a page may not load from another host: <script src>, <link href> (stylesheets, fonts,
# preconnects), CSS @import and url(), and a dynamic import() in an inline script
_EXTERNAL = [
    ("<script src>", re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^\"'\s>]+", re.I)),
    ("<link href>", re.compile(r"<link\b(?=[^>]*\brel\s*=\s*[\"']?(?:stylesheet|preconnect|preload|"
                               r"modulepreload|icon|dns-prefetch|prefetch))[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//"
                               r"[^\"'\s>]+", re.I)),
    ("@import", re.compile(r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//[^\"')\s;]+", re.I)),
    ("url()", re.compile(r"url\(\s*[\"']?(?:https?:)?//[^\"')\s]+", re.I)),
    ("import()", re.compile(r"\bimport\(\s*[\"'](?:https?:)?//[^\"']+", re.I)),
]


def external_references(text: str) -> list:
    """(kind, reference) for each asset that ``text`` (HTML or CSS) would fetch from another host."""
    return [(kind, m.group(0)[:160]) for kind, pat in _EXTERNAL for m in pat.finditer(text)]


def test_external_reference_detector_can_fail():
    bad = ('<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
           '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">'
           '<link href="https://fonts.gstatic.com" rel="preconnect">'
           '<style>@import url("https://x.org/a.css"); .a{background:url(//x.org/f.woff2)}</style>'
           '<script type="module">await import("https://cdnjs.cloudflare.com/mermaid.esm.min.mjs")</script>')
    kinds = [k for k, _ in external_references(bad)]
    assert kinds.count("<script src>") == 1 and kinds.count("<link href>") == 2, kinds
    assert {"@import", "url()", "import()"} <= set(kinds), kinds
    ok = ('<script src="../assets/vendor/mathjax/tex-mml-chtml.js"></script><a href="https://arxiv.org">paper</a>'
          '<link rel="canonical" href="https://example.org/"><img src="data:image/png;base64,AAAA">')
    assert external_references(ok) == []


def test_site_works_offline(site):
    """No built page or stylesheet loads a script, stylesheet or font from another host."""
    found = {}
    for path in sorted(site.rglob("*")):
        if path.suffix in (".html", ".css") and path.is_file():
            refs = external_references(path.read_text(encoding="utf-8", errors="replace"))
            if refs:
                found[str(path.relative_to(site))] = refs
    assert not found, ("the site loads assets from other hosts (it must work offline; vendor them "
                       f"in docs/scripts/hooks.py):\n{dict(list(found.items())[:8])}")
    # the math renderer and its fonts are served by the site itself
    mathjax = site / "assets" / "vendor" / "mathjax"
    assert (mathjax / "tex-mml-chtml.js").is_file(), "MathJax was not copied into the site"
    assert list((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff")), "MathJax fonts missing"
    pages = [p for p in site.rglob("index.html")]
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert "vendor/mathjax/tex-mml-chtml.js" in html, f"{page.relative_to(site)} does not load the vendored MathJax"
        # mermaid would come from a CDN (mkdocs-material and nbconvert load it from one)
        assert 'class="mermaid' not in html and 'class="jp-Mermaid' not in html, (
            f"{page.relative_to(site)} holds a mermaid diagram, which needs mermaid from a CDN; "
            "draw it as a figure (docs/scripts/make_figures.py) or as a text diagram")


def test_mkdocs_build_strict(site):
    # the pages a student needs are there, with their content
    home = re.sub(r"<[^>]+>", "", (site / "index.html").read_text())     # text without tags (code is highlighted)
    assert "minisparse demo" in home and "python -m pytest" in home
    for md in _nav_files(_mkdocs_config()["nav"]):
        stem = md.rsplit(".", 1)[0]                       # concepts/moe, tutorials/01_..., index
        html = site / (stem[:-len("index")] if stem.endswith("index") else stem) / "index.html"
        assert html.is_file(), f"nav entry {md} produced no page at {html.relative_to(site)}"
    api = re.sub(r"<[^>]+>", "", (site / "reference" / "model" / "index.html").read_text())
    assert "loss_and_grads" in api and "KVCache" in api, "the API reference lacks the model's members"


def test_every_tutorial_has_a_current_notebook():
    jupytext = pytest.importorskip("jupytext")
    assert TUTORIALS, "no tutorials found"
    for src in TUTORIALS:
        nb_path = NOTEBOOKS / (src.stem + ".ipynb")
        assert nb_path.is_file(), (f"{nb_path.relative_to(ROOT)} is missing: run "
                                   f"`python docs/scripts/execute_tutorials.py {src.name[:2]}`")
        want = [c.source for c in jupytext.read(src).cells if c.cell_type == "code"]
        have = [c.source for c in jupytext.read(nb_path).cells if c.cell_type == "code"]
        assert have == want, (f"{nb_path.relative_to(ROOT)} is stale: its code differs from {src.name}; run "
                              f"`python docs/scripts/execute_tutorials.py {src.name[:2]}`")


def test_notebooks_were_executed_in_full_mode():
    jupytext = pytest.importorskip("jupytext")
    not_full = []
    for src in TUTORIALS:
        nb_path = NOTEBOOKS / (src.stem + ".ipynb")
        if not nb_path.is_file():
            continue
        nb = jupytext.read(nb_path)
        if nb.metadata.get("minisparse", {}).get("mode") != "full":
            not_full.append(nb_path.name)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{nb_path.name} contains an error output"
    assert not not_full, f"notebooks not executed in full mode: {not_full}"


def test_nav_lists_every_tutorial():
    nav = _nav_files(_mkdocs_config()["nav"])
    for src in TUTORIALS:
        assert f"tutorials/{src.stem}.ipynb" in nav, f"mkdocs.yml nav does not list tutorial {src.stem}"


def test_home_page_shows_the_readme_commands():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md")
    home = (ROOT / "docs" / "index.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme.read_text(), flags=re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines()
                if "pip install -e" in line or "pytest" in line]
    assert commands, "README.md shows no set-up or test command"
    for cmd in commands:
        assert cmd in home, f"docs/index.md does not show the README's command: {cmd}"


def _hooks():
    import importlib.util
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("minisparse_docs_hooks", ROOT / "docs" / "scripts" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_modelconfig_table_lists_every_field():
    import dataclasses

    import minisparse as ms
    table = _hooks().modelconfig_fields_table(ROOT / "minisparse" / "config.py")
    for f in dataclasses.fields(ms.ModelConfig):
        assert f"| `{f.name}` |" in table, f"ModelConfig.{f.name} missing from the generated table"


def test_bench_readme_links_are_rewritten(tmp_path):
    hooks = _hooks()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "plot.png").write_bytes(b"\x89PNG")
    text = ("![speed](results/plot.png) see [the script](ffn_sparse.py), [data](results/x.json), "
            "[web](https://example.org) and [here](#anchor)")
    out = hooks._rewrite_links(text, tmp_path)
    assert "![speed](bench/results/plot.png)" in out            # images are copied and relinked
    assert "(`bench/ffn_sparse.py`)" in out and "(`bench/results/x.json`)" in out  # files named, not linked
    assert "[web](https://example.org)" in out and "[here](#anchor)" in out        # the rest untouched
    assert hooks._demote_headings("# Title\n## A\n```\n# not a heading\n```\n## B") == \
        "## A\n```\n# not a heading\n```\n## B"                  # the README's title is dropped
    assert hooks._demote_headings("# Title\n# A\n## B") == "## A\n### B"   # other H1s: all demoted


BENCH_FIGURES = ["bench_loss_curves.png", "bench_sparsity_per_layer.png", "bench_speedup_cpu.png",
                 "bench_speedup_gpu.png"]


def test_benchmarks_page_shows_its_figures(site):
    """The Benchmarks page shows the plots (made by docs/scripts/make_figures.py from bench/results)."""
    html = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    shown = re.findall(r'<img[^>]*src="([^"]+)"', html)
    for name in BENCH_FIGURES:
        assert (ROOT / "docs" / "assets" / name).is_file(), f"docs/assets/{name} missing: run docs/scripts/make_figures.py"
        assert any(src.endswith(name) for src in shown), f"the Benchmarks page does not show {name}"
        assert (site / "assets" / name).is_file()


def test_one_page_model_is_on_the_site(site):
    """docs/tiny.md shows minisparse/tiny.py itself (included at build time, never a stale copy)."""
    html = re.sub(r"<[^>]+>", "", (site / "tiny" / "index.html").read_text(encoding="utf-8"))
    assert "def ffn_sparse" in html and "def generate" in html and "source:" not in html
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="tiny/' in home, "the Home page should point to the one-page model"
