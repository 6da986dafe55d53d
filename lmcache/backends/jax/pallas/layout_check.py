"""Check that every inline-PTX operand of a Triton kernel keeps dimension 0 on the warp's lanes.

    python -m lmcache.backends.jax.pallas.layout_check KERNEL.ttgir   # or an XLA pass log

XLA writes its pass log of a Pallas kernel with
``XLA_FLAGS="--xla_dump_to=DIR --xla_dump_emitter_re=triton-to-llvm"`` (file
``*.<kernel name>.triton-to-llvm.txt``: the module before and after every pass).

The lane-explicit kernels (``pallas/decode_lanes.py``) write mma fragments and shuffles as
``elementwise_inline_asm`` on ``[32, ...]`` tensors whose row ``l`` must live in lane ``l``.
Triton picks layouts itself (its default for a ``[32, 2]`` tensor puts 16 lanes on dimension 0
and 2 on dimension 1), so a layout that splits the lanes makes the asm wrong without any error.
This reads the TTGIR (the last module before ``ConvertTritonGPUToLLVM`` when given XLA's pass
log) and lists every asm operand whose layout puts a lane on another dimension. Text only: no
framework is imported.
"""

from __future__ import annotations

import re
import sys


def final_ttgir(text: str) -> str:
    """The TTGIR in ``text``: itself, or in an MLIR pass log the module dumped before the LLVM lowering."""
    marks = [m.start() for m in re.finditer(r"// -----// IR Dump Before ConvertTritonGPUToLLVM", text)]
    if not marks:
        return text
    start = marks[-1]
    end = text.find("// -----// IR Dump", start + 10)
    return text[start:end if end > 0 else None]


def _lane_dims(enc: str, defs: dict) -> list | None:
    """The dimensions the lanes of encoding ``enc`` (a name or inline) run along, or None if unknown."""
    enc = defs.get(enc, enc).strip()
    m = re.match(r"#ttg\.blocked<\{.*?threadsPerWarp = \[([\d, ]+)\]", enc)
    if m:
        tpw = [int(x) for x in m.group(1).split(",")]
        return [d for d, n in enumerate(tpw) if n > 1]
    m = re.match(r"#ttg\.linear<\{.*?lane = \[(.*?)\], warp", enc)
    if m:
        bases = re.findall(r"\[([-\d, ]+)\]", m.group(1))
        return sorted({d for b in bases for d, x in enumerate(int(v) for v in b.split(",")) if x})
    m = re.match(r"#ttg\.slice<\{dim = (\d+), parent = (#?[\w.]+(?:<.*>)?)\}>", enc)
    if m:
        parent = _lane_dims(m.group(2), defs)
        if parent is None:
            return None
        dim = int(m.group(1))
        return [d - (d > dim) if d != dim else -1 for d in parent]  # -1: a lane on the sliced-out dim
    return None


def bad_asm_operands(ttgir: str) -> list[str]:
    """One line per inline-asm operand or result whose lanes are not all on dimension 0."""
    defs = dict(re.findall(r"^(#[\w]+) = (#ttg\.[^\n]*)$", ttgir, re.M))
    bad = []
    for line in ttgir.splitlines():
        if "tt.elementwise_inline_asm" not in line:
            continue
        sig = line.split('" : (' if '" : (' in line else "}> : (", 1)[-1]
        for enc in set(re.findall(r"tensor<[^,>]*x?[a-z0-9]+, (#[\w]+|#ttg\.slice<\{[^}]*\}>)>", sig)):
            dims = _lane_dims(enc, defs)
            if dims is None or dims != [0]:
                bad.append(f"{enc} lanes on {dims}: {line.strip()[:160]}")
    return bad


def main() -> None:
    ttgir = final_ttgir(open(sys.argv[1], errors="replace").read())
    bad = bad_asm_operands(ttgir)
    n = ttgir.count("tt.elementwise_inline_asm")
    print(f"{n} inline asm ops, {len(bad)} operands with lanes off dimension 0")
    for b in bad:
        print(" ", b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
