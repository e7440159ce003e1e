"""Raw-video and feature datasets on real files: outputs, DPO rows, bad samples replaced and counted, collate."""

import json
import logging

import pytest
import torch

from mindspeed_mm.config.data import (BasicParameters, DataloaderParam, DatasetParam, MMDataConfig,
                                      PreprocessParameters)
from mindspeed_mm.data import (FeatureDataset, ManifestError, VideoTextDataset, build_dataloader, build_dataset,
                               collate, decord_available, summarize_skipped)

from .test_data_video import LEVEL0, LEVEL_STEP, make_video

READERS = ["PyAVVideo"] + (["DecordVideo"] if decord_available() else [])


def fake_tokenizer(length):
    """A stand-in for StepChat/BERT with the same call signature: list of str -> (ids, mask) int64 (b, length)."""

    def tok(prompts):
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            codes = [ord(c) % 1000 + 1 for c in p][:length]
            ids[i, : len(codes)] = torch.tensor(codes)
            mask[i, : len(codes)] = 1
        return ids, mask

    return tok


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "videos").mkdir()
    make_video(root / "videos" / "a.mp4", n=48, fps=24)   # branch 1: stride 3
    make_video(root / "videos" / "b.mp4", n=20, fps=8)    # branch 1: stride 1
    make_video(root / "videos" / "c.mp4", n=6, fps=8)     # branch 3: 5 frames, padded
    (root / "videos" / "bad.mp4").write_bytes(b"\x00not a video" * 50)
    return root


def params(reader="PyAVVideo", **kw):
    base = dict(video_reader_type=reader, train_fps=8, skip_frame_num=0, num_frames=8, max_height=16, max_width=24)
    base.update(kw)
    return PreprocessParameters(**base)


def config(data_path, folder, dataset_type="t2v", **kw):
    pre = params(**kw) if dataset_type != "feature" else None
    return MMDataConfig(dataset_param=DatasetParam(
        dataset_type=dataset_type, basic_parameters=BasicParameters(data_path=str(data_path), data_folder=str(folder)),
        preprocess_parameters=pre), dataloader_param=DataloaderParam(shuffle=False, drop_last=True))


def decoded_ids(video):
    """Frame indices encoded in a (T, 3, H, W) [-1, 1] clip (grey level of its right part)."""
    level = (video[:, :, :, 8:] * 127.5 + 127.5).mean(dim=(1, 2, 3))
    return [round(v) for v in ((level - LEVEL0) / LEVEL_STEP).tolist()]


@pytest.mark.parametrize("reader", READERS)
def test_video_text_samples(root, reader):
    path = write_jsonl(root / "t2v.jsonl", [{"file": "videos/a.mp4", "captions": "第一"},
                                            {"file": "videos/b.mp4", "captions": ["x", "y"]},
                                            {"file": "videos/c.mp4", "captions": "third"}])
    ds = build_dataset(config(path, root, reader=reader), tokenizers=[fake_tokenizer(6), fake_tokenizer(4)])
    assert isinstance(ds, VideoTextDataset) and len(ds) == 3
    s = ds[0]
    assert s["video"].shape == (8, 3, 16, 24) and s["video"].dtype == torch.float32
    assert s["video"].min() >= -1 and s["video"].max() <= 1
    assert decoded_ids(s["video"]) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert decoded_ids(ds[1]["video"]) == list(range(8))
    assert decoded_ids(ds[2]["video"]) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert s["caption"] == "第一" and s["file"] == "videos/a.mp4"
    assert ds[1]["caption"] in ("x", "y")
    assert [t.shape for t in s["prompt_ids"]] == [(6,), (4,)] and s["prompt_ids"][0].dtype == torch.long
    assert s["prompt_mask"][0].tolist() == [1, 1, 0, 0, 0, 0]
    assert ds.read_failures == {}


