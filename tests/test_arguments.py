"""The command line and JSON configs: seed launchers parse, and every bad input fails clearly."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from mindspeed_mm.arguments import ArgumentError, parse_args
from mindspeed_mm.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "stepvideo"

# The flag sets of the seed's launchers, verbatim (with their shell variables filled in).
PRETRAIN_T2V = """
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --virtual-pipeline-model-parallel-size 1
    --context-parallel-size 1 --context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size 1
    --lr 1e-5 --min-lr 1e-5 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-15 --lr-decay-style constant
    --weight-decay 1e-2 --lr-warmup-init 1e-5 --lr-warmup-iters 0 --clip-grad 1.0 --train-iters 5000
    --no-gradient-accumulation-fusion --load {load} --bf16 --recompute-granularity full --recompute-method block
    --recompute-num-layers 48 --use-distributed-optimizer --allow-tf32 --num-workers 8
    --mm-data {data} --mm-model {model} --mm-tool {tool}
    --log-interval 1 --save-interval 10000 --eval-interval 10000 --eval-iters 10 --save {save} --ckpt-format torch
    --distributed-backend nccl
"""
INFERENCE_T2V = """
    --mm-model {model} --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --context-parallel-size 1
    --context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size 1 --lr 2e-5 --min-lr 2e-5
    --train-iters 5010 --weight-decay 0 --clip-grad 1 --adam-beta1 0.9 --adam-beta2 0.999
    --no-gradient-accumulation-fusion --no-load-optim --no-load-rng --no-save-optim --no-save-rng --bf16 --seed 1234
    --load {load} --distributed-timeout-minutes 20
"""
FEATURE_EXTRACT = """
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1 --micro-batch-size 1
    --global-batch-size 1 --num-workers 8 --mm-data {data} --mm-model {model} --mm-tool {tool}
    --distributed-backend nccl
"""


def _rewrite(src: Path, dst: Path, replace: dict) -> Path:
    text = src.read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    dst.write_text(text)
    return dst


@pytest.fixture
def workspace(tmp_path):
    """The seed's example configs with their placeholder paths pointed at real files."""
    weights = tmp_path / "weights"
    for sub in ("step_llm", "hunyuan_clip/clip_text_encoder", "hunyuan_clip/tokenizer", "vae"):
        (weights / sub).mkdir(parents=True)
    (weights / "step_llm" / "step1_chat_tokenizer.model").write_bytes(b"x")
    (weights / "vae" / "vae_v2.safetensors").write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.jsonl").write_text('{"file": "1.mp4", "captions": "a cat"}\n')
    features = tmp_path / "sora_features"
    features.mkdir()
    (features / "data.jsonl").write_text("")
    (features / "empty_prompt.pt").write_bytes(b"x")  # feature extraction writes it (caption dropout)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    replace = {
        "./weights/": f"{weights}/",
        "/data_path/data.jsonl": str(data / "data.jsonl"),
        "/data_path": str(data),
        "./sora_features/": f"{features}/",
        "examples/stepvideo/t2v/samples_prompts.txt": str(tmp_path / "prompts.txt"),
    }
    out = {}
    for rel in ("t2v/pretrain_t2v_model.json", "t2v/data_static_resolution.json", "t2v/inference_t2v_model.json",
                "feature_extract/data.json", "feature_extract/model_stepvideo.json", "feature_extract/tools.json"):
        out[rel] = _rewrite(EXAMPLES / rel, tmp_path / rel.replace("/", "__"), replace)
    out["tools"] = REPO / "mindspeed_mm" / "tools" / "tools.json"
    out["load"] = tmp_path / "ckpt"
    out["root"] = tmp_path
    return out


def _argv(template: str, **kw) -> list:
    return shlex.split(template.format(**{k: str(v) for k, v in kw.items()}))


def test_seed_pretrain_t2v_flags_parse(workspace):
    args = parse_args(_argv(PRETRAIN_T2V, load=workspace["load"], save=workspace["root"] / "save",
                            data=workspace["t2v/data_static_resolution.json"],
                            model=workspace["t2v/pretrain_t2v_model.json"], tool=workspace["tools"]),
                      entry="pretrain", world_size=8)
    assert args.tensor_model_parallel_size == 8 and args.data_parallel_size == 1
    assert args.recompute_method == "block" and args.recompute_num_layers == 48
    assert args.adam_eps == 1e-15 and args.gradient_accumulation_fusion is False
    assert args.mm.model.predictor.num_layers == 48 and args.mm.model.load_video_features is True
    assert args.mm.data.dataset_param.dataset_type == "feature"
    assert args.mm.tool.sorafeature.save_path == "./sora_features"
    assert args.num_micro_batches == 1


