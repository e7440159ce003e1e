"""The names of the user guide's era (MindSpeed-MM's StepVideo example of May 2025) and what they mean here.

This module is the one table of them: `KEYS` for the JSON files, `FLAGS` for the command line. docs/config.md
("Guide-era names") shows the same table for readers; a test checks that the two agree.

How an era key is treated, by `kind`:

- `rename`: the era's name of a key this project has (`num_attention_heads` is `num_heads`). Both names may be given
  when their values agree; otherwise it is an error.
- `value`: a key both eras have, whose era values map to today's (`video_reader_type: "decoder"` is `"DecordVideo"`).
- `moved`: a key the era kept one section lower (`preprocess_parameters.skip_define_frame_index`).
- `feature`: a key saying whether the rows are pre-extracted features; together they decide `dataset_type`.
- `no effect`: a setting for something this project does one fixed way. It is accepted and named in a notice; a
  value that contradicts what the code does (or the released weights) is an error that says why.

Mapping happens in `base.from_dict` before the strict checks, so unknown keys stay errors, and typo suggestions come
from both eras' names (`suggest`). Notices are collected while a job's configs load and printed once per job
(`collect_notices`, `notices_text`).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

RENAME, VALUE, MOVED, FEATURE, NO_EFFECT = "rename", "value", "moved", "feature", "no effect"
NUMBER = (int, float)

DDPM_WHY = ("the released StepVideo DiT is a flow-matching model (it predicts the velocity x0 - noise, and t = 0 is "
            "pure noise), so it is trained and sampled with flow matching; a DDPM schedule would train it toward "
            "another target")


@dataclass(frozen=True)
class KeyAlias:
    section: str                # the config dataclass the era key sits in (its JSON section)
    key: str                    # the era's key
    kind: str
    target: str = ""            # rename / moved: today's key
    values: Mapping[Any, Any] = field(default_factory=dict)   # era value -> today's value
    allowed: Optional[Tuple[Any, ...]] = None                 # no effect: the values accepted (None: any of `types`)
    types: Tuple[type, ...] = ()                              # no effect: the JSON types accepted
    refused: Mapping[Any, str] = field(default_factory=dict)  # value -> why it contradicts the code or the weights
    why: str = ""               # what this project does instead (the notice) / what the key says


KEYS: Tuple[KeyAlias, ...] = (
    # --mm-model
    KeyAlias("PredictorConfig", "num_attention_heads", RENAME, "num_heads"),
    KeyAlias("PredictorConfig", "attention_head_dim", RENAME, "head_dim"),
    KeyAlias("DPOConfig", "histgram_path", RENAME, "histogram_path"),
    KeyAlias("DiffusionConfig", "num_train_steps", RENAME, "num_train_timesteps"),
    KeyAlias("DiffusionConfig", "model_id", VALUE, values={"DDPM": "flow_match_discrete_scheduler"}, why=DDPM_WHY),
    KeyAlias("DiffusionConfig", "prediction_type", NO_EFFECT, allowed=("v_prediction",),
             refused={"epsilon": "the released DiT predicts the flow velocity x0 - noise, not the noise",
                      "sample": "the released DiT predicts the flow velocity x0 - noise, not the clean sample"},
             why="the DiT predicts the flow-matching velocity x0 - noise"),
    KeyAlias("DiffusionConfig", "rescale_betas_zero_snr", NO_EFFECT, allowed=(True,),
             refused={False: "flow matching starts sampling from pure noise (zero terminal SNR), as the released "
                             "weights were trained"},
             why="flow matching starts sampling from pure noise, zero terminal SNR, already"),
    KeyAlias("DiffusionConfig", "guidance_scale", NO_EFFECT, types=NUMBER,
             why="guidance is a sampling setting: pipeline_config.guidance_scale"),
    KeyAlias("DiffusionConfig", "timestep_spacing", NO_EFFECT, allowed=("leading", "trailing", "linspace"),
             why="sampling uses the shifted flow-matching schedule of shift and num_inference_timesteps"),
    KeyAlias("DiffusionConfig", "t_sample_method", NO_EFFECT, allowed=("explicit_uniform", "random"),
             why="training draws t logit-normally, shifted by train_shift when set"),
    KeyAlias("DiffusionConfig", "snr_gamma", NO_EFFECT, types=NUMBER + (type(None),),
             why="the loss is the unweighted per-sample velocity MSE"),
    KeyAlias("DiffusionConfig", "device", NO_EFFECT, allowed=("npu", "cuda", "cpu", "auto"),
             why="the runtime detects the device"),
    # --mm-data
    KeyAlias("PreprocessParameters", "data_process_type", RENAME, "video_processor_type",
             values={"CogvideoX": "CogVideoXProcessor"}),
    KeyAlias("PreprocessParameters", "fps", RENAME, "train_fps"),
    KeyAlias("PreprocessParameters", "video_reader_type", VALUE,
             values={"decoder": "DecordVideo", "torchvision": "PyAVVideo"}),
    KeyAlias("PreprocessParameters", "skip_define_frame_index", MOVED, "skip_define_frame_index",
             why="dataset_param.skip_define_frame_index"),
    KeyAlias("PreprocessParameters", "dataloader_num_workers", NO_EFFECT, types=(int,),
             why="--num-workers sets the DataLoader workers"),
    KeyAlias("BasicParameters", "data_storage_mode", FEATURE, values={"sorafeatured": "standard"},
             why="\"sorafeatured\": data_path lists the features of feature extraction (dataset_type \"feature\")"),
    KeyAlias("BasicParameters", "use_video_feature", FEATURE, why="the rows hold VAE latents"),
    KeyAlias("BasicParameters", "use_text_feature", FEATURE, why="the rows hold text-encoder states"),
    KeyAlias("DatasetParam", "use_feature_data", FEATURE, why="the rows are .pt features (DPO data)"),
)


@dataclass(frozen=True)
class EraFlag:
    flag: str
    type: Any                   # argparse type; None: a switch (store_true)
    checks: str = ""            # the predictor value it must agree with ("num_layers", "hidden_size", "num_heads")
    why: str = "the DiT is built from the model JSON's predictor section"


FLAGS: Tuple[EraFlag, ...] = (
    EraFlag("--num-layers", int, "num_layers"),
    EraFlag("--hidden-size", int, "hidden_size"),
    EraFlag("--num-attention-heads", int, "num_heads"),
    EraFlag("--seq-length", int),
    EraFlag("--max-position-embeddings", int),
    EraFlag("--attention-dropout", float),
    EraFlag("--hidden-dropout", float),
    EraFlag("--tokenizer-type", str),
    EraFlag("--vocab-size", int),
    EraFlag("--position-embedding-type", str),
    EraFlag("--rotary-base", float),
    EraFlag("--swiglu", None),
    EraFlag("--no-masked-softmax-fusion", None),
    EraFlag("--eval-interval", int, why="no validation set is used"),
    EraFlag("--eval-iters", int, why="no validation set is used"),
)


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def flag_given(args, flag: EraFlag) -> bool:
    value = getattr(args, flag_dest(flag.flag), None)
    return value is not None and value is not False


# ---- suggestions ---------------------------------------------------------------------------


def _one_edit_apart(a: str, b: str) -> bool:
    """True when one insertion, deletion, substitution or swap of neighbours turns a into b."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def suggest(word: str, names: Iterable[str]) -> Optional[str]:
    """The name closest to `word` when it is close enough to be a misspelling of it, else None."""
    names = list(dict.fromkeys(names))
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.75)
    if close:
        return close[0]
    near = [n for n in names if _one_edit_apart(word, n)]
    return near[0] if near else None


