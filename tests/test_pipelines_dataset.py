"""Dataset sources: folders, CSV and JSONL manifests, captions, and the errors bad manifests get."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.dataset import DatasetError, read_source


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_recursive_ids_kinds(tmp_path: Path) -> None:
    _touch(tmp_path / "b" / "clip.MP4")
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.mp4")
    ds = read_source(tmp_path)
    assert [r.id for r in ds.items] == ["a.png", "b/clip.MP4"]
    assert [r.kind for r in ds.items] == ["image", "video"]
    assert ds.items[1].path == str((tmp_path / "b" / "clip.MP4").resolve())
    assert ds.captions == [] and ds.missing == []


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    _touch(tmp_path / "readme.txt")
    with pytest.raises(DatasetError, match="no video"):
        read_source(tmp_path)


def test_jsonl_manifest_captions_relative_paths_and_missing(tmp_path: Path) -> None:
    _touch(tmp_path / "media" / "v1.mp4")
    _touch(tmp_path / "media" / "p.jpg")
    lines = [
        {"id": "v1", "path": "media/v1.mp4", "split": "train", "captions": ["a dog", "a cat "]},
        {"id": "p", "path": "media/p.jpg", "caption": "a photo"},
        {"id": "gone", "path": "media/gone.mp4"},
    ]
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = read_source(man)
    assert [(r.id, r.kind, r.split) for r in ds.items] == [("v1", "video", "train"), ("p", "image", ""),
                                                            ("gone", "video", "")]
    assert ds.items[0].path == str((tmp_path / "media" / "v1.mp4").resolve())
    assert [(c.id, c.item, c.text) for c in ds.captions] == [("v1#0", "v1", "a dog"), ("v1#1", "v1", "a cat"),
                                                              ("p#0", "p", "a photo")]
    assert ds.missing == ["gone"]
    gone = (tmp_path / "media" / "gone.mp4").resolve()
    assert ds.problems == {"gone": ("missing_file", f"missing_file: file not found: {gone}")}


def test_csv_manifest_repeated_rows_and_pipe_captions(tmp_path: Path) -> None:
    _touch(tmp_path / "v1.mp4")
    _touch(tmp_path / "v2.mkv")
    man = tmp_path / "m.csv"
    man.write_text("id,path,split,caption,captions\n"
                   "v1,v1.mp4,val,first,\n"
                   "v2,v2.mkv,,,x|y\n"
                   "v1,v1.mp4,val,second,\n")
    ds = read_source(man)
    assert [r.id for r in ds.items] == ["v1", "v2"]
    assert [(c.id, c.text) for c in ds.captions] == [("v1#0", "first"), ("v1#1", "second"), ("v2#0", "x"),
                                                      ("v2#1", "y")]


def test_csv_repeated_id_with_other_path_is_duplicate(tmp_path: Path) -> None:
    man = tmp_path / "m.csv"
    man.write_text("id,path\nv1,a.mp4\nv1,b.mp4\n")
    with pytest.raises(DatasetError, match=r"line 3: duplicate item id 'v1' \(first on line 2\)"):
        read_source(man)


def test_jsonl_duplicate_id(tmp_path: Path) -> None:
    man = tmp_path / "m.jsonl"
    man.write_text('{"id": "a", "path": "a.mp4"}\n{"id": "a", "path": "a.mp4"}\n')
    with pytest.raises(DatasetError, match="line 2: duplicate item id 'a'"):
        read_source(man)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("m.jsonl", '{"id": "a", "path": "a.mp4"}\nnot json\n', "line 2: invalid JSON"),
        ("m.jsonl", '{"path": "a.mp4"}\n', "line 1: empty or missing 'id'"),
        ("m.jsonl", '{"id": "a", "path": "a.mp4", "split": "dev"}\n', "split 'dev'"),
        ("m.jsonl", '{"id": "a", "path": "a.mp4", "captions": [1]}\n', "list of strings"),
        ("m.csv", "name,file\na,b\n", "'id' and 'path' columns"),
        ("m.csv", "id,path\n", "has no rows"),
        ("m.txt", "a\n", "unknown format"),
    ],
)
def test_bad_manifests_name_file_and_line(tmp_path: Path, name: str, text: str, match: str) -> None:
    man = tmp_path / name
    man.write_text(text)
    with pytest.raises(DatasetError, match=match) as info:
        read_source(man)
    assert str(man) in str(info.value)


def test_missing_source_and_binary_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_source(tmp_path / "nope.jsonl")
    bad = tmp_path / "m.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="not a UTF-8"):
        read_source(bad)


def test_csv_unquoted_comma_in_caption_names_the_line(tmp_path: Path) -> None:
    man = tmp_path / "m.csv"
    man.write_text('id,path,caption\nv1,v1.mp4,"a dog, running"\nv2,v2.mp4,a cat, sleeping\n')
    with pytest.raises(DatasetError, match=r"line 3: 4 fields but the header has 3 .*quote") as info:
        read_source(man)
    assert str(man) in str(info.value)


def test_csv_line_numbers_count_quoted_newlines(tmp_path: Path) -> None:
    man = tmp_path / "m.csv"
    man.write_text('id,path,caption\nv1,v1.mp4,"two\nlines"\nv2,v2.mp4,x,y\n')
    with pytest.raises(DatasetError, match="line 4: 4 fields"):
        read_source(man)


def test_excel_csv_with_utf8_bom_is_read(tmp_path: Path) -> None:
    _touch(tmp_path / "v1.mp4")
    man = tmp_path / "m.csv"
    man.write_bytes("id,path,caption\r\nv1,v1.mp4,café\r\n".encode("utf-8-sig"))
    ds = read_source(man)
    assert [r.id for r in ds.items] == ["v1"] and ds.missing == []
    assert [(c.id, c.text) for c in ds.captions] == [("v1#0", "café")]
    jl = tmp_path / "m.jsonl"
    jl.write_bytes('{"id": "v1", "path": "v1.mp4"}\n'.encode("utf-8-sig"))
    assert [r.id for r in read_source(jl).items] == ["v1"]


def test_empty_captions_keep_stable_ids_and_are_reported(tmp_path: Path) -> None:
    jl = tmp_path / "m.jsonl"
    jl.write_text(json.dumps({"id": "a", "path": "a.mp4", "captions": ["one", "  ", "three", ""]}) + "\n"
                  + json.dumps({"id": "b", "path": "b.mp4", "caption": ""}) + "\n")
    ds = read_source(jl)
    assert [(c.id, c.text) for c in ds.captions] == [("a#0", "one"), ("a#2", "three")]
    assert ds.dropped_captions == ["a#1", "a#3", "b#0"]
    man = tmp_path / "m.csv"
    man.write_text("id,path,caption,captions\n"
                   "v1,v1.mp4,first,\n"
                   "v1,v1.mp4,,\n"          # a repeated row with no caption: an empty caption
                   "v1,v1.mp4,third,\n"
                   "v2,v2.mkv,,x||z\n"      # empty pipe segment
                   "v3,v3.mkv,,\n")         # no captions at all: nothing dropped
    ds = read_source(man)
    assert [(c.id, c.text) for c in ds.captions] == [("v1#0", "first"), ("v1#2", "third"), ("v2#0", "x"),
                                                      ("v2#2", "z")]
    assert ds.dropped_captions == ["v1#1", "v2#1"]


def test_symlink_loop_and_directory_are_named_per_item(tmp_path: Path) -> None:
    (tmp_path / "loop_a.mp4").symlink_to(tmp_path / "loop_b.mp4")
    (tmp_path / "loop_b.mp4").symlink_to(tmp_path / "loop_a.mp4")
    (tmp_path / "clips.mp4").mkdir()
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    _touch(tmp_path / "ok.mp4")
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"id": i, "path": f"{i}.mp4"}) + "\n"
                           for i in ("loop_a", "clips", "dangling", "ok", "gone")))
    ds = read_source(man)  # no RuntimeError traceback
    assert ds.missing == ["loop_a", "clips", "dangling", "gone"]
    assert {i: r for i, (r, _) in ds.problems.items()} == {
        "loop_a": "symlink_loop", "clips": "is_directory", "dangling": "missing_file", "gone": "missing_file"}
    assert "loop of symbolic links" in ds.problems["loop_a"][1] and "loop_a.mp4" in ds.problems["loop_a"][1]
    assert "is a directory" in ds.problems["clips"][1] and "not found" not in ds.problems["clips"][1]
    assert "file not found" in ds.problems["gone"][1]


def test_folder_with_symlink_loop_lists_it_with_its_problem(tmp_path: Path) -> None:
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # a directory loop is not walked
    _touch(tmp_path / "c.mp4")
    ds = read_source(tmp_path)
    assert [r.id for r in ds.items] == ["a.mp4", "b.mp4", "c.mp4"]
    assert ds.missing == ["a.mp4", "b.mp4"]
    assert {r for r, _ in ds.problems.values()} == {"symlink_loop"}


def test_source_that_is_a_symlink_loop_says_so(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").symlink_to(tmp_path / "n.jsonl")
    (tmp_path / "n.jsonl").symlink_to(tmp_path / "m.jsonl")
    with pytest.raises(DatasetError, match="m.jsonl': .*is a loop of symbolic links"):
        read_source(tmp_path / "m.jsonl")
