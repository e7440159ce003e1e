"""DPO preference data: offline metrics on real videos, normalisation, the histogram format, P(s), the pair weight,
pairs / data.jsonl, the histgram_generator CLI and its errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mindspeed_mm.data import write_video
from mindspeed_mm.dpo import (HISTOGRAM_FIELDS, HistogramError, OfflineScorer, PreferenceDataError, ScoringError,
                              build_preference_data, build_scorer, compute_histogram, load_histogram, pair_weight,
                              score_probability, vbench_status)
from mindspeed_mm.dpo.pairs import combine_scores, normalize_metric, select_pairs
from mindspeed_mm.dpo.scorers import parse_vbench_results

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "examples" / "stepvideo" / "histgram_generator.py"
T, H, W = 9, 32, 32

# --------------------------------------------------------------------------------------------- synthetic videos

_yy, _xx = np.mgrid[0:H, 0:W]


def _pattern(shift):
    """Vertical sine stripes (period 8 px) shifted right by `shift` px, over horizontal bands: luma in [0, 1]."""
    v = 0.5 + 0.25 * np.sin(2 * np.pi * (_xx + shift) / 8) + 0.2 * np.sign(np.sin(2 * np.pi * _yy / 10))
    return np.clip(v, 0.0, 1.0)


def _blur(f):
    k = np.ones(5) / 5
    f = np.apply_along_axis(lambda r: np.convolve(np.pad(r, 2, mode="edge"), k, "valid"), 1, f)
    return np.apply_along_axis(lambda r: np.convolve(np.pad(r, 2, mode="edge"), k, "valid"), 0, f)


def _rgb(f):
    return (np.stack([f, 0.8 * f + 0.1, 1.0 - f], -1) * 255).round().astype(np.uint8)


def _frames(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "smooth":        # stripes gliding 1 px per frame
        frames = [_pattern(t) for t in range(T)]
    elif kind == "noisy":       # the same motion under strong per-frame noise (flicker)
        frames = [np.clip(_pattern(t) + rng.normal(0, 0.25, (H, W)), 0, 1) for t in range(T)]
    elif kind == "blurred":     # the same motion, box-blurred
        frames = [_blur(_pattern(t)) for t in range(T)]
    elif kind == "jerky":       # jumps half a period back and forth every frame
        frames = [_pattern(4 * (t % 2)) for t in range(T)]
    elif kind == "jerky_blurred":
        frames = [_blur(_pattern(4 * (t % 2))) for t in range(T)]
    else:
        raise ValueError(kind)
    return np.stack([_rgb(f) for f in frames])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind in ("smooth", "noisy", "blurred", "jerky", "jerky_blurred"):
        out[kind] = write_video(str(folder / f"{kind}.mp4"), _frames(kind), fps=8)
    return out


@pytest.fixture(scope="module")
def metrics(videos):
    scorer = OfflineScorer()
    return {kind: scorer.score_video(path) for kind, path in videos.items()}


# --------------------------------------------------------------------------------------------- offline metrics

def test_offline_metric_names_are_not_vbench_dimensions():
    from mindspeed_mm.dpo.scorers import OFFLINE_METRICS, VBENCH_DIMENSIONS

    assert OFFLINE_METRICS == ("temporal_consistency", "motion_smoothness_interp", "sharpness")
    assert not set(OFFLINE_METRICS) & set(VBENCH_DIMENSIONS)


def test_metric_ordering(metrics):
    tc = {k: m["temporal_consistency"] for k, m in metrics.items()}
    ms = {k: m["motion_smoothness_interp"] for k, m in metrics.items()}
    sh = {k: m["sharpness"] for k, m in metrics.items()}
    # flicker and jerks break consecutive-frame similarity; blur makes frames more alike
    assert tc["smooth"] > tc["noisy"] + 0.2 and tc["smooth"] > tc["jerky"] + 0.5
    assert tc["blurred"] >= tc["smooth"]
    # linear interpolation predicts a steady glide, not noise or back-and-forth jumps
    assert ms["smooth"] > ms["noisy"] + 0.05 and ms["smooth"] > ms["jerky"] + 0.1
    # blur removes high frequencies; noise adds them
    assert sh["smooth"] > 5 * sh["blurred"] and sh["noisy"] > sh["smooth"]
    for m in metrics.values():
        assert -1.0 <= m["temporal_consistency"] <= 1.0 and 0.0 <= m["motion_smoothness_interp"] <= 1.0
        assert m["sharpness"] >= 0.0


def test_metrics_on_exact_frames():
    import torch

    from mindspeed_mm.dpo.scorers import motion_smoothness_interp, sharpness, temporal_consistency

    ramp = torch.linspace(0, 1, 5).view(5, 1, 1).expand(5, 4, 4).clone()   # flat frames, brightness ramp
    assert motion_smoothness_interp(ramp) == pytest.approx(1.0)             # linear in time: perfectly predicted
    assert temporal_consistency(ramp) == 0.0                                 # flat frames at different levels
    assert temporal_consistency(torch.full((3, 4, 4), 0.5)) == 1.0
    alternating = torch.stack([torch.zeros(4, 4), torch.ones(4, 4), torch.zeros(4, 4)])
    assert motion_smoothness_interp(alternating) == pytest.approx(0.0)      # |1 - (0 + 0) / 2| = 1
    checker = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2
    frames = torch.stack([checker, 1 - checker, checker]).float()
    assert temporal_consistency(frames) == pytest.approx(-1.0)              # each frame the negative of the last
    # Laplacian of a checkerboard is +-4 on the 2x2 interior: variance 16
    assert sharpness(frames) == pytest.approx(16.0)
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness_interp(frames[:2])


def test_unreadable_and_short_videos_are_reported(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    short = write_video(str(tmp_path / "short.mp4"), _frames("smooth")[:2], fps=8)
    scores, failed = OfflineScorer().score_videos([str(bad), short])
    assert scores == {}
    assert str(bad) in failed[str(bad)]
    assert "at least 3 frames" in failed[short] and short in failed[short]


# --------------------------------------------------------------------------------------------- normalisation

def test_normalisation_and_weighted_mean():
    assert normalize_metric([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert normalize_metric([7.0, 7.0, 7.0]) == [0.5, 0.5, 0.5]          # constant: no preference, no 0/0
    assert normalize_metric([1.0]) == [0.5]
    raw = {0: {"a": 1.0, "b": 5.0, "c": 0.2}, 1: {"a": 3.0, "b": 5.0, "c": 0.1}, 2: {"a": 2.0, "b": 5.0, "c": 0.3}}
    normalised, scores = combine_scores(raw, {"a": 2.0, "b": 1.0, "c": 1.0})
    assert normalised[1] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert scores[0] == pytest.approx((2 * 0.0 + 0.5 + 0.5) / 4)
    assert scores[1] == pytest.approx((2 * 1.0 + 0.5 + 0.0) / 4)
    assert scores[2] == pytest.approx((2 * 0.5 + 0.5 + 1.0) / 4)
    _, zero_c = combine_scores(raw, {"a": 1.0, "b": 0.0, "c": 0.0})
    assert zero_c == {0: 0.0, 1: 1.0, 2: 0.5}
    with pytest.raises(PreferenceDataError, match="not finite"):
        normalize_metric([1.0, float("nan")])


# --------------------------------------------------------------------------------------------- histogram

EXPECTED_KEYS = ["0.0-0.1", "0.1-0.2", "0.2-0.30000000000000004", "0.30000000000000004-0.4", "0.4-0.5", "0.5-0.6",
                 "0.6000000000000001-0.7000000000000001", "0.7000000000000001-0.8", "0.8-0.9", "0.9-1.0"]


def test_histogram_keys_and_fields():
    h = compute_histogram([0.0, 0.3, 0.35, 1.0])
    assert list(h) == EXPECTED_KEYS + list(HISTOGRAM_FIELDS)
    # 0.3 / 0.1 = 2.9999999999999996 -> bin 2; 0.35 -> bin 3; 1.0 is the top edge -> last bin
    assert [h[k] for k in EXPECTED_KEYS] == [1, 0, 1, 1, 0, 0, 0, 0, 0, 1]
    assert {f: h[f] for f in HISTOGRAM_FIELDS} == {"total_num": 4, "max_num": 1, "min_bin": 0, "max_bin": 10,
                                                   "bin_width": 0.1, "bin_size": 10}
    h = compute_histogram([0.42, 0.58, 0.55, 0.47, 0.51])
    assert h == {"0.4-0.5": 2, "0.5-0.6": 3, "total_num": 5, "max_num": 3, "min_bin": 4, "max_bin": 6,
                 "bin_width": 0.1, "bin_size": 2}
    # every score on one bin edge (e.g. every dimension constant): one bin, not none
    assert compute_histogram([0.5, 0.5]) == {"0.5-0.6": 2, "total_num": 2, "max_num": 2, "min_bin": 5,
                                             "max_bin": 6, "bin_width": 0.1, "bin_size": 1}
    assert list(compute_histogram([0.2, 0.7], bin_width=0.25)) == ["0.0-0.25", "0.25-0.5", "0.5-0.75"] + list(
        HISTOGRAM_FIELDS)
    with pytest.raises(HistogramError, match="no scores"):
        compute_histogram([])
    with pytest.raises(HistogramError, match="positive"):
        compute_histogram([0.1], bin_width=0)


def test_score_probability_edges():
    h = compute_histogram([0.0, 0.3, 0.35, 1.0, 1.0])
    assert score_probability(h, 1.0) == pytest.approx(2 / 5)     # top edge: in the last bin, as counted
    assert score_probability(h, 0.95) == pytest.approx(2 / 5)
    assert score_probability(h, 0.0) == pytest.approx(1 / 5)     # bottom edge
    assert score_probability(h, 0.3) == pytest.approx(1 / 5)     # the same bin compute_histogram put 0.3 in (bin 2)
    assert score_probability(h, 0.25) == pytest.approx(1 / 5)
    assert score_probability(h, 0.5) == 0.0                       # empty bin
    assert score_probability(h, -0.01) == 0.0                     # below the range
    assert score_probability(h, 1.05) == 0.0                      # above the top edge
    # every score the histogram counted has the probability of its bin
    scores = [0.03, 0.11, 0.31, 0.5, 0.6, 0.99, 1.0, 0.2]
    h = compute_histogram(scores)
    assert sum(score_probability(h, s) for s in scores) == pytest.approx(
        sum(c * c for k, c in h.items() if k not in HISTOGRAM_FIELDS) / len(scores))
    assert all(score_probability(h, s) > 0 for s in scores)


def test_pair_weight_formula():
    h = compute_histogram([0.05, 0.15, 0.15, 0.15, 0.25])     # bins: 1, 3, 1 of 5; max_num/total_num = 0.6
    assert pair_weight(h, 0.25, 0.05, alpha=0) == 1.0
    assert pair_weight(h, 0.25, 0.05, alpha=1) == pytest.approx(0.6 / math.sqrt(0.2 * 0.2))
    assert pair_weight(h, 0.15, 0.05, alpha=2) == pytest.approx((0.6 / math.sqrt(0.6 * 0.2)) ** 2)
    assert pair_weight(h, 0.15, 0.05, alpha=1, beta=0.3) == pytest.approx(0.3 / math.sqrt(0.6 * 0.2))
    assert pair_weight(h, 0.9, 0.05, alpha=1) == pytest.approx(0.6 / 1e-3)   # P = 0: floored at 1e-3
    assert pair_weight(h, 0.9, 0.05, alpha=0) == 1.0
    with pytest.raises(ValueError, match="beta"):
        pair_weight(h, 0.15, 0.05, alpha=1, beta=0.0)


def test_load_histogram_roundtrip_and_errors(tmp_path):
    h = compute_histogram([0.0, 0.3, 0.35, 1.0])
    path = tmp_path / "video_score_histogram.json"
    path.write_text(json.dumps(h))
    assert load_histogram(path) == h
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_histogram(tmp_path / "nowhere.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(HistogramError, match="broken.json.*not valid JSON"):
        load_histogram(broken)
    cases = [
        ({k: v for k, v in h.items() if k != "max_num"}, "missing field.*max_num"),
        ({**h, "total_num": 5}, "add up to 4 but total_num is 5"),
        ({**h, "max_num": 2}, "largest bin count is 1 but max_num is 2"),
        ({**h, "bin_size": 9}, "bin_size is 9"),
        ({**{k: v for k, v in h.items() if k != "0.9-1.0"}, "0.9-1": 1}, "missing bin.*0.9-1.0"),
        ({**h, "0.0-0.1": -1, "0.9-1.0": 3}, "count -1"),
        ({**h, "bin_width": "0.1"}, "bin_width must be a number"),
        ([1, 2], "expected a JSON object"),
    ]
    for i, (data, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(json.dumps(data))
        with pytest.raises(HistogramError, match=f"bad{i}.json.*{message}"):
            load_histogram(bad)


# --------------------------------------------------------------------------------------------- pairs

def test_select_pairs_max_min_and_skips():
    scores = {0: 0.2, 1: 0.9, 2: 0.4, 3: 0.7, 4: 0.7, 6: 0.5, 9: 0.3, 10: 0.3, 11: 0.8, 12: 0.6, 13: 0.6, 14: 0.1}
    rows, skipped = select_pairs(["p0", "p1", "p2", "p3", "p4"], scores, 3)
    assert rows == [
        {"file": "./video_1.mp4", "file_rejected": "./video_0.mp4", "captions": "p0", "score": 0.9,
         "score_rejected": 0.2},
        {"file": "./video_11.mp4", "file_rejected": "./video_9.mp4", "captions": "p3", "score": 0.8,
         "score_rejected": 0.3},   # 9 and 10 tie for the minimum: the first index
        {"file": "./video_12.mp4", "file_rejected": "./video_14.mp4", "captions": "p4", "score": 0.6,
         "score_rejected": 0.1},   # 12 and 13 tie for the maximum: the first index
    ]
    assert list(rows[0]) == ["file", "file_rejected", "captions", "score", "score_rejected"]
    assert skipped == {1: "all videos score the same", 2: "fewer than 2 scored videos"}


# --------------------------------------------------------------------------------------------- end to end

PROMPTS = "a red fox runs\n\n一只猫在睡觉\nwaves at dusk\nan empty road\n"   # the blank line is not a prompt


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory, videos):
    """4 prompts x 3 videos with gaps: prompt 2 has one video, prompt 3 two identical ones; plus a grid and a stray."""
    root = tmp_path_factory.mktemp("samples")
    folder = root / "videos"
    folder.mkdir()
    layout = {0: "jerky_blurred", 1: "smooth", 2: "noisy", 3: "smooth", 4: "blurred", 6: "smooth", 9: "noisy",
              10: "noisy", 12: "smooth"}
    for index, kind in layout.items():
        (folder / f"video_{index}.mp4").write_bytes(Path(videos[kind]).read_bytes())
    (folder / "video_grid.mp4").write_bytes(Path(videos["smooth"]).read_bytes())
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    return root


def _load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("histgram_generator", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_cli(argv, capsys):
    from mindspeed_mm.cli import run

    rc = run(_load_cli().main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_build_preference_data(sample_dir, tmp_path):
    messages = []
    result = build_preference_data(sample_dir / "prompts.txt", sample_dir / "videos", 3, OfflineScorer(),
                                   output_dir=tmp_path, log=messages.append)
    log = "\n".join(messages)
    assert "4 of 12 expected videos are missing" in log and "video_5.mp4, video_7..8.mp4, video_11.mp4" in log
    assert "ignoring 1 video file(s)" in log and "video_12.mp4" in log and "video_grid" not in log
    assert "fewer than 2 scored videos: 1 (first: prompt #3)" in log
    assert "all videos score the same: 1 (first: prompt #4)" in log

    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "video_score_histogram.json", "video_scores.json"]
    lines = (tmp_path / "data.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows == result.pairs and len(rows) == 2
    table = json.loads((tmp_path / "video_scores.json").read_text(encoding="utf-8"))
    scores = {int(name[6:-4]): v["score"] for name, v in table["videos"].items()}
    assert sorted(scores) == [0, 1, 2, 3, 4, 6, 9, 10]
    assert table["scorer"] == "offline" and set(table["weights"]) == {"temporal_consistency",
                                                                       "motion_smoothness_interp", "sharpness"}
    for name in table["weights"]:  # min-max over all scored videos
        values = [v["normalized"][name] for v in table["videos"].values()]
        assert min(values) == 0.0 and max(values) == 1.0
    # prompt 0: video_0 (jerky and blurred) is worse than both others on every metric -> rejected
    assert rows[0]["captions"] == "a red fox runs" and rows[0]["file_rejected"] == "./video_0.mp4"
    assert rows[0]["file"] == f"./video_{max((1, 2), key=lambda i: scores[i])}.mp4"
    assert rows[1] == {"file": f"./video_{max((3, 4), key=lambda i: scores[i])}.mp4",
                       "file_rejected": f"./video_{min((3, 4), key=lambda i: scores[i])}.mp4",
                       "captions": "一只猫在睡觉", "score": max(scores[3], scores[4]),
                       "score_rejected": min(scores[3], scores[4])}
    for row in rows:  # relative to the videos folder (data_folder)
        assert (sample_dir / "videos" / row["file"]).is_file() and row["score"] > row["score_rejected"]
        assert row["score"] == scores[int(row["file"][8:-4])]
    assert scores[9] == scores[10]
    histogram = load_histogram(tmp_path / "video_score_histogram.json")
    assert histogram == compute_histogram([scores[i] for i in sorted(scores)]) and histogram["total_num"] == 8
    # the DPO dataset reads it with data_folder = the videos folder
    from mindspeed_mm.data import read_manifest

    manifest = read_manifest(str(tmp_path / "data.jsonl"), data_folder=str(sample_dir / "videos"), log=False)
    assert len(manifest) == 2 and manifest.rows[1].captions == ["一只猫在睡觉"]
    assert all(os.path.isfile(r.path) and os.path.isfile(r.path_rejected) for r in manifest.rows)


def test_cli_end_to_end(sample_dir):
    env = {k: v for k, v in os.environ.items() if k != "VBENCH_CACHE_DIR"}
    proc = subprocess.run([sys.executable, str(CLI), "--prompt_file", str(sample_dir / "prompts.txt"),
                           "--videos_path", str(sample_dir / "videos") + "/", "--num_inference_videos_per_sample",
                           "3", "--scorer", "offline", "--weights", "temporal_consistency=2", "sharpness=1"],
                          capture_output=True, text=True, cwd=sample_dir, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "scorer: offline" in proc.stdout and "not VBench dimensions" in proc.stdout
    assert "temporal_consistency=2, motion_smoothness_interp=0, sharpness=1" in proc.stdout
    assert "2 pair(s) written" in proc.stdout
    rows = [json.loads(line) for line in (sample_dir / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    table = json.loads((sample_dir / "video_scores.json").read_text(encoding="utf-8"))
    assert table["weights"] == {"temporal_consistency": 2.0, "motion_smoothness_interp": 0.0, "sharpness": 1.0}
    for name, v in table["videos"].items():
        n = v["normalized"]
        assert v["score"] == pytest.approx((2 * n["temporal_consistency"] + n["sharpness"]) / 3)
    assert len(rows) == 2 and all(r["file"].startswith("./video_") for r in rows)
    assert load_histogram(sample_dir / "video_score_histogram.json")["total_num"] == 8
    assert not [p for p in os.listdir(sample_dir) if p.endswith(".partial")]


def test_cli_default_scorer_is_announced(sample_dir, tmp_path, capsys):
    usable, reason = vbench_status()
    if usable:
        pytest.skip("VBench is usable here; the default would run it")
    rc, out, err = _run_cli(["--prompt_file", sample_dir / "prompts.txt", "--videos_path", sample_dir / "videos",
                             "--num_inference_videos_per_sample", 3, "--output_dir", tmp_path], capsys)
    assert rc == 0, err
    assert f"scorer: offline (VBench is not usable: {reason})" in out
    assert (tmp_path / "data.jsonl").is_file()


def test_cli_errors(sample_dir, tmp_path, capsys):
    prompts, folder = sample_dir / "prompts.txt", sample_dir / "videos"
    base = ["--scorer", "offline", "--output_dir", tmp_path / "out"]

    def fails(argv, message):
        rc, out, err = _run_cli(argv + base, capsys)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err)
        assert message in err, err

    fails(["--prompt_file", tmp_path / "none.txt", "--videos_path", folder, "--num_inference_videos_per_sample", 3],
          f"prompt file '{tmp_path / 'none.txt'}' does not exist")
    fails(["--prompt_file", prompts, "--videos_path", tmp_path / "novideos", "--num_inference_videos_per_sample", 3],
          "novideos' does not exist")
    (tmp_path / "empty").mkdir()
    fails(["--prompt_file", prompts, "--videos_path", tmp_path / "empty", "--num_inference_videos_per_sample", 3],
          "holds none of the expected video_0.mp4 .. video_11.mp4")
    fails(["--prompt_file", prompts, "--videos_path", folder, "--num_inference_videos_per_sample", 1],
          "must be an integer >= 2")
    fails(["--prompt_file", prompts, "--videos_path", folder, "--num_inference_videos_per_sample", 3,
           "--weights", "bogus=1"], "unknown metric(s) bogus")
    fails(["--prompt_file", prompts, "--videos_path", folder, "--num_inference_videos_per_sample", 3,
           "--weights", "sharpness"], "NAME=VALUE")
    (tmp_path / "blank.txt").write_text("\n \n")
    fails(["--prompt_file", tmp_path / "blank.txt", "--videos_path", folder, "--num_inference_videos_per_sample", 3],
          "holds no prompt")
    assert not (tmp_path / "out").exists()


def test_no_pair_remains(sample_dir, tmp_path, videos):
    folder = tmp_path / "videos"
    folder.mkdir()
    for index in (0, 3):   # one video per prompt for the first two prompts
        (folder / f"video_{index}.mp4").write_bytes(Path(videos["smooth"]).read_bytes())
    messages = []
    with pytest.raises(PreferenceDataError, match="no preference pair remains"):
        build_preference_data(sample_dir / "prompts.txt", folder, 3, OfflineScorer(), log=messages.append)
    assert "fewer than 2 scored videos: 4" in "\n".join(messages)
    assert not (tmp_path / "data.jsonl").exists()


def test_unreadable_video_is_skipped_not_fatal(sample_dir, tmp_path, videos):
    folder = tmp_path / "videos"
    folder.mkdir()
    for index, kind in ((0, "smooth"), (1, "noisy"), (2, "smooth")):
        (folder / f"video_{index}.mp4").write_bytes(Path(videos[kind]).read_bytes())
    (folder / "video_2.mp4").write_bytes(b"truncated")
    messages = []
    result = build_preference_data(sample_dir / "prompts.txt", folder, 3, OfflineScorer(), log=messages.append)
    assert list(result.failed) == [2] and "video_2.mp4 was not scored" in "\n".join(messages)
    assert {result.pairs[0]["file"], result.pairs[0]["file_rejected"]} == {"./video_0.mp4", "./video_1.mp4"}
    assert (tmp_path / "data.jsonl").is_file()   # <videos_path>/.. by default


# --------------------------------------------------------------------------------------------- VBench adapter

def test_vbench_requested_but_unavailable():
    if vbench_status()[0]:
        pytest.skip("VBench is usable here")
    with pytest.raises(ScoringError) as info:
        build_scorer("vbench")
    message = str(info.value)
    assert "pip install vbench" in message and "--scorer offline" in message and "VBENCH_CACHE_DIR" in message
    scorer, why = build_scorer("auto")
    assert scorer.name == "offline" and "VBench is not usable" in why


def test_vbench_checkpoint_check(tmp_path):
    from mindspeed_mm.dpo.scorers import vbench_checkpoints

    paths = vbench_checkpoints(str(tmp_path))
    assert set(paths) == {"subject_consistency", "background_consistency", "motion_smoothness", "aesthetic_quality",
                          "imaging_quality"}
    assert all(p.startswith(str(tmp_path)) for ps in paths.values() for p in ps)


def test_parse_vbench_results():
    dims = ("subject_consistency", "motion_smoothness")
    results = {
        "subject_consistency": [0.9, [{"video_path": "/w/videos/video_0.mp4", "video_results": 0.95},
                                      {"video_path": "/w/videos/video_1.mp4", "video_results": 0.85},
                                      {"video_path": "/w/videos/video_2.mp4", "video_results": 0.8}]],
        "motion_smoothness": [0.97, [{"video_path": "/w/videos/video_0.mp4", "video_results": 0.99},
                                     {"video_path": "/w/videos/video_1.mp4", "video_results": 0.95},
                                     {"video_path": "/w/videos/video_2.mp4", "video_results": [0.1]}]],
    }
    path_of = {"video_0.mp4": "/data/video_0.mp4", "video_1.mp4": "/data/video_1.mp4", "video_2.mp4": "/data/v2"}
    parsed = parse_vbench_results(results, dims, path_of)
    assert parsed == {"/data/video_0.mp4": {"subject_consistency": 0.95, "motion_smoothness": 0.99},
                      "/data/video_1.mp4": {"subject_consistency": 0.85, "motion_smoothness": 0.95}}
    with pytest.raises(ScoringError, match="no dimension 'imaging_quality'"):
        parse_vbench_results(results, dims + ("imaging_quality",), path_of)