def era_names(section: str) -> Dict[str, str]:
    """{era key: today's key or "" } of one section, for suggestions."""
    return {a.key: a.target for a in KEYS if a.section == section and a.key}


# ---- notices -------------------------------------------------------------------------------


@dataclass
class _Notes:
    ignored: Dict[str, List[str]] = field(default_factory=dict)   # source -> "key (why)"
    lines: List[str] = field(default_factory=list)


_ACTIVE: contextvars.ContextVar[Optional[_Notes]] = contextvars.ContextVar("mindspeed_mm_notices", default=None)


@contextlib.contextmanager
def collect_notices() -> Iterator[_Notes]:
    """Collect the notices of the configs loaded and the flags checked inside. The outermost scope prints them, once
    per job (rank 0), when it ends without an error; an inner scope (a config file loaded within a job) adds to it."""
    active = _ACTIVE.get()
    if active is not None:
        yield active
        return
    notes = _Notes()
    token = _ACTIVE.set(notes)
    try:
        yield notes
    finally:
        _ACTIVE.reset(token)
    from ..cli import notice

    for line in notices_text(notes):
        notice(line)


def notices_text(notes: _Notes) -> List[str]:
    """The notice lines (without the 'notice: ' prefix): one per config file with keys of no effect, then the
    standalone ones."""
    out = [f"{source}: accepted with no effect here: {'; '.join(items)} (see docs/config.md, Guide-era names)"
           for source, items in notes.ignored.items()]
    return list(dict.fromkeys(out + notes.lines))


