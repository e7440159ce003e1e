"""The user guide's era of flags and JSON keys (MindSpeed-MM, May 2025) loads: every alias maps, contradictions and
refused values are errors that say why, unknown names stay errors with suggestions from both eras, and notices are
one line each. The era's files are written by tests/helpers/guide_era.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_mm.arguments import ArgumentError, parse_args
from mindspeed_mm.config import ConfigError, from_dict, load_config
from mindspeed_mm.config.data import DatasetParam, MMDataConfig, PreprocessParameters
from mindspeed_mm.config.model import DiffusionConfig, DPOConfig, MMModelConfig, PredictorConfig
from mindspeed_mm.config.tool import MMToolConfig
from tests.helpers import guide_era as era

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def notices(capsys) -> list:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: ")]


@pytest.fixture
def ws(tmp_path):
    """A workspace: fake weights, a raw-video dataset, a feature folder with data.txt, and a checkpoint folder."""
    weights = era.fake_weights(tmp_path / "weights")
    (tmp_path / "data" / "videos").mkdir(parents=True)
    (tmp_path / "data" / "videos" / "1.mp4").write_bytes(b"x")
    (tmp_path / "data" / "data.jsonl").write_text('{"file": "videos/1.mp4", "captions": "a cat"}\n')
    features = tmp_path / "sora_features"
    (features / "features").mkdir(parents=True)
    for name in ("a.pt", "b.pt"):
        (features / "features" / name).write_bytes(b"")
    (features / "data.jsonl").write_text("".join(json.dumps({"file": f"features/{n}", "captions": "c"}) + "\n"
                                                 for n in ("a.pt", "b.pt")))
    (features / "empty_prompt.pt").write_bytes(b"")  # feature extraction writes it (caption dropout)
    (tmp_path / "data.txt").write_text(era.data_txt_line(features))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "hist.json").write_text("{}")
    return {"root": tmp_path, "weights": weights, "features": features, "ckpt": tmp_path / "ckpt",
            "tool": REPO / "mindspeed_mm" / "tools" / "tools.json"}


def _write(ws, name, obj) -> Path:
    return era.write_json(ws["root"] / name, obj)


# ---- every key alias ------------------------------------------------------------------------


def test_renamed_keys_map_to_todays_keys():
    p = from_dict(PredictorConfig, {"num_attention_heads": 2, "attention_head_dim": 128}, source="m.json",
                  prefix="predictor")
    assert (p.num_heads, p.head_dim, p.hidden_size) == (2, 128, 256)
    assert from_dict(DPOConfig, {"histgram_path": "h.json"}).histogram_path == "h.json"
    assert from_dict(DiffusionConfig, {"num_train_steps": 500}).num_train_timesteps == 500
    pre = from_dict(PreprocessParameters, {"data_process_type": "CogvideoX", "fps": 12, "video_reader_type": "decoder"})
    assert (pre.video_processor_type, pre.train_fps, pre.video_reader_type) == ("CogVideoXProcessor", 12, "DecordVideo")
    assert from_dict(PreprocessParameters, {"video_reader_type": "torchvision"}).video_reader_type == "PyAVVideo"
    param = from_dict(DatasetParam, {"dataset_type": "t2v", "basic_parameters": {"data_path": "d.jsonl"},
                                     "preprocess_parameters": {"skip_define_frame_index": True}})
    assert param.skip_define_frame_index is True  # moved up a level


def test_both_names_may_agree_but_not_contradict():
    p = from_dict(PredictorConfig, {"num_heads": 4, "num_attention_heads": 4, "head_dim": 128})
    assert p.num_heads == 4
    with pytest.raises(ConfigError, match=r"m.json: key 'predictor.num_attention_heads': 2 \(the guide-era name of "
                                          r"'predictor.num_heads'\) contradicts 'predictor.num_heads': 4"):
        from_dict(PredictorConfig, {"num_heads": 4, "num_attention_heads": 2}, source="m.json", prefix="predictor")
    with pytest.raises(ConfigError, match=r"'data_process_type': \"OpenSora\" is not one of \"CogvideoX\" \(the "
                                          r"guide-era name of 'video_processor_type'"):
        from_dict(PreprocessParameters, {"data_process_type": "OpenSora"}, source="d.json")


def test_feature_keys_decide_the_dataset_type():
    def param(basic, **kw):
        return from_dict(DatasetParam, {"dataset_type": "t2v", "basic_parameters": {"data_path": "x", **basic},
                                        **kw}, source="data.json", prefix="dataset_param")

    featured = param({"data_storage_mode": "sorafeatured", "use_text_feature": True, "use_video_feature": True})
    assert featured.dataset_type == "feature" and featured.basic_parameters.data_storage_mode == "standard"
    assert param({}, use_feature_data=True).dataset_type == "feature"
    assert param({"data_storage_mode": "standard"}, use_feature_data=False).dataset_type == "t2v"
    with pytest.raises(ConfigError, match=r"data.json: key 'dataset_param.basic_parameters.use_video_feature': false "
                                          r"contradicts 'dataset_param.basic_parameters.data_storage_mode'.*"
                                          r"always hold both the VAE latents and the text states"):
        param({"data_storage_mode": "sorafeatured", "use_video_feature": False})
    with pytest.raises(ConfigError, match=r"'dataset_param.use_feature_data': false contradicts dataset_type "
                                          r"'feature'"):
        from_dict(DatasetParam, {"dataset_type": "feature", "basic_parameters": {"data_path": "x"},
                                 "use_feature_data": False}, source="data.json", prefix="dataset_param")
    with pytest.raises(ConfigError, match=r"'dataset_param.use_feature_data': false contradicts "
                                          r"'dataset_param.basic_parameters.use_text_feature'"):
        param({"use_text_feature": True}, use_feature_data=False)


def test_tools_keys_must_say_what_extraction_does():
    assert from_dict(MMToolConfig, era.tools("out")).sorafeature.save_path == "out"
    with pytest.raises(ConfigError, match="extract_text_feature false: feature extraction always writes"):
        from_dict(MMToolConfig, {"sorafeature": {"extract_text_feature": False}}, source="tools.json")
    with pytest.raises(ConfigError, match=r"'sorafeature.data_storage_mode': \"standard\" is not one of "
                                          r"'sorafeatured'"):
        from_dict(MMToolConfig, {"sorafeature": {"data_storage_mode": "standard"}}, source="tools.json")


# ---- the DPO file's DDPM section ----------------------------------------------------------------


def test_ddpm_section_loads_as_flow_matching_with_notices(ws, capsys):
    path = _write(ws, "posttrain_t2v_model.json", era.dpo_model(ws["weights"], ws["root"] / "hist.json"))
    cfg = load_config(MMModelConfig, str(path), "--mm-model")
    d = cfg.diffusion
    assert (d.model_id, d.num_train_timesteps, d.shift, d.reverse, d.solver) == (
        "flow_match_discrete_scheduler", 1000, 13.0, False, "euler")
    assert cfg.dpo.histogram_path == str(ws["root"] / "hist.json") and cfg.predictor.num_heads == 1
    lines = notices(capsys)
    assert len(lines) == 2, lines
    assert f"notice: {path}: diffusion.model_id \"DDPM\" runs as \"flow_match_discrete_scheduler\": the released " \
           f"StepVideo DiT is a flow-matching model" in "\n".join(lines)
    ignored = next(line for line in lines if "accepted with no effect here" in line)
    for key in ("prediction_type", "rescale_betas_zero_snr", "guidance_scale", "timestep_spacing", "device",
                "snr_gamma", "t_sample_method"):
        assert f"diffusion.{key} (" in ignored


@pytest.mark.parametrize("key, value, message", [
    ("prediction_type", "epsilon", "\"epsilon\" contradicts the released StepVideo weights: the released DiT predicts "
                                   "the flow velocity x0 - noise, not the noise"),
    ("prediction_type", "sample", "\"sample\" contradicts the released StepVideo weights"),
    ("rescale_betas_zero_snr", False, "false contradicts the released StepVideo weights: flow matching starts"),
    ("rescale_betas_zero_snr", 1, "1 is not one of true"),
    ("timestep_spacing", "uniform", "\"uniform\" is not one of \"leading\", \"trailing\", \"linspace\""),
    ("t_sample_method", "logit", "is not one of \"explicit_uniform\", \"random\""),
    ("snr_gamma", "5", "expected int or float or null, got \"5\""),
    ("device", "tpu", "\"tpu\" is not one of \"npu\""),
])
def test_ddpm_values_that_contradict_are_refused(key, value, message):
    with pytest.raises(ConfigError) as err:
        from_dict(DiffusionConfig, {**era.DDPM, key: value}, source="m.json", prefix="diffusion")
    assert f"m.json: key 'diffusion.{key}': " in str(err.value) and message in str(err.value), str(err.value)


def test_other_ddpm_keys_stay_unknown():
    with pytest.raises(ConfigError, match=r"key 'diffusion.beta_schedule': unknown key"):
        from_dict(DiffusionConfig, {**era.DDPM, "beta_schedule": "linear"}, source="m.json", prefix="diffusion")


# ---- suggestions come from both eras -------------------------------------------------------------


@pytest.mark.parametrize("cls, key, hint", [
    (PredictorConfig, "num_attention_head", "Did you mean 'num_attention_heads' (the guide-era name of 'num_heads')?"),
    (PredictorConfig, "num_head", "Did you mean 'num_heads'?"),
    (DPOConfig, "histgram_pth", "Did you mean 'histgram_path' (the guide-era name of 'histogram_path')?"),
    (PreprocessParameters, "fsp", "Did you mean 'fps' (the guide-era name of 'train_fps')?"),
    (PredictorConfig, "num_attention_headz", "Did you mean 'num_attention_heads'"),
    (PredictorConfig, "frobnicate", None),
    (PredictorConfig, "use_flash_attn", None),
])
def test_misspelt_keys_suggest_from_both_eras_or_nothing(cls, key, hint):
    with pytest.raises(ConfigError) as err:
        from_dict(cls, {key: 1}, source="m.json")
    msg = str(err.value)
    assert "unknown key." in msg and "attention_backend'?" not in msg
    assert (hint in msg) if hint else ("Did you mean" not in msg), msg


def test_misspelt_flags_suggest_both_eras_flags():
    with pytest.raises(ArgumentError, match=r"unknown flag --num-layer; did you mean --num-layers\?"):
        parse_args(["--num-layer", "48"])
    with pytest.raises(ArgumentError, match=r"unknown flag --seq-lenght; did you mean --seq-length\?"):
        parse_args(["--seq-lenght", "8"])
    with pytest.raises(ArgumentError, match=r"unknown flag --frobnicate\. Run with --help"):
        parse_args(["--frobnicate", "1"])


# ---- flags -----------------------------------------------------------------------------------


def test_guide_pretrain_launch_parses_with_one_notice_per_kind(ws, capsys):
    model = _write(ws, "pretrain_t2v_model.json", era.pretrain_model(ws["weights"], num_layers=48))
    data = _write(ws, "data_static_resolution.json", era.pretrain_data(ws["weights"], ws["root"] / "data.txt"))
    args = parse_args(era.pretrain_flags(data, model, ws["tool"], ws["ckpt"], ws["root"] / "save"),
                      entry="pretrain", world_size=8)
    assert args.mm.model.predictor.num_heads == 48 and args.mm.data.dataset_param.dataset_type == "feature"
    assert args.mm.data.dataset_param.skip_define_frame_index is True
    assert args.virtual_pipeline_model_parallel_size == 1 and args.seed == 1234 and args.micro_batch_size == 1
    lines = notices(capsys)
    flags = [line for line in lines if line.startswith("notice: flags with no effect here: ")]
    assert len(flags) == 1 and len(lines) == 2, lines
    for flag in ("--seq-length", "--max-position-embeddings", "--attention-dropout", "--hidden-dropout",
                 "--tokenizer-type", "--vocab-size", "--position-embedding-type", "--rotary-base", "--swiglu",
                 "--no-masked-softmax-fusion", "--eval-interval", "--eval-iters"):
        assert flag in flags[0]
    assert "--num-layers" not in flags[0]  # checked against the JSON, and it agrees
    assert "preprocess_parameters.dataloader_num_workers (--num-workers sets" in lines[0]


@pytest.mark.parametrize("flags, wrong", [
    (["--num-layers", "48"], "--num-layers 48 contradicts predictor.num_layers 24"),
    (["--hidden-size", "2304"], "--hidden-size 2304 contradicts predictor.num_heads x head_dim = 48 x 128 = 6144"),
    (["--num-attention-heads", "24"], "--num-attention-heads 24 contradicts predictor.num_heads 48"),
])
def test_model_flags_that_contradict_the_json_are_errors(ws, flags, wrong):
    model = _write(ws, "pretrain_t2v_model.json", era.pretrain_model(ws["weights"], num_layers=24))
    with pytest.raises(ArgumentError) as err:
        parse_args(["--mm-model", str(model)] + flags)
    assert f"{wrong} in {model}. The DiT is built from the model JSON" in str(err.value), str(err.value)


def test_guide_inference_launch_copied_gpt_block_is_refused_then_runs(ws, capsys):
    """The guide's inference launchers pass 28 layers / 1152 / 16 heads from another model: a contradiction."""
    model = _write(ws, "inference_t2v_model.json",
                   era.inference_model(ws["weights"], ws["root"] / "prompts.txt", ws["root"] / "out", seed=42))
    with pytest.raises(ArgumentError, match=r"--num-layers 28 contradicts predictor.num_layers 48; --hidden-size 1152 "
                                            r"contradicts .* = 6144; --num-attention-heads 16 contradicts"):
        parse_args(era.inference_flags(model, ws["ckpt"]), entry="inference", world_size=4)
    args = parse_args(era.inference_flags(model, ws["ckpt"], layers=48, hidden=6144, heads=48), entry="inference",
                      world_size=4)
    assert args.seed == 42 and args.micro_batch_size == 1  # pipeline_config.seed honoured: the launcher has no --seed