def test_dpo_rows_and_a_dataloader_batch(root):
    path = write_jsonl(root / "dpo.jsonl", [
        {"file": "videos/a.mp4", "file_rejected": "videos/b.mp4", "captions": "p", "score": 0.8, "score_rejected": 0.2},
        {"file": "videos/b.mp4", "file_rejected": "videos/c.mp4", "captions": "q", "score": 0.7, "score_rejected": 0.3},
    ])
    cfg = config(path, root)
    ds = build_dataset(cfg)
    s = ds[0]
    assert decoded_ids(s["video"]) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert decoded_ids(s["video_rejected"]) == list(range(8))
    assert s["score"].item() == pytest.approx(0.8) and s["score_rejected"].dtype == torch.float32
    assert "prompt_ids" not in s  # no tokenizers given
    (batch,) = list(build_dataloader(ds, cfg, dp_rank=0, dp_size=1, micro_batch_size=2, num_epochs=1))
    assert batch["video"].shape == batch["video_rejected"].shape == (2, 8, 3, 16, 24)
    assert batch["score"].tolist() == pytest.approx([0.8, 0.7]) and batch["caption"] == ["p", "q"]


def test_unreadable_videos_are_replaced_by_the_next_row(root, caplog):
    path = write_jsonl(root / "bad.jsonl", [{"file": "videos/a.mp4", "captions": "a"},
                                            {"file": "videos/bad.mp4", "captions": "bad"},
                                            {"file": "videos/c.mp4", "captions": "c"}])
    ds = build_dataset(config(path, root, skip_frame_num=0))
    with caplog.at_level(logging.WARNING):
        s = ds[1]
    assert s["file"] == "videos/c.mp4" and s["caption"] == "c"
    assert "bad.mp4" in caplog.text and "line 2" in caplog.text
    assert ds.read_failures == {"unreadable video": 1}
    assert ds[1]["file"] == "videos/c.mp4" and ds.read_failures == {"unreadable video": 1}  # not retried
    # skip_frame_num 3 makes c.mp4 (6 frames) too short; its replacement wraps around to row 0
    short = build_dataset(config(path, root, skip_frame_num=3))
    assert short[2]["file"] == "videos/a.mp4" and short.read_failures == {"video too short": 1}


def test_no_readable_row_is_an_error(root):
    path = write_jsonl(root / "allbad.jsonl", [{"file": "videos/bad.mp4", "captions": "x"}] * 2)
    ds = build_dataset(config(path, root))
    with pytest.raises(ManifestError, match=r"allbad.jsonl: none of the 2 rows can be read \(2 unreadable video "
                                            r"\(lines 1, 2\)\)"):
        ds[0]


def test_build_dataset_errors(root):
    path = write_jsonl(root / "one.jsonl", [{"file": "videos/a.mp4", "captions": "a"}])
    cfg = config(path, root)
    cfg.dataset_param.basic_parameters.data_storage_mode = "combine"
    with pytest.raises(ValueError, match="data_storage_mode 'combine' is not supported"):
        build_dataset(cfg)
    cfg = config(path, root)
    cfg.dataset_param.preprocess_parameters = None
    with pytest.raises(ValueError, match="needs dataset_param.preprocess_parameters"):
        build_dataset(cfg)
    cfg = config(path, root)
    cfg.dataset_param.enable_text_preprocessing = True
    with pytest.raises(ValueError, match="enable_text_preprocessing true"):
        build_dataset(cfg)
    with pytest.raises(ManifestError, match="for raw videos set dataset_type to 't2v'"):
        build_dataset(config(path, root, dataset_type="feature"))


def feature(t=3, c=4, extra=True, squeeze=False):
    states = [torch.randn(1, 5, 6, dtype=torch.bfloat16), torch.randn(1, 4, 3)]
    masks = [torch.ones(1, 5, dtype=torch.long), torch.tensor([[1, 1, 0, 0]])]
    if squeeze:
        states, masks = [s[0] for s in states], [m[0] for m in masks]
    data = {"video": torch.randn(t, c, 2, 2, dtype=torch.bfloat16), "prompt_ids": states, "prompt_mask": masks}
    if extra:
        data["image_latents"] = torch.randn(t, c, 2, 2, dtype=torch.bfloat16)
    return data


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    (root / "features").mkdir()
    torch.save(feature(), root / "features" / "good.pt")
    torch.save(feature(squeeze=True), root / "features" / "flat.pt")
    torch.save(feature(extra=False), root / "features" / "plain.pt")
    torch.save(feature(t=2), root / "features" / "short.pt")
    bad = feature()
    del bad["prompt_mask"]
    torch.save(bad, root / "features" / "nomask.pt")
    torch.save([1, 2], root / "features" / "list.pt")
    (root / "features" / "junk.pt").write_bytes(b"junk")
    return root


