"""Rare identifier tokens: candidates, rule checks, stable unique assignment, token files."""

from __future__ import annotations

import itertools
import json
import string

import pytest
import wordfreq

from catalog_gen.errors import CatalogError
from catalog_gen.catalog.taxonomy import load_class_map
from catalog_gen.catalog.tokens import (
    KNOWN_BAD_TOKENS,
    TokenRules,
    assign_tokens,
    candidate_tokens,
    check_token,
    load_token_file,
    save_token_file,
)


@pytest.fixture(scope="module")
def catalogue():
    return load_class_map("jewelry").instance_keys()


def _rare_half_start(tokenizer) -> int:
    last_merge = len(tokenizer.get_vocab()) - 3  # two special tokens close the vocab
    return 512 + (last_merge - 512 + 1) // 2


def _assert_good_identifier(token: str, tokenizer) -> None:
    assert tokenizer.tokenize(token) == [token + "</w>"], token  # exactly one whole-word token
    assert len(token) <= 3 and token.isascii() and token.isalpha() and token.islower()
    assert wordfreq.zipf_frequency(token, "en") < 1.5, token
    assert token not in KNOWN_BAD_TOKENS
    assert tokenizer.get_vocab()[token + "</w>"] >= _rare_half_start(tokenizer)


def test_candidates_all_pass_the_rules_in_id_order(tokenizer):
    candidates = candidate_tokens(tokenizer)
    assert len(candidates) >= 50
    assert len(set(candidates)) == len(candidates)
    for token in candidates:
        _assert_good_identifier(token, tokenizer)
    ids = [tokenizer.get_vocab()[t + "</w>"] for t in candidates]
    assert ids == sorted(ids)
    assert candidate_tokens(tokenizer) == candidates


def test_stricter_rules_give_fewer_candidates(tokenizer):
    default = candidate_tokens(tokenizer)
    rarest = candidate_tokens(tokenizer, TokenRules(rare_fraction=0.2))
    assert 0 < len(rarest) < len(default) and set(rarest) <= set(default)
    assert all(len(t) <= 2 for t in candidate_tokens(tokenizer, TokenRules(max_chars=2)))


def test_full_jewelry_catalogue_gets_unique_good_tokens(tokenizer, catalogue):
    tokens = assign_tokens(catalogue, tokenizer)
    assert len(catalogue) == 19
    assert sorted(tokens) == sorted(f"{c}/{i}" for c, i in catalogue)
    assert len(set(tokens.values())) == 19
    for token in tokens.values():
        _assert_good_identifier(token, tokenizer)
        check_token(token, tokenizer)


def test_assignment_is_stable_across_runs_and_input_order(tokenizer, catalogue):
    first = assign_tokens(catalogue, tokenizer)
    assert assign_tokens(list(reversed(catalogue)), tokenizer) == first
    assert assign_tokens(catalogue, tokenizer, existing=first) == first


def test_adding_an_instance_keeps_every_other_token(tokenizer, catalogue):
    before = assign_tokens(catalogue, tokenizer)
    after = assign_tokens([*catalogue, ("ring", "twisted")], tokenizer, existing=before)
    assert {k: v for k, v in after.items() if k != "ring/twisted"} == before
    assert after["ring/twisted"] not in before.values()
    _assert_good_identifier(after["ring/twisted"], tokenizer)


def test_existing_choices_are_kept_when_valid_and_replaced_when_not(tokenizer, catalogue):
    fresh = assign_tokens(catalogue, tokenizer)
    spare = next(t for t in candidate_tokens(tokenizer) if t not in fresh.values())
    existing = {
        "hoops/beaded": spare,  # a valid hand-picked token: kept
        "ring/dome": "sks",  # breaks a rule: replaced
        "ring/band": spare,  # repeats a kept token: replaced
        "watches/retired": fresh["studs/studs"],  # not asked about: kept, and its token stays reserved
    }
    tokens = assign_tokens(catalogue, tokenizer, existing=existing)
    assert tokens["hoops/beaded"] == spare
    assert tokens["ring/dome"] != "sks" and tokens["ring/band"] != spare
    assert tokens["watches/retired"] == fresh["studs/studs"]
    assert tokens["studs/studs"] != fresh["studs/studs"]
    assert len(set(tokens.values())) == len(tokens) == 20