def test_feature_extraction_flags_have_no_model_to_check(ws, capsys):
    data = _write(ws, "data.json", era.feature_data(ws["weights"], ws["root"] / "data/data.jsonl", ws["root"] / "data"))
    model = _write(ws, "model_stepvideo.json", era.feature_model(ws["weights"]))
    tool = _write(ws, "tools.json", era.tools(ws["features"]))
    args = parse_args(era.feature_flags(data, model, tool), entry="feature_extract", world_size=1)
    assert args.mm.data.dataset_param.preprocess_parameters.train_fps == 8
    (flags,) = [line for line in notices(capsys) if "flags with no effect" in line]
    assert "--num-layers, --hidden-size, --num-attention-heads, --seq-length" in flags


def test_seed_and_batch_precedence(ws, capsys):
    model = _write(ws, "inference.json", {**era.inference_model(ws["weights"], ws["root"] / "prompts.txt",
                                                                ws["root"] / "out", seed=42), "micro_batch_size": 2})
    args = parse_args(["--mm-model", str(model)], entry="inference")
    assert (args.seed, args.micro_batch_size) == (42, 2)
    capsys.readouterr()
    args = parse_args(["--mm-model", str(model), "--seed", "7", "--micro-batch-size", "1"], entry="inference")
    assert (args.seed, args.micro_batch_size) == (7, 1)
    lines = notices(capsys)
    assert f"notice: --seed 7 overrides pipeline_config.seed 42 of {model} (the command line wins)" in lines
    assert f"notice: --micro-batch-size 1 overrides micro_batch_size 2 of {model} (the command line wins)" in lines
    plain = _write(ws, "plain.json", {"predictor": {"num_layers": 2, "num_heads": 2}})
    args = parse_args(["--mm-model", str(plain)], entry="inference")
    assert (args.seed, args.micro_batch_size) == (1234, 1) and notices(capsys) == []


