"""Evictions at the prompt's end, simulated in one forward: which scores and which eviction units pay?

The first ``--prefill`` tokens are the prompt; the rest are teacher-forced decode tokens that cannot see the
prompt tokens evicted (nothing is quantised, every decode token is kept). One masked forward gives every
decode token's logits, so a setting costs one forward instead of a token-by-token run: a cheap bound on
the eviction half of the method, not its result (docs/tuning.md round 17). Per layer, a fraction
``--keep`` of the prompt's tokens is kept (the first and the last 16 always), chosen by a score

    last<N>      the mean attention of the prompt's last N queries (the tracker's prefill evidence, N = n_q)
    last<N>max   their largest attention
    last<N>v     value-aware (VATP): their mean attention times the value's norm |v_i|
    last<N>vd    their mean of a_qi |v_i - o_q| (o_q the query's output: what evicting i moves it by, to
                 first order); ``last<N>vo`` the same through the head's slice of o_proj
    ea<N>        expected attention (kvpress's ExpectedAttentionPress, without its RoPE shift): softmax of
                 s mu.k + s^2 k'Sigma k / 2 over the keys, mu and Sigma the last N queries' mean and covariance
    oracle       the largest attention any decode query pays the token (the future, exactly)
    look<K>      lookahead: the mean attention of K pseudo queries, the model's own greedy continuation of the
                 prompt (K tokens generated over the full prompt, nothing of the text after it read; Lookahead
                 Q-Cache's idea); ``last<N>look<K>`` the N last prompt queries and the K pseudo ones together,
                 ``look<K>max`` their largest attention
    S+Fx<w>      a forecast from the tokens themselves added to score S (divided by its mean): w times
                 F = ``self2`` (the token's id occurs twice or more in the prompt), ``prev2`` (the id of the
                 token before it does: what an induction head attends to when the id comes again) or
                 ``prevfew`` (2 to 8 times: repeated but not common), e.g. ``last32+prev2x1``

in units of: ``block16`` / ``block4`` (neighbours, a block's score its tokens' max), ``sorted`` (tokens
ranked by their score max-pooled over 3 neighbours), ``token``, ``bands2/4/8`` (blocks of 16 cut from that
many score bands, each in position order: ``band_order``); the
selection is ``shared`` by a layer's KV heads (their mean score; what the store does) or per ``head``.
Prints Δppl and KL per decode token against the full cache.

``--key-error``: what a grouping costs the quantised keys instead, offline: every layer's prompt keys (after
RoPE, Hadamard-rotated as the store holds them) quantised per channel over blocks of 16 rows cut in each
order (``contiguous``, ``bands2/4/8``, ``sorted``, ``random``; the order from the last32 score), dequantised
back into place; the KL of the last 64 prompt queries' attention against the exact keys, mean over layers.

    python bench/evict_sim.py --texts code-tuning-b narrative-tuning --scores last64 ea128 oracle --keep 0.45
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import corpus  # noqa: E402

from agacc.attention import observe_prefill  # noqa: E402
from agacc.importance import max_pool  # noqa: E402

UNITS = {"block16": (16, 1), "block4": (4, 1), "sorted": (1, 3), "token": (1, 1)}  # (block, pool before ranking)
BANDS = {"bands2": 2, "bands4": 4, "bands8": 8}  # blocks of 16 cut from score bands (``band_order``)
PROTECT = 16


def keep_mask(score: torch.Tensor, keep: float, block: int, pool: int = 1) -> torch.Tensor:
    """score [H, t] -> bool [H, t]: per row, the first and last ``PROTECT`` tokens and the best-scored
    units (``block`` neighbours, scored by their max; ``pool`` > 1: tokens ranked by their score
    max-pooled over ``pool`` neighbours) up to ``round(keep * t / block)`` units."""
    h, t = score.shape
    s = max_pool(score.float(), pool) if pool > 1 else score.float().clone()
    s[:, :PROTECT] = s[:, t - PROTECT:] = float("inf")
    s = s.view(h, t // block, block).amax(-1)
    idx = s.topk(min(s.shape[1], max(1, round(keep * t / block))), -1).indices
    m = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return m.repeat_interleave(block, -1)


def band_order(scores: torch.Tensor, bands: int) -> torch.Tensor:
    """scores [L, n] -> order [L, n] int64: per row, the positions of band 0 (the n / bands best scores,
    max-pooled over 3 neighbours first), then band 1, ..., each band in position order."""
    n = scores.shape[1]
    key = max_pool(scores.float(), 3)
    rank = torch.empty_like(key, dtype=torch.long)
    rank.scatter_(1, key.argsort(dim=1, descending=True, stable=True), torch.arange(n).expand_as(rank).contiguous())
    return (rank * bands // n * n + torch.arange(n)).argsort(dim=1)


def band_mask(score: torch.Tensor, keep: float, bands: int, block: int = 16) -> torch.Tensor:
    """As ``keep_mask`` for blocks of ``block`` rows of ``band_order`` (the protected tokens stay in place)."""
    h, t = score.shape
    inner = band_order(score[:, PROTECT:t - PROTECT], bands) + PROTECT          # [h, t - 2 PROTECT]
    order = torch.cat([torch.arange(PROTECT).expand(h, -1), inner, torch.arange(t - PROTECT, t).expand(h, -1)], 1)
    rows = keep_mask(score.gather(1, order), keep, block)                      # the blocks of the rows
    return torch.zeros_like(rows).scatter_(1, order, rows)


def key_error(q: torch.Tensor, k: torch.Tensor, order: torch.Tensor, bits: int = 3, n_q: int = 64) -> float:
    """KL (nats, mean over the last ``n_q`` queries and the query heads) of the attention of q [Hq, t, D] over
    k [H, t, D] against the same keys quantised per channel over blocks of 16 rows taken in ``order`` [t]."""
    from agacc import quant

    h, t, d = k.shape
    kr, qr = quant.rotate(k), quant.rotate(q[:, t - n_q:])  # as the store holds quantised keys
    packed, scale, zero = quant.quantize_keys(kr[:, order][None], bits, 16)
    kq = torch.empty_like(kr)
    kq[:, order] = quant.dequantize_keys(packed, scale, zero, bits, 16)[0]
    g = q.shape[0] // h
    hidden = torch.arange(t)[None, :] > torch.arange(t - n_q, t)[:, None]
    logp = [(qr @ x.repeat_interleave(g, 0).transpose(-1, -2) * d ** -0.5).masked_fill(hidden, float("-inf")).log_softmax(-1)
            for x in (kr, kq)]
    return float((logp[0].exp() * (logp[0] - logp[1]).nan_to_num(0.0, 0.0, 0.0)).sum(-1).mean())


def grouping_order(name: str, score: torch.Tensor) -> torch.Tensor:
    """The row order [t] of a grouping for one layer's shared score [t]."""
    t = score.numel()
    if name == "contiguous":
        return torch.arange(t)
    if name == "random":
        return torch.randperm(t, generator=torch.Generator().manual_seed(0))
    if name == "sorted":
        return max_pool(score, 3).argsort(descending=True, stable=True)
    return band_order(score[None], BANDS[name])[0]


