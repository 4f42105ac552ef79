"""Importance tracker: attention mass per cached token -> S_i -> I_i(t) -> normalised block scores.

One tracker per layer. Per-token state: I_i fp32 (bf16 would tie near-equal blocks, and the ratio
fitter needs them apart) and the sums of the last N_w - N_r steps (bf16: all the next
re-evaluation's mean needs besides its own window), both for the tokens still held only; the
current window is kept per attention *entry* (bf16 [n_entries]: at most N_r steps are summed, and
bf16 keeps fp32's range, so tiny masses do not flush to zero) and mapped to tokens once, at the
re-evaluation, instead of at every step (all of it counted in memory()).

An evicted block's tokens receive no attention again (without markers or a host copy), so their I_i
only decay, each by the same factor: once no window sum holds their attention from before, the
tracker ``forget``s them, keeping the block's largest I_i and their sum (fp32 each): what its block
score and the scores' mean need, 12 bytes a block instead of 6 a token (docs/tuning.md round 23).
With ``config.block_state`` every tiered block is held so (``pack``: 8 bytes a block, no id: they are the
first blocks), evicted or not: a decaying maximum's block maximum folds as one value.

  seed 000 §2.2  S_i: mean attention token i receives (over heads, and over the N_q observation
                 queries at prefill / the decode steps of the last N_w window at re-evaluation)
  seed 000 §2.3  I_i(t) = alpha*S_i + (1-alpha)*I_i(t-1)                      scoring="ema"
                 or I_i(t) = max(S_i, 2^(-k/h) I_i(t-1)), k = the window's steps   decode_evidence="max"
                 I^_i(t) = I_i(t) / P(t-i)
  seed 001 §2.1  A_i = (1/T) sum_t e^{-beta(T-t)} w_l sum_j alpha_ij          scoring="decay"
  seed 002       C_j = alpha*sum_i A_ij + (1-alpha)*beta*sum_i A_ij           scoring="sum"
  seed 000 §2.5  block score = max over the block's tokens of I^_i
Scores are divided by their mean over the compressible tokens, so 1.0 = average attention.
"""
from __future__ import annotations

import math

import torch

from agacc.config import block_state, fitted_ratio

WINDOW_DTYPE = torch.bfloat16  # per-entry attention window (sums of at most N_r steps)
WINDOW_ITEMSIZE = 2
STATE_ITEMSIZE = 4  # I_i, fp32 a token held
GONE_ITEMSIZE = 12  # a forgotten block: its id (int32), largest and summed I_i (fp32)
PACKED_ITEMSIZE = 8  # a packed block (config.block_state): its largest and summed I_i (fp32)


def half_life(cfg) -> float:
    """``cfg.evidence_half_life``, or when None 182 decode steps up to a fitted target ratio of 4 (and without
    one) and 91 above: an 8x cache turns over twice as fast as a 4x one (docs/tuning.md rounds 16 and 28)."""
    if cfg.evidence_half_life is not None:
        return cfg.evidence_half_life
    return 91.0 if fitted_ratio(cfg) > 4.0 else 182.0


def fold_decode(cfg, s_i: torch.Tensor, importance: torch.Tensor, steps: int) -> torch.Tensor:
    """I_i after a re-evaluation (EMA scoring): the window's mean S_i over ``steps`` decode steps folded
    into the previous I_i (same shape), by ``cfg.decode_evidence``."""
    if cfg.decode_evidence == "max":
        return torch.maximum(s_i, importance * 0.5 ** (steps / half_life(cfg)))
    return cfg.alpha * s_i + (1 - cfg.alpha) * importance


def fade(cfg, importance: torch.Tensor, steps: int) -> torch.Tensor:
    """I_i after a re-evaluation of ``steps`` decode steps that paid the tokens no attention (S_i = 0),
    by the scoring rule (``update`` adds the window to it for ``decay`` and ``sum``)."""
    if cfg.scoring == "decay":
        return importance * math.exp(-cfg.beta * steps)
    if cfg.scoring == "sum":
        return importance
    return fold_decode(cfg, torch.zeros_like(importance), importance, steps)


