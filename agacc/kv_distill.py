"""KV-Distill (Chari et al., 2025, arXiv:2503.10337), a small version trained here: a learned token
selector and an adapter that writes the kept tokens' K/V, trained with a forward + reverse KL
against the full cache.

Compressing a context of n tokens to ratio R (``compress``), one forward through the model:

* the **selector** (an MLP on the hidden state after layer ``select_layer``) scores every token;
  the first ``n_sink`` and the last ``window`` tokens are kept, and of the rest the best scored,
  n / R tokens in all;
* from the next layer on, a rank-``rank`` **adapter** (LoRA on the q, k, v and o projections) acts
  on the kept tokens only, so they can take in what the dropped ones carried before those go
  (B starts at zero: an untrained adapter is the plain model);
* every layer keeps the kept tokens' K/V only, at 16 bits (``DistilledCache``), each at its own
  position; later tokens (a question, decoding) go through the plain model and are kept whole.

Training (``train``; ``python -m agacc distill``): windows of the tuning texts (``bench/texts``, the
held-out texts are never seen), a ratio drawn from ``ratios`` per step; the teacher is the model with
the full context, the student continues from the compressed one; loss = KL(teacher || student) +
KL(student || teacher) over the continuation's next-token distributions. The selector learns
through a straight-through gate on the kept tokens' values (``v * g / sg(g)``, g = sigmoid(score):
the forward is unchanged, the gradient says which kept tokens the continuation leans on). Only the
selector and the adapter train; the model is frozen.

Weights: ``weights_path(model)`` under ``agacc.config.cache_dir()``, built by the training command,
never committed. Design choices (the layer of the selector, the gate, the windows) are this
project's reading of the paper for a 135M model on a CPU budget: docs/baselines.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from agacc.planner import sliding_windows
from agacc.config import cache_dir

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DistillConfig:
    select_layer: int | None = None  # the selector reads the hidden state after this layer (None: 3, or L - 2)
    rank: int = 8            # adapter rank
    alpha: float = 16.0      # adapter scale = alpha / rank
    scorer_hidden: int = 64
    n_sink: int = 4          # first tokens always kept
    window: int = 16         # last context tokens always kept


def _layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(l, "self_attn", None), p) for l in layers for p in PROJ):
        raise ValueError(f"KV-Distill needs a decoder with self_attn.{{{', '.join(PROJ)}}} in model.model.layers "
                         f"(Llama, Mistral, Qwen2 style); {type(model).__name__} has not")
    return layers


class KVDistill(nn.Module):
    """The trainable part: ``scorer`` (hidden [.., d] -> score [..]) and the adapter's low-rank pairs
    ``A[l_p]`` [rank, d_in], ``B[l_p]`` [d_out, rank] (fp32) for layers after ``select_layer``."""

    def __init__(self, model, cfg: DistillConfig = DistillConfig()):
        super().__init__()
        layers = _layers(model)
        if any(w is not None for w in sliding_windows(model.config)):
            raise ValueError("KV-Distill here serves full-attention models only (this one has sliding-window layers)")
        if cfg.select_layer is None:
            cfg = replace(cfg, select_layer=max(0, min(3, len(layers) - 2)))
        if not 0 <= cfg.select_layer < len(layers) - 1:
            raise ValueError(f"select_layer must be in [0, {len(layers) - 2}], got {cfg.select_layer}")
        self.cfg = cfg
        d = model.config.hidden_size
        self.scorer = nn.Sequential(nn.Linear(d, cfg.scorer_hidden), nn.GELU(), nn.Linear(cfg.scorer_hidden, 1))
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for i in range(cfg.select_layer + 1, len(layers)):
            for p in PROJ:
                lin = getattr(layers[i].self_attn, p)
                d_in, d_out = _features(lin)
                self.A[f"{i}_{p}"] = nn.Parameter(torch.randn(cfg.rank, d_in) / math.sqrt(d_in))
                self.B[f"{i}_{p}"] = nn.Parameter(torch.zeros(d_out, cfg.rank))
        self.keep = None    # [B, T] bool, set by the selector during a compressing forward
        self.scores = None  # [B, T] fp32

    @contextlib.contextmanager
    def compressing(self, model, ratio: float):
        """Hooks on ``model`` for one forward over a context: the selector picks the kept tokens,
        the adapter acts on them."""
        layers = _layers(model)
        hooks = [layers[self.cfg.select_layer].register_forward_hook(self._select_hook(ratio))]
        scale = self.cfg.alpha / self.cfg.rank
        for key in self.A.keys():
            i, p = key.split("_", 1)
            hooks.append(getattr(layers[int(i)].self_attn, p).register_forward_hook(self._adapter_hook(key, scale)))
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def _select_hook(self, ratio):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            self.scores = self.scorer(h.float()).squeeze(-1)
            self.keep = select(self.scores.detach(), ratio, self.cfg.n_sink, self.cfg.window)
        return hook

    def _adapter_hook(self, key, scale):
        def hook(module, args, out):
            x = args[0]
            delta = (x.float() @ self.A[key].t()) @ self.B[key].t() * scale
            return out + (delta * self.keep[..., None]).to(out.dtype)
        return hook


def _features(lin) -> tuple[int, int]:
    if hasattr(lin, "in_features"):
        return lin.in_features, lin.out_features
    w = getattr(lin, "weight", None)
    if w is None:
        raise ValueError(f"cannot read the shape of {type(lin).__name__} (no in_features or weight)")
    return w.shape[1], w.shape[0]


def budget(n: int, ratio: float, n_sink: int, window: int) -> int:
    """Tokens kept of an ``n``-token context at ``ratio``: n / R rounded, at least the sinks and window."""
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    return min(n, max(min(n, n_sink + window), round(n / ratio)))


def select(scores: torch.Tensor, ratio: float, n_sink: int, window: int) -> torch.Tensor:
    """scores [B, T] -> keep [B, T] bool: the first ``n_sink`` and last ``window`` tokens, and the best
    scored of the rest, ``budget`` tokens a row."""
    b, n = scores.shape
    k = budget(n, ratio, n_sink, window)
    forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
    forced[:n_sink] = True
    forced[max(0, n - window):] = True
    s = scores.masked_fill(forced, float("inf"))
    keep = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, s.topk(k, dim=1).indices, True)
    return keep


class DistilledLayer(DynamicLayer):
    """A ``DynamicLayer`` that may have dropped tokens: ``dropped`` of them, so positions and the
    causal mask (``get_seq_length``, ``get_mask_sizes``) follow the original sequence while the
    tensors hold only the kept ones, in ``store_dtype`` (16 bits), widened to the model's dtype when
    read."""

    def __init__(self, store_dtype=torch.float16):
        super().__init__()
        self.dropped = 0
        self.store_dtype = store_dtype

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.keys.to(self.store_dtype)
            self.values = self.values.to(self.store_dtype)
        self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=-2)
        return self.keys.to(key_states.dtype), self.values.to(value_states.dtype)

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length if self.is_initialized else query_length, self.dropped

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a KV-Distill cache cannot be cropped (dropped tokens are gone)")

    def keep_only(self, idx: torch.Tensor, gate: torch.Tensor | None = None) -> None:
        """Keep positions ``idx`` [k] (int64, sorted) of what this layer holds; ``gate`` [k] scales the
        kept values (straight-through, for training)."""
        n = self.keys.shape[-2]
        self.keys = self.keys.index_select(-2, idx)
        self.values = self.values.index_select(-2, idx)
        if gate is not None:
            self.values = self.values * gate.view(1, 1, -1, 1).to(self.values.dtype)
        self.dropped += n - idx.numel()


class DistilledCache(Cache):
    """The cache a KV-Distill context lives in (batch 1). ``memory()`` counts the tensors it holds
    against a 16-bit cache of the same tokens."""

    def __init__(self, n_layers: int, store_dtype=torch.float16):
        super().__init__(layers=[DistilledLayer(store_dtype) for _ in range(n_layers)])

    def keep_only(self, idx, gate=None) -> None:
        for layer in self.layers:
            layer.keep_only(idx, gate)

    def memory(self) -> dict:
        held = fp16 = tokens = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            held += layer.keys.nelement() * layer.keys.element_size() + layer.values.nelement() * layer.values.element_size()
            b, h, _, d = layer.keys.shape
            tokens = layer.get_seq_length()
            fp16 += 2 * 2 * b * h * d * tokens
        return {"bytes": held, "bytes_fp16": fp16, "host_bytes": 0, "tokens": tokens}


def store_dtype(model) -> torch.dtype:
    """16 bits: the model's dtype when it is 16-bit, else float16."""
    return model.dtype if model.dtype in (torch.float16, torch.bfloat16) else torch.float16


