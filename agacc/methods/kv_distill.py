"""KV-Distill (Chari et al., 2025, arXiv:2503.10337) trains an adaptor (LoRA-style) that distils the
context KV into a shorter sequence. It needs a training run with a distillation objective over a
corpus, which cannot be done honestly on a CPU-only machine in reasonable time: listed, not available."""
from agacc.methods import Method, register

register(Method(
    "kv-distill", unavailable=("KV-Distill (Chari et al., 2025, arXiv:2503.10337) needs trained adaptor weights; "
                               "training them is not feasible on this CPU-only setup, so it is not implemented."),
    citation="Chari et al., 2025, KV-Distill, arXiv:2503.10337",
))
