"""The lossless reference: every entry in the model's dtype, no tiers (importance is still tracked
for display)."""
from agacc.methods import Method, register

register(Method("full", presets={"full": dict(compress=False, store_dtype="model", rule="agacc")}, kind="lossless",
                citation="the uncompressed cache"))
