"""Seed 002: C_j = alpha * sum_i A_ij + (1 - alpha) * beta * sum_i A_ij, one scaled attention sum,
scored with the thresholds rule of seed 000."""
from agacc.methods import Method, register

register(Method(
    "attention-sum", presets={"attention-sum": dict(scoring="sum", position_norm="none", rule="agacc")},
    kind="adaptive", order=2, citation="seed 002: the attention-sum variant (shared/seeds/002)",
))
