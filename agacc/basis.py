"""Keys in a calibrated basis (``key_quant="basis"``; docs/tuning.md rounds 21-22): one table per model.

A key's quantisation error reaches the logits through the query: an error e in channel j costs about
q_j^2 e^2. Before RoPE a KV head's keys are low-rank and their channels correlated, so keys are held as
coefficients on the principal axes of the query-weighed pre-RoPE keys: per layer and KV head, w [D] (the
square root of the query energy per channel, each ``rotate_half`` pair's two channels averaged: RoPE turns
them into each other) and V [D, D] (the eigenvectors of the second moments of k * w, by decreasing
eigenvalue). A 2-, 3- or 4-bit block keeps the first r coefficients c = frame(k, -1) @ pinv(V_r^T / w) (the
least-squares fit in the key's frame; (k * w) @ V_r where r = D: ``kernels.format.basis_coeffs``) per
coefficient per block, the first at the most bits
(``policy.basis_layouts``); its keys read back as
frame(c @ V^T / w, +1) (``kernels.format.basis_keys``).

    caps = [capture_prefill(model, ids, n_obs=len(ids)) for ids in texts]  # agacc.eval.runner: a forward a text
    table = calibrate(model, caps)                # every query weighs the channels (docs/tuning.md round 35)
    save(model.config, table)                     # where a cache with key_quant="basis" finds it
    python -m agacc calibrate --key-basis --save  # the same from the command line

``load(model_config)``: the saved table, else the one shipped for the embedded model (``agacc/data``), else
None; a cache with ``key_quant="basis"`` and no table raises, naming the command. ``key_quant="auto"`` (the
``agacc`` preset) is "basis" above 4x where a table is filed, else "channel" (``default_key_quant``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from agacc.config import cache_dir, fitted_ratio
from agacc.planner import text_config
from kernels.format import axes_reflectors, frame

SHIPPED = Path(__file__).parent / "data" / "key_basis"


@dataclass
class KeyBasis:
    """w [L, H, D] and V [L, H, D, D] (module docstring), inv_freq [D/2] the rotary frequencies of the frame
    (the model's RoPE); ``model``: ``calibrate.model_key`` of the model it was measured on."""

    w: torch.Tensor
    V: torch.Tensor
    inv_freq: torch.Tensor
    model: str

    def layer(self, layer: int, r: int) -> tuple[torch.Tensor, ...]:
        """One layer's basis as a store holds it, its own copies (a store counts what it holds): (w [H, D] fp32,
        the first r axes as Householder reflectors: codes [H, r (D - 1) - r (r - 1) / 2] int8 and scales [H, r]
        fp16, one a reflector (``kernels.format.axes_reflectors``; read back orthonormal by ``basis_axes``: 58% of
        a dense int8 table's bytes at D = 64, r = 53, docs/tuning.md round 37), inv_freq [D/2] fp32)."""
        codes, scale = axes_reflectors(self.V[layer][..., :r].float())
        return self.w[layer].float().clone(), codes, scale, self.inv_freq.float().clone()


def query_energy(q: torch.Tensor, heads: int) -> torch.Tensor:
    """The mean square of queries q [1, Hq, m, D] per channel over each KV head's group of ``heads`` -> [H, D] fp32."""
    return q.float().reshape(heads, -1, q.shape[-1]).pow(2).mean(1)


def layer_basis(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (w [H, D], V [H, D, D]) fp32 from calibration prompts with RoPE undone on both: queries
    [1, Hq, m, D] and keys [1, H, n, D], one of each per prompt (module docstring; the query energy averaged
    over the prompts, the keys' second moments summed)."""
    h, d = keys[0].shape[1], keys[0].shape[-1]
    q_energy = torch.stack([query_energy(q, h) for q in queries]).mean(0)
    pair = (q_energy[:, :d // 2] + q_energy[:, d // 2:]) / 2
    w = torch.cat([pair, pair], -1).sqrt()
    kw = [k.float()[0] * w[:, None] for k in keys]  # [H, n, D] each
    return w, torch.linalg.eigh(sum(x.transpose(1, 2) @ x for x in kw))[1].flip(-1)


def rotary_inv_freq(model) -> torch.Tensor:
    """The model's rotary frequencies [D/2] fp32, or a ValueError naming the fix where keys cannot be held in a
    basis (no RoPE over the whole head: the frame undoes it on every channel pair)."""
    tc = text_config(model.config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rope, "inv_freq", None)
    if inv_freq is None or inv_freq.numel() * 2 != head_dim:
        raise ValueError(f"key_quant='basis' needs rotary embeddings over the whole head ({tc.model_type} has "
                         f"{'none found' if inv_freq is None else f'{inv_freq.numel() * 2} of {head_dim} channels'}); "
                         "use key_quant='channel'")
    return inv_freq.detach().float().cpu()


def turned_prompts(caps, inv_freq: torch.Tensor):
    """Per layer, (queries, keys) of captured prompts (``agacc.eval.runner.capture_prefill``: every key and the
    queries kept, every one for ``calibrate --key-basis``; one of each per prompt) with RoPE undone at their
    positions (``frame`` at ``inv_freq``)."""
    for layer in range(len(caps[0].keys)):
        qs, ks = [], []
        for c in caps:
            q, k = c.queries[layer].cpu(), c.keys[layer].cpu()
            qs.append(frame(q, torch.arange(c.n - q.shape[2], c.n), inv_freq, -1))
            ks.append(frame(k, torch.arange(c.n), inv_freq, -1))
        yield qs, ks


def calibrate(model, caps) -> KeyBasis:
    """The model's table from a few texts' forwards (``agacc.eval.runner.capture_prefill``), RoPE undone
    (``turned_prompts``)."""
    from agacc.calibrate import model_key

    inv_freq = rotary_inv_freq(model)
    ws, Vs = zip(*(layer_basis(qs, ks) for qs, ks in turned_prompts(caps, inv_freq)))
    return KeyBasis(torch.stack(ws), torch.stack(Vs), inv_freq, model_key(model.config))


def _path(model_config, root: Path) -> Path:
    from agacc.calibrate import model_key

    return root / (model_key(model_config).replace("/", "_") + ".pt")


def save(model_config, table: KeyBasis) -> Path:
    """File a table (w fp32, V fp16) where ``load`` looks first; -> its path."""
    path = _path(model_config, cache_dir() / "key_basis")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": table.w.float(), "V": table.V.half(), "inv_freq": table.inv_freq.float(), "model": table.model},
               path)
    return path


def _filed_path(model_config) -> Path | None:
    """Where ``load`` finds the model's table: the saved one, else the shipped one, else None."""
    return next((p for p in (_path(model_config, root) for root in (cache_dir() / "key_basis", SHIPPED))
                 if p.exists()), None)


def filed(model_config) -> bool:
    """Whether a table is filed for the model (what ``key_quant="auto"`` asks; nothing is read)."""
    return _filed_path(model_config) is not None


def load(model_config) -> KeyBasis | None:
    """The model's saved table, else the shipped one, else None."""
    path = _filed_path(model_config)
    if path is None:
        return None
    d = torch.load(path, map_location="cpu", weights_only=True)
    return KeyBasis(d["w"], d["V"], d["inv_freq"], d["model"])


BASIS_ABOVE = 4.0  # the fitted target ratios above which key_quant="auto" holds keys in a basis


def default_key_quant(cfg, model_config) -> str:
    """``cfg.key_quant``, or for "auto" "basis" at a fitted target ratio above ``BASIS_ABOVE`` where a table is
    filed for the model (``filed``) and "channel" otherwise (docs/tuning.md round 25: on the tuning texts the
    basis cut the KL by 30% at 5x and 14% at 8x, lower on every text, and raised it 9% at 4x, where most kept
    blocks are 4-bit and the basis saves least)."""
    if cfg.key_quant != "auto":
        return cfg.key_quant
    return "basis" if fitted_ratio(cfg) > BASIS_ABOVE and filed(model_config) else "channel"


def require(model_config) -> KeyBasis:
    """``load``, or a ValueError naming the command that makes the table."""
    table = load(model_config)
    if table is None:
        from agacc.calibrate import model_key

        raise ValueError(f"key_quant='basis' needs the model's key basis, and none is filed for "
                         f"{model_key(model_config)}: run python -m agacc calibrate --key-basis --model MODEL --save "
                         "(a minute on a CPU)")
    return table
