"""Stage 2, per-instance fine-tuning: preparing jobs (workflow), the DreamBooth-LoRA loop (training),
checkpoints, and the finished adapter folder with its diffusers and kohya LoRA files.
"""
