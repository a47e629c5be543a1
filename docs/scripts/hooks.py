"""mkdocs hooks of the minisparse site (declared under ``hooks:`` in mkdocs.yml).

Seven jobs.

1. The Benchmarks page shows ``bench/README.md`` (the tables the benchmark scripts
record, with the machine they ran on) without copying it by hand. ``docs/benchmarks.md``
holds the marker ``<!-- include: bench/README.md -->``; this hook replaces it with the
README's text and

* copies every image the README links to (e.g. ``results/ffn_sparse.png``) into the site
  as ``bench/results/ffn_sparse.png`` and rewrites the link, so plots show up;
* turns other relative links (scripts, JSON files, other folders) into plain code spans,
  since those files are not part of the site and would break ``strict`` mode;
* drops the README's title (the page has its own), and demotes the other headings a
  level only if some are top-level too.

When ``bench/README.md`` does not exist yet the marker becomes a note saying so.

2. Docstrings often show array indexing such as ``stats["layers"][0]`` in plain text;
Markdown reads ``[...][0]`` as a reference-style link and mkdocs-autorefs warns that it
cannot find the target ``0``, which fails ``strict`` mode. A target made only of digits,
commas, colons, points and spaces (``[0.0, 0.38]``) is never a cross-reference, so those warnings (and only those)
are lowered to debug messages. Every other unresolved reference still fails the build.

3. ``<!-- modelconfig-fields -->`` on a page becomes a table of every ``ModelConfig``
field (name, type, default, and the comment written beside it in ``config.py``), read from
the source with ``ast``, so the table cannot drift from the code.

4. ``<!-- cli-help -->`` becomes the ``--help`` text of ``minisparse`` and of each of its
subcommands, from ``minisparse.cli.build_parser()``, so the page shows exactly what the
installed command accepts.

5. Docstrings written for Sphinx use roles such as ``:func:`sparse_ffn```; mkdocstrings
renders them as the literal text ``:func:`` before the code span. The role prefix is
removed from the rendered HTML, leaving the name in code font.

6. Offline: the site loads no script, stylesheet or font from another host.
MathJax 3 (``es5/tex-mml-chtml.js``, its CHTML fonts and the TeX extensions it loads on
demand) is copied from the installed ``django-static-mathjax`` package (the ``docs``
extra; it needs no Django) into ``assets/vendor/mathjax/``; the theme uses system fonts
(``theme.font: false``). The notebook pages of mkdocs-jupyter carry nbconvert's loaders
for MathJax 2 and mermaid from a CDN (our notebooks use neither: ``javascripts/mathjax.js``
typesets them, and they hold no mermaid diagram); those loaders are removed from the
HTML. tests/test_docs.py builds the site and fails on any external reference.

7. ``<!-- source: minisparse/tiny.py -->`` becomes the whole file as a code block (the
one-page model on the site is always the file itself).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.minisparse")

_INDEX_TARGET = re.compile(r"Could not find cross-reference target '[\d\s,:.\-]*'")


class _ArrayIndexNotALink(logging.Filter):
    """Lower autorefs' warning about a ``[0]``/``[0, 0]`` "link" target (array indexing) to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and _INDEX_TARGET.search(record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def on_startup(command, dirty):
    for name in ("mkdocs.plugins.mkdocs_autorefs", "mkdocs_autorefs", "mkdocs.plugins.mkdocs_autorefs._internal.plugin"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _ArrayIndexNotALink) for f in lg.filters):
            lg.addFilter(_ArrayIndexNotALink())


MARKER = "<!-- include: bench/README.md -->"
IMAGE_EXT = (".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp")
# [text](target) and ![alt](target), target without spaces; an optional "title" after it
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _bench_readme(config) -> Path:
    return _repo_root(config) / "bench" / "README.md"


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "/"))


def on_files(files, config):
    """Add the images that bench/README.md links to, under ``bench/`` in the site, and
    the vendored MathJax under ``assets/vendor/mathjax/``."""
    files = _vendor_mathjax(files, config)
    readme = _bench_readme(config)
    if not readme.is_file():
        return files
    bench = readme.parent
    for bang, _text, target, _title in _LINK.findall(readme.read_text(encoding="utf-8")):
        path = target.split("#")[0]
        if not (_is_relative(path) and path.lower().endswith(IMAGE_EXT)):
            continue
        src = (bench / path).resolve()
        if not src.is_file():
            log.warning("bench/README.md links to %s, which does not exist", path)
            continue
        uri = "bench/" + src.relative_to(bench.resolve()).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(src)))
    return files


def _rewrite_links(text: str, bench: Path) -> str:
    def repl(m: re.Match) -> str:
        bang, label, target, title = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if not _is_relative(target):
            return m.group(0)
        path = target.split("#")[0]
        if path.lower().endswith(IMAGE_EXT) and (bench / path).is_file():
            # the page is benchmarks.md at the site root; the image is copied to bench/<path>
            uri = "bench/" + (bench / path).resolve().relative_to(bench.resolve()).as_posix()
            return f"{bang}[{label}]({uri}{title})"
        # a script, a JSON file, a folder: not part of the site; name it instead of linking
        shown = f"bench/{path}" if path else target
        return f"{label} (`{shown}`)" if label and label.strip("`") != path else f"`{shown}`"

    return _LINK.sub(repl, text)