def test_training_reads_features_only_with_load_features(ws):
    model = era.pretrain_model(ws["weights"], num_layers=48)
    model["load_video_features"] = False
    model_path = _write(ws, "model.json", model)
    data = _write(ws, "data.json", era.pretrain_data(ws["weights"], ws["root"] / "data.txt"))
    with pytest.raises(ArgumentError, match=r"data.json reads pre-extracted features \(dataset_type \"feature\"\) but "
                                            r".*model.json says load_video_features false"):
        parse_args(era.pretrain_flags(data, model_path, ws["tool"], ws["ckpt"], ws["root"] / "save"),
                   entry="pretrain", world_size=8)


def test_guide_dpo_launch_runs_with_agreeing_model_flags(ws):
    model = _write(ws, "posttrain_t2v_model.json", era.dpo_model(ws["weights"], ws["root"] / "hist.json"))
    data = _write(ws, "data_dpo.json", era.dpo_data(ws["weights"], ws["root"] / "data/data.jsonl", ws["root"] / "data"))
    save = ws["root"] / "save"
    with pytest.raises(ArgumentError, match="--num-layers 32 contradicts predictor.num_layers 1"):
        parse_args(era.dpo_flags(data, model, ws["tool"], ws["ckpt"], save), entry="dpo", world_size=1)
    args = parse_args(era.dpo_flags(data, model, ws["tool"], ws["ckpt"], save, layers=1, hidden=128, heads=1),
                      entry="dpo", world_size=1)
    assert args.mm.data.dataset_param.dataset_type == "t2v" and args.mm.model.dpo.histogram_path.endswith("hist.json")
    assert args.mm.data.dataset_param.preprocess_parameters.skip_frame_num == 3


