"""The user guide's era beyond the config keys: `data.txt` lists, JSON-array manifests, missing files named by path,
the converter's `--pp_sizes` and merge log, `histgram_generator.py`'s era flags, and notices once per torchrun job."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mindspeed_mm.arguments import parse_args
from mindspeed_mm.config import ConfigError
from mindspeed_mm.data import build_dataset, read_manifest
from mindspeed_mm.data.manifest import ManifestError
from tests.helpers import guide_era as era

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "examples" / "stepvideo" / "convert_ckpt_to_mm.py"
HISTGRAM = REPO / "examples" / "stepvideo" / "histgram_generator.py"


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _features(folder: Path, names) -> Path:
    (folder / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        (folder / "features" / name).write_bytes(b"")
        rows.append(json.dumps({"file": f"features/{name}", "captions": name}))
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    return folder


# ---- data.jsonl as one JSON array --------------------------------------------------------------


def test_dpo_data_jsonl_as_one_json_array(tmp_path):
    """The guide's DPO example is an indented array in data.jsonl; it was '30 bad JSON' rows."""
    for name in ("video_0.mp4", "video_2.mp4", "video_4.mp4", "video_5.mp4"):
        (tmp_path / name).write_bytes(b"x")
    rows = [{"file": "video_0.mp4", "file_rejected": "video_2.mp4", "captions": "prompt1", "score": 0.646468401,
             "score_rejected": 0.5799660087},
            {"file": "video_4.mp4", "file_rejected": "video_5.mp4", "captions": "prompt2", "score": 0.7914018631,
             "score_rejected": 0.69968328357}]
    (tmp_path / "data.jsonl").write_text(json.dumps(rows, indent=4))
    m = read_manifest(str(tmp_path / "data.jsonl"), str(tmp_path))
    assert [r.file for r in m.rows] == ["video_0.mp4", "video_4.mp4"] and all(r.is_dpo for r in m.rows)
    assert m.summary() == "kept 2 of 2 rows in data.jsonl"
    (tmp_path / "one_line.jsonl").write_text(json.dumps(rows))  # one line holding the array
    assert len(read_manifest(str(tmp_path / "one_line.jsonl"), str(tmp_path))) == 2
    (tmp_path / "broken.jsonl").write_text("[\n" + json.dumps(rows[0]) + ",\n......\n]\n")
    with pytest.raises(ManifestError, match=r"broken.jsonl: not valid JSON \(Expecting value at line 3, column 1\); "
                                            r"a manifest is one JSON array of objects, or JSON Lines"):
        read_manifest(str(tmp_path / "broken.jsonl"), str(tmp_path))


def test_json_lines_starting_with_a_non_object_row_stay_json_lines(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "d.jsonl").write_text('[1, 2]\n{"file": "a.mp4", "captions": "a"}\n')
    m = read_manifest(str(tmp_path / "d.jsonl"), str(tmp_path))
    assert len(m) == 1 and dict(m.skipped) == {"not a JSON object": [1]}


# ---- missing files are named by the path tried -----------------------------------------------------


def test_missing_file_summary_names_the_resolved_path(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"x")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "videos/a.mp4", "captions": "a"},
        {"file": "videos/gone.mp4", "captions": "b"},
        {"file": "videos/a.mp4", "file_rejected": "./videos/lost.mp4", "captions": "c", "score": 1,
         "score_rejected": 0}]) + "\n")
    m = read_manifest(str(tmp_path / "d.jsonl"), str(tmp_path))
    assert m.summary() == (f"kept 1 of 3 rows in d.jsonl: 2 missing file (line 2: {tmp_path}/videos/gone.mp4, "
                           f"line 3: {tmp_path}/videos/lost.mp4)")


# ---- data.txt ------------------------------------------------------------------------------------


def test_data_txt_with_one_line_is_the_guide_layout(tmp_path, monkeypatch):
    """The guide's data.txt line, relative to the working directory, through the guide's data JSON."""
    monkeypatch.chdir(tmp_path)
    _features(tmp_path / "stepvideo" / "sora_featuers", ["a.pt", "b.pt"])
    (tmp_path / "data.txt").write_text(era.data_txt_line("./stepvideo/sora_featuers/"))  # no trailing newline
    weights = era.fake_weights(tmp_path / "weights")
    data = era.write_json(tmp_path / "data_static_resolution.json", era.pretrain_data(weights, "data.txt"))
    args = parse_args(["--mm-data", str(data)])
    ds = build_dataset(args.mm.data, log=False)
    assert [r.path for r in ds.rows] == [f"stepvideo/sora_featuers/features/{n}.pt" for n in "ab"]
    assert ds.rows[0].source == "./stepvideo/sora_featuers//data.jsonl"


