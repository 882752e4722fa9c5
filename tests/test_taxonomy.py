"""Class map loading, title rules, folder and CSV assignment, minimum photo counts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from catalog_gen.errors import CatalogError
from catalog_gen.catalog.taxonomy import (
    Assignment,
    Skipped,
    Taxonomy,
    assign_from_folders,
    assign_from_products,
    enforce_min_photos,
    load_class_map,
    match_title,
)

JEWELRY_TOML = Path(__file__).resolve().parents[1] / "class_maps" / "jewelry.toml"


@pytest.fixture(scope="module")
def jewelry():
    return load_class_map("jewelry")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    return path


# ---------------------------------------------------------------- class map

def test_builtin_jewelry_map_matches_the_seed_taxonomy(jewelry):
    assert jewelry.name == "jewelry" and jewelry.min_photos == 3
    assert list(jewelry.classes) == ["hoops", "necklace", "ring", "studs"]
    assert len(jewelry.instance_keys()) == 19
    assert list(jewelry.get_class("hoops").instances)[:3] == ["beaded", "chunky", "charlotte"]
    assert jewelry.get_instance("hoops", "easy_daily").name == "easy daily"
    assert jewelry.get_instance("hoops", "charlotte").name == "Charlotte"
    assert jewelry.get_class("studs").noun == "stud earrings"
    assert jewelry.source.name == "jewelry.toml"


def test_path_and_builtin_name_load_the_same_map(tmp_path, jewelry):
    copy = shutil.copy(JEWELRY_TOML, tmp_path / "mine.toml")
    loaded = load_class_map(Path(copy))
    assert loaded.classes == jewelry.classes
    assert load_class_map(str(copy)).source == Path(copy)


def test_instance_prompt_fills_token_and_display_name(jewelry):
    hoops = jewelry.get_class("hoops")
    assert hoops.instance_prompt_for("easy_daily", "xva") == "photo of a pair of xva easy daily hoops"
    assert jewelry.get_class("studs").instance_prompt_for("studs", "xva") == "photo of a pair of xva stud earrings"
    with pytest.raises(CatalogError, match="unknown instance 'hexagon' in class 'hoops'"):
        hoops.instance_prompt_for("hexagon", "xva")


def test_unknown_class_and_instance_errors_list_known_names(jewelry):
    with pytest.raises(CatalogError) as info:
        jewelry.get_class("bracelet")
    assert str(info.value) == "unknown class 'bracelet'; known: hoops, necklace, ring, studs"
    with pytest.raises(CatalogError) as info:
        jewelry.get_instance("ring", "tube")
    assert str(info.value) == "unknown instance 'tube' in class 'ring'; known: band, bold, dome, signet, slim, stacker"


def test_unknown_builtin_map_name():
    with pytest.raises(CatalogError, match="unknown class map 'watches'; built-in: jewelry"):
        load_class_map("watches")


GOOD_CLASS = """
[taxonomy]
name = "t"
min_photos = 2
[classes.hoops]
noun = "hoops"
class_prompt = "photo of hoops"
instance_prompt = "photo of {token} {instance} hoops"
keywords = ["hoop"]
[classes.hoops.instances.beaded]
keywords = ["beaded"]
[classes.hoops.instances.tube]
keywords = ["tube"]
"""


def test_minimal_custom_map_loads(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(GOOD_CLASS)
    class_map = load_class_map(path)
    assert class_map.min_photos == 2
    assert class_map.get_instance("hoops", "tube").keywords == ("tube",)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.replace('noun = "hoops"\n', ""), r"\[classes.hoops\]: missing 'noun'"),
        (lambda s: s.replace("{token} {instance}", "{instance}"), r"hoops\]: instance_prompt must contain \{token\}"),
        (lambda s: s.replace("{token} {instance}", "{token} {colour}"), r"hoops\]: instance_prompt must contain"),
        (lambda s: s.replace("{token} {instance}", "{token"), r"\[classes.hoops\]: prompt .* is not a valid template"),
        (lambda s: s.replace('"photo of hoops"', '"photo of {token} hoops"'), "class_prompt must not contain"),
        (lambda s: s.split("[classes.hoops.instances.beaded]")[0], r"\[classes.hoops\]: missing 'instances'"),
        (lambda s: s.replace('["tube"]', '["Beaded"]'), r"keyword 'beaded' is used by both 'beaded' and 'tube'"),
        (lambda s: s.replace("min_photos = 2", "min_photos = 0"), r"\[taxonomy\]: min_photos must be at least 1"),
        (lambda s: s.replace("min_photos = 2", 'min_photos = "3"'), r"\[taxonomy\]: 'min_photos' must be an integer"),
        (lambda s: s.replace('name = "t"\n', ""), r"\[taxonomy\]: missing 'name'"),
        (lambda s: s.replace('keywords = ["hoop"]', 'keyword = ["hoop"]'), r"unknown field\(s\) keyword"),
        (lambda s: s.replace("instances.tube]", "instances.Tube-2]"), r"key 'Tube-2' must be lowercase"),
        (lambda s: s.replace('keywords = ["tube"]', "keywords = 'tube'"), r"tube\]: keywords must be a list"),
        (lambda s: s.split("[classes.hoops]")[0] + "[classes]\n", r"\[classes\] defines no classes"),
        (lambda s: s.replace("[taxonomy]", "[taxonomy"), "is not valid TOML"),
    ],
)
def test_bad_class_map_files_name_file_and_key(tmp_path, edit, expected):
    path = tmp_path / "broken.toml"
    path.write_text(edit(GOOD_CLASS))
    with pytest.raises(CatalogError, match=expected) as info:
        load_class_map(path)
    assert str(path) in str(info.value)


def test_missing_map_file(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        load_class_map(tmp_path / "nope.toml")


# ---------------------------------------------------------------- title rules

@pytest.mark.parametrize(
    "title, expected",
    [
        ("Beaded Hoops, 14k gold", ("hoops", "beaded")),
        ("DOME RING", ("ring", "dome")),
        ("Domed huggies in silver", ("hoops", "dome")),  # "dome" in two classes: class keyword decides
        ("Easy Daily Hoops", ("hoops", "easy_daily")),
        ("easy-daily hoop", ("hoops", "easy_daily")),  # phrase across a hyphen
        ("Charlotte's hoops", ("hoops", "charlotte")),
        ("Necklace with three charms", ("necklace", "charm")),  # plural tolerance
        ("Tiny studs", ("studs", "studs")),  # one-instance class takes every product
        ("Créole huggies — thick ✨", ("hoops", "chunky")),  # Unicode around the words
        ("Dôme Ring", ("ring", "dome")),  # accents folded
        ("Stackable rings (set of 3)", ("ring", "stacker")),
    ],
)
def test_match_title_assigns(jewelry, title, expected):
    assert match_title(title, jewelry) == expected


def test_match_title_whole_words_only(jewelry):
    # "ringlet" and "tubed" contain keywords but are not those words
    result = match_title("Ringlet hoops, tubed", jewelry)
    assert isinstance(result, Skipped) and result.kind == "unassigned"
    assert "no hoops instance keyword" in result.reason


def test_match_title_ambiguous_classes(jewelry):
    result = match_title("Dome ring and hoop set", jewelry)
    assert isinstance(result, Skipped) and result.kind == "ambiguous"
    assert "several classes" in result.reason and "hoops" in result.reason and "ring" in result.reason


def test_match_title_ambiguous_instances(jewelry):
    result = match_title("Chunky beaded hoops", jewelry)
    assert result.kind == "ambiguous"
    assert "beaded (beaded)" in result.reason and "chunky (chunky)" in result.reason


def test_match_title_unassigned(jewelry):
    no_class = match_title("Gold bracelet", jewelry)
    assert no_class.kind == "unassigned" and "no class keyword in title 'Gold bracelet'" in no_class.reason
    no_instance = match_title("Plain ring", jewelry)
    assert no_instance.kind == "unassigned" and "no ring instance keyword" in no_instance.reason
    assert "band, bold, dome" in no_instance.reason


# ---------------------------------------------------------------- folders

def _photo_tree(root: Path) -> None:
    for name in ("a.jpg", "b.JPEG", "c.png"):
        _touch(root / "hoops" / "beaded" / name)
    for name in ("1.webp", "2.jpg", "3.jpg"):
        _touch(root / "Hoops" / "Easy Daily" / name)  # case and space tolerant; merges with hoops/
    _touch(root / "ring" / "dome" / "x.jpg")
    _touch(root / "ring" / "dome" / "y.jpg")
    _touch(root / "ring" / "dome" / "notes.txt")  # not a photo: ignored
    _touch(root / "bracelets" / "cuff" / "z.jpg")
    _touch(root / "necklace" / "choker" / "n.jpg")
    _touch(root / "necklace" / "loose.jpg")
    _touch(root / "stray.png")
    _touch(root / ".DS_Store")


def test_assign_from_folders(tmp_path, jewelry):
    _photo_tree(tmp_path)
    taxonomy = assign_from_folders(tmp_path, jewelry)
    assert {a.via for a in taxonomy.assignments} == {"folder"}
    groups = taxonomy.groups()
    assert list(groups) == [("hoops", "beaded"), ("hoops", "easy_daily")]
    assert groups[("hoops", "beaded")] == sorted((tmp_path / "hoops" / "beaded").iterdir())
    kinds = {s.item: s.kind for s in taxonomy.skipped}
    assert kinds == {
        "stray.png": "unassigned",
        "bracelets/": "unknown_class",
        "necklace/choker/": "unknown_instance",
        "necklace/loose.jpg": "unassigned",
        "ring/dome": "too_few_photos",
    }
    unknown = next(s for s in taxonomy.skipped if s.kind == "unknown_class")
    assert "known: hoops, necklace, ring, studs" in unknown.reason and "1 photos" in unknown.reason
    choker = next(s for s in taxonomy.skipped if s.kind == "unknown_instance")
    assert "known: chain, charm, pendant" in choker.reason


def test_min_photos_is_configurable_and_reported_in_table(tmp_path, jewelry):
    _photo_tree(tmp_path)
    strict = assign_from_folders(tmp_path, jewelry)
    table = {(r["class"], r["instance"]): (r["photos"], r["status"]) for r in strict.table().iter_rows(named=True)}
    assert len(table) == 19
    assert table[("ring", "dome")] == (2, "too few photos (2 < 3)")
    assert table[("hoops", "beaded")] == (3, "ok")
    assert table[("studs", "studs")] == (0, "no photos")
    assert strict.table().columns == ["class", "instance", "photos", "status"]
    relaxed = assign_from_folders(tmp_path, jewelry, min_photos=2)
    assert ("ring", "dome") in relaxed.groups()
    assert not [s for s in relaxed.skipped if s.kind == "too_few_photos"]
    with pytest.raises(CatalogError, match="min_photos must be an integer >= 1"):
        assign_from_folders(tmp_path, jewelry, min_photos=0)


def test_missing_photo_folder(tmp_path, jewelry):
    with pytest.raises(CatalogError, match="does not exist or is not a folder"):
        assign_from_folders(tmp_path / "nope", jewelry)


def test_enforce_min_photos_is_pure_and_reusable(tmp_path):
    groups = {("ring", "dome"): [Path("b.jpg"), Path("a.jpg")], ("ring", "band"): [Path("c.jpg")]}
    kept, skipped = enforce_min_photos(groups, 2)
    assert kept == {("ring", "dome"): [Path("a.jpg"), Path("b.jpg")]}
    assert skipped == [Skipped("ring/band", "too_few_photos", "1 photo(s), fewer than the minimum of 2")]
    assert groups[("ring", "dome")] == [Path("b.jpg"), Path("a.jpg")]  # input untouched


def test_taxonomy_rejects_assignments_outside_the_map(jewelry):
    with pytest.raises(CatalogError, match="unknown instance 'tube' in class 'ring'"):
        Taxonomy(jewelry, (Assignment(Path("x.jpg"), "ring", "tube", "folder"),), ())
    with pytest.raises(CatalogError, match="via must be one of"):
        Assignment(Path("x.jpg"), "ring", "dome", "guess")
    with pytest.raises(CatalogError, match="kind must be one of"):
        Skipped("x", "whatever", "because")


# ---------------------------------------------------------------- products CSV

def test_products_csv_with_bom_crlf_unicode_and_column_override(tmp_path, jewelry):
    photos = tmp_path / "photos"
    for name in ("b1.jpg", "b2.jpg", "b3.jpg", "d1.jpg", "d2.jpg", "d3.jpg", "s1.jpg", "x.jpg", "amb.jpg", "u.jpg"):
        _touch(photos / name)
    rows = [
        "sku,title,image,class,instance",
        "HB-001,Perlé Beaded Hoops — 14k,b1.jpg,,",
        'HB-002,"Beaded hoops, small",b2.jpg,,',
        "HB-003,Boucles d’oreilles beads hoop ✨,b3.jpg,,",
        "RD-1,Beaded hoops (really a dome ring),d1.jpg,Ring,Dome",  # columns win over the title
        "RD-2,Dôme ring,d2.jpg,,",
        "RD-3,Signature piece,d3.jpg,ring,",  # class from column, instance from title fails
        "ST-1,Petite studs,s1.jpg,,",
        "EMPTY,Beaded hoops,,,",
        "GONE,Beaded hoops,missing.jpg,,",
        "AMB,Chunky beaded hoops,amb.jpg,,",
        "BAD,Beaded hoops,x.jpg,bracelet,",
        "DUP,Beaded hoops,b1.jpg,,",
        "UNK,Dome ring,u.jpg,ring,hexagon",
    ]
    csv_path = tmp_path / "products.csv"
    csv_path.write_bytes("\ufeff".encode() + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    taxonomy = assign_from_products(csv_path, photos, jewelry, min_photos=1)

    by_sku = {a.sku: a for a in taxonomy.assignments}
    assert by_sku["HB-001"].title == "Perlé Beaded Hoops — 14k"
    first = by_sku["HB-001"]
    assert (first.class_key, first.instance_key, first.via) == ("hoops", "beaded", "title")
    assert by_sku["HB-003"].instance_key == "beaded"
    assert (by_sku["RD-1"].class_key, by_sku["RD-1"].instance_key, by_sku["RD-1"].via) == ("ring", "dome", "column")
    assert by_sku["ST-1"].instance_key == "studs"
    assert by_sku["HB-002"].image == photos / "b2.jpg"

    skipped = {s.item: s for s in taxonomy.skipped}
    assert (by_sku["RD-2"].instance_key, by_sku["RD-2"].via) == ("dome", "title")  # accents folded
    assert skipped["products.csv line 7 (sku RD-3)"].kind == "unassigned"
    assert skipped["products.csv line 9 (sku EMPTY)"].kind == "bad_row"
    assert "line 9: empty image" in skipped["products.csv line 9 (sku EMPTY)"].reason
    gone = skipped["products.csv line 10 (sku GONE)"]
    assert gone.kind == "missing_file" and "missing.jpg" in gone.reason and "line 10" in gone.reason
    assert skipped["products.csv line 11 (sku AMB)"].kind == "ambiguous"
    assert skipped["products.csv line 12 (sku BAD)"].kind == "unknown_class"
    assert "already listed on line 2" in skipped["products.csv line 13 (sku DUP)"].reason
    assert skipped["products.csv line 14 (sku UNK)"].kind == "unknown_instance"
    # every row is accounted for exactly once
    assert len(taxonomy.assignments) + len(taxonomy.skipped) == len(rows) - 1
    assert set(taxonomy.groups()) == {("hoops", "beaded"), ("ring", "dome"), ("studs", "studs")}


def test_products_csv_images_default_to_csv_folder_and_min_photos(tmp_path, jewelry):
    for name in ("a.jpg", "b.jpg"):
        _touch(tmp_path / "img" / name)
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("SKU,Title,Image\n1,Tube hoops,img/a.jpg\n2,Tubular hoops,img/b.jpg\n", encoding="utf-8")
    taxonomy = assign_from_products(csv_path, None, jewelry)
    assert [a.image for a in taxonomy.assignments] == [tmp_path / "img" / "a.jpg", tmp_path / "img" / "b.jpg"]
    assert taxonomy.groups() == {}
    assert taxonomy.skipped == (Skipped("hoops/tube", "too_few_photos", "2 photo(s), fewer than the minimum of 3"),)
    assert assign_from_products(csv_path, None, jewelry, min_photos=2).groups() == {
        ("hoops", "tube"): [tmp_path / "img" / "a.jpg", tmp_path / "img" / "b.jpg"]
    }


def test_products_csv_file_level_errors(tmp_path, jewelry):
    with pytest.raises(CatalogError, match="does not exist"):
        assign_from_products(tmp_path / "none.csv", None, jewelry)
    no_image = tmp_path / "no_image.csv"
    no_image.write_text("sku,title\n1,Tube hoops\n")
    with pytest.raises(CatalogError, match=r"no_image.csv: needs an 'image' column"):
        assign_from_products(no_image, None, jewelry)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("sku,title,image\n1,Créole hoops,a.jpg\n".encode("latin-1"))
    with pytest.raises(CatalogError, match="cannot read products CSV .*latin1.csv"):
        assign_from_products(latin1, None, jewelry)
