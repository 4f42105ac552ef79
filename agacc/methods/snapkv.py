"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv:2404.14469): the last 32 prompt queries (observation window) vote; votes max-pooled over 7
neighbours (``pool_kernel``); the top-k blocks and the window are kept, once, at prefill."""
from agacc.methods import PREFILL_SELECT, Method, register
from agacc.policy import select_topk, selection_rule

register(Method(
    "snapkv", presets={"snapkv": dict(PREFILL_SELECT)}, rule=selection_rule(select_topk), order=2,
    citation="Li et al., 2024, SnapKV, arXiv:2404.14469",
))
