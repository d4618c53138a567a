"""examples/ptb_word_lm.py end to end at a tiny scale on made-up data."""

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import keras3_only
from conftest import tf_keras_only

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def example():
    path = os.path.join(HERE, "..", "examples", "ptb_word_lm.py")
    spec = importlib.util.spec_from_file_location("ptb_word_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_ptb(directory):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)] + ["<unk>"]
    for split, lines in (("train", 120), ("valid", 30), ("test", 30)):
        with open(directory / f"ptb.{split}.txt", "w") as f:
            for _ in range(lines):
                f.write(" " + " ".join(rng.choice(words, 8)) + " \n")


def test_default_students_reduce_lstm_macs_as_documented(example):
    """At H = 200 the default students sit at the reductions the results
    table claims. Measured with `report` on untrained models (the script
    measures its trained students the same way); the structured ones are
    built directly, as `compress` builds them, without `from_dense`."""
    import keras_antman as am
    from keras_antman._keras import keras

    def lm(lstm):
        inputs = keras.Input((None,), dtype="int32")
        h = keras.layers.Embedding(31, 200)(inputs)
        for i in range(2):
            h = lstm(f"lstm_{i}")(h)
        return keras.Model(inputs, keras.layers.Dense(31)(h))

    def macs(model):
        return am.report(model).recurrent_total.macs_before

    args = example.build_parser().parse_args(["--data", "unused"])
    teacher = macs(example.language_model(31, 200, 200, "teacher"))
    got = {}
    specs = example.student_specs(args)
    svd16 = example.student_specs(example.build_parser().parse_args(
        ["--data", "unused", "--svd-rank", "16", "--students", "svd"]))
    assert list(svd16) == ["SVD (LowRank) rank=16"]
    for name, (kind, arg) in {**specs, **svd16}.items():
        if kind == "compress":
            student = lm(lambda n, s=arg: am.StructuredLSTM(
                200, input_scheme=s, recurrent_scheme=s,
                return_sequences=True, name=n))
        else:
            student = example.language_model(31, arg, 200, "small")
        got[name] = teacher / macs(student)
    assert got == pytest.approx({
        "LGP-Shuffle g=10": 10.0,
        "LowRank-LGP g_in=10 g_out=20 r=2": 10.0,
        "SVD (LowRank) r=10": 8.0,
        "SVD (LowRank) rank=16": 10.0,
        "Small dense LSTM h=47 (direct design)": 640000 / 64108,
        "LGP-Shuffle g=25": 25.0,
        "LGP-Shuffle g=50": 50.0,
    })


class _Stop(Exception):
    pass


def test_every_stage_runs_reports_and_resumes(example, tmp_path,
                                              monkeypatch):
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--run-dir", str(tmp_path / "run"),
            "--out", str(out), "--hidden", "20", "--groups", "10",
            "--lowrank-lgp", "5,5,2", "--svd-r", "10", "--extra-groups",
            "20", "--batch-size", "4", "--num-steps", "5",
            "--teacher-epochs", "0.5", "--chunk-steps", "2",
            "--student-steps", "2", "--grid-steps", "2", "--calib-steps",
            "2", "--calib-eval", "2", "--eval-batches", "2",
            "--verbose", "0", "--eager"]
    # Interrupt the teacher after its 3rd chunk (its backup is written)...
    chunk_ends = []
    clock_end = example._Clock.on_epoch_end

    def counting_end(self, epoch, logs=None):
        clock_end(self, epoch, logs)
        chunk_ends.append(self.key)
        if stop_after and len(chunk_ends) == stop_after:
            raise _Stop()

    monkeypatch.setattr(example._Clock, "on_epoch_end", counting_end)
    stop_after = 3
    with pytest.raises(_Stop):
        example.main(argv)
    assert (tmp_path / "run" / "backup_teacher").is_dir()
    # ... then the rerun trains only the teacher's remaining chunks.
    stop_after, chunk_ends[:] = 0, []
    results = example.main(argv)
    teacher_chunks = results["teacher"]["steps"] // 2
    assert teacher_chunks > 3
    assert chunk_ends.count("teacher") == teacher_chunks - 3
    args = example.build_parser().parse_args(argv)
    names = set(example.student_specs(args))
    assert set(results["students"]) == names and len(names) == 5
    assert results["students"]["LGP-Shuffle g=10"]["mac_reduction"] == 10
    assert results["students"]["LGP-Shuffle g=20"]["mac_reduction"] == 20
    for r in [results["teacher"], *results["students"].values()]:
        assert np.isfinite(r["test_ppl"]) and r["steps"] >= 2
    assert len(results["grid"]) == 4
    assert {"c_mse", "c_kl", "target_loss", "mse_loss", "kl_loss"} <= set(
        results["calibration"])
    for name in ("ptb_results.md", "ptb_coefficients.md",
                 "ptb_results.json", "ptb_ppl_vs_params.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "ptb_results.md").read_text()
    assert all(name in table for name in names | {"Teacher"})
    assert "--hidden 20" in table and "AVX" in table
    grid = (out / "ptb_coefficients.md").read_text()
    assert "C_mse" in grid and "KL" in grid
    saved = json.loads((out / "ptb_results.json").read_text())
    assert set(saved["students"]) == names
    # No backups are left, and a second run finds everything done.
    assert not list((tmp_path / "run").glob("backup_*"))
    before = json.loads((tmp_path / "run" / "results.json").read_text())
    again = example.main(argv)
    assert again["students"] == before["students"]
    assert again["grid"] == before["grid"]
    assert again["teacher"] == before["teacher"]


def test_reuse_takes_teacher_and_keeps_earlier_rows(example, tmp_path):
    """--reuse starts a run from an earlier run's teacher and calibration
    (nothing retrained) and reports the earlier students and grid as
    tagged extra rows."""
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    common = ["--data", str(data), "--hidden", "20", "--groups", "10",
              "--lowrank-lgp", "5,5,2", "--svd-r", "10", "--batch-size", "4",
              "--num-steps", "5", "--chunk-steps", "2", "--calib-steps", "2",
              "--calib-eval", "2", "--eval-batches", "2", "--verbose", "0",
              "--eager", "--out", str(tmp_path / "out")]
    first = example.main(common + [
        "--run-dir", str(tmp_path / "a"), "--teacher-epochs", "0.2",
        "--student-steps", "2", "--grid-steps", "2", "--extra-groups", "",
        "--stages", "teacher,calibrate,students,grid"])
    second = example.main(common + [
        "--run-dir", str(tmp_path / "b"), "--reuse", str(tmp_path / "a"),
        "--teacher-epochs", "0.2", "--student-steps", "4", "--grid-steps",
        "2", "--extra-groups", ""])
    assert second["teacher"] == first["teacher"]
    assert second["calibration"] == first["calibration"]
    for name, r in first["students"].items():
        assert second["students"][f"{name} [2 steps]"]["test_ppl"] == r[
            "test_ppl"]
        assert second["students"][name]["steps"] == 4
    assert second["grid [2 steps]"] == first["grid"]
    assert second["students"]["Small dense LSTM h=5 (direct design)"][
        "lr"] == 2e-3  # the teacher's lr: trained from scratch
    table = (tmp_path / "out" / "ptb_results.md").read_text()
    assert "[2 steps]" in table and "--reuse" in table
    grid = (tmp_path / "out" / "ptb_coefficients.md").read_text()
    assert grid.count("(0, 0) is the label loss alone.") == 2
    # A third run on the second: only the chosen students train (SVD by
    # rank, cosine schedule); both earlier runs' rows keep one tag each.
    third = example.main(common + [
        "--run-dir", str(tmp_path / "c"), "--reuse", str(tmp_path / "b"),
        "--student-steps", "4", "--extra-groups", "", "--students",
        "lgp,svd", "--svd-rank", "3", "--student-schedule", "cosine",
        "--student-init", "random", "--stages", "students,report"])
    new = {k for k in third["students"] if not k.endswith("steps]")}
    lgp = "LGP-Shuffle g=10 (random init)"
    svd = "SVD (LowRank) rank=3 (random init)"
    assert new == {lgp, svd}
    assert third["students"][svd]["scheme"] == "LowRank(rank=3)"
    assert third["students"][lgp]["schedule"] == "cosine"
    assert third["students"][lgp]["init"] == "random"
    assert third["students"][lgp]["lr"] == 2e-3  # the from-scratch lr
    assert set(third["students"]) - new == {
        *(f"{n} [2 steps]" for n in first["students"]),
        *(f"{n} [4 steps]" for n in second["students"]
          if not n.endswith("steps]"))}
    assert third["grid [2 steps]"] == second["grid"]  # the newer one
    assert "(cosine)" in (tmp_path / "out" / "ptb_results.md").read_text()


def test_cosine_schedule_decays_to_zero(example):
    args = example.build_parser().parse_args(
        ["--data", "unused", "--optimizer", "sgd"])
    assert float(example.optimizer(2.0, args).learning_rate) == 2.0
    opt = example.optimizer(2.0, args, decay_steps=10)
    lr = opt._learning_rate
    assert float(lr(0)) == pytest.approx(2.0)
    assert float(lr(5)) == pytest.approx(1.0)
    assert float(lr(10)) == pytest.approx(0.0)


def test_iss_students_shrink_to_stock_lstms_at_their_reduction(
        example, tmp_path):
    """--iss-reductions: ISS students with and without the teacher, from
    the teacher's weights; each row is the shrunk model, a stock-LSTM
    model (saved, loads without keras_antman's layers) whose measured
    LSTM-MAC reduction reaches the target."""
    import keras_antman as am
    from keras_antman._keras import keras

    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    out = tmp_path / "out"
    run_dir = tmp_path / "run"
    results = example.main([
        "--data", str(data), "--run-dir", str(run_dir), "--out", str(out),
        "--report-name", "iss", "--hidden", "12", "--embed", "16",
        "--groups", "4", "--batch-size", "4", "--num-steps", "5",
        "--teacher-epochs", "0.5",
        "--chunk-steps", "4", "--student-steps", "8", "--calib-steps", "2",
        "--calib-eval", "2", "--eval-batches", "2", "--verbose", "0",
        "--eager", "--students", "iss", "--iss-reductions", "2,4",
        "--iss-strength", "1e-2", "--optimizer", "sgd", "--lr", "1",
        "--student-lr", "1", "--student-schedule", "cosine",
        "--stages", "teacher,calibrate,students,report"])
    names = {"ISS 2x (distilled lambda=0.01)",
             "ISS 2x (label loss lambda=0.01)",
             "ISS 4x (distilled lambda=0.01)",
             "ISS 4x (label loss lambda=0.01)"}
    assert set(results["students"]) == names
    teacher = keras.models.load_model(run_dir / "teacher.keras")
    assert teacher.get_layer("embedding").output_dim == 16
    for name, r in results["students"].items():
        assert r["mac_reduction"] >= r["target_reduction"]
        assert np.isfinite(r["test_ppl"]) and r["steps"] == 8
        assert r["trainer"] == ("Distiller" if "distilled" in name
                                else "label loss")
        path = run_dir / f"student_{example._slug(name)}.keras"
        shrunk = keras.models.load_model(path)
        lstms = [lay for lay in shrunk.layers if "lstm" in lay.name]
        assert [type(lay) for lay in lstms] == [keras.layers.LSTM] * 2
        assert [lay.units for lay in lstms] == r["units"]
        assert max(r["units"]) < 12
        got = am.report(teacher, shrunk).recurrent_total
        assert got.mac_reduction == pytest.approx(r["mac_reduction"])
        assert got.params_after == r["lstm_params"]
    table = (out / "iss_results.md").read_text()
    assert all(name in table for name in names)
    assert "ISS baseline" in table and "lambda" in table
    assert (out / "iss_results.json").stat().st_size > 0
    # A rerun finds every ISS row done.
    again = example.main([
        "--data", str(data), "--run-dir", str(run_dir), "--out", str(out),
        "--report-name", "iss", "--hidden", "12", "--embed", "16",
        "--batch-size", "4", "--num-steps", "5", "--eval-batches", "2",
        "--verbose", "0", "--eager", "--students", "iss",
        "--iss-reductions", "2,4", "--iss-strength", "1e-2",
        "--stages", "students"])
    assert again["students"] == results["students"]
    default = example.build_parser().parse_args(
        ["--data", "unused", "--iss-reductions", "10"])
    assert list(example.iss_specs(default)) == [
        "ISS 10x (distilled)", "ISS 10x (label loss)"]


def test_input_wide_shape_reductions(example):
    """At --embed 800 --hidden 100 (the paper's Table 4 shape) LGP-Shuffle
    g gives g x, and LowRank-LGP (10, 2, 5) / (10, 20, 5) about 5x / 10x
    (measured with `report` on untrained models, as for H = 200)."""
    import keras_antman as am
    from keras_antman._keras import keras

    teacher = example.language_model(31, 100, 800, "teacher")
    before = am.report(teacher).recurrent_total.macs_before
    assert before == 4 * 100 * (800 + 100) + 4 * 100 * 200

    def reduction(scheme):
        student = example.language_model(31, 100, 800, "s", scheme=scheme)
        return before / am.report(student).recurrent_total.macs_before

    assert reduction(am.LGPShuffle(5)) == pytest.approx(5.0)
    assert reduction(am.LGPShuffle(10)) == pytest.approx(10.0)
    assert reduction(am.LowRankLGP(10, 2, 5)) == pytest.approx(5.226, 1e-3)
    assert reduction(am.LowRankLGP(10, 20, 5)) == pytest.approx(9.865, 1e-3)
    args = example.build_parser().parse_args(
        ["--data", "unused", "--embed", "800", "--hidden", "100"])
    h = example.small_hidden(100, embed=800)
    small = example.language_model(31, h, 800, "small")
    assert before / am.report(small).recurrent_total.macs_before == (
        pytest.approx(10.0, rel=0.1))
    assert f"Small dense LSTM h={h} (direct design)" in (
        example.student_specs(args))
    del keras


def test_doping_rows_anneal_log_and_report(example, tmp_path):
    """The Doping rows (doped KP with and without CMR, plain KP, HMD, LMF,
    magnitude pruning) train end to end at a tiny scale: each lands near
    the asked LSTM param reduction (checked against an independent count),
    the doped and pruned students log the annealing up to their target
    sparsity, and the report writes the 25x-style table and the plot."""
    import keras_antman as am
    from keras_antman._keras import keras

    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--run-dir", str(tmp_path / "run"),
            "--out", str(out), "--hidden", "20", "--batch-size", "4",
            "--num-steps", "5", "--teacher-epochs", "0.3", "--chunk-steps",
            "4", "--student-steps", "8", "--calib-steps", "1",
            "--calib-eval", "1", "--eval-batches", "2", "--verbose", "0",
            "--eager", "--students", "dope,dope_nocmr,kp,hmd,lmf,prune",
            "--dope-reductions", "4", "--anneal-every", "2",
            "--anneal-log", "2", "--anneal-batches", "2",
            "--report-name", "dope", "--stages",
            "teacher,calibrate,students,report"]
    results = example.main(argv)
    rows = results["students"]
    assert len(rows) == 6
    teacher = 4 * 20 * 80 + 2 * 80  # four 20 -> 80 kernels plus biases
    for name, r in rows.items():
        assert r["param_reduction"] == pytest.approx(
            teacher / r["lstm_params"])
        assert 3.0 < r["param_reduction"] < 5.0, name
    doped = keras.models.load_model(
        tmp_path / "run" / "student_Doped_KP__4x__CMR_0_5.keras")
    matrices = am.doping.doped_matrices(doped)
    assert len(matrices) == 4
    nnz = sum(int(np.count_nonzero(np.asarray(m.mask)))
              for m in matrices)
    base = 4 * (4 * 8 + 5 * 10)  # Kronecker A [4, 8], B [5, 10]
    assert rows["Doped KP ~4x (CMR 0.5)"]["lstm_params"] == (
        160 + base + 2 * nnz + 4 * 81)
    anneal = results["anneal"]
    assert set(anneal) == {"Doped KP ~4x (CMR 0.5)",
                           "Doped KP ~4x (no CMR)", "Magnitude pruning ~4x"}
    for log in anneal.values():
        steps = [e[0] for e in log]
        assert steps == sorted(steps) and steps[0] == 0
        assert log[0][1] == 0.0 and log[-1][1] > 0.5
        assert all(np.isfinite(e[2]) for e in log)
    text = (out / "dope_results.md").read_text()
    assert "Doping at ~4x" in text
    for label in ("doped KP + CMR", "doped KP, no CMR", "plain KP", "HMD",
                  "LMF (LowRank)", "magnitude pruning"):
        assert f"| {label} |" in text
    assert (out / "dope_annealing.png").exists()


