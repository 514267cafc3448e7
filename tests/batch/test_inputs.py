"""Input discovery (folders, --recursive, files, globs), kind inference by content, CSV records and text lines."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.batch import discover
from serving.batch.discover import SNIFF_FILES, check_inputs, infer_kind, iter_files, sniff
from serving.batch.items import LINE_CONTROLS, iter_items
from serving.batch.types import BatchError
from tests.batch.conftest import Run
from tests.conftest import EXPORTED


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
        "header.csv": f"Outcome,{','.join('abcdefgh')}\n1,{features}\n1,{features.replace('0.5', '?', 1)}\n",
        "broken.csv": f"{features}\n0.5,0.5\n{features.replace('0.5', 'x', 1)}\n{features[:-4]},nan\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    items = {i.id.rsplit("/", 1)[1]: i for i in iter_items(iter_files([str(tmp_path)], False), "diabetes")}
    assert sorted(items) == ["broken.csv:1", "broken.csv:2", "broken.csv:3", "broken.csv:4", "header.csv:2",
                             "header.csv:3", "labelled.csv:1", "labelled.csv:3", "plain.csv:1", "plain.csv:2"]
    assert items["plain.csv:1"].data == [0.5] * 8 and items["plain.csv:1"].label is None
    assert [items["labelled.csv:1"].label, items["labelled.csv:3"].label] == ["1", "0"]
    assert items["header.csv:2"].data == [0.5] * 8 and items["header.csv:2"].label == "1"
    assert str(items["broken.csv:2"].failure) == "bad row: 2 fields: expected 8 numbers, or 9 with a label last"
    assert str(items["broken.csv:3"].failure) == "bad row: column 1 is 'x': expected a number"
    assert str(items["header.csv:3"].failure) == "bad row: column 2 (a) is '?': expected a number"  # after the label
    assert items["header.csv:2"].columns == ("column 2 (a)", "column 3 (b)", "column 4 (c)", "column 5 (d)",
                                             "column 6 (e)", "column 7 (f)", "column 8 (g)", "column 9 (h)")
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
        ("names.txt:3", "  Smith  ", ""),  # line 2 is blank: not an input; spaces are kept, as the server keeps them
        ("names.txt:4", None, "bad line"),
        ("stray.png", None, "not a text file"),
    ]


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\0"),
                              max_size=12), max_size=30))
def test_every_line_is_one_item(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    """Any text (without NUL, which marks a binary file): one item per line that holds one, numbered as editors
    do, blank lines left out, a byte-order mark at a line start and tabs (control whitespace) around it dropped,
    nothing else lost or merged."""
    path = tmp_path_factory.mktemp("lines") / "items.txt"
    path.write_bytes("".join(f"{line}\n" for line in lines).encode("utf-8"))
    items = list(iter_items(iter_files([str(path)], False), "names"))
    texts = [(n, line.removeprefix("\ufeff").strip(LINE_CONTROLS)) for n, line in enumerate(lines, 1)]
    if not lines:
        assert [str(i.failure) for i in items] == ["empty file: the file has no content"]
    elif not any(text.strip() for _, text in texts):
        assert [str(i.failure) for i in items] == ["empty file: no lines, only blank ones"]
    else:
        assert [(i.id, i.data, i.failure) for i in items] == [(f"{path}:{n}", text, None) for n, text in texts
                                                              if text.strip()]


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
    assert str(items["na.csv:1"].failure) == "bad row: column 1 is 'NA': expected a number"
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


def test_a_name_is_read_as_the_course_data_spells_it(tmp_path: Path) -> None:
    """The course's test file has ``"Jung ","Korean"``: the trailing space is part of the name ("Jung" is German),
    as the server, ``coursezoo eval`` and the model card read it; it was stripped, so batch's accuracy on the
    test file was 5659/6700 against the card's 5660. A name of spaces only is still an empty name; the label is
    stripped. A text list keeps a line's spaces too, less its line ending and tabs around it."""
    (tmp_path / "course.csv").write_bytes(b'"Jung ","Korean"\r\n"Jung","German"\r\n" ","Irish"\r\n" Abl","Czech "\r\n')
    (tmp_path / "names.txt").write_bytes(b"Jung \r\n \t \r\n Rossi\nSmith\t\n")
    items = [(Path(i.id).name, i.data, i.label, str(i.failure or "")) for i in
             iter_items(iter_files([str(tmp_path)], False), "names")]
    assert items == [
        ("course.csv:1", "Jung ", "Korean", ""),
        ("course.csv:2", "Jung", "German", ""),
        ("course.csv:3", None, None, "bad row: the name (column 1) is empty"),
        ("course.csv:4", " Abl", "Czech", ""),
        ("names.txt:1", "Jung ", None, ""),
        ("names.txt:3", " Rossi", None, ""),  # line 2 is whitespace only: blank, not an input
        ("names.txt:4", "Smith", None, ""),  # a tab no model reads (a list pasted from a spreadsheet) is dropped
    ]