def test_feature_dataset_layout_and_bad_files(features, caplog):
    path = write_jsonl(features / "data.jsonl", [
        {"file": "features/good.pt", "captions": "kept but unused"},
        {"file": "features/nomask.pt"},
        {"file": "features/list.pt"},
        {"file": "features/junk.pt"},
        {"file": "features/flat.pt"},
        {"file": "videos/a.mp4"},
        {"file": "features/missing.pt"},
    ])
    ds = build_dataset(config(path, features, dataset_type="feature"))
    assert isinstance(ds, FeatureDataset) and len(ds) == 5
    assert dict(ds.manifest.skipped) == {"not a .pt file": [6], "missing file": [7]}
    s = ds[0]
    assert s["video"].shape == (3, 4, 2, 2) and s["video"].dtype == torch.bfloat16
    assert [t.shape for t in s["prompt"]] == [(5, 6), (4, 3)] and s["prompt"][0].dtype == torch.bfloat16
    assert "prompt_ids" not in s  # states are "prompt"; "prompt_ids" is for token ids
    assert [t.shape for t in s["prompt_mask"]] == [(5,), (4,)]
    assert s["image_latents"].shape == (3, 4, 2, 2) and s["file"] == "features/good.pt"
    with caplog.at_level(logging.WARNING):
        assert ds[1]["file"] == "features/flat.pt"  # nomask, list and junk are skipped
    assert "nomask.pt" in caplog.text and "junk.pt" in caplog.text
    assert ds.read_failures == {"missing keys": 1, "not a feature dict": 1, "unreadable .pt": 1}
    batch = collate([ds[0], ds[4]])
    assert batch["video"].shape == (2, 3, 4, 2, 2)
    assert [t.shape for t in batch["prompt"]] == [(2, 5, 6), (2, 4, 3)]
    assert [t.shape for t in batch["prompt_mask"]] == [(2, 5), (2, 4)]
    assert batch["file"] == ["features/good.pt", "features/flat.pt"]


def test_feature_dpo_rows(features):
    path = write_jsonl(features / "dpo.jsonl", [
        {"file": "features/plain.pt", "file_rejected": "features/good.pt", "captions": "p", "score": 0.6,
         "score_rejected": 0.1},
        {"file": "features/good.pt", "file_rejected": "features/short.pt", "captions": "p", "score": 0.6,
         "score_rejected": 0.1},
    ])
    ds = build_dataset(config(path, features, dataset_type="feature"))
    s = ds[0]
    assert torch.equal(s["video_rejected"], torch.load(features / "features" / "good.pt")["video"])
    assert s["score"].item() == pytest.approx(0.6) and s["score_rejected"].item() == pytest.approx(0.1)
    assert "image_latents" not in s and "image_latents_rejected" not in s  # a t2v winner: the loser's is unused
    assert ds[1]["file"] == "features/plain.pt" and "video_rejected" in ds[1]
    assert ds.read_failures == {"bad DPO pair": 1}  # row 2's latents differ in shape; replaced by row 1 (wrapping)
    assert ds[1]["skipped_rows"] == [[2, "bad DPO pair"]]


def test_collate():
    samples = [{"x": torch.ones(2, 3), "l": [torch.zeros(4), torch.ones(2, 2)], "s": "a", "n": 1.5, "i": 3},
               {"x": torch.zeros(2, 3), "l": [torch.ones(4), torch.zeros(2, 2)], "s": "b", "n": 2.5, "i": 4}]
    b = collate(samples)
    assert b["x"].shape == (2, 2, 3) and b["x"][0].sum() == 6
    assert [t.shape for t in b["l"]] == [(2, 4), (2, 2, 2)] and b["l"][0][1].tolist() == [1, 1, 1, 1]
    assert b["s"] == ["a", "b"] and b["n"].tolist() == [1.5, 2.5] and b["i"].dtype == torch.long
    samples[1]["x"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"cannot batch 'x': its samples have different shapes"):
        collate(samples)
    with pytest.raises(ValueError, match="different keys"):
        collate([{"a": 1}, {"b": 1}])


