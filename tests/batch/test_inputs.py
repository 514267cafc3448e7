"""Input discovery (folders, --recursive, files, globs), kind inference by content, CSV records and text lines."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.batch.discover import check_inputs, infer_kind, iter_files, sniff
from serving.batch.items import iter_items
from serving.batch.types import BatchError


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 255).save(path, format="PNG")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """scans/{b.png, a.scan (a PNG without the extension), .hidden.png, sub/c.png, sub/deeper/d.png}."""
    root = tmp_path / "scans"
    for name in ("b.png", "a.scan", ".hidden.png", "sub/c.png", "sub/deeper/d.png"):
        _png(root / name)
    return root


def _paths(inputs: list[str], recursive: bool = False) -> list[str]:
    return [e.path for e in iter_files(inputs, recursive)]


def test_folders_files_globs_in_a_stable_order(tree: Path) -> None:
    top = [str(tree / "a.scan"), str(tree / "b.png")]
    assert _paths([str(tree)]) == top  # hidden entries and (without --recursive) sub-folders left out
    deep = [str(tree / "sub/c.png"), str(tree / "sub/deeper/d.png")]
    assert _paths([str(tree)], recursive=True) == top + deep
    assert _paths([f"{tree}/**/*.png"]) == [str(tree / "b.png"), *deep]
    assert _paths([f"{tree}/./sub/", str(tree / "b.png")]) == [str(tree / "sub/c.png"), str(tree / "b.png")]
    (tree / "sub" / "deeper" / "loop").symlink_to(tree)  # a link back up: followed once, never in circles
    assert _paths([str(tree / "sub")], recursive=True) == [*deep, *(str(tree / "sub/deeper/loop" / p) for p in
                                                                     ("a.scan", "b.png"))]
    check_inputs([str(tree), f"{tree}/*.png"])
    for missing in (str(tree / "nope.png"), f"{tree}/*.jpeg"):
        with pytest.raises(BatchError, match="no such file"):
            check_inputs([missing])


def test_content_decides_the_kind_not_the_extension(tmp_path: Path) -> None:
    _png(tmp_path / "digit.csv")
    (tmp_path / "rows.txt").write_text("a,b,c,d,e,f,g,h,label\n" + "0.1,0,0,0,0,0,0,0.5,1\n" * 3)
    (tmp_path / "names.csv").write_text("Nakamura\nO'Neill, Jr\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 50)
    kinds = {name: sniff(str(tmp_path / name)) for name in ("digit.csv", "rows.txt", "names.csv", "empty.png",
                                                             "blob.bin")}
    assert kinds == {"digit.csv": "image", "rows.txt": "csv", "names.csv": "text", "empty.png": "empty",
                     "blob.bin": "binary"}
    assert infer_kind([str(tmp_path / "digit.csv"), str(tmp_path / "empty.png")], False) == "digits"
    assert infer_kind([str(tmp_path / "rows.txt")], False) == "diabetes"
    assert infer_kind([str(tmp_path / "names.csv")], False) == "names"
    with pytest.raises(BatchError, match="mix kinds"):
        infer_kind([str(tmp_path)], False)


def test_csv_records_with_or_without_header_and_label(tmp_path: Path) -> None:
    features = ",".join(["0.5"] * 8)
    files = {
        "plain.csv": f"{features}\n{features}\n",
        "labelled.csv": f"{features},1\n\n{features},0.0\n",
        "header.csv": f"Outcome,{','.join('abcdefgh')}\n1,{features}\n",
        "broken.csv": f"{features}\n0.5,0.5\n{features.replace('0.5', 'x', 1)}\n{features[:-4]},nan\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    items = {i.id.rsplit("/", 1)[1]: i for i in iter_items(iter_files([str(tmp_path)], False), "diabetes")}
    assert sorted(items) == ["broken.csv:1", "broken.csv:2", "broken.csv:3", "broken.csv:4", "header.csv:2",
                             "labelled.csv:1", "labelled.csv:3", "plain.csv:1", "plain.csv:2"]
    assert items["plain.csv:1"].data == [0.5] * 8 and items["plain.csv:1"].label is None
    assert [items["labelled.csv:1"].label, items["labelled.csv:3"].label] == ["1", "0"]
    assert items["header.csv:2"].data == [0.5] * 8 and items["header.csv:2"].label == "1"
    assert str(items["broken.csv:2"].failure) == "bad row: 2 fields: expected 8 numbers, or 9 with a label last"
    assert str(items["broken.csv:3"].failure) == "bad row: 'x' is not a number"
    assert items["broken.csv:4"].failure is None  # NaN is a number; the model's rule refuses it (prepare)


def test_text_lines_one_item_each(tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_bytes(b"\xef\xbb\xbfM\xc3\xbcller\r\n\r\n  Smith  \n\xff\xfe\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG")
    (tmp_path / "stray.png").write_bytes(png.getvalue())
    items = list(iter_items(iter_files([str(tmp_path)], False), "names"))
    assert [(Path(i.id).name, i.data, str(i.failure or "").split(":")[0]) for i in items] == [
        ("empty.txt", None, "empty file"),
        ("names.txt:1", "Müller", ""),
        ("names.txt:2", None, "empty line"),
        ("names.txt:3", "Smith", ""),
        ("names.txt:4", None, "bad line"),
        ("stray.png", None, "not a text file"),
    ]


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\0"),
                              max_size=12), max_size=30))
def test_every_line_is_one_item(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    """Any text (without NUL, which marks a binary file): one item per line, numbered as editors do, blank
    lines as failures, a byte-order mark at a line start dropped, nothing lost or merged."""
    path = tmp_path_factory.mktemp("lines") / "items.txt"
    path.write_bytes("".join(f"{line}\n" for line in lines).encode("utf-8"))
    items = list(iter_items(iter_files([str(path)], False), "names"))
    if not lines:
        assert [str(i.failure) for i in items] == ["empty file: the file has no content"]
        return
    assert [i.id for i in items] == [f"{path}:{n}" for n in range(1, len(lines) + 1)]
    for item, line in zip(items, lines, strict=True):
        text = line.removeprefix("\ufeff").strip()
        assert (item.data, item.failure is None) == ((text, True) if text else (None, False))


def test_a_glob_that_matches_folders_and_their_files_lists_each_file_once(tmp_path: Path) -> None:
    """``gl/**`` matches ``gl``, ``gl/sub`` and every file: a matched folder walked and its files matched too
    must not list them again, and ``gl/sub``, matched itself, is not a skipped subfolder."""
    for name in ("a.png", "b.png", "c.png", "sub/x.png", "sub/y.png"):
        _png(tmp_path / "gl" / name)
    every = [str(tmp_path / "gl" / name) for name in ("a.png", "b.png", "c.png", "sub/x.png", "sub/y.png")]
    for pattern in ("**", "**/*", "**/"):
        for recursive in (True, False):
            assert _paths([f"{tmp_path}/gl/{pattern}"], recursive) == every, (pattern, recursive)