def test_data_aware_init_rows_and_intermediate_perplexities(example,
                                                             tmp_path):
    """--student-init calibrated: rows named '(data-aware init)' start from
    `compress(..., calibration_data=...)`, record each product's output
    errors, and --eval-at logs the test perplexity during training; the
    step-0 value equals `model.evaluate` of the freshly calibrated student
    (the script's own evaluation path, an independent reference);
    --student-coefficients replaces the calibrated coefficients in every
    row."""
    import math

    import keras_antman as am
    from keras_antman._keras import keras

    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    argv = ["--data", str(data), "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "out"), "--hidden", "20",
            "--batch-size", "4", "--num-steps", "5", "--teacher-epochs",
            "0.3", "--chunk-steps", "2", "--student-steps", "4",
            "--calib-steps", "1", "--calib-eval", "1", "--eval-batches",
            "2", "--verbose", "0", "--eager", "--students", "lgp,svd",
            "--groups", "10", "--svd-rank", "2", "--student-init",
            "calibrated", "--calibration-batches", "3", "--eval-at", "0,2",
            "--report-name", "init", "--student-coefficients", "1,0.5,0",
            "--stages", "teacher,calibrate,students,report"]
    results = example.main(argv)
    text = (tmp_path / "out" / "init_results.md").read_text()
    assert "| test ppl @ 0 | test ppl @ 2 | test ppl @ 4 |" in text
    assert (tmp_path / "out" / "init_init_steps.png").exists()
    rows = results["students"]
    assert set(rows) == {"LGP-Shuffle g=10 (data-aware init)",
                         "SVD (LowRank) rank=2 (data-aware init)"}
    for r in rows.values():
        assert r["init"].startswith("teacher (data-aware")
        assert set(r["test_ppl_at"]) == {"0", "2", "4"}
        assert r["test_ppl_at"]["4"] == r["test_ppl"]
        assert r["coefficients"] == {"c_target": 1.0, "c_mse": 0.5,
                                     "c_kl": 0.0}
        errors = r["calibration_errors"]
        assert len(errors) == 4  # two layers x (input, recurrent)
        for e in errors.values():
            assert 0.0 <= e["fitted"] < 1.5 and 0.0 <= e["from_dense"] < 1.5
    teacher = keras.models.load_model(tmp_path / "run" / "teacher.keras")
    run = example.Run(example.build_parser().parse_args(argv))
    g = am.LGPShuffle(10)
    fresh = am.compress(teacher, input_scheme=g, recurrent_scheme=g,
                        calibration_data=run.train, calibration_steps=3)
    _, test = run.perplexities(fresh)
    assert rows["LGP-Shuffle g=10 (data-aware init)"]["test_ppl_at"][
        "0"] == pytest.approx(test, rel=1e-4)
    assert math.isfinite(test)