def compress(model, distill: KVDistill, ids: list[int] | torch.Tensor, ratio: float, train: bool = False,
             dtype: torch.dtype | None = None):
    """``ids`` (the context, batch 1) through ``model`` with the selector and adapter -> (cache holding
    the kept tokens, logits of the last position [V] fp32). ``train``: keep the graph and gate the kept
    values (straight-through) so a loss reaches the selector. ``dtype``: what the cache stores
    (default ``store_dtype``: 16 bits)."""
    x = torch.as_tensor(ids, device=model.device).view(1, -1)
    cache = DistilledCache(model.config.num_hidden_layers, dtype or store_dtype(model))
    with torch.set_grad_enabled(train), distill.compressing(model, ratio):
        out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    idx = distill.keep[0].nonzero().squeeze(-1)
    gate = None
    if train:
        g = torch.sigmoid(distill.scores[0, idx])
        gate = g / g.detach()
    with torch.set_grad_enabled(train):
        cache.keep_only(idx, gate)
    distill.keep = distill.scores = None
    return cache, out.logits[0, -1].float()


# --- weights ------------------------------------------------------------------------------------

def model_key(model) -> str:
    """Which model a set of weights belongs to: its name and shapes, hashed."""
    c = model.config
    ident = json.dumps([getattr(c, "_name_or_path", ""), c.model_type, c.num_hidden_layers, c.hidden_size,
                        getattr(c, "num_key_value_heads", None), c.vocab_size])
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def weights_path(model):
    return cache_dir() / "kv_distill" / f"{model_key(model)}.pt"


