"""Training techniques, each a recipe setting: min-SNR-gamma loss weighting, noise offset, the Prodigy
optimizer, DoRA, and the text-encoder LoRA's own learning rate. For each: that it changes what it should and
nothing else, that resume stays exact, and that leaving it at its default changes no adapter trained before
it existed. The pure parts run in the fast loop; the rest train a few steps of the tiny preset."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_in_training_step
from safetensors.torch import load_file

from catalog_gen.config import TrainConfig
from catalog_gen.errors import CatalogError
from catalog_gen.train import losses
from catalog_gen.train.adapters import read_adapter
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.train.training import InstanceJob, training_fingerprint
from catalog_gen.train.workflow import train_class
from test_training import _source, tiny_config


# ---------------------------------------------------------------- min-SNR-gamma weights (pure)

def test_min_snr_weights_are_the_hand_computed_ones_for_epsilon_and_v_prediction():
    # alpha_bar 0.99, 0.5, 0.1 -> SNR 99, 1, 1/9; gamma 5 clamps only the first.
    alphas_cumprod = torch.tensor([0.99, 0.5, 0.1])
    timesteps = torch.tensor([0, 1, 2, 0])
    epsilon = losses.min_snr_weights(alphas_cumprod, timesteps, 5.0, "epsilon")
    v = losses.min_snr_weights(alphas_cumprod, timesteps, 5.0, "v_prediction")
    assert epsilon.tolist() == pytest.approx([5 / 99, 1.0, 1.0, 5 / 99], rel=1e-5)  # float32 alpha_bar
    assert v.tolist() == pytest.approx([5 / 100, 1 / 2, (1 / 9) / (1 / 9 + 1), 5 / 100], rel=1e-5)


def test_min_snr_weights_follow_a_schedulers_alphas_for_both_prediction_types():
    """From the schedulers the loop uses (the tiny preset is epsilon; SD 2's v-prediction comes as
    DDPMScheduler(prediction_type="v_prediction")), against SNR worked out from the betas by hand."""
    import math

    from diffusers import DDPMScheduler

    timesteps = torch.tensor([0, 10, 500, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
        betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
        expected = []
        for t in timesteps.tolist():
            alpha_bar = math.prod(1 - b for b in betas[: t + 1])
            snr = alpha_bar / (1 - alpha_bar)
            expected.append(min(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1))
        weights = losses.min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, scheduler.config.prediction_type)
        assert weights.tolist() == pytest.approx(expected, rel=1e-4), prediction_type
        assert weights[0] < 0.05  # clamped at low noise; at high noise epsilon's is 1, v's SNR / (SNR + 1)
        assert weights[-1] == 1.0 if prediction_type == "epsilon" else weights[-1] < 0.01


def test_a_huge_gamma_is_no_weighting_for_epsilon():
    alphas_cumprod = torch.linspace(0.999, 0.001, 1000)
    timesteps = torch.tensor([0, 3, 400, 999])
    weights = losses.min_snr_weights(alphas_cumprod, timesteps, 1e9, "epsilon")
    assert torch.equal(weights, torch.ones(4))
    prediction, target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 4, 8, 8)
    assert float(losses.dreambooth_loss(prediction, target, 2, 0.7, weights)) == pytest.approx(
        float(losses.dreambooth_loss(prediction, target, 2, 0.7)), rel=1e-6)


def test_min_snr_weights_the_prior_samples_alike():
    """Instance and class samples are each weighted by their own timestep's weight, then combined as without
    weights: instance mean + prior_loss_weight x class mean."""
    prediction = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0), torch.full((4, 2, 2), 3.0)])
    target = torch.zeros_like(prediction)  # per-sample MSE: 1, 4, 9
    weights = torch.tensor([0.5, 0.25, 0.1])
    loss = losses.dreambooth_loss(prediction, target, 1, 2.0, weights)
    assert float(loss) == pytest.approx(0.5 * 1 + 2.0 * (0.25 * 4 + 0.1 * 9) / 2)


def test_min_snr_refuses_a_prediction_type_it_is_not_defined_for():
    with pytest.raises(CatalogError, match="min_snr_gamma is defined for prediction types epsilon, v_prediction; "
                                           "the base model's scheduler predicts 'sample'"):
        losses.min_snr_weights(torch.tensor([0.5]), torch.tensor([0]), 5.0, "sample")


# ---------------------------------------------------------------- settings (pure)

@pytest.mark.parametrize("settings, message", [
    ({"min_snr_gamma": 0.0}, "min_snr_gamma must be > 0, got 0.0"),
    ({"min_snr_gamma": "5"}, "min_snr_gamma must be float, got '5'"),
    ({"noise_offset": -0.1}, r"noise_offset must be in \[0, 1\], got -0.1"),
    ({"noise_offset": 5}, r"noise_offset must be in \[0, 1\], got 5"),
    ({"use_dora": 1}, "use_dora must be bool, got 1"),
    ({"optimizer": "lion"}, "optimizer must be one of auto, adamw8bit, adamw, prodigy; got 'lion'"),
    ({"prodigy_d_coef": 0.0}, "prodigy_d_coef must be > 0, got 0.0"),
    ({"optimizer": "prodigy", "learning_rate": 1.0, "train_text_encoder": True},
     r"optimizer prodigy shares one step size between the trained parts; text_encoder_lr \(5e-05\) must equal "
     r"learning_rate \(1.0\)"),
    ({"optimizer": "prodigy", "method": "pivotal", "learning_rate": 1.0},
     r"embedding_lr \(0.0005\) must equal learning_rate \(1.0\)"),
])
def test_technique_settings_are_validated(settings, message):
    with pytest.raises(CatalogError, match=message):
        TrainConfig(**settings)


def test_prodigy_takes_one_learning_rate_for_every_part():
    TrainConfig(optimizer="prodigy", learning_rate=1.0, train_text_encoder=True, text_encoder_lr=1.0)
    TrainConfig(optimizer="prodigy", method="pivotal", learning_rate=1.0, embedding_lr=1.0)
    TrainConfig(optimizer="prodigy", method="textual-inversion", embedding_lr=1.0)  # one part only


JOB = InstanceJob("ring", "band", "kqi", "photo of kqi ring", "photo of ring", (), Path("unused"))
RESOLVED = TrainConfig(resolution=64, optimizer="adamw", mixed_precision="no")


def _fingerprint(config: TrainConfig) -> str:
    return training_fingerprint(config, JOB, "base", ["h"])


def test_the_techniques_at_their_defaults_keep_the_fingerprints_adapters_were_trained_with():
    """Pinned from the release before these settings existed: its adapters are still "already trained"."""
    assert _fingerprint(RESOLVED) == "faba3d96e4c1e28e"
    assert _fingerprint(replace(RESOLVED, method="pivotal", train_text_encoder=True)) == "1e3156f0646fdcd2"
    assert _fingerprint(replace(RESOLVED, method="dreambooth")) == "385b4e74a2143355"
    # Set explicitly to their defaults, the same.
    assert _fingerprint(replace(RESOLVED, min_snr_gamma=None, noise_offset=0.0, use_dora=False,
                                prodigy_d_coef=1.0)) == "faba3d96e4c1e28e"


def test_each_technique_changes_the_fingerprint_where_it_changes_training():
    changed = [replace(RESOLVED, min_snr_gamma=5.0), replace(RESOLVED, noise_offset=0.05),
               replace(RESOLVED, use_dora=True), replace(RESOLVED, optimizer="prodigy", learning_rate=1.0),
               replace(RESOLVED, optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=2.0)]
    prints = [_fingerprint(c) for c in changed]
    assert len(set(prints + [_fingerprint(RESOLVED)])) == len(changed) + 1
    # ... and only there: DoRA changes no method without a LoRA, d_coef no optimizer but Prodigy.
    assert _fingerprint(replace(RESOLVED, prodigy_d_coef=2.0)) == _fingerprint(RESOLVED)
    for method in ("textual-inversion", "dreambooth"):
        assert _fingerprint(replace(RESOLVED, method=method, use_dora=True)) == _fingerprint(replace(RESOLVED, method=method))


def test_the_kohya_converter_refuses_dora_magnitudes():
    from catalog_gen.train.lora_files import diffusers_to_kohya

    with pytest.raises(CatalogError, match="is a DoRA magnitude; no kohya file is written for DoRA"):
        diffusers_to_kohya({"unet.a.to_q.lora_magnitude_vector.weight": torch.ones(4)}, 4.0)


# ---------------------------------------------------------------- in the training loop (tiny preset)

def quick(**overrides) -> TrainConfig:
    return tiny_config(**{"steps": 3, "checkpoint_every": 0, "validation_images": 0, **overrides})


def _train(sample_catalogue, workdir: Path, config: TrainConfig, **kwargs):
    summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, config, **kwargs)
    assert [o.status for o in summary.outcomes] == ["trained"], summary.outcomes
    return read_adapter(workdir / "adapters" / "ring" / "band")


def _weights(info) -> dict[str, torch.Tensor]:
    return load_file(str(info.diffusers_file))


@pytest.fixture
def add_noise_calls(monkeypatch):
    """Every (latents, noise, timesteps) the training loop gives the DDPM scheduler, in order."""
    from diffusers import DDPMScheduler

    calls = []
    real = DDPMScheduler.add_noise

    def recording(self, original_samples, noise, timesteps):
        calls.append((original_samples.clone(), noise.clone(), timesteps.clone()))
        return real(self, original_samples, noise, timesteps)
    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    return calls


@pytest.fixture(scope="module")
def plain(sample_catalogue, tmp_path_factory):
    """The reference: the same quick run with no technique on."""
    return _train(sample_catalogue, tmp_path_factory.mktemp("plain"), quick())


def test_noise_offset_shifts_each_channels_noise_and_leaves_every_other_draw(sample_catalogue, tmp_path,
                                                                            add_noise_calls, plain):
    """Off, the base noise is the same draw as with it on (so a run without it keeps its random stream)."""
    _train(sample_catalogue, tmp_path / "off", quick())
    without = list(add_noise_calls)
    add_noise_calls.clear()
    with_offset = _train(sample_catalogue, tmp_path / "on", quick(noise_offset=0.1))
    assert len(without) == len(add_noise_calls) == 3
    for (latents_a, noise_a, t_a), (latents_b, noise_b, t_b) in zip(without, add_noise_calls):
        assert torch.equal(t_a, t_b) and torch.equal(latents_a, latents_b)  # same photos, latents, timesteps
        shift = noise_b - noise_a  # one constant per image and channel, 0.1 x a normal draw
        per_channel = shift[:, :, :1, :1]
        assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
        assert 0 < per_channel.abs().max() < 0.5
    assert with_offset.record["loss_curve"] != plain.record["loss_curve"]


def test_min_snr_weights_each_steps_loss_by_its_timestep(sample_catalogue, tmp_path, add_noise_calls, plain,
                                                         tiny_model):
    from diffusers import DDPMScheduler

    gamma = 1.0  # low enough that the tiny preset's timesteps are weighted
    weighted = _train(sample_catalogue, tmp_path / "gamma1", quick(min_snr_gamma=gamma))
    scheduler = DDPMScheduler.from_pretrained(tiny_model.path, subfolder="scheduler")
    first_t = add_noise_calls[0][2]
    weight = losses.min_snr_weights(scheduler.alphas_cumprod, first_t, gamma, "epsilon")
    # Step 1 starts from the same weights: its loss is the plain loss times its weight exactly.
    assert weight.item() < 0.999
    assert weighted.record["loss_curve"][0] == pytest.approx(weight.item() * plain.record["loss_curve"][0], abs=2e-6)
    assert weighted.record["loss_curve"][1:] != plain.record["loss_curve"][1:]
    # A gamma above every SNR is no weighting at all (up to float rounding of the per-sample mean).
    unweighted = _train(sample_catalogue, tmp_path / "huge", quick(min_snr_gamma=1e9))
    assert unweighted.record["loss_curve"] == pytest.approx(plain.record["loss_curve"], rel=1e-5)
    a, b = _weights(unweighted), _weights(plain)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_text_encoder_lora_learns_at_its_own_rate(sample_catalogue, tmp_path):
    """One AdamW step moves each weight by about its group's lr (the step is lr x g / |g|): the text-encoder
    LoRA's B matrices by text_encoder_lr, the UNet's by learning_rate, and a different text_encoder_lr changes
    the text encoder's LoRA alone."""
    runs = {lr: _weights(_train(sample_catalogue, tmp_path / str(lr), quick(
        steps=1, learning_rate=1e-3, train_text_encoder=True, text_encoder_lr=lr))) for lr in (1e-2, 3e-2)}
    for lr, tensors in runs.items():
        text_b = max(t.abs().max().item() for k, t in tensors.items() if k.startswith("text_encoder.") and "lora_B" in k)
        unet_b = max(t.abs().max().item() for k, t in tensors.items() if k.startswith("unet.") and "lora_B" in k)
        assert text_b == pytest.approx(lr, rel=1e-3) and unet_b == pytest.approx(1e-3, rel=1e-3)
    a, b = runs[1e-2], runs[3e-2]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("unet."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("text_encoder."))


