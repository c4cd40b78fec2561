"""On-device k-means, PCA-whitening and NMI (the clustering half of DeepCluster)."""
import numpy as np
import pytest

from keras_oneimage.methods.kmeans import fit_pca_whitening, kmeans, normalized_mutual_info, preprocess_features


def _blobs(n=1500, k=8, d=12, spread=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth, centres


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_planted_clusters(seed):
    x, truth, centres = _blobs(seed=seed)
    result = kmeans(x, 8, iterations=15, seed=seed)
    assert result.labels.shape == (len(x),) and result.labels.dtype == np.int32
    assert normalized_mutual_info(truth, result.labels) > 0.95
    # every true centre has a found centroid within noise distance, and the inertia is what the labels say
    gaps = np.linalg.norm(centres[:, None] - result.centroids[None], axis=-1).min(axis=1)
    assert gaps.max() < 0.5, gaps
    own = np.sum((x - result.centroids[result.labels]) ** 2)
    assert result.inertia == pytest.approx(own, rel=1e-4)


def test_kmeans_is_seeded_and_chunking_does_not_change_the_answer():
    x, _, _ = _blobs(n=601, k=5, seed=1)
    a = kmeans(x, 5, iterations=5, seed=7)
    b = kmeans(x, 5, iterations=5, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    # 601 points in chunks of 64 leaves a padded last chunk; padding must not count as points.
    c = kmeans(x, 5, iterations=5, seed=7, chunk_size=64)
    np.testing.assert_array_equal(a.labels, c.labels)
    np.testing.assert_allclose(a.centroids, c.centroids, rtol=1e-4, atol=1e-4)
    r = kmeans(x, 5, iterations=5, seed=7, init="random")
    assert set(np.unique(r.labels)) <= set(range(5)) and np.isfinite(r.inertia)


def test_empty_cluster_is_reseeded_by_splitting_a_populated_one():
    x, truth, centres = _blobs(n=800, k=3, seed=2)
    # The third initial centroid is far from every point: after the first assignment it owns nothing.
    init = np.concatenate([centres[:2], np.full((1, x.shape[1]), 1e3)]).astype(np.float32)
    result = kmeans(x, 3, iterations=10, init=init)
    assert result.num_splits >= 1
    counts = np.bincount(result.labels, minlength=3)
    assert counts.min() > 0, counts
    assert np.abs(result.centroids).max() < 100  # nothing is left at the far-away seed (1e3)

    no_iterations = kmeans(x, 3, iterations=0, init=init)
    assert no_iterations.num_splits == 0 and np.bincount(no_iterations.labels, minlength=3)[2] == 0
    assert result.inertia < no_iterations.inertia


def test_kmeans_rejects_bad_arguments():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="k <= n"):
        kmeans(x, 5)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, init="bogus")
    with pytest.raises(ValueError, match="shape"):
        kmeans(x, 2, init=np.zeros((3, 2)))


def test_pca_whitening_gives_identity_covariance():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(20, 20)) * np.logspace(0, 2, 20)  # strongly anisotropic, correlated
    x = (rng.normal(size=(3000, 20)) @ mixing + 5.0).astype(np.float32)
    pca = fit_pca_whitening(x, dim=8)
    y = pca(x).numpy()
    assert y.shape == (3000, 8)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-3 * np.abs(y).max())
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(8), atol=2e-3)
    # the kept directions are the top eigenvectors, in descending order
    top = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False).astype(np.float64)))[::-1][:8]
    np.testing.assert_allclose(pca.eigenvalues.numpy(), top, rtol=1e-3)
    # more dimensions than the data has: keeps d
    assert fit_pca_whitening(x[:, :5], dim=256)(x[:, :5]).shape == (3000, 5)


def test_randomized_pca_matches_the_exact_one():
    rng = np.random.default_rng(1)
    spectrum = np.exp(-np.arange(300) / 20.0)  # decaying, like conv features
    basis, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    x = ((rng.normal(size=(2000, 300)) * np.sqrt(spectrum)) @ basis.T).astype(np.float32)
    exact = fit_pca_whitening(x, dim=16, method="exact")
    approx = fit_pca_whitening(x, dim=16, method="randomized")
    np.testing.assert_allclose(approx.eigenvalues.numpy(), exact.eigenvalues.numpy(), rtol=1e-2)
    np.testing.assert_allclose(np.cov(approx(x).numpy(), rowvar=False), np.eye(16), atol=2e-3)
    # the same subspace: each approximate direction lies in the span of the exact ones
    overlap = np.abs(exact.projection.numpy().T @ approx.projection.numpy())
    cosines = overlap / np.outer(np.linalg.norm(exact.projection, axis=0), np.linalg.norm(approx.projection, axis=0))
    assert cosines.max(axis=0).min() > 0.98
    with pytest.raises(ValueError, match="method"):
        fit_pca_whitening(x, dim=4, method="svd")


def test_preprocess_features_are_unit_norm():
    x, _, _ = _blobs(n=300, d=40)
    y = preprocess_features(x, dim=16).numpy()
    assert y.shape == (300, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)


def test_bfloat16_features_cluster_like_their_float32_values():
    # DeepCluster under mixed_bfloat16 pools bf16 features; PCA and k-means take them as the same values in float32
    import tensorflow as tf

    x, truth, _ = _blobs(n=400, k=4, d=40, seed=3)
    low = tf.cast(x, tf.bfloat16)
    same = tf.cast(low, tf.float32).numpy()
    np.testing.assert_allclose(preprocess_features(low, dim=16).numpy(), preprocess_features(same, dim=16).numpy(),
                               atol=1e-5)
    whitening = fit_pca_whitening(low, 8)
    np.testing.assert_allclose(whitening(low).numpy(), whitening(same).numpy(), atol=1e-5)
    a, b = kmeans(low, 4, iterations=10, seed=0), kmeans(same, 4, iterations=10, seed=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert normalized_mutual_info(truth, a.labels) > 0.95


def test_nmi_sanity():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 20000)
    assert normalized_mutual_info(a, a) == pytest.approx(1.0)
    assert normalized_mutual_info(a, (a + 3) % 10 * 7) == pytest.approx(1.0)  # renamed clusters
    assert normalized_mutual_info(a, rng.integers(0, 10, 20000)) < 0.01  # independent
    assert normalized_mutual_info(np.zeros(100), rng.integers(0, 3, 100)) == 0.0
    half = np.where(rng.random(20000) < 0.5, a, rng.integers(0, 10, 20000))  # half the points keep their label
    assert 0.2 < normalized_mutual_info(a, half) < 0.8
    with pytest.raises(ValueError):
        normalized_mutual_info([0, 1], [0, 1, 2])