def _record(source: str, item: Optional[str] = None, line: Optional[str] = None) -> None:
    with collect_notices() as notes:
        if line is not None:
            notes.lines.append(line)
        elif item not in notes.ignored.setdefault(source, []):
            notes.ignored[source].append(item)


def add_notice(line: str) -> None:
    """A standalone notice line of the job being loaded (printed with the others, once)."""
    _record("", line=line)


# ---- applying the table ----------------------------------------------------------------------


def _error(source: str, path: str, message: str):
    from .base import ConfigError

    return ConfigError(f"{source}: key '{path}': {message}")


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _put(data: dict, key: str, value: Any, era_key: str, source: str, prefix: str) -> None:
    """Set today's `key` from the era's `era_key`; both given with different values is an error."""
    if key in data and data[key] != value:
        raise _error(source, _join(prefix, era_key),
                     f"{_show(value)} (the guide-era name of '{_join(prefix, key)}') contradicts "
                     f"'{_join(prefix, key)}': {_show(data[key])}; keep one of them.")
    data[key] = value


def _rename(alias: KeyAlias, data: dict, source: str, prefix: str) -> None:
    value = data.pop(alias.key)
    if alias.values:
        if _among(value, alias.values):
            value = alias.values[value]
        elif not _among(value, alias.values.values()):
            raise _error(source, _join(prefix, alias.key),
                         f"{_show(value)} is not one of {', '.join(map(_show, alias.values))} (the guide-era name "
                         f"of '{alias.target}', which takes {', '.join(map(_show, alias.values.values()))}).")
    _put(data, alias.target, value, alias.key, source, prefix)


def _among(value: Any, options: Iterable[Any]) -> bool:
    """`value in options`, with true/false never equal to 1/0."""
    return not isinstance(value, (dict, list)) and any(type(value) is type(o) and value == o for o in options)


def _no_effect(alias: KeyAlias, data: dict, source: str, prefix: str) -> None:
    path = _join(prefix, alias.key)
    value = data.pop(alias.key)
    if _among(value, alias.refused):
        raise _error(source, path, f"{_show(value)} contradicts the released StepVideo weights: "
                                   f"{alias.refused[value]}. Use {', '.join(map(_show, alias.allowed or ()))} "
                                   f"or drop the key.")
    if alias.allowed is not None and not _among(value, alias.allowed):
        raise _error(source, path, f"{_show(value)} is not one of {', '.join(map(_show, alias.allowed))} "
                                   f"(accepted for the guide's configs; it has no effect here: {alias.why}).")
    if alias.types and (isinstance(value, bool) or not isinstance(value, alias.types)):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in alias.types)
        raise _error(source, path, f"expected {names}, got {_show(value)[:80]}.")
    _record(source, item=f"{path} ({alias.why})")


def _features(data: dict, source: str, prefix: str) -> None:
    """Resolve the era's feature keys of `dataset_param` into `dataset_type` (see docs/config.md)."""
    basic = data.get("basic_parameters")
    basic = dict(basic) if isinstance(basic, dict) else None
    said: List[Tuple[str, Any]] = []  # (key path, value) of every feature key given
    if basic is not None:
        data["basic_parameters"] = basic
        if basic.get("data_storage_mode") == "sorafeatured":
            basic["data_storage_mode"] = "standard"
            said.append((_join(prefix, "basic_parameters.data_storage_mode"), "sorafeatured"))
        for key in ("use_video_feature", "use_text_feature"):
            if key in basic:
                said.append((_join(prefix, f"basic_parameters.{key}"), basic.pop(key)))
    if "use_feature_data" in data:
        said.append((_join(prefix, "use_feature_data"), data.pop("use_feature_data")))
    if not said:
        return
    for path, value in said:
        if value != "sorafeatured" and not isinstance(value, bool):
            raise _error(source, path, f"expected true or false, got {_show(value)[:80]}.")
    declared = [(p, v) for p, v in said if isinstance(v, bool)]
    features = data.get("dataset_type") == "feature" or any(v == "sorafeatured" or v is True for _, v in said)
    if not features:
        return
    against = [p for p, v in declared if v is False]
    if against:
        why = ", ".join(f"'{p}'" for p, v in said if v is True or v == "sorafeatured") or "dataset_type 'feature'"
        raise _error(source, against[0],
                     f"false contradicts {why}: the rows are the .pt files of feature extraction, which always hold "
                     f"both the VAE latents and the text states. Set it true for features, or train on raw videos "
                     f"(data_storage_mode \"standard\", dataset_type \"t2v\"/\"i2v\", no feature keys).")
    if data.get("dataset_type") in ("t2v", "i2v"):
        data["dataset_type"] = "feature"


