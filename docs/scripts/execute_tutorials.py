"""Execute the tutorials in full mode and store them, with their outputs, for the site.

    python docs/scripts/execute_tutorials.py                 # every tutorials/*.py
    python docs/scripts/execute_tutorials.py 03 05           # only those whose name starts so
    python docs/scripts/execute_tutorials.py --quick 06      # quick mode (MINISPARSE_QUICK=1)
    python docs/scripts/execute_tutorials.py --no-execute 07 # the notebook without outputs

Each ``tutorials/NN_name.py`` (jupytext percent format, the source of truth) becomes
``docs/tutorials/NN_name.ipynb``, which mkdocs-jupyter renders as it is: the site build
never executes code. Why: the full-mode tutorials train small models for minutes each; a
docs build in CI must stay fast. CI instead executes every tutorial in quick mode
(``tests/test_tutorials.py``) and checks that each notebook's code equals its ``.py``
source (``tests/test_docs.py``), so a tutorial edited without re-running this script fails
CI instead of showing stale outputs.

Needs the ``docs`` extra (jupytext, nbclient through mkdocs-jupyter) and ipykernel.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tutorials"
DST = ROOT / "docs" / "tutorials"


def notebook_from_source(path: Path):
    """The jupytext notebook of a tutorial, with a python3 kernelspec."""
    import jupytext

    nb = jupytext.read(path)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata.pop("jupytext", None)
    return nb


def execute(nb, quick: bool, timeout: int):
    """Run every cell in a fresh kernel (cwd: the repository root)."""
    from nbclient import NotebookClient

    env_quick = os.environ.get("MINISPARSE_QUICK")
    os.environ["MINISPARSE_QUICK"] = "1" if quick else "0"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # one thread per library: reproducible timings (tutorial 6 compares one core with one
    # core), and far faster than oversubscribed BLAS threads on a busy 2-core machine
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        if env_quick is None:
            os.environ.pop("MINISPARSE_QUICK", None)
        else:
            os.environ["MINISPARSE_QUICK"] = env_quick
    return nb


def strip_volatile(nb) -> None:
    """Drop per-run metadata (timestamps, ids of the kernel) so that re-runs diff cleanly."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                out.get("metadata", {}).pop("execution", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="tutorial name prefixes (default: all)")
    ap.add_argument("--quick", action="store_true", help="execute with MINISPARSE_QUICK=1")
    ap.add_argument("--no-execute", action="store_true", help="write notebooks without outputs")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = ap.parse_args(argv)

    import nbformat

    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if args.names:
        sources = [s for s in sources if any(s.name.startswith(n) for n in args.names)]
    if not sources:
        print("no tutorial matched", args.names, file=sys.stderr)
        return 1
    DST.mkdir(parents=True, exist_ok=True)
    status = 0
    for src in sources:
        nb = notebook_from_source(src)
        mode = "none" if args.no_execute else ("quick" if args.quick else "full")
        t0 = time.perf_counter()
        if mode != "none":
            try:
                execute(nb, quick=args.quick, timeout=args.timeout)
            except Exception as e:  # keep what ran, outside docs/, to see where it failed
                failed = Path(tempfile.gettempdir()) / (src.stem + ".failed.ipynb")
                nbformat.write(nb, failed)
                print(f"{src.name}: FAILED after {time.perf_counter() - t0:.0f} s ({type(e).__name__}); "
                      f"partial notebook in {failed}", file=sys.stderr)
                status = 1
                continue
        dt = time.perf_counter() - t0
        strip_volatile(nb)
        nb.metadata["minisparse"] = {"source": f"tutorials/{src.name}", "mode": mode}
        out = DST / (src.stem + ".ipynb")
        nbformat.write(nb, out)
        print(f"{src.name:<40s} {mode:<6s} {dt:7.1f} s -> {out.relative_to(ROOT)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
