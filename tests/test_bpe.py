"""The offline CLIP-format BPE tokenizer: trainer, file format, and loading in transformers."""

from __future__ import annotations

import json
import re

import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast

from catalog_gen.models import bpe
from catalog_gen.errors import CatalogError

SENTENCES = [
    "photo of a pair of hoops",
    "A photo of a pair of BEADED hoops, 14k gold-plated!",
    "photo of a xva dome ring on white marble",
    "Café crème — naïve déjà vu 🙂",
    "it's   the   stacker's   best    sks ohwx",
]


# tokenizer_dir and tokenizer (its slow CLIPTokenizer) are session fixtures in conftest.py.


@pytest.fixture(scope="session")
def merges(tokenizer_dir):
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines[1:]]


@pytest.fixture(scope="session")
def vocab(tokenizer_dir):
    return json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))


def test_trainer_merges_most_frequent_pair_first_ties_by_pair():
    merges = bpe.train_clip_bpe({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 3)
    # ("e","s") and ("s","t</w>") both occur 9 times: the smaller pair wins the tie
    assert merges == [("e", "s"), ("es", "t</w>"), ("l", "o")]


def test_trainer_is_deterministic_and_order_independent():
    counts = {"hoops": 9, "hoop": 4, "shop": 3, "photo": 7, "pair": 5, "hop": 2}
    reversed_counts = dict(reversed(list(counts.items())))
    assert bpe.train_clip_bpe(counts, 12) == bpe.train_clip_bpe(reversed_counts, 12)


def test_trainer_stops_when_nothing_is_left_to_merge():
    assert bpe.train_clip_bpe({"ab": 3}, 10) == [("a", "b</w>")]


def test_trainer_handles_non_ascii_words_as_bytes():
    merges = bpe.train_clip_bpe({"é": 5}, 1)
    assert merges == [("Ã", "©</w>")]  # the two UTF-8 bytes of é, in CLIP's byte alphabet


@pytest.mark.parametrize(
    "counts, num_merges, expected",
    [
        ({"a b": 1}, 1, "without whitespace"),
        ({"": 1}, 1, "non-empty"),
        ({"ab": 0}, 1, "counts must be integers >= 1"),
        ({"ab": 1}, -1, "num_merges must be a non-negative integer"),
    ],
)
def test_trainer_rejects_bad_input(counts, num_merges, expected):
    with pytest.raises(CatalogError, match=expected):
        bpe.train_clip_bpe(counts, num_merges)


def test_builtin_corpus_is_deterministic_and_seeded():
    first, again, other = bpe.builtin_corpus(0), bpe.builtin_corpus(0), bpe.builtin_corpus(1)
    assert first == again
    assert first != other
    assert first["the"] > first["photo"] > 1
    assert all(re.fullmatch(r"[a-z]+", word) for word in first)
    assert all(first[word] >= 1_000 for word in ("hoops", "necklace", "huggie", "pendant"))


def test_files_and_vocab_layout(tokenizer_dir, vocab, merges):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    ]
    assert (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert len(merges) == 4000
    tokens = list(vocab)
    assert list(vocab.values()) == list(range(len(vocab)))
    byte_chars = list(bpe.bytes_to_unicode().values())
    assert tokens[:256] == byte_chars and tokens[0] == "!"
    assert tokens[256:512] == [c + "</w>" for c in byte_chars]
    assert tokens[512:-2] == [a + b for a, b in merges]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"
    assert config["pad_token"] == "<|endoftext|>"


def test_same_bytes_on_every_run(tokenizer_dir, tmp_path):
    again = bpe.write_clip_tokenizer(tmp_path / "again")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_rewrite_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    bpe.write_clip_tokenizer(target, num_merges=10)
    assert not (target / "stale.txt").exists()
    assert {p.name for p in target.iterdir()} == set(bpe.tokenizer_files([]))
    assert len((target / "merges.txt").read_text().splitlines()) == 1 + 10


def test_slow_and_fast_classes_load_and_agree(tokenizer_dir, vocab):
    slow = CLIPTokenizer.from_pretrained(tokenizer_dir)
    fast = CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    assert len(slow) == len(fast) == len(vocab)
    for sentence in SENTENCES:
        assert slow.tokenize(sentence) == fast.tokenize(sentence)
        assert slow(sentence).input_ids == fast(sentence).input_ids
    ids = slow("photo of a pair of hoops", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == vocab["<|startoftext|>"] and ids[7:] == [vocab["<|endoftext|>"]] * 70


def test_prompt_is_a_handful_of_whole_word_tokens(tokenizer):
    assert tokenizer.tokenize("photo of a pair of hoops") == [
        "photo</w>", "of</w>", "a</w>", "pair</w>", "of</w>", "hoops</w>"
    ]
    assert tokenizer.decode(tokenizer("photo of a pair of hoops").input_ids, skip_special_tokens=True) == (
        "photo of a pair of hoops"
    )


def test_loaded_tokenizer_segments_exactly_as_the_merges_say(tokenizer, merges):
    # Independent check of the file format: the tokenizers library's BPE vs our reference.
    words = list(bpe.builtin_corpus())[::25] + ["antidisestablishmentarianism", "qqqqq", "zzyzx", "hoopsy"]
    for word in words:
        assert tokenizer.tokenize(word) == bpe.encode_word(word, merges), word


def test_common_english_words_are_single_tokens(tokenizer):
    import wordfreq

    common = [w for w in wordfreq.top_n_list("en", 1200) if re.fullmatch(r"[a-z]+", w)][:1000]
    assert all(len(tokenizer.tokenize(w)) == 1 for w in common)


def test_ids_grow_with_rarity_and_the_rare_half_has_short_junk_words(vocab):
    import wordfreq

    top_words = [w for w in wordfreq.top_n_list("en", 150) if re.fullmatch(r"[a-z]+", w)][:100]
    first_merge, last_merge = 512, len(vocab) - 3
    rare_half = first_merge + (last_merge - first_merge + 1) // 2
    short_junk = [
        t[:-4] for t, i in vocab.items()
        if i >= rare_half and re.fullmatch(r"[a-z]{2,3}</w>", t) and wordfreq.zipf_frequency(t[:-4], "en") < 1.5
    ]
    assert len(short_junk) >= 50
    # the 100 most common words were all merged before the rare half began
    assert max(vocab[w + "</w>"] for w in top_words) < rare_half
