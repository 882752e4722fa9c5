"""SKU sheets: reading, per-row rejects with line numbers, validation, prompts, seeds, folder names, CSV output."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import polars as pl
import pytest

from catalog_gen.catalog.class_map import load_class_map
from catalog_gen.errors import CatalogError
from catalog_gen.seeds import candidate as candidate_seed
from catalog_gen.generate.skus import (
    MAX_IMAGES_PER_SKU,
    RejectedRow,
    SkuRow,
    escape_csv_cell,
    read_sku_sheet,
    render_prompt,
    sku_folder_names,
    template_fields,
    validate_rows,
    write_csv_escaped,
    write_rejects,
)

TEMPLATE = "{instance_prompt}, {view}, {setting}"


@pytest.fixture(scope="module")
def jewelry():
    return load_class_map("jewelry")


def _sheet(tmp_path: Path, text: str, name: str = "skus.csv", newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


def _reasons(rejects: list[RejectedRow]) -> dict[int, str]:
    return {r.line: r.reason for r in rejects}


def _validate(rows, jewelry, template=TEMPLATE):
    no_adapter = {("ring", "signet")}
    return validate_rows(rows, jewelry,
                         lambda c, i: f"no trained adapter for {c}/{i}; run catalog train --class {c}" if (c, i) in no_adapter else None,
                         lambda c: template)


# ---------------------------------------------------------------- reading

BAD_SHEET = """sku,class,instance,n_images,seed,view,setting
A1,ring,band,4,7,front view,on marble
,ring,band,4,1,front,marble
A1,ring,band,4,1,front,marble
B1,,band,4,1,front,marble
B2,ring,,4,1,front,marble
B3,ring,band,0,1,front,marble
B4,ring,band,abc,1,front,marble
B5,ring,band,100,1,front,marble
B6,ring,band,4,-1,front,marble

