"""Does ComfyUI apply our kohya LoRA file as the diffusers file describes it? Checked with ComfyUI's own code.

    python -m bench.comfyui_lora_check --comfyui ~/ComfyUI --adapter WORK/adapters/ring/band
    python -m bench.comfyui_lora_check --comfyui ~/ComfyUI --checkpoint model.safetensors --base FOLDER

ComfyUI is not a dependency (nor installable from PyPI): point --comfyui at a checkout whose requirements
are installed. On a machine with no torchvision for its torch (ours: torch 2.13 CPU), --stub-torchvision
puts an empty stand-in module in its place; ComfyUI imports it at module level for model families this
check never builds.

What runs, all in ComfyUI's code:
    1. comfy.diffusers_load.load_diffusers(base model folder): ComfyUI's UNet (SGM layout, the config it
       detects) and text encoders, from the adapter's base model.
    2. comfy.sd.load_lora_for_models(unet, clip, <kohya file>, 1.0, 1.0): its key map, its LoRA parser; every
       key it leaves unused is counted (it logs "lora key not loaded").
    3. comfy.lora.calculate_weight(patches, zeros, key): the weight change ComfyUI adds to each module.
Then, for each module of our diffusers file: its change as the file describes it, lora_alpha / r * B @ A
(the scale diffusers' load_lora_weights reads from the file's metadata), placed on ComfyUI's module by
ComfyUI's own diffusers-to-SGM map (comfy.utils.unet_to_diffusers) and its clip_l / clip_g names.

Printed: the kohya file's tensor count, keys ComfyUI did not load, modules patched against modules in the
diffusers file, and the largest difference between the two weight changes relative to the largest change.
An adapter with learned tokens (textual inversion, pivotal) also has its embeddings file, and the kohya
file's bundled copy, read by comfy.sd1_clip.load_embed for each text encoder (clip_l, SDXL's clip_g) and
compared with the vectors trained. The base model must be one ComfyUI detects (sd15-shape and sdxl-shape
are; the tiny presets are not).

--checkpoint: a single-file checkpoint (train/single_file.py) written from the diffusers folder --base, loaded
by ComfyUI's checkpoint loader (comfy.sd.load_checkpoint_guess_config, what its "Load Checkpoint" node calls)
in fp16. Printed: the model type it detects, every key it reports missing, unexpected or left over, and how
many of its UNet and text-encoder tensors equal the folder's (placed by ComfyUI's own diffusers-to-SGM map;
its text encoders under transformers' names, which ComfyUI converts OpenCLIP's layout to). Exit status 0
when everything matches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def install_torchvision_stub() -> None:
    import importlib.abc
    import importlib.machinery
    import types

    class Stub(types.ModuleType):
        __path__: list = []

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub(f"{self.__name__}.{name}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__} is a stand-in (--stub-torchvision)")

        def __mro_entries__(self, bases):
            return (object,)

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return Stub(spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def lora_deltas(diffusers_file: Path) -> dict[str, "torch.Tensor"]:
    """module name (diffusers / transformers naming, with its unet. / text_encoder. prefix) -> alpha / r * B @ A."""
    from safetensors import safe_open

    with safe_open(str(diffusers_file), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    # diffusers' writer keeps each part's LoRA config in one JSON entry, its keys prefixed "unet.", "text_encoder."
    packed = json.loads(metadata["lora_adapter_metadata"])
    configs = {part: {key[len(part) + 1:]: value for key, value in packed.items() if key.startswith(part + ".")}
               for part in ("unet", "text_encoder", "text_encoder_2")}
    deltas = {}
    for key, down in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        config = configs[module.split(".")[0]]
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        deltas[module] = (config["lora_alpha"] / config["r"]) * (up.float() @ down.float())
    return deltas


def comfy_key(module: str, unet_map: dict[str, str]) -> str:
    part, rest = module.split(".", 1)
    if part == "unet":
        return "diffusion_model." + unet_map[rest + ".weight"]
    encoder = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}[part]
    return f"{encoder}.transformer.{rest}.weight"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    parser.add_argument("--adapter", type=Path, help="an adapter folder (a LoRA's kohya file and/or an embeddings file)")
    parser.add_argument("--checkpoint", type=Path, help="a single-file checkpoint to load with ComfyUI's loader")
    parser.add_argument("--base", type=Path, help="with --checkpoint: the diffusers folder whose weights it holds")
    parser.add_argument("--stub-torchvision", action="store_true",
                        help="an empty stand-in for torchvision, for a torch that has none (ComfyUI imports it)")
    args = parser.parse_args(argv)
    if (args.adapter is None) == (args.checkpoint is None) or (args.checkpoint is not None and args.base is None):
        parser.error("give --adapter, or --checkpoint with --base")
    if not (args.comfyui / "comfy" / "lora.py").is_file():
        parser.error(f"--comfyui {args.comfyui}: no comfy/lora.py there; point it at a ComfyUI checkout")
    if args.adapter is not None and not (args.adapter / "adapter.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter.json there; point it at WORKDIR/adapters/<class>/<instance>")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.stub_torchvision:
        # diffusers and transformers first: they must see that there is no torchvision, not the stand-in.
        import diffusers.loaders.single_file_utils  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

        install_torchvision_stub()
    sys.path.insert(0, str(args.comfyui.resolve()))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    if args.checkpoint is not None:
        return 0 if check_checkpoint(args.checkpoint, args.base) else 1
    record = json.loads((args.adapter / "adapter.json").read_text())
    files = record["files"]

    print(f"adapter            {args.adapter} (method {record['method']}, base model "
          f"{record['base_model'].get('spec') or record['base_model']['path']}, family {record['base_model'].get('family')})")
    ok = True
    if files.get("kohya"):
        ok &= check_lora(args, record)
    if files.get("embeddings"):
        ok &= check_embeddings(args, record)
    return 0 if ok else 1


def check_lora(args, record: dict) -> bool:
    import comfy.diffusers_load
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import torch

    kohya_file, diffusers_file = args.adapter / record["files"]["kohya"], args.adapter / record["files"]["diffusers"]
    unused: list[str] = []

    class Unused(logging.Handler):
        def emit(self, entry):
            message = entry.getMessage()
            if message.startswith(("lora key not loaded", "NOT LOADED")):
                unused.append(message.split(": ", 1)[-1])

    logging.getLogger().addHandler(Unused())
    # 1-2. ComfyUI loads the base model from its diffusers folder and our kohya file onto it.
    unet, clip, _ = comfy.diffusers_load.load_diffusers(record["base_model"]["path"], output_vae=False)
    kohya = comfy.utils.load_torch_file(str(kohya_file), safe_load=True)
    unet, clip = comfy.sd.load_lora_for_models(unet, clip, kohya, 1.0, 1.0)
    patches = {**unet.patches, **clip.patcher.patches}
    weights = {**unet.model.state_dict(), **clip.cond_stage_model.state_dict()}
    # A pivotal file's embeddings are no LoRA weights: ComfyUI reads them as an embedding (check_embeddings).
    bundled = [key for key in unused if key.startswith("bundle_emb.")]
    unused = [key for key in unused if not key.startswith("bundle_emb.")]

    # 3. Its weight change per module against the diffusers file's.
    unet_map = comfy.utils.unet_to_diffusers(unet.model.model_config.unet_config)
    ours = {comfy_key(module, unet_map): delta for module, delta in lora_deltas(diffusers_file).items()}
    worst, largest, missing = 0.0, 0.0, sorted(set(ours) - set(patches))
    for key, delta in ours.items():
        if key not in patches:
            continue
        theirs = comfy.lora.calculate_weight(patches[key], torch.zeros(weights[key].shape, dtype=torch.float32), key)
        worst = max(worst, (theirs.float() - delta).abs().max().item())
        largest = max(largest, delta.abs().max().item())
    print(f"ComfyUI            {args.comfyui} (UNet config detected: {unet.model.model_config.__class__.__name__})")
    print(f"kohya file         {kohya_file.name}: {len(kohya)} tensors; keys ComfyUI did not load: {len(unused)}"
          + (f" (and {len(bundled)} bundled-embedding keys, read as an embedding)" if bundled else ""))
    for line in unused[:10]:
        print(f"                   {line}")
    print(f"modules            {len(ours)} in the diffusers file; {len(ours) - len(missing)} patched by ComfyUI "
          f"(UNet {sum(k.startswith('diffusion_model.') for k in ours)}, clip_l "
          f"{sum(k.startswith('clip_l.') for k in ours)}, clip_g {sum(k.startswith('clip_g.') for k in ours)}); "
          f"{len(set(patches) - set(ours))} patched that the diffusers file lacks")
    for key in missing[:10]:
        print(f"  not patched      {key}")
    print(f"weight change      largest |dW| {largest:.3e}; largest |dW ComfyUI - dW diffusers file| {worst:.3e} "
          f"({worst / max(largest, 1e-30):.2e} of it)")
    return not unused and not missing and worst <= 1e-5 * max(largest, 1e-30) + 1e-7


def check_checkpoint(path: Path, base: Path) -> bool:
    import comfy.sd
    import comfy.utils
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from catalog_gen.train.lora_files import text_model_names

    reported: list[str] = []

    class Reported(logging.Handler):
        def emit(self, entry):
            message = entry.getMessage()
            # ComfyUI itself logs missing logit_scale / CLIP-L text_projection keys at debug level only (its
            # loader filters exactly those out of its warning); anything else it reports counts.
            benign = message.startswith("clip missing") and entry.levelno < logging.WARNING
            if not benign and message.lower().startswith((
                    "clip missing", "clip unexpected", "left over keys", "unet missing", "unet unexpected",
                    "missing vae keys", "leftover vae keys")):
                reported.append(message[:300])

    root = logging.getLogger()
    root.addHandler(Reported())
    root.setLevel(logging.DEBUG)  # left-over and unexpected keys are logged at debug level
    unet, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), model_options={"dtype": torch.float16}, te_model_options={"dtype": torch.float16})
    root.setLevel(logging.WARNING)
    theirs = {**unet.model.state_dict(), **clip.cond_stage_model.state_dict()}
    unet_map = comfy.utils.unet_to_diffusers(unet.model.model_config.unet_config)
    ours = {}
    folder_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float16).state_dict()
    ours.update({"diffusion_model." + unet_map[key]: tensor for key, tensor in folder_unet.items() if key in unet_map})
    unmapped = [key for key in folder_unet if key not in unet_map]
    encoders = [("clip_l", CLIPTextModel, "text_encoder")]
    if (base / "text_encoder_2").is_dir():
        encoders.append(("clip_g", CLIPTextModelWithProjection, "text_encoder_2"))
    for name, model_class, part in encoders:
        state = model_class.from_pretrained(base, subfolder=part, torch_dtype=torch.float16).state_dict()
        ours.update({f"{name}.transformer.{key}": tensor for key, tensor in text_model_names(state).items()
                     if not key.endswith("position_ids")})
    missing = sorted(set(ours) - set(theirs))
    different = [key for key in ours if key in theirs and not torch.equal(theirs[key].half(), ours[key].half())]
    print(f"checkpoint         {path} ({path.stat().st_size / 2**30:.2f} GiB), against {base}")
    print(f"ComfyUI            detected {unet.model.model_config.__class__.__name__}; messages about keys: {len(reported)}")
    for line in reported[:10]:
        print(f"                   {line}")
    print(f"tensors            {len(ours)} of the folder's UNet and text encoders; {len(ours) - len(missing)} in "
          f"ComfyUI's models; {len(different)} of those differ; {len(unmapped)} UNet tensors ComfyUI's map lacks")
    for key in (missing + different)[:10]:
        print(f"  {'missing' if key in missing else 'differs'}          {key}")
    return not reported and not missing and not different and not unmapped


def check_embeddings(args, record: dict) -> bool:
    """ComfyUI's embedding reader (comfy.sd1_clip.load_embed, what `embedding:<name>` in a prompt calls) on the
    embeddings file, and on the kohya file's bundled copy, for each text encoder's key."""
    import comfy.sd1_clip
    from safetensors.torch import load_file

    file = args.adapter / record["files"]["embeddings"]
    ours = load_file(str(file))
    keys = ["clip_l", "clip_g"] if record["base_model"].get("family") == "sdxl" else ["clip_l"]
    sources = [file] + ([args.adapter / record["files"]["kohya"]] if record["files"].get("kohya") else [])
    ok = True
    for source in sources:
        for key in keys:
            expected = ours[key] if key in ours else next(iter(ours.values()))
            theirs = comfy.sd1_clip.load_embed(source.name, str(args.adapter), expected.shape[-1], key)
            same = theirs is not None and theirs.shape == expected.shape and bool((theirs == expected).all())
            ok &= same
            print(f"embedding          {source.name} [{key}]: ComfyUI reads "
                  f"{'nothing' if theirs is None else tuple(theirs.shape)}; "
                  f"{'the same vectors' if same else 'NOT the vectors trained'}")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
