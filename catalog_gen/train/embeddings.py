"""New token embeddings: what textual inversion and pivotal tuning learn.

An instance's placeholder `<ring-band>` with n vectors is n tokens, `<ring-band>`, `<ring-band>_1`, ...: the
names diffusers' load_textual_inversion gives a multi-vector embedding, so a prompt written with the
placeholder alone is expanded the same way in training and in any diffusers pipeline.

Training never changes the shared tokenizer or the text encoder's embedding matrix: a copy of the tokenizer
knows the new tokens, and the text encoder's token embedding is wrapped so that the new ids read the
trainable vectors. Leaving the context puts the very same objects back.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch

from catalog_gen.errors import CatalogError

EMBEDDINGS_KEY = "token_embeddings"
"""The name the trainable vectors have in checkpoints (beside the LoRA's parameter names)."""


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


@contextlib.contextmanager
def new_tokens_applied(components, names: Sequence[str], vectors: torch.nn.Parameter):
    """Within: components.tokenizer knows `names`, and the text encoder reads `vectors` for them."""
    original_tokenizer = components.tokenizer
    text_encoder = components.text_encoder
    original_embedding = text_encoder.get_input_embeddings()
    tokenizer = copy.deepcopy(original_tokenizer)
    added = tokenizer.add_tokens(list(names))
    ids = tokenizer.convert_tokens_to_ids(list(names))
    if added != len(names) or ids != list(range(ids[0], ids[0] + len(names))):
        raise CatalogError(f"new tokens {list(names)} could not be added to the tokenizer as fresh tokens")
    text_encoder.set_input_embeddings(ExtendedTokenEmbedding(original_embedding, ids[0], vectors))
    components.tokenizer = tokenizer
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(original_embedding)
        components.tokenizer = original_tokenizer