def apply(section: str, data: Any, source: str, prefix: str) -> Any:
    """`data` (one JSON object of `section`) with the era's names mapped; errors and notices as the table says."""
    if not isinstance(data, dict):
        return data
    aliases = [a for a in KEYS if a.section == section]
    if section == "DatasetParam":
        aliases += [a for a in KEYS if a.kind == MOVED and a.section == "PreprocessParameters"]
    if not aliases:
        return data
    data = dict(data)
    for alias in aliases:
        if alias.kind == MOVED:
            child = data.get("preprocess_parameters")
            if section == "DatasetParam" and isinstance(child, dict) and alias.key in child:
                child = dict(child)
                data["preprocess_parameters"] = child
                _put(data, alias.target, child.pop(alias.key), f"preprocess_parameters.{alias.key}", source, prefix)
            elif section == "PreprocessParameters" and alias.key in data:
                data.pop(alias.key)  # read on its own: the same no-op as dataset_param.skip_define_frame_index
        elif alias.key not in data:
            continue
        elif alias.kind == RENAME:
            _rename(alias, data, source, prefix)
        elif alias.kind == VALUE:
            value = data[alias.key]
            if _among(value, alias.values):
                data[alias.key] = alias.values[value]
                if alias.why:
                    _record(source, line=f"{source}: {_join(prefix, alias.key)} {_show(value)} runs as "
                                         f"{_show(alias.values[value])}: {alias.why}.")
        elif alias.kind == NO_EFFECT:
            _no_effect(alias, data, source, prefix)
    if section == "DatasetParam":
        _features(data, source, prefix)
    return data


SECTIONS = {"PredictorConfig": "predictor", "DiffusionConfig": "diffusion", "DPOConfig": "dpo",
            "DatasetParam": "dataset_param", "BasicParameters": "dataset_param.basic_parameters",
            "PreprocessParameters": "dataset_param.preprocess_parameters"}


def describe(alias: KeyAlias) -> str:
    """Today's meaning of one entry, as docs/config.md shows it."""
    if alias.kind == RENAME:
        mapped = "".join(f", {_show(k)} -> {_show(v)}" for k, v in alias.values.items())
        return f"`{alias.target}`{mapped}"
    if alias.kind == VALUE:
        return ", ".join(f"{_show(k)} -> {_show(v)}" for k, v in alias.values.items())
    if alias.kind == MOVED:
        return f"`dataset_param.{alias.target}`"
    if alias.kind == FEATURE:
        return f"feature data: {alias.why}"
    values = []
    if alias.allowed is not None:
        values.append("accepts " + ", ".join(map(_show, alias.allowed)))
    if alias.refused:
        values.append("refuses " + ", ".join(map(_show, alias.refused)))
    if alias.types:
        kinds = {int: "any integer", float: "any number", type(None): "null"}
        names = [kinds[t] for t in alias.types if not (t is int and float in alias.types)]
        values.append("accepts " + " or ".join(names))
    return f"{'; '.join(values)}. {alias.why[0].upper()}{alias.why[1:]}"


def table_rows(aliases: Sequence[KeyAlias] = KEYS) -> List[str]:
    """The rows of docs/config.md's table of guide-era keys, in table order."""
    return [f"| `{SECTIONS[a.section]}` | `{a.key}` | {a.kind} | {describe(a)} |" for a in aliases]


def reverse_rows(aliases: Sequence[KeyAlias] = KEYS) -> List[str]:
    """Today's key -> the guide-era name or values, for the renamed, moved and remapped keys."""
    rows = []
    for a in aliases:
        section = SECTIONS[a.section]
        if a.kind in (RENAME, MOVED):
            today = f"dataset_param.{a.target}" if a.kind == MOVED else f"{section}.{a.target}"
            era = f"`{section}.{a.key}`" + "".join(f", {_show(v)} was {_show(k)}" for k, v in a.values.items())
            rows.append(f"| `{today}` | {era} |")
        elif a.kind == VALUE:
            was = ", ".join(f"{_show(v)} was {_show(k)}" for k, v in a.values.items())
            rows.append(f"| `{section}.{a.key}` | {was} |")
    return rows


def flag_rows(flags: Sequence[EraFlag] = FLAGS) -> List[str]:
    """The rows of docs/config.md's table of guide-era flags."""
    return [f"| `{f.flag}` | " + (f"must equal `predictor.{f.checks}`" + (" (num_heads x head_dim)"
                                                                          if f.checks == "hidden_size" else "")
                                  if f.checks else f"no effect: {f.why}") + " |" for f in flags]
