"""Pretrain the toy world from its seed: `python -m catalog_gen.toy.pretrain --out DIR`.

Stages, each resumable from its last checkpoint (a stop loses at most `CHECKPOINT_EVERY` steps):

    1. bank   draw the training images once (sample drawing engine, seeded)   -> DIR/bank-*.npz
    2. vae    AutoencoderKL, object-weighted L1 + L2 (+ a small KL)           -> DIR/vae/
    3. clip   CLIPModel, contrastive image-caption loss                       -> DIR/clip/
    4. dino   DINO-layout ViT, self-supervised (two views of one object)      -> DIR/dino/
    5. unet   UNet2DConditionModel + CLIPTextModel on cached VAE latents,
              epsilon prediction on SD's schedule, 10 % caption dropout, EMA -> DIR/unet/
    6. export the shipped folders (catalog_gen/toy/weights/), hashes and curves (shipped.py)

Every random draw comes from a generator seeded by (stage, step), so a resumed stage continues
exactly as an uninterrupted one would, and the whole run is a function of its seed (up to the
CPU's floating-point nondeterminism across thread counts). `--threads` sets torch's CPU threads
for this process only. Over 500 lines on purpose: one command, one section per stage, so the whole
recipe that made the shipped weights reads in one place.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from catalog_gen import seeds
from catalog_gen.toy import architecture, world

CHECKPOINT_EVERY = 50
SEED = 0


@dataclass(frozen=True)
class StagePlan:
    steps: int
    batch: int
    lr: float
    warmup: int
    restarts: tuple[int, ...] = ()
    """Steps where a new cosine cycle begins (warm restart, SGDR), each peaking at half the last one's rate.
    A stage lengthened this way trains its first cycle exactly as before, so a stage that finished under
    the shorter plan resumes from its checkpoint into the same weights a from-scratch run reaches."""


# Step counts sized to fit the CPU time of two sessions on 2 cores (as run: see MODEL_CARD.md). DINO and
# the UNet were lengthened by a second cycle after the first measurements (DINO's AUC was 0.869 at 400 steps).
PLANS = {
    "vae": StagePlan(steps=750, batch=64, lr=2e-3, warmup=50),  # the last 150 steps on whole images
    "clip": StagePlan(steps=800, batch=128, lr=1e-3, warmup=50),
    "dino": StagePlan(steps=1200, batch=128, lr=1e-3, warmup=50, restarts=(400,)),
    "unet": StagePlan(steps=1800, batch=64, lr=1e-3, warmup=100, restarts=(1000,)),
}
VAE_FULL_IMAGE_STEPS = 150
BANK_SIZE = 40_000
PAIR_BANK_SIZE = 12_000
EMA_DECAY = 0.999
CAPTION_DROPOUT = 0.1
CLIP_ESCAPE_STEPS = 60


def step_generator(stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seeds.pretraining_step(SEED, stage, step))


def step_rng(stage: str, step: int) -> random.Random:
    return random.Random(seeds.pretraining_captions(SEED, stage, step))


def learning_rate(plan: StagePlan, step: int) -> float:
    """Linear warmup, then cosine down to a tenth of the peak, once per cycle."""
    bounds = (0, *plan.restarts, plan.steps)
    cycle = max(i for i in range(len(bounds) - 1) if bounds[i] <= step)
    start, end, peak = bounds[cycle], bounds[cycle + 1], plan.lr * 0.5 ** cycle
    local = step - start
    if local < plan.warmup:
        return peak * (local + 1) / plan.warmup
    progress = (local - plan.warmup) / max(1, end - start - plan.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- 1. the image banks

def _render_chunk(args: tuple[int, int, bool]) -> dict:
    start, count, pairs = args
    choices = world.instances(include_held_out=True)
    images, alphas, labels, second = [], [], [], []
    for index in range(start, start + count):
        rng = random.Random(seeds.pretraining_bank_image(SEED, pairs, index))
        if pairs:  # two photos of one object: the same drawing seed in two different framings
            class_key, instance_key = rng.choice(choices)
            metal, drawing_seed, framing = rng.choice(world.METALS), rng.getrandbits(64), rng.randrange(6)
            sample = world.render_sample(class_key, instance_key, metal, drawing_seed, framing)
            other_framing = (framing + 1 + rng.randrange(5)) % 6
            second.append(np.asarray(world.render_sample(class_key, instance_key, metal, drawing_seed,
                                                         other_framing).image))
        else:
            sample = world.draw_sample(rng, choices)
        images.append(np.asarray(sample.image))
        alphas.append((sample.alpha * 255).astype(np.uint8))
        labels.append(choices.index((sample.class_key, sample.instance_key)) * 3 + world.METALS.index(sample.metal))
    out = {"images": np.stack(images), "alphas": np.stack(alphas), "labels": np.array(labels, dtype=np.int16)}
    if pairs:
        out["second"] = np.stack(second)
    return out


def bank(out: Path, pairs: bool, workers: int) -> dict[str, np.ndarray]:
    path = out / ("bank-pairs.npz" if pairs else "bank.npz")
    if path.is_file():
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    size = PAIR_BANK_SIZE if pairs else BANK_SIZE
    out.mkdir(parents=True, exist_ok=True)
    chunk = 1000
    jobs = [(start, min(chunk, size - start), pairs) for start in range(0, size, chunk)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_render_chunk, jobs))
    data = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.rename(path)
    print(f"bank: {size} {'pairs' if pairs else 'images'} drawn in {time.perf_counter() - started:.0f} s", flush=True)
    return data


def label_parts(label: int) -> tuple[str, str, str]:
    choices = world.instances(include_held_out=True)
    class_key, instance_key = choices[label // 3]
    return class_key, instance_key, world.METALS[label % 3]


def sd_indices(labels: np.ndarray) -> np.ndarray:
    """Bank rows the toy Stable Diffusion may see: every instance but the held-out ones."""
    choices = world.instances(include_held_out=True)
    held = {choices.index(key) for key in world.HELD_OUT}
    return np.array([i for i, label in enumerate(labels) if int(label) // 3 not in held])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- checkpoints and logs

class Stage:
    """A stage's folder: checkpoint.pt (models, optimizer, step), log.jsonl, done.json."""

    def __init__(self, out: Path, name: str):
        self.name, self.folder = name, out / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.plan = PLANS[name]

    @property
    def done(self) -> bool:
        """Finished under the current plan (a stage done under a shorter plan resumes and goes on)."""
        path = self.folder / "done.json"
        return path.is_file() and json.loads(path.read_text()).get("steps", 0) >= self.plan.steps

    def resume(self, modules: dict[str, torch.nn.Module], optimizer) -> int:
        path = self.folder / "checkpoint.pt"
        if not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        print(f"{self.name}: resumed at step {state['step']}", flush=True)
        return int(state["step"])

    def save(self, modules: dict[str, torch.nn.Module], optimizer, step: int) -> None:
        payload = {"modules": {name: module.state_dict() for name, module in modules.items()},
                   "optimizer": optimizer.state_dict(), "step": step}
        tmp = self.folder / "checkpoint.pt.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.folder / "checkpoint.pt")

    def log(self, step: int, **values) -> None:
        with open(self.folder / "log.jsonl", "a") as handle:
            handle.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in values.items()}}) + "\n")

    def finish(self, **summary) -> None:
        (self.folder / "done.json").write_text(json.dumps(summary, indent=2) + "\n")

    def run(self, modules, optimizer, train_step, *, every: int = 10) -> None:
        """The shared loop: resume, then train_step(step) -> {metric: value}, log, checkpoint."""
        start = self.resume(modules, optimizer)
        started, last = time.perf_counter(), {}
        for step in range(start, self.plan.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(self.plan, step) * group.get("lr_scale", 1.0)
            last = train_step(step)
            if (step + 1) % every == 0 or step + 1 == self.plan.steps:
                rate = (step + 1 - start) / (time.perf_counter() - started)
                self.log(step + 1, steps_per_s=rate, **last)
                print(f"{self.name} {step + 1}/{self.plan.steps} " + " ".join(f"{k} {v:.4f}" for k, v in last.items())
                      + f" ({rate:.2f} steps/s)", flush=True)
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == self.plan.steps:
                self.save(modules, optimizer, step + 1)
        self.finish(steps=self.plan.steps, **last)


def adamw(params, weight_decay: float = 0.01) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.99), weight_decay=weight_decay)


