"""The finished adapter folder: WORKDIR/adapters/<class>/<instance>/

    pytorch_lora_weights.safetensors   the LoRA, diffusers format (StableDiffusionPipeline.load_lora_weights);
                                       dreambooth-lora and pivotal
    <class>_<instance>.kohya.safetensors  the LoRA, kohya format for AUTOMATIC1111 / ComfyUI; pivotal's
                                       carries its embeddings too (A1111's bundle_emb keys); not for DoRA
                                       (adapter.json's notes say why; lora_files.py explains)
    learned_embeds.safetensors         textual-inversion: {token: (vectors, dim)}, the file diffusers'
                                       train_textual_inversion.py writes; load_textual_inversion and A1111
                                       (which names the embedding after the file) read it. SDXL:
                                       {"clip_l": ..., "clip_g": ...}, the SDXL embedding A1111 and ComfyUI read
    <class>_<instance>_emb.safetensors pivotal: {"clip_l": (vectors, dim)} (SDXL: and "clip_g"), as the
                                       diffusers advanced scripts write it (load_textual_inversion(
                                       state_dict["clip_l"], token=[...]); clip_g into text_encoder_2)
    unet/, text_encoder/               dreambooth: the fine-tuned components as diffusers model folders
                                       (config.json + safetensors; SDXL with train_text_encoder: text_encoder_2/
                                       too); the rest is the base model's
                                       (UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    <class>_<instance>.safetensors     dreambooth: the whole pipeline (fine-tuned parts + the base's VAE, and its
                                       text encoders if not trained) as one fp16 checkpoint in the original
                                       CompVis layout (SDXL: SGM's), for AUTOMATIC1111 / ComfyUI (single_file.py);
                                       none on SD 2.x (adapter.json's notes say why)
    (lora-captions: each instance's folder holds the LoRA files of the caption LoRA its class's instances
    share, WORKDIR/caption_loras/<class>/<name>/, and its own adapter.json naming it)
    adapter.json                       method, resolved recipe, token(s), prompts, base model and hashes,
                                       library versions, photos with hashes, loss curve, timings

The folder is assembled under a temporary name and renamed into place, and adapter.json
is written last inside it, so a folder that exists is always complete.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog_gen.errors import CatalogError
from catalog_gen.layout import ADAPTER_JSON, checkpoint_folder, workdir_of_adapter
from catalog_gen.train.embeddings import FILE_KEYS, encoder_pairs
from catalog_gen.train.lora_files import (DIFFUSERS_WEIGHTS_NAME, is_dora, save_diffusers_lora, save_kohya_lora,
                                          text_model_names)
from catalog_gen.storage import atomic_directory, atomic_write_json, sha256_bytes, sha256_file

TEXTUAL_INVERSION_NAME = "learned_embeds.safetensors"
STACKED_ADAPTER = "class_stage"
"""The adapter name a two-stage class LoRA is loaded under (training.STACKED is the same name)."""
FULL_PARTS = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
              "text_encoder_2": "model.safetensors"}
"""Components full DreamBooth writes, with the weight-file names diffusers and transformers look for."""

@dataclass(frozen=True)
class AdapterInfo:
    folder: Path
    record: dict[str, Any]

    @property
    def has_lora(self) -> bool:
        files = self.record.get("files")
        return files is None or files.get("diffusers") is not None  # no "files": a bare LoRA record

    @property
    def diffusers_file(self) -> Path:
        return self.folder / DIFFUSERS_WEIGHTS_NAME

    @property
    def kohya_file(self) -> Path | None:
        name = self.record.get("files", {}).get("kohya")
        return self.folder / name if name else None

    @property
    def embeddings_file(self) -> Path | None:
        name = self.record.get("files", {}).get("embeddings")
        return self.folder / name if name else None

    @property
    def single_file(self) -> Path | None:
        """dreambooth: the whole-pipeline checkpoint for A1111 / ComfyUI (None in adapters written before it)."""
        name = self.record.get("files", {}).get("single_file")
        return self.folder / name if name else None

    @property
    def token(self) -> str:
        return self.record["token"]

    @property
    def tokens(self) -> list[str]:
        """Every token the prompt's `token` stands for: itself, or a multi-vector embedding's token, token_1..."""
        recorded = self.record.get("tokens")
        return list(recorded) if recorded is not None else [self.token]  # [] : no token (lora-captions)

    @property
    def class_stage(self) -> "AdapterInfo | None":
        """two-stage: the class LoRA this adapter was trained on top of, checked to be the very one."""
        stage = self.record.get("class_stage")
        if stage is None:
            return None
        folder = workdir_of_adapter(self.folder) / stage["folder"]
        key = f"{self.record['class']}/{self.record['instance']}"
        if not (folder / ADAPTER_JSON).is_file():
            raise CatalogError(f"adapter {key} is two-stage, but its class stage {folder} is missing; run catalog "
                               f"train --class {self.record['class']} --method two-stage")
        info = read_adapter(folder)
        if info.record.get("weights_sha256") != stage["weights_sha256"]:
            raise CatalogError(f"adapter {key} was trained on top of another class stage than the one in {folder} "
                               f"(retrained since); retrain {key} with --method two-stage")
        return info

    @property
    def full_parts(self) -> list[str]:
        """The base model's components this adapter replaces (method dreambooth): "unet", "text_encoder"."""
        return [part for part in FULL_PARTS if self.record.get("files", {}).get(part)]

    @property
    def weights_hash(self) -> str:
        """One hash naming the trained weights (the LoRA file's, the UNet's or the embeddings'), for PNG metadata."""
        return (self.record.get("weights_sha256") or self.record.get("unet_sha256")
                or self.record["embeddings_sha256"])

    @property
    def checkpoint_dir(self) -> Path:
        """Where the checkpoints of this adapter's training are: its own instance's folder, or for an instance
        of a caption LoRA the shared LoRA's (recorded in `checkpoints_folder`)."""
        workdir = workdir_of_adapter(self.folder)
        shared = self.record.get("checkpoints_folder")
        return workdir / shared if shared else checkpoint_folder(workdir, self.record["class"], self.record["instance"])

    @property
    def photo_paths(self) -> list[Path]:
        """The normalised training photos (recorded relative to the workdir that holds the adapter)."""
        workdir = workdir_of_adapter(self.folder)
        return [workdir / entry["file"] for entry in self.record["photos"]]


