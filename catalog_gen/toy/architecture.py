"""The shapes of the toy world's networks: Stable Diffusion's own classes, made small.

One function per network, each returning a freshly initialised model from a fixed seed. The
sizes were chosen so that all four pretrain on 2 CPU cores within the budget of pretrain.py.
"""

from __future__ import annotations

import torch

from catalog_gen.seeds import isolated_rng as _seeded  # initialise from a fixed seed, generator left as found
from catalog_gen.toy.world import RESOLUTION


LATENT_CHANNELS = 4
VAE_LEVELS = (32, 64, 64)
"""Three VAE levels: 64 px images -> 16 x 16 x 4 latents (SD: 512 px -> 64 x 64 x 4, 8x; here 4x,
because at 8x a 64 px ring's gem would be a single latent cell)."""
TEXT_WIDTH = 128
UNET = dict(
    sample_size=RESOLUTION // 4,
    layers_per_block=1,
    block_out_channels=(32, 64, 96),
    # Attention only at the two coarser levels (8 x 8 and 4 x 4): at 16 x 16 it costs most and adds least.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=16,
)
EMBEDDER_IMAGE = RESOLUTION
EMBEDDER_PATCH = 8
EMBEDDER_TOWER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
CLIP_PROJECTION = 128


def make_vae():
    from diffusers import AutoencoderKL

    with _seeded(1):
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * len(VAE_LEVELS),
                         up_block_types=("UpDecoderBlock2D",) * len(VAE_LEVELS),
                         block_out_channels=VAE_LEVELS, layers_per_block=1, norm_num_groups=16,
                         sample_size=RESOLUTION,
                         # No attention in the middle block: the VAE stays fully convolutional, so it
                         # trains on 32 px crops at a quarter of the cost and runs on whole images.
                         mid_block_add_attention=False)


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
                            hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 2, num_hidden_layers=3,
                            num_attention_heads=4, projection_dim=TEXT_WIDTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _seeded(0):
        return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    with _seeded(2):
        return UNet2DConditionModel(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, **UNET)


def make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, hidden_size=128, intermediate_size=256,
                num_hidden_layers=3, num_attention_heads=4)
    vision = dict(image_size=EMBEDDER_IMAGE, patch_size=EMBEDDER_PATCH, hidden_act="quick_gelu", **EMBEDDER_TOWER)
    with _seeded(3):
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_PROJECTION))


def make_dino():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=EMBEDDER_IMAGE, patch_size=EMBEDDER_PATCH, hidden_act="gelu", qkv_bias=True,
                       layer_norm_eps=1e-6, **EMBEDDER_TOWER)
    with _seeded(4):
        return ViTModel(config, add_pooling_layer=False)


def make_dino_head():
    """The projection head DINO's self-supervised loss sees during pretraining (not shipped).

    BatchNorm in it (as SimCLR v2 / BYOL heads have): at initialisation the CLS token barely differs
    between images, and without it the contrastive loss sat at chance (log 255) for 160 steps with
    gradients of 1e-4; normalising across the batch makes the differences count. Seeded like the towers
    (the first 400 shipped steps were trained with it drawn from the process's generator instead).
    """
    width = EMBEDDER_TOWER["hidden_size"]
    with _seeded(5):
        return torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU(),
                                   torch.nn.Linear(256, 64))
