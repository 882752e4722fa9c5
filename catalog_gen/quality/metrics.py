"""Image-set metrics on feature matrices: KID, FID, Inception Score and the DreamBooth scores.

Every function takes plain matrices (numpy arrays or torch tensors, one row per image) and returns
Python floats. Embedding images with Inception, CLIP or DINO happens elsewhere, so these stay pure,
cheap to test and usable on features cached from any run. All arithmetic is float64: FID subtracts
traces of similar size, and float32 can lose much of that difference on 768 or 2048-d features.

Formulas: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), IS (Salimans et al. 2016), and
CLIP-I / CLIP-T / DINO (Ruiz et al. 2023, DreamBooth). tests/test_metrics.py checks agreement
with torchmetrics on the same features.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from catalog_gen.errors import CatalogError

__all__ = [
    "kid", "polynomial_mmd", "fid", "frechet_distance", "inception_score",
    "pairwise_cosine", "mean_pairwise_cosine", "clip_i", "dino", "clip_t",
]


# ---------------------------------------------------------------- input checks

def _array(x: Any, name: str) -> np.ndarray:
    """x as a finite float64 array; a torch tensor is accepted without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{name}: not numeric ({exc})") from None
    if not np.isfinite(arr).all():
        where = np.argwhere(~np.isfinite(arr))[0]
        raise CatalogError(f"{name}: holds NaN or inf (first at index {tuple(int(i) for i in where)})")
    return arr


