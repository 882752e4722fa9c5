"""Stage 6, evaluation: KID / FID / CLIP over checkpoints (evaluation) and grids of settings (sweep).
"""
