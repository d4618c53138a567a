"""Tests for the three-loss Distiller and the coefficient method."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_antman._keras import keras
from keras_antman.distill import DistillationCoefficients
from keras_antman.distill import DistillationTerm
from keras_antman.distill import Distiller
from keras_antman.distill import LogitsKLDivergence
from keras_antman.distill import LogitsMeanSquaredError
from keras_antman.distill import Perplexity
from keras_antman.distill import calibrate_coefficients
from keras_antman.distill import coefficients_from_losses

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, V_IN, C = 6, 5, 9, 7  # batch, timesteps, input ids, classes


# NumPy references ----------------------------------------------------------

def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_terms(student, teacher, y, temperature=1.0):
    """Per-position label CE, logit MSE and T^2-scaled KL(teacher||student)."""
    ce = -np.take_along_axis(np_log_softmax(student), y[..., None], -1)[..., 0]
    mse = np.mean((student - teacher) ** 2, axis=-1)
    log_p = np_log_softmax(teacher / temperature)
    log_q = np_log_softmax(student / temperature)
    kl = temperature**2 * np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return ce, mse, kl


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_l1(student, teacher):
    return np.mean(np.abs(student - teacher), axis=-1)


def np_term_gradients(student, teacher, y, temperature):
    """d(term mean over all positions)/d(student logits), by term name."""
    n = student.size // student.shape[-1]
    onehot = np.eye(student.shape[-1])[y]
    return {
        "target_loss": (np_softmax(student) - onehot) / n,
        "mse_loss": 2.0 * (student - teacher) / student.size,
        "kl_loss": temperature * (np_softmax(student / temperature)
                                  - np_softmax(teacher / temperature)) / n,
        "l1_loss": np.sign(student - teacher) / student.size,
    }


def np_reduce(values, weight=None, mask=None):
    """Keras "sum_over_batch_size": sum(w * l) / (positions, or unmasked)."""
    weight = np.ones_like(values) if weight is None else weight
    weight = np.broadcast_to(weight.reshape(weight.shape + (1,) * (
        values.ndim - weight.ndim)), values.shape)
    if mask is None:
        return (values * weight).sum() / values.size
    return (values * weight * mask).sum() / mask.sum()


# Models whose logits are a lookup table: logits[b, t] = table[x[b, t]] ------

def table_model(table, mask_zero=False, name=None, initializer="uniform"):
    inputs = keras.Input((T,), dtype="int32")
    layer = keras.layers.Embedding(V_IN, C, mask_zero=mask_zero,
                                   embeddings_initializer=initializer)
    model = keras.Model(inputs, layer(inputs), name=name)
    layer.set_weights([table.astype("float32")])
    return model


@pytest.fixture
def tables(rng):
    return (rng.normal(size=(V_IN, C)) * 2.0, rng.normal(size=(V_IN, C)) * 2.0)


@pytest.fixture
def batch(rng):
    x = rng.integers(1, V_IN, size=(B, T)).astype("int32")
    y = rng.integers(0, C, size=(B, T)).astype("int32")
    return x, y


def evaluate(distiller, x, y, **kwargs):
    return distiller.evaluate(x, y, batch_size=len(x), verbose=0,
                              return_dict=True, **kwargs)


# Loss terms ----------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_term_matches_numpy(tables, batch, temperature):
    s_table, t_table = tables
    x, y = batch
    d = Distiller(student=table_model(s_table), teacher=table_model(t_table))
    d.compile(c_target=0.7, c_mse=3.0, c_kl=11.0, temperature=temperature)
    result = evaluate(d, x, y)
    ce, mse, kl = np_terms(s_table[x], t_table[x], y, temperature)
    expected = {"target_loss": ce.mean(), "mse_loss": mse.mean(),
                "kl_loss": kl.mean()}
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=1e-5)
    total = 0.7 * ce.mean() + 3.0 * mse.mean() + 11.0 * kl.mean()
    np.testing.assert_allclose(result["loss"], total, rtol=1e-5)


def l1_term(**kwargs):
    """A fourth term, for tests: mean |S - T| over the class axis."""
    return DistillationTerm("l1_loss", "c_l1",
                            keras.losses.MeanAbsoluteError(), **kwargs)


def test_a_fourth_term_is_one_more_entry(tables, batch, tmp_path):
    s_table, t_table = tables
    x, y = batch
    d = Distiller(student=table_model(s_table), teacher=table_model(t_table))
    d.compile(c_target=0.7, c_mse=3.0, c_kl=11.0, extra_terms=[l1_term()],
              c_l1=5.0)
    assert (d.c_target, d.c_mse, d.c_kl, d.c_l1) == (0.7, 3.0, 11.0, 5.0)
    result = evaluate(d, x, y)
    ce, mse, kl = np_terms(s_table[x], t_table[x], y)
    l1 = np_l1(s_table[x], t_table[x])
    np.testing.assert_allclose(result["l1_loss"], l1.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        result["loss"],
        0.7 * ce.mean() + 3.0 * mse.mean() + 11.0 * kl.mean()
        + 5.0 * l1.mean(), rtol=1e-5)

    # Without `c_l1`, the term's own coefficient; a new compile replaces
    # the terms and their trackers.
    d.compile(c_kl=0.0, extra_terms=[l1_term(coefficient=0.5)])
    assert (d.c_kl, d.c_l1) == (0.0, 0.5)
    result = evaluate(d, x, y)
    assert sorted(result) == ["kl_loss", "l1_loss", "loss", "mse_loss",
                              "target_loss"]
    np.testing.assert_allclose(
        result["loss"], ce.mean() + mse.mean() + 0.5 * l1.mean(), rtol=1e-5)
    d.compile()
    assert "l1_loss" not in evaluate(d, x, y)
    with pytest.raises(AttributeError, match="no attribute 'c_l1'"):
        d.c_l1

    d.compile(extra_terms=[l1_term()], c_l1=5.0)
    d.fit(x, y, batch_size=B, epochs=1, verbose=0)
    d.save(tmp_path / "four.keras")
    loaded = keras.models.load_model(tmp_path / "four.keras")
    assert loaded.c_l1 == 5.0
    a, b = evaluate(d, x, y), evaluate(loaded, x, y)
    assert set(a) == set(b) >= {"loss", "target_loss", "l1_loss"}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)


def test_student_regularization_is_added(tables, batch):
    s_table, t_table = tables
    x, y = batch
    inputs = keras.Input((T,), dtype="int32")
    layer = keras.layers.Embedding(
        V_IN, C, embeddings_regularizer=keras.regularizers.L2(0.01))
    student = keras.Model(inputs, layer(inputs))
    layer.set_weights([s_table.astype("float32")])
    d = Distiller(student=student, teacher=table_model(t_table))
    d.compile(c_target=1.0, c_mse=2.0, c_kl=3.0)
    result = evaluate(d, x, y)
    ce, mse, kl = np_terms(s_table[x], t_table[x], y)
    total = ce.mean() + 2 * mse.mean() + 3 * kl.mean()
    np.testing.assert_allclose(
        result["loss"], total + 0.01 * np.sum(s_table**2), rtol=1e-5)


def test_unlabeled_data_without_target_term(tables, batch):
    s_table, t_table = tables
    x, _ = batch
    d = Distiller(student=table_model(s_table), teacher=table_model(t_table))
    d.compile(keras.optimizers.SGD(0.1), c_target=0.0, c_mse=1.0, c_kl=1.0)
    history = d.fit(x, batch_size=B, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]


def test_loss_objects_match_numpy(rng):
    s, t = rng.normal(size=(3, 4, C)), rng.normal(size=(3, 4, C))
    y = rng.integers(0, C, size=(3, 4))
    _, mse, kl = np_terms(s, t, y, temperature=3.0)
    np.testing.assert_allclose(
        float(LogitsMeanSquaredError()(t, s)), mse.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(LogitsKLDivergence(temperature=3.0)(t, s)), kl.mean(),
        rtol=1e-5)
    assert float(LogitsKLDivergence()(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("zero", ["c_target", "c_mse", "c_kl"])
def test_zero_coefficient_removes_its_term(tables, batch, zero):
    s_table, t_table = tables
    x, y = batch
    coefficients = {"c_target": 2.0, "c_mse": 3.0, "c_kl": 5.0}
    coefficients[zero] = 0.0
    d = Distiller(student=table_model(s_table), teacher=table_model(t_table))
    d.compile(**coefficients)
    result = evaluate(d, x, y)
    terms = dict(zip(["c_target", "c_mse", "c_kl"], [
        result["target_loss"], result["mse_loss"], result["kl_loss"]]))
    assert terms[zero] > 0.01  # still reported ...
    total = sum(coefficients[k] * terms[k] for k in terms)
    np.testing.assert_allclose(result["loss"], total, rtol=1e-5)  # ... unused
    if zero == "c_target":  # the labels no longer matter
        other = evaluate(d, x, (y + 1) % C)
        np.testing.assert_allclose(other["loss"], result["loss"], rtol=1e-6)


def test_masked_positions_contribute_nothing(tables, rng):
    s_table, t_table = tables
    x = rng.integers(1, V_IN, size=(B, T)).astype("int32")
    lengths = np.array([5, 3, 1, 4, 2, 5])
    mask = np.arange(T)[None, :] < lengths[:, None]
    x[~mask] = 0  # padding id; Embedding(mask_zero=True) masks it
    y = rng.integers(0, C, size=(B, T)).astype("int32")

    def run(s_tab, t_tab, labels):
        d = Distiller(student=table_model(s_tab, mask_zero=True),
                      teacher=table_model(t_tab, mask_zero=True))
        d.compile(c_target=1.0, c_mse=2.0, c_kl=3.0, temperature=2.0,
                  metrics=[Perplexity()])
        return evaluate(d, x, labels)

    first = run(s_table, t_table, y)
    ce, mse, kl = np_terms(s_table[x], t_table[x], y, temperature=2.0)
    np.testing.assert_allclose(first["target_loss"], np_reduce(ce, mask=mask),
                               rtol=1e-5)
    np.testing.assert_allclose(first["mse_loss"], np_reduce(mse, mask=mask),
                               rtol=1e-5)
    np.testing.assert_allclose(first["kl_loss"], np_reduce(kl, mask=mask),
                               rtol=1e-5)
    np.testing.assert_allclose(first["perplexity"], np.exp(ce[mask].mean()),
                               rtol=1e-5)

    # Change every logit and label at masked positions (table row 0).
    s2, t2 = s_table.copy(), t_table.copy()
    s2[0] += 50.0
    t2[0] = -t2[0] * 7.0
    y2 = np.where(mask, y, (y + 3) % C)
    second = run(s2, t2, y2)
    for name in first:
        np.testing.assert_allclose(second[name], first[name], rtol=1e-6)


@pytest.mark.parametrize("per_timestep", [False, True])
def test_sample_weights(tables, batch, rng, per_timestep):
    s_table, t_table = tables
    x, y = batch
    shape = (B, T) if per_timestep else (B,)
    w = rng.uniform(0.0, 2.0, size=shape).astype("float32")
    d = Distiller(student=table_model(s_table), teacher=table_model(t_table))
    d.compile(c_target=1.0, c_mse=2.0, c_kl=3.0,
              weighted_metrics=[Perplexity()])
    result = evaluate(d, x, y, sample_weight=w)
    ce, mse, kl = np_terms(s_table[x], t_table[x], y)
    expected = [np_reduce(v, weight=w) for v in (ce, mse, kl)]
    for name, value in zip(["target_loss", "mse_loss", "kl_loss"], expected):
        np.testing.assert_allclose(result[name], value, rtol=1e-5)
    np.testing.assert_allclose(
        result["loss"], expected[0] + 2 * expected[1] + 3 * expected[2],
        rtol=1e-5)
    wb = np.broadcast_to(w.reshape(shape + (1,) * (2 - w.ndim)), ce.shape)
    np.testing.assert_allclose(result["perplexity"],
                               np.exp((ce * wb).sum() / wb.sum()), rtol=1e-5)


def test_perplexity_metric():
    m = Perplexity()
    m.update_state([[0, 1]], [[[0.0, 0.0], [0.0, 0.0]]])
    assert float(m.result()) == pytest.approx(2.0, rel=1e-6)
    assert Perplexity.from_config(m.get_config()).name == "perplexity"


# Training ------------------------------------------------------------------

def classifier_task(seed=0, n=256):
    keras.utils.set_random_seed(seed)
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype("float32")
    teacher = keras.Sequential([keras.Input((8,)),
                                keras.layers.Dense(32, activation="tanh"),
                                keras.layers.Dense(5)], name="teacher")
    y = np.argmax(teacher.predict(x, verbose=0), axis=-1)
    return x, y, teacher


def small_student(seed, name="student"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)),
                             keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(5)], name=name)


def test_student_learns_and_teacher_is_frozen():
    x, y, teacher = classifier_task()
    student = small_student(1)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]
    d = Distiller(student=student, teacher=teacher)
    d.compile(keras.optimizers.Adam(0.03), c_target=1.0, c_mse=1.0,
              c_kl=1.0, metrics=["sparse_categorical_accuracy"])
    assert not teacher.trainable
    assert {id(v) for v in d.trainable_variables} == {
        id(v) for v in student.trainable_variables}
    start = evaluate(d, x, y)
    history = d.fit(x, y, batch_size=32, epochs=8, verbose=0)
    end = evaluate(d, x, y)
    for name in ["loss", "target_loss", "mse_loss", "kl_loss"]:
        assert end[name] < 0.5 * start[name], name
        assert name in history.history
    assert end["sparse_categorical_accuracy"] > 0.8
    for a, b in zip(teacher_before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)
               for a, b in zip(student_before, student.get_weights()))
    # The distiller predicts with the student.
    np.testing.assert_allclose(d.predict(x[:4], verbose=0),
                               student.predict(x[:4], verbose=0), rtol=1e-6)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError(f"interrupted after epoch {epoch}")


def test_backup_and_restore_resumes_where_it_stopped(tmp_path):
    x, y, teacher = classifier_task()

    def run(student_seed, callbacks):
        d = Distiller(student=small_student(student_seed), teacher=teacher)
        d.compile(keras.optimizers.Adam(0.01), c_mse=2.0, c_kl=3.0)
        history = d.fit(x, y, batch_size=64, epochs=4, shuffle=False,
                        verbose=0, callbacks=callbacks)
        return d, history

    straight, _ = run(1, [])
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted after epoch 1"):
        run(1, [keras.callbacks.BackupAndRestore(backup), Interrupt(1)])
    # A new process would build new models: another seed, restored weights.
    resumed, history = run(2, [keras.callbacks.BackupAndRestore(backup)])
    assert history.epoch == [2, 3]
    assert int(resumed.optimizer.iterations) == 4 * 4
    for a, b in zip(straight.student.get_weights(),
                    resumed.student.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_and_early_stopping(tmp_path):
    x, y, teacher = classifier_task()
    d = Distiller(student=small_student(1), teacher=teacher)
    d.compile(keras.optimizers.Adam(0.01), c_mse=2.0, c_kl=3.0)
    path = str(tmp_path / "best.weights.h5")
    callbacks = [
        # Term trackers have no direction Keras knows of: pass mode.
        keras.callbacks.ModelCheckpoint(path, monitor="val_kl_loss",
                                        mode="min", save_best_only=True,
                                        save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1),
    ]
    history = d.fit(x[:192], y[:192], validation_data=(x[192:], y[192:]),
                    batch_size=64, epochs=3, verbose=0, callbacks=callbacks)
    assert os.path.isfile(path)
    restored = Distiller(student=small_student(7), teacher=teacher)
    restored.compile(c_mse=2.0, c_kl=3.0)
    restored.load_weights(path)
    result = evaluate(restored, x[192:], y[192:])
    np.testing.assert_allclose(result["kl_loss"],
                               min(history.history["val_kl_loss"]), rtol=1e-4)


def test_tensorboard_logs_each_term(tmp_path):
    pytest.importorskip("tensorboard")
    x, y, teacher = classifier_task(n=64)
    d = Distiller(student=small_student(1), teacher=teacher)
    d.compile(c_mse=2.0, c_kl=3.0)
    d.fit(x, y, validation_data=(x, y), batch_size=32, epochs=1, verbose=0,
          callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "logs"))])
    events = b"".join(
        p.read_bytes() for p in (tmp_path / "logs").rglob("events.out.*"))
    for name in (b"epoch_target_loss", b"epoch_mse_loss", b"epoch_kl_loss"):
        assert name in events


def test_keras_file_round_trip(tmp_path):
    x, y, teacher = classifier_task()
    d = Distiller(student=small_student(1), teacher=teacher)
    d.compile(c_mse=2.0, c_kl=3.0, temperature=2.0, metrics=[Perplexity()])
    d.fit(x, y, batch_size=64, epochs=1, verbose=0)
    d.save(tmp_path / "distiller.keras")
    loaded = keras.models.load_model(tmp_path / "distiller.keras")
    assert (loaded.c_mse, loaded.c_kl, loaded.temperature) == (2.0, 3.0, 2.0)
    a, b = evaluate(d, x, y), evaluate(loaded, x, y)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)
    assert int(loaded.optimizer.iterations) == 4  # 256 / 64
    assert len(loaded.optimizer.variables) == len(d.optimizer.variables) > 1
    for v, w in zip(d.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(v.numpy(), w.numpy())


MIRRORED = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_antman._keras import keras
    from keras_antman.distill import Distiller

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 3)).astype("float32")
    y = rng.integers(0, 6, size=(64, 4))

    def models():
        keras.utils.set_random_seed(0)
        make = lambda h: keras.Sequential([
            keras.Input((4, 3)), keras.layers.LSTM(h, return_sequences=True),
            keras.layers.Dense(6)])
        return make(3), make(8)

    def run():
        student, teacher = models()
        d = Distiller(student=student, teacher=teacher)
        d.compile(keras.optimizers.SGD(0.5), c_mse=2.0, c_kl=3.0)
        before = d.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
        initial = student.get_weights()
        d.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        moved = max(float(np.abs(a - b).max())
                    for a, b in zip(initial, student.get_weights()))
        return before, student.get_weights(), moved

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        before_2, weights_2, moved_2 = run()
    before_1, weights_1, _ = run()
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync, "moved_2": moved_2,
        "before_2": before_2, "before_1": before_1,
        "max_weight_diff": max(float(np.abs(a - b).max())
                               for a, b in zip(weights_1, weights_2)),
    }))
""")


