"""FastKV (Jo et al., 2025, "FastKV: KV Cache Compression for Fast Long-Context Processing with
Token-Selective Propagation", arXiv:2502.01068): SnapKV-style selection in the early layers; from the
TSP layer (``tsp_layer`` 15, about half depth) on, every layer keeps only the tokens that layer selected."""
from agacc.methods import PREFILL_SELECT, Method, register

register(Method(
    "fastkv", presets={"fastkv": dict(PREFILL_SELECT, tsp_layer=15, rule="snapkv")}, order=5,
    citation="Jo et al., 2025, FastKV, arXiv:2502.01068",
))
