"""Rare identifier tokens, one per (class, instance): the [V] in "photo of a pair of [V] beaded hoops".

DreamBooth binds a product to a token the text encoder barely knows, so fine-tuning does not
have to overwrite a strong prior. A good identifier is one whole-word token of the tokenizer
in use, short, late in the merge list (rare in CLIP's training text), not an English word, and
not a string Stable Diffusion already associates with something ("sks" draws rifles).

Assignments are stable: a token file keeps every still-valid choice, and a new instance picks
by a hash of its own key, so adding a product never renames another product's adapter token.
Works with any transformers CLIP tokenizer (the tiny built one or a real SD 1.5 one) through
get_vocab(), encode() and convert_ids_to_tokens() only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import wordfreq

from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_write_json

END_OF_WORD = "</w>"
_BYTE_TOKENS = 512  # CLIP vocabs start with 256 byte characters and the same 256 + "</w>"; merges follow

# Identifiers that already mean something to Stable Diffusion, or that so many community
# fine-tunes used that checkpoints merged from them carry their concept.
KNOWN_BAD_TOKENS = frozenset({
    # used-up DreamBooth identifiers
    "sks", "ohwx", "zwx", "zxc", "qwe", "asd", "xyz", "abc", "bnha",
    # model, format and quality words that steer style or framing
    "sd", "xl", "ai", "gpt", "cgi", "hd", "uhd", "hdr", "dslr", "png", "jpg", "jpeg", "gif", "svg", "raw",
    "rtx", "vr", "ar", "art", "pic", "pix", "lol", "omg", "wtf",
    # unsafe or violent concepts
    "xxx", "nsfw", "sex", "porn", "nude", "gun", "ak", "uzi", "rpg", "ww", "ss", "kkk", "isis", "nazi",
    # brands, franchises and media with strong visual priors
    "bmw", "vw", "gta", "nba", "nfl", "ufc", "wwe", "bts", "mtv", "ufo", "nft", "pc", "tv", "cd", "dvd",
    "ps", "nes", "lego", "ikea", "etsy", "ig", "fb",
    # jewellery shorthand that would mix with the catalogue's own words
    "kt", "ct", "gia", "sku",
})


@dataclass(frozen=True)
class TokenRules:
    max_chars: int = 3
    """Longest identifier, in characters."""
    rare_fraction: float = 0.5
    """Only ids in the last this-fraction of the merge range count as rare."""
    max_english_zipf: float = 1.5
    """wordfreq.zipf_frequency(token, "en") must be below this (1.5: about once per 30M words)."""
    alphabetic_only: bool = True
    """Only lowercase ASCII letters (CLIP lowercases text and splits digits off anyway)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise CatalogError(f"token rules: max_chars must be an integer >= 1, got {self.max_chars!r}")
        if not 0 < self.rare_fraction <= 1:
            raise CatalogError(f"token rules: rare_fraction must be in (0, 1], got {self.rare_fraction!r}")
        if self.max_english_zipf <= 0:
            raise CatalogError(f"token rules: max_english_zipf must be > 0, got {self.max_english_zipf!r}")


class NoBpeMerges(CatalogError):
    """The tokenizer has no merged tokens to pick a rare identifier from (a byte-level or foreign one)."""


def _rare_from(tokenizer: Any, vocab: Mapping[str, int], rules: TokenRules) -> int:
    """First id that counts as rare: the start of the last rare_fraction of the merge ids."""
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    merge_ids = [i for token, i in vocab.items() if i >= _BYTE_TOKENS and token not in specials]
    if not merge_ids:
        raise NoBpeMerges("its tokenizer has no BPE merges (is it a CLIP tokenizer?), so no rare identifier token "
                          "can be picked from it; set each instance's token by hand (class map `token = \"...\"` "
                          "or catalog train --token INSTANCE=TOKEN)")
    span = max(merge_ids) - _BYTE_TOKENS + 1
    return _BYTE_TOKENS + int(span * (1 - rules.rare_fraction))


