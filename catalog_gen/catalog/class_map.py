"""Class maps: the classes, their instances and the title keywords that identify them.

A class map (TOML, see class_maps/jewelry.toml) is loaded and validated once, here; a bad
file fails loudly, naming the file and the key. Photo assignment lives in taxonomy.py.
Keywords are compared by their normalised words (`match_words`), the same way titles are,
so two owners cannot share a keyword that would make every matching title ambiguous.
"""

from __future__ import annotations

import re
import string
import tomllib
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from catalog_gen.errors import CatalogError

_KEY = re.compile(r"[a-z0-9][a-z0-9_]*")
_KIND_NAMES = {str: "a non-empty string", int: "an integer", dict: "a table"}
_WORD = re.compile(r"[^\W_]+")  # runs of Unicode letters/digits: hyphens, quotes, '&' separate words


@dataclass(frozen=True)
class InstanceSpec:
    key: str
    name: str
    keywords: tuple[str, ...]
    token: str | None = None
    """The identifier token chosen by hand (`token = "..."`); None: one is picked from the tokenizer."""


@dataclass(frozen=True)
class ClassSpec:
    key: str
    noun: str
    class_prompt: str
    instance_prompt: str
    keywords: tuple[str, ...]
    instances: Mapping[str, InstanceSpec]

    def instance_prompt_for(self, instance: str, token: str) -> str:
        if instance not in self.instances:
            raise CatalogError(
                f"unknown instance '{instance}' in class '{self.key}'; known: {', '.join(self.instances)}"
            )
        if not token or not token.strip():
            raise CatalogError(f"empty identifier token for instance '{self.key}/{instance}'")
        return self.instance_prompt.format(token=token.strip(), instance=self.instances[instance].name)

    def plain_prompt_for(self, instance: str) -> str:
        """The instance prompt with no identifier token ("photo of a pair of beaded hoops"): how a caption-based
        LoRA, which learned words rather than a token, is prompted for the instance."""
        self.instance_prompt_for(instance, "_")  # names an unknown instance
        return " ".join(self.instance_prompt.format(token="", instance=self.instances[instance].name).split())


@dataclass(frozen=True)
class ClassMap:
    name: str
    min_photos: int
    classes: Mapping[str, ClassSpec]
    source: Path

    def get_class(self, key: str) -> ClassSpec:
        if key not in self.classes:
            raise CatalogError(f"unknown class '{key}'; known: {', '.join(self.classes)}")
        return self.classes[key]

    def get_instance(self, class_key: str, instance_key: str) -> InstanceSpec:
        spec = self.get_class(class_key)
        if instance_key not in spec.instances:
            raise CatalogError(
                f"unknown instance '{instance_key}' in class '{class_key}'; known: {', '.join(spec.instances)}"
            )
        return spec.instances[instance_key]

    def instance_keys(self) -> list[tuple[str, str]]:
        return [(c, i) for c, spec in self.classes.items() for i in spec.instances]


def match_words(text: str) -> tuple[str, ...]:
    """The words a title or keyword is matched by: casefolded, accents folded, plural 's' dropped."""
    # Accents folded ("Dôme" ~ "dome") so shop titles in other languages still match.
    folded = "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))
    return tuple(_singular(w) for w in _WORD.findall(folded))


def _singular(word: str) -> str:
    # Plural tolerance: "hoops" ~ "hoop", "charms" ~ "charm"; both sides are normalised alike.
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


# ---------------------------------------------------------------- loading and validation

def load_class_map(spec: str | Path = "jewelry") -> ClassMap:
    """Load a built-in class map by name ("jewelry") or a .toml file by path, validated."""
    if isinstance(spec, Path) or "/" in spec or "\\" in spec or spec.endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise CatalogError(f"class map file {path} does not exist")
        source = path
    else:
        resource = resources.files("catalog_gen.class_maps") / f"{spec}.toml"
        if not resource.is_file():
            builtin = sorted(p.name[:-5] for p in resources.files("catalog_gen.class_maps").iterdir()
                             if p.name.endswith(".toml"))
            raise CatalogError(f"unknown class map '{spec}'; built-in: {', '.join(builtin)} (or give a .toml path)")
        source = Path(str(resource))
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot read class map {source}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"class map {source} is not valid TOML: {exc}") from exc
    return _parse_class_map(data, source)


