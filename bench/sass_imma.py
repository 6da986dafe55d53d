"""decode_imma's kernel compiled for sm_90 without a GPU: registers, spills, SASS instruction counts.

Triton's wheel carries ptxas and cuobjdump, so a build for ``GPUTarget("cuda", 90, 32)`` needs
no device. Each variant is a comma-separated list of the kernel's constexprs over the defaults
(4-bit both sides, key groups of 64, one tile per loop step, 3 shared-memory stages, no L2
prefetch)::

    python bench/sass_imma.py bits=4,L2AHEAD=1 bits=8 bits=8,GK=32,STEP=1 --out /tmp/sass

prints registers, stack and SASS instruction count per variant and, with ``--out``, writes each
variant's SASS and its opcode sequence (``.ops``, one per line: two builds with equal ``.ops``
issue the same instructions, whatever the registers and parameter offsets). ``bits`` sets KBITS
and VBITS; ``maxnreg`` caps registers. The lent GPUs run Triton 3.6, whose code generation
differs from later releases: build with it, e.g. ``python -m venv --system-site-packages
/tmp/t36 && /tmp/t36/bin/pip install --no-deps triton==3.6.0``, then ``/tmp/t36/bin/python
bench/sass_imma.py ...``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lmcache.backends.torch.triton import decode_imma  # noqa: E402

POINTERS = {"kc_ptr": "*i32", "vc_ptr": "*i32", "vs_ptr": "*fp16", "vl_ptr": "*fp16", "o_ptr": "*fp32",
            "m_ptr": "*fp32", "l_ptr": "*fp32", "tbl_ptr": "*i32", "len_ptr": "*i32", "q_ptr": "*fp16",
            "ks_ptr": "*fp16", "kl_ptr": "*fp16", "qscale": "fp32"}
# integer arguments that are not multiples of 16 in general (the strides are, as the cache allocates them)
ANY_INT = {"T", "QOFF", "tiles_per_split", "tail_at", "small", "split_base", "Hkv", "M", "L"}
DEFAULTS = dict(KBITS=4, VBITS=4, GK=64, PAGED=False, PAGE=32, SCONTIG=True, STEP=1, L2AHEAD=0, STAGES=3,
                SPLITS_FAST=False)


def compile_variant(const: dict, maxnreg: int | None = None):
    """The compiled ``decode_imma._decode_kernel`` for sm_90 with constexprs ``const`` (one warp, as launched)."""
    fn = decode_imma._decode_kernel
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: POINTERS.get(n, "constexpr" if n in const else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] not in ("constexpr", "fp32") and n not in ANY_INT}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    options = dict(num_warps=1, num_stages=1, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(cubin: bytes, tmp: str) -> tuple[str, str]:
    """(SASS text, resource usage) of a cubin, by the cuobjdump in Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(tmp, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([tool, "-sass", tmp], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "--dump-resource-usage", tmp], capture_output=True, text=True, check=True).stdout
    return sass, res


def opcodes(sass: str) -> list[str]:
    """The instruction names of a SASS listing, in order (predicates and operands dropped)."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops.append(m.group(2))
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=[""], help="e.g. bits=8,STEP=1 (constexprs over the defaults)")
    ap.add_argument("--out", help="folder for each variant's .sass and .ops")
    args = ap.parse_args()
    for spec in args.variants:
        pairs = dict(kv.split("=") for kv in spec.split(",") if kv)
        const = dict(DEFAULTS)
        maxnreg = int(pairs.pop("maxnreg")) if "maxnreg" in pairs else None
        if "bits" in pairs:
            const["KBITS"] = const["VBITS"] = int(pairs.pop("bits"))
        unknown = set(pairs) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown constexprs {sorted(unknown)}: accepted bits, maxnreg, {', '.join(DEFAULTS)}")
        # flags as the launch passes them (bools), numbers as ints
        const.update({k: bool(int(v)) if isinstance(DEFAULTS[k], bool) else int(v) for k, v in pairs.items()})
        tag = "_".join(f"{k}{int(v)}" for k, v in sorted(const.items())) + (f"_maxnreg{maxnreg}" if maxnreg else "")
        sass, res = sass_of(compile_variant(const, maxnreg).asm["cubin"], f"/tmp/sass_imma_{os.getpid()}.cubin")
        ops = opcodes(sass)
        field = {k: re.search(rf"{k}:(\d+)", res).group(1) for k in ("REG", "STACK", "LOCAL")}
        print(f"{spec or 'defaults':<40} registers {field['REG']:>3}  stack {field['STACK']:>4}  "
              f"local {field['LOCAL']:>4}  instructions {len(ops)}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, tag + ".sass"), "w") as f:
                f.write(sass)
            with open(os.path.join(args.out, tag + ".ops"), "w") as f:
                f.write("\n".join(ops) + "\n")


if __name__ == "__main__":
    main()