# ---- the tables agree with docs/config.md -----------------------------------------------------


def test_docs_show_the_one_alias_table():
    from mindspeed_mm.config.aliases import FLAGS, KEYS, flag_rows, reverse_rows, table_rows

    doc = (REPO / "docs" / "config.md").read_text()
    for row in table_rows() + reverse_rows() + flag_rows():
        assert row in doc, row
    assert len(table_rows()) == len(KEYS) and len(flag_rows()) == len(FLAGS)


def test_every_era_config_file_loads(ws, capsys):
    """Each era JSON kind, as the guide ships it (paths edited), loads with no error."""
    w, r = ws["weights"], ws["root"]
    files = {
        MMModelConfig: [era.pretrain_model(w), era.pretrain_model(w, i2v=True), era.feature_model(w, i2v=True),
                        era.inference_model(w, r / "prompts.txt", r / "out"), era.dpo_model(w, r / "hist.json"),
                        era.inference_model(w, r / "prompts.txt", r / "out", i2v=True, image=r / "images.txt")],
        MMDataConfig: [era.feature_data(w, r / "data/data.jsonl", r / "data"), era.pretrain_data(w, r / "data.txt"),
                       era.dpo_data(w, r / "data/data.jsonl", r / "data")],
        MMToolConfig: [era.tools(r / "features")],
    }
    for cls, objs in files.items():
        for i, obj in enumerate(objs):
            load_config(cls, str(_write(ws, f"{cls.__name__}{i}.json", obj)), "--mm-x")