def test_student_coefficients_must_be_three_numbers(example, capsys):
    parser = example.build_parser()
    base = ["--data", "unused"]
    args = parser.parse_args(base + ["--student-coefficients", "1,0,3"])
    assert args.student_coefficients == [1.0, 0.0, 3.0]
    for bad in ("1,0", "1,-1,0", "a,b,c"):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--student-coefficients", bad])
        assert "--student-coefficients" in capsys.readouterr().err


def _tfmot_argv(data, run_dir, out):
    return ["--data", str(data), "--run-dir", str(run_dir), "--out",
            str(out), "--hidden", "20", "--batch-size", "4", "--num-steps",
            "5", "--teacher-epochs", "0.3", "--chunk-steps", "4",
            "--student-steps", "8", "--calib-steps", "1", "--calib-eval",
            "1", "--eval-batches", "2", "--verbose", "0", "--eager",
            "--students", "tfmot", "--anneal-end", "0.7", "--anneal-every",
            "2", "--anneal-log", "2", "--anneal-batches", "2",
            "--report-name", "tfmot"]


@tf_keras_only("tfmot 0.8 prunes only tf_keras models")
def test_tfmot_rows_reach_their_sparsity_and_resume(example, tmp_path,
                                                    monkeypatch):
    """--students tfmot: each row's stripped model (stock LSTMs, saved)
    has the target share of zeros in every LSTM kernel and none elsewhere,
    counted here with NumPy; MACs are its non-zeros; the annealing is
    logged and reported. A run interrupted after the first chunk of a
    tfmot row resumes (tfmot's masks and step restored with the backup) to
    the same weights as the uninterrupted run."""
    from keras_antman._keras import keras

    pytest.importorskip("tensorflow_model_optimization")
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    out = tmp_path / "out"
    results = example.main(_tfmot_argv(data, tmp_path / "a", out) + [
        "--stages", "teacher,calibrate,students,report"])
    rows = results["students"]
    assert set(rows) == {"tfmot pruning 50%", "tfmot pruning 90%"}
    teacher = keras.models.load_model(tmp_path / "a" / "teacher.keras")
    for name, r in rows.items():
        target = r["target_sparsity"]
        model = keras.models.load_model(
            tmp_path / "a" / f"student_{example._slug(name)}.keras")
        assert [type(x) for x in model.layers] == [
            type(x) for x in teacher.layers]
        nnz = 0
        for i in range(2):
            cell = model.get_layer(f"lstm_{i}").cell
            for kind in ("kernel", "recurrent_kernel"):
                w = np.asarray(getattr(cell, kind))
                zeros = np.mean(w == 0.0)
                assert zeros == pytest.approx(target, abs=1e-3), (name, kind)
                assert r["kernel_sparsity"][f"lstm_{i}/{kind}"] == (
                    pytest.approx(zeros))
                nnz += np.count_nonzero(w)
            assert np.all(np.asarray(cell.bias) != 0.0)
        for other in ("embedding", "logits"):
            assert np.all(model.get_layer(other).get_weights()[0] != 0.0)
        assert r["lstm_macs"] == nnz
        assert r["mac_reduction"] == pytest.approx(4 * 20 * 80 / nnz)
        assert r["trainer"] == "Distiller" and np.isfinite(r["test_ppl"])
        log = results["anneal"][name]
        assert log[0][:2] == [0, 0.0]
        assert log[-1][0] == 8 and log[-1][1] == pytest.approx(target,
                                                               abs=1e-3)
    assert rows["tfmot pruning 90%"]["schedule_tfmot"]["end_step"] == 6
    text = (out / "tfmot_results.md").read_text()
    assert "Unstructured pruning with tfmot" in text
    assert "| tfmot pruning 90% | 90% |" in text

    # Resume: stop after the tfmot row's first chunk of 4 steps, rerun.
    clock_end = example._Clock.on_epoch_end

    def stop_once(self, epoch, logs=None):
        clock_end(self, epoch, logs)
        if self.key.startswith("student tfmot") and not stopped:
            stopped.append(epoch)
            raise _Stop()

    stopped = []
    monkeypatch.setattr(example._Clock, "on_epoch_end", stop_once)
    argv = _tfmot_argv(data, tmp_path / "b", out) + [
        "--reuse", str(tmp_path / "a"), "--tfmot-sparsities", "0.9",
        "--stages", "students"]
    with pytest.raises(_Stop):
        example.main(argv)
    resumed = example.main(argv)["students"]["tfmot pruning 90%"]
    first = rows["tfmot pruning 90%"]
    assert resumed["steps"] == 8
    assert resumed["test_ppl"] == pytest.approx(first["test_ppl"], rel=1e-5)
    a, b = (keras.models.load_model(d / "student_tfmot_pruning_90.keras")
            for d in (tmp_path / "a", tmp_path / "b"))
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@keras3_only("the tfmot rows run under tf_keras; Keras 3 gets the error")
def test_tfmot_rows_under_keras3_say_to_use_tf_keras(example, tmp_path):
    with pytest.raises(SystemExit, match="TF_USE_LEGACY_KERAS=1"):
        example.main(["--data", str(tmp_path), "--students", "tfmot"])