def test_running_out_of_candidates_says_how_many(tokenizer, catalogue):
    rules = TokenRules(max_chars=2, rare_fraction=0.05)
    available = len(candidate_tokens(tokenizer, rules))
    assert available < 19
    with pytest.raises(CatalogError, match=rf"need 19 new identifier tokens but only {available} of {available}"):
        assign_tokens(catalogue, tokenizer, rules=rules)


def test_bad_instance_lists_are_rejected(tokenizer):
    with pytest.raises(CatalogError, match="listed more than once: ring/dome"):
        assign_tokens([("ring", "dome"), ("ring", "dome")], tokenizer)
    with pytest.raises(CatalogError, match="contain no '/'"):
        assign_tokens([("ring/x", "dome")], tokenizer)


def _multi_token_short_string(tokenizer) -> str:
    for letters in itertools.product(string.ascii_lowercase, repeat=3):
        text = "".join(letters)
        if (text not in KNOWN_BAD_TOKENS and wordfreq.zipf_frequency(text, "en") < 1.5
                and len(tokenizer.tokenize(text)) > 1):
            return text
    raise AssertionError("every 3-letter string is one token?")


@pytest.mark.parametrize(
    "token, rule",
    [
        ("sks", "already means something to Stable Diffusion"),
        ("ohwx", "is 4 characters; at most 3"),
        ("the", r"is an English word \(zipf frequency 7"),
        ("abcdefgh", "is 8 characters; at most 3 allowed"),
        ("BH", "must be lowercase ASCII letters"),
        ("b2", "must be lowercase ASCII letters"),
        ("", "is empty"),
    ],
)
def test_check_token_names_token_and_rule(tokenizer, token, rule):
    with pytest.raises(CatalogError, match=rf"identifier token '{token}' {rule}"):
        check_token(token, tokenizer)


def test_check_token_rejects_multi_token_and_common_tokens(tokenizer):
    split = _multi_token_short_string(tokenizer)
    with pytest.raises(CatalogError, match=rf"'{split}' is \d tokens \(.*\) in this tokenizer, not one"):
        check_token(split, tokenizer)
    vocab = tokenizer.get_vocab()
    common = next(t[:-4] for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
                  if 512 <= i < _rare_half_start(tokenizer) and t.endswith("</w>") and t[:-4].isalpha()
                  and len(t) <= 7 and wordfreq.zipf_frequency(t[:-4], "en") < 1.5 and t[:-4] not in KNOWN_BAD_TOKENS)
    with pytest.raises(CatalogError, match=rf"'{common}' is a common token"):
        check_token(common, tokenizer)
    check_token(candidate_tokens(tokenizer)[0], tokenizer)  # a good one passes


def test_token_rules_validate():
    with pytest.raises(CatalogError, match="max_chars"):
        TokenRules(max_chars=0)
    with pytest.raises(CatalogError, match="rare_fraction"):
        TokenRules(rare_fraction=0)
    with pytest.raises(CatalogError, match="max_english_zipf"):
        TokenRules(max_english_zipf=-1)


def test_token_file_round_trip(tmp_path, tokenizer, catalogue):
    tokens = assign_tokens(catalogue, tokenizer)
    path = tmp_path / "run" / "tokens.json"
    save_token_file(path, tokens)
    assert load_token_file(path) == tokens
    assert list(json.loads(path.read_text())) == sorted(tokens)
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"]  # no temp files left


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"hoops/beaded": "xva",', "is not readable JSON"),
        ('["xva"]', "expected a JSON object"),
        ('{"hoops": "xva"}', "key 'hoops' is not of the form"),
        ('{"hoops/beaded": 3}', "token for hoops/beaded must be a non-empty string"),
        ('{"hoops/beaded": "xva", "ring/dome": "xva"}', "token 'xva' is used by both hoops/beaded and ring/dome"),
    ],
)
def test_corrupt_token_file_is_named(tmp_path, content, message):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(CatalogError, match=message) as info:
        load_token_file(path)
    assert str(path) in str(info.value)