def test_linked_folders_are_listed_once(tmp_path: Path) -> None:
    """Seven folders that each link to the other six: seven files, each once (it was 13,699 entries)."""
    for i in range(7):
        (tmp_path / f"f{i}").mkdir()
        (tmp_path / f"f{i}" / f"n{i}.txt").write_text("Smith\n")
    for i in range(7):
        for j in range(7):
            if i != j:
                (tmp_path / f"f{i}" / f"l{j}").symlink_to(tmp_path / f"f{j}", target_is_directory=True)
    paths = _paths([str(tmp_path)], recursive=True)
    assert sorted(Path(p).name for p in paths) == [f"n{i}.txt" for i in range(7)]
    assert paths == _paths([str(tmp_path)], recursive=True)  # the same order every run


def test_a_diabetes_csv_with_a_bad_row_near_the_top_is_still_a_csv(tmp_path: Path) -> None:
    """The rows vote: one short row among the first ones is outvoted (and fails alone when read); a file
    whose rows are half records, half not, is refused with a request for --kind rather than guessed."""
    record = ",".join(["0.5"] * 8) + ",1\n"
    (tmp_path / "one_bad.csv").write_text(record + "0.5,0.5,1\n" + record * 4)
    assert sniff(str(tmp_path / "one_bad.csv")) == "csv"
    assert infer_kind([str(tmp_path / "one_bad.csv")], False) == "diabetes"
    items = list(iter_items(iter_files([str(tmp_path / "one_bad.csv")], False), "diabetes"))
    assert [i.failure is None for i in items] == [True, False, True, True, True, True]
    (tmp_path / "half.txt").write_text(record * 2 + "Smith\nNakamura\n")
    assert sniff(str(tmp_path / "half.txt")) == "unclear"
    with pytest.raises(BatchError, match=r"half\.txt.*pass --kind"):
        infer_kind([str(tmp_path / "half.txt")], False)