def test_load_lm_takes_a_file_of_the_other_flavour(example, tmp_path):
    """`load_lm` rebuilds a language model saved by the other Keras
    flavour (a fresh process) and gives it its weights: same logits."""
    import subprocess
    import sys

    from conftest import LEGACY

    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.join(HERE, '..', 'examples')!r})\n"
        "import ptb_word_lm as ex\n"
        "m = ex.language_model(31, 12, 8, 'teacher')\n"
        "x = np.arange(10).reshape(2, 5) % 31\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m.predict(x, verbose=0))\n"
        f"m.save({str(tmp_path / 'm.keras')!r})\n")
    env = {k: v for k, v in os.environ.items()
           if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if not LEGACY:
        env["TF_USE_LEGACY_KERAS"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert example._keras_major(tmp_path / "m.keras") == (3 if LEGACY else 2)
    model = example.load_lm(tmp_path / "m.keras")
    assert model.get_layer("lstm_1").units == 12
    x = np.arange(10).reshape(2, 5) % 31
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               np.load(tmp_path / "y.npy"), rtol=1e-5,
                               atol=1e-6)


def test_report_sets_measured_times_against_theoretical(example, tmp_path):
    """The latency rows that bench/unstructured_pruning.py stores
    (``--store``) appear in the report: speed-up = the teacher's op-dense
    median over the path's, and its ratio to the theoretical reduction."""
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def timing(ms):
        return {"median_ms": ms, "iqr_ms": 0.01, "p10_ms": ms,
                "cpu_median_ms": ms / 2, "cpu_iqr_ms": 0.01, "repeats": 3}

    row = dict(lstm_params=100, lstm_macs=16000, mac_reduction=10.0,
               val_ppl=160.0, test_ppl=150.0, train_seconds=1.0, steps=8,
               target_sparsity=0.9, schedule_tfmot=dict(
                   kind="PolynomialDecay", power=3, begin_step=0,
                   end_step=6, frequency=2),
               kernel_sparsity={"lstm_0/kernel": 0.9})
    results = {
        "teacher": dict(lstm_params=1000, lstm_macs=160000, mac_reduction=1,
                        val_ppl=140.0, test_ppl=120.0, train_seconds=1.0,
                        steps=8),
        "students": {"tfmot pruning 90%": row},
        "latency": dict(
            rows={"Teacher": dict(theoretical=1.0, test_ppl=120.0,
                                  best="op dense",
                                  paths={"op dense": timing(2.0),
                                         "op CSR": timing(4.0)}),
                  "tfmot pruning 90%": dict(
                      theoretical=10.0, test_ppl=150.0, best="op CSR",
                      paths={"op dense": timing(1.6),
                             "op CSR": timing(0.4)})},
            baseline=["Teacher", "op dense"], batch=1, steps=35, threads=1,
            repeats=3, command="python bench/unstructured_pruning.py",
            machine="CPU", load_start=[1.0], load_end=[1.0])}
    (run_dir / "results.json").write_text(json.dumps(results))
    example.main(["--data", str(data), "--run-dir", str(run_dir), "--out",
                  str(tmp_path / "out"), "--report-name", "t",
                  "--batch-size", "4", "--num-steps", "5",
                  "--stages", "report"])
    text = (tmp_path / "out" / "t_results.md").read_text()
    assert "| tfmot pruning 90% | 90% | 0.9000 | 10.00x | 150.00 | +25.0% |" \
        in text
    assert ("| tfmot pruning 90% | 10.00x | 150.00 | op CSR (best) | "
            "0.400 (0.010) | 0.400 | 0.200 | 5.00x | 5.00x | 5.00x | 0.50 |"
            ) in text
    assert ("| Teacher | 1.00x | 120.00 | op CSR | 4.000 (0.010) | 4.000 | "
            "2.000 | 0.50x | 0.50x | 0.50x | 0.50 |") in text


# -- --carry-state (Zaremba's stateful BPTT) and the plateau schedule -------

def _np_logits(model, x):
    """NumPy forward pass of `language_model` (either LSTM kind) over the
    token rows ``x`` [B, T], from zero states: the reference for a model
    carrying its state across the windows of ``x``."""
    from reference import lstm

    h = model.get_layer("embedding").get_weights()[0][x].astype("float64")
    for i in range(2):
        layer = model.get_layer(f"lstm_{i}")
        weights = (layer.stock_weights() if hasattr(layer, "stock_weights")
                   else layer.get_weights())
        h = lstm(h, *(np.asarray(w, "float64") for w in weights))[0]
    w, b = model.get_layer("logits").get_weights()
    return h @ w + b


def _np_ppl(logits, y):
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(logp, y[..., None], -1).mean()))