def _violation(token: str, tokenizer: Any, rare_from: int | None, rules: TokenRules) -> str | None:
    """Why `token` is not a usable identifier, or None. Cheap checks first. rare_from None: the tokenizer
    has no merges, so the one-token and rarity checks cannot apply."""
    if not token:
        return "is empty"
    if rules.alphabetic_only and not re.fullmatch(r"[a-z]+", token):
        return "must be lowercase ASCII letters only (CLIP lowercases prompts and splits off digits)"
    if not rules.alphabetic_only and (not token.isprintable() or any(c.isspace() for c in token)):
        return "must be one printable word without spaces"
    if len(token) > rules.max_chars:
        return f"is {len(token)} characters; at most {rules.max_chars} allowed"
    if token in KNOWN_BAD_TOKENS:
        return "already means something to Stable Diffusion or is a used-up community identifier"
    zipf = wordfreq.zipf_frequency(token, "en")
    if zipf >= rules.max_english_zipf:
        return f"is an English word (zipf frequency {zipf:.2f} >= {rules.max_english_zipf})"
    if rare_from is None:  # a tokenizer without merges spells every word in bytes: nothing more to check
        return None
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = " ".join(tokenizer.convert_ids_to_tokens(ids))
        return f"is {len(ids)} tokens ({pieces}) in this tokenizer, not one"
    if ids[0] < rare_from:
        return f"is a common token (id {ids[0]}; rare tokens have ids >= {rare_from})"
    return None


def candidate_tokens(tokenizer: Any, rules: TokenRules = TokenRules()) -> list[str]:
    """Every usable identifier in the tokenizer's vocab, rarest-last (ascending id) order."""
    vocab = tokenizer.get_vocab()
    rare_from = _rare_from(tokenizer, vocab, rules)
    found = []
    for token, token_id in sorted(vocab.items(), key=lambda item: item[1]):
        if token_id < rare_from or not token.endswith(END_OF_WORD):
            continue
        bare = token[: -len(END_OF_WORD)]
        if len(bare) <= rules.max_chars and _violation(bare, tokenizer, rare_from, rules) is None:
            found.append(bare)
    return found


def check_token(token: str, tokenizer: Any, rules: TokenRules = TokenRules()) -> None:
    """Raise CatalogError naming the token and the rule it breaks (for user-supplied tokens)."""
    if not isinstance(token, str):
        raise CatalogError(f"identifier token {token!r} must be a string")
    problem = _violation(token, tokenizer, _rare_from_or_none(tokenizer, rules), rules)
    if problem:
        raise CatalogError(f"identifier token '{token}' {problem}")


def _rare_from_or_none(tokenizer: Any, rules: TokenRules) -> int | None:
    """The rare-id boundary; None for a tokenizer without merges, where a hand-chosen token is held to the
    rules that do not depend on merges (letters, length, not a word, not a known identifier)."""
    try:
        return _rare_from(tokenizer, tokenizer.get_vocab(), rules)
    except NoBpeMerges:
        return None


def _instance_key(class_key: str, instance_key: str) -> str:
    for part in (class_key, instance_key):
        if not isinstance(part, str) or not part or "/" in part:
            raise CatalogError(f"instance ({class_key!r}, {instance_key!r}): keys must be non-empty and contain no '/'")
    return f"{class_key}/{instance_key}"


def _slot(key: str, size: int) -> int:
    # sha256, not hash(): Python salts str hashes per process, and choices must survive reruns.
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % size