def kohya_file_name(class_key: str, instance_key: str) -> str:
    # A1111 names a LoRA after its file: <lora:hoops_beaded:1>.
    return f"{class_key}_{instance_key}.kohya.safetensors"


def single_file_name(class_key: str, instance_key: str) -> str:
    # A1111 and ComfyUI list a checkpoint under its file name: hoops_beaded in the model menu.
    return f"{class_key}_{instance_key}.safetensors"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("catalog-gen", "torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "prodigyopt",
                 "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def embeddings_file_name(method: str, class_key: str, instance_key: str) -> str:
    return TEXTUAL_INVERSION_NAME if method == "textual-inversion" else f"{class_key}_{instance_key}_emb.safetensors"


def embeddings_file_tensors(method: str, token: str, embeddings) -> dict:
    """The embeddings file's tensors: SD 1.x/2.x textual inversion {token: vectors} as diffusers'
    train_textual_inversion.py writes it; otherwise one key per text encoder, clip_l (and SDXL's clip_g)."""
    if method == "textual-inversion" and len(embeddings) == 1:
        return {token: embeddings[0].contiguous()}
    return {key: vectors.contiguous() for key, vectors in zip(FILE_KEYS, embeddings)}


def write_adapter(folder: Path, fit_result, record: dict[str, Any], class_key: str, instance_key: str) -> AdapterInfo:
    """Write the method's weight files and adapter.json as one atomic folder. The LoRA files come from the
    fit's LoRA configs (rank and alpha have one source: the config the LoRA was trained with)."""
    from safetensors.torch import save_file

    method = record["method"]
    import shutil

    files: dict[str, str | None] = {"diffusers": None, "kohya": None, "embeddings": None}
    hashes: dict[str, str] = {}
    notes: list[str] = []
    unet_config, text_config = fit_result.unet_lora_config, fit_result.text_encoder_lora_config
    with atomic_directory(folder) as staging:
        for part, state in (fit_result.full_weights or {}).items():
            # A diffusers model folder: the base model's config beside the trained weights.
            (staging / part).mkdir()
            shutil.copyfile(Path(record["base_model"]["path"]) / part / "config.json", staging / part / "config.json")
            files[part] = f"{part}/{FULL_PARTS[part]}"
            if part != "unet":  # CLIP's standard names, which transformers 4 and ComfyUI read (text_model_names)
                state = text_model_names(state)
            save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(staging / files[part]),
                      metadata={"format": "pt"})
            hashes[f"{part}_sha256"] = sha256_file(staging / files[part])
        # The original single-file layouts are SD 1.x's and SDXL's. SD 2.x's keeps OpenCLIP-H's last layer, which
        # diffusers' SD 2.x text encoder does not have, so none can be written from it.
        family = record["base_model"].get("family", "sd1")
        if fit_result.full_weights and family in ("sd1", "sdxl"):
            from catalog_gen.train.single_file import write_single_file

            files["single_file"] = single_file_name(class_key, instance_key)
            # The trained parts as fit() left them; the VAE (and an untrained text encoder) from the base model.
            metadata = {"catalog_gen_token": record["token"], "catalog_gen_instance_prompt": record["instance_prompt"]}
            write_single_file(staging / files["single_file"], Path(record["base_model"]["path"]),
                              fit_result.full_weights, metadata, sdxl=family == "sdxl")
            hashes["single_file_sha256"] = sha256_file(staging / files["single_file"])
        elif fit_result.full_weights:
            notes.append(f"no single-file checkpoint: catalog-gen writes SD 1.x's and SDXL's, this base model is "
                         f"{family} (its original text encoder has a layer its diffusers folder lacks); load the "
                         f"diffusers folders ({', '.join(fit_result.full_weights)}) over the base model")
        embeddings = fit_result.embeddings
        if embeddings is not None:
            files["embeddings"] = embeddings_file_name(method, class_key, instance_key)
            save_file(embeddings_file_tensors(method, record["token"], embeddings), str(staging / files["embeddings"]),
                      metadata={"tokens": json.dumps(list(fit_result.tokens))})
            hashes["embeddings_sha256"] = sha256_file(staging / files["embeddings"])
        if fit_result.unet_layers is not None:
            diffusers_file = save_diffusers_lora(staging, fit_result.unet_layers, fit_result.text_encoder_layers,
                                                 unet_config, text_config, fit_result.text_encoder_2_layers,
                                                 text_config if fit_result.text_encoder_2_layers else None)
            files["diffusers"], hashes["weights_sha256"] = DIFFUSERS_WEIGHTS_NAME, sha256_file(diffusers_file)
        if fit_result.unet_layers is not None and is_dora(unet_config):
            notes.append("no kohya file: A1111 and ComfyUI apply a DoRA magnitude (dora_scale) otherwise than "
                         "peft trained it; load the diffusers file (see catalog_gen/train/lora_files.py)")
        elif fit_result.unet_layers is not None:
            kohya_name = kohya_file_name(class_key, instance_key)
            alpha = float(unet_config["lora_alpha"])
            text_alpha = float(text_config["lora_alpha"]) if text_config else None
            save_kohya_lora(staging / kohya_name, diffusers_file, alpha, text_alpha, metadata={
                "ss_network_module": "networks.lora",
                "ss_network_dim": unet_config["r"],
                "ss_network_alpha": alpha,
                "ss_output_name": f"{class_key}_{instance_key}",
                # The prompts trained on, as kohya-ss counts its captions (lora-captions: one per photo).
                "ss_tag_frequency": json.dumps(dict(Counter(p.get("caption", record["instance_prompt"])
                                                            for p in record["photos"]))),
                "catalog_gen_token": record["token"],
            }, bundled_embeddings=({record["token"]: dict(zip(FILE_KEYS, embeddings))} if embeddings is not None
                                   else None),
               sgm_unet_config=_sdxl_unet_config(record))
            files["kohya"], hashes["kohya_sha256"] = kohya_name, sha256_file(staging / kohya_name)
        full = {
            **record,
            "lora": {"unet": unet_config, "text_encoder": text_config,
                     **({"text_encoder_2": text_config} if fit_result.text_encoder_2_layers else {})},
            "files": files,
            **hashes,
            **({"notes": notes} if notes else {}),
        }
        atomic_write_json(staging / ADAPTER_JSON, full)
    return AdapterInfo(folder, full)