def test_samples_carry_the_rows_skipped_to_produce_them(root):
    path = write_jsonl(root / "skips.jsonl", [{"file": "videos/a.mp4", "captions": "a"},
                                              {"file": "videos/bad.mp4", "captions": "bad"},
                                              {"file": "videos/bad.mp4", "captions": "bad again"},
                                              {"file": "videos/c.mp4", "captions": "c"}])
    cfg = config(path, root)
    ds = build_dataset(cfg)
    assert ds[0]["skipped_rows"] == []
    assert ds[1]["skipped_rows"] == [[2, "unreadable video"], [3, "unreadable video"]]
    assert ds[(2, 5)]["skipped_rows"] == [[3, "unreadable video"]]  # known bad: not re-read, still reported
    assert ds.read_failures == {"unreadable video": 2}
    (batch,) = list(build_dataloader(ds, cfg, dp_rank=0, dp_size=1, micro_batch_size=4, num_epochs=1))
    assert batch["skipped_rows"] == [[], [[2, "unreadable video"], [3, "unreadable video"]],
                                     [[3, "unreadable video"]], []]
    assert batch["file"] == ["videos/a.mp4", "videos/c.mp4", "videos/c.mp4", "videos/c.mp4"]
    pairs = [p for sample in batch["skipped_rows"] for p in sample]
    assert summarize_skipped(pairs) == "2 rows skipped and replaced by the next readable row: 2 unreadable video " \
                                       "(lines 2, 3)"


def test_summarize_skipped_counts_each_line_once():
    pairs = [[9, "unreadable .pt"], [7, "unreadable video"], [9, "unreadable .pt"], (7, "unreadable video")]
    assert summarize_skipped(pairs) == ("2 rows skipped and replaced by the next readable row: 1 unreadable video "
                                        "(line 7), 1 unreadable .pt (line 9)")
    assert summarize_skipped([[4, "bad DPO pair"]]) == "1 row skipped and replaced by the next readable row: " \
                                                      "1 bad DPO pair (line 4)"
    assert summarize_skipped([]) == ""


def test_caption_lists_are_redrawn_per_epoch_in_dataloader_workers(root):
    from mindspeed_mm.data import ResumableDistributedSampler, choose_caption

    captions = [f"caption {k}" for k in range(50)]
    path = write_jsonl(root / "caps.jsonl", [{"file": f"videos/{n}.mp4", "captions": captions} for n in "abc"])
    cfg = config(path, root, max_height=8, max_width=8, num_frames=2)
    cfg.dataloader_param.shuffle = True
    ds = build_dataset(cfg, seed=11)

    def captions_of(consumed, epochs):
        loader = build_dataloader(ds, cfg, dp_rank=0, dp_size=1, micro_batch_size=1, consumed_samples=consumed,
                                  seed=11, num_workers=2, num_epochs=epochs)
        return [(b["file"][0], b["caption"][0]) for b in loader]

    full = captions_of(0, 3)
    per_epoch = [dict(full[3 * e:3 * e + 3]) for e in range(3)]  # file -> caption, one dict per epoch
    assert all(len(d) == 3 for d in per_epoch)
    # Re-drawn each epoch, although the workers' dataset copies never saw a set_epoch call.
    assert per_epoch[0] != per_epoch[1] and per_epoch[1] != per_epoch[2] and per_epoch[0] != per_epoch[2]
    sampler = ResumableDistributedSampler(3, 0, 1, 1, shuffle=True, seed=11, drop_last=True, num_epochs=3,
                                          with_epoch=True)
    assert [c for _, c in full] == [choose_caption(captions, 11, i, e) for ((i, e),) in sampler]
    assert captions_of(3, 3) == full[3:]  # resuming after one epoch draws the same captions