#: a diabetes record with its label, and the lines that broke CSV reading (a stray quote, a field over the csv
#: module's 131,072-character limit)
RECORD = ",".join(["0.5"] * 8) + ",1"
STRAY_QUOTE = '-0.29,"0.48,0.18,-0.29,0,0.001,-0.53,-0.03,0'
BIG_FIELD = "1," + "x" * 200_000 + ",3,4,5,6,7,8,0"


def test_a_line_that_is_not_a_csv_row_fails_alone_and_the_rest_is_read(tmp_path: Path) -> None:
    """A stray quote was read as a field running to the end of the file (rows 7-21 became one "2 fields" row
    numbered 21) and an oversized field ended the file ("unreadable file"): now each is one bad row, numbered as
    editors number lines, every line after it is still read, and kind inference sees one bad line, not one
    merged row that outvotes the records (a stray quote in row 2 made the file "unclear")."""
    lines = [RECORD] * 20
    lines.insert(5, STRAY_QUOTE)
    lines.insert(9, BIG_FIELD)
    path = tmp_path / "records.csv"
    path.write_text("\n".join(lines) + "\n")
    items = list(iter_items(iter_files([str(path)], False), "diabetes"))
    assert [i.id for i in items] == [f"{path}:{n}" for n in range(1, 23)]
    assert {i.id: str(i.failure) for i in items if i.failure} == {
        f"{path}:6": "bad row: not a CSV row: a quote is opened and not closed on the line",
        f"{path}:10": "bad row: not a CSV row: field larger than field limit (131072)",
    }
    assert all(i.data == [0.5] * 8 and i.label == "1" for i in items if not i.failure)
    (tmp_path / "early.csv").write_text("\n".join([RECORD, STRAY_QUOTE, *[RECORD] * 5]) + "\n")
    assert sniff(str(tmp_path / "early.csv")) == "csv"
    (tmp_path / "names.csv").write_bytes(b'"Abl","Czech"\r\n"Nakamura,Japanese\r\n"Smith","English"\r\n'
                                         b'"O"Neill","Irish"\r\n"Jones","Welsh"\r\n')
    names = [(Path(i.id).name, i.data, str(i.failure or "")) for i in
             iter_items(iter_files([str(tmp_path / "names.csv")], False), "names")]
    assert names == [
        ("names.csv:1", "Abl", ""),
        ("names.csv:2", None, "bad row: not a CSV row: a quote is opened and not closed on the line"),
        ("names.csv:3", "Smith", ""),
        ("names.csv:4", None, "bad row: not a CSV row: \',\' expected after \'\"\'"),
        ("names.csv:5", "Jones", ""),
    ]


def test_bad_csv_lines_are_counted_once_each(batch: Callable[..., Run], diabetes_rows: list[list[str]],
                                            tmp_path: Path) -> None:
    """Through the CLI: 20 records and two bad lines are 22 rows, 20 classified and 2 failed (it was 5 and 1)."""
    lines = [",".join(row) for row in diabetes_rows[:20]]
    lines.insert(5, STRAY_QUOTE)
    lines.insert(12, BIG_FIELD)
    (tmp_path / "quote.csv").write_text("\n".join(lines) + "\n")
    run = batch(tmp_path / "quote.csv", "--repo", EXPORTED, out=tmp_path / "out.csv")
    assert run.code == 2, run.err
    assert [r["path"] for r in run.rows] == [f"{tmp_path}/quote.csv:{n}" for n in range(1, 23)]
    assert [r["path"] for r in run.rows if r["error"]] == [f"{tmp_path}/quote.csv:{n}" for n in (6, 13)]
    assert "classified    20" in run.out and "failed        2" in run.out and "bad row  2" in run.out