def write_shared_lora_copy(folder: Path, shared: AdapterInfo, record: dict[str, Any]) -> AdapterInfo:
    """An instance's adapter folder for a LoRA several instances share (lora-captions): the shared LoRA's files
    (hard links where the file system allows, else copies; neither is ever written in place) beside the
    instance's own adapter.json, so every reader of an instance's adapter takes it unchanged."""
    import os
    import shutil

    files = dict(shared.record["files"])
    has_kohya = files.get("kohya") is not None  # a DoRA LoRA has none (lora_files.py says why)
    with atomic_directory(folder) as staging:
        copies = [(shared.diffusers_file, DIFFUSERS_WEIGHTS_NAME)]
        if has_kohya:
            files["kohya"] = kohya_file_name(record["class"], record["instance"])
            copies.append((shared.kohya_file, files["kohya"]))
        for source, name in copies:
            try:
                os.link(source, staging / name)
            except OSError:
                shutil.copyfile(source, staging / name)
        full = {**record, "lora": shared.record["lora"], "files": files,
                **{key: shared.record[key] for key in ("weights_sha256", "kohya_sha256") if key in shared.record}}
        atomic_write_json(staging / ADAPTER_JSON, full)
    return AdapterInfo(folder, full)


def _sdxl_unet_config(record: dict[str, Any]) -> dict | None:
    """An SDXL base's UNet config (its kohya file names the UNet's modules as sd-scripts' SDXL files do);
    None for SD 1.x and 2.x."""
    if record["base_model"].get("family") != "sdxl":
        return None
    return json.loads((Path(record["base_model"]["path"]) / "unet" / "config.json").read_text())


