"""Tests for hardware-guided design: profile, valleys, choose, policy, and
grow-and-prune training."""

import json

import numpy as np
import pytest

import keras_antman as am
from keras_antman import grow_prune as gp
from keras_antman import hardware as hw
from keras_antman import ops
from keras_antman._keras import keras

from conftest import randomize_weights

OP = "op" if ops.is_available() else "portable"
T = 5


def row(hidden, ms, path="op", spec="lgp_shuffle:groups=2", params=None,
        input=None, spread=0.01):
    scheme = am.schemes.from_spec(spec)
    n = input or hidden
    cost = hw._cost(scheme, n, hidden)
    return hw.Row(path, scheme.describe(), spec, hidden, n,
                  params if params is not None else cost[0], cost[1], ms,
                  spread, 5)


# -- profile -------------------------------------------------------------


def test_propose_sizes_fine_steps_and_cache_crossings():
    sizes = hw.propose_sizes(around=(256,), low=64, high=512, coarse=128,
                             caches={"L2": 1 << 20})
    for s in (254, 255, 256, 257, 258, 224, 232, 288, 192, 320, 128, 512):
        assert s in sizes
    assert 259 not in sizes and 296 not in sizes
    # 16 h^2 bytes of Dense recurrent weights cross 1 MiB between 256, 257.
    assert 256 in sizes and 257 in sizes
    g4 = hw.propose_sizes(around=(), low=64, high=1024, coarse=1024,
                          groups=(4,), caches={"L2": 1 << 20})
    assert g4 == [512, 513, 1024]


def test_profile_table_persists_and_is_reused(tmp_path, monkeypatch):
    built = []
    make = hw._make_layer
    monkeypatch.setattr(hw, "_make_layer",
                        lambda *a: built.append(a) or make(*a))
    kw = dict(steps=T, schemes=["dense", "lgp_shuffle:2", "lgp_shuffle:3"],
              paths=("keras", OP), repeats=3, warmup=1, cache=tmp_path,
              progress=False)
    p = hw.profile([8, 16], **kw)
    # LGPShuffle(3) cannot split 8 or 16: skipped, not an error.
    assert [(r.path, r.spec, r.hidden) for r in p.rows] == [
        ("keras", "dense", 8), (OP, "dense", 8),
        (OP, "lgp_shuffle:groups=2", 8),
        ("keras", "dense", 16), (OP, "dense", 16),
        (OP, "lgp_shuffle:groups=2", 16)]
    assert p.measured == 6 and len(built) == 6
    dense8 = p.rows[0]
    assert (dense8.params, dense8.macs) == (2 * 8 * 32 + 32, 2 * 8 * 32)
    assert p.rows[2].params == (2 * 8 * 32) // 2 + 32
    assert all(r.median_ms > 0 and r.spread_ms >= 0 and r.repeats == 3
               for r in p.rows)
    assert p.key["batch_size"] == 1 and p.key["steps"] == T
    assert "cpu" in p.key and "isa" in p.key and "tensorflow" in p.key

    # The persisted file round-trips.
    assert p.file.startswith(str(tmp_path))
    assert hw.Profile.from_json(p.file).rows == p.rows
    assert hw.Profile.from_json(p.to_json()).rows == p.rows
    assert json.loads(p.to_json())["key"] == p.key

    # Same key: nothing measured again.
    again = hw.profile([8, 16], **kw)
    assert again.measured == 0 and len(built) == 6
    assert again.rows == p.rows
    # A new size resumes: only its configurations are measured.
    more = hw.profile([8, 16, 24], **kw)
    # (24 splits in 3 groups: LGPShuffle(3) is measured there.)
    assert more.measured == 4 and len(built) == 10
    assert more.rows[:6] == p.rows
    assert (OP, "lgp_shuffle:groups=3", 24) in [
        (r.path, r.spec, r.hidden) for r in more.rows]
    # Another key (batch 2): another file, measured afresh, here in two
    # passes of ceil(3 / 2) calls each (every configuration built twice).
    other = hw.profile([8], **kw, batch_size=2, passes=2)
    assert other.file != p.file and other.measured == 3
    assert len(built) == 16 and {r.repeats for r in other.rows} == {4}
    # Timing some rows again: same configurations, new timings.
    again = p.remeasure(p.rows[:2], repeats=3, warmup=1)
    assert [r.config for r in again] == [r.config for r in p.rows[:2]]
    assert len(built) == 18 and {r.repeats for r in again} == {3}


