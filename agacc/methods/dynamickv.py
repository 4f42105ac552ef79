"""DynamicKV (Zhou et al., 2024, "DynamicKV: Task-Aware Adaptive KV Cache Compression for Long
Context LLMs", arXiv:2412.14838): per-layer budgets follow each layer's own attention (layers with
diffuse importance get more), SnapKV-style selection inside each layer (PyramidKV's keep-all rule
under the budget)."""
import torch

from agacc.methods import PREFILL_SELECT, Method, register


def dynamic_weights(cfg, block_scores) -> list[float]:
    """Layer l's share: the fraction of its blocks needed to cover 90% of its importance."""
    out = []
    for s in block_scores:
        if s.numel() == 0:
            out.append(1.0)
            continue
        v = torch.sort(s.float().clamp_min(0), descending=True).values
        cum = torch.cumsum(v, 0) / v.sum().clamp_min(1e-12)
        out.append(float((cum < 0.9).sum() + 1) / s.numel())
    return out


register(Method(
    "dynamickv", presets={"dynamickv": dict(PREFILL_SELECT, c_max=1.0, budget_shape="dynamickv", rule="pyramidkv")},
    order=6, budget=dynamic_weights, citation="Zhou et al., 2024, DynamicKV, arXiv:2412.14838",
))
