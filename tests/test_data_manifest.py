"""data.jsonl reading: joins, captions, DPO rows, bad rows skipped and counted with line numbers."""

import json
import logging

import pytest

from mindspeed_mm.data.manifest import ManifestError, choose_caption, read_manifest


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "videos").mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / "videos" / name).write_bytes(b"x")
    return tmp_path


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return str(path)


def test_rows_are_joined_and_bad_rows_are_counted(folder, caplog):
    manifest_path = write_lines(folder / "data.jsonl", [
        {"file": "videos/a.mp4", "captions": "一只猫"},                      # 1 ok
        {"file": "videos/b.mp4", "captions": ["x", "", "y"]},                # 2 ok, empty entry dropped
        '{"file": "videos/c.mp4", "captions": "broken',                      # 3 bad JSON
        {"captions": "no file"},                                             # 4 missing 'file'
        {"file": "videos/c.mp4"},                                            # 5 missing 'captions'
        {"file": "videos/c.mp4", "captions": "   "},                         # 6 empty captions
        {"file": "videos/c.mp4", "captions": []},                            # 7 empty captions
        {"file": "videos/gone.mp4", "captions": "x"},                        # 8 missing file
        "",                                                                  # blank: not a row
        {"file": "videos/c.mp4", "captions": 3},                             # 10 bad 'captions'
        "[1, 2]",                                                            # 11 not an object
        {"file": "videos/c.mp4", "captions": "ok", "motion_score": 5},       # 12 ok, extra key kept
    ])
    with caplog.at_level(logging.INFO):
        m = read_manifest(manifest_path, str(folder))
    assert [r.line for r in m.rows] == [1, 2, 12]
    assert m.rows[0].path == str(folder / "videos" / "a.mp4") and m.rows[0].file == "videos/a.mp4"
    assert m.rows[0].captions == ["一只猫"] and m.rows[1].captions == ["x", "y"]
    assert m.rows[2].extra == {"motion_score": 5} and not m.rows[2].is_dpo
    assert m.total == 11
    assert dict(m.skipped) == {"bad JSON": [3], "missing 'file'": [4], "missing 'captions'": [5],
                               "empty captions": [6, 7], "missing file": [8], "bad 'captions'": [10],
                               "not a JSON object": [11]}
    expected = ("kept 3 of 11 rows in data.jsonl: 1 bad JSON (line 3), 1 missing 'file' (line 4), "
                "1 missing 'captions' (line 5), 2 empty captions (lines 6, 7), 1 missing file "
                f"(line 8: {folder / 'videos' / 'gone.mp4'}), 1 bad 'captions' (line 10), "
                "1 not a JSON object (line 11)")
    assert m.summary() == expected
    assert expected in caplog.text


def test_dpo_rows(folder):
    path = write_lines(folder / "data.jsonl", [
        {"file": "./videos/a.mp4", "file_rejected": "./videos/b.mp4", "captions": "p", "score": 0.9,
         "score_rejected": 0.1},
        {"file": "videos/a.mp4", "file_rejected": "videos/gone.mp4", "captions": "p", "score": 1,
         "score_rejected": 0},
        {"file": "videos/a.mp4", "file_rejected": "videos/b.mp4", "captions": "p", "score": "high",
         "score_rejected": 0},
        {"file": "videos/a.mp4", "file_rejected": "videos/b.mp4", "captions": "p", "score": 1},
    ])
    m = read_manifest(path, str(folder))
    (row,) = m.rows
    assert row.is_dpo and row.path_rejected == str(folder / "videos" / "b.mp4")
    assert (row.score, row.score_rejected) == (0.9, 0.1)
    assert dict(m.skipped) == {"missing file": [2], "bad 'score'": [3], "missing 'score_rejected'": [4]}


def test_json_list_and_absolute_paths(folder):
    path = folder / "data.json"
    path.write_text(json.dumps([{"file": str(folder / "videos" / "a.mp4"), "captions": "a"},
                                {"file": "videos/b.mp4", "captions": "b"}, "junk"]))
    m = read_manifest(str(path), str(folder))
    assert [r.path for r in m.rows] == [str(folder / "videos" / "a.mp4"), str(folder / "videos" / "b.mp4")]
    assert m.summary() == "kept 2 of 3 rows in data.json: 1 not a JSON object (line 3)"


def test_whole_file_errors_name_the_file(folder):
    with pytest.raises(ManifestError, match="nope.jsonl: the dataset manifest"):
        read_manifest(str(folder / "nope.jsonl"), str(folder))
    with pytest.raises(ManifestError, match="data_folder"):
        read_manifest(write_lines(folder / "d.jsonl", [{"file": "videos/a.mp4", "captions": "a"}]),
                      str(folder / "no_such_folder"))
    bad = write_lines(folder / "bad.jsonl", ["{", {"file": "videos/gone.mp4", "captions": "x"}])
    with pytest.raises(ManifestError, match=r"bad.jsonl: no usable rows \(kept 0 of 2 rows in bad.jsonl: 1 bad JSON "
                                            r"\(line 1\), 1 missing file \(line 2: .*videos/gone.mp4\)\)"):
        read_manifest(bad, str(folder))
    (folder / "list.json").write_text('{"file": "a"}')
    with pytest.raises(ManifestError, match="list.json: a .json manifest must hold a list"):
        read_manifest(str(folder / "list.json"), str(folder))