def test_profile_depth_times_a_stack(tmp_path, monkeypatch):
    """``depth=2``: each configuration is a stack of two LSTMs (the first
    reading ``input_size``), its row counts the stack's weights as Keras
    does, and the depth is part of the key (another file)."""
    built = []
    make = hw._make_layer
    monkeypatch.setattr(hw, "_make_layer",
                        lambda *a: built.append(a) or make(*a))
    kw = dict(input_size=12, steps=T, schemes=["dense", "lgp_shuffle:2"],
              paths=("keras", OP), repeats=3, warmup=1, cache=tmp_path,
              progress=False)
    p = hw.profile([8], depth=2, **kw)
    assert p.key["depth"] == 2 and "depth" not in hw.machine_key()
    for r, a in zip(p.rows, built):
        stack = make(*a)
        assert isinstance(stack, keras.Sequential)
        assert [layer.units for layer in stack.layers] == [8, 8]
        assert [layer.return_sequences for layer in stack.layers] == [
            True, False]
        assert r.input == 12 and r.params == stack.count_params()
    assert p.rows[0].params == 4 * 8 * (12 + 8 + 1) + 4 * 8 * (8 + 8 + 1)
    assert p.rows[1].macs == 4 * 8 * (12 + 8) + 4 * 8 * 16
    assert p.rows[2].macs == p.rows[1].macs // 2
    one = hw.profile([8], **kw)
    assert one.file != p.file and one.rows[0].params == 4 * 8 * 21
    again = p.remeasure(p.rows[:1], repeats=2, warmup=1)
    assert built[-1][-1] == 2 and again[0].params == p.rows[0].params
    with pytest.raises(ValueError, match=r"`depth` must be >= 1.*depth=0"):
        hw.profile([8], depth=0, **kw)
    with pytest.raises(ValueError, match=r"stacks of 2 LSTMs.*depth=1"):
        hw.policy(p, budget_ms=1.0)


def test_profile_tflite_path_times_the_layers_conversion(tmp_path,
                                                        monkeypatch):
    """The ``tflite`` path times the interpreter on a conversion of the
    very layer the row describes: its output equals the layer's."""
    import tensorflow as tf

    from keras_antman import benchmark

    layers, outputs = [], []
    make, run = hw._make_layer, benchmark._tflite_fn
    monkeypatch.setattr(hw, "_make_layer",
                        lambda *a: layers.append(make(*a)) or layers[-1])

    def spy(path, x, threads):
        interpreter = tf.lite.Interpreter(model_path=path)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        out = interpreter.get_output_details()[0]["index"]
        outputs.append((x, interpreter.get_tensor(out)))
        return run(path, x, threads)

    monkeypatch.setattr(benchmark, "_tflite_fn", spy)
    p = hw.profile([8], input_size=6, steps=T, threads=1,
                   schemes=["dense", "lgp_shuffle:2"], paths=("tflite",),
                   repeats=3, warmup=1, cache=tmp_path, progress=False)
    assert [(r.path, r.spec) for r in p.rows] == [
        ("tflite", "dense"), ("tflite", "lgp_shuffle:groups=2")]
    assert all(r.median_ms > 0 and r.repeats == 3 for r in p.rows)
    assert len(outputs) == 2
    for layer, (x, got) in zip(layers, outputs):
        np.testing.assert_allclose(got, np.asarray(layer(x)), atol=1e-5)
    assert not list(tmp_path.glob("**/*.tflite"))  # temporary files gone


