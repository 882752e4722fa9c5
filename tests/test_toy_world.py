"""The toy world's shipped weights, presets, captions and pretraining mechanics."""

from __future__ import annotations

import dataclasses
import random
import shutil

import numpy as np
import pytest

from catalog_gen.catalog.class_map import load_class_map
from catalog_gen.errors import CatalogError
from catalog_gen.toy import pretrain, shipped, world


def test_captions_speak_the_class_maps_language():
    class_map = load_class_map("jewelry")
    for class_key, spec in class_map.classes.items():
        assert world.class_prompt(class_key) == spec.class_prompt
    sample = world.Sample("hoops", "beaded", "gold", None, None)
    text = world.caption(sample, random.Random(0), p_instance=1.0, p_metal=1.0, p_extras=0.0)
    assert text == "photo of a pair of beaded hoops in gold"


@pytest.mark.slow  # builds or loads models
def test_held_out_instances_are_never_drawn_for_the_toy_stable_diffusion():
    assert not set(world.HELD_OUT) & set(world.instances(include_held_out=False))
    rng = random.Random(0)
    drawn = {(s.class_key, s.instance_key) for s in (world.draw_sample(rng, world.instances(False)) for _ in range(300))}
    assert not drawn & set(world.HELD_OUT)
    # The bank holds every instance (the embedders see them all); the UNet and VAE rows exclude the held-out ones.
    labels = [pretrain_label(key) for key in world.instances(include_held_out=True)]
    kept = {pretrain.label_parts(labels[i])[:2] for i in pretrain.sd_indices(pretrain_np(labels))}
    assert kept == set(world.instances(include_held_out=False))


def pretrain_label(key) -> int:
    return world.instances(include_held_out=True).index(key) * 3


def pretrain_np(labels):
    return np.array(labels, dtype=np.int16)


@pytest.mark.slow  # builds or loads models
def test_toy_presets_load_through_the_ordinary_loaders():
    from catalog_gen.quality import embedders
    from catalog_gen.models.loading import load_pipeline, resolve_base_model

    model = resolve_base_model("toy")
    pipeline = load_pipeline(model)
    assert pipeline.vae_scale_factor == 4 and pipeline.unet.config.sample_size == 16
    assert embedders.load_clip("toy-clip").dim == 128
    assert embedders.load_dino("toy-dino").dim == 128