# ---------------------------------------------------------------- 2. the VAE

def train_vae(out: Path, data: dict) -> None:
    stage = Stage(out, "vae")
    if stage.done:
        return
    rows = sd_indices(data["labels"])
    vae = architecture.make_vae()
    optimizer = adamw(vae.parameters(), weight_decay=0.0)
    crop_steps = stage.plan.steps - VAE_FULL_IMAGE_STEPS

    def train_step(step: int) -> dict:
        g = step_generator("vae", step)
        full = step >= crop_steps  # GroupNorm then sees whole images, as it will at run time
        batch = stage.plan.batch // 2 if full else stage.plan.batch
        picks = rows[torch.randint(len(rows), (batch,), generator=g).numpy()]
        x = to_tensor(data["images"][picks])
        alpha = torch.from_numpy(data["alphas"][picks]).float().unsqueeze(1) / 255.0
        if not full:
            top, left = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
            x, alpha = x[..., top:top + 32, left:left + 32], alpha[..., top:top + 32, left:left + 32]
        # Object pixels are a small part of each image; weighting them keeps colours and gems
        # from washing out (the prototype's gold and rose gold became one colour).
        weight = 1.0 + 15.0 * F.max_pool2d(alpha, 3, 1, 1)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        y = vae.decode(z).sample
        error = y - x
        l1 = (weight * error.abs()).sum() / (weight.sum() * 3)
        l2 = (weight * error.pow(2)).sum() / (weight.sum() * 3)
        kl = posterior.kl().mean() / z[0].numel()
        loss = l1 + l2 + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()}

    stage.run({"vae": vae}, optimizer, train_step)