def test_mirrored_strategy_on_two_logical_cpus():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", MIRRORED], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    for name, value in result["before_1"].items():
        np.testing.assert_allclose(result["before_2"][name], value,
                                   rtol=1e-5)
    # Same updates as on one device: terms are scaled for the replicas.
    assert result["moved_2"] > 1e-3
    assert result["max_weight_diff"] < 1e-5


# Errors --------------------------------------------------------------------

def test_output_shape_mismatch(tables):
    s_table, _ = tables
    inputs = keras.Input((T,), dtype="int32")
    wide = keras.Model(inputs, keras.layers.Embedding(V_IN, C + 1)(inputs))
    with pytest.raises(ValueError, match=(
            r"same shape.*teacher output shape \(None, 5, 8\), "
            r"student output shape \(None, 5, 7\)")):
        Distiller(student=table_model(s_table), teacher=wide)


def test_output_shape_mismatch_of_subclassed_models(tables, batch):
    class Logits(keras.Model):
        def __init__(self, classes):
            super().__init__()
            self.embed = keras.layers.Embedding(V_IN, classes)

        def call(self, x):
            return self.embed(x)

    x, y = batch
    d = Distiller(student=Logits(C), teacher=Logits(C + 2))
    d.compile()
    with pytest.raises(ValueError, match=r"teacher output shape .*9\).*"
                                         r"student output shape .*7\)"):
        d.evaluate(x, y, verbose=0)


