"""Shared fixtures: one preset cache and one sample catalogue per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline by construction, like the CLI: a hub lookup must fail, never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def preset_cache(tmp_path_factory) -> Path:
    """Built-in presets are materialised once per session (CATALOG_GEN_CACHE may point elsewhere)."""
    if "CATALOG_GEN_CACHE" not in os.environ:
        os.environ["CATALOG_GEN_CACHE"] = str(tmp_path_factory.mktemp("catalog-gen-cache"))
    return Path(os.environ["CATALOG_GEN_CACHE"])


@pytest.fixture(scope="session")
def tiny_model(preset_cache):
    from catalog_gen.models.loading import resolve_base_model

    return resolve_base_model("tiny")


@pytest.fixture(scope="session")
def sample_catalogue(tmp_path_factory):
    from catalog_gen.catalog.sample_data import write_sample_catalogue

    return write_sample_catalogue(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The offline CLIP-format BPE tokenizer files, written once per session."""
    from catalog_gen.models import bpe

    return bpe.write_clip_tokenizer(tmp_path_factory.mktemp("clip-bpe-tiny"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The tokenizer_dir files loaded as transformers' (slow) CLIPTokenizer."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir)


# ---------------------------------------------------------------- fault injection
# A crash at a chosen point, raised from the callbacks the library already offers (progress reports),
# so the library carries no test-only parameters.

class Crash(InterruptedError):
    """What the fault-injection helpers raise, as a kill -9 would stop the run at that point."""


def crash_in_training_step(step: int):
    """A train_class `progress` factory that kills the run in `step` (1-based): the step is computed but
    neither reported nor checkpointed, so what survives is the checkpoints before it."""
    def reporter_for(job):
        def report(done: int, loss: float, rate: float) -> None:
            if done >= step:
                raise Crash(f"{job.key}: killed in step {done}")
        return report
    return reporter_for


def crash_after_skus(count: int):
    """A generate `progress` callback that stops the run once `count` SKUs are finished."""
    def report(summary) -> None:
        if summary.skus_done >= count:
            raise Crash(f"stopped after {summary.skus_done} SKUs")
    return report


# ---------------------------------------------------------------- the fast loop
# `pytest -m "not slow"` is the inner loop (pure functions, parsing, validation, file formats). A test is
# slow when it trains, generates, serves, drives a browser, or needs a model, a tokenizer or the sample
# catalogue built for it; those are marked here, by module or by the fixtures they ask for, so a new test
# is classified by what it uses rather than by someone remembering a decorator.

SLOW_MODULES = {"test_generation", "test_generation_batching", "test_training", "test_evaluation", "test_inception",
                "test_review_browser", "test_kill_resume", "test_multiprocess", "test_toy_learning"}
SLOW_FIXTURES = {"tiny_model", "sample_catalogue", "catalogue", "toolkit", "embedders", "onnx_embedders",
                 "tokenizer", "tokenizer_dir", "ring_photos", "run_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