def test_seed_inference_and_feature_flags_parse(workspace):
    args = parse_args(_argv(INFERENCE_T2V, model=workspace["t2v/inference_t2v_model.json"], load=workspace["load"]),
                      entry="inference", world_size=4)
    assert args.no_load_optim and args.no_load_rng and args.distributed_timeout_minutes == 20
    assert args.mm.model.pipeline_config.input_size == [204, 544, 992]
    assert args.mm.model.diffusion.num_inference_timesteps == 50
    args = parse_args(_argv(FEATURE_EXTRACT, data=workspace["feature_extract/data.json"],
                            model=workspace["feature_extract/model_stepvideo.json"],
                            tool=workspace["feature_extract/tools.json"]), entry="feature_extract", world_size=1)
    assert [t.autotokenizer_name for t in args.mm.data.dataset_param.tokenizer_config] == ["stepchat", "BertTokenizer"]


@pytest.mark.parametrize("rel", sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.json")))
def test_every_example_json_loads(rel):
    from mindspeed_mm.config import load_config
    from mindspeed_mm.config.data import MMDataConfig
    from mindspeed_mm.config.model import MMModelConfig
    from mindspeed_mm.config.tool import MMToolConfig

    name = Path(rel).name
    cls = MMToolConfig if name == "tools.json" else MMDataConfig if name.startswith("data") else MMModelConfig
    load_config(cls, str(EXAMPLES / rel), "--mm-x")


def test_unknown_flag_suggests_closest():
    with pytest.raises(ArgumentError, match=r"unknown flag --tensor-model-paralel-size; did you mean "
                                            r"--tensor-model-parallel-size\?"):
        parse_args(["--tensor-model-paralel-size", "2"], world_size=2)


def test_unknown_json_key_names_file_key_and_suggestion(tmp_path):
    cfg = json.loads((EXAMPLES / "t2v/pretrain_t2v_model.json").read_text())
    cfg["predictor"]["num_head"] = cfg["predictor"].pop("num_heads")
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        parse_args(["--mm-model", str(path)])
    msg = str(err.value)
    assert str(path) in msg and "'predictor.num_head'" in msg and "Did you mean 'num_heads'?" in msg


def test_wrong_json_type_and_bad_json(tmp_path):
    cfg = json.loads((EXAMPLES / "t2v/pretrain_t2v_model.json").read_text())
    cfg["predictor"]["num_layers"] = "24"
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"key 'predictor.num_layers': expected an integer, got \"24\""):
        parse_args(["--mm-model", str(path)])
    path.write_text('{"predictor": {"num_layers": 2,}}')
    with pytest.raises(ConfigError, match=r"model.json' is not valid JSON: .* line 1"):
        parse_args(["--mm-model", str(path)])
    with pytest.raises(ConfigError, match=r"--mm-model: file '.*missing.json' does not exist"):
        parse_args(["--mm-model", str(tmp_path / "missing.json")])


def test_world_size_not_divisible_by_tp_cp_pp():
    with pytest.raises(ArgumentError, match=r"world size 6 is not divisible by --tensor-model-parallel-size 4 x "
                                            r"--context-parallel-size 1 x --pipeline-model-parallel-size 1 = 4"):
        parse_args(["--tensor-model-parallel-size", "4"], world_size=6)


def test_pipeline_parallel_is_refused():
    with pytest.raises(ArgumentError, match=r"--pipeline-model-parallel-size 2 is not supported yet: only 1 works"):
        parse_args(["--pipeline-model-parallel-size", "2"], world_size=2)
    with pytest.raises(ArgumentError, match=r"--virtual-pipeline-model-parallel-size 2 needs pipeline"):
        parse_args(["--virtual-pipeline-model-parallel-size", "2"])


def test_num_heads_divisible_by_tp_times_cp(workspace):
    model = workspace["t2v/pretrain_t2v_model.json"]
    with pytest.raises(ArgumentError, match=r"num_heads 48 in .*\(predictor.num_heads\) is not divisible by "
                                            r"--tensor-model-parallel-size 32 x the Ulysses degree 1 .* = 32"):
        parse_args(["--mm-model", str(model), "--tensor-model-parallel-size", "32"], world_size=32)
    parse_args(["--mm-model", str(model), "--tensor-model-parallel-size", "8", "--context-parallel-size", "2"],
               world_size=16)
    # Ulysses splits heads (8 x 4 = 32 does not divide 48); ring and hybrid layouts past that limit are valid.
    with pytest.raises(ArgumentError, match=r"x the Ulysses degree 4 .* = 32.*megatron_cp_algo"):
        parse_args(["--mm-model", str(model), "--tensor-model-parallel-size", "8", "--context-parallel-size", "4"],
                   world_size=32)
    for cp, algo in ((4, ["megatron_cp_algo"]), (12, ["hybrid_cp_algo", "--ulysses-degree-in-cp", "6"]),
                     (8, ["hybrid_cp_algo", "--ulysses-degree-in-cp", "2"])):
        parse_args(["--mm-model", str(model), "--tensor-model-parallel-size", "8", "--context-parallel-size",
                    str(cp), "--sequence-parallel", "--context-parallel-algo", *algo], world_size=8 * cp)