def test_argument_errors(tables, batch):
    s_table, t_table = tables
    student, teacher = table_model(s_table), table_model(t_table)
    with pytest.raises(TypeError, match="`teacher` must be a keras.Model. "
                                        "Received: teacher=3"):
        Distiller(student=student, teacher=3)
    with pytest.raises(ValueError, match="must be different models"):
        Distiller(student=student, teacher=student)
    inputs = keras.Input((T,), dtype="int32")
    two = keras.Model(inputs, [inputs, inputs])
    with pytest.raises(ValueError, match="`teacher` must have a single "
                                         "output.*2 outputs"):
        Distiller(student=student, teacher=two)
    d = Distiller(student=student, teacher=teacher)
    with pytest.raises(ValueError, match=r"`c_mse` must be a finite number "
                                         r">= 0. Received: c_mse=-1"):
        d.compile(c_mse=-1)
    with pytest.raises(ValueError, match="at least one of"):
        d.compile(c_target=0, c_mse=0, c_kl=0)
    with pytest.raises(ValueError, match="`temperature` must be a positive"):
        d.compile(temperature=0)
    with pytest.raises(ValueError, match="`loss_weights` is not supported"):
        d.compile(loss_weights=[1.0])
    with pytest.raises(ValueError, match="`extra_terms` must hold "
                                         "DistillationTerm objects"):
        d.compile(extra_terms=[keras.losses.MeanAbsoluteError()])
    with pytest.raises(ValueError, match=r"own `name` and `argument`; "
                                         r"'mse_loss' \('c_l1'\) repeats "
                                         r"'mse_loss' \('c_mse'\)"):
        d.compile(extra_terms=[DistillationTerm(
            "mse_loss", "c_l1", keras.losses.MeanAbsoluteError())])
    x, _ = batch
    with pytest.raises(RuntimeError, match="call `compile"):
        Distiller(student=student, teacher=teacher).compute_loss(x=x)
    d.compile()
    with pytest.raises(ValueError, match="labels `y` are required"):
        d.compute_loss(x=x, y=None)