def test_suffixes_and_unchecked_files(folder):
    path = write_lines(folder / "f.jsonl", [{"file": "features/x.pt"}, {"file": "videos/a.mp4"}])
    m = read_manifest(path, str(folder), require_captions=False, check_files=False, suffixes=(".pt",))
    assert [r.file for r in m.rows] == ["features/x.pt"] and dict(m.skipped) == {"not a .pt file": [2]}


def test_many_lines_of_one_reason_are_abbreviated(folder):
    path = write_lines(folder / "d.jsonl", [{"file": "videos/a.mp4", "captions": "a"}] + ["{"] * 8)
    assert read_manifest(path, str(folder)).summary() == (
        "kept 1 of 9 rows in d.jsonl: 8 bad JSON (lines 2, 3, 4, 5, 6, ... 3 more)")


def test_choose_caption_is_seeded():
    caps = [f"c{i}" for i in range(10)]
    picks = [choose_caption(caps, seed=1, index=i) for i in range(50)]
    assert picks == [choose_caption(caps, seed=1, index=i) for i in range(50)]
    assert len(set(picks)) > 3
    assert picks != [choose_caption(caps, seed=2, index=i) for i in range(50)]
    assert picks != [choose_caption(caps, seed=1, index=i, epoch=1) for i in range(50)]
    assert choose_caption(["only"], seed=5, index=3) == "only"


def test_paths_outside_data_folder_are_skipped_unless_allowed(folder, tmp_path_factory, caplog):
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "x.mp4").write_bytes(b"x")
    (folder / "videos" / "sub").mkdir()
    escape = "../" + outside.name + "/x.mp4"  # folder and outside share the pytest base folder
    path = write_lines(folder / "data.jsonl", [
        {"file": "videos/a.mp4", "captions": "ok"},                                  # 1
        {"file": escape, "captions": "climbs out"},                                  # 2
        {"file": str(outside / "x.mp4"), "captions": "absolute outside"},            # 3
        {"file": str(folder / "videos" / "b.mp4"), "captions": "absolute inside"},   # 4 ok
        {"file": "videos/sub/../../videos/c.mp4", "captions": "stays inside"},       # 5 ok
        {"file": "videos/a.mp4", "file_rejected": escape, "captions": "p", "score": 1, "score_rejected": 0},  # 6
        {"file": "../" + folder.name + "_no/x.mp4", "captions": "a sibling with a common prefix"},       # 7
    ])
    assert (folder / escape).is_file()
    with caplog.at_level(logging.INFO):
        m = read_manifest(path, str(folder))
    assert [r.line for r in m.rows] == [1, 4, 5]
    assert dict(m.skipped) == {"outside data_folder": [2, 3, 6, 7]}
    assert "allow_paths_outside_data_folder" in caplog.text and str(folder) in caplog.text
    allowed = read_manifest(path, str(folder), allow_outside=True, check_files=False)
    assert [r.line for r in allowed.rows] == [1, 2, 3, 4, 5, 6, 7]
    assert allowed.rows[1].path == str(outside / "x.mp4")
    only_outside = write_lines(folder / "out.jsonl", [{"file": escape, "captions": "x"}])
    with pytest.raises(ManifestError, match=r"1 outside data_folder \(line 1\)\).*set basic_parameters\.data_folder "
                                            r".*allow_paths_outside_data_folder true"):
        read_manifest(only_outside, str(folder))


def test_empty_data_folder_means_the_working_directory(folder, monkeypatch):
    monkeypatch.chdir(folder / "videos")
    path = write_lines(folder / "data.jsonl", [{"file": "a.mp4", "captions": "a"},
                                               {"file": "../data.jsonl", "captions": "up"},
                                               {"file": str(folder / "videos" / "b.mp4"), "captions": "b"}])
    m = read_manifest(path, "")
    assert [r.path for r in m.rows] == ["a.mp4", str(folder / "videos" / "b.mp4")]
    assert dict(m.skipped) == {"outside data_folder": [2]}


def test_build_dataset_reads_the_opt_in_key(folder, tmp_path_factory):
    from mindspeed_mm.config import load_config
    from mindspeed_mm.config.data import MMDataConfig
    from mindspeed_mm.data import build_dataset

    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "x.pt").write_bytes(b"x")
    rows = write_lines(folder / "f.jsonl", [{"file": str(outside / "x.pt")}, {"file": "videos/a.mp4"}])
    cfg = {"dataset_param": {"dataset_type": "feature", "basic_parameters": {
        "data_path": rows, "data_folder": str(folder), "allow_paths_outside_data_folder": True}}}
    (folder / "data.json").write_text(json.dumps(cfg))
    ds = build_dataset(load_config(MMDataConfig, str(folder / "data.json"), "--mm-data"))
    assert [r.path for r in ds.rows] == [str(outside / "x.pt")]
    cfg["dataset_param"]["basic_parameters"]["allow_paths_outside_data_folder"] = False
    (folder / "data.json").write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="1 outside data_folder"):
        build_dataset(load_config(MMDataConfig, str(folder / "data.json"), "--mm-data"))