def test_profile_markdown_and_plot(tmp_path):
    rows = [row(8, 2.0), row(16, 1.0), row(8, 1.0, "keras", "dense")]
    p = hw.Profile({"cpu": "test", "batch_size": 1, "steps": T}, rows,
                   {"caches": {"L2": 4096}})
    text = p.to_markdown()
    assert "| path | scheme | hidden |" in text
    assert text.count("| op | LGPShuffle(groups=2) |") == 2
    assert "**1.000** | 0.010 | yes |" in text
    assert "op LGPShuffle(groups=2) hidden 16: 1.000 ms" in text
    pytest.importorskip("matplotlib")
    p.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_rejects_unknown_path():
    with pytest.raises(ValueError, match=r"`paths` must be among .*'tpu'"):
        hw.profile([8], paths=("keras", "tpu"), cache=False)


# -- valleys and choose ---------------------------------------------------


def test_valleys_on_synthetic_curves():
    curve = [row(8, 1.0), row(16, 2.0), row(24, 1.5), row(32, 3.0),
             row(40, 2.9)]
    found = hw.valleys(curve)
    assert [v.row.hidden for v in found] == [24, 40]
    assert [b.hidden for b in found[0].beats] == [16]
    assert [b.hidden for b in found[1].beats] == [32]
    # 3.0 is not 10% slower than 2.9; 2.0 is more than 10% slower than 1.5.
    assert [v.row.hidden for v in hw.valleys(curve, tolerance=0.1)] == [24]
    assert hw.valleys([row(h, h / 8) for h in (8, 16, 24)]) == []
    # Another path or scheme is another curve.
    mixed = [row(8, 5.0, path="keras", spec="dense"), row(16, 1.0)]
    assert hw.valleys(mixed) == []
    # Beyond the spreads: 2.0 - 0.05 is not above 1.8 + 0.25.
    noisy = [row(8, 2.0, spread=0.1), row(16, 1.8, spread=0.5)]
    assert len(hw.valleys(noisy)) == 1
    assert hw.valleys(noisy, beyond_spread=True) == []
    clear = [row(8, 2.0, spread=0.1), row(16, 1.8, spread=0.1)]
    assert len(hw.valleys(clear, beyond_spread=True)) == 1
    # Dicts (from JSON) work too.
    assert hw.valleys([vars(r) for r in curve])[0].row.hidden == 24


def test_choose_budget_takes_most_capacity_and_prefers_valleys():
    a = [row(8, 2.0), row(16, 1.0)]             # 16 is a valley
    b = [row(8, 0.9, spec="lgp_shuffle:groups=4",
             params=a[1].params)]                # same capacity, faster
    rows = a + b + [row(24, 3.0)]
    chosen = hw.choose(rows, budget_ms=2.5)
    assert (chosen.spec, chosen.hidden) == ("lgp_shuffle:groups=2", 16)
    assert chosen.median_ms <= 2.5
    assert hw.choose(rows, budget_ms=3.0).hidden == 24
    assert hw.choose(rows, budget_ms=0.95).median_ms == 0.9
    with pytest.raises(ValueError, match="no measured configuration runs "
                       r"within budget_ms=0.5; the fastest is op "):
        hw.choose(rows, budget_ms=0.5)
    with pytest.raises(ValueError, match="exactly one of `budget_ms`"):
        hw.choose(rows)


def test_choose_reduction_takes_fastest_not_smallest():
    rows = [row(32, 10.0, spec="dense"), row(8, 2.0), row(16, 1.0),
            row(24, 4.0)]
    base = rows[0].params
    chosen = hw.choose(rows, reduction=base / rows[2].params)
    assert chosen.hidden == 16          # smaller hidden 8 is slower
    assert hw.choose(rows, reduction=base / rows[1].params).hidden == 8
    with pytest.raises(ValueError, match="no Dense row at "
                       "baseline_hidden=64"):
        hw.choose(rows, reduction=2, baseline_hidden=64)


# -- policy ---------------------------------------------------------------