def _matrix(x: Any, name: str, min_rows: int = 1) -> np.ndarray:
    """x as a finite float64 (N, D) matrix with at least min_rows rows."""
    arr = _array(x, name)
    if arr.ndim != 2:
        raise CatalogError(f"{name}: expected a 2-D (samples, features) matrix, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise CatalogError(f"{name}: needs at least {min_rows} samples (rows), got {arr.shape[0]}")
    if arr.shape[1] == 0:
        raise CatalogError(f"{name}: has no feature columns")
    return arr


def _pair(a: Any, b: Any, names: tuple[str, str], min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two matrices of the same feature width; features from different encoders must not be compared."""
    x, y = _matrix(a, names[0], min_rows), _matrix(b, names[1], min_rows)
    if x.shape[1] != y.shape[1]:
        raise CatalogError(f"{names[1]}: has {y.shape[1]} features per row but {names[0]} has {x.shape[1]}")
    return x, y


def _positive_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CatalogError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(value: Any, name: str, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and np.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise CatalogError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- KID

def _mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    """Unbiased MMD^2 under k(a, b) = (gamma a.b + coef)^degree."""
    kxx = (gamma * (x @ x.T) + coef) ** degree
    kyy = (gamma * (y @ y.T) + coef) ** degree
    kxy = (gamma * (x @ y.T) + coef) ** degree
    m, n = len(x), len(y)
    # The diagonal k(x_i, x_i) is left out of the within-set means: a sample always matches itself
    # best, and counting it would bias MMD^2 upwards (two samples of one distribution would score > 0).
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def _kernel_args(dim: int, degree: Any, gamma: Any, coef: Any) -> tuple[int, float, float]:
    # 1/dim keeps gamma * x.y of order one for features of unit-scale entries, whatever their width.
    gamma = 1.0 / dim if gamma is None else _number(gamma, "gamma", allow_zero=False)
    return _positive_int(degree, "degree", 1), gamma, _number(coef, "coef", allow_zero=True)


def polynomial_mmd(real: Any, fake: Any, degree: int = 3, gamma: float | None = None,
                   coef: float = 1.0) -> float:
    """Unbiased squared MMD between two whole sets under the polynomial kernel (one KID subset).

    k(x, y) = (gamma * x.y + coef) ** degree, gamma defaulting to 1 / feature width. The sets may
    differ in size; each needs at least 2 rows. It can be negative: it is unbiased for two
    independent samples, so for one distribution it scatters around 0. A set against itself is
    not independent: it scores -(2/m)(mean k(x_i, x_i) - mean k(x_i, x_j), i != j), small but < 0.
    """
    x, y = _pair(real, fake, ("real", "fake"), min_rows=2)
    return _mmd2(x, y, *_kernel_args(x.shape[1], degree, gamma, coef))


def kid(real: Any, fake: Any, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of polynomial_mmd over random subsets.

    Each of `subsets` rounds draws `subset_size` rows without replacement from each set (numpy
    generator seeded with `seed`, so results repeat). When a set is smaller than subset_size the
    size shrinks to the smaller set, with a warning: small catalogues have tens of photos, and KID
    is still unbiased there, only noisier. std is the population std (ddof=0) over subsets, as in
    torchmetrics; it measures subset-sampling spread, not the full estimator's error.
    """
    x, y = _pair(real, fake, ("real", "fake"), min_rows=2)
    kernel = _kernel_args(x.shape[1], degree, gamma, coef)
    subsets = _positive_int(subsets, "subsets", 1)
    subset_size = _positive_int(subset_size, "subset_size", 2)
    smaller = min(len(x), len(y))
    if subset_size > smaller:
        warnings.warn(f"kid: subset_size {subset_size} exceeds the smaller set ({smaller} samples); "
                      f"using subsets of {smaller}", stacklevel=2)
        subset_size = smaller
    rng = np.random.default_rng(seed)
    scores = [
        _mmd2(x[rng.choice(len(x), subset_size, replace=False)],
              y[rng.choice(len(y), subset_size, replace=False)], *kernel)
        for _ in range(subsets)
    ]
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- FID

def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). Covariances must be symmetric
    (to 1e-6 of their largest entry) and are symmetrised exactly. For identical inputs rounding
    can leave a tiny negative result; it is returned as is, not clipped.
    """
    m1, m2 = _array(mu1, "mu1"), _array(mu2, "mu2")
    if m1.ndim != 1 or m1.shape != m2.shape or m1.size == 0:
        raise CatalogError(f"mu1, mu2: expected two 1-D means of one length, got shapes {m1.shape} and {m2.shape}")
    s1, s2 = _covariance(sigma1, "sigma1", len(m1)), _covariance(sigma2, "sigma2", len(m1))
    # Tr sqrt(S1 S2) without forming sqrt(S1 S2). S1 S2 is not symmetric, so a general solver
    # (scipy sqrtm, eigvals) can return complex parts from rounding alone and needs an eps offset
    # when S1 is singular (fewer samples than features). Instead: with R = sqrt(S1), S1 S2 = R (R S2)
    # has the eigenvalues of (R S2) R = R S2 R, which is symmetric positive semi-definite, so eigh
    # gives real eigenvalues; the few slightly negative ones from rounding are clipped to 0.
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ s2 @ root
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def _covariance(sigma: Any, name: str, dim: int) -> np.ndarray:
    s = _array(sigma, name)
    if s.shape != (dim, dim):
        raise CatalogError(f"{name}: expected a ({dim}, {dim}) covariance for means of length {dim}, got {s.shape}")
    if np.abs(s - s.T).max() > 1e-6 * max(np.abs(s).max(), 1e-300):
        raise CatalogError(f"{name}: is not symmetric, so it is not a covariance matrix")
    return (s + s.T) / 2


def _moments(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    n, dim = x.shape
    if n <= dim:
        warnings.warn(f"fid: {name} has {n} samples for {dim} features, so its covariance is singular "
                      f"(rank <= {n - 1}); FID is then dominated by estimation error and is only "
                      f"comparable between sets of equal size", stacklevel=3)
    mu = x.mean(axis=0)
    centred = x - mu  # centring first is more accurate than E[xx^T] - mu mu^T for features far from 0
    return mu, centred.T @ centred / (n - 1)


def fid(real: Any, fake: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (sample mean, ddof=1 covariance).

    Needs at least 2 rows per set; warns when a set has no more rows than features, since its
    covariance is then singular. Biased upwards for small sets: compare FIDs only at equal sizes.
    """
    x, y = _pair(real, fake, ("real", "fake"), min_rows=2)
    return frechet_distance(*_moments(x, "real"), *_moments(y, "fake"))


# ---------------------------------------------------------------- Inception Score

def inception_score(probs: Any, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous, near-equal parts.

    probs: (N, C) class probabilities: softmax(logits), not logits; rows must sum to 1 within
    1e-3, which float16 softmax outputs meet. Parts follow row order (numpy.array_split), as in the original
    code; torchmetrics shuffles first and uses torch.chunk, which is the same split when N is a
    multiple of splits. std uses ddof=1 like torchmetrics, so it is nan for splits=1.
    """
    p = _matrix(probs, "probs")
    negative = np.flatnonzero((p < 0).any(axis=1))
    if negative.size:
        raise CatalogError(f"probs: row {negative[0]} has negative entries; expected class probabilities")
    off = np.flatnonzero(np.abs(p.sum(axis=1) - 1.0) > 1e-3)
    if off.size:
        raise CatalogError(f"probs: row {off[0]} sums to {p[off[0]].sum():.6g}, not 1; "
                           f"pass softmax(logits), not logits")
    splits = _positive_int(splits, "splits", 1)
    if splits > len(p):
        raise CatalogError(f"splits: {splits} splits need at least {splits} rows, probs has {len(p)}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0)
        # p log(p / p(y)) with 0 log 0 = 0: a class a row gives no probability adds nothing.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), (float(np.std(scores, ddof=1)) if splits > 1 else float("nan"))


# ---------------------------------------------------------------- CLIP / DINO similarity

def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise CatalogError(f"{name}: row {zero[0]} is all zeros; cosine similarity is undefined for it")
    return x / norms[:, None]


def _cosines(a: Any, b: Any, names: tuple[str, str]) -> np.ndarray:
    x, y = _pair(a, b, names)
    return _unit_rows(x, names[0]) @ _unit_rows(y, names[1]).T


def pairwise_cosine(a: Any, b: Any) -> np.ndarray:
    """(N, M) float64 matrix of cosine similarities between every row of a and every row of b.

    Per-candidate scores for gates: row i says how close generated image i is to each reference.
    """
    return _cosines(a, b, ("a", "b"))


def mean_pairwise_cosine(generated: Any, reference: Any) -> float:
    """Mean cosine similarity over all (generated, reference) embedding pairs.

    The DreamBooth paper's subject-fidelity score: CLIP-I on CLIP image embeddings, DINO on DINO
    ViT-S/16 embeddings (DINO separates instances of one class better, as the paper argues).
    """
    return float(_cosines(generated, reference, ("generated", "reference")).mean())


clip_i = mean_pairwise_cosine
dino = mean_pairwise_cosine


def clip_t(image_embeddings: Any, text_embeddings: Any) -> float:
    """Mean cosine between each image embedding and the text embedding of its own prompt (row i, row i).

    The DreamBooth paper's prompt-fidelity score, a raw cosine in [-1, 1]; torchmetrics' CLIPScore
    reports 100 * max(cosine, 0) instead.
    """
    names = ("image_embeddings", "text_embeddings")
    x, y = _pair(image_embeddings, text_embeddings, names)
    if len(x) != len(y):
        raise CatalogError(f"text_embeddings: has {len(y)} rows but image_embeddings has {len(x)}; clip_t pairs rows")
    return float(np.mean(np.sum(_unit_rows(x, names[0]) * _unit_rows(y, names[1]), axis=1)))
