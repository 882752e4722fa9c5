"""The toy world: a small pretrained jewelry Stable Diffusion and CLIP / DINO-style embedders.

Everything here is trained by the project on the procedural drawings of catalog_gen.catalog.sample_drawings,
on a CPU, so that fine-tuning, the quality gates and the evaluation can be seen to work on a machine
without a model hub. It is not Stable Diffusion: see MODEL_CARD.md beside this file.

    world.py     what the toy world is: which instances exist, which are held out, the captions
    pretrain.py  `python -m catalog_gen.toy.pretrain`: trains every network from the seed
    shipped.py   the committed weights: their hash check and the presets built from them
"""