def repeats(name: str, ids: torch.Tensor) -> torch.Tensor:
    """The prompt's token ids [t] -> fp32 [t]: 1 where the token (``self2``) or the one before it (``prev2``,
    ``prevfew``) has an id the prompt holds twice or more (``prevfew``: at most 8 times), else 0."""
    count = torch.bincount(ids)[ids]
    if name != "self2":
        count = torch.cat([count.new_zeros(1), count[:-1]])
    hit = count >= 2
    if name == "prevfew":
        hit &= count <= 8
    elif name not in ("self2", "prev2"):
        raise SystemExit(f"error: unknown forecast {name!r}: self2, prev2, prevfew")
    return hit.float()


def score_of(name: str, q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor, t: int, ids: torch.Tensor | None = None,
             vals=None, look: torch.Tensor | None = None) -> torch.Tensor:
    """Per query head [Hq, t]: ``name``'s score of the first t keys. q [Hq, T, D], k [Hq, T, D] (repeated
    to the query heads), probs [Hq, T, T] the causal attention, ids [T] the token ids, vals (v [Hq, T, D]
    repeated to the query heads, the layer's o_proj weight [hidden, Hq * D]) for the value-aware scores, look
    [Hq, K, t] the lookahead queries' attention to the prompt (``lookahead``)."""
    m = re.fullmatch(r"(.+)\+(\w+)x([\d.]+)", name)
    if m:
        base = score_of(m.group(1), q, k, probs, t, ids, vals, look)
        base = base / base[:, PROTECT:t - PROTECT].mean(-1, keepdim=True)
        return base + float(m.group(3)) * repeats(m.group(2), ids[:t])
    if name == "oracle":
        return probs[:, t:, :t].amax(1)
    m = re.fullmatch(r"(?:last(\d+))?look(\d+)(max)?", name)
    if m:  # pseudo queries from the model's own continuation, with the last N prompt queries or alone
        p = look[:, :int(m.group(2))]
        if m.group(1):
            p = torch.cat([probs[:, t - int(m.group(1)):t, :t], p], 1)
        return p.amax(1) if m.group(3) else p.mean(1)
    m = re.fullmatch(r"last(\d+)(v|vd|vo)", name)
    if m:  # value-aware: attention times the value's norm / its distance from each query's output
        n = int(m.group(1))
        p = probs[:, t - n:t, :t]
        if m.group(2) == "v":
            return p.mean(1) * vals[0][:, :t].norm(dim=-1)
        o = p @ vals[0][:, :t]  # [Hq, n, D]
        out = []
        for h in range(p.shape[0]):
            dev = vals[0][h, None, :t] - o[h, :, None]  # [n, t, D]
            if m.group(2) == "vo":
                d = q.shape[-1]
                dev = dev @ vals[1][:, h * d:(h + 1) * d].T
            out.append((p[h] * dev.norm(dim=-1)).mean(0))
        return torch.stack(out)
    m = re.fullmatch(r"(last|ea)(\d+)(max)?", name)
    if not m:
        raise SystemExit(f"error: unknown score {name!r}: last<N>, last<N>max, last<N>v/vd/vo, ea<N>, oracle, S+Fx<w>")
    n = int(m.group(2))
    if m.group(1) == "last":
        p = probs[:, t - n:t, :t]
        return p.amax(1) if m.group(3) else p.mean(1)
    qr = q[:, t - n:t]
    mu = qr.mean(1)
    c = torch.einsum("hnd,hne->hde", qr - mu[:, None], qr - mu[:, None]) / max(1, n - 1)
    s = q.shape[-1] ** -0.5
    kk = k[:, :t]
    logit = s * torch.einsum("hd,htd->ht", mu, kk) + 0.5 * s * s * torch.einsum("htd,hde,hte->ht", kk, c, kk)
    return logit.softmax(-1)


