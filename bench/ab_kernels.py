"""The decode kernels of an earlier revision against the working tree's, in one process (GPU).

Launch settings and card-to-card differences move a kernel's time by 10-20% between lent
machines, so a change is judged against the previous kernel on the same data in the same
run, interleaved. Write the earlier kernel file next to the current one first:

    python bench/ab_kernels.py --setup HEAD                  # decode_attention.py at HEAD
    python bench/ab_kernels.py --setup HEAD --kernel imma    # decode_imma.py and ptx.py at HEAD
    python bench/ab_kernels.py --setup old.py --kernel imma  # or from a file
    python bench/ab_kernels.py [--kernel imma]               # on the GPU; JSON to $OUT or bench/results
    AB_GRID4="1,0,128,3,0;2,1,64,0,0,0" python bench/ab_kernels.py --kernel imma  # settings to try, per width

The copies (``_old_<kernel file>``, untracked) are not part of the package. Batch 16 x 40 heads
x 128, 32K tokens, one query token; 4 rounds, the minimum of the per-round medians.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = "lmcache/backends/torch/triton"
FILES = {"rows": "decode_attention.py", "imma": "decode_imma.py"}


def setup(rev: str, kernel: str) -> None:
    """Write ``_old_<file>`` from git revision ``rev``, or from the file at path ``rev``. The old
    decode_imma gets the inline PTX of ``ptx.py`` at ``rev`` too (``_old_ptx.py``; from a file
    ``rev``, the working tree's), so a change there is compared as well (on the GPU: under
    ``--smoke`` the interpreter emulates only the asm strings of the working tree's ``ptx``)."""
    _write_old(FILES[kernel], rev)
    if kernel == "imma" and not os.path.isfile(rev):
        _write_old("ptx.py", rev)
        out = os.path.join(HERE, "..", PKG, "_old_" + FILES[kernel])
        with open(out) as f:
            src = f.read()
        imports = "from . import capability, ptx\n"
        if imports not in src:
            raise SystemExit(f"{out}: no {imports.strip()!r} to point at _old_ptx")
        with open(out, "w") as f:
            f.write(src.replace(imports, "from . import _old_ptx as ptx\nfrom . import capability\n"))


def _write_old(name: str, rev: str) -> None:
    """``_old_<name>`` beside ``<name>`` in the kernel package, from git revision (or file) ``rev``."""
    path = f"{PKG}/{name}"
    if os.path.isfile(rev):
        with open(rev) as f:
            src = f.read()
    else:
        src = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True,
                             cwd=os.path.join(HERE, "..")).stdout
    out = os.path.join(HERE, "..", PKG, "_old_" + name)
    with open(out, "w") as f:
        f.write(f"# {path} at {rev}, for bench/ab_kernels.py; not part of the package\n" + src)
    print(f"wrote {os.path.normpath(out)}")


def configs_rows(bits: int) -> dict:
    """Row kernels, old and new: name -> (decode function, its CONFIG, settings, setup before timing)."""
    from lmcache.backends.torch.triton import _old_decode_attention as old
    from lmcache.backends.torch.triton import decode_attention as new

    key = "qrows" if bits == 4 else "qrows8"
    grid = {4: [(1, 16, False, 2), (1, 8, True, 1)], 8: [(4, 32, True, 1), (2, 32, True, 1)]}[bits]
    cfgs = {}
    for mod, name in ((old, "old"), (new, "new")):
        cfgs[f"{name} default"] = (mod.decode_attention, mod.CONFIG, {"imma": False}, lambda: None)
        for nw, bn, pf, st in grid:
            c = {key: {"num_warps": nw, "block_n": bn, "prefetch": pf, "num_stages": st, "mma": False}, "imma": False}
            cfgs[f"{name} w{nw} bn{bn} prefetch={pf}"] = (mod.decode_attention, mod.CONFIG, c, lambda: None)
    return cfgs


