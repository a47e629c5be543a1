"""bench/decode_gpu.py without a GPU: the rungs its --rung-sweep times name real GraphDecoder
settings (a typo would only show on the H200, after the model is built), and the script
refuses cleanly without CuPy."""
import pytest
from helpers import load_bench

from minisparse.kernels import decode_cuda as dc


def _script():
    return load_bench("decode_gpu")


VALID = {  # each GraphDecoder attribute a rung may set, and what _issue_step accepts for it
    "select_kernel": lambda v: v in dc.SELECT_KERNELS,
    "list_kernel": lambda v: v in dc.LIST_KERNELS,
    "down_kernel": lambda v: v in dc.DOWN_KERNELS,
    "qkv_u": lambda v: v is None or v in dc.GEMV_US,
    "gemv_u": lambda v: v in dc.GEMV_US,
    "head_kernel": lambda v: v in dc.HEAD_KERNELS,
    "attn_kernel": lambda v: v in dc.ATTN_KERNELS,
    "down_blocks_per_sm": lambda v: v is None or v > 0,
}


def test_rungs_name_real_settings_and_start_with_the_default():
    rungs = _script().RUNGS
    assert list(rungs) == ["dense", "skip", "given"]          # dense first: the others' x dense needs it
    for mode, rs in rungs.items():
        assert rs[0] == {}, f"{mode}: the first rung is the baseline of its mode, the defaults"
        assert len({tuple(sorted(r.items())) for r in rs}) == len(rs), f"{mode}: a rung twice"
        for r in rs:
            for name, value in r.items():
                assert name in VALID, f"{mode}: {name!r} is not a decoder setting"
                assert VALID[name](value), f"{mode}: {name}={value!r} is refused by the decoder"


def test_defaults_are_valid_settings():
    assert VALID["select_kernel"](dc.SELECT_KERNEL) and VALID["down_kernel"](dc.DOWN_KERNEL)
    assert VALID["qkv_u"](dc.QKV_U) and VALID["gemv_u"](dc.GEMV_U)
    assert VALID["attn_kernel"](dc.ATTN_KERNEL)


def test_table_gives_x_dense_to_three_decimals(capsys):
    """The targets are ratios like 1.7x: a row at 1.6956x must not print as 1.70x."""
    row = dict(row="minisparse skip [graph]", tokens_per_s=463.4, s_per_token=2.158e-3, floor_frac=1.562,
               own_floor_frac=0.819, x_dense=3.659 / 2.158, x_hf_eager=float("nan"))
    _script().print_table([row], "title")
    out = capsys.readouterr().out
    assert "1.696x" in out and "1.70x" not in out, out


def test_refuses_without_cupy(capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    assert _script().main(["--sweep-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CuPy" in err and len(err.strip().splitlines()) == 1
