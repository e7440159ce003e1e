"""docs/config.md lists every key the strict config loader accepts."""

import dataclasses
import re
from pathlib import Path

from mindspeed_mm.config import data, model, tool

DOC = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()


def _sections():
    parts = re.split(r"^### ", DOC, flags=re.M)[1:]
    return [set(re.findall(r"^\| `([a-z_0-9]+)` \|", part, flags=re.M)) for part in parts]


def test_every_config_key_is_documented():
    documented = _sections()
    for module in (model, data, tool):
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                keys = {f.name for f in dataclasses.fields(obj)}
                assert any(keys <= section for section in documented), f"{obj.__name__}: {sorted(keys)}"