def test_data_txt_with_several_lines_concatenates(tmp_path):
    a = _features(tmp_path / "a", ["1.pt", "2.pt"])
    b = _features(tmp_path / "b", ["3.pt"])
    (b / "data.jsonl").write_text((b / "data.jsonl").read_text() + json.dumps({"file": "features/4.pt"}) + "\n")
    listing = tmp_path / "data.txt"
    listing.write_text(f"{era.data_txt_line(a)}\n\n{era.data_txt_line(b)}\n")
    m = read_manifest(str(listing), require_captions=False, suffixes=(".pt",))
    assert [Path(r.path).name for r in m.rows] == ["1.pt", "2.pt", "3.pt"]
    assert [r.source for r in m.rows] == [f"{a}/data.jsonl"] * 2 + [f"{b}/data.jsonl"]
    assert m.summary() == (f"kept 3 of 4 rows in data.txt (kept 2 of 2 rows in {a}/data.jsonl; kept 1 of 2 rows in "
                           f"{b}/data.jsonl: 1 missing file (line 2: {b}/features/4.pt))")


def test_data_txt_errors_name_the_list_and_line(tmp_path):
    a = _features(tmp_path / "a", ["1.pt"])
    listing = tmp_path / "data.txt"
    listing.write_text(f"{era.data_txt_line(a)}\n{a}\n")
    with pytest.raises(ManifestError, match=r"data.txt line 2: expected '<folder>,<folder>/data.jsonl'"):
        read_manifest(str(listing), require_captions=False)
    listing.write_text(era.data_txt_line(a))
    with pytest.raises(ManifestError, match=r"data.txt is a data.txt list, whose lines each name their own folder"):
        read_manifest(str(listing), str(a))
    listing.write_text(era.data_txt_line(tmp_path / "nowhere"))
    data = era.write_json(tmp_path / "data.json", era.pretrain_data(era.fake_weights(tmp_path / "w"), listing))
    with pytest.raises(ConfigError, match=r"data.json: dataset_param.basic_parameters.data_path: .*data.txt line 1: "
                                          r"the folder: '.*nowhere' does not exist"):
        parse_args(["--mm-data", str(data)])


# ---- the converter -----------------------------------------------------------------------------


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_pp_sizes_alias_and_merge_help():
    parser = _load(CONVERTER, "convert_ckpt_to_mm").build_parser()
    args = parser.parse_args(["--source_path", "s", "--target_path", "t", "--mode", "merge", "--pp_sizes", "24", "24"])
    assert args.pp_size == [24, 24]
    assert "re-split for --tp_size" in " ".join(parser.format_help().split())


def test_merge_log_says_shards_and_target_tp(tmp_path):
    from mindspeed_mm.checkpoint.convert import merge, split
    from mindspeed_mm.tiny.dit import write_tiny_dit

    src = write_tiny_dit(tmp_path / "transformer", num_layers=4, num_heads=4, head_dim=8, in_channels=4,
                         caption_channels=(16, 8))
    split(src, tmp_path / "tp2pp2", tp_size=2, pp_layers=[2, 2], num_layers=4, log=lambda m: None)
    log = []
    merge(tmp_path / "tp2pp2", tmp_path / "tp4", tp_size=4, pp_layers=[4], num_layers=4, log=log.append)
    assert log[-1] == f"merged 4 shards (TP 2 x PP 2, release) into TP=4 (re-split for the target --tp_size) at " \
                      f"{tmp_path / 'tp4'}"


def test_missing_layers_are_listed_in_numeric_order():
    from mindspeed_mm.checkpoint.conversion_checks import ConversionError, check_blocks

    keys = [f"transformer_blocks.{i}.attn1.proj_qkv.weight" for i in list(range(9)) + [11]]
    with pytest.raises(ConversionError, match=r"no transformer_blocks 9, 10 \(the checkpoint has 10 blocks\)"):
        check_blocks(keys, 12, "ckpt", 12)
    keys = [f"transformer_blocks.{i}.attn1.proj_qkv.weight" for i in range(12)]
    with pytest.raises(ConversionError, match=r"transformer_blocks 9, 10, 11 exist beyond layer 8"):
        check_blocks(keys, 9, "ckpt", 9)


# ---- histgram_generator.py -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_videos(tmp_path_factory):
    from mindspeed_mm.data import write_video

    folder = tmp_path_factory.mktemp("dpo") / "videos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    for i, noise in enumerate((0.0, 40.0, 90.0)):  # one prompt, N = 3 (the era's default): smooth to noisy
        frames = [np.clip(np.roll(base, t, axis=1) + rng.normal(0, noise, base.shape), 0, 255) for t in range(9)]
        video = torch.from_numpy(np.stack([np.stack([f] * 3, -1) for f in frames]).astype(np.uint8))
        write_video(str(folder / f"video_{i}.mp4"), video, fps=8)
    return folder


