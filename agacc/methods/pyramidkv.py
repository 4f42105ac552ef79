"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv:2406.02069): SnapKV selection with per-layer budgets falling linearly
with depth (more at the bottom, less at the top). The rule keeps every ready block at full
precision: selection is left to the per-layer budget (``c_max``, split by this method's budget
hook), which the ratio fitter scales."""
from agacc.methods import PREFILL_SELECT, Method, register
from agacc.policy import full_plan


def pyramid_weights(cfg, block_scores) -> list[float]:
    """Layer l's share of the budget: 1.5 at the bottom falling linearly to 0.5 at the top."""
    n_layers = len(block_scores)
    return [1.5 - l / max(1, n_layers - 1) for l in range(n_layers)]


register(Method(
    "pyramidkv", presets={"pyramidkv": dict(PREFILL_SELECT, c_max=1.0, budget_shape="pyramidkv")}, order=3,
    rule=lambda scores, cfg, head_dim, layer=0, scale=1.0, spill=0.0: full_plan(scores.numel(), head_dim),
    budget=pyramid_weights, citation="Cai et al., 2024, PyramidKV, arXiv:2406.02069",
))