def load_vae(out: Path):
    vae = architecture.make_vae()
    vae.load_state_dict(torch.load(out / "vae" / "checkpoint.pt", map_location="cpu", weights_only=True)["modules"]["vae"])
    return vae.eval()


@torch.no_grad()
def latent_cache(out: Path, data: dict) -> dict[str, torch.Tensor]:
    """Posterior mean and std of every bank image the UNet may see, and the latents' scaling factor."""
    path = out / "unet-latents.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    vae = load_vae(out)
    rows = sd_indices(data["labels"])
    means, stds = [], []
    for start in range(0, len(rows), 256):
        posterior = vae.encode(to_tensor(data["images"][rows[start:start + 256]])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    # SD's convention: latents are multiplied by 1 / their standard deviation (SD 1.x: 0.18215).
    sample = mean[:4096] + std[:4096] * torch.randn(mean[:4096].shape, generator=torch.Generator().manual_seed(SEED))
    cache = {"rows": torch.from_numpy(rows), "mean": mean, "std": std,
             "scaling_factor": torch.tensor(1.0 / float(sample.std()))}
    torch.save(cache, path)
    return cache


# ---------------------------------------------------------------- 3. CLIP

def tokenizer(out: Path):
    from transformers import CLIPTokenizer

    from catalog_gen.models import bpe

    folder = out / "tokenizer"
    if not (folder / "vocab.json").is_file():
        bpe.write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def clip_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> CLIP's normalisation (what catalog_gen.quality.embedders feeds the model)."""
    from catalog_gen.models.embedder_presets import CLIP_MEAN, CLIP_STD

    return ((images + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def dino_input(images: torch.Tensor) -> torch.Tensor:
    from catalog_gen.models.embedder_presets import IMAGENET_MEAN, IMAGENET_STD

    return ((images + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def degrade(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Blur and noise some images, flip half: generated images are softer than drawings."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    blur = (torch.rand(n, generator=g) < p).view(n, 1, 1, 1)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(blur, blurred, x)
    noise = (torch.rand(n, generator=g) < p).view(n, 1, 1, 1) * 0.05
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_clip(out: Path, data: dict) -> None:
    stage = Stage(out, "clip")
    if stage.done:
        return
    tok = tokenizer(out)
    clip = architecture.make_clip(tok).train()
    optimizer = adamw(clip.parameters(), weight_decay=0.05)

    def train_step(step: int) -> dict:
        g, rng = step_generator("clip", step), step_rng("clip", step)
        picks = torch.randint(len(data["labels"]), (stage.plan.batch,), generator=g).numpy()
        x = degrade(to_tensor(data["images"][picks]), g, p=0.3)
        # The instance named in most captions, the metal in fewer: CLIP-I must tell products apart across
        # metals (an instance's photos come in all three), CLIP-T must still hear the metal.
        captions = [world.caption(_sample_stub(int(label)), rng, p_instance=0.9, p_metal=0.6, p_extras=0.3)
                    for label in data["labels"][picks]]
        image = clip.visual_projection(clip.vision_model(pixel_values=clip_input(x)).pooler_output)
        text = clip.text_projection(clip.text_model(input_ids=tokenize(tok, captions)).pooler_output)
        if step < CLIP_ESCAPE_STEPS:
            # At initialisation the pooled CLS token is nearly the same for every image (the images are
            # mostly white background, and the CLS residual path holds a constant): image embeddings
            # varied by 1e-3 and the plain loss stayed at chance. Standardising both sides across the
            # batch for the first steps makes the differences count; after that it is plain CLIP.
            image, text = _standardise(image), _standardise(text)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = clip.logit_scale.exp() * image @ text.T
        targets = torch.arange(len(picks))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        accuracy = (logits.argmax(1) == targets).float().mean()
        return {"loss": loss.item(), "batch_top1": accuracy.item()}

    stage.run({"clip": clip}, optimizer, train_step)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def _sample_stub(label: int) -> world.Sample:
    class_key, instance_key, metal = label_parts(label)
    return world.Sample(class_key, instance_key, metal, None, None)  # captions need the labels only


# ---------------------------------------------------------------- 4. DINO-style

def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """SimCLR / DINO-style view: crop-and-zoom, flip, colour jitter (hue included), grey, blur."""
    n = x.shape[0]
    scale = torch.empty(n).uniform_(0.75, 1.0, generator=g)
    shift = torch.empty(n, 2).uniform_(-0.15, 0.15, generator=g)
    angle = torch.empty(n).uniform_(-0.3, 0.3, generator=g)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    x = (x + 1) / 2
    # Hue: rotate the colour around the grey axis; then brightness, contrast, saturation.
    hue = torch.empty(n).uniform_(-math.pi, math.pi, generator=g)
    x = _rotate_hue(x, hue)
    grey = x.mean(1, keepdim=True)
    saturation = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
    x = grey + (x - grey) * saturation
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=g)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast
    x = x * torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=g)
    to_grey = (torch.rand(n, generator=g) < 0.2).view(n, 1, 1, 1)
    x = torch.where(to_grey, x.mean(1, keepdim=True).expand_as(x), x)
    return degrade(x.clamp(0, 1) * 2 - 1, g, p=0.4)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3) / math.sqrt(3)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    outer = torch.outer(k, k)
    rotation = cos * torch.eye(3) + sin * cross + (1 - cos) * outer  # Rodrigues, per image
    return torch.einsum("nij,njhw->nihw", rotation, x)


def train_dino(out: Path, data: dict) -> None:
    stage = Stage(out, "dino")
    if stage.done:
        return
    dino = architecture.make_dino().train()
    head = architecture.make_dino_head()
    optimizer = adamw([*dino.parameters(), *head.parameters()], weight_decay=0.05)

    def train_step(step: int) -> dict:
        g = step_generator("dino", step)
        picks = torch.randint(len(data["labels"]), (stage.plan.batch,), generator=g).numpy()
        view_a = augment(to_tensor(data["images"][picks]), g)
        view_b = augment(to_tensor(data["second"][picks]), g)
        cls = dino(pixel_values=dino_input(torch.cat([view_a, view_b]))).last_hidden_state[:, 0]
        z = F.normalize(head(cls), dim=-1)
        loss = _nt_xent(z, temperature=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*dino.parameters(), *head.parameters()], 1.0)
        optimizer.step()
        return {"loss": loss.item()}

    stage.run({"dino": dino, "head": head}, optimizer, train_step)


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each view's positive is the other view of the same object; every other image is a negative."""
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


# ---------------------------------------------------------------- 5. UNet and text encoder

def train_unet(out: Path, data: dict) -> None:
    from diffusers import DDPMScheduler

    from catalog_gen.models.presets import SD_SCHEDULER

    stage = Stage(out, "unet")
    if stage.done:
        return
    cache = latent_cache(out, data)
    tok = tokenizer(out)
    unet, text_encoder = architecture.make_unet().train(), architecture.make_text_encoder(tok).train()
    ema = architecture.make_unet().eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    optimizer = adamw([*unet.parameters(), *text_encoder.parameters()])
    labels = data["labels"][cache["rows"].numpy()]
    scale = float(cache["scaling_factor"])

    def train_step(step: int) -> dict:
        g, rng = step_generator("unet", step), step_rng("unet", step)
        picks = torch.randint(len(labels), (stage.plan.batch,), generator=g)
        mean, std = cache["mean"][picks], cache["std"][picks]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        captions = [world.caption(_sample_stub(int(label)), rng, p_instance=0.7, p_metal=0.85, p_extras=0.3)
                    if rng.random() >= CAPTION_DROPOUT else "" for label in labels[picks.numpy()]]
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(picks),), generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(tokenize(tok, captions))[0]
        loss = F.mse_loss(unet(noisy, timesteps, hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for averaged, current in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(current, 1 - decay)
        return {"loss": loss.item()}

    stage.run({"unet": unet, "ema": ema, "text_encoder": text_encoder}, optimizer, train_step)


# ---------------------------------------------------------------- command line

STAGES = ("bank", "vae", "clip", "dino", "unet", "export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m catalog_gen.toy.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("toy-pretrain"), help="work folder (resumable)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for this process")
    parser.add_argument("--ship-to", type=Path, default=None,
                        help="where export writes the shipped folders (default: the package's weights/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.stages.split(",")
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    data = bank(args.out, pairs=False, workers=args.threads) if set(wanted) - {"export"} else None
    if "bank" in wanted:
        bank(args.out, pairs=True, workers=args.threads)
    if "vae" in wanted:
        train_vae(args.out, data)
    if "clip" in wanted:
        train_clip(args.out, data)
    if "dino" in wanted:
        train_dino(args.out, bank(args.out, pairs=True, workers=args.threads))
    if "unet" in wanted:
        train_unet(args.out, data)
    if "export" in wanted:
        from catalog_gen.toy import shipped

        shipped.export(args.out, args.ship_to)


if __name__ == "__main__":
    main()
