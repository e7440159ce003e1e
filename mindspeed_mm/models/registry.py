"""`model_id` -> class, as named in the seed's JSON configs."""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Type

_REGISTRY: Dict[str, Type] = {}


def register_model(model_id: str) -> Callable[[Type], Type]:
    """Class decorator: make `cls` buildable from a config whose `model_id` is `model_id`."""

    def add(cls: Type) -> Type:
        if model_id in _REGISTRY and _REGISTRY[model_id] is not cls:
            raise ValueError(f"model_id {model_id!r} is already registered to {_REGISTRY[model_id].__name__}")
        _REGISTRY[model_id] = cls
        return cls

    return add


def get_model_class(model_id: str) -> Type:
    """The class registered as `model_id`; the error lists what is registered."""
    _import_builtin_models()
    try:
        return _REGISTRY[model_id]
    except KeyError:
        close = difflib.get_close_matches(model_id, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"model_id {model_id!r} is not registered.{hint} Registered: {', '.join(sorted(_REGISTRY))}."
        ) from None


def registered_model_ids():
    _import_builtin_models()
    return sorted(_REGISTRY)


def _import_builtin_models() -> None:
    # Importing the model packages runs their @register_model decorators.
    import importlib

    for module in ("mindspeed_mm.models.predictor.stepvideo.model", "mindspeed_mm.models.ae",
                   "mindspeed_mm.models.text_encoder", "mindspeed_mm.models.diffusion"):
        importlib.import_module(module)
