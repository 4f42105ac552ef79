"""Importance tracker: attention mass per cached token -> S_i -> I_i(t) -> normalised block scores.

One tracker per layer. Per-token state: I_i fp32 [seq_len] (bf16 would tie near-equal blocks, and
the ratio fitter needs them apart) and the sums of the last N_w - N_r steps (bf16: all the next
re-evaluation's mean needs besides its own window); the
current window is kept per attention *entry* (bf16 [n_entries]: at most N_r steps are summed, and
bf16 keeps fp32's range, so tiny masses do not flush to zero) and mapped to tokens once, at the
re-evaluation, instead of at every step (all of it counted in memory()).

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

WINDOW_DTYPE = torch.bfloat16  # per-entry attention window (sums of at most N_r steps)
WINDOW_ITEMSIZE = 2


def fold_decode(cfg, s_i: torch.Tensor, importance: torch.Tensor, steps: int) -> torch.Tensor:
    """I_i after a re-evaluation (EMA scoring): the window's mean S_i over ``steps`` decode steps folded
    into the previous I_i (same shape), by ``cfg.decode_evidence``."""
    if cfg.decode_evidence == "max":
        return torch.maximum(s_i, importance * 0.5 ** (steps / cfg.evidence_half_life))
    return cfg.alpha * s_i + (1 - cfg.alpha) * importance


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
    ``scores(seq_len)``: I^ per token (position-normalised, relative to the mean)."""

    def __init__(self, cfg, layer_weight: float = 1.0, device="cpu"):
        self.cfg = cfg
        self.w_l = layer_weight
        self.device = device
        self.importance = torch.zeros(0, device=device)   # I_i (ema) or A_i numerator (decay / sum)
        self.window = torch.zeros(0, dtype=WINDOW_DTYPE, device=device)  # attention summed since the last update, per entry
        self.window_steps = 0
        self.chunks: list[tuple[torch.Tensor, int]] = []  # last N_w steps as (bf16 per-token sum, steps) chunks
        self.steps = 0                                    # T: decode steps seen
        self.value_norm = torch.zeros(0, device=device)   # ||v_i|| per token (fp32), with cfg.value_weight only

    def _grow(self, n: int) -> None:
        if self.importance.numel() < n:
            self.importance = torch.cat([self.importance, torch.zeros(n - self.importance.numel(), device=self.device)])

    def init_prefill(self, mass: torch.Tensor) -> None:
        """mass [n] = S_i over the observation window of a prompt chunk (new tokens get it, older
        tokens get it folded in as one observation)."""
        n = mass.numel()
        self._grow(n)
        if self.cfg.scoring == "ema":
            a = self.cfg.alpha
            ev = self.cfg.prompt_evidence
            if ev == "last":
                self.importance[:n] = mass
            elif ev == "max":
                self.importance[:n] = torch.maximum(mass, (1 - a) * self.importance[:n])
            else:  # fold: new tokens (no evidence yet) take the mass as it is
                fresh = self.importance[:n] == 0
                self.importance[:n] = torch.where(fresh, mass, a * mass + (1 - a) * self.importance[:n])
        else:
            self.importance[:n] += mass * self.cfg.n_q

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
        window = torch.cat([window, torch.zeros(self.importance.numel() - window.numel(), device=self.device)])
        if cfg.scoring == "ema":
            self.chunks.append((window.to(WINDOW_DTYPE), self.window_steps))
            while sum(s for _, s in self.chunks) > cfg.n_w and len(self.chunks) > 1:
                self.chunks.pop(0)
            n = self.importance.numel()
            total = torch.zeros(n, device=self.device)
            for c, _ in self.chunks:
                total[: c.numel()] += c.float()
            s_i = total / sum(s for _, s in self.chunks)
            self.importance = fold_decode(cfg, s_i, self.importance, self.window_steps)
            while self.chunks and sum(s for _, s in self.chunks) > cfg.n_w - cfg.n_r:
                self.chunks.pop(0)  # the next mean adds N_r new steps: only the last N_w - N_r are needed
        elif cfg.scoring == "decay":
            self.importance = self.importance * math.exp(-cfg.beta * self.window_steps) + window
        else:  # sum
            self.importance = self.importance + window
        self.window = torch.zeros(0, dtype=WINDOW_DTYPE, device=self.device)
        self.window_steps = 0

    def start_window(self, n: int) -> None:
        """Allocate the next window for ``n`` entries (after the tiers changed the layout)."""
        if self.window_steps == 0:
            self.window = torch.zeros(n, dtype=WINDOW_DTYPE, device=self.device)

    def raw(self) -> torch.Tensor:
        """I_i (ema) or the seed's A_i / C_j (decay, sum) per token, before position normalisation."""
        cfg = self.cfg
        if cfg.scoring == "decay":
            return self.w_l * self.importance / max(1, self.steps + cfg.n_q)
        if cfg.scoring == "sum":
            return (cfg.alpha + (1 - cfg.alpha) * cfg.attention_sum_beta) * self.importance
        return self.importance

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
                + sum(c.nbytes for c, _ in self.chunks))


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
    are alike (EMA scoring, one config, the same steps and lengths: the layers of one cache) the
    windows are folded in for all layers at once ([L, n] tensors, each tracker keeping its row), the
    same elementwise steps in the same order; otherwise one by one. ``to_tokens_all``: maps the
    windows of all trackers at once ([L, seq_len], as ``to_tokens`` would one by one)."""
    if not trackers:
        return
    first = trackers[0]
    cfg, steps = first.cfg, first.window_steps
    n = first.importance.numel()
    shape = [(c.numel(), s) for c, s in first.chunks]
    if (steps == 0 or cfg.scoring != "ema"
            or any(t.cfg is not cfg or t.window_steps != steps or t.importance.numel() != n
                   or [(c.numel(), s) for c, s in t.chunks] != shape for t in trackers)):
        for t, f in zip(trackers, to_tokens):
            t.update(f)
        return
    if to_tokens_all is not None:
        window = to_tokens_all([t.window.float() for t in trackers])  # [L, m]
        windows = window.unbind(0)
    else:
        windows = [f(t.window.float()) if f is not None else t.window.float() for t, f in zip(trackers, to_tokens)]
        window = None
    m = windows[0].numel()
    if any(w.numel() != m for w in windows):
        for t, w in zip(trackers, windows):  # (the windows are mapped already: fold them in as they are)
            t.update(lambda _, w=w: w)
        return
    for t in trackers:
        t._grow(m)
    n = first.importance.numel()
    if window is None:
        window = torch.stack(windows)
    if n > m:
        window = torch.cat([window, torch.zeros(len(trackers), n - m, device=window.device)], 1)
    for t, c in zip(trackers, window.to(WINDOW_DTYPE).unbind(0)):
        t.chunks.append((c, steps))
    chunks = first.chunks  # every tracker's chunks have the same steps and lengths: pop alike
    n_pop = 0
    while sum(s for _, s in chunks[n_pop:]) > cfg.n_w and len(chunks) - n_pop > 1:
        n_pop += 1
    for t in trackers:
        del t.chunks[:n_pop]
    total = torch.zeros(len(trackers), n, device=window.device)
    for j, (c, _) in enumerate(first.chunks):
        k = c.numel()
        total[:, :k] += torch.stack([t.chunks[j][0] for t in trackers]).float()
    s_i = total / sum(s for _, s in first.chunks)
    importance = fold_decode(cfg, s_i, torch.stack([t.importance for t in trackers]), steps)
    n_pop = 0
    while len(chunks) - n_pop and sum(s for _, s in chunks[n_pop:]) > cfg.n_w - cfg.n_r:
        n_pop += 1
    for t, row in zip(trackers, importance.unbind(0)):
        del t.chunks[:n_pop]  # the next mean adds N_r new steps: only the last N_w - N_r are needed
        t.importance = row
        t.window = torch.zeros(0, dtype=WINDOW_DTYPE, device=t.device)
        t.window_steps = 0


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