def _stateful_lms(example, vocab=31):
    """A stateful teacher (random weights) and its compressed LGP student,
    on batches of 4 rows x 5 steps."""
    import keras_antman as am

    from conftest import randomize_weights

    teacher = example.language_model(vocab, 8, 8, "teacher", batch_size=4)
    randomize_weights(teacher, seed=3, scale=0.5)
    g = am.LGPShuffle(2)
    student = am.compress(teacher, input_scheme=g, recurrent_scheme=g)
    return teacher, student


def test_carried_state_eval_is_one_long_sequence(example, rng):
    """Evaluation with the state carried over a split equals one pass over
    each whole stream from a zero state (a NumPy LSTM); zero-state
    evaluation equals separate windows; the two differ; the states a
    training run carries are left as they were. For the stock LSTM
    teacher and for its compressed (StructuredLSTM) student."""
    from keras_antman import calibration
    from keras_antman import datasets

    ids = rng.integers(0, 31, 4 * 5 * 3 + 1)
    ds = datasets.bptt_dataset(ids, batch_size=4, num_steps=5)
    xs, ys = zip(*ds.as_numpy_iterator())
    x, y = np.concatenate(xs, 1), np.concatenate(ys, 1)  # [4, 15] streams
    for model in _stateful_lms(example):
        layers = calibration.stateful_layers(model)
        assert len(layers) == 2
        model(xs[1], training=False)  # a state to keep
        before = [np.array(v) for layer in layers for v in layer.states]
        ppl = example._perplexity_fn(model)
        carried, zero = ppl(ds, carry=True), ppl(ds, carry=False)
        assert carried == pytest.approx(_np_ppl(_np_logits(model, x), y),
                                        rel=1e-4)
        windows = np.concatenate([_np_logits(model, w) for w in xs], 1)
        assert zero == pytest.approx(_np_ppl(windows, y), rel=1e-4)
        assert carried != pytest.approx(zero, rel=1e-4)
        after = [np.array(v) for layer in layers for v in layer.states]
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        # The second window's logits: after the first vs from zero.
        for layer in layers:
            layer.reset_states()
        model(xs[0], training=False)
        carried = np.asarray(model(xs[1], training=False))
        for layer in layers:
            layer.reset_states()
        zero = np.asarray(model(xs[1], training=False))
        assert np.linalg.norm(carried - zero) > 0.05 * np.linalg.norm(zero)