def two_lstms():
    inp = keras.Input((T, 16))
    x = keras.layers.LSTM(16, return_sequences=True, name="a")(inp)
    x = keras.layers.LSTM(8, name="b")(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


def synthetic_profile():
    return hw.Profile({}, [
        row(16, 3.0, "keras", "dense"), row(16, 2.5, "op", "dense"),
        row(16, 1.0, "op", "lgp_shuffle:groups=2"),
        row(16, 0.8, "op", "lgp_shuffle:groups=4"),
        row(8, 0.5, "keras", "dense"), row(8, 1.2, "op", "dense"),
        row(8, 0.7, "op", "lgp_shuffle:groups=2"),
    ])


def test_policy_plugs_into_compress():
    model = two_lstms()
    pick = hw.policy(synthetic_profile(), budget_ms=1.1)
    small = am.compress(model, layers=pick)
    a, b = small.get_layer("a"), small.get_layer("b")
    assert isinstance(a, am.StructuredLSTM)
    assert a.input_scheme == am.LGPShuffle(2)
    assert a.recurrent_scheme == am.LGPShuffle(2)
    # At 8 units the stock layer is the most capacity within budget.
    assert type(b) is keras.layers.LSTM
    assert {k: (r.path, r.spec) for k, r in pick.choices.items()} == {
        "a": ("op", "lgp_shuffle:groups=2"), "b": ("keras", "dense")}
    # A tighter budget picks g=4 for 'a'.
    pick = hw.policy(synthetic_profile(), budget_ms=0.9)
    small = am.compress(model, layers=pick)
    assert small.get_layer("a").recurrent_scheme == am.LGPShuffle(4)


def test_policy_unmeasured_size_raises_or_takes_nearest():
    inp = keras.Input((T, 16))
    model = keras.Model(inp, keras.layers.LSTM(12, name="c")(inp))
    with pytest.raises(ValueError, match=r"layer 'c' has 12 units, a size "
                       r"the profile did not measure \(it has \[8, 16\]\)"):
        am.compress(model, layers=hw.policy(synthetic_profile(),
                                            budget_ms=1.1))
    pick = hw.policy(synthetic_profile(), budget_ms=1.1,
                     on_missing="nearest")
    small = am.compress(model, layers=pick)
    # Nearest of 8 and 16 (a tie) is 16; g=2 fits 16 -> 48 and 12 -> 48.
    assert pick.choices["c"].hidden == 16
    assert small.get_layer("c").recurrent_scheme == am.LGPShuffle(2)


# -- grow and prune -------------------------------------------------------


def lstm_model(units=6, features=4, structured=False):
    inp = keras.Input((T, features))
    if structured:
        layer = am.StructuredLSTM(units, name="lstm", kernel="portable")
    else:
        layer = keras.layers.LSTM(units, name="lstm")
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(layer(inp)))
    randomize_weights(model, seed=3)
    return model


def data(n=8, seed=0):
    r = np.random.default_rng(seed)
    return (r.normal(size=(n, T, 4)).astype("float32"),
            r.normal(size=(n, 2)).astype("float32"))


@pytest.mark.parametrize("structured", [False, True])
def test_find_kernels(structured):
    model = lstm_model(structured=structured)
    found = gp.find_kernels(model)
    assert [(o, k, tuple(v.shape)) for o, k, v in found] == [
        ("lstm", "input", (4, 24)), ("lstm", "recurrent", (6, 24))]
    other = am.compress(model, recurrent_scheme=am.LGPShuffle(2))
    assert [k for _, k, _ in gp.find_kernels(other)] == ["input"]
    with pytest.raises(ValueError, match=r"`layers` names \['nope'\]"):
        gp.find_kernels(model, layers=["nope"])


