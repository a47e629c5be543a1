"""bench/decode_sass.py: its SASS and ptxas parsers on listings written out here, the match
of name expressions (defaults left out) to demangled kernels, the refusal without the
tools, and, where nvcc and cuobjdump exist, one real run on two kernels."""
import json

import pytest
from helpers import load_bench

SASS = """
\t\tFunction : _Z3twoILi1EEvPKf
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 ACQBULK ;
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x200] ;
        /*0040*/                   ACQBULK ;
        /*0050*/                   LDG.E.128.STRONG.SM R12, desc[UR4][R6.64] ;
        /*0060*/                   LDG.E.128.CONSTANT R16, desc[UR4][R2.64+0x400] ;
        /*0070*/                   HADD2.F32 R3, -RZ, R4.H0_H0 ;
        /*0080*/                   FFMA R20, R12, R3, RZ ;
        /*0090*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64+0x600] ;
        /*00a0*/                   FFMA R20, R13, R4, R20 ;
        /*00b0*/                   EXIT ;
\t\t..........

\t\tFunction : _Z3oneILi2EEvPKf
        /*0000*/                   ACQBULK ;
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/                   EXIT ;

\t\tFunction : _Z5smemxv
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   FFMA R9, R4, R4, RZ ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   LDG.E.128.CONSTANT R12, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.128.CONSTANT R16, desc[UR4][R2.64+0x200] ;
        /*0050*/                   LDS.128 R20, [R0] ;
        /*0060*/                   FFMA R9, R20, R12, R9 ;
"""


def _script():
    return load_bench("decode_sass")


def test_counts_loads_before_the_last_wait_and_the_first_multiply_add():
    c = _script().parse_sass(SASS)
    assert c["_Z3twoILi1EEvPKf"] == dict(loads_before_wait=2, loads_before_fma=3, weight_loads=4)
    assert c["_Z3oneILi2EEvPKf"] == dict(loads_before_wait=0, loads_before_fma=None, weight_loads=1)
    # x's sum of squares (an FFMA before any weight load) is not the round's first multiply-add
    assert c["_Z5smemxv"] == dict(loads_before_wait=None, loads_before_fma=2, weight_loads=2)


def test_registers_from_ptxas():
    log = ("ptxas info    : Compiling entry function '_Z3twoILi1EEvPKf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3twoILi1EEvPKf\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 64 registers, used 1 barriers, 1552 bytes smem\n"
           "ptxas info    : Compiling entry function '_Z3oneILi2EEvPKf' for 'sm_90'\n"
           "ptxas info    : Used 20 registers\n")
    assert _script().parse_registers(log) == {"_Z3twoILi1EEvPKf": 64, "_Z3oneILi2EEvPKf": 20}


def test_expressions_without_their_defaults_find_their_kernels():
    s = _script()
    names = {"b8": "ffn_gate_block<unsigned short, 8>", "b8b": "ffn_gate_block<unsigned short, 8, false, true>",
             "b8bf": "ffn_gate_block<unsigned short, 8, false, true, 1>", "rms": "rmsnorm"}
    plain = {"m0": "ffn_gate_block<unsigned short, 8, false, false, 0>",
             "m1": "ffn_gate_block<unsigned short, 8, false, true, 0>",
             "m2": "ffn_gate_block<unsigned short, 8, false, true, 1>", "m3": "rmsnorm",
             "m4": "ffn_gate_block<float, 8, false, false, 0>"}
    assert s.match_keys(names, plain) == {"b8": "m0", "b8b": "m1", "b8bf": "m2", "rms": "m3"}
    assert s.template_args("a<unsigned short, 4, true>") == ("a", ("unsigned short", "4", "true"))


def test_refuses_without_the_tools_in_one_error_line(monkeypatch, capsys):
    s = _script()
    monkeypatch.setattr(s, "find_tool", lambda name: None if name == "cuobjdump" else "/bin/true")
    assert s.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "cuobjdump" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, word", [(["--kernels", "no_such_kernel"], "no_such_kernel"),
                                         (["--arch", "ampere"], "--arch")])
def test_bad_arguments_are_refused(monkeypatch, capsys, argv, word):
    s = _script()
    monkeypatch.setattr(s, "find_tool", lambda name: "/bin/true")
    assert s.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and word in err and len(err.strip().splitlines()) == 1


def test_real_run_on_two_kernels(tmp_path):
    s = _script()
    if not all(s.find_tool(t) for t in ("nvcc", "cuobjdump", "c++filt")):
        pytest.skip("needs nvcc, cuobjdump and c++filt")
    out = tmp_path / "sass.json"
    assert s.main(["--kernels", "ffn_gate_pair8bf2,rmsnorm", "--json", str(out)]) == 0
    rows = {r["key"]: r for r in json.loads(out.read_text())["kernels"]}
    assert set(rows) == {"ffn_gate_pair8bf2", "rmsnorm"}
    gate = rows["ffn_gate_pair8bf2"]
    assert gate["weight_loads"] >= 8 and 1 <= gate["loads_before_fma"] <= 8 and 32 <= gate["registers"] <= 255
    assert rows["rmsnorm"]["weight_loads"] == 0
