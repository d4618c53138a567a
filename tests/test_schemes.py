"""Schemes: forward equals an independently built dense matrix, exact
Table 1 costs, ``from_dense`` initialisation, gradients, the registry and
spec grammar, and errors for bad configs."""

import numpy as np
import pytest
import tensorflow as tf

import keras_antman as am
from keras_antman import schemes
from keras_antman._keras import keras

import reference

ALL = [
    ("dense", lambda: am.Dense(), 24, 40),
    ("lowrank", lambda: am.LowRank(4), 24, 40),
    ("lowrank_fixed_rank", lambda: am.LowRank(rank=5), 24, 40),
    ("lgp_shuffle", lambda: am.LGPShuffle(4), 24, 40),
    ("lgp_dense_mix_first", lambda: am.LGPDense(4), 24, 40),
    ("lgp_dense_mix_after", lambda: am.LGPDense(4), 40, 24),
    ("lowrank_lgp", lambda: am.LowRankLGP(3, 2, 2), 24, 40),
]


def built(make, n, m, seed=0):
    s = make().bind(m)
    s.build((None, n))
    r = np.random.default_rng(seed)
    for w in s.weights:
        w.assign(r.normal(size=w.shape).astype("float32"))
    return s


@pytest.mark.parametrize("name,make,n,m", ALL, ids=[a[0] for a in ALL])
def test_forward_equals_dense_matrix(name, make, n, m, rng):
    s = built(make, n, m)
    w = reference.dense(s)
    assert w.shape == (n, m)
    np.testing.assert_allclose(s.to_dense(), w, rtol=1e-5, atol=1e-5)
    x = rng.normal(size=(5, n)).astype("float32")
    np.testing.assert_allclose(s(x), x @ w, rtol=1e-4, atol=1e-4)
    x3 = rng.normal(size=(2, 3, n)).astype("float32")
    np.testing.assert_allclose(s(x3), x3 @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,make,n,m", ALL, ids=[a[0] for a in ALL])
def test_params_equal_weight_count(name, make, n, m):
    s = built(make, n, m)
    assert s.params() == sum(int(np.prod(w.shape)) for w in s.weights)


@pytest.mark.parametrize("name,make,n,m", ALL, ids=[a[0] for a in ALL])
def test_gradients_reach_every_weight(name, make, n, m, rng):
    s = built(make, n, m)
    x = tf.constant(rng.normal(size=(3, n)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(s(x) ** 2)
    grads = tape.gradient(loss, s.trainable_weights)
    assert len(grads) == len(s.weights)
    for g, w in zip(grads, s.trainable_weights):
        assert g is not None, w.name
        assert np.abs(g.numpy()).sum() > 0, w.name


def test_table1_worked_example():
    # A 1000 x 400 product (m = 1000 outputs, n = 400 inputs): 400K dense.
    n, m = 400, 1000
    assert am.Dense().macs(n, m) == 400_000
    assert am.LGPShuffle(10).macs(n, m) == 40_000
    assert am.LGPDense(10).macs(n, m) == 200_000
    assert am.LowRankLGP(10, 10, 4).macs(n, m) == 24_000
    assert am.LowRank(4).macs(n, m) == 1000 * 400 // 4 + 400 * 400 // 4


def test_table1_general_formulas():
    for n, m, g, r in [(64, 256, 4, 2), (120, 480, 6, 3), (96, 24, 4, 2)]:
        assert am.LGPShuffle(g).params(n, m) == m * n // g
        assert am.LGPDense(g).params(n, m) == m * n // g + min(m, n) ** 2
        assert am.LowRank(r).params(n, m) == m * n // r + n * n // r
        expect = m * n // (r * g) + n * n // (r * g) + n * n // (r * r)
        assert am.LowRankLGP(g, g, r).params(n, m) == expect


def test_shuffle_layout_matches_paper():
    # Group i's j-th output lands at position j * g + i (O^T of [g, m/g]).
    s = built(lambda: am.LGPShuffle(2), 4, 6)
    blocks = s.blocks.numpy()
    x = np.array([[1.0, 2.0, 3.0, 4.0]], "float32")
    v = np.stack([x[0, :2] @ blocks[0], x[0, 2:] @ blocks[1]])  # [g, m/g]
    expected = v.T.reshape(-1)
    np.testing.assert_allclose(s(x)[0], expected, rtol=1e-5)


def test_block_diag_matmul_unshuffled(rng):
    blocks = rng.normal(size=(3, 2, 5)).astype("float32")
    x = rng.normal(size=(4, 6)).astype("float32")
    dense = np.zeros((6, 15), "float32")
    for i in range(3):
        dense[2 * i:2 * i + 2, 5 * i:5 * i + 5] = blocks[i]
    np.testing.assert_allclose(
        schemes.block_diag_matmul(x, blocks), x @ dense, rtol=1e-5, atol=1e-5
    )


def test_from_dense_dense_is_exact(rng):
    w = rng.normal(size=(6, 10)).astype("float32")
    np.testing.assert_array_equal(am.Dense().from_dense(w).to_dense(), w)


def test_from_dense_recovers_matrices_in_the_scheme(rng):
    # A matrix the scheme can represent exactly is recovered exactly.
    for make, n, m in [(lambda: am.LGPShuffle(4), 8, 12),
                       (lambda: am.LowRank(2), 8, 12)]:
        w = built(make, n, m, seed=3).to_dense()
        s = make().from_dense(w)
        np.testing.assert_allclose(s.to_dense(), w, rtol=1e-4, atol=1e-4)


def test_lgp_shuffle_from_dense_keeps_the_support(rng):
    w = rng.normal(size=(8, 12)).astype("float32")
    s = am.LGPShuffle(4).from_dense(w)
    d = s.to_dense()
    support = built(lambda: am.LGPShuffle(4), 8, 12).to_dense() != 0
    np.testing.assert_array_equal(d[support], w[support])
    assert np.all(d[~support] == 0)


@pytest.mark.parametrize("n,m", [(8, 24), (24, 8)])
def test_lgp_dense_from_dense_mix_is_least_squares(n, m, rng):
    w = rng.normal(size=(n, m))
    s = am.LGPDense(4).from_dense(w)
    err = np.linalg.norm(s.to_dense() - w)
    # The block-diagonal part alone (identity mix) is a worse fit.
    d = schemes._block_diag_dense(s.blocks.numpy())
    assert err < np.linalg.norm(d - w)
    # Least squares: the residual is orthogonal to every mix direction.
    resid = s.to_dense() - w
    grad = resid @ d.T if n < m else d.T @ resid
    np.testing.assert_allclose(grad, 0, atol=1e-3)


def test_lowrank_from_dense_is_truncated_svd(rng):
    w = rng.normal(size=(12, 20))
    s = am.LowRank(3).from_dense(w)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    best = (u[:, :4] * sv[:4]) @ vt[:4]
    np.testing.assert_allclose(s.to_dense(), best, rtol=1e-4, atol=1e-4)


def test_lowrank_fixed_rank_cost_and_svd(rng):
    # rank 16 on a 200 -> 800 product: exactly 10x fewer weights and MACs,
    # between the divisors' 8x (r = 10) and 16x (r = 20).
    assert am.LowRank(rank=16).cost(200, 800) == (16_000, 16_000)
    w = rng.normal(size=(12, 20))
    s = am.LowRank(rank=5).from_dense(w)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(s.to_dense(), (u[:, :5] * sv[:5]) @ vt[:5],
                               rtol=1e-4, atol=1e-4)
    again = am.LowRank.from_config(s.scheme.get_config())
    assert (again.rank, again.rank_reduction) == (5, None)
    assert again == s.scheme


def test_lowrank_lgp_from_dense_beats_identity_mix(rng):
    w = rng.normal(size=(16, 32))
    s = am.LowRankLGP(2, 2, 2).from_dense(w)
    arrays = s.weight_arrays()
    arrays_id = dict(arrays, mix=np.eye(8, dtype="float32"))
    identity_mix = (reference.block_diag(arrays["in_blocks"])
                    @ reference.block_diag(arrays["out_blocks"]))
    assert np.linalg.norm(s.to_dense() - w) < np.linalg.norm(
        identity_mix - w)
    assert np.linalg.norm(arrays_id["mix"]) > 0


def test_from_dense_rejects_wrong_shape(rng):
    s = built(lambda: am.LGPShuffle(2), 4, 6)
    with pytest.raises(ValueError, match=r"expects a \[4, 6\] matrix"):
        s.from_dense(np.zeros((4, 8)))
    with pytest.raises(ValueError, match="2-D matrix"):
        am.Dense().from_dense(np.zeros(4))


@pytest.mark.parametrize(
    "make,n,m,pattern",
    [
        (lambda: am.LGPShuffle(7), 200, 800,
         r"LGPShuffle\(groups=7\) cannot compress a 200 -> 800 product.*"
         r"divisible by groups = 7.*groups in \[1, 2, 4, 5, 8, 10,"),
        (lambda: am.LGPDense(3), 10, 40, r"groups in \[1, 2, 5, 10\]"),
        (lambda: am.LowRank(3), 10, 40, r"rank_reduction in \[1, 2, 5, 10\]"),
        (lambda: am.LowRankLGP(2, 1, 2), 10, 40,
         r"groups_in = 2 to divide n = 10 and the rank k = n/r = 5.*"
         r"groups_in in \[1, 5\]"),
        (lambda: am.LowRankLGP(2, 4, 2), 12, 48,
         r"groups_out = 4 to divide the rank k = 6 and m = 48.*"
         r"groups_out in \[1, 2, 3, 6\]"),
        (lambda: am.LowRank(1), 40, 10, r"rank <= m|n/r <= m"),
        (lambda: am.LowRank(rank=11), 40, 10,
         r"LowRank\(rank=11\) cannot .* rank <= min\(n, m\) = 10.*"
         r"rank in 1\.\.10"),
    ],
)
def test_invalid_dims_raise_with_valid_choices(make, n, m, pattern):
    s = make().bind(m, context="lstm_1: recurrent product")
    with pytest.raises(ValueError, match="`lstm_1: recurrent product`: "):
        s.build((None, n))
    with pytest.raises(ValueError, match=pattern):
        make().bind(m).build((None, n))


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: am.LGPShuffle(0), "`groups` must be a positive integer"),
        (lambda: am.LGPDense(2.5), "`groups` must be a positive integer"),
        (lambda: am.LowRank(-1), "`rank_reduction` must be a positive"),
        (lambda: am.LowRank(0), "`rank_reduction` must be a positive"),
        (lambda: am.LowRank(rank=0), "`rank` must be a positive"),
        (lambda: am.LowRank(), "exactly one of `rank_reduction`"),
        (lambda: am.LowRank(2, rank=3), "exactly one of `rank_reduction`"),
        (lambda: am.LowRankLGP(2, "4", 2), "`groups_out` must be a positive"),
        (lambda: am.Dense().bind(0), "`output_dim` must be a positive"),
    ],
)
def test_invalid_hyperparameters_raise(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_unbuilt_scheme_errors():
    with pytest.raises(ValueError, match="not built: pass the dims"):
        am.LGPShuffle(2).params()
    with pytest.raises(ValueError, match="must be built before `to_dense"):
        am.LGPShuffle(2).bind(4).to_dense()
    with pytest.raises(TypeError):
        am.LGPShuffle(2).bind()


def test_get_identifiers():
    assert isinstance(schemes.get(None), am.Dense)
    assert isinstance(schemes.get("dense"), am.Dense)
    s = am.LowRankLGP(2, 4, 3)
    again = schemes.get(keras.saving.serialize_keras_object(s))
    assert again.describe() == s.describe()
    with pytest.raises(ValueError, match="Expected a keras_antman scheme"):
        schemes.get("lgp")
    assert schemes.get("lgp_shuffle:4") == am.LGPShuffle(4)


@pytest.mark.parametrize("spec,expected", [
    ("dense", am.Dense()),
    ("low_rank:4", am.LowRank(4)),
    ("lowrank:rank=16", am.LowRank(rank=16)),
    ("lgp_shuffle:10", am.LGPShuffle(10)),
    ("LGP-Dense:2", am.LGPDense(2)),
    ("low_rank_lgp:10,10,2", am.LowRankLGP(10, 10, 2)),
    ("lowrank_lgp:10, 5, 2", am.LowRankLGP(10, 5, 2)),
])
def test_spec_grammar(spec, expected):
    got = schemes.from_spec(spec)
    assert got == expected
    assert got.describe() == expected.describe()


@pytest.mark.parametrize("spec,pattern", [
    ("svd:2", r"Unknown scheme 'svd'.*'lgp_shuffle'"),
    ("lgp_shuffle:x", "scheme arguments are integers"),
    ("lgp_shuffle:2,3", "Bad arguments in scheme spec"),
    ("lgp_shuffle:0", "`groups` must be a positive integer"),
    ("low_rank:rank=3,rank_reduction=2", "exactly one of"),
])
def test_spec_grammar_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        schemes.from_spec(spec)


def test_registry_maps_spec_names_to_classes():
    class Doubled(am.LGPShuffle):
        spec_name = "doubled_test_only"

    try:
        assert schemes.registry()["doubled_test_only"] is Doubled
        assert schemes.registry()["lgp_shuffle"] is am.LGPShuffle
        assert isinstance(schemes.from_spec("doubled_test_only:2"), Doubled)
    finally:
        schemes.Scheme._registry.pop("doubled_test_only")


def test_legacy_layer_config_loads():
    # Configs written when schemes were layers carry layer keys too.
    config = {"groups": 4, "name": "input_matrix", "output_dim": 32,
              "trainable": True, "context": "lstm: input product"}
    assert am.LGPShuffle.from_config(config) == am.LGPShuffle(4)


def test_standalone_scheme_layer_round_trip(tmp_path, rng):
    model = keras.Sequential(
        [keras.Input((12,)), am.StructuredMatrix(am.LGPShuffle(3), 6)]
    )
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    x = rng.normal(size=(2, 12)).astype("float32")
    model.save(tmp_path / "s.keras")
    restored = keras.models.load_model(tmp_path / "s.keras")
    np.testing.assert_array_equal(restored(x), model(x))
