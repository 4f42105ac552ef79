"""AGACC: attention-guided adaptive KV-cache compression for Hugging Face transformers."""
from agacc.config import AGACCConfig
from agacc.cache import CompressedCache
from agacc.planner import Geometry, fit_threshold_scale, fit_thresholds, plan_tiers, planned_bytes
from agacc.models import enable, load_model

__all__ = ["AGACCConfig", "CompressedCache", "Geometry", "enable", "load_model", "fit_threshold_scale", "fit_thresholds",
           "plan_tiers", "planned_bytes"]
__version__ = "0.1.0"