def fold_prompt(cfg, mass: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """I_i after a prompt chunk's observation ``mass`` (same shape as ``importance``), by
    ``cfg.prompt_evidence`` (EMA scoring) or summed over the N_q queries (``decay``, ``sum``)."""
    if cfg.scoring != "ema":
        return importance + mass * cfg.n_q
    a, ev = cfg.alpha, cfg.prompt_evidence
    if ev == "last":
        return mass.clone()
    if ev == "max":
        return torch.maximum(mass, (1 - a) * importance)
    return torch.where(importance == 0, mass, a * mass + (1 - a) * importance)  # fold: new tokens take the mass


def position_norm(distance: torch.Tensor, form: str, gamma: float) -> torch.Tensor:
    """P(t - i) >= 0, monotonically decreasing in the distance d = t - i, P(0) = 1."""
    d = distance.float().clamp_min(0)
    if form == "none":
        return torch.ones_like(d)
    if form == "power":
        return (1.0 + d).pow(-gamma)
    if form == "log":
        return 1.0 / torch.log(math.e + d)
    raise ValueError(f"unknown position_norm {form!r}")


class ImportanceTracker:
    """Attention history of one layer.

    ``observe(mass)``: mass of one decode step, per entry of the store (attention order) or per token;
    ``init_prefill(mass)``: S_i of the prompt from the observation window (per token);
    ``update(to_tokens)``: at a re-evaluation, map the window to tokens (the store's ``token_mass``;
        the entry layout only changes when tiers are applied, after this) and fold it into I;
    ``scores(seq_len)``: I^ per token (position-normalised, relative to the mean);
    ``forget(blocks)``: the store evicted these blocks for good: their tokens' state folds into the
        block's (``gone``) once no window sum holds their attention. ``importance`` and the chunks hold
        the other tokens, in position order; ``raw()`` lays them out per token again;
    ``pack(n_blocks)``: with ``config.block_state``, the first blocks' I_i are held as each block's largest
        and sum (``packed_*``; ``importance`` then holds the tokens after them): every fold reads them back
        per token (``_unpacked``) and packs the result again."""

    def __init__(self, cfg, layer_weight: float = 1.0, device="cpu"):
        self.cfg = cfg
        self.w_l = layer_weight
        self.device = device
        self.importance = torch.zeros(0, device=device)   # I_i (ema) or A_i numerator (decay / sum), tokens held
        self.window = torch.zeros(0, dtype=WINDOW_DTYPE, device=device)  # attention summed since the last update, per entry
        self.window_steps = 0
        self.chunks: list[tuple[torch.Tensor, int]] = []  # last N_w steps as (bf16 per-token sum, steps) chunks
        self.steps = 0                                    # T: decode steps seen
        self.value_norm = torch.zeros(0, device=device)   # ||v_i|| per token (fp32), with cfg.value_weight only
        self.gone = torch.zeros(0, dtype=torch.int32, device=device)  # forgotten blocks, ascending
        self.gone_max = torch.zeros(0, device=device)     # their tokens' largest I_i (fp32 [n_gone])
        self.gone_sum = torch.zeros(0, device=device)     # and the sum of their I_i
        self.pending: list[tuple[int, int]] = []          # (block, steps when evicted): to forget
        self.n_packed = 0                                 # blocks [0, n_packed) held packed (block_state)
        self.packed_max = torch.zeros(0, device=device)   # their tokens' largest I_i (fp32 [n_packed])
        self.packed_sum = torch.zeros(0, device=device)   # and the sum of their I_i

    def to(self, device) -> None:
        self.device = device
        for name in ("importance", "window", "value_norm", "gone", "gone_max", "gone_sum", "packed_max", "packed_sum"):
            setattr(self, name, getattr(self, name).to(device))
        self.chunks = [(c.to(device), k) for c, k in self.chunks]

    def _held(self, n: int) -> torch.Tensor | None:
        """Positions [n_held] int64 of the tokens among the first ``n`` whose state is held (all but the
        forgotten blocks'), ascending; None when nothing is forgotten."""
        if not self.gone.numel():
            return None
        B = self.cfg.block_size
        keep = torch.ones(max(n, 0), dtype=torch.bool, device=self.device)
        keep[: n // B * B].view(-1, B)[self.gone[self.gone < n // B].long()] = False
        return keep.nonzero().squeeze(1)

    def held_part(self, per_token: torch.Tensor) -> torch.Tensor:
        """A per-token tensor [n] -> its held tokens' entries (all of it when nothing is forgotten)."""
        idx = self._held(per_token.numel())
        return per_token if idx is None else per_token[idx]

    def _grow(self, n: int) -> None:
        """Hold state for the first ``n`` tokens (zeros for new ones)."""
        n = n - self.cfg.block_size * (self.gone.numel() + self.n_packed)
        if self.importance.numel() < n:
            self.importance = torch.cat([self.importance, torch.zeros(n - self.importance.numel(), device=self.device)])

    def _unpacked(self) -> torch.Tensor:
        """I_i of the held tokens (all but the forgotten blocks'), in position order [n_held] fp32: the packed
        blocks' read back (``spread``), then ``importance`` (itself when nothing is packed)."""
        if not self.n_packed:
            return self.importance
        return torch.cat([spread(self.packed_max, self.packed_sum, self.cfg.block_size), self.importance])

    def _store(self, held: torch.Tensor) -> None:
        """Hold ``held`` [n_held] (``_unpacked``'s layout): the packed blocks' largest and sum, the rest per token
        (a copy: a view would hold the packed part uncounted)."""
        k = self.n_packed * self.cfg.block_size
        if not k:
            self.importance = held
            return
        blocks = held[:k].view(self.n_packed, -1)
        self.packed_max, self.packed_sum = blocks.amax(1), blocks.sum(1)
        self.importance = held[k:].clone()

    def pack(self, n_blocks: int) -> None:
        """With ``config.block_state``: hold the first ``n_blocks`` blocks' I_i packed (more only: the tiered
        blocks; a no-op without it). Their block maxima stay exact under every fold (a maximum's), their sums
        approximate."""
        if n_blocks <= self.n_packed or not block_state(self.cfg):
            return
        self._grow(n_blocks * self.cfg.block_size)
        held = self._unpacked()
        self.n_packed = n_blocks
        self._store(held)

    def init_prefill(self, mass: torch.Tensor) -> None:
        """mass [n] = S_i over the observation window of a prompt chunk (new tokens get it, older
        tokens get it folded in as one observation)."""
        self._grow(mass.numel())
        mass = self.held_part(mass)
        n = mass.numel()
        held = self._unpacked()
        held[:n] = fold_prompt(self.cfg, mass, held[:n])
        self._store(held)
        if self.gone.numel():  # (no attention: the rule with no mass)
            self.gone_max, self.gone_sum = (fold_prompt(self.cfg, torch.zeros_like(x), x)
                                            for x in (self.gone_max, self.gone_sum))

    def add_values(self, value_states: torch.Tensor) -> None:
        """value_states [B, H, q, D] of q new tokens -> their ||v|| (mean over rows and heads), kept
        per token when ``cfg.value_weight`` asks for value-aware scores."""
        if self.cfg.value_weight:
            norm = value_states.float().norm(dim=-1).mean((0, 1)).to(self.value_norm.device)
            self.value_norm = torch.cat([self.value_norm, norm])

    def value_factor(self, seq_len: int, ready_tokens: int) -> torch.Tensor | None:
        """(||v_i|| / mean over the first ``ready_tokens``)^value_weight [seq_len]; None without it."""
        if not self.cfg.value_weight or self.value_norm.numel() == 0:
            return None
        vn = self.value_norm[:seq_len]
        ref = vn[:ready_tokens] if ready_tokens > 0 else vn
        f = (vn / ref.mean().clamp_min(1e-12)).clamp_min(1e-6) ** self.cfg.value_weight
        if f.numel() < seq_len:  # (tokens whose values were not seen: neutral)
            f = torch.cat([f, f.new_ones(seq_len - f.numel())])
        return f

    def observe(self, mass: torch.Tensor) -> None:
        """mass [n] attention of one decode step (mean over heads), per store entry or per token; the
        layout may only grow at the end (new entries) until the next ``update``."""
        n = mass.numel()
        if self.window.numel() < n:
            pad = torch.zeros(n - self.window.numel(), dtype=WINDOW_DTYPE, device=self.device)
            self.window = torch.cat([self.window, pad])
        if self.cfg.scoring == "decay":
            self.window.mul_(math.exp(-self.cfg.beta))
        self.window[:n] += mass.float()
        self.window_steps += 1
        self.steps += 1

    def update(self, to_tokens=None) -> None:
        """Fold the attention observed since the last re-evaluation into the importance.
        ``to_tokens``: maps the window [n_entries] to tokens [seq_len] (None: it is per token already)."""
        if self.window_steps == 0:
            return
        cfg = self.cfg
        window = to_tokens(self.window.float()) if to_tokens is not None else self.window.float()
        self._grow(window.numel())
        window = self.held_part(window)
        held = self._unpacked()
        window = torch.cat([window, torch.zeros(held.numel() - window.numel(), device=self.device)])
        self._fade_gone(self.window_steps)
        if cfg.scoring == "ema":
            self.chunks.append((window.to(WINDOW_DTYPE), self.window_steps))
            while sum(s for _, s in self.chunks) > cfg.n_w and len(self.chunks) > 1:
                self.chunks.pop(0)
            total = torch.zeros(held.numel(), device=self.device)
            for c, _ in self.chunks:
                total[: c.numel()] += c.float()
            s_i = total / sum(s for _, s in self.chunks)
            self._store(fold_decode(cfg, s_i, held, self.window_steps))
            while self.chunks and sum(s for _, s in self.chunks) > cfg.n_w - cfg.n_r:
                self.chunks.pop(0)  # the next mean adds N_r new steps: only the last N_w - N_r are needed
        else:  # decay, sum
            self._store(fade(cfg, held, self.window_steps) + window)
        self.window = torch.zeros(0, dtype=WINDOW_DTYPE, device=self.device)
        self.window_steps = 0
        self._forget_ready()

    def start_window(self, n: int) -> None:
        """Allocate the next window for ``n`` entries (after the tiers changed the layout)."""
        if self.window_steps == 0:
            self.window = torch.zeros(n, dtype=WINDOW_DTYPE, device=self.device)

    def raw(self) -> torch.Tensor:
        """I_i (ema) or the seed's A_i / C_j (decay, sum) per token [n_tokens], before position
        normalisation; a forgotten block's first token holds its largest value and the others share
        the rest of its sum alike (its block score and the scores' mean are as if held)."""
        cfg = self.cfg
        imp = self._per_token()
        if cfg.scoring == "decay":
            return self.w_l * imp / max(1, self.steps + cfg.n_q)
        if cfg.scoring == "sum":
            return (cfg.alpha + (1 - cfg.alpha) * cfg.attention_sum_beta) * imp
        return imp

    def _per_token(self) -> torch.Tensor:
        held = self._unpacked()
        if not self.gone.numel():
            return held
        B = self.cfg.block_size
        n = held.numel() + B * self.gone.numel()
        out = torch.empty(n, device=self.device)
        out[self._held(n)] = held
        out[(self.gone.long()[:, None] * B + torch.arange(B, device=self.device)).reshape(-1)] = spread(
            self.gone_max, self.gone_sum, B)
        return out

    def _fade_gone(self, steps: int) -> None:
        if self.gone.numel():  # (no attention since they were forgotten)
            self.gone_max, self.gone_sum = (fade(self.cfg, x, steps) for x in (self.gone_max, self.gone_sum))

    @property
    def n_evicted(self) -> int:
        """Evicted blocks the tracker was told of (``forget``): forgotten or waiting to be."""
        return self.gone.numel() + len(self.pending)

    def forget(self, blocks: torch.Tensor) -> None:
        """``blocks``: every block the store holds evicted (int, any order; known ones included). Their
        tokens will receive no attention again (no markers, no host copy: else nothing is forgotten),
        so each I_i only fades (``fade``); once the window sums held (``chunks``) postdate the eviction
        (at once before any decoding; else at the next ``update``, which folds them in), the blocks'
        tokens leave ``importance`` and the chunks (their entries there are zero), leaving the block's
        largest I_i and their sum in ``gone``, faded alike. With ``config.block_state`` nothing is forgotten:
        a packed block holds 8 bytes, a forgotten one 12."""
        if self.cfg.markers or self.cfg.host_copy or blocks.numel() == self.n_evicted or block_state(self.cfg):
            return  # (evictions are for good: as many as known means these)
        known = set(self.gone.tolist()) | {b for b, _ in self.pending}
        self.pending += [(b, self.steps) for b in sorted(set(blocks.tolist())) if b not in known]
        self._forget_ready()

    def _forget_ready(self) -> None:
        """Forget the pending blocks whose attention no window sum held holds any more."""
        held_steps = sum(k for _, k in self.chunks)
        ready = [b for b, s in self.pending if self.steps - s >= held_steps]
        if not ready:
            return
        self.pending = [(b, s) for b, s in self.pending if self.steps - s < held_steps]
        B, dev = self.cfg.block_size, self.device
        self._grow((max(ready) + 1) * B)
        blocks = torch.tensor(ready, device=dev)
        first = (blocks - torch.searchsorted(self.gone, blocks.to(torch.int32))) * B  # held tokens before each
        pos = (first[:, None] + torch.arange(B, device=dev)).reshape(-1)  # their places in the held state
        vals = self.importance[pos].view(len(ready), B)
        keep = torch.ones(self.importance.numel(), dtype=torch.bool, device=dev)
        keep[pos] = False
        self.importance = self.importance[keep]
        self.chunks = [(c[keep[: c.numel()]], k) for c, k in self.chunks]
        gone = torch.cat([self.gone, blocks.to(torch.int32)])
        order = gone.argsort()
        self.gone = gone[order]
        self.gone_max = torch.cat([self.gone_max, vals.amax(1)])[order]
        self.gone_sum = torch.cat([self.gone_sum, vals.sum(1)])[order]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens' state (only tokens after every forgotten block go; a packed block cut
        into holds its tokens' read-back values)."""
        m = n - self.cfg.block_size * self.gone.numel()
        held = self._unpacked()[:m]
        self.n_packed = min(self.n_packed, n // self.cfg.block_size)
        self._store(held)
        self.value_norm = self.value_norm[:n]
        self.chunks = [(c[:m], k) for c, k in self.chunks]

    def set_raw(self, importance: torch.Tensor) -> None:
        """Replace I_i of the first n tokens by ``importance`` [n] (forgotten blocks stay so; a packed block
        replaced in part keeps its other tokens as read back)."""
        s = self.held_part(importance.to(self.device, torch.float32))
        self._store(torch.cat([s, self._unpacked()[s.numel():]]))

    def scores(self, seq_len: int, ready_tokens: int) -> torch.Tensor:
        """I^_i = I_i / P(t - i), divided by its mean over the first ``ready_tokens`` tokens.
        Returns [seq_len] fp32."""
        self._grow(seq_len)
        t = seq_len - 1
        dist = t - torch.arange(seq_len, device=self.device)
        i_hat = self.raw()[:seq_len] / position_norm(dist, self.cfg.position_norm, self.cfg.position_gamma)
        factor = self.value_factor(seq_len, ready_tokens)
        if factor is not None:
            i_hat = i_hat * factor
        ref = i_hat[:ready_tokens] if ready_tokens > 0 else i_hat
        mean = ref.mean().clamp_min(1e-12)
        return i_hat / mean

    def nbytes(self) -> int:
        return (self.importance.nbytes + self.window.nbytes + self.value_norm.nbytes
                + sum(c.nbytes for c, _ in self.chunks) + self.gone.nbytes + self.gone_max.nbytes
                + self.gone_sum.nbytes + self.packed_max.nbytes + self.packed_sum.nbytes)


def spread(largest: torch.Tensor, total: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks held as their tokens' largest and summed I_i [n] -> per token [n * block_size]: the first token
    the largest, the others the rest of the sum alike (the block maximum and the sum as held)."""
    vals = ((total - largest) / max(1, block_size - 1))[:, None].repeat(1, block_size)
    vals[:, 0] = largest
    return vals.reshape(-1)


def block_max(token_scores: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    """Block importance = max over the block's tokens (seed 000 §2.5). -> [n_blocks]."""
    return token_scores[: n_blocks * block_size].reshape(n_blocks, block_size).amax(1)


def max_pool(token_scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max pooling over neighbouring tokens along the last dim (same shape), as SnapKV pools its votes."""
    n = token_scores.shape[-1]
    x = token_scores.reshape(-1, 1, n)
    return torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2)[:, 0, :n].reshape(token_scores.shape)


def update_all(trackers: list[ImportanceTracker], to_tokens: list, to_tokens_all=None) -> None:
    """``tracker.update(to_tokens[i])`` for every tracker, with the same results: where the trackers
    are alike (EMA scoring, one config, the same steps and window sums: the layers of one cache) the
    windows are folded in for all layers at once ([L, n] tensors, each tracker's held tokens first in
    its row, zeros after them; each keeps its part), the same elementwise steps in the same order;
    otherwise one by one. ``to_tokens_all``: maps the windows of all trackers at once ([L, seq_len],
    as ``to_tokens`` would one by one)."""
    if not trackers:
        return
    first = trackers[0]
    cfg, steps = first.cfg, first.window_steps
    shape = [s for _, s in first.chunks]
    if (steps == 0 or cfg.scoring != "ema"
            or any(t.cfg is not cfg or t.window_steps != steps or [s for _, s in t.chunks] != shape for t in trackers)):
        for t, f in zip(trackers, to_tokens):
            t.update(f)
        return
    if to_tokens_all is not None:
        windows = to_tokens_all([t.window.float() for t in trackers]).unbind(0)  # [L, seq_len]
    else:
        windows = [f(t.window.float()) if f is not None else t.window.float() for t, f in zip(trackers, to_tokens)]
    for t, w in zip(trackers, windows):
        t._grow(w.numel())
        t._fade_gone(steps)
    windows = [t.held_part(w) for t, w in zip(trackers, windows)]
    held = [t._unpacked() for t in trackers]
    sizes = [h.numel() for h in held]
    n, dev = max(sizes), first.importance.device

    def rows(xs):  # [L, n]: each tensor first in its row, zeros after it
        out = torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True)
        return torch.nn.functional.pad(out, (0, n - out.shape[1]))

    # (each tracker's part copied out of the [L, n] rows: a view would hold the others' padding uncounted)
    for t, c, k in zip(trackers, rows(windows).to(WINDOW_DTYPE).unbind(0), sizes):
        t.chunks.append((c[:k].clone(), steps))
    chunks = first.chunks  # every tracker's chunks have the same steps: pop alike
    n_pop = 0
    while sum(s for _, s in chunks[n_pop:]) > cfg.n_w and len(chunks) - n_pop > 1:
        n_pop += 1
    for t in trackers:
        del t.chunks[:n_pop]
    total = torch.zeros(len(trackers), n, device=dev)
    for j in range(len(first.chunks)):
        total += rows([t.chunks[j][0] for t in trackers]).float()
    s_i = total / sum(s for _, s in first.chunks)
    importance = fold_decode(cfg, s_i, rows(held), steps)
    n_pop = 0
    while len(chunks) - n_pop and sum(s for _, s in chunks[n_pop:]) > cfg.n_w - cfg.n_r:
        n_pop += 1
    for t, row, k in zip(trackers, importance.unbind(0), sizes):
        del t.chunks[:n_pop]  # the next mean adds N_r new steps: only the last N_w - N_r are needed
        t._store(row[:k].clone())
        t.window = torch.zeros(0, dtype=WINDOW_DTYPE, device=t.device)
        t.window_steps = 0
        t._forget_ready()


def scores_all(trackers: list[ImportanceTracker], seq_len: int, ready_tokens: int) -> torch.Tensor:
    """``tracker.scores(seq_len, ready_tokens)`` of every tracker as rows of one [L, seq_len] tensor,
    the same values: the position normalisation once for all layers (elementwise), the mean per layer."""
    if not trackers:
        return torch.zeros(0, seq_len)
    first = trackers[0]
    if any(t.cfg is not first.cfg or t.device != first.device for t in trackers):
        return torch.stack([t.scores(seq_len, ready_tokens) for t in trackers])
    cfg = first.cfg
    for t in trackers:
        t._grow(seq_len)
    t_last = seq_len - 1
    dist = t_last - torch.arange(seq_len, device=first.device)
    i_hat = torch.stack([t.raw()[:seq_len] for t in trackers]) / position_norm(dist, cfg.position_norm, cfg.position_gamma)
    if cfg.value_weight:
        factors = [t.value_factor(seq_len, ready_tokens) for t in trackers]
        if all(f is not None for f in factors):
            i_hat = i_hat * torch.stack(factors)
    out = torch.empty_like(i_hat)
    for i in range(len(trackers)):
        ref = i_hat[i, :ready_tokens] if ready_tokens > 0 else i_hat[i]
        torch.div(i_hat[i], ref.mean().clamp_min(1e-12), out=out[i])
    return out