def test_a_changed_weights_file_is_refused_naming_both_hashes(tmp_path, monkeypatch):
    from catalog_gen.models.loading import resolve_base_model

    copy = tmp_path / "weights"
    shutil.copytree(shipped.weights_root(), copy)
    unet = next((copy / "toy-sd" / "unet").glob("*.safetensors"))
    expected = shipped.expected_hashes(copy)[f"toy-sd/unet/{unet.name}"]
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.write_bytes(bytes(data))
    monkeypatch.setenv("CATALOG_GEN_TOY_WEIGHTS", str(copy))
    monkeypatch.setenv("CATALOG_GEN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CatalogError) as error:
        resolve_base_model("toy")
    message = str(error.value)
    assert f"toy-sd/unet/{unet.name}" in message and expected[:16] in message
    assert "retrain" in message
    assert not any((tmp_path / "cache" / "presets").glob("toy-*"))  # nothing half-built is left to load


def test_missing_weights_name_the_retraining_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CATALOG_GEN_TOY_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(CatalogError, match="python -m catalog_gen.toy.pretrain"):
        shipped.weights_digest()


@pytest.mark.slow  # builds or loads models
def test_a_pretraining_stage_resumes_exactly(tmp_path, monkeypatch):
    """A stage stopped after a checkpoint and started again ends with the same weights as one run straight."""
    import torch

    monkeypatch.setattr(pretrain, "BANK_SIZE", 64)
    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY", 2)
    monkeypatch.setitem(pretrain.PLANS, "vae", dataclasses.replace(pretrain.PLANS["vae"], steps=4, batch=4, warmup=1))
    monkeypatch.setattr(pretrain, "VAE_FULL_IMAGE_STEPS", 1)
    data = pretrain.bank(tmp_path / "straight", pairs=False, workers=1)
    pretrain.train_vae(tmp_path / "straight", data)

    class Stop(Exception):
        pass

    real_save = pretrain.Stage.save

    def save_then_stop(self, modules, optimizer, step):
        real_save(self, modules, optimizer, step)
        if step == 2:
            raise Stop  # as a kill would, right after the checkpoint at step 2

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(pretrain.Stage, "save", save_then_stop)
    with pytest.raises(Stop):
        pretrain.train_vae(resumed, data)
    monkeypatch.setattr(pretrain.Stage, "save", real_save)
    pretrain.train_vae(resumed, data)

    def weights(folder):
        return torch.load(folder / "vae" / "checkpoint.pt", weights_only=True)["modules"]["vae"]
    straight, again = weights(tmp_path / "straight"), weights(resumed)
    assert all(torch.equal(straight[name], again[name]) for name in straight)


@pytest.mark.slow  # builds or loads models
def test_a_finished_stage_lengthened_by_a_restart_goes_on_to_the_weights_of_a_straight_run(tmp_path, monkeypatch):
    """DINO and the UNet were lengthened by a second cosine cycle: a stage done under the shorter plan
    resumes into exactly the weights a from-scratch run of the longer plan reaches."""
    import torch

    monkeypatch.setattr(pretrain, "PAIR_BANK_SIZE", 32)
    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY", 2)
    short = dataclasses.replace(pretrain.PLANS["dino"], steps=2, batch=4, warmup=1, restarts=())
    long = dataclasses.replace(short, steps=4, restarts=(2,))
    assert [pretrain.learning_rate(short, s) for s in range(2)] == [pretrain.learning_rate(long, s) for s in range(2)]
    assert pretrain.learning_rate(long, 2) < pretrain.learning_rate(long, 1)  # the restart warms up again
    data = pretrain.bank(tmp_path / "straight", pairs=True, workers=1)
    monkeypatch.setitem(pretrain.PLANS, "dino", long)
    pretrain.train_dino(tmp_path / "straight", data)
    monkeypatch.setitem(pretrain.PLANS, "dino", short)
    pretrain.train_dino(tmp_path / "lengthened", data)
    monkeypatch.setitem(pretrain.PLANS, "dino", long)
    pretrain.train_dino(tmp_path / "lengthened", data)

    def weights(folder):
        state = torch.load(folder / "dino" / "checkpoint.pt", weights_only=True)
        return state["step"], state["modules"]["dino"]
    (step_a, straight), (step_b, again) = weights(tmp_path / "straight"), weights(tmp_path / "lengthened")
    assert step_a == step_b == 4
    assert all(torch.equal(straight[name], again[name]) for name in straight)


def test_same_vs_other_auc_within_a_class_keeps_only_pairs_of_that_class():
    from catalog_gen.toy import proof

    # Two rings close together, two studs close together; the rings differ from each other more than
    # ring/a does from the studs, so the within-class AUC is the harder (lower) number.
    embeddings = np.array([[1.0, 0.0], [0.8, 0.6], [0.9, 0.43589], [0.9, 0.43589], [0.6, 0.8]])
    groups = ["ring/a", "ring/a", "ring/b", "studs/c", "studs/c"]
    classes = [g.split("/")[0] for g in groups]
    overall = proof.same_vs_other_auc(embeddings, groups)
    within = proof.same_vs_other_auc(embeddings, groups, within=classes)
    assert overall["auc"] != within["auc"]
    # within the ring class: same pair (0,1) at cos 0.8 against other pairs (0,2) 0.9 and (1,2) ~0.98
    assert within["auc"] == 0.0 and within["other"] == pytest.approx((0.9 + 0.8 * 0.9 + 0.6 * 0.43589) / 2)


@pytest.fixture(scope="module")
def toolkit():
    from bench.toy_learning_check import SAMPLER
    from catalog_gen.toy import proof

    # The CI learning check's sampler (DPM++ 20 steps): 5x cheaper than the nightly recipe's DDPM 100,
    # and what these thresholds were first checked with (BENCHMARKS.md: 0.885 at 24 images per class).
    return proof.load_toolkit(sampler=SAMPLER)


@pytest.fixture(scope="module")
def ring_photos(sample_catalogue):
    """The sample catalogue's ring/band photos as intake leaves them at the toy world's 64 px."""
    from catalog_gen.catalog import intake
    from catalog_gen.train.workflow import PhotoSource, assign_photos

    source = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    paths = assign_photos(source).groups()[("ring", "band")]
    result = intake.intake_photos(paths, source.photo_root, intake.IntakeConfig(resolution=world.RESOLUTION))
    return [item.image for item in result.accepted]


def test_the_calibrated_gates_reject_noise_and_blank_images(toolkit, ring_photos):
    from catalog_gen.toy import proof

    for kind, images in proof.noise_and_blank_images(4).items():
        verdicts = proof.gate_verdicts(toolkit, images, ring_photos, "photo of a ring")
        assert not any(v.passed for v in verdicts), kind
    # ... while fresh photos of the same product pass them.
    fresh = proof.fresh_photos("ring", "band", 6)
    assert sum(v.passed for v in proof.gate_verdicts(toolkit, fresh, ring_photos, "photo of a ring")) >= 4


@pytest.mark.slow
def test_the_toy_base_model_draws_the_class_it_is_asked_for(toolkit):
    from catalog_gen.toy import proof

    images, labels = proof.base_model_images(toolkit, per_class=6)
    assert proof.zero_shot_accuracy(toolkit, images, labels) >= 0.8