def test_state_layout_converts_both_ways(example, rng):
    """`with_state_layout` turns a stateless LM stateful (fixed batch) and
    back, with the same weights: the stateful copy's zero-state output is
    the stateless model's, and carrying its state changes it."""
    from keras_antman import calibration

    stateless = example.language_model(31, 8, 8, "lm")
    assert example.with_state_layout(stateless, None) is stateless
    stateful = example.with_state_layout(stateless, 4)
    assert len(calibration.stateful_layers(stateful)) == 2
    assert stateful.inputs[0].shape[0] == 4
    x = rng.integers(0, 31, (4, 5))
    want = np.asarray(stateless(x))
    np.testing.assert_allclose(np.asarray(stateful(x)), want, atol=1e-5)
    assert not np.allclose(np.asarray(stateful(x)), want, atol=1e-5)
    back = example.with_state_layout(stateful, None)
    assert not calibration.stateful_layers(back)
    np.testing.assert_allclose(np.asarray(back(x[:2])), want[:2], atol=1e-5)


def test_distiller_carries_both_states_and_resets_at_epoch_start(
        example, tmp_path):
    """Distillation with --carry-state: after 6 steps of a 4-step epoch
    (learning rate 0, so the weights stay), the teacher's and the student's
    LSTM states are those of one pass over the epoch's first two windows
    from zero: carried across windows, zeroed at the epoch start, and the
    teacher on the same state history as the student."""
    from reference import lstm

    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    args = example.build_parser().parse_args([
        "--data", str(data), "--run-dir", str(tmp_path / "run"),
        "--carry-state", "--batch-size", "4", "--num-steps", "5",
        "--max-train-tokens", "85", "--chunk-steps", "2", "--optimizer",
        "sgd", "--verbose", "0"])
    run = example.Run(args)
    assert run.epoch_steps == 4
    teacher, student = _stateful_lms(example, run.vocab)
    steps, _ = example.distill(run, teacher, student, dict(
        c_target=1.0, c_mse=1.0, c_kl=1.0), 6, "probe", lr=0.0)
    assert steps == 6
    xs = [x for x, _ in run.train.take(2).as_numpy_iterator()]
    tokens = np.concatenate(xs, 1)
    for model in (teacher, student):
        h = model.get_layer("embedding").get_weights()[0][tokens]
        for i in range(2):
            layer = model.get_layer(f"lstm_{i}")
            weights = (layer.stock_weights()
                       if hasattr(layer, "stock_weights")
                       else layer.get_weights())
            h, h_last, c_last = lstm(h.astype("float64"), *(
                np.asarray(w, "float64") for w in weights))
            np.testing.assert_allclose(np.array(layer.states[0]), h_last,
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.array(layer.states[1]), c_last,
                                       rtol=1e-4, atol=1e-5)