def test_global_batch_divisible_by_micro_batch_times_dp():
    with pytest.raises(ArgumentError, match=r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x "
                                            r"data-parallel size 2 .* = 4"):
        parse_args(["--micro-batch-size", "2", "--global-batch-size", "6"], world_size=2)
    args = parse_args(["--micro-batch-size", "2", "--global-batch-size", "8"], world_size=2)
    assert args.num_micro_batches == 2
    assert parse_args([], world_size=4).global_batch_size == 4


def test_files_named_in_configs_must_exist(workspace, tmp_path):
    cfg = json.loads(Path(workspace["t2v/data_static_resolution.json"]).read_text())
    cfg["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "nope.jsonl")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"data.json: dataset_param.basic_parameters.data_path: '.*nope.jsonl' "
                                          r"does not exist. Point it at your data.jsonl"):
        parse_args(["--mm-data", str(data)])
    # The VAE path matters only when videos are encoded on the fly.
    cfg = json.loads(Path(workspace["t2v/pretrain_t2v_model.json"]).read_text())
    cfg["ae"]["from_pretrained"] = str(tmp_path / "vae_missing.safetensors")
    model = tmp_path / "model.json"
    model.write_text(json.dumps(cfg))
    parse_args(["--mm-model", str(model)])
    cfg["load_video_features"] = False
    model.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model.json: ae.from_pretrained: '.*vae_missing.safetensors' does not"):
        parse_args(["--mm-model", str(model)])


def test_missing_load_path_is_an_error(tmp_path):
    with pytest.raises(ArgumentError, match=r"--load .*nowhere does not exist. Point LOAD_PATH at the folder"):
        parse_args(["--load", str(tmp_path / "nowhere")])


def test_recompute_and_cp_algo_errors():
    with pytest.raises(ArgumentError, match="need --recompute-granularity full"):
        parse_args(["--recompute-method", "block"])
    with pytest.raises(ArgumentError, match="needs --recompute-num-layers"):
        parse_args(["--recompute-granularity", "full", "--recompute-method", "uniform"])
    with pytest.raises(ArgumentError, match="selective is not supported"):
        parse_args(["--recompute-granularity", "selective"])
    with pytest.raises(ArgumentError, match="--context-parallel-algo adaptive_cp_algo is not supported"):
        parse_args(["--context-parallel-algo", "adaptive_cp_algo"])
    with pytest.raises(ArgumentError, match="hybrid_cp_algo needs --ulysses-degree-in-cp, a divisor of"):
        parse_args(["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo",
                    "--ulysses-degree-in-cp", "3"], world_size=4)
    with pytest.raises(ArgumentError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        parse_args(["--overlap-param-gather"])
    with pytest.raises(ArgumentError, match="mutually exclusive"):
        parse_args(["--bf16", "--fp16"])


def test_training_entry_needs_configs_and_schedule(workspace):
    with pytest.raises(ArgumentError, match="pretrain needs --mm-model and --mm-data"):
        parse_args(["--train-iters", "1", "--lr", "1e-5"], entry="pretrain")
    with pytest.raises(ArgumentError, match="--train-iters must be given"):
        parse_args(["--mm-model", str(workspace["t2v/pretrain_t2v_model.json"]),
                    "--mm-data", str(workspace["t2v/data_static_resolution.json"]), "--lr", "1e-5"], entry="pretrain")


def test_patch_ae_float32_runs_the_vae_in_float32():
    """`patch.ae_float32` (set in the guide's DPO model JSON) was parsed and read by nothing: the VAE ran in bf16."""
    from mindspeed_mm.config import load_config
    from mindspeed_mm.config.model import MMModelConfig

    cfg = load_config(MMModelConfig, str(EXAMPLES / "t2v/posttrain_t2v_model.json"), "--mm-model")
    assert cfg.patch.ae_float32 and cfg.ae.dtype == "fp32"
    cfg = load_config(MMModelConfig, str(EXAMPLES / "feature_extract/model_stepvideo.json"), "--mm-model")
    assert cfg.ae.dtype == "bf16"  # without the patch, ae.dtype is used as written