def test_missing_token_file_and_bad_save(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        load_token_file(tmp_path / "none.json")
    with pytest.raises(CatalogError, match="used by both"):
        save_token_file(tmp_path / "t.json", {"a/b": "xva", "a/c": "xva"})
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------- tokens chosen by hand

def test_a_chosen_token_wins_is_checked_and_is_unique(tokenizer, catalogue):
    picked = assign_tokens(catalogue, tokenizer)
    mine = next(t for t in reversed(candidate_tokens(tokenizer)) if t not in picked.values())
    chosen = assign_tokens(catalogue, tokenizer, picked, chosen={"ring/band": mine})
    assert chosen["ring/band"] == mine and len(set(chosen.values())) == len(chosen)
    assert all(chosen[k] == picked[k] for k in picked if k != "ring/band")  # nobody else moves
    held = picked["ring/bold"]  # another instance's kept token is not taken from it
    with pytest.raises(CatalogError, match=f"ring/band: identifier token '{held}' is already ring/bold's"):
        assign_tokens(catalogue, tokenizer, picked, chosen={"ring/band": held})
    with pytest.raises(CatalogError, match="ring/band: identifier token 'cat' is an English word"):
        assign_tokens(catalogue, tokenizer, chosen={"ring/band": "cat"})
    with pytest.raises(CatalogError, match="ring/bold: identifier token '.*' is already chosen for ring/band"):
        assign_tokens(catalogue, tokenizer, chosen={"ring/band": mine, "ring/bold": mine})


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory):
    """A CLIP-format tokenizer with no merges at all: every token is one byte."""
    from transformers import CLIPTokenizer

    from catalog_gen.models import bpe

    folder = tmp_path_factory.mktemp("byte-tokenizer")
    for name, data in bpe.tokenizer_files([]).items():
        (folder / name).write_bytes(data)
    return CLIPTokenizer.from_pretrained(folder)


def test_a_tokenizer_without_merges_asks_for_tokens_by_hand_and_takes_them(byte_level_tokenizer):
    from catalog_gen.catalog.tokens import NoBpeMerges

    instances = [("ring", "band"), ("ring", "bold")]
    with pytest.raises(NoBpeMerges, match=r"set each instance's token by hand.*no token yet for ring/band, ring/bold"):
        assign_tokens(instances, byte_level_tokenizer)
    # Every word is spelt in bytes here: a hand-chosen token is held to the rules that do not need merges.
    chosen = assign_tokens(instances, byte_level_tokenizer, chosen={"ring/band": "qzv", "ring/bold": "qvj"})
    assert chosen == {"ring/band": "qzv", "ring/bold": "qvj"}
    with pytest.raises(CatalogError, match="ring/band: identifier token 'cat' is an English word"):
        assign_tokens(instances, byte_level_tokenizer, chosen={"ring/band": "cat", "ring/bold": "qvj"})


def test_a_class_map_can_set_an_instance_token(tmp_path, tokenizer):
    from catalog_gen.train.workflow import assign_catalogue_tokens

    text = load_class_map("jewelry").source.read_text()
    path = tmp_path / "jewelry.toml"
    mine = candidate_tokens(tokenizer)[-3]
    path.write_text(text.replace('[classes.ring.instances.band]\n', f'[classes.ring.instances.band]\ntoken = "{mine}"\n'))
    class_map = load_class_map(path)
    assert class_map.get_instance("ring", "band").token == mine
    assert assign_catalogue_tokens(tmp_path / "work", class_map, tokenizer)["ring/band"] == mine
    path.write_text(text.replace('[classes.ring.instances.band]\n', '[classes.ring.instances.band]\ntoken = 7\n'))
    with pytest.raises(CatalogError, match="token"):
        load_class_map(path)