def assign_tokens(
    instances: Sequence[tuple[str, str]],
    tokenizer: Any,
    existing: Mapping[str, str] | None = None,
    rules: TokenRules = TokenRules(),
    chosen: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """"class/instance" -> token for every instance, unique across the catalogue.

    `chosen` ("class/instance" -> token) are tokens set by hand: each is checked like a picked one and
    wins over what `existing` held for that instance; two instances may not share one. Every other
    still-valid entry of `existing` is kept, also for instances not asked about this time (an instance
    held back for too few photos keeps its token for when it returns), so the result is the new contents
    of the token file. Entries that break the rules, or repeat a token already kept, are dropped and
    their instances get new tokens.
    """
    # 1. Validate the request, and the tokens chosen by hand.
    keys = [_instance_key(c, i) for c, i in instances]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise CatalogError(f"instances listed more than once: {', '.join(repeated)}")
    tokens: dict[str, str] = {}
    for key, token in sorted((chosen or {}).items()):
        try:
            check_token(token, tokenizer, rules)
        except CatalogError as error:
            raise CatalogError(f"{key}: {error}") from None
        owner = next((k for k, t in tokens.items() if t == token), None)
        if owner is not None:
            raise CatalogError(f"{key}: identifier token '{token}' is already chosen for {owner}")
        tokens[key] = token
    # 2. Keep what is still valid, in key order so a repeated token goes to the same key each run.
    try:
        rare_from, no_merges = _rare_from(tokenizer, tokenizer.get_vocab(), rules), None
    except NoBpeMerges as error:  # hand-chosen tokens (and earlier ones) still work; picking new ones cannot
        rare_from, no_merges = None, error
    chosen_by = {token: key for key, token in tokens.items()}
    for key, token in sorted((existing or {}).items()):
        if key in tokens:
            continue
        if token in chosen_by:  # taking a kept token away would silently retrain that instance under a new one
            raise CatalogError(f"{chosen_by[token]}: identifier token '{token}' is already {key}'s (tokens.json); "
                               "choose another")
        if token not in tokens.values() and _violation(token, tokenizer, rare_from, rules) is None:
            tokens[key] = token
    # 3. New instances probe the candidate list from a slot given by their own key's hash.
    needed = sorted(k for k in keys if k not in tokens)
    if not needed:
        return dict(sorted(tokens.items()))
    if no_merges is not None:
        more = f" and {len(needed) - 5} more" if len(needed) > 5 else ""
        raise NoBpeMerges(f"{no_merges}; no token yet for {', '.join(needed[:5])}{more}")
    candidates = candidate_tokens(tokenizer, rules)
    taken = set(tokens.values())
    free = [c for c in candidates if c not in taken]
    if len(free) < len(needed):
        raise CatalogError(
            f"need {len(needed)} new identifier tokens but only {len(free)} of {len(candidates)} candidates "
            f"are free under {rules}; relax the rules (e.g. max_chars, rare_fraction) or use a larger tokenizer"
        )
    for key in needed:
        start = _slot(key, len(candidates))
        for step in range(len(candidates)):
            token = candidates[(start + step) % len(candidates)]
            if token not in taken:
                tokens[key] = token
                taken.add(token)
                break
    return dict(sorted(tokens.items()))


def _validate_token_map(tokens: Any, where: str) -> dict[str, str]:
    if not isinstance(tokens, dict):
        raise CatalogError(f"{where}: expected a JSON object of \"class/instance\": token, got {type(tokens).__name__}")
    owners: dict[str, str] = {}
    for key, token in tokens.items():
        if not isinstance(key, str) or key.count("/") != 1 or not all(key.split("/")):
            raise CatalogError(f"{where}: key {key!r} is not of the form \"class/instance\"")
        if not isinstance(token, str) or not token.strip():
            raise CatalogError(f"{where}: token for {key} must be a non-empty string, got {token!r}")
        if token in owners:
            raise CatalogError(f"{where}: token '{token}' is used by both {owners[token]} and {key}")
        owners[token] = key
    return dict(tokens)


def load_token_file(path: Path) -> dict[str, str]:
    """Read a token file written by save_token_file (or by hand)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CatalogError(f"token file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(f"token file {path} is not readable JSON: {exc}") from exc
    return _validate_token_map(payload, f"token file {path}")


def save_token_file(path: Path, tokens: Mapping[str, str]) -> None:
    """Write tokens as a sorted JSON object, atomically."""
    path = Path(path)
    atomic_write_json(path, _validate_token_map(dict(tokens), f"token file {path}"))


# New tokens: what textual inversion and pivotal tuning learn. Unlike a rare identifier, such a token is
# added to the tokenizer with an embedding of its own, so it must not exist yet.

def new_token_for(class_key: str, instance_key: str) -> str:
    """The placeholder an instance's learned embedding is named by: "<ring-band>" (the convention of the
    diffusers textual-inversion examples, and readable in a prompt)."""
    _instance_key(class_key, instance_key)
    return f"<{class_key}-{instance_key}>"


def new_token_names(placeholder: str, vectors: int) -> list[str]:
    """The tokens of a `vectors`-vector embedding, as diffusers' load_textual_inversion names them."""
    return [placeholder] + [f"{placeholder}_{index}" for index in range(1, vectors)]


def check_new_token(placeholder: str, tokenizer: Any, vectors: int, item: str) -> None:
    """Refuse a placeholder that cannot be added as new tokens: a vocabulary entry already, or one that
    prompts and A1111's bundled-embedding keys cannot carry (spaces, dots)."""
    if not isinstance(placeholder, str) or not placeholder:
        raise CatalogError(f"{item}: new token {placeholder!r} must be a non-empty string")
    if any(c.isspace() for c in placeholder) or "." in placeholder or not placeholder.isprintable():
        raise CatalogError(f"{item}: new token '{placeholder}' must be one printable word without spaces or dots")
    vocab = tokenizer.get_vocab()
    for name in new_token_names(placeholder, vectors):
        for spelling in (name, name + END_OF_WORD):
            if spelling in vocab:
                raise CatalogError(f"{item}: new token '{name}' is already in the tokenizer's vocabulary (id "
                                   f"{vocab[spelling]}); textual inversion needs a token of its own, e.g. "
                                   f"'<{placeholder.strip('<>')}-ti>'")
