"""The training objective, as pure functions of tensors: the target the UNet learns (the noise, or the velocity
for v-prediction), the DreamBooth loss (instance MSE plus the weighted
class-prior MSE) and the min-SNR-gamma weights it can take per sample.

Min-SNR-gamma (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023) clamps each
timestep's weight in x0 terms to min(SNR, gamma), so the many easy low-noise timesteps stop dominating the
gradient. An epsilon loss is an x0 loss times SNR, and a v loss an x0 loss times SNR + 1, hence
    epsilon:       min(SNR, gamma) / SNR
    v-prediction:  min(SNR, gamma) / (SNR + 1)
with SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]). (kohya's sd-scripts and diffusers'
train_text_to_image.py use the same two; diffusers' older DreamBooth scripts add 1 to the epsilon form for v.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from catalog_gen.errors import CatalogError
from catalog_gen.models.family import PREDICTION_TYPES  # the weighting and the target are defined for these


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, as its scheduler says: the noise (epsilon; SD 1.x, the SD 2 base) or the
    velocity alpha_t * noise - sigma_t * latents (v_prediction; SD 2.x at 768 px)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise CatalogError(f"prediction_type {kind!r} is not trained here; epsilon and v_prediction are")


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR of each timestep: alpha_bar / (1 - alpha_bar), in float32."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """One loss weight per sample (shape of `timesteps`) for min-SNR-gamma weighting."""
    snr = signal_to_noise(alphas_cumprod, timesteps)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR written as min(gamma / SNR, 1): the same numbers, and 1 rather than 0/0 where a
        # zero-terminal-SNR schedule reaches SNR 0.
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1.0)
    raise CatalogError(f"min_snr_gamma is defined for prediction types {', '.join(PREDICTION_TYPES)}; the base "
                       f"model's scheduler predicts {prediction_type!r}")


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float,
                    sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Instance MSE, plus the class-prior MSE weighted by prior_weight when class images are in the batch
    (the samples after the first n_instance). sample_weights (one per sample, min-SNR's) weight each sample's
    MSE, the class samples' alike; None is plain MSE, computed exactly as before weights existed."""
    if sample_weights is None:
        loss = F.mse_loss(prediction[:n_instance], target[:n_instance])
        if prediction.shape[0] > n_instance:
            loss = loss + prior_weight * F.mse_loss(prediction[n_instance:], target[n_instance:])
        return loss
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=tuple(range(1, prediction.ndim)))
    per_sample = per_sample * sample_weights.to(per_sample)
    loss = per_sample[:n_instance].mean()
    if prediction.shape[0] > n_instance:
        loss = loss + prior_weight * per_sample[n_instance:].mean()
    return loss
