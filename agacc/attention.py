"""The ``agacc`` attention function for transformers' AttentionInterface.

With a ``CompressedCache`` the cache's ``update`` returns the new K/V tagged with their layer; this
function then attends over everything that layer stores (a decode step: ``decode.decode_attention``,
which reads the packed parts on the backend ``kernels.backend`` picks) and hands the attention mass
each entry received to the layer's tracker. A later chunk of a prompt attends over the packed store
with ``chunk_attention`` (key slices at a time), which branches on the backend the same way:
``kernels.triton_chunk.chunk_parts`` where it is "triton", the PyTorch path here otherwise (there is no
C++ chunk kernel: "cpp" runs it too). With any other cache (e.g. ``DynamicCache``) it is exactly
transformers' SDPA path.

Shapes: query [Bt, Hq, q, D]; stored entries [Bt, H, n, D] with Hq = H * g (GQA);
the output is [Bt, q, Hq, D] like every transformers attention function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kernels
from agacc.quant import dequantize_part
from agacc.store import Entries
from kernels.format import Part, slice_part

NAME = "agacc"


def cap_logits(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit softcapping (Gemma2's ``attn_logit_softcapping``) on scaled logits ``s``: c * tanh(s / c),
    in transformers' order of operations; applied before any bias or mask. ``softcap`` None or 0: ``s``."""
    return s if not softcap else torch.tanh(s / softcap) * softcap


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of query [Bt, Hq, q, D] over dense key/value [Bt, H, n, D] whose last q entries are the
    queries' own tokens. ``mask``: None (causal) or [Bt, 1, q, n] (bool: True = visible, or additive).
    SDPA; with ``softcap`` (which SDPA cannot apply) the eager form of transformers' own softcapping
    models (Gemma2): logits, cap, mask, fp32 softmax. -> [Bt, q, Hq, D] in query's dtype."""
    g = query.shape[1] // key.shape[1]
    key, value = key.to(query.dtype), value.to(query.dtype)
    if not softcap:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                              scale=scaling, enable_gqa=g > 1).transpose(1, 2).contiguous()
    if g > 1:
        key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    s = cap_logits(torch.matmul(query, key.transpose(-1, -2)) * scaling, softcap)      # [Bt, Hq, q, n]
    q, n = s.shape[-2:]
    if mask is None:  # causal, the queries being the last q keys
        mask = torch.arange(n, device=s.device)[None, :] <= torch.arange(n - q, n, device=s.device)[:, None]
    # the dtype's lowest, not -inf (as transformers' eager masks): a padded query row that sees nothing stays
    # finite, so its K/V (masked everywhere) cannot turn others' outputs into nan (0 x nan)
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(p, value).transpose(1, 2).contiguous()


def attend(query: torch.Tensor, entries: list[Entries], scaling: float, causal_new: int = 0, n_obs: int | None = None,
           softcap: float | None = None, reduce: str = "mean"):
    """Reference attention over stored entries (the PyTorch reference of every decode backend).

    query [Bt, Hq, q, D]; entries as ``LayerStore.attention_entries``; ``causal_new`` = how many of the
    last entries are the q new tokens themselves (causal among them; 0 for q == 1 when they are
    included and visible). ``n_obs`` = how many of the last queries report attention mass
    (default: all). ``softcap``: logit softcapping (``cap_logits``), before the entries' bias.

    Returns (out [Bt, q, Hq, D], mass [n_entries] fp32): mass is the softmax probability each
    entry received, summed over query heads and observed queries, averaged over batch, divided by
    (Hq * n_obs) -- the mean attention it received (S_i of seed 000 §2.2, one layer); ``reduce="max"``:
    the most any query head of any observed query paid it (averaged over batch).
    """
    bt, hq, q, d = query.shape
    h = entries[0].k.shape[1]
    g = hq // h
    qg = query.reshape(bt, h, g * q, d)
    k = torch.cat([e.k for e in entries], 2) if len(entries) > 1 else entries[0].k
    v = torch.cat([e.v for e in entries], 2) if len(entries) > 1 else entries[0].v
    n = k.shape[2]
    scores = cap_logits(torch.matmul(qg, k.transpose(-1, -2)).float() * scaling, softcap)  # [Bt, H, g*q, n]
    bias = _bias(entries, n, query.device)
    if bias is not None:
        scores = scores + bias
    if causal_new and q > 1:
        # query i (0-based among the q new) sees new entries 0..i
        qi = torch.arange(q, device=query.device).repeat(g)  # rows are (g, q) flattened
        kj = torch.arange(causal_new, device=query.device)
        masked = kj[None, :] > qi[:, None]
        scores[..., n - causal_new:] = scores[..., n - causal_new:].masked_fill(masked, float("-inf"))
    probs = scores.softmax(-1)
    out = torch.matmul(probs.to(v.dtype), v)  # [Bt, H, g*q, D]
    out = out.reshape(bt, hq, q, d).transpose(1, 2)
    n_obs = q if n_obs is None else min(n_obs, q)
    obs = probs.reshape(bt, h, g, q, n)[:, :, :, q - n_obs:]
    return out.contiguous(), observed_mass(obs, (1, 2, 3), reduce, hq * n_obs)