def read_adapter(folder: Path) -> AdapterInfo:
    meta = Path(folder) / ADAPTER_JSON
    if not meta.is_file():
        raise CatalogError(f"no trained adapter in {folder} (adapter.json missing); run `catalog train` first")
    try:
        record = json.loads(meta.read_text())
    except ValueError as error:
        raise CatalogError(f"{meta}: not valid JSON ({error})") from error
    info = AdapterInfo(Path(folder), record)
    if info.has_lora and not info.diffusers_file.is_file():
        raise CatalogError(f"adapter {folder}: {DIFFUSERS_WEIGHTS_NAME} is missing")
    if info.embeddings_file is not None and not info.embeddings_file.is_file():
        raise CatalogError(f"adapter {folder}: {info.embeddings_file.name} is missing")
    for part in info.full_parts:
        if not (info.folder / record["files"][part]).is_file():
            raise CatalogError(f"adapter {folder}: {record['files'][part]} is missing")
    if info.single_file is not None and not info.single_file.is_file():
        raise CatalogError(f"adapter {folder}: {info.single_file.name} is missing")
    return info


def load_embeddings(info: AdapterInfo) -> tuple:
    """The adapter's learned token embeddings, one (len(info.tokens), dim) tensor per text encoder of its base
    model, checked like every weights file."""
    tensors = _checked_safetensors(info, info.embeddings_file, "embeddings_sha256")
    name = info.embeddings_file.name
    if info.record["base_model"].get("family") == "sdxl":
        if sorted(tensors) != sorted(FILE_KEYS):
            raise CatalogError(f"adapter {info.folder}: {name} holds {sorted(tensors)}, expected an SDXL "
                               f"embedding's {list(FILE_KEYS)}")
        found = tuple(tensors[key] for key in FILE_KEYS)
    elif len(tensors) != 1:
        raise CatalogError(f"adapter {info.folder}: {name} holds {len(tensors)} tensors, expected one embedding")
    else:
        found = tuple(tensors.values())
    for vectors in found:
        if vectors.ndim != 2 or len(vectors) != len(info.tokens):
            raise CatalogError(f"adapter {info.folder}: {name} has shape {tuple(vectors.shape)}, "
                               f"expected {len(info.tokens)} vectors for tokens {info.tokens}")
    return found