def configs_imma(bits: int) -> dict:
    """decode_imma of an earlier revision (``_old_decode_imma``, if written) against the working
    tree's kernel at several settings: tiles per loop step (``CONFIG["imma_step"]``), the L2 bulk
    prefetch (``imma_l2_ahead``), shared-memory stages (``imma_stages``), programs per SM."""
    import types

    import lmcache.backends.torch.triton as pkg
    from lmcache.backends.torch.triton import decode_attention as da

    new = importlib.import_module(f"{pkg.__name__}.decode_imma")  # the module, whichever is swapped in

    def c(step=None, l2=0, pps=None, stages=None, maxnreg=0, raw=1):  # None: the default
        return {"imma": True, "imma_l2_ahead": {**da.CONFIG["imma_l2_ahead"], bits: l2}, "imma_scales_query": raw > 0,
                "imma_step": {**da.CONFIG["imma_step"], bits: step or da.CONFIG["imma_step"][bits]},
                "imma_stages": {**da.CONFIG["imma_stages"], bits: da.CONFIG["imma_stages"][bits] if stages is None
                                else stages},
                "imma_maxnreg": {**da.CONFIG["imma_maxnreg"], bits: maxnreg}, "imma_tune": {},
                "programs_per_sm": pps or da.CONFIG["programs_per_sm"]}

    def swap(mod):
        # decode_attention imports decode_imma from the package at each call: swap the module in
        return lambda: setattr(pkg, "decode_imma", mod)

    cfgs = {}
    try:
        from lmcache.backends.torch.triton import _old_decode_imma as old
    except ImportError:
        pass
    else:
        # decode_attention passes the segment (16 arguments through the block table), then the
        # step and l2_ahead: the old launch gets those it takes, by position
        n = len(inspect.signature(old.launch).parameters)

        def old_launch(*a):
            return old.launch(*a[:n])

        shim = types.SimpleNamespace(supported=old.supported, launch=old_launch)
        # an old kernel without ``qscale`` takes the query scaled (float32)
        raw = int("qscale" in inspect.signature(old.launch).parameters)
        cfgs["old"] = (da.decode_attention, da.CONFIG, c(raw=raw), swap(shim))
    # (tiles per step, L2 prefetch steps ahead, programs per SM, shared-memory stages, register cap[,
    # 0: the query scaled by torch first, not in the kernel])
    grid = [(1, 0, 128, 3 if bits == 4 else 2, 0), (2, 1 if bits == 4 else 0, 64, 0, 0), (1, 0, 128, 2, 0),
            (1, 0, 96, 4, 0), (1, 0, 128, 3, 128)]
    if os.environ.get(f"AB_GRID{bits}"):  # e.g. AB_GRID4="2,0,64,3,0;2,0,72,3,168"
        grid = [tuple(int(x) for x in item.split(",")) for item in os.environ[f"AB_GRID{bits}"].split(";")]
    # AB_CONFIGS="dense_min_tiles=2;rows.num_warps=1,rows.block_n=64": the default settings with CONFIG
    # entries (or one key of a nested entry) changed
    for item in filter(None, os.environ.get("AB_CONFIGS", "").split(";")):
        extra = {}
        for k, v in (kv.split("=") for kv in re.split(r",(?![^\[]*\])", item)):  # no split inside [..]
            if "." in k:  # rows.num_warps=1: one entry of a nested setting
                top, sub = k.split(".", 1)
                sub = int(sub) if sub.isdigit() else sub  # imma_stages.4=2: the entry for 4 bits
                extra[top] = {**extra.get(top, da.CONFIG[top]), sub: json.loads(v)}
            else:
                extra[k] = json.loads(v)
        cfgs[f"new {item}"] = (da.decode_attention, da.CONFIG, {**c(), **extra}, swap(new))
    for step, l2, pps, stages, maxnreg, *raw in grid:
        tag = f" raw={raw[0]}" if raw else ""
        cfgs[f"new step={step} l2={l2} pps={pps} st={stages} reg={maxnreg}{tag}"] = (
            da.decode_attention, da.CONFIG, c(step, l2, pps, stages, maxnreg, *raw), swap(new))
    return cfgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", metavar="REV", help="write the kernel file of git revision (or file) REV and stop")
    ap.add_argument("--kernel", choices=sorted(FILES), default="rows")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.setup:
        setup(args.setup, args.kernel)
        return
    import torch

    sys.path.insert(0, HERE)
    import decode_attention as bench
    from _common import write_results

    torch.manual_seed(0)
    scale = 1 / 128 ** 0.5
    shape, dev = ((1, 2, 512, 128), "cpu") if args.smoke else ((16, 40, 32768, 128), "cuda")
    bench.DEV = dev
    k = torch.randn(*shape, dtype=torch.float16, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(*shape[:2], 1, 128, dtype=torch.float16, device=dev)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "smoke-cpu", "torch": torch.__version__,
           "kernel": args.kernel}
    for bits in (4, 8):
        segs = bench.make_cache(k, v, bits)
        cfgs = configs_imma(bits) if args.kernel == "imma" else configs_rows(bits)
        times = {n: [] for n in cfgs}
        outs = {}
        for _ in range(4):
            for n, (fn, conf, settings, before) in cfgs.items():
                before()
                saved = dict(conf)
                conf.update(settings)
                times[n].append(bench.timed(fn, q, segs, scale, warmup=2, iters=9))
                if n not in outs:
                    outs[n] = fn(q, segs, scale)
                conf.update(saved)
        first = next(iter(cfgs))  # the old kernel: every output against it
        err = {n: bench.rel_err(o, outs[first]) for n, o in outs.items()}
        res[f"{bits}-bit"] = {"rel_diff_vs_first": err, "ms": {n: min(x) for n, x in times.items()}}
        print(f"{bits}-bit (outputs against {first!r}, relative difference)")
        for n, x in times.items():
            print(f"  {n:<34} {min(x):7.3f} ms  diff {err[n]:.1e}  (rounds: {', '.join(f'{t:.3f}' for t in x)})")
        del segs
    res["builds"] = builds()
    for b in res["builds"]:
        print(f"  build {b}")
    write_results(args.out, f"{FILES[args.kernel][:-3]}-ab", res["device"], res)


def builds() -> list:
    """Registers, spills and shared memory of every compiled decode kernel of this process."""
    import triton

    import lmcache.backends.torch.triton as pkg

    out = []
    for mod in filter(None, (getattr(pkg, n, None) for n in ("decode_attention", "decode_imma"))):
        for name, fn in vars(mod).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for k in caches[0].values():
                    out.append({"kernel": name, "registers": getattr(k, "n_regs", None),
                                "spills": getattr(k, "n_spills", None),
                                "shared": getattr(getattr(k, "metadata", None), "shared", None)})
    return out


if __name__ == "__main__":
    main()