def test_prodigy_estimates_its_step_size_and_checkpoints_it(sample_catalogue, tmp_path, plain):
    info = _train(sample_catalogue, tmp_path, quick(steps=4, checkpoint_every=4, optimizer="prodigy",
                                                    learning_rate=1.0, prodigy_d_coef=100.0))
    assert info.record["recipe"]["optimizer"] == "prodigy"
    assert info.record["loss_curve"][0] == plain.record["loss_curve"][0]  # the same start, another path
    assert info.record["loss_curve"][1:3] != plain.record["loss_curve"][1:3]
    group, = json.loads((tmp_path / "checkpoints" / "ring" / "band" / "step-000004" / "state.json").read_text())[
        "param_groups"]
    assert group["d"] > group["d0"] == 1e-6 and group["k"] == 4 and group["d_coef"] == 100.0
    assert any(t.abs().max() > 0 for k, t in _weights(info).items() if "lora_B" in k)


def test_prodigy_holds_pivotal_embeddings_still_after_their_fraction(sample_catalogue, tmp_path):
    """Prodigy moves every parameter that has a gradient by its one step size whatever its group's lr, so
    pivotal's second phase drops the embeddings' gradient rather than zeroing their lr."""
    config = quick(method="pivotal", steps=4, checkpoint_every=2, optimizer="prodigy", learning_rate=1.0,
                   embedding_lr=1.0, prodigy_d_coef=100.0)
    _train(sample_catalogue, tmp_path, config)
    at = {step: load_file(str(folder / "lora.safetensors"))
          for step, folder in list_checkpoints(tmp_path / "checkpoints" / "ring" / "band")}
    assert torch.equal(at[2]["token_embeddings"], at[4]["token_embeddings"])
    assert any(not torch.equal(at[2][k], at[4][k]) for k in at[2] if "lora_B" in k)