def _parse_class_map(data: dict[str, Any], source: Path) -> ClassMap:
    top = f"class map {source}"
    _only(data, {"taxonomy", "classes"}, top)
    taxonomy = _get(data, "taxonomy", dict, top)
    _only(taxonomy, {"name", "min_photos"}, f"{top} [taxonomy]")
    name = _get(taxonomy, "name", str, f"{top} [taxonomy]")
    min_photos = _get(taxonomy, "min_photos", int, f"{top} [taxonomy]")
    if min_photos < 1:
        raise CatalogError(f"{top} [taxonomy]: min_photos must be at least 1, got {min_photos}")
    raw_classes = _get(data, "classes", dict, top)
    if not raw_classes:
        raise CatalogError(f"{top}: [classes] defines no classes")
    classes = {key: _parse_class(key, value, f"{top} [classes.{key}]") for key, value in raw_classes.items()}
    _no_shared_keywords({k: c.keywords for k, c in classes.items()}, f"{top} [classes]")
    return ClassMap(name, min_photos, MappingProxyType(classes), source)


def _parse_class(key: str, raw: Any, at: str) -> ClassSpec:
    _check_key(key, raw, at)
    _only(raw, {"noun", "class_prompt", "instance_prompt", "keywords", "instances"}, at)
    class_prompt = _get(raw, "class_prompt", str, at)
    instance_prompt = _get(raw, "instance_prompt", str, at)
    if _template_fields(class_prompt, at):
        raise CatalogError(f"{at}: class_prompt must not contain placeholders: {class_prompt!r}")
    fields = _template_fields(instance_prompt, at)
    if "token" not in fields or not fields <= {"token", "instance"}:
        raise CatalogError(f"{at}: instance_prompt must contain {{token}} and may contain only "
                           f"{{token}} and {{instance}}: {instance_prompt!r}")
    raw_instances = _get(raw, "instances", dict, at)
    if not raw_instances:
        raise CatalogError(f"{at}: no instances")
    instances = {}
    for ikey, iraw in raw_instances.items():
        iat = f"{at[:-1]}.instances.{ikey}]"
        _check_key(ikey, iraw, iat)
        _only(iraw, {"name", "keywords", "token"}, iat)
        iname = _get(iraw, "name", str, iat) if "name" in iraw else ikey.replace("_", " ")
        itoken = _get(iraw, "token", str, iat) if "token" in iraw else None
        instances[ikey] = InstanceSpec(ikey, iname, _keywords(iraw, iat), itoken)
    _no_shared_keywords({k: i.keywords for k, i in instances.items()}, f"{at} instances")
    return ClassSpec(key, _get(raw, "noun", str, at), class_prompt, instance_prompt,
                     _keywords(raw, at), MappingProxyType(instances))


def _only(table: dict, allowed: set[str], at: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:  # a typo such as "keyword" would otherwise be silently ignored
        raise CatalogError(f"{at}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _get(table: dict, key: str, kind: type, at: str) -> Any:
    value = table.get(key)
    if value is None:
        raise CatalogError(f"{at}: missing '{key}'")
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
        raise CatalogError(f"{at}: '{key}' must be {_KIND_NAMES[kind]}, got {value!r}")
    return value.strip() if kind is str else value


def _check_key(key: str, raw: Any, at: str) -> None:
    if not _KEY.fullmatch(key):  # keys become folder names and "class/instance" identifiers
        raise CatalogError(f"{at}: key '{key}' must be lowercase letters, digits and underscores")
    if not isinstance(raw, dict):
        raise CatalogError(f"{at}: must be a table")


def _template_fields(template: str, at: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise CatalogError(f"{at}: prompt {template!r} is not a valid template ({exc})") from exc


def _keywords(table: dict, at: str) -> tuple[str, ...]:
    value = table.get("keywords", [])
    if not isinstance(value, list) or not all(isinstance(k, str) and match_words(k) for k in value):
        raise CatalogError(f"{at}: keywords must be a list of words or phrases, got {value!r}")
    return tuple(" ".join(k.lower().split()) for k in value)


def _no_shared_keywords(owners: Mapping[str, tuple[str, ...]], at: str) -> None:
    seen: dict[tuple[str, ...], str] = {}
    for owner, keywords in owners.items():
        for keyword in keywords:
            other = seen.setdefault(match_words(keyword), owner)
            if other != owner:  # the same word would make every matching title ambiguous
                raise CatalogError(f"{at}: keyword '{keyword}' is used by both '{other}' and '{owner}'")