def test_rows_of_numbers_that_are_not_records_are_never_names(tmp_path: Path) -> None:
    """A CSV pandas wrote with its index column (10 numbers a row), a ``;``-separated one (decimal commas too)
    and a file of single numbers were read as names, every row and the header given a country. Rows of numbers
    are not names: the kind is unclear and the run asks for --kind. A header alone of a diabetes file's width is
    a diabetes file without records, which is one "empty file" row; a few numbers among names stay names."""
    header = "Pregnancies,Glucose,BloodPressure,SkinThickness,Insulin,BMI,Pedigree,Age,Outcome"
    rows = ["6,148,72,35,0,33.6,0.627,50,1", "1,85,66,29,0,26.6,0.351,31,0", "8,183,64,0,0,23.3,0.672,32,1"]
    files = {
        "pandas.csv": "\n".join(["," + header, *(f"{i},{row}" for i, row in enumerate(rows))]),
        "semi.csv": "\n".join([header.replace(",", ";"), *(row.replace(",", ";") for row in rows)]),
        "decimal_comma.csv": "\n".join(row.replace(",", ";").replace(".", ",") for row in rows),
        "numbers.txt": "1\n2\n3",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
        assert sniff(str(tmp_path / name)) == "unclear", name
        with pytest.raises(BatchError, match=rf"{name}.*index column.*pass --kind"):
            infer_kind([str(tmp_path / name)], False)
    (tmp_path / "header_only.csv").write_text(header + "\n")
    assert infer_kind([str(tmp_path / "header_only.csv")], False) == "diabetes"
    items = list(iter_items(iter_files([str(tmp_path / "header_only.csv")], False), "diabetes"))
    assert [(Path(i.id).name, str(i.failure)) for i in items] == [
        ("header_only.csv", "empty file: no rows, only a header or blank lines")]
    (tmp_path / "names.txt").write_text("Smith\nNakamura\n42\nNan\nJones\n")
    assert infer_kind([str(tmp_path / "names.txt")], False) == "names"


def test_a_file_several_arguments_name_is_listed_once(tree: Path) -> None:
    """``scans scans/b.png`` listed b.png twice (two rows, and --resume then disagreed with a fresh run): a file
    an earlier argument gave, under any spelling or through a link, is left out; each argument keeps its order."""
    a, b = str(tree / "a.scan"), str(tree / "b.png")
    assert _paths([str(tree), b]) == [a, b]
    assert _paths([str(tree), str(tree)]) == [a, b]
    assert _paths([b, str(tree), f"{tree}/./b.png", f"{tree}/*.png"]) == [b, a]
    (tree / "sub" / "link.png").symlink_to(tree / "b.png")
    assert _paths([b, str(tree / "sub")]) == [b, str(tree / "sub" / "c.png")]
    assert _paths([str(tree / "sub"), str(tree)], recursive=True) == [
        str(tree / "sub" / p) for p in ("c.png", "deeper/d.png", "link.png")] + [a]


def test_a_file_named_after_the_first_files_takes_part_in_the_kind(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``scans names.txt`` made names.txt an "invalid image" row when scans held more than the first files that
    inference reads, while ``names.txt scans`` and ``patients.csv names.txt`` refused the mix: a file named on the
    command line counts wherever it stands. A shell-expanded ``*.png`` is not read twice for it."""
    scans = tmp_path / "scans"
    pngs = [str(_png(scans / f"{i:02d}.png")) for i in range(SNIFF_FILES + 8)]
    names = tmp_path / "names.txt"
    names.write_text("Rossi\n")
    for inputs in ([str(scans), str(names)], [*pngs, str(names)]):
        with pytest.raises(BatchError, match=rf"from the first {SNIFF_FILES} files and 1 named after them "
                                             rf"\({SNIFF_FILES} image, e\.g\. .*; 1 text, {names}\): they mix kinds"):
            infer_kind(inputs, False)
    with pytest.raises(BatchError, match="mix kinds"):
        infer_kind([str(names), str(scans)], False)
    sniffed: list[str] = []
    monkeypatch.setattr(discover, "sniff", lambda path: sniffed.append(path) or sniff(path))
    assert infer_kind(pngs, False) == infer_kind([str(scans), pngs[-1]], False) == "digits"
    assert len(sniffed) == 2 * SNIFF_FILES  # the named PNGs after the first files are like those: not read
