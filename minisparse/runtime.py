"""Process tuning: the settings outside the library's own code that decide its speed.

The same NumPy / Numba code runs 1.5-6x slower or faster depending on process settings a
user does not know to make (issue 14). minisparse makes safe default choices itself, says
which in :func:`describe`, and lets every explicit setting win:

=======================  ==========================================================  ==========================
setting                  default choice (why)                                         an explicit choice that wins
=======================  ==========================================================  ==========================
OpenBLAS idle threads    ``OPENBLAS_THREAD_TIMEOUT=4`` at ``import minisparse`` (if    the variable set in the
                         NumPy is loaded already, OpenBLAS re-reads it and restarts    environment
                         its pool): idle BLAS workers otherwise
                         busy-wait ~0.1 s after every call and hold the cores the
                         Numba kernels need next (numba skip after a BLAS call
                         21.8 -> 9.6 ms, 2-core AMD EPYC, bench/README.md)
Numba's thread count     the cores the load average says are free, at first use of     ``NUMBA_NUM_THREADS``
                         the numba backend (:func:`auto_threads`; all cores on an      (or ``numba.set_num_threads``
                         idle machine)                                                 afterwards)
Numba's OpenMP threads   started with ``OMP_WAIT_POLICY=PASSIVE`` (set only while      ``OMP_WAIT_POLICY`` or
                         Numba launches its thread pool, then removed again, so        ``NUMBA_THREADING_LAYER``
                         torch or other OpenMP users are unaffected): idle workers     in the environment
                         sleep instead of spinning against BLAS between FFNs
BLAS threads             unchanged for inference; :func:`configure_training` (called   ``OPENBLAS_NUM_THREADS`` /
                         by :func:`minisparse.train.train`) sets the cores the load    ``OMP_NUM_THREADS`` /
                         average says are free (:func:`auto_threads`): on a busy       ``MKL_NUM_THREADS``, or an
                         machine 2 BLAS threads that wait for each other make a        earlier
                         step several times slower                                     :func:`set_blas_threads`
glibc malloc             :func:`keep_freed_memory` in training: freed blocks kept      ``MINISPARSE_DEFAULT_MALLOC=1``
                         for reuse (page faults were ~30% of a step)
=======================  ==========================================================  ==========================

``MINISPARSE_DEFAULT_RUNTIME=1`` turns every default choice here off.

This module imports nothing heavy at import time (it runs before NumPy is loaded).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, Optional

_OFF = "MINISPARSE_DEFAULT_RUNTIME"
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
_DECISIONS: Dict[str, str] = {}
_EXPLICIT_BLAS_THREADS: Optional[int] = None
_TRAIN_WORKERS = 1              # threads a training step splits its batch rows over (configure_training)
_EXPLICIT_TRAIN_WORKERS: Optional[int] = None   # set_training_threads
_MALLOC_TUNED = False


def _off() -> bool:
    return bool(os.environ.get(_OFF))


# ======================================================================================
# at import (before NumPy loads)
# ======================================================================================
def configure_import() -> None:
    """Called by ``import minisparse`` first thing: the OpenBLAS idle-thread timeout.

    OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` once, when NumPy loads it. If NumPy is
    already loaded, nothing can be done from here (the decision says so).
    """
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        _DECISIONS["openblas_thread_timeout"] = f"{os.environ['OPENBLAS_THREAD_TIMEOUT']} (set by you)"
    elif _off():
        _DECISIONS["openblas_thread_timeout"] = f"OpenBLAS default ({_OFF} set)"
    elif "numpy" in sys.modules:
        # OpenBLAS is loaded and has read its environment: set the variable, ask OpenBLAS to
        # read it again and stop its thread pool; the next threaded call starts a new pool
        # with the short timeout (both are exported C functions of OpenBLAS)
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
        done = _openblas_call("openblas_read_env") and _openblas_call("blas_thread_shutdown_")
        _DECISIONS["openblas_thread_timeout"] = ("4 (minisparse default; OpenBLAS re-read it)" if done else
                                                 "OpenBLAS default: NumPy was imported before minisparse and its "
                                                 "BLAS could not re-read OPENBLAS_THREAD_TIMEOUT")
    else:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
        _DECISIONS["openblas_thread_timeout"] = "4 (minisparse default)"


def _openblas_libs():
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return []


def _openblas_call(name: str) -> bool:
    """Call ``void name(void)`` in every loaded OpenBLAS that exports it; True if any did."""
    import ctypes
    done = False
    for path in _openblas_libs():
        try:
            fn = getattr(ctypes.CDLL(path), name, None)
        except OSError:
            continue
        if fn is not None:
            fn.restype = None
            fn()
            done = True
    return done


# ======================================================================================
# Numba's thread pool
# ======================================================================================
def configure_numba() -> None:
    """Start Numba's thread pool with passive OpenMP waiting (once; called by the numba
    backend when it loads). ``OMP_WAIT_POLICY`` is set only while the pool starts and then
    restored, so OpenMP runtimes loaded later (torch's) keep their own defaults."""
    if "numba_threads" in _DECISIONS:
        return
    _numba_thread_count()
    explicit = [v for v in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY") if v in os.environ]
    if explicit or _off():
        _DECISIONS["numba_threads"] = "Numba default" + (f" ({', '.join(explicit)} set by you)" if explicit else "")
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()                # reads the variable when libgomp loads
        import numba
        layer = numba.threading_layer()
        _DECISIONS["numba_threads"] = f"layer {layer}, OMP_WAIT_POLICY=PASSIVE while starting (minisparse default)"
    except Exception as e:  # pragma: no cover - a numba without this private helper
        _DECISIONS["numba_threads"] = f"Numba default (could not pre-start its threads: {e})"
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def _numba_thread_count() -> None:
    """Numba's thread count: the cores the load average says are free (its default is all
    cores; on a busy 2-core machine two threads that wait for descheduled partners made
    neuron skipping 2.0x faster than dense instead of 2.35x with one, bench/README.md)."""
    import numba
    if "NUMBA_NUM_THREADS" in os.environ or _off():
        _DECISIONS["numba_thread_count"] = f"{numba.get_num_threads()} (Numba default" + (
            ", NUMBA_NUM_THREADS set by you)" if "NUMBA_NUM_THREADS" in os.environ else ")")
        return
    n = min(auto_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    _DECISIONS["numba_thread_count"] = f"{n} (free cores by load average at first use; minisparse default)"


# ======================================================================================
# BLAS threads
# ======================================================================================
_BLAS_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")


def set_blas_threads(n: int) -> bool:
    """Set the number of threads of the BLAS that NumPy loaded (an explicit choice: later
    defaults of :func:`configure_training` leave it alone).

    Uses threadpoolctl when installed (the ecosystem's tool, any BLAS), else OpenBLAS's
    ``openblas_set_num_threads`` through ctypes. Returns True when a BLAS was found and
    set, False otherwise (then use ``OPENBLAS_NUM_THREADS`` before starting Python).

    Why: on a machine whose cores are busy with other work, BLAS threads wait for each
    other and a 2-thread matmul can be several times *slower* than a 1-thread one.
    """
    global _EXPLICIT_BLAS_THREADS, _EXPLICIT_TRAIN_WORKERS
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    ok = _set_blas_threads(int(n))
    _EXPLICIT_BLAS_THREADS = int(n)
    _EXPLICIT_TRAIN_WORKERS = None                 # BLAS threads chosen: training does not split the batch
    return ok


def _set_blas_threads(n: int) -> bool:
    import numpy  # noqa: F401  (its BLAS must be loaded)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _set_openblas_ctypes(n)
    threadpool_limits(limits=n, user_api="blas")
    return True


def _set_openblas_ctypes(n: int) -> bool:
    import ctypes
    done = False
    for path in _openblas_libs():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def auto_threads() -> int:
    """The cores that the load average says are free (at least 1): all of them on an idle
    machine, fewer when other processes keep some busy. A fraction of a busy core does not
    count (load 0.7 on 2 cores: 2 threads; 1.2: 1), so a quiet machine's background noise
    does not halve a 2-core machine."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return n
    return max(1, min(n, n - int(load)))


# ======================================================================================
# training
# ======================================================================================
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    Why: every NumPy operation of a training step allocates a fresh result, often tens of
    MB. By default glibc serves such blocks with ``mmap`` and unmaps them when freed, so
    the next step's allocation faults every page back in (zero-filled by the kernel): we
    measured that at ~30% of a step. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``
    (the same as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment)
    makes freed blocks reusable; the process keeps its peak memory. Process-wide, done
    once; set ``MINISPARSE_DEFAULT_MALLOC=1`` to leave the allocator alone.
    Returns True when the settings were applied (Linux with glibc), False otherwise.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("MINISPARSE_DEFAULT_MALLOC") or _off() or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):      # not glibc (musl, ...): nothing to do
        return False
    _MALLOC_TUNED = ok
    _DECISIONS["malloc"] = "glibc keeps freed memory (minisparse default in training)"
    return ok


def configure_training() -> Dict[str, str]:
    """What :func:`minisparse.train.train` applies before its first step: the allocator
    setting and, unless you chose (environment variable or :func:`set_blas_threads`), as
    many BLAS threads as the load average says are free. Returns :func:`describe`."""
    global _TRAIN_WORKERS
    keep_freed_memory()
    _TRAIN_WORKERS = 1
    explicit = [v for v in _BLAS_THREAD_VARS if v in os.environ]
    if _EXPLICIT_TRAIN_WORKERS is not None:
        _TRAIN_WORKERS = _EXPLICIT_TRAIN_WORKERS
        _DECISIONS["blas_threads"] = (f"1 in each of {_TRAIN_WORKERS} threads that split a step's batch rows "
                                      "(set_training_threads)" if _TRAIN_WORKERS > 1
                                      else f"{_EXPLICIT_BLAS_THREADS} (set_training_threads)")
    elif _EXPLICIT_BLAS_THREADS is not None:
        _DECISIONS["blas_threads"] = f"{_EXPLICIT_BLAS_THREADS} (set_blas_threads)"
    elif explicit or _off():
        _DECISIONS["blas_threads"] = "BLAS default" + (f" ({', '.join(explicit)} set by you)" if explicit else "")
    else:
        n = auto_threads()
        ok = _set_blas_threads(n)
        _DECISIONS["blas_threads"] = (f"{n} (free cores by load average; minisparse default in training)" if ok
                                      else "BLAS default (no settable BLAS found)")
        if ok and n >= 2 and _have_threadpoolctl():
            _TRAIN_WORKERS = n
            _DECISIONS["blas_threads"] = (f"1 in each of {n} threads that split a step's batch rows (free cores "
                                          f"by load average; minisparse default in training)")
    return describe()


def set_training_threads(n: int) -> bool:
    """Train with ``n`` threads (an explicit choice, as :func:`set_blas_threads`): where it
    can, a training step splits its batch rows over ``n`` threads with BLAS at one thread
    each (see :func:`training_workers`), and BLAS gets ``n`` threads elsewhere. The CLI's
    ``--threads`` calls this. Returns whether a BLAS was found and set."""
    global _EXPLICIT_TRAIN_WORKERS
    ok = set_blas_threads(n)
    _EXPLICIT_TRAIN_WORKERS = int(n) if n >= 2 and ok and _have_threadpoolctl() else 1
    return ok


def training_workers() -> int:
    """Threads a training step splits its batch rows over (1: no split), as
    :func:`configure_training` decided: the free cores when minisparse chose the BLAS
    threads itself (an explicit choice -- ``OPENBLAS_NUM_THREADS`` & co. or
    :func:`set_blas_threads` -- means 1; :func:`set_training_threads` chooses it) and
    threadpoolctl can hold BLAS at 1 thread per worker meanwhile.

    Why: NumPy runs element-wise operations on one thread, so with BLAS alone on two
    threads a step uses the second core only inside matmuls; two halves of the batch in two
    threads (NumPy and BLAS release the GIL) use both cores throughout. Measured on a
    2-core Xeon, a training step went from 0.69x / 0.72x PyTorch's (swiglu / drelu, both
    libraries on 2 threads) to 0.92-1.02x / 0.87-0.94x (bench/README.md, training
    throughput).
    """
    return _TRAIN_WORKERS


def _have_threadpoolctl() -> bool:
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def blas_threads_limited(n: int):
    """Inside the block the BLAS runs at most ``n`` threads; restored after (threadpoolctl;
    without it the block runs unchanged)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def describe() -> Dict[str, str]:
    """The process settings minisparse chose (or left alone, and why), by name."""
    return dict(_DECISIONS)


__all__ = ["auto_threads", "blas_threads_limited", "configure_import", "configure_numba", "configure_training",
           "describe", "keep_freed_memory", "set_blas_threads", "set_training_threads", "training_workers"]
