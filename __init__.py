"""The package is the folder ``minisparse/``; this file only handles one common mistake.

When a clone of the repository is itself named ``minisparse`` and a script (or ``python``)
is started in the folder that *holds* the clone, Python puts that folder first on
``sys.path``, and ``import minisparse`` finds the clone's folder before the installed
package. Without this file Python imports the folder as an empty namespace package, and the
script fails later with the puzzling ``module 'minisparse' has no attribute 'Transformer'``
(the package's own ``__init__.py`` never runs, so it cannot explain anything).

With this file, that import says what happened (a warning) and loads the package inside
the clone in its place. Imported under any other name (pytest imports it as the clone's
folder name), it does nothing. tests/test_doc_commands.py checks both.
"""
if __name__ == "minisparse":
    import os as _os
    import warnings as _warnings

    _clone = _os.path.dirname(_os.path.abspath(__file__))
    _warnings.warn(
        f"'import minisparse' found the repository folder {_clone} before the installed package "
        f"(a script or interpreter started in {_os.path.dirname(_clone)}, the folder that holds the "
        f"clone, puts that folder first on sys.path); using the package inside it, {_clone}"
        f"{_os.sep}minisparse. To import the installed package, run from another folder, or clone "
        "under another name (git clone <url> minisparse-repo).", stacklevel=2)
    __path__ = [_os.path.join(_clone, "minisparse")]             # submodules: minisparse/*.py
    __file__ = _os.path.join(__path__[0], "__init__.py")
    with open(__file__, encoding="utf-8") as _f:
        exec(compile(_f.read(), __file__, "exec"))                # the package's own __init__