def test_seed_mask_and_grow_change_exact_counts():
    model = lstm_model()
    masks = gp.KernelMasks(model, initial_density=0.5, seed=1)
    before = masks.mask_arrays()
    assert [int((m == 0).sum()) for m in before] == [48, 72]
    for (_, _, v), m in zip(masks.kernels, before):
        assert np.all(keras.ops.convert_to_numpy(v)[m == 0] == 0)
    r = np.random.default_rng(0)
    grads = [r.normal(size=m.shape) for m in before]
    assert masks.grow(grads, fraction=0.1) == [10, 14]
    after = masks.mask_arrays()
    for m0, m1, g, k in zip(before, after, grads, (10, 14)):
        new = (m1 == 1) & (m0 == 0)
        assert new.sum() == k and np.all(m1[m0 == 1] == 1)
        # The grown ones are the dormant entries of largest |gradient|.
        dormant = np.abs(g[m0 == 0])
        assert np.abs(g[new]).min() >= np.sort(dormant)[-k]
    assert masks.grow([None, grads[1]], fraction=1.0) == [0, 58]


def test_prune_to_removes_smallest_magnitudes_exactly():
    model = lstm_model()
    masks = gp.KernelMasks(model)
    weights = [keras.ops.convert_to_numpy(v) for _, _, v in masks.kernels]
    assert masks.prune_to(0.75) == [72, 108]
    for w, m in zip(weights, masks.mask_arrays()):
        assert int((m == 0).sum()) == round(0.75 * m.size)
        assert np.abs(w[m == 1]).min() >= np.abs(w[m == 0]).max()
    assert masks.prune_to(0.5) == [0, 0]          # never regrows
    assert masks.layer_sparsity() == {"lstm": 0.75}


def test_cubic_ramp():
    assert gp.polynomial_sparsity(0, 0.0, 0.8, 0, 10) == 0.0
    assert gp.polynomial_sparsity(10, 0.0, 0.8, 0, 10) == 0.8
    assert gp.polynomial_sparsity(5, 0.0, 0.8, 0, 10) == pytest.approx(
        0.8 - 0.8 * 0.5 ** 3)
    assert gp.polynomial_sparsity(20, 0.1, 0.8, 0, 10) == 0.8


@pytest.mark.parametrize("structured", [False, True])
def test_pruned_weights_stay_zero_through_fit(structured):
    model = lstm_model(structured=structured)
    masks = gp.KernelMasks(model)
    x, y = data()
    prune = gp.Prune(masks, 0.6, begin_step=0, end_step=2, frequency=1)
    model.compile(keras.optimizers.Adam(0.05), "mse")
    hist = model.fit(x, y, batch_size=2, epochs=2, verbose=0,
                     callbacks=[prune])
    assert len(prune.pruned) == 3
    assert np.sum(prune.pruned, axis=0).tolist() == [58, 86]
    assert hist.history["sparsity/lstm"][-1] == pytest.approx(0.6, abs=0.01)
    trained = [keras.ops.convert_to_numpy(v) for _, _, v in masks.kernels]
    for w, m in zip(trained, masks.mask_arrays()):
        assert np.all(w[m == 0] == 0.0)
    # Without the masks the same training moves the pruned weights.
    masks.detach()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    moved = [keras.ops.convert_to_numpy(v) for _, _, v in masks.kernels]
    assert any(np.any(w[m == 0] != 0.0)
               for w, m in zip(moved, masks.mask_arrays()))


def test_grow_callback_uses_the_given_batch():
    model = lstm_model()
    masks = gp.KernelMasks(model, initial_density=0.25, seed=2)
    x, y = data()
    grow = gp.Grow(masks, (x[:4], y[:4]), fraction=0.1, begin_step=0,
                   end_step=0)
    model.compile(keras.optimizers.SGD(0.0), "mse")  # weights stay put
    expected = grow.gradients(model)
    before = masks.mask_arrays()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[grow])
    assert grow.grown == [[10, 14]]
    for m0, m1, g, k in zip(before, masks.mask_arrays(), expected, (10, 14)):
        new = (m1 == 1) & (m0 == 0)
        assert new.sum() == k
        assert np.abs(g[new]).min() >= np.sort(np.abs(g[m0 == 0]))[-k]


