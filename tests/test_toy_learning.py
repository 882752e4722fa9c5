"""The learning test: DreamBooth-LoRA on a held-out toy-world instance must move its images toward the
product, and the check must fail when learning is broken (no gradient, token dropped, wrong target).

Toy world, not Stable Diffusion: catalog_gen/toy/MODEL_CARD.md. The margins are set from measured runs
(see MARGINS) well below what a working run reaches and well above what each broken variant reaches.
"""

from __future__ import annotations

import pytest

from catalog_gen.toy import proof

pytestmark = pytest.mark.slow

# Set from runs measured with this test's settings (ring/bold, 4 photos, the toy_demo recipe's 300 steps at
# lr 5e-3, 12 images per set) on 2026-12-01: the working run raised CLIP-I by +0.068 and DINO by +0.055, and
# its images with the token were +0.008 (DINO) closer than without it; the broken variants' numbers are in
# issue 10's closing note (no gradient: +0.000 / +0.000; token dropped: DINO +0.020, token -0.019;
# v-prediction target: CLIP-I -0.162, DINO -0.378). The token check asks only for the sign: the effect is
# small in the toy world.
MARGINS = proof.LearningMargins(clip_i=0.03, dino=0.025, token_dino=0.0)
STEPS = 300
EXPERIMENT = proof.Experiment(overrides=(("steps", STEPS), ("checkpoint_every", STEPS)), images=12,
                              reference_photos=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the margins were measured: CPU sums round differently with the thread count,
    and two spinning OpenMP threads on a shared 2-core machine make each step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toolkit(one_thread):
    return proof.load_toolkit()


@pytest.fixture(scope="module")
def base_images(toolkit, tmp_path_factory):
    """The base model's images for the experiment's prompts and seeds, drawn once for every run."""
    root = tmp_path_factory.mktemp("toy-base")
    adapter = proof.train(proof.Experiment(overrides=(("steps", 1), ("checkpoint_every", 1))), root, "token-only")
    seeds = list(range(EXPERIMENT.images))
    return {"base": proof.draw(toolkit, proof.prompts_for(EXPERIMENT, adapter.token), seeds),
            "base_class": proof.draw(toolkit, proof.class_prompts(EXPERIMENT), seeds)}


def measure(toolkit, base_images, root) -> dict[str, float]:
    adapter = proof.train(EXPERIMENT, root, "run")
    sets, _ = proof.learning_sets(toolkit, EXPERIMENT, adapter, base=base_images)
    return proof.learning_row(sets)


def test_dreambooth_lora_learns_a_held_out_instance(toolkit, base_images, tmp_path):
    row = measure(toolkit, base_images, tmp_path)
    assert proof.learning_failures(row, MARGINS) == []


# ---------------------------------------------------------------- the check fails when learning is broken

def _no_gradient(monkeypatch):
    """The LoRA's gradients are zeroed before every step: it never moves."""
    from catalog_gen import training

    real = training.optimizer_step

    def step_without_gradient(loss, optimizer, scaler, params, max_grad_norm):
        def zeroed():
            for param in params:
                param.grad = None if param.grad is None else param.grad.zero_()
        original_step = optimizer.step
        optimizer.step = lambda *a, **k: (zeroed(), original_step(*a, **k))[1]
        try:
            real(loss, optimizer, scaler, params, max_grad_norm)
        finally:
            optimizer.step = original_step
    monkeypatch.setattr(training, "optimizer_step", step_without_gradient)


def _token_dropped(monkeypatch):
    """Training prompts lose the instance's token (the generator still uses it)."""
    from catalog_gen.class_map import ClassSpec

    real = ClassSpec.instance_prompt_for
    monkeypatch.setattr(ClassSpec, "instance_prompt_for",
                        lambda self, instance, token: real(self, instance, token).replace(f"{token} ", ""))


def _wrong_target(monkeypatch):
    """The loss compares the epsilon-predicting UNet with the v-prediction target."""
    from catalog_gen import training

    real = training.load_components

    def with_v_target(*args, **kwargs):
        components = real(*args, **kwargs)
        components.noise_scheduler.register_to_config(prediction_type="v_prediction")
        return components
    monkeypatch.setattr(training, "load_components", with_v_target)


@pytest.mark.parametrize("breakage", [_no_gradient, _token_dropped, _wrong_target],
                         ids=["no-gradient", "token-dropped", "wrong-noise-target"])
def test_the_learning_check_fails_when_learning_is_broken(toolkit, base_images, tmp_path, monkeypatch, breakage):
    breakage(monkeypatch)
    row = measure(toolkit, base_images, tmp_path)
    assert proof.learning_failures(row, MARGINS) != []
