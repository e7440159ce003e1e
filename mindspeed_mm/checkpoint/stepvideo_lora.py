"""LoRA adapters of the StepVideo DiT outside training: read one (any TP), merge it into a base, write it peft-style.

An adapter checkpoint is the `--save` folder of a LoRA run (`--lora-target-modules`): Megatron-layout rank files
holding only `<layer>.lora_A` (r, in) and `<layer>.lora_B` (out, r) in our key names, and `iter_*/lora.json` with
the settings (r, alpha, dropout, target_modules, base, head_dim). Merging adds `B @ A * alpha / r` to each adapted
weight (in float32, rounded once to the base's dtype). The peft export renames the layers to the official ones
(`attn1.wqkv`, ...), puts the fused QKV / KV rows of B in the official per-head order, and writes
`adapter_model.safetensors` (`base_model.model.<layer>.lora_A.weight`, ...) with `adapter_config.json`, which peft's
`PeftModel.from_pretrained` loads onto a model with the official module names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import stepvideo_adapter as adapter
from .conversion_checks import ConversionError, print_log
from .megatron_layout import iteration_dir, read_tracker

LORA_RECORD_FILE = "lora.json"
LORA_SUFFIXES = (".lora_A", ".lora_B")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A full (unsharded) adapter: {our key: tensor} and its settings."""

    tensors: Dict[str, torch.Tensor]
    r: int
    alpha: float
    dropout: float
    target_modules: List[str]
    base: Optional[str]
    head_dim: Optional[int]
    source: str

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def layers(self) -> List[str]:
        return sorted({k[: -len(".lora_A")] for k in self.tensors if k.endswith(".lora_A")})


def read_lora_record(path) -> Optional[dict]:
    """The lora.json of the tracked iteration of a LoRA --save folder, or None."""
    record = iteration_dir(Path(path), read_tracker(Path(path))) / LORA_RECORD_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def read_adapter(path, alpha: Optional[float] = None, r: Optional[int] = None, log=print_log) -> Adapter:
    """The adapter of a LoRA run's --save folder, merged over its TP ranks. `alpha` / `r` (the --lora-alpha /
    --lora-r flags) are needed only when the folder has no lora.json, and must agree with it when it has one."""
    from .megatron_source import read_megatron_full

    source = Path(path)
    if not source.exists():
        raise ConversionError(f"--lora-load {source} does not exist; point it at the --save folder of a LoRA run.")
    record = read_lora_record(source) or {}
    tensors, _ = read_megatron_full(source, log)
    other = sorted(k for k in tensors if not k.endswith(LORA_SUFFIXES))
    if other or not tensors:
        raise ConversionError(f"--lora-load {source} is not a LoRA adapter checkpoint (it holds "
                              f"{other[:3] or 'nothing'}...); pass the --save folder of a run with "
                              f"--lora-target-modules.")
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise ConversionError(f"{source}: the adapters have different ranks {sorted(ranks)}.")
    found_r = ranks.pop()
    for flag, given, recorded in (("--lora-r", r, record.get("r")), ("--lora-alpha", alpha, record.get("alpha"))):
        if given is not None and recorded is not None and float(given) != float(recorded):
            raise ConversionError(f"{flag} {given} disagrees with {source}'s {LORA_RECORD_FILE} ({recorded}); drop "
                                  f"the flag (the record is what the adapter was trained with).")
    if r is not None and r != found_r:
        raise ConversionError(f"--lora-r {r} disagrees with the adapter in {source} (r {found_r}).")
    alpha = record.get("alpha", alpha)
    if alpha is None:
        raise ConversionError(f"{source} has no {LORA_RECORD_FILE}: pass the --lora-alpha it was trained with.")
    return Adapter(tensors, found_r, float(alpha), float(record.get("dropout", 0.0)),
                   list(record.get("target_modules", [])), record.get("base"), record.get("head_dim"), str(source))


def merge_adapter(full: Dict[str, torch.Tensor], lora: Adapter, log=print_log) -> None:
    """Add the adapter to the full base state dict (our names) in place: W += B @ A * alpha / r."""
    problems = []
    for layer in lora.layers():
        key = f"{layer}.weight"
        a, b = lora.tensors[f"{layer}.lora_A"], lora.tensors.get(f"{layer}.lora_B")
        if key not in full:
            problems.append(f"{layer}: the base has no {key}")
        elif b is None or tuple(full[key].shape) != (b.shape[0], a.shape[1]):
            problems.append(f"{layer}: base {tuple(full[key].shape)} vs adapter B @ A "
                            f"{None if b is None else (b.shape[0], a.shape[1])}")
    if problems:
        raise ConversionError(f"the adapter {lora.source} does not fit the base: " + "; ".join(problems[:5]) +
                              ". Use the base the adapter was trained on" +
                              (f" ({lora.base})." if lora.base else "."))
    with torch.no_grad():
        for layer in lora.layers():
            key = f"{layer}.weight"
            delta = lora.tensors[f"{layer}.lora_B"].float() @ lora.tensors[f"{layer}.lora_A"].float()
            full[key] = (full[key].float() + delta * lora.scale).to(full[key].dtype)
    log(f"merged the LoRA adapter {lora.source} (r {lora.r}, alpha {lora.alpha:g}) into {len(lora.layers())} "
        f"layers")


def _peft_tensor(key: str, tensor: torch.Tensor, head_dim: int):
    layer, leaf = key.rsplit(".", 1)
    parts = adapter.fused_parts(f"{layer}.weight")
    if leaf == "lora_B" and parts > 1:  # B's rows are the fused weight's rows: official per-head order
        tensor = adapter.grouped_to_per_head(tensor, parts, head_dim, key)
    official_layer = adapter.our_key_to_official(f"{layer}.weight")[: -len(".weight")]
    return f"{PEFT_PREFIX}{official_layer}.{leaf}.weight", tensor.contiguous()


def official_targets(target_modules: List[str]) -> List[str]:
    return [adapter.our_key_to_official(f"{t}.weight")[: -len(".weight")] for t in target_modules]


def write_peft_adapter(lora: Adapter, target, num_heads: Optional[int] = None, overwrite: bool = False,
                       log=print_log) -> Path:
    """The adapter alone, peft-style with the official names: adapter_model.safetensors + adapter_config.json."""
    from safetensors.torch import save_file

    from .atomic import AtomicDir

    head_dim = lora.head_dim
    if head_dim is None:
        qkv_a = next((t for k, t in lora.tensors.items() if k.endswith("attn1.proj_qkv.lora_A")), None)
        if num_heads is None or qkv_a is None:
            needs = any(adapter.fused_parts(f"{layer}.weight") > 1 for layer in lora.layers())
            if needs:
                raise ConversionError(f"{lora.source} records no head_dim (an adapter saved by an older version): "
                                      f"pass --num_heads (48 for the released model) to order the fused QKV rows.")
        else:
            head_dim = qkv_a.shape[1] // num_heads
    peft = dict(_peft_tensor(k, v, head_dim) for k, v in lora.tensors.items())
    targets = lora.target_modules or sorted({layer.split(".", 2)[2] for layer in lora.layers()})
    config = {"peft_type": "LORA", "task_type": None, "r": lora.r, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": official_targets(targets), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": lora.base, "modules_to_save": None, "use_rslora": False,
              "use_dora": False}
    with AtomicDir(Path(target), overwrite, Path(lora.source)) as out:
        save_file(peft, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
        (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    log(f"wrote the adapter ({len(lora.layers())} layers, r {lora.r}) peft-style with the official names to {target}")
    return Path(target)