def test_grow_and_prune_in_a_distiller():
    teacher = lstm_model()
    student = lstm_model()
    masks = gp.KernelMasks(student, initial_density=0.5)
    x, y = data()
    d = am.Distiller(student=student, teacher=teacher)
    d.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse",
              c_target=1.0, c_mse=1.0, c_kl=0.0)
    grow = gp.Grow(masks, (x, y), fraction=0.2, end_step=0)
    prune = gp.Prune(masks, 0.7, begin_step=1, end_step=3, frequency=1)
    d.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[grow, prune])
    assert grow.grown == [[19, 29]]
    for (_, _, v), m in zip(masks.kernels, masks.mask_arrays()):
        assert int((m == 0).sum()) == round(0.7 * m.size)
        assert np.all(keras.ops.convert_to_numpy(v)[m == 0] == 0.0)


def test_measure_and_fastest_path():
    model = lstm_model()
    gp.KernelMasks(model).prune_to(0.5)
    x = data(n=1)[0]
    t = hw.measure(model, x, repeats=3, warmup=1)
    assert t.median_ms > 0 and t.repeats == 3
    best, times = hw.fastest_path(model, x, repeats=3, warmup=1)
    assert set(times) == ({"keras", "op"} if ops.is_available()
                          else {"keras"})
    assert times[min(times, key=lambda k: times[k].median_ms)] is not None
    np.testing.assert_allclose(best.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)


# -- errors ------------------------------------------------------------------


def test_profile_and_choose_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"no configuration to measure "
                       r"\(every scheme is invalid for the sizes \[9\]\)"):
        hw.profile([9], schemes=["lgp_shuffle:2"], paths=(OP,),
                   cache=False)
    rows = [row(8, 1.0, spec="dense"), row(16, 2.0)]
    with pytest.raises(ValueError, match=r"`reduction` must be > 0"):
        hw.choose(rows, reduction=0)
    with pytest.raises(ValueError, match=r"no measured configuration "
                       r"reaches reduction=1000"):
        hw.choose(rows, reduction=1000, baseline_hidden=8)
    with pytest.raises(ValueError, match=r"`capacity` must be 'params', "
                       r"'macs' or a callable"):
        hw.choose(rows, budget_ms=3, capacity="flops")
    assert hw.choose(rows, budget_ms=3, capacity=lambda r: -r.hidden
                     ).hidden == 8
    with pytest.raises(ValueError, match=r"`on_missing` must be 'raise' or "
                       r"'nearest'. Received: on_missing='skip'"):
        hw.policy(synthetic_profile(), budget_ms=1, on_missing="skip")


def test_policy_without_a_fitting_scheme_raises():
    inp = keras.Input((T, 6))
    model = keras.Model(inp, keras.layers.LSTM(6, name="d")(inp))
    prof = hw.Profile({}, [row(8, 1.0, spec="lgp_shuffle:groups=4")])
    with pytest.raises(ValueError, match=r"no measured scheme at hidden 8 "
                       r"fits layer 'd' \(6 -> 4 x 6\)"):
        am.compress(model, layers=hw.policy(prof, budget_ms=2,
                                            on_missing="nearest"))


def test_grow_prune_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`initial_density` must be in "
                       r"\[0, 1\]. Received: initial_density=1.5"):
        gp.KernelMasks(lstm_model(), initial_density=1.5)
    dense_only = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"has no kernel to mask"):
        gp.KernelMasks(dense_only)
    masks = gp.KernelMasks(lstm_model())
    with pytest.raises(ValueError, match=r"`frequency` must be >= 1"):
        gp.Prune(masks, 0.5, frequency=0)
    with pytest.raises(ValueError, match=r"`end_step` \(1\) must be >= "
                       r"`begin_step` \(5\)"):
        gp.Prune(masks, 0.5, begin_step=5, end_step=1)
    with pytest.raises(ValueError, match=r"`target_sparsity` must be in "
                       r"\[0, 1\). Received: target_sparsity=1.0"):
        gp.Prune(masks, 1.0)
    with pytest.raises(ValueError, match=r"`fraction` must be in \[0, 1\]"):
        gp.Grow(masks, data(), fraction=2)