def test_a_bad_first_row_of_a_headerless_csv_fails_alone(tmp_path: Path) -> None:
    """Row 1 is a header only if it names a label column or holds no number; the field count comes from the
    model (8, or 9 with a label), so a bad first row neither vanishes as a header nor fails the good rows."""
    good = ",".join(["0.5"] * 8) + ",1"
    (tmp_path / "na.csv").write_text(f"NA,{good.split(',', 1)[1]}\n{good}\n{good}\n")
    (tmp_path / "short.csv").write_text(f"{','.join(['0.5'] * 7)}\n{good}\n{good}\n")
    (tmp_path / "named.csv").write_text(f"{','.join('abcdefgh')},outcome\n{good}\n")
    items = {i.id.rsplit("/", 1)[1]: i for i in iter_items(iter_files([str(tmp_path)], False), "diabetes")}
    assert sorted(items) == ["na.csv:1", "na.csv:2", "na.csv:3", "named.csv:2", "short.csv:1", "short.csv:2",
                             "short.csv:3"]
    assert str(items["na.csv:1"].failure) == "bad row: 'NA' is not a number"
    assert str(items["short.csv:1"].failure) == "bad row: 7 fields: expected 8 numbers, or 9 with a label last"
    assert all(items[f"{name}:{n}"].failure is None and items[f"{name}:{n}"].label == "1"
               for name in ("na.csv", "short.csv") for n in (2, 3))
    assert items["named.csv:2"].data == [0.5] * 8 and items["named.csv:2"].label == "1"


def test_the_course_names_csv_is_read_as_name_and_country(tmp_path: Path) -> None:
    """``"Abl","Czech"`` rows (the course's file, CRLF endings): the name is the input, the country its expected
    label. A list of names whose lines hold a comma stays one name per line."""
    (tmp_path / "course.csv").write_bytes(b'"Abl","Czech"\r\n"O\'Neill, Jr","Irish"\r\n"Smith"\r\n"","English"\r\n')
    (tmp_path / "names.csv").write_text("Nakamura\nO'Neill, Jr\n")
    items = [(Path(i.id).name, i.data, i.label, str(i.failure or "")) for i in
             iter_items(iter_files([str(tmp_path)], False), "names")]
    assert items == [
        ("course.csv:1", "Abl", "Czech", ""),
        ("course.csv:2", "O'Neill, Jr", "Irish", ""),
        ("course.csv:3", None, None, "bad row: 1 fields: expected 2, a name and its country"),
        ("course.csv:4", None, None, "bad row: the name (column 1) is empty"),
        ("names.csv:1", "Nakamura", None, ""),
        ("names.csv:2", "O'Neill, Jr", None, ""),
    ]
    assert infer_kind([str(tmp_path / "course.csv")], False) == "names"