def _demote_headings(text: str) -> str:
    """Drop the README's own title (the page has one); if it has other top-level headings,
    demote every heading by one level so that they all sit under the page's title."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None and re.match(r"^# ", lines[first]):
        del lines[first]
    fence, body_h1 = False, False
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence and re.match(r"^# ", line):
            body_h1 = True
    if not body_h1:
        return "\n".join(lines)
    out, fence = [], False
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        if not fence and re.match(r"^#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


FIELDS_MARKER = "<!-- modelconfig-fields -->"


def modelconfig_fields_table(config_py: Path) -> str:
    """A Markdown table of the fields of ``ModelConfig`` with their trailing comments."""
    import ast

    src = config_py.read_text(encoding="utf-8")
    lines = src.splitlines()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "ModelConfig")
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    section = ""
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = lines[node.lineno - 1]
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
        if above.startswith("# ---"):
            section = above.strip("# -")
            rows.append(f"| **{section}** | | | |")
        default = ast.get_source_segment(src, node.value) if node.value is not None else "required"
        ann = ast.get_source_segment(src, node.annotation)
        cell = lambda t: t.replace("|", "\\|")
        rows.append(f"| `{node.target.id}` | `{cell(ann)}` | `{cell(default)}` | {cell(comment)} |")
    return "\n".join(rows) + "\n"


CLI_MARKER = "<!-- cli-help -->"


def cli_help_markdown() -> str:
    """``minisparse --help`` and ``minisparse COMMAND --help`` as Markdown sections."""
    import argparse
    import os

    from minisparse.cli import build_parser

    os.environ.setdefault("COLUMNS", "100")     # argparse wraps help text to the terminal width
    parser = build_parser()
    out = ["```text", "$ minisparse --help", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += [f"## `minisparse {name}`", "", "```text", f"$ minisparse {name} --help",
                p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


SOURCE_MARKER = re.compile(r"<!-- source: ([\w./-]+\.py) -->")


def _source_block(m: re.Match, config) -> str:
    """``<!-- source: path.py -->`` becomes that file of the repository as a Python code block."""
    path = _repo_root(config) / m.group(1)
    if not path.is_file():
        from mkdocs.exceptions import PluginError
        raise PluginError(f"<!-- source: {m.group(1)} -->: no such file in the repository")
    return "```python\n" + path.read_text(encoding="utf-8").rstrip("\n") + "\n```\n"


def on_page_markdown(markdown, page, config, files):
    """Expand the markers: bench/README.md on the Benchmarks page, the ModelConfig fields table,
    ``<!-- source: minisparse/tiny.py -->`` (a file of the repository shown whole)."""
    markdown = SOURCE_MARKER.sub(lambda m: _source_block(m, config), markdown)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_help_markdown())
    if FIELDS_MARKER in markdown:
        markdown = markdown.replace(FIELDS_MARKER, modelconfig_fields_table(
            _repo_root(config) / "minisparse" / "config.py"))
    if MARKER not in markdown:
        return markdown
    readme = _bench_readme(config)
    if not readme.is_file():
        note = ('!!! note "No benchmark results recorded yet"\n'
                "    `bench/README.md` does not exist in this checkout; run the scripts in "
                "`bench/` to produce it.\n")
        return markdown.replace(MARKER, note)
    body = _demote_headings(_rewrite_links(readme.read_text(encoding="utf-8"), readme.parent))
    return markdown.replace(MARKER, body)


_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):(?=<code>)")


def on_page_content(html, page, config, files):
    """Drop Sphinx role prefixes (``:func:``) left in front of code spans by docstrings."""
    return _ROLE.sub("", html)


# --------------------------------------------------------------------------------------
# 6. offline: vendored MathJax, no CDN loaders in notebook pages
# --------------------------------------------------------------------------------------
MATHJAX_URI = "assets/vendor/mathjax/"
# what tex-mml-chtml.js needs: itself, its fonts, and the components it may load on demand
# (TeX extensions through autoload, the a11y/ui menu, the speech-rule engine's data)
MATHJAX_PARTS = ("tex-mml-chtml.js", "output/chtml", "input/tex/extensions", "input/mml",
                 "a11y", "ui", "sre", "adaptors")


def mathjax_dir() -> Path:
    """The ``es5`` folder of the installed django-static-mathjax package."""
    try:
        import mathjax
    except ImportError as e:
        from mkdocs.exceptions import PluginError
        raise PluginError("the site serves MathJax itself, from the django-static-mathjax package: "
                          "install the docs extra, pip install -e '.[docs]'") from e
    es5 = Path(mathjax.__file__).resolve().parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        from mkdocs.exceptions import PluginError
        raise PluginError(f"{es5} has no tex-mml-chtml.js: reinstall django-static-mathjax>=3.2.2")
    return es5


def _vendor_mathjax(files, config):
    es5 = mathjax_dir()
    for part in MATHJAX_PARTS:
        src = es5 / part
        for path in ([src] if src.is_file() else sorted(q for q in src.rglob("*") if q.is_file())):
            uri = MATHJAX_URI + path.relative_to(es5).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


# nbconvert's lab template: a MathJax 2 loader (an empty <script src=""> when no URL is
# given, then its configuration) and a module script importing mermaid from a CDN
_NB_CDN_LOADERS = [
    re.compile(r'<script src="">\s*</script>'),
    re.compile(r'<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->', re.S),
    re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*?</script>', re.S),
]


def on_post_page(output, page, config):
    """Remove nbconvert's CDN loaders (MathJax 2, mermaid) from notebook pages."""
    if "jupyter-wrapper" not in output:
        return output
    if 'class="jp-Mermaid' in output:
        log.warning("%s holds a mermaid diagram, which would need mermaid from a CDN; draw it as a "
                    "figure instead (docs/scripts/make_figures.py)", page.file.src_uri)
    for pat in _NB_CDN_LOADERS:
        output = pat.sub("", output)
    return output