class Recorder:
    """An attention function (``transformers.AttentionInterface``): records every layer's query and key
    (after RoPE), value and o_proj weight in ``record`` mode; with ``keep`` set ({layer: bool [H or 1, t]}),
    hides the dropped prompt keys from the decode queries."""

    def __init__(self, t: int):
        self.t, self.keep, self.qk, self.v = t, None, {}, {}

    def __call__(self, module, query, key, value, attention_mask, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.keep is None:
            self.qk[module.layer_idx] = (query.detach()[0].float(), key.detach()[0].float())
            self.v[module.layer_idx] = (value.detach()[0].float(), module.o_proj.weight.detach().float())
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        keep = self.keep[module.layer_idx]
        hq, n, t = query.shape[1], query.shape[2], self.t
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None].repeat(hq, 1, 1)
        mask[:, t:, :t] &= keep.repeat_interleave(hq // keep.shape[0], 0)[:, None, :]
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask[None], is_causal=False, **kw)


def lookahead(model, rec: Recorder, prompt: torch.Tensor, k: int) -> dict:
    """{layer: [Hq, k, t]}: the attention k pseudo queries pay the t prompt tokens: the model continues the prompt
    greedily for k tokens (full cache, no text after the prompt read), then one recorded forward over prompt +
    continuation gives each layer's queries and keys (after RoPE)."""
    t = prompt.shape[1]
    rec.keep = None
    ids = common.greedy_continuation(model, prompt, k)
    with torch.inference_mode():
        model(ids, use_cache=False, logits_to_keep=1)
    out = {}
    for layer, (q, kk) in rec.qk.items():
        kr = kk.repeat_interleave(q.shape[0] // kk.shape[0], 0)
        logit = q[:, t:] @ kr.transpose(-1, -2) * q.shape[-1] ** -0.5  # [Hq, k, t + k]
        logit[:, :, t:] = logit[:, :, t:].masked_fill(torch.ones(k, k, dtype=torch.bool).triu(1), float("-inf"))
        out[layer] = logit.softmax(-1)[:, :, :t]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", nargs="+", default=["code-tuning-b", "narrative-tuning", "licence-tuning"],
                    choices=list(corpus.TEXTS))
    ap.add_argument("--scores", nargs="+", default=["last32", "ea128", "oracle"])
    ap.add_argument("--units", nargs="+", default=["block16", "block4", "sorted", "bands4"], choices=[*UNITS, *BANDS])
    ap.add_argument("--heads", nargs="+", default=["shared"], choices=("shared", "head"))
    ap.add_argument("--keep", type=float, default=0.45)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--key-error", action="store_true", help="the groupings' 3-bit key error instead (offline)")
    ap.add_argument("--json", default=None)
    common.add_model_args(ap)
    args = ap.parse_args(argv)
    if args.prefill % 16 or not 2 * PROTECT < args.prefill < args.tokens:
        ap.error("--prefill must be a multiple of 16 between 32 and --tokens")
    if not 0 < args.keep <= 1:
        ap.error("--keep must be in (0, 1]")
    common.set_threads(args.threads)
    from transformers import AttentionInterface

    model, tok = common.load_model(args.model)
    T, t = args.tokens, args.prefill
    rec = Recorder(t)
    AttentionInterface.register("agacc_evict_sim", rec)
    model.set_attn_implementation("agacc_evict_sim")
    rows = []
    for name in args.texts:
        ids = tok(corpus.read(corpus.TEXTS[name], tok), return_tensors="pt").input_ids[:, :T]
        if ids.shape[1] < T:
            raise SystemExit(f"error: {name} has {ids.shape[1]} tokens, {T} needed")
        target = ids[0, t:T]

        def logprobs():
            with torch.inference_mode():
                return model(ids, use_cache=False).logits[0, t - 1:T - 1].float().log_softmax(-1)

        looks = [int(x) for s in args.scores for x in re.findall(r"look(\d+)", s)]
        look = lookahead(model, rec, ids[:, :t], max(looks)) if looks and not args.key_error else {}
        rec.keep = None
        ref = logprobs()
        if args.key_error:
            groups = ("contiguous", "bands2", "bands4", "bands8", "sorted", "random")
            err = {gname: [] for gname in groups}
            for layer, (q, k) in rec.qk.items():
                # last32, shared by the heads: the tracker's prefill evidence
                score = observe_prefill(q[None, :, :t], k[None, :, :t], q.shape[-1] ** -0.5, 32)
                for gname in groups:
                    err[gname].append(key_error(q[:, :t], k[:, :t], grouping_order(gname, score)))
            row = {gname: sum(v) / len(v) for gname, v in err.items()}
            rows.append(dict(text=name, key_error=row))
            print(f"{name}: 3-bit key KL, mean over layers: " + "  ".join(f"{gname} {v:.4f}" for gname, v in row.items()), flush=True)
            continue
        nll_ref = float(-ref.gather(-1, target[:, None]).mean())
        per_layer = {}
        for layer, (q, k) in rec.qk.items():
            g = q.shape[0] // k.shape[0]
            kr = k.repeat_interleave(g, 0)
            logit = q @ kr.transpose(-1, -2) * q.shape[-1] ** -0.5
            probs = logit.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            v, wo = rec.v[layer]
            vals = (v.repeat_interleave(g, 0), wo)
            per_layer[layer] = {s: score_of(s, q, kr, probs, t, ids[0], vals, look.get(layer)).view(k.shape[0], g, t).mean(1)
                                for s in args.scores}
        print(f"{name}: keep {args.keep} of {t} prompt tokens, {T - t} decode tokens, ppl {math.exp(nll_ref):.3f}", flush=True)
        for s in args.scores:
            for unit in args.units:
                for heads in args.heads:
                    def mask(x):
                        x = x.mean(0, keepdim=True) if heads == "shared" else x
                        return band_mask(x, args.keep, BANDS[unit]) if unit in BANDS else keep_mask(x, args.keep, *UNITS[unit])
                    rec.keep = {layer: mask(sc[s]) for layer, sc in per_layer.items()}
                    lp = logprobs()
                    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
                    dppl = math.exp(float(-lp.gather(-1, target[:, None]).mean()) - nll_ref) - 1
                    rows.append(dict(text=name, score=s, unit=unit, heads=heads, keep=args.keep, dppl=dppl, kl=kl))
                    print(f"  {s:10s} {unit:8s} {heads:6s} {100 * dppl:+7.2f}%  KL {kl:.4f}", flush=True)
        rec.keep = None
    common.write_json(args.json, {"tokens": T, "prefill": t, "rows": rows})


if __name__ == "__main__":
    main()
