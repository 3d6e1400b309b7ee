"""InputNormalizer: whitening properties, streaming = fitting at once, inverse, singular data,
errors, state_dict, gradcheck, compile and use as a first layer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normkit.errors import ConfigError, ShapeError
from normkit.input_norm import InputNormalizer, NotFittedError

F64 = torch.float64
# float64 on O(1) values through one eigendecomposition and a few matmuls: ~1e-13 of round-off.
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
METHODS = ("center", "standardize", "pca", "zca", "cholesky")


def correlated(n: int = 2000, d: int = 6, seed: int = 0, offset: float = 3.0) -> torch.Tensor:
    """Gaussian data with a dense covariance A Aᵀ (A = I + 0.4·noise: eigenvalues in ~[0.1, 5])
    and a nonzero mean."""
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(d, dtype=F64) + 0.4 * torch.randn(d, d, generator=g, dtype=F64)
    return torch.randn(n, d, generator=g, dtype=F64) @ a.T + offset


def make(method: str, d: int | None = 6, **kw) -> InputNormalizer:
    kw.setdefault("eps", 1e-12)
    return InputNormalizer(d, method=method, dtype=F64, **kw)


def cov(y: torch.Tensor) -> torch.Tensor:
    return torch.cov(y.T, correction=0)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_whitened_data_has_mean_zero_and_identity_covariance(method):
    # eps = 1e-12 biases the covariance to Σ(Σ + εI)⁻¹ = I − O(ε/λ_min); λ_min ≥ ~0.1 here, so
    # the bias is ~1e-11 and what remains is float64 round-off: 1e-8 holds with margin.
    x = correlated()
    y = make(method).fit(x)(x)
    assert_close(y.mean(0), torch.zeros(6, dtype=F64), rtol=0, atol=1e-8)
    assert_close(cov(y), torch.eye(6, dtype=F64), rtol=0, atol=1e-8)


def test_pca_rows_by_decreasing_variance_and_rank_k():
    x = correlated()
    full, top = make("pca").fit(x), make("pca", rank=2).fit(x)
    assert top(x).shape == (2000, 2)
    assert_close(top(x), full(x)[:, :2], **TIGHT)  # rank k = the first k components
    assert_close(cov(top(x)), torch.eye(2, dtype=F64), rtol=0, atol=1e-8)
    lam = torch.linalg.eigvalsh(cov(x)).flip(0)
    assert_close(full.matrix_.norm(dim=1), lam.rsqrt(), **TIGHT)  # ‖row i‖ = λ_i^{-1/2}


def test_standardize_and_center_reference():
    x = correlated()
    mu, var = x.mean(0), x.var(0, correction=0)
    assert_close(make("center").fit(x)(x), x - mu, **TIGHT)
    assert_close(make("standardize", eps=1e-5).fit(x)(x), (x - mu) / (var + 1e-5).sqrt(), **TIGHT)


@pytest.mark.parametrize("method", METHODS)
def test_streaming_in_batches_of_7_equals_fitting_at_once(method):
    x = correlated(n=300) + 1e6  # a large mean offset: the Chan merge must not cancel
    once = make(method).fit(x)
    streamed = make(method)
    for chunk in x.split(7):  # 42 batches of 7 and one of 6
        streamed.partial_fit(chunk)
    loader = [(chunk, torch.zeros(len(chunk))) for chunk in x.split(7)]  # (x, y) tuples
    from_loader = make(method).fit(loader)
    for other in (streamed, from_loader):
        assert int(other.n_samples_seen_) == 300
        for name in ("mean_", "matrix_", "inverse_matrix_"):
            assert_close(getattr(other, name), getattr(once, name), rtol=1e-9, atol=1e-9)
        # the scatter is O(300·λ); relative agreement is what matters
        assert_close(other.scatter_, once.scatter_, rtol=1e-9, atol=1e-9 * float(once.scatter_.max()))
        assert_close(other(x), once(x), rtol=1e-7, atol=1e-7)
    xc = x - x.mean(0)
    ref = xc.T @ xc if once.scatter_.dim() == 2 else (xc * xc).sum(0)
    assert_close(once.scatter_, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_inverse_transform_round_trips(method):
    x = correlated().reshape(2000, 2, 3)  # any feature shape: flattened, and restored
    norm = make(method).fit(x)
    y = norm(x)
    assert y.shape == ((2000, 6) if method == "pca" else x.shape)
    assert_close(norm.inverse_transform(y), x, **TIGHT)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_rank_k_inverse_is_the_best_rank_k_reconstruction(method):
    x = correlated()
    norm = make(method, rank=3).fit(x)
    mu = x.mean(0)
    _, u = torch.linalg.eigh(cov(x))
    uk = u[:, -3:]  # top-3 eigenvectors
    best = mu + (x - mu) @ uk @ uk.T
    assert_close(norm.inverse_transform(norm(x)), best, **TIGHT)
    if method == "zca":  # ZCA with rank: D outputs, covariance = the projector U_k U_kᵀ
        assert_close(cov(norm(x)), uk @ uk.T, rtol=0, atol=1e-8)


def test_more_features_than_samples_is_finite_warns_and_documents_eps():
    x = correlated(n=5, d=10)
    with pytest.warns(UserWarning, match=r"fewer samples \(n=5\) than features \(D=10\).*eps"):
        norm = InputNormalizer(method="zca", eps=1e-3, dtype=F64).fit(x)
    y = norm(x)
    assert torch.isfinite(y).all()
    # rank 4 covariance: the 4 directions with variance are whitened to λ/(λ+ε) ≈ 1, the other
    # 6 carry nothing: cov(y) = Σ(Σ + εI)⁻¹ exactly.
    sigma = cov(x)
    ref = sigma @ torch.linalg.inv(sigma + 1e-3 * torch.eye(10, dtype=F64))
    assert_close(cov(y), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky", "standardize"])
def test_constant_feature_is_finite_maps_to_zero_and_warns(method):
    x = correlated(d=4)
    x = torch.cat([x[:, :2], torch.full((2000, 1), 7.0, dtype=F64), x[:, 2:]], 1)
    with pytest.warns(UserWarning, match=r"constant feature\(s\) \[2\].*eps"):
        norm = make(method, d=5, eps=1e-10).fit(x)
    y = norm(x)
    assert torch.isfinite(y).all()
    if method != "pca":  # the constant coordinate itself maps to 0 (ε-regularised 0/0)
        assert y[:, 2].abs().max() < 1e-9
    keep = [0, 1, 3, 4] if method != "pca" else [0, 1, 2, 3]  # PCA: the null direction is last
    # the other features are whitened up to the ε bias ε/λ_min ≲ 1e-10/0.05 and round-off
    block = cov(y)[keep][:, keep]
    if method == "standardize":  # unit variances, correlations kept
        block = block.diagonal()
    assert_close(block, torch.eye(4, dtype=F64) if block.dim() == 2 else torch.ones(4, dtype=F64),
                 rtol=0, atol=1e-7)


def test_center_never_warns_on_constant_features(recwarn):
    make("center", d=2).fit(torch.ones(10, 2, dtype=F64))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_errors_name_the_values_and_the_fix():
    x = correlated(n=50, d=4)
    with pytest.raises(NotFittedError, match=r"not fitted: call \.fit"):
        InputNormalizer(4)(x)
    with pytest.raises(NotFittedError, match="not fitted"):
        InputNormalizer(4).inverse_transform(x)
    norm = make("zca", d=4).fit(x)
    with pytest.raises(ShapeError, match=r"fitted on 4 features, got 5"):
        norm(torch.randn(3, 5, dtype=F64))
    with pytest.raises(ShapeError, match=r"batch dimension"):
        norm(torch.randn(4, dtype=F64))
    with pytest.raises(ShapeError, match=r"expects 4 features per sample, got 6"):
        norm.partial_fit(torch.randn(3, 6, dtype=F64))
    with pytest.raises(ShapeError, match=r"expects 2 features .* got 4"):
        make("pca", d=4, rank=2).fit(x).inverse_transform(x)
    with pytest.raises(ConfigError, match=r"rank must be a positive int .* got 0"):
        InputNormalizer(4, method="pca", rank=0)
    with pytest.raises(ConfigError, match=r"rank must be a positive int .* got -1"):
        InputNormalizer(method="zca", rank=-1)
    with pytest.raises(ConfigError, match=r"rank=5 exceeds the number of features D=4"):
        InputNormalizer(4, method="pca", rank=5)
    with pytest.raises(ConfigError, match=r"rank=5 exceeds the number of features D=4"):
        InputNormalizer(method="pca", rank=5).fit(x)  # D inferred at fit
    with pytest.raises(ConfigError, match=r"rank=2 needs principal components.*'standardize'"):
        InputNormalizer(4, method="standardize", rank=2)
    with pytest.raises(ConfigError, match=r"eps must be a number > 0.*got 0"):
        InputNormalizer(4, eps=0)
    with pytest.raises(ConfigError, match=r"method must be one of .*got 'whiten'"):
        InputNormalizer(4, method="whiten")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="no samples"):
        InputNormalizer(4).fit([])
    assert issubclass(NotFittedError, ValueError)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lazy", [False, True])
def test_state_dict_round_trip_into_a_fresh_module(method, lazy):
    x = correlated(n=200).reshape(200, 3, 2)
    kw = {"rank": 3} if method in ("pca", "zca") else {}
    norm = make(method, **kw).fit(x[:150])
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make(method, d=None if lazy else 6, **kw)
    fresh.load_state_dict(state)
    assert fresh.n_features_in_ == 6
    assert_close(fresh(x), norm(x), rtol=0, atol=0)
    assert_close(fresh.inverse_transform(fresh(x)), norm.inverse_transform(norm(x)), rtol=0, atol=0)
    # streaming continues from the loaded statistics
    fresh.partial_fit(x[150:])
    assert_close(fresh.matrix_, make(method, **kw).fit(x).matrix_, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_of_transform_and_inverse(method):
    x = correlated(n=40, d=4)
    norm = make(method, d=4, eps=1e-6).fit(x)
    xi = x[:5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(norm, (xi,))
    yi = norm(x[:5]).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(norm.inverse_transform, (yi,))


@pytest.mark.parametrize("method", ["zca", "pca", "standardize"])
def test_compile_fullgraph_matches_eager(method, dynamo_reset):
    x = correlated(n=100).to(torch.float32).reshape(100, 2, 3)
    norm = InputNormalizer(method=method).fit(x)  # float32 buffers
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    # backend="eager" runs the same aten ops: only op-order noise of float32 (~1e-7 relative)
    assert_close(compiled(x), norm(x), rtol=1e-6, atol=1e-6)


def test_first_layer_of_a_sequential_trains():
    x = correlated(n=64).to(torch.float32).reshape(64, 1, 2, 3)
    norm = InputNormalizer(method="zca", eps=1e-6).fit(x)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(6, 3))
    loss = model(x).square().mean()
    loss.backward()
    assert model[2].weight.grad is not None and list(norm.parameters()) == []
    assert {"0.n_samples_seen_", "0.mean_", "0.matrix_"} <= set(model.state_dict())
    assert norm(x).dtype == torch.float32


def test_fits_digits_images_with_their_constant_pixels():
    from normkit.experiments.data import load_dataset

    ds = load_dataset("digits", subset=400)
    with pytest.warns(UserWarning, match=r"constant feature"):
        norm = InputNormalizer(method="zca").fit(ds.x_train)
    y = norm(ds.x_train)
    assert y.shape == ds.x_train.shape and torch.isfinite(y).all()
    assert tuple(norm.feature_shape_.tolist()) == (1, 8, 8) and norm.n_features_in_ == 64


# ------------------------------------------------------------ scikit-learn's conventions
np = pytest.importorskip("numpy")


@pytest.mark.parametrize("method", METHODS)
def test_numpy_in_numpy_out_tensor_in_tensor_out(method):
    x = correlated(n=300)
    kw = {"rank": 4} if method == "pca" else {}
    via_numpy = make(method, d=None, **kw)
    y = via_numpy.fit_transform(x.numpy())
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    ref = make(method, d=None, **kw).fit(x)
    assert_close(torch.from_numpy(y), ref.transform(x), rtol=0, atol=0)  # the same computation
    back = via_numpy.inverse_transform(y)
    assert isinstance(back, np.ndarray) and back.shape == (300, 6)
    assert_close(torch.from_numpy(back), ref.inverse_transform(ref(x)), rtol=0, atol=0)
    assert isinstance(via_numpy.transform(x), torch.Tensor)  # the input's kind, not the fit's


def test_numpy_integer_data_becomes_float64_and_partial_fit_takes_arrays():
    x = np.arange(40, dtype=np.int64).reshape(10, 4) % 7
    norm = InputNormalizer(method="standardize")
    for chunk in np.array_split(x, 3):
        norm.partial_fit(chunk)
    y = norm.transform(x)
    assert y.dtype == np.float64
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-6)  # float32 buffers (torch's default dtype)


@pytest.mark.parametrize(("x", "error", "match"), [
    (np.ones(5), ShapeError, r"1-D array of shape \(5,\); reshape it with x\.reshape\(-1, 1\)"),
    (torch.ones(5), ShapeError, r"1-D tensor of shape \(5,\); add one with x\.unsqueeze\(0\)"),
    ([[1.0, 2.0], [3.0, 4.0]], ShapeError, r"expects a torch\.Tensor or a numpy array .* got list"),
    (np.array([["a", "b"], ["c", "d"]]), ConfigError, r"numeric data, got a numpy array of dtype"),
])
def test_bad_inputs_name_what_they_got(x, error, match):
    norm = InputNormalizer(method="center").fit(torch.randn(4, 2))
    with pytest.raises(error, match=match):
        norm.transform(x)


def test_unfitted_transform_raises_a_clear_error():
    norm = InputNormalizer(3, method="zca")
    for call in (lambda: norm.transform(np.ones((2, 3))), lambda: norm.scale_,
                 lambda: norm.inverse_transform(torch.ones(2, 3))):
        with pytest.raises(NotFittedError, match=r"is not fitted: call \.fit"):
            call()
    assert not hasattr(norm, "n_features_in_") and not norm.__sklearn_is_fitted__()


def test_get_params_mirror_the_constructor_and_set_params_validates():
    args = dict(num_features=None, method="pca", eps=1, rank=2, device=None, dtype=F64)
    norm = InputNormalizer(**args)
    params = norm.get_params(deep=True)
    assert params.keys() == args.keys() and all(params[k] is args[k] for k in args)  # unchanged
    norm.fit(10 * correlated(n=100))  # variances >> eps = 1
    assert norm.get_params()["num_features"] is None and norm.n_features_in_ == 6
    assert norm.set_params(rank=3) is norm and norm.rank == 3
    assert not norm.__sklearn_is_fitted__()  # a new configuration drops the fit
    with pytest.raises(ConfigError, match=r"rank=3 needs principal components: .* not 'center'"):
        norm.set_params(method="center")
    assert norm.method == "pca"  # a refused set_params changes nothing
    with pytest.raises(ConfigError,
                       match=r"no parameter\(s\) \['ranks'\]; valid: \['num_features'"):
        norm.set_params(ranks=2)


def test_fitted_attributes_end_in_an_underscore():
    x = correlated(n=500)
    std = make("standardize").fit(x)
    assert_close(std.scale_, (x.var(0, correction=0) + 1e-12).sqrt(), **TIGHT)
    assert_close(std.mean_, x.mean(0), **TIGHT)
    assert int(std.n_samples_seen_) == 500 and std.n_features_in_ == 6
    pca = make("pca", rank=3).fit(x)
    comp = pca.components_
    assert comp.shape == (3, 6)
    assert_close(comp @ comp.T, torch.eye(3, dtype=F64), **TIGHT)  # orthonormal axes
    lam, vec = torch.linalg.eigh(cov(x))
    top = vec[:, [-1, -2, -3]].T  # by decreasing variance, up to sign
    assert_close((comp * top).sum(1).abs(), torch.ones(3, dtype=F64), **TIGHT)
    with pytest.raises(ConfigError, match=r"components_ are the principal axes of method='pca'"):
        _ = std.components_


def test_old_attribute_names_warn_and_old_checkpoints_load():
    x = correlated(n=200)
    norm = make("zca").fit(x)
    for old, new in (("count", "n_samples_seen_"), ("mean", "mean_"), ("scatter", "scatter_"),
                     ("matrix", "matrix_"), ("inverse_matrix", "inverse_matrix_"),
                     ("feature_shape", "feature_shape_")):
        with pytest.warns(DeprecationWarning, match=rf"InputNormalizer\.{old} is deprecated; "
                                                    rf"use \.{new}"):
            assert getattr(norm, old) is getattr(norm, new)
    v1 = {k.rstrip("_").replace("n_samples_seen", "count"): v for k, v in norm.state_dict().items()}
    fresh = make("zca", d=None)
    fresh.load_state_dict(v1)  # a version-1 checkpoint (names without the underscore)
    assert_close(fresh(x), norm(x), rtol=0, atol=0)


def test_refit_without_num_features_infers_again():
    norm = InputNormalizer(method="center").fit(torch.randn(5, 3))
    assert norm.fit(torch.randn(5, 4)).n_features_in_ == 4
    with pytest.raises(ShapeError, match=r"fit expects a tensor, an array or an iterable .* got int"):
        norm.fit(3)


def test_sklearn_clone_and_pipeline():
    base = pytest.importorskip("sklearn.base")
    pipeline = pytest.importorskip("sklearn.pipeline")
    linear = pytest.importorskip("sklearn.linear_model")
    norm = InputNormalizer(method="zca", eps=1e-6, dtype=F64)
    twin = base.clone(norm)
    assert twin is not norm and twin.get_params() == norm.get_params()
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 4)) @ g.normal(size=(4, 4)) + 5.0
    y = (x[:, 0] - x[:, 1] > 0).astype(int)
    pipe = pipeline.Pipeline([("norm", norm), ("clf", linear.LogisticRegression())])
    pipe.fit(x, y)
    assert pipe.predict(x).shape == (200,) and pipe.score(x, y) > 0.9
    assert pipe.named_steps["norm"].n_features_in_ == 4
    assert isinstance(base.clone(pipe).fit(x, y).predict(x), np.ndarray)
    validation = pytest.importorskip("sklearn.utils.validation")
    validation.check_is_fitted(norm)  # via __sklearn_is_fitted__ and __sklearn_tags__
    exceptions = pytest.importorskip("sklearn.exceptions")
    with pytest.raises(exceptions.NotFittedError, match="not fitted"):
        validation.check_is_fitted(base.clone(norm))
