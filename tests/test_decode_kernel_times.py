"""bench/decode_kernel_times.py without a GPU: its reading of ncu's CSV and its refusal
without ncu (the timings themselves need an H200 and Nsight Compute)."""
import pytest
from helpers import load_bench


def _script():
    return load_bench("decode_kernel_times")


HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n')


def row(i, name, unit, value, metric="gpu__time_duration.sum"):
    return (f'"{i}","1","python3","h","{name}","1","7","(256, 1, 1)","(8, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{metric}","{unit}","{value}"\n')


def test_parse_reads_names_units_and_thousands():
    m = _script()
    text = ("==PROF== Connected to process\nsome output before the table\n" + HEAD
            + row(0, "void ffn_gate_block<unsigned short, (int)8>(const unsigned short *, int)", "nsecond", "38,250")
            + row(1, "attn_decode_split", "usecond", "6.5")
            + row(2, "gemv_warp_vec16<unsigned short, (int)1, (int)8>(const unsigned short *)", "msecond", "0.011")
            + row(3, "attn_decode_split", "nsecond", "1", metric="sm__cycles_elapsed.avg"))
    got = m.parse(text)
    assert [n for n, _ in got] == ["ffn_gate_block", "attn_decode_split", "gemv_warp_vec16"]
    assert got[0][1] == pytest.approx(38.25e-6) and got[1][1] == pytest.approx(6.5e-6)
    assert got[2][1] == pytest.approx(11e-6)


def test_parse_refuses_what_it_cannot_read():
    m = _script()
    with pytest.raises(RuntimeError, match="no CSV table"):
        m.parse("==ERROR== the application returned an error\n")
    with pytest.raises(RuntimeError, match="furlong"):
        m.parse(HEAD + row(0, "embed", "furlong", "3"))


def test_without_ncu_one_error_line(tmp_path, capsys):
    m = _script()
    assert m.main(["--ncu", str(tmp_path / "no-ncu-here"), "--json", str(tmp_path / "x.json")]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and "--ncu" in out[0]
    assert not (tmp_path / "x.json").exists()
