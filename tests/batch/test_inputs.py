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
    assert str(items["broken.csv:2"].failure) == "bad row: 2 fields where the file's rows have 8"
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