def test_plateau_rule(example):
    args = example.build_parser().parse_args([
        "--data", "unused", "--plateau-tol", "0.01", "--plateau-stop",
        "0.002", "--plateau-patience", "2", "--plateau-decays", "3"])

    def step(vals, decayed=()):
        log = [dict(val_ppl=v, lr=1.0, decayed=i in decayed)
               for i, v in enumerate(vals)]
        return example.plateau_step(log, args)

    assert step([200]) == (1.0, False)
    assert step([200, 150]) == (1.0, False)  # 25% better: keep the rate
    assert step([200, 150, 149]) == (0.5, False)  # 0.7%: decay
    assert step([200, 150, 151]) == (0.5, False)  # worse, none decayed yet
    # Once decayed: one flat evaluation (< 0.2% on the best before it)
    # decays again, the second flat or worse one in a row stops.
    assert step([200, 150, 149, 148.9], {2}) == (0.5, False)  # 0.07%
    assert step([200, 150, 151, 149.9], {2}) == (1.0, True)
    assert step([200, 150, 151, 150.5], {2}) == (1.0, True)
    assert step([200, 150, 149, 140], {2}) == (1.0, False)  # 6% better
    # No more than 3 decays: stop instead of a 4th.
    assert step([200, 150, 149, 148, 147], {1, 2, 3}) == (1.0, True)


