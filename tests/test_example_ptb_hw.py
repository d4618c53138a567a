"""examples/ptb_hardware_guided.py end to end at a tiny scale on made-up
data, against a made-up teacher run (untrained models, no training)."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from test_example_ptb import _tiny_ptb

import keras_antman as am
from keras_antman import iss
from keras_antman._keras import keras

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "examples")


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, EXAMPLES)
    path = os.path.join(EXAMPLES, "ptb_hardware_guided.py")
    spec = importlib.util.spec_from_file_location("ptb_hardware_guided",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _teacher_run(example, directory, vocab, hidden):
    """A run dir as ptb_word_lm.py leaves it: teacher, calibration and the
    three reused rows (untrained; made-up perplexities)."""
    lm = example.ptb.language_model
    keras.utils.set_random_seed(0)
    teacher = lm(vocab, hidden, hidden, "teacher")
    teacher.save(directory / "teacher.keras")
    rows = {}
    for name, scheme in (("LGP-Shuffle g=10", am.LGPShuffle(10)),
                         ("LowRank-LGP g_in=10 g_out=20 r=2",
                          am.LowRankLGP(10, 20, 2))):
        s = am.compress(teacher, input_scheme=scheme,
                        recurrent_scheme=scheme)
        s.save(directory / f"student_{example.ptb._slug(name)}.keras")
        rows[name] = s
    lasso = iss.GroupLasso(teacher)
    lasso.zero({sid: np.arange(hidden - 4) for sid in lasso.masks})
    lasso.detach()
    rows["ISS 10x (distilled)"] = iss.shrink(teacher)
    rows["ISS 10x (distilled)"].save(
        directory / "student_ISS_10x__distilled.keras")

    def cost(m, ppl):
        params, macs = example.ptb.lstm_cost(m)
        return dict(lstm_params=params, lstm_macs=macs, test_ppl=ppl)

    results = {"teacher": cost(teacher, 30.0),
               "calibration": {"c_target": 1.0, "c_mse": 2.0, "c_kl": 3.0},
               "students": {n: cost(m, 40.0) for n, m in rows.items()}}
    (directory / "results.json").write_text(json.dumps(results))


def test_curve_students_measure_report(example, tmp_path):
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    src = tmp_path / "teacher_run"
    src.mkdir()
    vocab = am.datasets.load_ptb(str(data)).vocab_size
    _teacher_run(example, src, vocab, 40)
    out, run_dir = tmp_path / "out", tmp_path / "run"
    common = ["--data", str(data), "--teacher-run", str(src), "--run-dir",
              str(run_dir), "--out", str(out), "--hidden", "40",
              "--batch-size", "4", "--num-steps", "5", "--chunk-steps", "2",
              "--student-steps", "8", "--eval-batches", "2",
              "--verbose", "0", "--eager", "--gp-frequency", "2",
              "--gp-schedule", "0.25,0.25,0.75", "--grow-fraction", "0.05"]
    # The budget is --budget-ms here: the measured one (the LGP-Shuffle
    # g=10 row) depends on this machine's noise at these tiny sizes.
    res = example.main(common + [
        "--stages", "curve", "--latency-steps", "3", "--curve-fine", "8,12",
        "--curve-high", "40", "--curve-repeats", "2", "--curve-passes", "1",
        "--confirm-repeats", "2",
        "--budget-ms", "1000"])
    curve = res["curve"]
    budget = curve["budget"]
    assert (budget["path"], budget["scheme"], budget["hidden"]) == (
        "op" if am.ops.is_available() else "keras",
        "LGPShuffle(groups=10)", 40) or not am.ops.is_available()
    assert curve["budget_ms"] == 1000
    dense = curve["dense_choice"]
    # The largest Dense stack measured up to the teacher's size; over every
    # row, at least as many parameters.
    assert dense["spec"] == "dense" and dense["hidden"] == 40
    assert curve["choice"]["params"] >= dense["params"]
    # The pick was timed again next to the budget row.
    confirm = curve["confirm"]
    assert len(confirm["rounds"]) == 3
    for timed in confirm["rounds"]:
        assert timed[0]["scheme"] == "LGPShuffle(groups=10)"
        assert {r["hidden"] for r in timed[1:]} == {24, 32, 38, 39, 40}
    assert confirm["swept"]["hidden"] == 40
    assert (out / "ptb_hardware_curve.png").read_bytes()[:4] == b"\x89PNG"
    units = dense["hidden"]

    res = example.main(common + ["--stages", "students",
                                 "--students", "hw,dense"])
    names = example.student_names(units)
    hw_row = res["students"][names["hw"]]
    # Nonzero LSTM weights match the AntMan 10x row's count (up to the
    # rounding of each kernel's share).
    assert hw_row["nonzero_lstm_params"] == pytest.approx(
        res["match_params"], rel=0.02)
    assert hw_row["nonzero_lstm_params"] < hw_row["lstm_params"]
    # Grow at step 2; prune at 4 and 6 (--gp-schedule of 8 steps).
    assert len(hw_row["grown"]) == 1 and len(hw_row["pruned"]) == 2
    student = keras.models.load_model(
        run_dir / f"student_{example.ptb._slug(names['hw'])}.keras")
    kernels = [layer.cell.kernel for layer in student.layers
               if isinstance(layer, keras.layers.LSTM)]
    assert [float(np.mean(keras.ops.convert_to_numpy(k) == 0))
            for k in kernels] == pytest.approx(
        [hw_row["target_sparsity"]] * 2, abs=0.01)
    dense_row = res["students"][names["dense"]]
    assert dense_row["nonzero_lstm_params"] == dense_row["lstm_params"]
    assert dense_row["init"] == "random"

    res = example.main(common + ["--stages", "measure,report",
                                 "--latency-steps", "3",
                                 "--measure-repeats", "3"])
    lat = res["latency"]["rows"]
    assert set(lat) == {"Teacher 2 x LSTM(200)", *example.REUSED.values(),
                        names["hw"], names["dense"]}
    assert lat[example.REUSED["LGP-Shuffle g=10"]]["paths"].keys() == {"op"}
    assert lat[names["hw"]]["paths"].keys() == {"keras", "op"}
    for r in lat.values():
        assert r["median_ms"] == min(p["median_ms"]
                                     for p in r["paths"].values())
        assert r["p10_ms"] <= r["median_ms"] and r["repeats"] == 3
    table = (out / "ptb_hardware_results.md").read_text()
    assert all(n in table for n in lat)
    assert "--stages curve" in table and "ISA" in table
    saved = json.loads((out / "ptb_hardware_results.json").read_text())
    assert set(saved["rows"]) == set(lat)


def test_shrink_teacher_keeps_the_strongest_units(example, tmp_path):
    """The hw student's init: each LSTM keeps the units with the largest
    ISS component norms, and computes what the teacher computes when the
    other units' outgoing weights are zero."""
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    args = example.build_parser().parse_args(
        ["--data", str(data), "--run-dir", str(tmp_path / "run"),
         "--hidden", "6", "--batch-size", "2", "--num-steps", "3"])
    run = example.ptb.Run(args)
    keras.utils.set_random_seed(1)
    teacher = example.ptb.language_model(run.vocab, 6, 6, "teacher")
    small = example.shrink_teacher(run, teacher, 4)
    assert [layer.units for layer in small.layers
            if isinstance(layer, keras.layers.LSTM)] == [4, 4]
    # Reference: zero the two weakest components of each layer in a copy of
    # the teacher (by the same norms, as numpy), then compare outputs.
    ref = example.ptb.language_model(run.vocab, 6, 6, "ref")
    ref.set_weights(teacher.get_weights())
    lasso = iss.GroupLasso(ref, strength=0.0)
    norms = {sid: keras.ops.convert_to_numpy(v)
             for sid, v in lasso.squared_norms().items()}
    lasso.zero({sid: np.argsort(n)[:2] for sid, n in norms.items()})
    lasso.detach()
    x = np.random.default_rng(0).integers(0, run.vocab, (2, 3))
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               ref.predict(x, verbose=0), atol=1e-5)