def save(distill: KVDistill, path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(distill.cfg), "state": distill.state_dict(), "meta": meta}, path)


def load(model, path=None) -> KVDistill:
    """The trained selector and adapter for ``model`` (FileNotFoundError naming the training command
    when there are none)."""
    path = path or weights_path(model)
    if not path.exists():
        raise FileNotFoundError(f"no KV-Distill weights for this model at {path}: train them with "
                                f"`python -m agacc distill` (about 30 min on 2 CPU cores for the embedded model)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    distill = KVDistill(model, DistillConfig(**blob["config"]))
    distill.load_state_dict(blob["state"])
    distill.meta = blob.get("meta", {})
    return distill.to(model.device).eval()


# --- training -----------------------------------------------------------------------------------

def kl_both(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) + KL(student || teacher), mean over positions; logits [T, V]."""
    ls, lt = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    fwd = (lt.exp() * (lt - ls)).sum(-1)
    rev = (ls.exp() * (ls - lt)).sum(-1)
    return (fwd + rev).mean()


def distill_loss(model, distill, ids: list[int], n_ctx: int, ratio: float, teacher: torch.Tensor | None = None):
    """The training loss on one window ``ids`` (context ``n_ctx`` tokens + continuation): the
    continuation's next-token distributions from the compressed context vs the full one.
    ``teacher``: the full model's logits over the continuation [len(ids) - n_ctx - 1, V] (computed
    when None)."""
    x = torch.tensor([ids], device=model.device)
    if teacher is None:
        with torch.no_grad():
            teacher = model(input_ids=x[:, :-1]).logits[0, n_ctx:].float()
    cache, _ = compress(model, distill, ids[:n_ctx], ratio, train=True)
    student = model(input_ids=x[:, n_ctx:-1], past_key_values=cache, use_cache=True).logits[0].float()
    return kl_both(student, teacher)


def train(model, texts: list[list[int]], steps: int, n_ctx: int = 384, n_cont: int = 48, ratios=(2, 4, 8),
          lr: float = 2e-3, seed: int = 0, cfg: DistillConfig = DistillConfig(), minutes: float | None = None,
          log=print) -> KVDistill:
    """Train a ``KVDistill`` for ``model`` on windows of ``texts`` (token ids; each at least
    n_ctx + n_cont + 1 long): ``steps`` steps of one window each (or until ``minutes`` pass), Adam
    at ``lr`` with a cosine decay. The model is frozen. -> the trained module (eval mode)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = n_ctx + n_cont + 1
    texts = [t for t in texts if len(t) >= need]
    if not texts:
        raise ValueError(f"no training text has {need} tokens (n_ctx + n_cont + 1)")
    for p in model.parameters():
        p.requires_grad_(False)
    distill = KVDistill(model, cfg).to(model.device).train()
    opt = torch.optim.Adam(distill.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0, avg = time.perf_counter(), None
    for step in range(steps):
        t = rng.choice(texts)
        lo = rng.randrange(0, len(t) - need + 1)
        ratio = rng.choice(ratios)
        loss = distill_loss(model, distill, t[lo: lo + need], n_ctx, ratio)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(distill.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"step {step:4d}  ratio {ratio}  loss {loss.item():.4f}  avg {avg:.4f}  {time.perf_counter() - t0:.0f} s")
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            log(f"stopped at step {step} after {minutes} min")
            break
    distill.steps_done = step + 1
    return distill.eval()
