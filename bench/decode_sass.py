"""How many of its weight loads a decode kernel really has in flight: read from the machine
code, no GPU needed.

A warp-per-row GEMV round is written to issue U sixteen-byte weight loads per row and only
then multiply; ptxas may instead issue a few and put the rest one at a time between the
multiply-adds (each then waits for the one before it), which the register count alone does
not show. This script compiles the decode module (``decode_cuda.cuda_source()``) with the
decoder's flags for sm_90, disassembles it (``cuobjdump -sass``) and prints per kernel: the
registers, the weight loads (``LDG.E.128.CONSTANT``: the ``ld.global.nc`` of ``ld16raw``)
issued before the programmatic wait (``ACQBULK``) and before the first multiply-add
(``FFMA``). Round 10's table in ``bench/README.md`` came from this count.

    python bench/decode_sass.py [--dtype float16] [--kernels ffn_gate,qkv_rope] [--json PATH]

Needs nvcc (the CUDA toolkit), cuobjdump (on the PATH, or the PyPI wheel
``nvidia-cuda-cuobjdump``, found in site-packages) and c++filt (binutils).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

CTYPE = {"float16": "unsigned short", "float32": "float"}


def find_tool(name: str) -> str | None:
    """``name`` on the PATH, or in an installed NVIDIA wheel (site-packages/nvidia/*/bin)."""
    path = shutil.which(name)
    if path:
        return path
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for cand in sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name))):
            if os.access(cand, os.X_OK):
                return cand
    return None


def parse_sass(text: str) -> dict:
    """{mangled name: {"loads_before_wait", "loads_before_fma", "weight_loads"}} from
    ``cuobjdump -sass`` output. Counts run in program order from the function's start:
    ``loads_before_fma``: the weight loads issued before the first FFMA that follows one (a
    multiply-add before any weight load, such as x's sum of squares, does not count);
    ``loads_before_wait``: at the last ACQBULK before that FFMA (None: no wait there)."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", "\n" + text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        loads, before_wait, before_fma = 0, None, None
        for line in chunk.splitlines():
            m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if not m:
                continue
            op = m.group(1)
            if op.startswith("LDG.E.") and op.endswith(".128.CONSTANT"):
                loads += 1
            elif op == "ACQBULK" and before_fma is None:     # the last wait before the first FFMA (a dead
                before_wait = loads                          # warp's early wait may come first)
            elif op.startswith("FFMA") and before_fma is None and loads:   # (FFMAs before any weight
                before_fma = loads                                         # load: x's sum of squares)
        out[name] = dict(loads_before_wait=before_wait, loads_before_fma=before_fma, weight_loads=loads)
    return out


def parse_registers(ptxas_log: str) -> dict:
    """{mangled name: registers} from ``nvcc -Xptxas -v`` output."""
    regs, current = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            regs[current] = int(m.group(1))
            current = None
    return regs


def demangle(names, cxxfilt: str) -> dict:
    """{mangled: 'kernel<args>'} (the demangled name without its parameter list)."""
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    out = {}
    for mangled, plain in zip(names, res.stdout.splitlines()):
        plain = plain.strip()
        plain = plain[len("void "):] if plain.startswith("void ") else plain
        depth, cut = 0, len(plain)
        for i, ch in enumerate(plain):                     # drop "(...)" after the template arguments
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        out[mangled] = plain[:cut]
    return out


def template_args(expr: str) -> tuple:
    """('ffn_gate_block', ('unsigned short', '8', 'false')) from 'ffn_gate_block<unsigned short, 8, false>'."""
    if "<" not in expr:
        return expr.strip(), ()
    base, rest = expr.split("<", 1)
    return base.strip(), tuple(a.strip() for a in rest[:rest.rindex(">")].split(","))


def match_keys(names: dict, plain: dict) -> dict:
    """{kernel key: mangled name}. A name expression may leave template arguments at their
    defaults, which the demangled name spells out, so an expression matches the compiled
    kernel whose arguments it begins with: exact matches first, then the longest expressions
    first, each compiled kernel taken once (block8 <W, 8> after block8b <W, 8, false, true>)."""
    compiled = {m: template_args(p) for m, p in plain.items()}
    out, taken = {}, set()
    wanted = sorted(names, key=lambda k: -len(template_args(names[k])[1]))
    for exact in (True, False):
        for key in wanted:
            if key in out:
                continue
            base, args = template_args(names[key])
            hits = [m for m, (b, a) in compiled.items() if m not in taken and b == base
                    and (a == args if exact else a[:len(args)] == args)]
            if len(hits) == 1:
                out[key] = hits[0]
                taken.add(hits[0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=sorted(CTYPE), default="float16", help="weight dtype (default float16)")
    ap.add_argument("--kernels", default="", help="comma-separated substrings of kernel keys (default: all)")
    ap.add_argument("--early", type=int, choices=(0, 1), default=1, help="EARLY, as the decoder's early_loads")
    ap.add_argument("--prefetch", type=int, default=512, help="PF_BYTES, as the decoder's prefetch_bytes")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--json", default=None, help="default bench/results/decode_sass_<dtype>.json")
    args = ap.parse_args(argv)
    tools = {t: find_tool(t) for t in ("nvcc", "cuobjdump", "c++filt")}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        print(f"error: {', '.join(missing)} not found: this script needs the CUDA toolkit's nvcc, cuobjdump "
              "(or `pip install nvidia-cuda-cuobjdump`) and binutils' c++filt", file=sys.stderr)
        return 2
    from minisparse.kernels import decode_cuda as dc
    m = re.fullmatch(r"sm_(\d+)a?", args.arch)
    if not m:
        print(f"error: --arch must look like sm_90 or sm_90a, got {args.arch!r}", file=sys.stderr)
        return 2
    names = dc.kernel_names(CTYPE[args.dtype], int(m.group(1)))
    want = [w for w in args.kernels.split(",") if w]
    names = {k: v for k, v in names.items() if not want or any(w in k for w in want)}
    if not names:
        print(f"error: no kernel key contains any of {want}; keys: {sorted(dc.kernel_names('float', 90))}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "decode.cu")
        with open(src, "w") as fh:
            fh.write(dc.cuda_source())
            fh.write("\nvoid* minisparse_kernels[] = {" + ", ".join(f"(void*)&{v}" for v in names.values()) + "};\n")
        cubin = os.path.join(tmp, "decode.cubin")
        cc = subprocess.run([tools["nvcc"], f"-arch={args.arch}", "-std=c++17", f"-DEARLY={args.early}",
                             f"-DPF_BYTES={args.prefetch}", "-Xptxas", "-v", "-cubin", src, "-o", cubin],
                            capture_output=True, text=True)
        if cc.returncode:
            print(f"error: nvcc failed: {cc.stderr.strip().splitlines()[-1] if cc.stderr.strip() else cc.returncode}",
                  file=sys.stderr)
            return 1
        dis = subprocess.run([tools["cuobjdump"], "-sass", cubin], capture_output=True, text=True)
        if dis.returncode:
            print(f"error: cuobjdump failed ({dis.returncode}): {dis.stderr.strip()[-300:]}", file=sys.stderr)
            return 1
        sass = dis.stdout
    counts, regs = parse_sass(sass), parse_registers(cc.stderr)
    plain = demangle(sorted(counts), tools["c++filt"])
    rows = []
    for key, mangled in match_keys(names, plain).items():
        rows.append(dict(key=key, kernel=names[key], registers=regs.get(mangled), **counts[mangled]))
    rows.sort(key=lambda r: r["key"])
    print(f"decode kernels, {args.dtype} weights, nvcc {args.arch}, EARLY={args.early}, PF_BYTES={args.prefetch}: "
          "16-byte weight loads issued before the programmatic wait and before the first multiply-add")
    print(f"{'key':<28} {'registers':>9} {'before wait':>11} {'before FFMA':>11} {'weight loads':>12}")
    for r in rows:
        bw = "" if r["loads_before_wait"] is None else r["loads_before_wait"]
        bf = "" if r["loads_before_fma"] is None else r["loads_before_fma"]
        print(f"{r['key']:<28} {r['registers'] or '':>9} {bw:>11} {bf:>11} {r['weight_loads']:>12}")
    path = args.json or os.path.join(HERE, "results", f"decode_sass_{args.dtype}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(dict(dtype=args.dtype, arch=args.arch, early=args.early, prefetch=args.prefetch,
                       nvcc=subprocess.run([tools["nvcc"], "--version"], capture_output=True, text=True).stdout
                       .strip().splitlines()[-1], kernels=rows), fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