def _checked_safetensors(info: AdapterInfo, path: Path, hash_key: str) -> dict:
    """Read as safetensors only (never a pickle, whatever the file holds), and only if the bytes are the ones
    adapter.json recorded: a weights file swapped or damaged after training is refused. The bytes hashed
    are the bytes parsed, so nothing can change between the check and the load."""
    return _parsed(info, path, _hash_checked(info, path, hash_key))


def _checked_bytes(info: AdapterInfo, path: Path, hash_key: str) -> bytes:
    """A weights file's bytes, only if they hash to what adapter.json recorded and parse as safetensors (for
    loaders that read a file: the LoRA's, whose metadata holds its config)."""
    data = _hash_checked(info, path, hash_key)
    _parsed(info, path, data)
    return data


def _hash_checked(info: AdapterInfo, path: Path, hash_key: str) -> bytes:
    data = path.read_bytes()
    recorded, found = info.record.get(hash_key), sha256_bytes(data)
    if recorded is None:
        raise CatalogError(f"adapter {info.folder}: {ADAPTER_JSON} records no {hash_key}; retrain it")
    if found != recorded:
        raise CatalogError(f"adapter {info.folder}: {path.name} has sha256 {found}, but "
                           f"{ADAPTER_JSON} records {recorded}; the file changed after training")
    return data


def _parsed(info: AdapterInfo, path: Path, data: bytes) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(data)
    except SafetensorError as error:
        raise CatalogError(f"adapter {info.folder}: {path.name} is not a safetensors file ({error})") from error


@dataclass(frozen=True)
class AdapterWeights:
    """What goes onto a pipeline for one instance: a LoRA, token embeddings, fine-tuned components, a stacked
    class LoRA, as its method trained."""

    lora: bytes | Path | None
    """A diffusers-format LoRA file, or its checked bytes. Never a bare state dict: the file's metadata holds
    the LoRA config, without which diffusers assumes alpha = rank and scales a LoRA trained otherwise wrong."""
    embeddings: tuple | None = None
    """One (len(tokens), dim) tensor per text encoder (SDXL: CLIP-L's, then OpenCLIP-bigG's), or None."""
    tokens: tuple[str, ...] = ()
    full: dict | None = None
    """method dreambooth: component name ("unet", "text_encoder", "text_encoder_2") -> its fine-tuned state dict."""
    stacked: tuple[bytes | Path, float] | None = None
    """two-stage: the class LoRA (file or checked bytes) under this one, and its weight."""


def adapter_weights(info: AdapterInfo) -> AdapterWeights:
    """A finished adapter's weights, every file hash-checked."""
    full = {part: _checked_safetensors(info, info.folder / info.record["files"][part], f"{part}_sha256")
            for part in info.full_parts}
    stage = info.class_stage
    stacked = ((_checked_bytes(stage, stage.diffusers_file, "weights_sha256"), float(info.record["class_stage"]["weight"]))
               if stage is not None else None)
    return AdapterWeights(_checked_bytes(info, info.diffusers_file, "weights_sha256") if info.has_lora else None,
                          load_embeddings(info) if info.embeddings_file is not None else None, tuple(info.tokens),
                          full or None, stacked)


@dataclass
class Attached:
    """What attach() changed, so detach() can put back the very same objects."""

    lora: bool
    replaced: dict | None = None
    """Component name -> a copy of the base weights a full fine-tune's replaced."""
    text_encoders: list = field(default_factory=list)
    """Per text encoder given new tokens: (tokenizer attribute, text encoder attribute, the original tokenizer,
    the original embedding module, the original vocab_size)."""