def _histgram(argv, capsys):
    from mindspeed_mm.cli import run

    rc = run(_load(HISTGRAM, "histgram_generator").main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_histgram_era_flags_and_default_of_three(three_videos, tmp_path, capsys):
    rc, out, err = _histgram(["--videos_path", three_videos, "--prompt", "a cat", "--scorer", "offline",
                              "--output_dir", tmp_path, "--mode", "custom_input", "--read_frame", "False",
                              "--load_ckpt_from_local", "True", "--full_json_dir", "./vbench/VBench_full_info.json",
                              "--imaging_quality_preprocessing_mode", "longer", "--category", "animal"], capsys)
    assert rc == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert row["captions"] == "a cat" and row["file_rejected"] == "./video_2.mp4"  # 3 videos per prompt by default
    (line,) = [x for x in err.splitlines() if x.startswith("notice: ")]
    for flag in ("--category", "--load_ckpt_from_local", "--full_json_dir", "--imaging_quality_preprocessing_mode"):
        assert flag in line


@pytest.mark.parametrize("argv, message", [
    (["--mode", "vbench_standard"], "--mode vbench_standard scores VBench's own prompt suite"),
    (["--read_frame", "true"], "--read_frame true reads folders of frames"),
    (["--prompt_file", "p.txt"], "--prompt and --prompt_file are mutually exclusive"),
])
def test_histgram_era_values_that_cannot_work(three_videos, tmp_path, capsys, argv, message):
    rc, out, err = _histgram(["--videos_path", three_videos, "--prompt", "a cat", "--scorer", "offline",
                              "--output_dir", tmp_path] + argv, capsys)
    assert rc == 2 and err.startswith("error: ") and message in err, err


def test_histgram_passes_era_vbench_options_to_vbench(monkeypatch, tmp_path):
    from mindspeed_mm.dpo import scorers

    calls = {}

    class FakeVBench:
        def __init__(self, device, full_info_dir, output_path):
            calls["full_info_dir"] = full_info_dir

        def evaluate(self, **kwargs):
            calls.update(kwargs)

    monkeypatch.setattr(scorers, "vbench_status", lambda cache_dir=None: (True, "usable"))
    monkeypatch.setitem(sys.modules, "vbench", type(sys)("vbench"))
    sys.modules["vbench"].VBench = FakeVBench
    module = _load(HISTGRAM, "histgram_generator")
    args = module.build_parser().parse_args(["--videos_path", "v", "--full_json_dir", "info.json",
                                             "--imaging_quality_preprocessing_mode", "shorter"])
    scorer, _ = scorers.build_scorer("vbench", device="cpu", **module.era_options(args, "vbench"))
    (tmp_path / "video_0.mp4").write_bytes(b"x")
    with pytest.raises(scorers.ScoringError, match="VBench wrote no results file"):
        scorer.score_videos([str(tmp_path / "video_0.mp4")], work_dir=str(tmp_path / "work"))
    assert calls["full_info_dir"] == "info.json" and calls["imaging_quality_preprocessing_mode"] == "shorter"
    assert calls["local"] is True and calls["read_frame"] is False and calls["mode"] == "custom_input"


# ---- notices once per torchrun job -----------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys

    import torch.distributed as dist

    from mindspeed_mm.arguments import parse_args
    from mindspeed_mm.cli import run


    def main(argv):
        dist.init_process_group("gloo")
        try:
            parse_args(argv)  # every rank parses the same flags and files
            dist.barrier()
            return 0
        finally:
            dist.destroy_process_group()


    if __name__ == "__main__":
        sys.exit(run(main, sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notices_print_once_under_a_two_rank_torchrun(tmp_path):
    model = era.write_json(tmp_path / "model.json", {"predictor": era.predictor(2, 2), "diffusion": dict(era.DDPM)})
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MINDSPEED_MM_DEVICE="cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), "--mm-model", str(model), "--num-layers", "2",
           "--seq-length", "1024", "--swiglu", "--eval-iters", "10"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "notice: " in line]
    assert len(lines) == 3, lines  # the flags, the file's keys of no effect, DDPM as flow matching: once each
    assert sum(line.startswith("notice: flags with no effect here: --seq-length, --swiglu") for line in lines) == 1
    assert sum("accepted with no effect here: diffusion.prediction_type" in line for line in lines) == 1
    assert sum("diffusion.model_id \"DDPM\" runs as" in line for line in lines) == 1
