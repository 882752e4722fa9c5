"""Loading a finished adapter's weights: safetensors only, and only the bytes adapter.json recorded."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors

from catalog_gen.errors import CatalogError
from catalog_gen.storage import sha256_bytes
from catalog_gen.train.adapters import AdapterInfo, adapter_weights
from catalog_gen.train.lora_files import DIFFUSERS_WEIGHTS_NAME

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"


def adapter_with(tmp_path, data: bytes, recorded: str | None) -> AdapterInfo:
    (tmp_path / DIFFUSERS_WEIGHTS_NAME).write_bytes(data)
    return AdapterInfo(tmp_path, {"token": "zwx"} if recorded is None else {"token": "zwx", "weights_sha256": recorded})


def load_adapter_weights(info: AdapterInfo) -> dict:
    """The LoRA tensors the generator's loader hands on (adapter_weights: checked bytes, loaded as a file)."""
    return load_safetensors(adapter_weights(info).lora)


def test_the_recorded_weights_load(tmp_path):
    data = save_safetensors({KEY: torch.ones(2, 3)})
    weights = load_adapter_weights(adapter_with(tmp_path, data, sha256_bytes(data)))
    assert torch.equal(weights[KEY], torch.ones(2, 3))


def test_weights_changed_after_training_are_refused_naming_both_hashes(tmp_path):
    trained = save_safetensors({KEY: torch.ones(2, 3)})
    swapped = save_safetensors({KEY: torch.zeros(2, 3)})
    with pytest.raises(CatalogError) as caught:
        load_adapter_weights(adapter_with(tmp_path, swapped, sha256_bytes(trained)))
    assert sha256_bytes(trained) in str(caught.value) and sha256_bytes(swapped) in str(caught.value)


def test_a_pickle_is_never_unpickled_even_when_its_hash_is_recorded(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the adapter's pickle was executed",))

    data = pickle.dumps(Boom())
    with pytest.raises(CatalogError, match="not a safetensors file"):
        load_adapter_weights(adapter_with(tmp_path, data, sha256_bytes(data)))


def test_an_adapter_json_without_a_weights_hash_is_refused(tmp_path):
    data = save_safetensors({KEY: torch.ones(1)})
    with pytest.raises(CatalogError, match="records no weights_sha256"):
        load_adapter_weights(adapter_with(tmp_path, data, None))


def test_lora_files_are_the_same_bytes_for_the_same_weights(tmp_path):
    """safetensors orders metadata by a hash map's whim: sorted, identical weights and metadata always give
    identical bytes (and so the same sha256, which two-stage's instances are fingerprinted with)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from catalog_gen.storage import sort_safetensors_metadata

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(3)}
    metadata = {f"key_{n}": str(n) for n in range(12)}
    written = []
    for n in range(6):
        path = tmp_path / f"{n}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        written.append(sort_safetensors_metadata(path).read_bytes())
    assert len(set(written)) == 1
    import json
    import struct

    (length,) = struct.unpack("<Q", written[0][:8])
    assert list(json.loads(written[0][8:8 + length])["__metadata__"]) == sorted(metadata)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert handle.metadata() == metadata
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
