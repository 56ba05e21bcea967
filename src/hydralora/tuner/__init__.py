"""HydraLoRA as a PEFT tuner, laid out as PEFT's own tuners: config, layer, model."""

from .config import HydraLoraConfig
from .layer import HydraLinear, HydraLoraLayer
from .model import HydraLoraModel

__all__ = ["HydraLoraConfig", "HydraLinear", "HydraLoraLayer", "HydraLoraModel"]