def test_frozen_student_is_rejected(tables, batch):
    s_table, t_table = tables
    x, y = batch
    student = table_model(s_table, name="frozen")
    student.trainable = False  # as a copy of a frozen teacher would be
    with pytest.raises(ValueError, match=(
            r"student 'frozen' has 0 trainable weights \(of 1\).*"
            r"set `student.trainable = True`")):
        Distiller(student=student, teacher=table_model(t_table))
    with pytest.raises(ValueError, match="'frozen' has 0 trainable weights"):
        calibrate_coefficients(student, table_model(t_table), (x, y))

    class Logits(keras.Model):  # built by fit, so checked there
        def __init__(self):
            super().__init__(name="late")
            self.embed = keras.layers.Embedding(V_IN, C)

        def call(self, x):
            return self.embed(x)

    late = Logits()
    late.trainable = False
    d = Distiller(student=late, teacher=table_model(t_table))
    d.compile()
    with pytest.raises(ValueError, match="'late' has 0 trainable weights"):
        d.fit(x, y, verbose=0)
    student.trainable = True
    Distiller(student=student, teacher=table_model(t_table))


# Coefficients --------------------------------------------------------------

def test_paper_coefficients_from_paper_losses():
    c = coefficients_from_losses(4.110, 0.133, 0.004)
    assert (c.c_target, c.c_mse, c.c_kl) == (1.0, 30.0, 1000.0)
    assert (c.target_loss, c.mse_loss, c.kl_loss) == (4.110, 0.133, 0.004)
    assert c.compile_kwargs() == {"c_target": 1.0, "c_mse": 30.0,
                                  "c_kl": 1000.0}
    exact = coefficients_from_losses(4.110, 0.133, 0.004,
                                     significant_digits=None)
    assert exact.c_mse == pytest.approx(4.110 / 0.133)
    assert exact.c_kl == pytest.approx(1027.5)
    two = coefficients_from_losses(4.110, 0.133, 0.004, significant_digits=2)
    assert (two.c_mse, two.c_kl) == (31.0, 1000.0)
    small = coefficients_from_losses(0.6, 2.0, 0.35)
    assert (small.c_mse, small.c_kl) == (0.3, 2.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"mse_loss": 0.0}, "`mse_loss` must be a finite number > 0"),
    ({"kl_loss": float("nan")}, "`kl_loss` must be a finite number > 0"),
    ({"target_loss": -1.0}, "Received: target_loss=-1.0"),
    ({"significant_digits": 0}, "`significant_digits` must be a positive"),
])
def test_coefficient_errors(kwargs, match):
    args = {"target_loss": 4.0, "mse_loss": 0.1, "kl_loss": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        coefficients_from_losses(**args)


def one_significant_figure(value):
    scale = 10.0 ** math.floor(math.log10(value))
    return round(value / scale) * scale


@pytest.mark.parametrize("validation, reinitialize, extra", [
    (False, False, False), (True, True, True)])
def test_calibrate_coefficients_by_hand(tables, batch, rng, validation,
                                        reinitialize, extra):
    """Each run is one full-batch SGD step on its term alone, in NumPy."""
    s_table, t_table = tables
    x, y = batch
    x_val = rng.integers(1, V_IN, size=(B, T)).astype("int32")
    y_val = rng.integers(0, C, size=(B, T)).astype("int32")
    lr, temperature = 2.0, 2.0
    # A reinitialised copy starts from the zeros initializer.
    student = table_model(s_table, initializer="zeros")
    teacher = table_model(t_table)
    c = calibrate_coefficients(
        student, teacher, (x, y),
        validation_data=(x_val, y_val) if validation else None,
        # Without validation, the last epoch's mean is the loss after the
        # first epoch's single step.
        epochs=1 if validation else 2, batch_size=B,
        optimizer=keras.optimizers.SGD(lr), temperature=temperature,
        reinitialize=reinitialize,
        extra_terms=[l1_term()] if extra else None)

    start = np.zeros_like(s_table) if reinitialize else s_table
    x_eval, y_eval = (x_val, y_val) if validation else (x, y)
    names = ["target_loss", "mse_loss", "kl_loss"] + ["l1_loss"] * extra
    expected = {}
    for name in names:
        gradient = np_term_gradients(start[x], t_table[x], y,
                                     temperature)[name]
        table = start.copy()
        np.add.at(table, x, -lr * gradient)
        s, t = table[x_eval], t_table[x_eval]
        values = dict(zip(["target_loss", "mse_loss", "kl_loss"],
                          np_terms(s, t, y_eval, temperature)))
        values["l1_loss"] = np_l1(s, t)
        expected[name] = values[name].mean()
    assert isinstance(c, DistillationCoefficients)
    assert list(c.losses) == names
    for name in names:
        np.testing.assert_allclose(c.losses[name], expected[name],
                                   rtol=1e-4, err_msg=name)
    # The paper's rule: C_i = L_target / L_i to one significant figure.
    by_hand = {"c_" + name[:-len("_loss")]: one_significant_figure(
        expected["target_loss"] / expected[name]) for name in names}
    assert by_hand["c_target"] == 1.0
    assert c.compile_kwargs() == pytest.approx(by_hand, rel=1e-9)
    assert c.c_mse == pytest.approx(by_hand["c_mse"], rel=1e-9)
    # The input models are left as they were.
    np.testing.assert_array_equal(student.get_weights()[0],
                                  s_table.astype("float32"))
    assert teacher.trainable


def test_calibrate_rejects_a_student_it_cannot_copy():
    class Student(keras.Model):
        def __init__(self, units):
            super().__init__()
            self.dense = keras.layers.Dense(units)

        def call(self, x):
            return self.dense(x)

    x, y, teacher = classifier_task(n=32)
    student = Student(5)
    student(x[:1])
    with pytest.raises(ValueError, match="could not copy `student`"):
        calibrate_coefficients(student, teacher, (x, y))
    with pytest.raises(ValueError, match="`epochs` must be a positive int"):
        calibrate_coefficients(small_student(1), teacher, (x, y), epochs=0)
