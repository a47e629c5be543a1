"""GPU tests: the ``cp`` fixture skips (never passes) without CuPy and a CUDA device."""
import pytest


@pytest.fixture(scope="module")
def cp():
    """The cupy module, or a skip saying what is missing."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible")
    except Exception as e:  # ImportError, CUDARuntimeError
        pytest.skip(f"needs CuPy and a CUDA GPU ({type(e).__name__}: {e})")
    return cupy
