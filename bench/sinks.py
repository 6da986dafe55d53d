"""Attention sinks of SmolLM2-135M at the start of a text, and how many tokens ``fp_sinks`` must keep exact.

For each text the accuracy benchmark does not evaluate (the held-out ranking text and the 8
unseen windows of ``bench/accuracy.py``) and, for reference, the evaluated and calibration
texts: the mean attention the first 8 tokens receive (over layers, query heads and the queries
after the first 128 tokens) and how many of the 270 query heads give tokens 1 to 3 more than
10% of their attention (a sink that ``fp_sinks=1`` leaves quantized). Then, on the held-out text
and the windows only, the KL to full precision of the uniform rows at ``fp_sinks`` 1 and 4
(rotate=True, float16 K/V). This is the measurement ``bench/accuracy.py`` chose ``fp_sinks=4``
on. Writes ``bench/results/sinks-cpu-<cpu>.json``. Run: ``python bench/sinks.py`` (about 6
minutes on two CPU cores).
"""

from __future__ import annotations

import os
import sys
import time

import accuracy as acc
from _common import cpu_name, write_results

FIRST = 8  # tokens whose attention is reported
SPLIT = 0.1  # a head gives tokens 1..3 more than this share of its attention: a sink fp_sinks=1 misses
ROWS = {"4-bit": {"bits": 4}, "K4 V2": {"kv_bits": (4, 2)}, "2-bit g32": {"bits": 2, "group_size": 32}}


def first_token_attention(model, ids) -> tuple[list[float], int]:
    """Mean attention to each of the first ``FIRST`` tokens and the count of heads that split the sink.

    ``ids``: ``[1, T]`` with T > 128; attention is recomputed in full precision from the
    captured post-RoPE queries and keys, causal, for the queries after the first 128 tokens.
    """
    import torch

    from lmcache.integrations import hf

    t = ids.shape[1]
    mask = torch.triu(torch.full((t, t), float("-inf")), 1)
    mass = []
    for layer in hf.capture(model, ids, chunk_size=t):
        k, q = layer["keys"][0], layer["queries"][0]  # [kv_heads, T, d], [q_heads, T, d]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + mask, -1)[:, 128:]
        mass.append(att.mean(1)[:, :FIRST])  # [q_heads, FIRST]
    m = torch.stack(mass)  # [layers, q_heads, FIRST]
    return m.mean((0, 1)).tolist(), int((m[:, :, 1:4] > SPLIT).any(-1).sum())


def main() -> int:
    import torch

    from lmcache.commands.calibrate import kl_and_nll, pydoc_tokens, reference_logprobs
    from lmcache.integrations import hf

    model, tok = hf.load_model(cache_dir=os.path.join(os.path.expanduser("~"), ".cache", "lmcache"))
    w = 2048  # the evaluated text's length and the windows', as bench/accuracy.py runs them
    cal, val, wins = acc.calibration_texts(tok, w, 8, w)
    texts = {"held-out": val} | {f"window {i}": t for i, t in enumerate(wins)}
    reference_only = {"evaluated": pydoc_tokens(tok, w, "eval", eval_tokens=w), "calibration": cal}
    res = {"meta": {"benchmark": "sinks", "device": cpu_name(), "model": "SmolLM2-135M-Instruct",
                    "texts": "pydoc_data.topics as in bench/accuracy.py: the held-out ranking text (8192 tokens) "
                             "and the 8 unseen windows of 2048 tokens; evaluated and calibration texts for the "
                             "attention figures only",
                    "attention": f"mean over layers, query heads and queries after the first 128 of the first "
                                 f"384 tokens; split_heads: query heads giving tokens 1-3 more than {SPLIT:g} of "
                                 f"their attention (of 270)",
                    "kl": "mean KL (nats per token) to full precision, chunks of 128, rotate=True, float16 K/V",
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "attention": {}, "kl": {}}
    print(f"{'text':12s} {'split heads':>11s}  attention to tokens 0..{FIRST - 1}")
    for name, t in (reference_only | texts).items():
        att, split = first_token_attention(model, torch.tensor([t[:384]]))
        res["attention"][name] = {"first_tokens": att, "split_heads": split}
        print(f"{name:12s} {split:11d}  " + " ".join(f"{a:.3f}" for a in att), flush=True)
    head = "  ".join(f"{r} s{s}".rjust(12) for r in ROWS for s in (1, 4))
    print(f"\nKL to full precision, millinats per token\n{'text':12s} {head}")
    for name, t in texts.items():
        ids = torch.tensor([t])
        ref = reference_logprobs(model, ids, chunk=128)
        res["kl"][name] = {}
        for r, st in ROWS.items():
            for s in (1, 4):
                cache = acc.lmcache_cache(dict(st, rotate=True, fp_sinks=s), model.config)
                res["kl"][name][f"{r} fp_sinks={s}"] = kl_and_nll(model, ids, cache, ref)[0]
        print(f"{name:12s} " + "  ".join(f"{1e3 * v:12.3f}" for v in res["kl"][name].values()), flush=True)
    wins = [k for k in res["kl"] if k.startswith("window")]
    res["mean_kl_over_windows"] = {c: sum(res["kl"][k][c] for k in wins) / len(wins) for c in res["kl"][wins[0]]}
    print(f"{'window mean':12s} " + "  ".join(f"{1e3 * v:12.3f}" for v in res["mean_kl_over_windows"].values()))
    write_results(os.path.join(acc.ROOT, "bench", "results"), "sinks-cpu", acc.slug(cpu_name()), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
