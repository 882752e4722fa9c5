"""catalog_gen.quality.metrics: agreement with torchmetrics, hand-computed cases, known properties, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from catalog_gen.quality import metrics
from catalog_gen.errors import CatalogError

RTOL = 1e-6  # the agreement the metrics promise with the torchmetrics reference

# torchmetrics' KID and IS warn on construction that they buffer all features; ours are tiny.
pytestmark = pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features:UserWarning")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _two_sets(n: int = 64, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A standard normal set and a shifted, correlated one, so FID and KID are well away from 0."""
    rng = _rng(seed)
    real = rng.normal(size=(n, dim))
    fake = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.5 + 1.5
    return real, fake


# ---------------------------------------------------------------- torchmetrics reference

@pytest.fixture(scope="module")
def tm():
    """torchmetrics' image metrics, driven with features directly through an identity feature module.

    With `feature=` an nn.Module the classes never touch torch-fidelity or torchvision, so the whole
    reference compute path (covariance accumulation, subset loop, split loop) runs on our features.
    """
    pytest.importorskip("torchmetrics", reason="torchmetrics (the reference implementation) is not installed; "
                        "pip install -e '.[test]'")
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    class Features(torch.nn.Module):
        """Returns its input: the 'images' handed to update() are already feature rows."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.num_features = dim  # spares FID a dummy 299x299 forward pass to find the width

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return dict(FID=FrechetInceptionDistance, KID=KernelInceptionDistance, IS=InceptionScore,
                compute_fid=_compute_fid, poly_mmd=poly_mmd, Features=Features)


@pytest.mark.parametrize("n, dim", [(64, 8), (200, 16)])
def test_fid_matches_torchmetrics(tm, n, dim):
    real, fake = _two_sets(n, dim)
    ref = tm["FID"](feature=tm["Features"](dim))
    ref.update(torch.from_numpy(real), real=True)
    ref.update(torch.from_numpy(fake), real=False)
    assert metrics.fid(real, fake) == pytest.approx(ref.compute().item(), rel=RTOL)


def test_frechet_distance_matches_torchmetrics(tm):
    rng = _rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), a @ a.T, b @ b.T
    ref = tm["compute_fid"](*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))).item()
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=RTOL)


def test_kid_matches_torchmetrics_on_whole_set_subsets(tm):
    # subset_size == N makes every subset the whole set in some order; MMD ignores order, so the
    # two implementations' different random draws cannot make the results differ.
    real, fake = _two_sets(48, 8)
    ref = tm["KID"](feature=tm["Features"](8), subsets=3, subset_size=48)
    ref.update(torch.from_numpy(real), real=True)
    ref.update(torch.from_numpy(fake), real=False)
    ref_mean, ref_std = (v.item() for v in ref.compute())
    mean, std = metrics.kid(real, fake, subsets=3, subset_size=48)
    assert mean == pytest.approx(ref_mean, rel=RTOL)
    assert std == pytest.approx(ref_std, abs=1e-9 * abs(ref_mean))  # both ~0: identical subsets


@pytest.mark.parametrize("degree, gamma, coef", [(3, None, 1.0), (2, 0.3, 0.5), (1, 1.0, 0.0)])
def test_polynomial_mmd_matches_torchmetrics(tm, degree, gamma, coef):
    real, fake = _two_sets(30, 5, seed=2)
    ref = tm["poly_mmd"](torch.from_numpy(real), torch.from_numpy(fake), degree, gamma, coef).item()
    assert metrics.polynomial_mmd(real, fake, degree, gamma, coef) == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize("splits", [1, 5])
def test_inception_score_matches_torchmetrics(tm, splits):
    rng = _rng(3)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(40, 7)) * 2), dim=1).numpy()
    # torchmetrics shuffles rows with torch.randperm before splitting; pre-apply the inverse of the
    # permutation the same seed will draw, so its splits are our contiguous ones.
    torch.manual_seed(3)
    perm = torch.randperm(len(probs)).numpy()
    fed = np.empty_like(probs)
    fed[perm] = probs
    ref = tm["IS"](feature=torch.nn.Identity(), splits=splits)
    ref.update(torch.from_numpy(np.log(fed)))  # it takes logits; softmax(log p) == p
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that std of one value is nan (splits=1)
        ref_mean, ref_std = (v.item() for v in ref.compute())
    mean, std = metrics.inception_score(probs, splits=splits)
    assert mean == pytest.approx(ref_mean, rel=RTOL)
    if splits == 1:
        assert math.isnan(std) and math.isnan(ref_std)
    else:
        assert std == pytest.approx(ref_std, rel=RTOL)


# ---------------------------------------------------------------- hand-computed cases

def test_polynomial_mmd_by_hand():
    # Linear kernel k = x.y: within-real off-diagonal 0*1 -> 0; within-fake 2*3 -> 6;
    # cross mean (0*2 + 0*3 + 1*2 + 1*3) / 4 = 5/4; so 0 + 6 - 2 * 5/4 = 3.5.
    assert metrics.polynomial_mmd([[0.0], [1.0]], [[2.0], [3.0]], degree=1, gamma=1.0, coef=0.0) == 3.5


def test_kid_of_a_set_against_itself_has_the_closed_form():
    x = _rng(4).normal(size=(50, 4))
    k = (x @ x.T / 4 + 1) ** 3
    off_diagonal = (k.sum() - np.trace(k)) / (50 * 49)
    expected = -(2 / 50) * (np.trace(k) / 50 - off_diagonal)
    mean, std = metrics.kid(x, x, subsets=2, subset_size=50)
    assert mean == pytest.approx(expected, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_one_dimensional():
    # N(0, 1) vs N(3, 4): 9 + 1 + 4 - 2 * sqrt(1 * 4) = 10 = (0 - 3)^2 + (1 - 2)^2 (sd difference).
    assert metrics.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, rel=1e-12)


def test_frechet_distance_diagonal_covariances():
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # 5 + 5
    assert metrics.frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2)) == pytest.approx(expected)


def test_inception_score_by_hand():
    # Confident and all different: marginal uniform over 4 classes, KL = log 4, IS = 4.
    assert metrics.inception_score(np.eye(4), splits=1)[0] == pytest.approx(4.0)
    # Identical rows carry no diversity: KL = 0, IS = 1, for every split.
    mean, std = metrics.inception_score(np.full((6, 3), 1 / 3), splits=3)
    assert (mean, std) == (pytest.approx(1.0), pytest.approx(0.0))


def test_cosine_scores_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 3.0], [-1.0, 0.0]])
    np.testing.assert_allclose(metrics.pairwise_cosine(a, b), [[2**-0.5, -1.0], [2**-0.5, 0.0]])
    assert metrics.mean_pairwise_cosine(a, b) == pytest.approx((2 * 2**-0.5 - 1) / 4)
    assert metrics.clip_i is metrics.mean_pairwise_cosine and metrics.dino is metrics.mean_pairwise_cosine
    # Matched pairs only: (a0, b0) = 1/sqrt2 and (a1, b1) = 0.
    assert metrics.clip_t(a, b) == pytest.approx(2**-0.5 / 2)


def test_pairwise_cosine_agrees_with_torch():
    a, b = _rng(5).normal(size=(4, 6)), _rng(6).normal(size=(3, 6))
    expected = torch.nn.functional.cosine_similarity(
        torch.from_numpy(a)[:, None, :], torch.from_numpy(b)[None, :, :], dim=-1).numpy()
    np.testing.assert_allclose(metrics.pairwise_cosine(a, b), expected, rtol=1e-12)


# ---------------------------------------------------------------- known properties

def test_identical_sets_score_zero_fid():
    x = _rng(7).normal(size=(50, 4)) * 10 + 3
    assert abs(metrics.fid(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))


def test_same_distribution_kid_is_small_next_to_a_shift():
    rng = _rng(8)
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    same, _ = metrics.kid(x, y, subsets=5, subset_size=100)
    shifted, _ = metrics.kid(x, y + 1.0, subsets=5, subset_size=100)
    assert abs(same) < 0.02 * shifted


def test_shifted_set_has_the_analytic_fid():
    # y = x + delta has exactly x's sample covariance, so the trace terms cancel and FID = |delta|^2.
    x = _rng(9).normal(size=(100, 5)) @ _rng(10).normal(size=(5, 5))
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert metrics.fid(x, x + delta) == pytest.approx(delta @ delta, rel=1e-9)


def test_independent_gaussians_fid_near_population_value():
    # N(0, S) vs N(mu, S): population FID = |mu|^2 = 4; 4000 samples in 3-d land within a few %.
    rng = _rng(11)
    root = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.2, -0.3, 0.8]])
    mu = np.array([2.0, 0.0, 0.0])
    x = rng.normal(size=(4000, 3)) @ root.T
    y = rng.normal(size=(4000, 3)) @ root.T + mu
    assert metrics.fid(x, y) == pytest.approx(4.0, rel=0.05)


def test_torch_and_numpy_inputs_agree_and_kid_repeats_by_seed():
    real, fake = _two_sets(30, 4)
    t_real, t_fake = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    r32, f32 = t_real.double().numpy(), t_fake.double().numpy()
    assert metrics.fid(t_real, t_fake) == metrics.fid(r32, f32)
    assert metrics.kid(t_real, t_fake, subsets=4, subset_size=10, seed=1) == \
        metrics.kid(r32, f32, subsets=4, subset_size=10, seed=1)
    assert metrics.kid(real, fake, subsets=4, subset_size=10, seed=1) != \
        metrics.kid(real, fake, subsets=4, subset_size=10, seed=2)


# ---------------------------------------------------------------- warnings

def test_kid_warns_and_shrinks_subsets_for_small_sets():
    real, fake = _two_sets(20, 4)
    with pytest.warns(UserWarning, match=r"subset_size 1000 exceeds the smaller set \(12 samples\)"):
        shrunk = metrics.kid(real, fake[:12], subsets=3)
    assert shrunk == metrics.kid(real, fake[:12], subsets=3, subset_size=12)


def test_fid_warns_when_samples_do_not_exceed_features():
    real, fake = _two_sets(10, 16)
    with pytest.warns(UserWarning) as caught:
        value = metrics.fid(real, fake)
    assert [str(w.message).split(",")[0] for w in caught] == [
        "fid: real has 10 samples for 16 features", "fid: fake has 10 samples for 16 features"]
    assert np.isfinite(value)


def test_no_warnings_for_well_sized_sets():
    real, fake = _two_sets(40, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.fid(real, fake)
        metrics.kid(real, fake, subsets=2, subset_size=40)


# ---------------------------------------------------------------- bad input

GOOD = np.ones((5, 3)) + np.arange(15).reshape(5, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.fid(np.ones(5), GOOD), r"real: expected a 2-D"),
    (lambda: metrics.kid(GOOD, np.ones((5, 4))), r"fake: has 4 features per row but real has 3"),
    (lambda: metrics.fid(GOOD, np.where(np.eye(5, 3) > 0, np.nan, GOOD)), r"fake: holds NaN"),
    (lambda: metrics.kid(GOOD[:1], GOOD), r"real: needs at least 2 samples"),
    (lambda: metrics.fid(GOOD, GOOD[:1]), r"fake: needs at least 2 samples"),
    (lambda: metrics.kid(GOOD, [["a", "b", "c"]] * 2), r"fake: not numeric"),
    (lambda: metrics.kid(GOOD, GOOD, subset_size=1), r"subset_size: expected an integer >= 2"),
    (lambda: metrics.kid(GOOD, GOOD, degree=0), r"degree"),
    (lambda: metrics.kid(GOOD, GOOD, gamma=-1.0), r"gamma"),
    (lambda: metrics.kid(GOOD, GOOD, gamma="auto"), r"gamma: expected a positive number"),
    (lambda: metrics.polynomial_mmd(GOOD, GOOD, coef=-1.0), r"coef: expected a non-negative number"),
    (lambda: metrics.frechet_distance([0.0, 1.0], np.eye(2), [0.0], np.eye(1)), r"mu1, mu2"),
    (lambda: metrics.frechet_distance([0.0], np.eye(2), [0.0], np.eye(1)), r"sigma1: expected a \(1, 1\)"),
    (lambda: metrics.frechet_distance([0, 0], np.eye(2), [0, 0], [[1, 2], [0, 1]]), r"sigma2: is not symmetric"),
    (lambda: metrics.inception_score(np.log(np.full((4, 2), 0.5))), r"probs: row 0 has negative"),
    (lambda: metrics.inception_score(np.full((4, 2), 0.7)), r"probs: row 0 sums to 1.4"),
    (lambda: metrics.inception_score(np.eye(4), splits=5), r"splits: 5 splits need at least 5 rows"),
    (lambda: metrics.mean_pairwise_cosine(GOOD, np.zeros((2, 3))), r"reference: row 0 is all zeros"),
    (lambda: metrics.clip_t(GOOD, GOOD[:2]), r"text_embeddings: has 2 rows but image_embeddings has 5"),
    (lambda: metrics.pairwise_cosine(GOOD, np.ones((2, 2))), r"b: has 2 features"),
])
def test_bad_input_raises_catalog_error_naming_the_argument(call, match):
    with pytest.raises(CatalogError, match=match):
        call()
