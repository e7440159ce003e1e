"""Model registry and the StepVideo models (DiT, VAE, text encoders)."""

from .registry import get_model_class, get_scheduler_class, register_model, register_scheduler, registered_model_ids

__all__ = ["get_model_class", "get_scheduler_class", "register_model", "register_scheduler", "registered_model_ids"]