class _Stop(Exception):
    pass


def test_grow_prune_student_resumes_on_its_masks(example, tmp_path,
                                                 monkeypatch):
    """Killed after its 2nd chunk, the hw student resumes on the saved
    masks and schedule: the rerun trains only the remaining chunks, fires
    no event twice, and ends with the counts of an uninterrupted run."""
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    src = tmp_path / "teacher_run"
    src.mkdir()
    _teacher_run(example, src, am.datasets.load_ptb(str(data)).vocab_size,
                 40)

    def argv(run_dir):
        return ["--data", str(data), "--teacher-run", str(src),
                "--run-dir", str(run_dir), "--out", str(tmp_path / "out"),
                "--hidden", "40", "--batch-size", "4", "--num-steps", "5",
                "--chunk-steps", "2", "--student-steps", "8",
                "--eval-batches", "2", "--verbose", "0", "--eager",
                "--gp-frequency", "2", "--gp-schedule", "0.25,0.25,0.75",
                "--grow-fraction", "0.05"]

    curve = ["--stages", "curve", "--latency-steps", "3", "--curve-fine",
             "8,8", "--curve-high", "40", "--curve-repeats", "1",
             "--curve-passes", "1", "--confirm-repeats", "1",
             "--confirm-rounds", "1", "--budget-ms", "1000"]
    train = ["--stages", "students", "--students", "hw"]
    whole = example.main(argv(tmp_path / "a") + curve)
    whole = example.main(argv(tmp_path / "a") + train)
    name = example.student_names(40)["hw"]

    chunk_ends = []
    clock_end = example.ptb._Clock.on_epoch_end

    def counting_end(self, epoch, logs=None):
        clock_end(self, epoch, logs)
        chunk_ends.append(epoch)
        if stop and len(chunk_ends) == 2:
            raise _Stop()

    monkeypatch.setattr(example.ptb._Clock, "on_epoch_end", counting_end)
    example.main(argv(tmp_path / "b") + curve)
    stop = True
    with pytest.raises(_Stop):
        example.main(argv(tmp_path / "b") + train)
    stop, chunk_ends[:] = False, []
    resumed = example.main(argv(tmp_path / "b") + train)
    assert chunk_ends == [2, 3]  # only the remaining chunks
    a, b = whole["students"][name], resumed["students"][name]
    assert b["grown"] == a["grown"] and b["pruned"] == a["pruned"]
    assert len(b["grown"]) == 1 and len(b["pruned"]) == 2
    assert b["nonzero_lstm_params"] == a["nonzero_lstm_params"]
