"""Names in the seed's JSON configs -> classes: `model_id` for models, the diffusion section's `model_id` for
samplers (a scheduler is not a model, so it has its own registry)."""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Dict, List, Type

_BUILTIN = ("mindspeed_mm.models.predictor.stepvideo.model", "mindspeed_mm.models.ae",
            "mindspeed_mm.models.text_encoder", "mindspeed_mm.models.diffusion")


class Registry:
    """name -> class for one kind of component; `register` is a class decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: Dict[str, Type] = {}

    def register(self, name: str) -> Callable[[Type], Type]:
        def add(cls: Type) -> Type:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._classes[name].__name__}")
            self._classes[name] = cls
            return cls

        return add

    def get(self, name: str) -> Type:
        """The class registered as `name`; the error lists what is registered."""
        _import_builtin()
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._classes), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"{self.kind} {name!r} is not registered.{hint} Registered: "
                           f"{', '.join(sorted(self._classes))}.") from None

    def names(self) -> List[str]:
        _import_builtin()
        return sorted(self._classes)


MODELS = Registry("model_id")
SCHEDULERS = Registry("scheduler model_id")

register_model = MODELS.register
get_model_class = MODELS.get
registered_model_ids = MODELS.names
register_scheduler = SCHEDULERS.register
get_scheduler_class = SCHEDULERS.get


def _import_builtin() -> None:
    # Importing the model packages runs their registration decorators.
    for module in _BUILTIN:
        importlib.import_module(module)
