"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453): 4 attention-sink tokens + a sliding window of the most recent tokens."""
from agacc.methods import SELECT, Method, register
from agacc.policy import select_recent, selection_rule

register(Method(
    "streamingllm", presets={"streamingllm": dict(scoring="sum", recent_window=16, n_sink=4, n_r=8, n_w=8, **SELECT)},
    rule=selection_rule(lambda scores, k: select_recent(scores.numel(), k)), order=1,
    citation="Xiao et al., 2024, StreamingLLM, arXiv:2309.17453",
))
