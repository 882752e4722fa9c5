"""A small but real CLIP-format byte-level BPE tokenizer, trained offline from code.

The tiny Stable Diffusion preset is built without downloads, yet rare-token selection
(catalog_gen.catalog.tokens) only means something on a tokenizer whose ids follow frequency the way
CLIP's do: merges are learnt most-frequent first, so later merges (higher ids) are rarer words
and fragments. We train one on a built-in corpus: Zipf-weighted common English (so everyday
words become single tokens), shop vocabulary, and a tail of short random letter strings
(SKU fragments, web junk) that end up as rare whole-word tokens, as they do in CLIP's vocab.

File format (what CLIPTokenizer / CLIPTokenizerFast read):
  vocab.json  the 256 byte characters, the same 256 with "</w>", one entry per merge in merge
              order, then <|startoftext|> and <|endoftext|>
  merges.txt  "#version: 0.2" then one "left right" pair per line, in merge order
"""

from __future__ import annotations

import heapq
import json
import random
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_directory

END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Corpus shape, tuned for the default 4,000 merges: the last merges are learnt at a pair count
# of about 1,200, so junk counted 1,300-2,400 becomes whole tokens in the rarest part of the
# merge range while the top 1,000 English words all become single tokens (tests check both).
_ENGLISH_WORDS = 12_000
_TOP_COUNT = 2_000_000  # count of the most common word; rank r gets _TOP_COUNT / r
_PRODUCT_COUNT = 4_000  # about the count of an English word ranked 500
_JUNK_WORDS = 400
_JUNK_COUNTS = (1_300, 2_400)

PRODUCT_WORDS = (
    "jewelry jewellery jewel earring earrings hoop hoops huggie huggies stud studs necklace necklaces "
    "pendant pendants chain chains charm charms ring rings band bands signet stacker stacking stackable "
    "bead beads beaded chunky croissant dome domed tube tubular rectangle rectangular cocktail slim "
    "skinny bold statement gold silver vermeil plated sterling karat pearl pearls diamond gemstone "
    "zirconia crystal enamel clasp bracelet bangle anklet choker locket link links twisted textured "
    "polished brushed hammered minimalist dainty delicate everyday pair studio product catalog photo "
    "photograph closeup macro background white marble velvet display"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> visible character, in CLIP's order: printable Latin-1 bytes first, as themselves.

    The remaining bytes (controls, space, soft hyphen...) borrow code points from 256 upwards,
    so every token is a string of visible, whitespace-free characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


_BYTE_CHARS = bytes_to_unicode()


def word_symbols(word: str) -> list[str]:
    """A pre-tokenised word as initial BPE symbols: one per UTF-8 byte, the last marked "</w>"."""
    symbols = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    left, right = pair
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_clip_bpe(word_counts: Mapping[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to num_merges merges, most frequent pair first; ties go to the smaller pair.

    Words are pre-tokenised units (CLIP splits text into letter runs, single digits and
    punctuation runs), counted. Pair counts are kept incrementally with a lazy max-heap so
    each merge only revisits the words that contain the merged pair.
    """
    if not isinstance(num_merges, int) or num_merges < 0:
        raise CatalogError(f"num_merges must be a non-negative integer, got {num_merges!r}")
    for word, count in word_counts.items():
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise CatalogError(f"BPE corpus word {word!r} must be a non-empty string without whitespace")
        if not isinstance(count, int) or count < 1:
            raise CatalogError(f"BPE corpus word {word!r} has count {count!r}; counts must be integers >= 1")
    items = sorted(word_counts.items())  # input order must not change the result
    words = [word_symbols(w) for w, _ in items]
    freqs = [c for _, c in items]
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    known = set(_BYTE_CHARS.values()) | {c + END_OF_WORD for c in _BYTE_CHARS.values()}
    banned: set[tuple[str, str]] = set()
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or pair in banned:
            continue  # stale heap entry: the count changed after it was pushed
        if pair[0] + pair[1] in known:
            # The same string via another split ("a"+"bc" after "ab"+"c"): a second vocab entry
            # for it would break "one id per merge", so this pair is never merged.
            banned.add(pair)
            continue
        merges.append(pair)
        known.add(pair[0] + pair[1])
        touched: set[tuple[str, str]] = set()
        for i in where.pop(pair):
            old, freq = words[i], freqs[i]
            new = _merge_pair(old, pair)
            for p in zip(old, old[1:]):
                pair_counts[p] -= freq
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += freq
                where[p].add(i)
                touched.add(p)
            words[i] = new
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return merges


def builtin_corpus(seed: int = 0) -> dict[str, int]:
    """Deterministic word counts: Zipf-weighted English, shop words, and a rare junk tail."""
    import wordfreq  # imported here: only building the tokenizer needs the word list

    counts: dict[str, int] = {}
    english = [w for w in wordfreq.top_n_list("en", _ENGLISH_WORDS) if re.fullmatch(r"[a-z]+", w)]
    for rank, word in enumerate(english, start=1):
        counts[word] = max(1, round(_TOP_COUNT / rank))
    for word in PRODUCT_WORDS:
        counts[word] = max(counts.get(word, 0), _PRODUCT_COUNT)
    # Short random strings at counts just above the last merges': they are merged late, so the
    # rare end of the vocab holds short whole-word tokens that mean nothing, the kind
    # DreamBooth identifiers are picked from.
    rng = random.Random(seed)
    junk = 0
    while junk < _JUNK_WORDS:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice((2, 3, 3, 4))))
        if word not in counts:
            counts[word] = rng.randint(*_JUNK_COUNTS)
            junk += 1
    return counts


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The CLIP vocab for a merge list: bytes, bytes + "</w>", one token per merge, specials."""
    tokens = list(_BYTE_CHARS.values())
    tokens += [t + END_OF_WORD for t in tokens]
    tokens += [left + right for left, right in merges]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CatalogError("BPE merges produce the same token twice; the vocab would have gaps")
    return vocab


def encode_word(word: str, merges: Sequence[tuple[str, str]]) -> list[str]:
    """Reference segmentation of one pre-tokenised word: apply the best-ranked merge until none applies.

    Independent of the tokenizers library, so tests can check that a tokenizer loaded from
    our files segments words exactly as the merge list says.
    """
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    symbols = word_symbols(word)
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:])) & ranks.keys()
        if not pairs:
            break
        symbols = _merge_pair(symbols, min(pairs, key=ranks.__getitem__))
    return symbols


def tokenizer_files(merges: Sequence[tuple[str, str]]) -> dict[str, bytes]:
    """File name -> bytes of a CLIP tokenizer folder; pure, so the same merges give the same bytes."""
    vocab = clip_vocab(merges)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }

    def as_json(payload: dict) -> bytes:
        return (json.dumps(payload, ensure_ascii=False, indent=2) + "\n").encode("utf-8")

    return {
        "vocab.json": as_json(vocab),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"),
        "special_tokens_map.json": as_json(specials),
        "tokenizer_config.json": as_json(config),
    }


def write_clip_tokenizer(out_dir: Path, num_merges: int = 4000, seed: int = 0) -> Path:
    """Train on the built-in corpus and write a CLIP tokenizer folder at out_dir.

    The folder is built under a temporary name and swapped in whole, so out_dir belongs to
    the tokenizer: anything else in it is replaced.
    """
    files = tokenizer_files(train_clip_bpe(builtin_corpus(seed), num_merges))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
    return out_dir
