"""Base models: resolving and loading (local folders, the Hugging Face cache, built-in presets),
the presets built from code, the project tokenizer, and sampling.
"""
