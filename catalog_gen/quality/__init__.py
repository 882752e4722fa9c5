"""Stage 4, quality gates and their measures: CLIP / DINO embedders, the FID Inception network,
similarity and distribution metrics, and the gate decisions.
"""
