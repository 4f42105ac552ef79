"""AGACC: attention-guided adaptive KV-cache compression for Hugging Face transformers."""
from agacc.config import AGACCConfig
from agacc.cache import CompressedCache, fit_threshold_scale, plan_tiers
from agacc.models import enable, load_model

__all__ = ["AGACCConfig", "CompressedCache", "enable", "load_model", "fit_threshold_scale", "plan_tiers"]
__version__ = "0.1.0"