def attach(pipeline, weights: AdapterWeights, adapter_name: str) -> Attached:
    """Put an instance's weights on a diffusers pipeline with diffusers' own loaders (load_lora_weights,
    load_textual_inversion). On failure whatever was put on is taken off again."""
    attached = Attached(lora=False)
    try:
        if weights.full:
            attached.replaced = {}
            for part, state in weights.full.items():
                module = getattr(pipeline, part)
                # The base weights wait in CPU memory, not beside the fine-tuned ones on the GPU.
                attached.replaced[part] = {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
                # Copied into the pipeline's own dtype and device. Tensors `state` lacks (a checkpoint holds
                # parameters, not buffers) keep the base's; a name the module does not have is an error.
                module.load_state_dict({**attached.replaced[part], **_module_names(state, attached.replaced[part])})
        if weights.lora is not None:
            _load_lora_file(pipeline, weights.lora, adapter_name)
            attached.lora = True
        if weights.stacked is not None:  # both active, as in training: the instance's over the class's
            import warnings

            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                _load_lora_file(pipeline, weights.stacked[0], STACKED_ADAPTER)
            attached.lora = True
            pipeline.set_adapters([adapter_name, STACKED_ADAPTER], adapter_weights=[1.0, weights.stacked[1]])
        if weights.embeddings is not None:
            import copy

            pairs = encoder_pairs(pipeline)
            if len(pairs) != len(weights.embeddings):
                raise CatalogError(f"adapter {adapter_name}: its embeddings are for {len(weights.embeddings)} text "
                                   f"encoder(s), the pipeline has {len(pairs)}")
            for (tokenizer_name, encoder_name), vectors in zip(pairs, weights.embeddings):
                # load_textual_inversion grows the tokenizer and swaps in a larger embedding module. It is given
                # a copy of the tokenizer, and the original embedding module is kept, so detach restores both
                # exactly (diffusers' unload_textual_inversion rebuilds them instead).
                text_encoder = getattr(pipeline, encoder_name)
                attached.text_encoders.append((tokenizer_name, encoder_name, getattr(pipeline, tokenizer_name),
                                               text_encoder.get_input_embeddings(), text_encoder.config.vocab_size))
                setattr(pipeline, tokenizer_name, copy.deepcopy(getattr(pipeline, tokenizer_name)))
                pipeline.load_textual_inversion(vectors if len(weights.tokens) > 1 else vectors[0],
                                                token=list(weights.tokens) if len(weights.tokens) > 1 else weights.tokens[0],
                                                tokenizer=getattr(pipeline, tokenizer_name), text_encoder=text_encoder)
    except Exception:
        detach(pipeline, attached)
        raise
    return attached


def _module_names(state: dict, module_state: dict) -> dict:
    """A fine-tuned text encoder's tensors under the module's own names: the files keep CLIP's standard
    `text_model.` level, which transformers 5's CLIPTextModel does not have."""
    return {(name if name in module_state or name.removeprefix("text_model.") not in module_state
             else name.removeprefix("text_model.")): tensor for name, tensor in state.items()}


def _load_lora_file(pipeline, lora: bytes | Path, adapter_name: str) -> None:
    import tempfile

    if isinstance(lora, Path):
        pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=adapter_name)
        return
    with tempfile.TemporaryDirectory(prefix="catalog-gen-lora-") as scratch:  # private to this process
        (Path(scratch) / DIFFUSERS_WEIGHTS_NAME).write_bytes(lora)
        pipeline.load_lora_weights(scratch, weight_name=DIFFUSERS_WEIGHTS_NAME, adapter_name=adapter_name)


def detach(pipeline, attached: Attached) -> None:
    """Take attach()'s weights off: the pipeline is the base model again, module for module."""
    if attached.lora:
        pipeline.unload_lora_weights()
    for part, state in (attached.replaced or {}).items():
        getattr(pipeline, part).load_state_dict(state)
    for tokenizer_name, encoder_name, tokenizer, embedding, vocab_size in attached.text_encoders:
        text_encoder = getattr(pipeline, encoder_name)
        text_encoder.set_input_embeddings(embedding)
        text_encoder.config.vocab_size = vocab_size
        setattr(pipeline, tokenizer_name, tokenizer)


def finished_adapter(folder: Path, fingerprint: str, steps: int) -> AdapterInfo | None:
    """The adapter already trained with these exact settings, if there is one (reruns skip it)."""
    try:
        info = read_adapter(folder)
    except CatalogError:
        return None
    if info.record.get("fingerprint") == fingerprint and info.record.get("steps") == steps:
        return info
    return None