C1, Hoops ,Easy Daily,,,"top
view",on sand
C2,ring,band,+4,1,front,marble
"""


def test_bad_rows_are_rejected_with_their_line_numbers(tmp_path):
    rows, rejects = read_sku_sheet(_sheet(tmp_path, BAD_SHEET))
    reasons = _reasons(rejects)
    assert reasons[3] == "empty sku"
    assert reasons[4] == "duplicate sku 'A1' (first on line 2)"
    assert reasons[5] == "empty class"
    assert reasons[6] == "empty instance"
    assert reasons[7] == "n_images 0 is out of range: must be a positive integer from 1 to 64"
    assert reasons[8] == "n_images 'abc' is not a positive integer"
    assert str(MAX_IMAGES_PER_SKU) in reasons[9] and "100" in reasons[9]
    assert reasons[10] == "seed '-1' is not a non-negative integer"
    # line 11 is blank and ignored; C1's quoted cell spans lines 12-13, so C2 is on line 14
    assert reasons[14] == "n_images '+4' is not a positive integer"
    assert set(reasons) == {3, 4, 5, 6, 7, 8, 9, 10, 14}
    assert [(r.line, r.sku) for r in rows] == [(2, "A1"), (12, "C1")]
    a1, c1 = rows
    assert (a1.n_images, a1.seed, dict(a1.variables)) == (4, 7, {"view": "front view", "setting": "on marble"})
    assert (c1.class_key, c1.instance_key, c1.n_images, c1.seed) == ("Hoops", "Easy Daily", None, None)
    assert dict(c1.variables) == {"view": "top\nview", "setting": "on sand"}


def test_bom_crlf_and_unicode_sheet_parses(tmp_path):
    text = "\ufeffSKU , Class,Instance,View,Réglage\nBAGUE-ÉTÉ-€, ring ,band, vue de face ,sur marbre 💍\n"
    rows, rejects = read_sku_sheet(_sheet(tmp_path, text, newline="\r\n"))
    assert rejects == []
    assert rows == [SkuRow(2, "BAGUE-ÉTÉ-€", "ring", "band", None, None,
                           {"view": "vue de face", "réglage": "sur marbre 💍"})]


def test_parquet_sheet_with_numeric_columns(tmp_path):
    path = tmp_path / "skus.parquet"
    pl.DataFrame({"sku": ["0012", "0013", "0014"], "class": ["ring"] * 3, "instance": ["band"] * 3,
                  "n_images": [4, 0, None], "seed": [9, 1, 2], "view": ["top", None, "side"]}).write_parquet(path)
    rows, rejects = read_sku_sheet(path)
    assert [(r.line, r.sku, r.n_images, r.seed, dict(r.variables)) for r in rows] == [
        (2, "0012", 4, 9, {"view": "top"}), (4, "0014", None, 2, {"view": "side"})]
    assert [(r.line, r.sku) for r in rejects] == [(3, "0013")] and "n_images 0" in rejects[0].reason


def test_missing_required_column_names_it_and_the_file(tmp_path):
    path = _sheet(tmp_path, "sku,class,view\nA1,ring,top\n")
    with pytest.raises(CatalogError, match=r"skus\.csv: missing required column 'instance'"):
        read_sku_sheet(path)


@pytest.mark.parametrize("name, text, message", [
    ("skus.xlsx", "sku,class,instance\n", "must be a .csv or .parquet"),
    ("skus.csv", "sku,class,instance,SKU\nA,ring,band,B\n", "duplicate column names"),
    ("skus.csv", "sku,class,instance\nA,ring,band,extra\n", "cannot read SKU sheet"),
    ("skus.csv", "", "cannot read SKU sheet"),
])
def test_unreadable_sheets_fail_loudly(tmp_path, name, text, message):
    with pytest.raises(CatalogError, match=message):
        read_sku_sheet(_sheet(tmp_path, text, name=name))


def test_non_utf8_csv_says_so(tmp_path):
    path = tmp_path / "skus.csv"
    path.write_bytes("sku,class,instance\nBAGUE-ÉTÉ,ring,band\n".encode("cp1252"))
    with pytest.raises(CatalogError, match="UTF-8"):
        read_sku_sheet(path)


def test_trailing_empty_header_column_is_ignored(tmp_path):
    rows, rejects = read_sku_sheet(_sheet(tmp_path, "sku,class,instance,\nA,ring,band,\n,,,\n"))
    assert rejects == [] and [r.sku for r in rows] == ["A"] and dict(rows[0].variables) == {}


# ---------------------------------------------------------------- validation

VALIDATE_SHEET = """sku,class,instance,view,setting,token
G1,Ring,Band,front,marble,
G2,hoops,easy-daily,top,sand,
U1,bracelet,band,front,marble,
U2,ring,hexagon,front,marble,
N1,ring,signet,front,marble,
M1,ring,band,,marble,
S1,ring,band,front,marble,xyz
"""


def test_validate_rows_rejects_with_line_numbers_and_normalises_keys(tmp_path, jewelry):
    rows, rejects = read_sku_sheet(_sheet(tmp_path, VALIDATE_SHEET))
    assert rejects == []
    good, rejects = _validate(rows, jewelry)
    assert [(r.sku, r.line, r.class_key, r.instance_key) for r in good] == [
        ("G1", 2, "ring", "band"), ("G2", 3, "hoops", "easy_daily")]
    reasons = {r.sku: (r.line, r.reason) for r in rejects}
    assert reasons["U1"] == (4, "unknown class 'bracelet'; known: hoops, necklace, ring, studs")
    assert reasons["U2"][0] == 5
    assert reasons["U2"][1].startswith("unknown instance 'hexagon' in class 'ring'; known: band")
    assert reasons["N1"] == (6, "no trained adapter for ring/signet; run catalog train --class ring")
    assert reasons["M1"][0] == 7 and "missing template variable 'view'" in reasons["M1"][1]
    assert repr(TEMPLATE) in reasons["M1"][1]
    assert reasons["S1"][0] == 8 and "column 'token' would shadow the built-in template variable" in reasons["S1"][1]
    assert len(rejects) == 5


def test_validate_rows_raises_on_a_bad_template(jewelry):
    row = SkuRow(2, "A", "ring", "band", None, None, {})
    with pytest.raises(CatalogError, match="attribute or index access"):
        _validate([row], jewelry, template="{instance_prompt.__class__}")


# ---------------------------------------------------------------- prompts

def test_render_prompt_fills_plain_fields_and_literal_braces():
    assert render_prompt("{{logo}} {a}, {b} {a}", {"a": "x", "b": "y", "unused": "z"}) == "{logo} x, y x"
    assert template_fields("photo of {instance_prompt}, {view} {{not_a_field}}") == {"instance_prompt", "view"}


def test_render_prompt_missing_variable_names_it():
    with pytest.raises(CatalogError, match="no value for view, metal"):
        render_prompt("{noun} {view} {metal} {view}", {"noun": "ring"})


@pytest.mark.parametrize("template", ["{a.__class__}", "{a[0]}", "{0}", "{}", "{a!r}", "{a:>10}", "{a:{b}}"])
def test_render_prompt_rejects_anything_but_plain_names(template):
    with pytest.raises(CatalogError, match="not allowed"):
        render_prompt(template, {"a": "x", "b": "y"})
    with pytest.raises(CatalogError, match="not allowed"):
        template_fields(template)


@pytest.mark.parametrize("template", ["{a", "a}", "{a}}"])
def test_unbalanced_braces_are_invalid(template):
    with pytest.raises(CatalogError, match="not valid"):
        render_prompt(template, {"a": "x"})


# ---------------------------------------------------------------- seeds

def test_candidate_seed_is_stable_and_independent_of_order():
    assert candidate_seed("RG-BAND-001", 0, 42) == candidate_seed("RG-BAND-001", 0, 42)
    assert candidate_seed("RG-BAND-001", 0, 42) == 6142763885115335740  # pinned: must never change
    jobs = [(sku, i) for sku in ("A", "B", "Bague-été") for i in range(4)]
    forward = {job: candidate_seed(job[0], job[1], 7) for job in jobs}
    shuffled = jobs[:]
    random.Random(1).shuffle(shuffled)
    assert {job: candidate_seed(job[0], job[1], 7) for job in shuffled} == forward
    assert len(set(forward.values())) == len(jobs)
    assert all(0 <= s < 2**63 for s in forward.values())
    assert candidate_seed("A", 0, 7) != candidate_seed("A", 0, 8)
    with pytest.raises(CatalogError, match="non-negative"):
        candidate_seed("A", -1, 7)


# ---------------------------------------------------------------- folder names

UNSAFE_SKUS = ["../x", "a/b\\c", "z" * 300, "CON", "con.txt", "Bague-été-€", ".", "..", "A", "a",
               "nul", "LPT9.tar.gz", " x. ", "tab\there", "?*:<>|\"", "", "HP-BEAD-001", "RG_band.v2"]


def test_folder_names_are_safe_unique_and_stay_inside(tmp_path):
    names = sku_folder_names(UNSAFE_SKUS)
    assert set(names) == set(UNSAFE_SKUS)
    assert len({n.lower() for n in names.values()}) == len(UNSAFE_SKUS)
    root = (tmp_path / "out").resolve()
    for sku, name in names.items():
        assert name not in ("", ".", "..") and len(name) <= 80, sku
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name), sku
        assert name.split(".")[0].lower() not in {"con", "prn", "aux", "nul", "lpt9"}, sku
        assert not name.startswith(".") and not name.endswith("."), sku
        folder = (root / name).resolve()
        assert folder.parent == root, sku
        folder.mkdir(parents=True)
    assert len(list(root.iterdir())) == len(UNSAFE_SKUS)
    # already safe and unique: kept as is; changed or case-clashing: hash suffix
    assert names["HP-BEAD-001"] == "HP-BEAD-001" and names["RG_band.v2"] == "RG_band.v2"
    assert names["A"].startswith("A-") and names["a"].startswith("a-")
    assert names["Bague-été-€"].startswith("Bague-ete-_-")
    assert names["../x"] == "_x-" + names["../x"][-8:]


def test_folder_names_are_independent_of_input_order():
    names = sku_folder_names(UNSAFE_SKUS)
    assert sku_folder_names(list(reversed(UNSAFE_SKUS))) == names
    shuffled = UNSAFE_SKUS[:]
    random.Random(3).shuffle(shuffled)
    assert sku_folder_names(shuffled) == names
    # a SKU keeps its name unless another SKU clashes with it
    assert sku_folder_names(["A", "B"])["A"] == "A"


def test_folder_names_survive_a_sku_crafted_to_clash_with_a_hashed_name():
    hashed = sku_folder_names(["A", "a"])["A"]
    names = sku_folder_names(["A", "a", hashed])
    assert len({n.lower() for n in names.values()}) == 3


# ---------------------------------------------------------------- CSV output

def _read_back(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def test_escape_csv_cell():
    assert [escape_csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "plain", "a=b")] == [
        "'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "plain", "a=b"]
    assert [escape_csv_cell(v) for v in (-1, -2.5, None, True)] == ["-1", "-2.5", "", "True"]


def test_write_csv_escaped_escapes_text_not_numbers(tmp_path):
    frame = pl.DataFrame({
        "sku": ["=1+1", "+1", "-1", "@SUM(A1:A9)", "\tTAB", "été €", None],
        "n": [-1, 2, -3, 4, 5, 6, 7],
        "x": [-0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "=cmd": ["a"] * 7,
    })
    path = write_csv_escaped(frame, tmp_path / "out" / "table.csv")
    rows = _read_back(path)
    assert rows[0] == ["sku", "n", "x", "'=cmd"]
    assert [r[0] for r in rows[1:]] == ["'=1+1", "'+1", "'-1", "'@SUM(A1:A9)", "'\tTAB", "été €", ""]
    assert [r[1] for r in rows[1:]] == ["-1", "2", "-3", "4", "5", "6", "7"]
    assert rows[1][2] == "-0.5"
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]  # no temporary file left behind


def test_write_rejects_round_trips(tmp_path):
    rejects = [RejectedRow(3, "=HYPERLINK(\"x\")", "duplicate sku (first on line 2)"), RejectedRow(9, "", "empty sku")]
    rows = _read_back(write_rejects(rejects, tmp_path / "rejects.csv"))
    assert rows == [["line", "sku", "reason"], ["3", "'=HYPERLINK(\"x\")", "duplicate sku (first on line 2)"],
                    ["9", "", "empty sku"]]
    assert _read_back(write_rejects([], tmp_path / "none.csv")) == [["line", "sku", "reason"]]
