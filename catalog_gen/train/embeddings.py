"""New token embeddings: what textual inversion and pivotal tuning learn.

An instance's placeholder `<ring-band>` with n vectors is n tokens, `<ring-band>`, `<ring-band>_1`, ...: the
names diffusers' load_textual_inversion gives a multi-vector embedding, so a prompt written with the
placeholder alone is expanded the same way in training and in any diffusers pipeline.

SDXL has two text encoders (CLIP-L, 768 wide, and OpenCLIP-bigG, 1280 wide), each with its own tokenizer: a
new token gets vectors in each, as the diffusers SDXL textual-inversion and advanced scripts train it, and
the files name them clip_l and clip_g as A1111 and ComfyUI read SDXL embeddings.

Training never changes the shared tokenizers or the text encoders' embedding matrices: a copy of each tokenizer
knows the new tokens, and each text encoder's token embedding is wrapped so that the new ids read the
trainable vectors. Leaving the context puts the very same objects back.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from catalog_gen.errors import CatalogError

EMBEDDINGS_KEYS = ("token_embeddings", "token_embeddings_2")
"""The names the trainable vectors have in checkpoints (beside the LoRA's parameter names), one per text
encoder: SD 1.x and 2.x have the first only."""
FILE_KEYS = ("clip_l", "clip_g")
"""The keys the diffusers advanced scripts, A1111 and ComfyUI give each text encoder's vectors."""
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
"""The attribute names of each (tokenizer, text encoder) pair, on training Components and diffusers pipelines."""


def encoder_pairs(holder) -> list[tuple[str, str]]:
    """The (tokenizer, text encoder) attribute pairs `holder` has: one for SD 1.x and 2.x, two for SDXL."""
    return [pair for pair in ENCODERS if getattr(holder, pair[1], None) is not None]


@dataclass(frozen=True)
class NewTokens:
    """The tokens a method adds and their trainable vectors, one Parameter per text encoder."""

    names: list[str]
    vectors: tuple[torch.nn.Parameter, ...]

    def is_vector(self, parameter) -> bool:
        return any(parameter is vectors for vectors in self.vectors)


class ExtendedTokenEmbedding(torch.nn.Module):
    """The base token embedding for the vocabulary's ids, trainable vectors for ids from `first_id` on."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, vectors: torch.nn.Parameter):
        super().__init__()
        self.base, self.first_id, self.vectors = base, first_id, vectors

    @property
    def weight(self) -> torch.Tensor:  # callers that ask for the embedding's dtype or device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_id
        known = self.base(input_ids.masked_fill(is_new, 0))
        learned = self.vectors[(input_ids - self.first_id).clamp(min=0, max=len(self.vectors) - 1)]
        return torch.where(is_new.unsqueeze(-1), learned.to(known.dtype), known)


def expand_prompt(prompt: str, names: Sequence[str]) -> str:
    """The placeholder (names[0]) written out as all its tokens, as diffusers' maybe_convert_prompt does."""
    return prompt.replace(names[0], " ".join(names)) if len(names) > 1 else prompt


def initial_vectors(text_encoder: torch.nn.Module, tokenizer, initializer: str, count: int) -> torch.Tensor:
    """Every vector starts at the mean embedding of the initializer's tokens (the class noun: "ring")."""
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not ids:
        raise CatalogError(f"initializer {initializer!r} has no tokens to start the new embedding from")
    table = text_encoder.get_input_embeddings().weight.detach()
    start = table[torch.tensor(ids, device=table.device)].float().mean(dim=0)
    return start.repeat(count, 1).cpu()


def start_tokens(components, names: Sequence[str], initializer: str) -> NewTokens:
    """Trainable vectors for `names` in each text encoder, every one at its encoder's initializer mean."""
    return NewTokens(list(names), tuple(
        torch.nn.Parameter(initial_vectors(getattr(components, encoder), getattr(components, tokenizer), initializer,
                                           len(names)).to(components.device))
        for tokenizer, encoder in encoder_pairs(components)))


@contextlib.contextmanager
def new_tokens_applied(components, new: NewTokens):
    """Within: each of components' tokenizers knows the new names, and each text encoder reads its vectors for
    them."""
    originals = []
    try:
        for (tokenizer_name, encoder_name), vectors in zip(encoder_pairs(components), new.vectors, strict=True):
            original_tokenizer = getattr(components, tokenizer_name)
            text_encoder = getattr(components, encoder_name)
            tokenizer = copy.deepcopy(original_tokenizer)
            added = tokenizer.add_tokens(list(new.names))
            ids = tokenizer.convert_tokens_to_ids(list(new.names))
            if added != len(new.names) or ids != list(range(ids[0], ids[0] + len(new.names))):
                raise CatalogError(f"new tokens {new.names} could not be added to {tokenizer_name} as fresh tokens")
            originals.append((tokenizer_name, original_tokenizer, text_encoder, text_encoder.get_input_embeddings()))
            text_encoder.set_input_embeddings(ExtendedTokenEmbedding(originals[-1][3], ids[0], vectors))
            setattr(components, tokenizer_name, tokenizer)
        yield
    finally:
        for tokenizer_name, original_tokenizer, text_encoder, original_embedding in originals:
            text_encoder.set_input_embeddings(original_embedding)
            setattr(components, tokenizer_name, original_tokenizer)