def observed_mass(probs: torch.Tensor, dims: tuple, reduce: str, count: int) -> torch.Tensor:
    """Observed queries' probabilities [Bt, ...] -> one mass per entry, averaged over batch: summed over
    ``dims`` (heads, queries) and divided by ``count`` (their number: the mean), or their max."""
    red = probs.amax(dim=dims) if reduce == "max" else probs.sum(dim=dims) / count
    return red.mean(0)


def part_slices(part: Part, block: int):
    """(lo, hi, k, v, bias) over ``part`` in slices of about ``block`` entries, each dequantised to fp32
    [Bt, H, hi - lo, D] (un-rotated) on its own: the only float copy of a stored part is one slice.
    Slices of a part whose keys are grouped per channel per block of ``key_block`` tokens start on
    such a block."""
    kb = part.key_block or 1
    step = -(-block // kb) * kb
    for lo in range(0, part.n, step):
        hi = min(part.n, lo + step)
        k, v = dequantize_part(slice_part(part, lo, hi), torch.float32)
        yield lo, hi, k, v, None if part.bias is None else part.bias[lo:hi].float()


def chunk_attention(query: torch.Tensor, parts: list[Part], scaling: float, n_new: int, n_obs: int,
                    block: int = 256, softcap: float | None = None, window: int | None = None,
                    positions: torch.Tensor | None = None, q_start: int = 0, reduce: str = "mean"):
    """Attention of a chunk of ``q`` queries over everything a layer holds, key slices at a time.

    query [Bt, Hq, q, D]; ``parts`` = ``LayerStore.parts()`` whose last ``n_new`` entries are the q new
    tokens themselves (causal among them). Each part is read ``block`` entries at a time, dequantised
    slice by slice, with an online softmax (running max and sum per query row, as flash attention):
    temporaries are O(q x block), never a dequantised copy of the store nor a q x n matrix. The
    attention mass of the last ``n_obs`` queries comes out of the same pass (their logits are kept,
    O(n_obs x n), and normalised once the softmax's sums are known). ``softcap``: logit softcapping
    (``cap_logits``), before the parts' bias and the causal mask. ``window`` (a sliding layer past its
    window): query i, at position ``q_start`` + i, sees only entries whose ``positions`` (int64
    [n_entries], ``LayerStore.entry_positions``) are within the window - 1 before it; the PyTorch
    path runs it, whatever the backend. ``reduce``: how the observed queries' attention becomes one
    mass per entry: "mean" over heads and queries (the tracker's S_i), or "max" (the most any head of
    any observed query paid it: ``agacc.probe``'s reconstruction signal; the PyTorch path).

    Returns (out [Bt, q, Hq, D] in query's dtype, mass [n_entries] fp32) normalised as ``attend``.

    Branches once on ``kernels.backend(query.device)``: "triton" runs the fused kernel
    (``kernels.triton_chunk.chunk_parts``: the same result, its own key tiles; ``block`` is this
    path's; not for keys held in a basis); "cpp" and "torch" run the PyTorch path below."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if (window is None and reduce == "mean" and kernels.backend(query.device) == "triton"
            and all(p.basis is None for p in parts)):  # keys in a basis: the PyTorch path (kernels/__init__.py)
        from kernels.triton_chunk import chunk_parts

        return chunk_parts(query, parts, scaling, n_new, n_obs, softcap=softcap)
    bt, hq, q, d = query.shape
    h = parts[0].heads
    g = hq // h
    n = sum(p.n for p in parts)
    qg = query.reshape(bt, h, g * q, d).float() * scaling                         # rows are (g, q) flattened
    n_obs = min(n_obs, q)
    obs_rows = (torch.arange(g, device=query.device)[:, None] * q + torch.arange(q - n_obs, q, device=query.device)).reshape(-1)
    qi = torch.arange(q, device=query.device).repeat(g)                            # each row's query index
    m = torch.full((bt, h, g * q, 1), float("-inf"), device=query.device)
    z = torch.zeros_like(m)
    acc = torch.zeros(bt, h, g * q, d, device=query.device)
    obs_logits = []
    base = 0
    for part in parts:
        for lo, hi, k, v, bias in part_slices(part, block):
            s = cap_logits(torch.matmul(qg, k.transpose(-1, -2)), softcap)         # [Bt, H, g*q, hi-lo]
            if bias is not None:
                s += bias
            first_new = n - n_new - (base + lo)                                    # slice column of new entry 0
            if first_new < hi - lo:                                                # query i sees new entries 0..i
                col = torch.arange(hi - lo, device=query.device) - first_new
                s.masked_fill_(col[None, :] > qi[:, None], float("-inf"))
            if window is not None:                                                 # and the window - 1 before it
                pos = positions[base + lo:base + hi]
                s.masked_fill_(pos[None, :] <= (q_start + qi)[:, None] - window, float("-inf"))
            obs_logits.append(s[:, :, obs_rows])
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_exp = m_new  # a row with nothing visible yet (a window) keeps -inf: exp against 0, not -inf - -inf
            if window is not None:
                m_exp = m_new.masked_fill(m_new == float("-inf"), 0.0)
            p = s.sub_(m_exp).exp_()                                               # in place: s is a slice's own
            shrink = torch.exp(m - m_exp)
            z = z * shrink + p.sum(-1, keepdim=True)
            acc.mul_(shrink).add_(torch.matmul(p, v))
            m = m_new
        base += part.n
    out = (acc / z).reshape(bt, hq, q, d).transpose(1, 2).to(query.dtype).contiguous()
    lse = (m + torch.log(z))[:, :, obs_rows]                                       # [Bt, H, g*n_obs, 1]
    return out, torch.cat([observed_mass(torch.exp(s - lse), (1, 2), reduce, hq * n_obs) for s in obs_logits])


def _bias(entries: list[Entries], n: int, device) -> torch.Tensor | None:
    if all(e.bias is None for e in entries):
        return None
    parts = [e.bias if e.bias is not None else torch.zeros(e.k.shape[2], device=device) for e in entries]
    return torch.cat(parts).to(device)


def observe_prefill(query: torch.Tensor, key: torch.Tensor, scaling: float, n_obs: int, chunk: int = 4096,
                    softcap: float | None = None, window: int | None = None):
    """Initial importance at prefill: mean attention the last ``n_obs`` queries give each key.

    query [Bt, Hq, q, D] are the last q of the n positions of key [Bt, H, n, D], in position order
    (causal; the prompt's first forward: n == q; a later chunk of the lossless preset: every key it
    holds). Computed over key chunks with a two-pass softmax so memory stays O(n_obs x chunk).
    ``softcap``: logit softcapping (``cap_logits``); ``window``: a sliding window (a query sees itself
    and the window - 1 keys before it).
    Returns mass [n] fp32 (same normalisation as ``attend``)."""
    bt, hq, q, d = query.shape
    h, n = key.shape[1], key.shape[2]
    g = hq // h
    n_obs = min(n_obs, q)
    qo = query[:, :, q - n_obs:].reshape(bt, h, g * n_obs, d).float()
    qpos = torch.arange(n - n_obs, n, device=query.device).repeat(g)  # absolute position of each row

    def chunk_scores(lo, hi):
        s = cap_logits(torch.matmul(qo, key[:, :, lo:hi].float().transpose(-1, -2)) * scaling, softcap)
        kpos = torch.arange(lo, hi, device=query.device)
        hidden = kpos[None, :] > qpos[:, None]
        if window is not None:
            hidden |= kpos[None, :] <= qpos[:, None] - window
        return s.masked_fill(hidden, float("-inf"))

    m = torch.full((bt, h, g * n_obs, 1), float("-inf"), device=query.device)
    z = torch.zeros_like(m)
    for lo in range(0, n, chunk):  # pass 1: running max and normaliser
        s = chunk_scores(lo, min(n, lo + chunk))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_exp = m_new.masked_fill(m_new == float("-inf"), 0.0) if window is not None else m_new  # as chunk_attention
        z = z * torch.exp(m - m_exp) + torch.exp(s - m_exp).sum(-1, keepdim=True)
        m = m_new
    mass = torch.empty(n, device=query.device)
    for lo in range(0, n, chunk):  # pass 2: probabilities, summed
        hi = min(n, lo + chunk)
        p = torch.exp(chunk_scores(lo, hi) - m) / z
        mass[lo:hi] = p.sum(dim=(1, 2)).mean(0)
    return mass / (hq * n_obs)


def agacc_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: compressed path when ``key`` carries its cache layer; else SDPA,
    or with ``softcap`` (Gemma2) the eager form (``dense_attention``), as transformers' eager path."""
    layer = getattr(key, "_agacc_layer", None)
    softcap = kwargs.pop("softcap", None)
    if kwargs.get("s_aux") is not None:  # gpt-oss's learned sinks: an extra softmax column no path adds
        raise ValueError(f"{type(module).__name__} passes attention sinks (s_aux), which the agacc attention paths do "
                         "not implement (the answer would differ); use this model without agacc.enable, with a "
                         "plain DynamicCache")
    if layer is None and not softcap:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None:
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        return dense_attention(query, key, value, attention_mask, scaling, softcap), None
    return layer.attend(query, key, value, attention_mask, scaling, softcap), None


def register() -> None:
    """Register the ``agacc`` attention function and its mask function (the SDPA mask) once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, agacc_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