TECHNIQUES = {
    "min-snr": {"min_snr_gamma": 5.0},
    "noise-offset": {"noise_offset": 0.1},
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0, "prodigy_d_coef": 100.0},  # its d moves in 6 steps
    "dora": {"use_dora": True},
    "text-encoder-lora": {"train_text_encoder": True, "text_encoder_lr": 1e-2},
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_resumes_exactly(technique, sample_catalogue, tmp_path):
    config = quick(steps=6, checkpoint_every=2, **TECHNIQUES[technique])
    straight = _train(sample_catalogue, tmp_path / "straight", config)
    with pytest.raises(InterruptedError):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path / "resumed", config,
                    progress=crash_in_training_step(4))
    resumed = _train(sample_catalogue, tmp_path / "resumed", config, resume=True)
    assert resumed.record["resumed_from_step"] == 2
    assert resumed.record["loss_curve"] == straight.record["loss_curve"]
    assert resumed.record["fingerprint"] == straight.record["fingerprint"]
    a, b = _weights(resumed), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The optimizer ends in the same state too (Prodigy's step-size estimate lives in its param groups).
    last = [tmp_path / run / "checkpoints" / "ring" / "band" / "step-000006" for run in ("straight", "resumed")]
    groups = [json.loads((folder / "state.json").read_text())["param_groups"] for folder in last]
    assert groups[0] == groups[1]
    states = [load_file(str(folder / "optimizer.safetensors")) for folder in last]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---------------------------------------------------------------- DoRA's files

@pytest.fixture(scope="module")
def dora(sample_catalogue, tmp_path_factory):
    """DoRA on the UNet and the text encoder; its last checkpoint draws a validation image in memory."""
    workdir = tmp_path_factory.mktemp("dora")
    config = quick(steps=4, checkpoint_every=4, validation_images=1, validation_steps=3, use_dora=True,
                   train_text_encoder=True, text_encoder_lr=1e-2)
    return _train(sample_catalogue, workdir, config), config


def test_dora_writes_its_magnitudes_and_no_kohya_file(dora, plain):
    info, _ = dora
    assert info.record["files"]["kohya"] is None and info.kohya_file is None
    assert "no kohya file" in info.record["notes"][0]
    assert info.record["lora"]["unet"]["use_dora"] and info.record["lora"]["text_encoder"]["use_dora"]
    tensors = _weights(info)
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector.weight")]
    modules = [k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    assert sorted(magnitudes) == sorted(f"{m}.lora_magnitude_vector.weight" for m in modules)
    assert any(m.startswith("text_encoder.") for m in magnitudes)
    # DoRA starts where LoRA does (magnitude = the base weight's norms, B = 0): the same first loss.
    assert info.record["loss_curve"][0] == pytest.approx(plain.record["loss_curve"][0], rel=1e-5)


def test_a_dora_adapter_draws_in_plain_diffusers_what_the_trained_model_drew(dora, tiny_model):
    from catalog_gen import seeds
    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw, make_scheduler
    from catalog_gen.train.adapters import adapter_weights, attach, detach
    from PIL import Image

    info, config = dora
    prompt = info.record["instance_prompt"]
    checkpoint = info.folder.parents[2] / "checkpoints" / "ring" / "band" / "step-000004"
    in_memory = np.asarray(Image.open(checkpoint / "validation" / "00.png"))
    pipeline = load_pipeline(tiny_model)
    pipeline.scheduler = make_scheduler("ddim", pipeline.scheduler.config)  # the validation images' sampler

    def image():
        return np.asarray(draw(pipeline, [prompt], [seeds.validation_image(config.seed, 0)],
                               steps=config.validation_steps, resolution=64)[0])

    base = image()
    norms = {name: module.weight.detach().norm(dim=1) for name, module in pipeline.unet.named_modules()
             if name.endswith("attn1.to_q")}
    pipeline.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name, adapter_name="dora")
    # Every trained magnitude arrived (none left at its initial value), the text encoder's too.
    tensors = _weights(info)
    loaded = {f"{prefix}.{name}".replace(".dora.", ".").replace("text_model.", ""): p
              for prefix, module in (("unet", pipeline.unet), ("text_encoder", pipeline.text_encoder))
              for name, p in module.named_parameters() if "lora_magnitude_vector" in name}
    wanted = {k.replace("text_model.", ""): t for k, t in tensors.items() if "lora_magnitude_vector" in k}
    assert loaded.keys() == wanted.keys()
    assert all(torch.equal(loaded[k].detach(), wanted[k]) for k in wanted)
    assert any(not torch.allclose(wanted[f"unet.{name}.lora_magnitude_vector.weight"], norm) for name, norm in norms.items())
    tuned = image()
    assert np.array_equal(tuned, in_memory) and not np.array_equal(tuned, base)

    # The generator's own hash-checked load draws the same; detach leaves the base model.
    pipeline.unload_lora_weights()
    attached = attach(pipeline, adapter_weights(info), "sku_adapter")
    assert np.array_equal(image(), tuned)
    detach(pipeline, attached)
    assert np.array_equal(image(), base)


def test_a_dora_checkpoint_converts_to_the_adapters_own_file(dora, tmp_path):
    from catalog_gen.evaluate.evaluation import checkpoint_as_adapter_file

    info, _ = dora
    last = list_checkpoints(info.folder.parents[2] / "checkpoints" / "ring" / "band")[-1][1]
    converted = load_file(str(checkpoint_as_adapter_file(last, tmp_path)))
    shipped = _weights(info)
    assert converted.keys() == shipped.keys() and all(torch.equal(converted[k], shipped[k]) for k in shipped)


def test_removing_a_dora_lora_restores_the_base_model(sample_catalogue, tmp_path, tiny_model):
    from catalog_gen.catalog.intake import IntakeConfig, intake_photos, save_training_set
    from catalog_gen.train import training

    config = quick(steps=2, use_dora=True, train_text_encoder=True).resolve_for(64, on_gpu=False)
    components = training.load_components(tiny_model, config, torch.device("cpu"))
    before = {name: {k: v.clone() for k, v in getattr(components, name).state_dict().items()}
              for name in ("unet", "text_encoder")}
    photos = sorted(sample_catalogue.photos_dir.glob("rg-sign-*"))[:2]
    dataset = save_training_set(intake_photos(photos, sample_catalogue.photos_dir, IntakeConfig(resolution=64)),
                                tmp_path / "set")
    job = InstanceJob("ring", "signet", "kqi", "photo of a kqi signet ring", "photo of a ring",
                      tuple(sorted(dataset.glob("*.png"))), tmp_path / "ckpt")
    training.fit(components, config, job, "test", resume=False)
    training.remove_lora(components)
    for name, state in before.items():
        after = getattr(components, name).state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state), name
