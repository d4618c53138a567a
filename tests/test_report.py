"""`report`: the paper's Table 1 worked example and Table 5 speedups."""

import math

import pytest

import keras_antman as am
from keras_antman._keras import keras


def lstm_model(n_x, units):
    return keras.Sequential(
        [keras.Input((3, n_x)), keras.layers.LSTM(units, name="lstm")])


def test_table1_worked_example_through_a_model():
    # LSTM(250) on 400 inputs: its input product is the paper's 1000 x 400.
    teacher = lstm_model(400, 250)
    expect = {
        am.LGPShuffle(10): 40_000,
        am.LGPDense(10): 200_000,
        am.LowRankLGP(10, 10, 4): 24_000,
    }
    for scheme, macs in expect.items():
        student = am.compress(teacher, input_scheme=scheme)
        rows = {r.part: r for r in am.report(teacher, student).rows}
        assert rows["input"].macs_before == 400_000
        assert rows["input"].macs_after == macs
        assert rows["input"].params_after == macs
        assert rows["input"].scheme_after == scheme.describe()


@pytest.mark.parametrize("scheme,speedup", [
    (am.LGPShuffle(2), 2.0),
    (am.LGPShuffle(10), 10.0),
    (am.LowRankLGP(2, 2, 2), 8 / 3),
    (am.LowRankLGP(10, 10, 2), 8.0),
])
def test_table5_theoretical_speedups(scheme, speedup):
    teacher = lstm_model(100, 100)  # input = hidden = d
    student = am.compress(teacher, input_scheme=scheme,
                          recurrent_scheme=scheme)
    rep = am.report(teacher, student)
    assert math.isclose(rep.recurrent_total.mac_reduction, speedup)
    assert f"{speedup:.2f}x" in str(rep)


def test_report_rows_totals_and_print():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(50, 16, name="emb")(inp)
    h = keras.layers.GRU(16, reset_after=False, name="gru")(h)
    model = keras.Model(inp, keras.layers.Dense(5, name="out")(h))
    student = am.compress(model, recurrent_scheme=am.LGPShuffle(4))
    printed = []
    rep = am.report(model, student, print_fn=printed.append)
    rows = {(r.layer, r.part): r for r in rep.rows}
    assert rows[("emb", "")].params_before == 800
    assert rows[("emb", "")].macs_before == 0
    assert rows[("gru", "recurrent")].macs_before == 16 * 32
    assert rows[("gru", "recurrent")].macs_after == 16 * 32 // 4
    assert rows[("gru", "candidate")].macs_after == 16 * 16 // 4
    assert rows[("out", "")].params_after == 16 * 5 + 5
    assert rep.total.params_before == model.count_params()
    assert rep.total.params_after == student.count_params()
    assert printed == [str(rep)]
    d = rep.to_dicts()
    assert d[-1]["layer"] == "total" and d[-2]["layer"] == "recurrent"


def test_report_of_one_model_and_bidirectional():
    inp = keras.Input((3, 8))
    out = keras.layers.Bidirectional(keras.layers.LSTM(4), name="bi")(inp)
    model = keras.Model(inp, out)
    rep = am.report(model)
    parts = [r.part for r in rep.rows]
    assert parts == ["forward/input", "forward/recurrent", "forward/bias",
                     "backward/input", "backward/recurrent", "backward/bias"]
    assert rep.total.params_before == model.count_params()
    assert math.isclose(rep.total.param_reduction, 1.0)
