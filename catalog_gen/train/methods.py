"""What each fine-tuning method trains, in one place (`catalog train --method`).

    dreambooth-lora    a LoRA on the UNet (text encoder optional), bound to a rare token the vocabulary
                       already has; the seeds' default (004)
    textual-inversion  new token embeddings only (on SDXL in both text encoders); the base model is untouched
                       (seed 002)
    pivotal            new token embeddings and a LoRA trained together, the embeddings for the first
                       `embedding_fraction` of the steps (seed 000; the diffusers advanced scripts)
    dreambooth         every UNet weight (and the text encoders' with train_text_encoder), bound to a rare
                       token; seeds 003 and 004 (diffusers' train_dreambooth.py)
    lora-captions      one LoRA over several instances of a class, each photo prompted by its own caption
                       (a caption column, a <photo>.txt, the product title); no identifier token; seed 001's
                       text-to-image LoRA (diffusers' train_text_to_image_lora.py, kohya-ss captions)
    two-stage          a class LoRA on every photo of the class (the class prompt), then each instance's
                       DreamBooth-LoRA on top of it; generation stacks both (seed 001's proposal)
"""

from __future__ import annotations

from dataclasses import dataclass

from catalog_gen.config import METHODS, TrainConfig

LORA_SETTINGS = frozenset({"lora_rank", "lora_alpha", "lora_dropout", "use_dora", "learning_rate",
                           "train_text_encoder", "text_encoder_lr"})
EMBEDDING_SETTINGS = frozenset({"embedding_vectors", "embedding_lr", "embedding_fraction"})
CLASS_STAGE_SETTINGS = frozenset({"class_stage_steps", "class_stage_weight"})


@dataclass(frozen=True)
class Method:
    name: str
    lora: bool
    """Trains a LoRA (UNet, and the text encoder with train_text_encoder)."""
    new_tokens: bool
    """Learns new token embeddings; its token is new to the vocabulary, not a rare existing one."""
    full: bool
    """Fine-tunes the base model's own weights (the UNet, and the text encoder with train_text_encoder)."""
    class_stage: bool
    """Trains on top of a class LoRA trained first on every photo of the class."""
    unused: frozenset[str]
    """Recipe settings that change nothing this method trains (left out of its training fingerprint)."""
    captions: bool = False
    """One LoRA for all the chosen instances of a class, each photo with its own caption instead of the
    instance prompt."""


_ALL = {
    "dreambooth-lora": Method("dreambooth-lora", lora=True, new_tokens=False, full=False, class_stage=False,
                              unused=EMBEDDING_SETTINGS | CLASS_STAGE_SETTINGS),
    "textual-inversion": Method("textual-inversion", lora=False, new_tokens=True, full=False, class_stage=False,
                                unused=LORA_SETTINGS | CLASS_STAGE_SETTINGS | {"embedding_fraction"}),
    "pivotal": Method("pivotal", lora=True, new_tokens=True, full=False, class_stage=False,
                      unused=CLASS_STAGE_SETTINGS),
    "dreambooth": Method("dreambooth", lora=False, new_tokens=False, full=True, class_stage=False,
                         unused=EMBEDDING_SETTINGS | CLASS_STAGE_SETTINGS | {"lora_rank", "lora_alpha", "lora_dropout",
                                                                             "use_dora"}),
    "lora-captions": Method("lora-captions", lora=True, new_tokens=False, full=False, class_stage=False,
                            unused=EMBEDDING_SETTINGS | CLASS_STAGE_SETTINGS, captions=True),
    # The class stage's own settings reach the instance through the class LoRA's hash (in the fingerprint).
    "two-stage": Method("two-stage", lora=True, new_tokens=False, full=False, class_stage=True,
                        unused=EMBEDDING_SETTINGS | {"class_stage_steps"}),
}
assert tuple(_ALL) == METHODS, "config.METHODS and the methods described here must be the same list"


def method_of(config: TrainConfig) -> Method:
    return _ALL[config.method]


def embedding_steps(config: TrainConfig) -> int:
    """Steps during which the new embeddings learn: all of them for textual inversion, the first
    embedding_fraction for pivotal (at least one)."""
    if config.method == "pivotal":
        return max(1, round(config.steps * config.embedding_fraction))
    return config.steps