def test_plateau_keeps_the_best_weights(example, tmp_path, monkeypatch):
    """The plateau teacher ends with the weights of its best validation
    evaluation, not its last (validation perplexities scripted: 100, 90,
    95, 96 -> decay after 95, stop after 96, keep step 4's weights)."""
    from keras_antman._keras import keras

    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    calls, snapshots = [], {}

    def scripted(model):
        def perplexity(batches, carry=False):
            calls.append(carry)
            i = len(calls) - 1
            if i < 8 and i % 2 == 0:  # the validation call of evaluation i/2
                snapshots[2 * (i // 2 + 1)] = model.get_weights()
                return (100.0, 90.0, 95.0, 96.0)[i // 2]
            return 50.0
        return perplexity

    monkeypatch.setattr(example, "_perplexity_fn", scripted)
    results = example.main([
        "--data", str(data), "--run-dir", str(tmp_path / "run"),
        "--hidden", "8", "--batch-size", "4", "--num-steps", "5",
        "--max-train-tokens", "85", "--carry-state", "--teacher-schedule",
        "plateau", "--teacher-epochs", "5", "--chunk-steps", "2",
        "--eval-every", "2", "--optimizer", "sgd", "--lr", "1",
        "--verbose", "0", "--eager", "--stages", "teacher"])
    teacher = results["teacher"]
    assert [(e["step"], e["best"], e["decayed"], e["stopped"])
            for e in teacher["curve"]] == [
        (2, True, False, False), (4, True, False, False),
        (6, False, True, False), (8, False, False, True)]
    assert teacher["steps"] == 8 and teacher["weights_step"] == 4
    saved = keras.models.load_model(tmp_path / "run" / "teacher.keras")
    for got, want, last in zip(saved.get_weights(), snapshots[4],
                               snapshots[8]):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b)
               for a, b in zip(snapshots[4], snapshots[8]))
    assert not (tmp_path / "run" / "best_teacher.weights.h5").exists()


def test_carry_state_run_plateau_teacher_resumes_and_reports(
        example, tmp_path, monkeypatch):
    """A --carry-state run end to end: the teacher on the plateau schedule
    (interrupted before an evaluation, then resumed: no evaluation lost
    or repeated, the decayed rate kept), then students with curves, and
    the report's zero-state column and curve tables."""
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--run-dir", str(tmp_path / "run"),
            "--out", str(out), "--hidden", "20", "--groups", "10",
            "--batch-size", "4", "--num-steps", "5", "--max-train-tokens",
            "85", "--carry-state", "--teacher-schedule", "plateau",
            "--teacher-epochs", "5", "--chunk-steps", "2", "--eval-every",
            "2", "--plateau-tol", "1", "--plateau-stop", "1",
            "--optimizer", "sgd", "--lr", "1", "--student-steps", "4",
            "--curve-every", "2", "--students", "lgp,dense",
            "--calib-steps", "2", "--calib-eval", "2", "--verbose", "0",
            "--eager", "--report-name", "conv", "--stages",
            "teacher,calibrate,students,report"]
    ends = []
    clock_end = example._Clock.on_epoch_end

    def counting_end(self, epoch, logs=None):
        clock_end(self, epoch, logs)
        ends.append(self.key)
        if len(ends) == 2:  # after the 2nd chunk's backup, before its eval
            raise _Stop()

    monkeypatch.setattr(example._Clock, "on_epoch_end", counting_end)
    with pytest.raises(_Stop):
        example.main(argv)
    log = json.loads((tmp_path / "run" / "results.json").read_text())[
        "schedule"]["teacher"]
    assert [e["step"] for e in log] == [2]
    monkeypatch.setattr(example._Clock, "on_epoch_end", clock_end)
    results = example.main(argv)
    teacher = results["teacher"]
    # tol 1: every evaluation but the first decays, stop 1: the one after
    # a decay stops.
    assert [(e["step"], e["lr"], e["decayed"], e["stopped"])
            for e in teacher["curve"]] == [
        (2, 1.0, False, False), (4, 1.0, True, False),
        (6, 0.5, False, True)]
    assert teacher["steps"] == 6 and teacher["carry_state"]
    best = min(teacher["curve"], key=lambda e: e["val_ppl"])
    assert teacher["weights_step"] == best["step"]
    assert teacher["val_ppl"] == pytest.approx(best["val_ppl"], rel=1e-5)
    assert "schedule" not in results or "teacher" not in results["schedule"]
    for r in [teacher, *results["students"].values()]:
        assert {"val_ppl_zero_state", "test_ppl_zero_state"} <= set(r)
        assert np.isfinite(r["test_ppl"]) and r["test_ppl"] != r[
            "test_ppl_zero_state"]
    for r in results["students"].values():
        assert [e["step"] for e in r["curve"]] == [0, 2, 4]
        assert r["curve"][-1]["test_ppl"] == pytest.approx(r["test_ppl"])
    table = (out / "conv_results.md").read_text()
    assert "zero state" in table and "stateful truncated BPTT" in table
    assert "### Teacher" in table and "| 6 | 0.5 |" in table
    assert (out / "conv_curves.png").stat().st_size > 0
