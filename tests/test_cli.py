"""The ``keras-antman`` command: every subcommand on a tiny model, and each
user error as one line on stderr with exit code 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_antman as am
from keras_antman import cli
from keras_antman import demo
from keras_antman._keras import keras

VOCAB = 16
WORDS = [f"w{i}" for i in range(VOCAB - 1)]  # + <eos>: 16 word tokens


def _lm(name="lm"):
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 8, name="embedding")(inputs)
    h = keras.layers.LSTM(8, return_sequences=True, name="lstm")(h)
    return keras.Model(inputs, keras.layers.Dense(VOCAB, name="out")(h),
                       name=name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    _lm().save(d / "lm.keras")
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(d / "mlp.keras")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=9)) for _ in range(120)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    np.savez(d / "ids.npz", train=rng.integers(0, VOCAB, 1500),
             valid=rng.integers(0, VOCAB, 300))
    np.savez(d / "big_ids.npz", train=rng.integers(0, 2 * VOCAB, 1500))
    np.savez(d / "matrix.npz", train=np.zeros((4, 4), int))
    (d / "policy_bad.json").write_text('{"lstm": ["dense"]}')
    (d / "policy_broken.json").write_text('{"lstm": ')
    (d / "not_a_model.keras").write_text("hello")
    return d


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(capsys, argv, match):
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"keras-antman {argv[0]}: error: ")
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def test_parse_scheme():
    assert isinstance(cli.parse_scheme("dense"), am.Dense)
    assert cli.parse_scheme("lgp_shuffle:8").groups == 8
    s = cli.parse_scheme("lowrank_lgp:10,5,2")
    assert (s.groups_in, s.groups_out, s.rank_reduction) == (10, 5, 2)
    with pytest.raises(ValueError, match="Unknown scheme 'svd'"):
        cli.parse_scheme("svd:2")
    with pytest.raises(ValueError, match="Bad arguments.*missing 2 required"):
        cli.parse_scheme("lowrank_lgp:10")
    with pytest.raises(ValueError, match="scheme arguments are integers"):
        cli.parse_scheme("lgp_dense:x")


def test_synthetic_corpus_is_seeded_and_in_range():
    a = demo.synthetic_corpus(vocab=16, tokens=1000, seed=1)
    b = demo.synthetic_corpus(vocab=16, tokens=1000, seed=1)
    assert [len(x) for x in a] == [1000, 100, 100]
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].min() >= 0 and a[0].max() < 16


@pytest.mark.parametrize(
    "command", ["demo", "compress", "report", "distill", "export", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"keras-antman {command}" in out
    assert "lgp_shuffle:G" in out  # the scheme grammar


def test_compress_prints_report_and_saves(files, capsys, tmp_path):
    out = tmp_path / "small.keras"
    code, text, err = _run(capsys, "compress", files / "lm.keras", "-o", out,
                           "--input-scheme", "lgp_shuffle:4",
                           "--recurrent-scheme", "low_rank_lgp:2,2,2")
    assert code == 0, err
    assert "LGPShuffle(groups=4)" in text and "recurrent" in text
    assert "MACs before" in text
    model = keras.models.load_model(out)
    assert isinstance(model.get_layer("lstm"), am.StructuredLSTM)
    assert os.listdir(tmp_path) == ["small.keras"]  # no temporary left


def test_compress_fitted_to_calibration_data(files, capsys, tmp_path):
    plain, fitted = tmp_path / "plain.keras", tmp_path / "fitted.keras"
    args = ("--input-scheme", "lgp_shuffle:4",
            "--recurrent-scheme", "lgp_shuffle:4")
    assert _run(capsys, "compress", files / "lm.keras", "-o", plain,
                *args)[0] == 0
    code, text, err = _run(
        capsys, "compress", files / "lm.keras", "-o", fitted, *args,
        "--calibration-data", files / "ids.npz", "--calibration-steps", "3",
        "--batch-size", "4", "--num-steps", "6")
    assert code == 0, err
    assert "fitted to" in text and "error kept" in text
    a = keras.models.load_model(plain).get_layer("lstm")
    b = keras.models.load_model(fitted).get_layer("lstm")
    # Fitted to the data, not the nearest structured matrix.
    assert not np.allclose(a.cell.recurrent_matrix.to_dense(),
                           b.cell.recurrent_matrix.to_dense())
    _assert_one_line_error(
        capsys, ["compress", files / "lm.keras", "-o", tmp_path / "x.keras",
                 "--calibration-data", files / "corpus.txt"],
        "needs the teacher's --vocabulary")


def test_compress_with_a_layer_policy(files, capsys, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"lstm": ["dense", "lgp_shuffle:2"]}))
    out = tmp_path / "p.keras"
    code, text, err = _run(capsys, "compress", files / "lm.keras", "-o", out,
                           "--layers", policy)
    assert code == 0, err
    layer = keras.models.load_model(out).get_layer("lstm")
    assert layer.cell.recurrent_matrix.scheme == am.LGPShuffle(2)
    assert layer.cell.input_matrix.scheme == am.Dense()


def test_report_text_and_json(files, capsys, tmp_path):
    small = tmp_path / "s.keras"
    assert _run(capsys, "compress", files / "lm.keras", "-o", small,
                "--input-scheme", "lgp_shuffle:2",
                "--recurrent-scheme", "lgp_shuffle:2")[0] == 0
    code, text, _ = _run(capsys, "report", files / "lm.keras", small)
    assert code == 0 and "LGPShuffle(groups=2)" in text
    code, text, _ = _run(capsys, "report", files / "lm.keras", small, "--json")
    rows = json.loads(text)
    recurrent = next(r for r in rows if r["layer"] == "recurrent")
    assert recurrent["mac_reduction"] == pytest.approx(2.0)


def test_distill_text_with_given_coefficients(files, capsys, tmp_path):
    student = tmp_path / "s.keras"
    _run(capsys, "compress", files / "lm.keras", "-o", student)
    out = tmp_path / "run"
    code, text, err = _run(
        capsys, "distill", "--teacher", files / "lm.keras", "--student",
        student, "--data", files / "corpus.txt", "--coefficients", "1,30,1000",
        "--epochs", "1", "--steps", "3", "--batch-size", "4",
        "--num-steps", "5", "--out", out, "--verbose", "0")
    assert code == 0, err
    assert "c_mse = 30" in text
    assert sorted(os.listdir(out)) == ["history.json", "student.keras",
                                       "vocabulary.json"]
    history = json.loads((out / "history.json").read_text())
    assert history["coefficients"]["c_kl"] == 1000
    assert len(history["history"]["kl_loss"]) == 1
    vocab = json.loads((out / "vocabulary.json").read_text())
    assert vocab["level"] == "word" and len(vocab["tokens"]) == VOCAB
    assert "<eos>" in vocab["tokens"]


def test_distill_npz_calibrates_then_resumes(files, capsys, tmp_path):
    student = tmp_path / "s.keras"
    _run(capsys, "compress", files / "lm.keras", "-o", student)
    args = ["distill", "--teacher", files / "lm.keras", "--student", student,
            "--data", files / "ids.npz", "--calibrate-steps", "2",
            "--epochs", "1", "--steps", "2", "--batch-size", "4",
            "--num-steps", "5", "--out", tmp_path / "run", "--verbose", "0"]
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    assert "Calibrating the coefficients" in text
    saved = json.loads((tmp_path / "run" / "coefficients.json").read_text())
    code, text, err = _run(capsys, *args, "--resume")
    assert code == 0, err
    assert "Resuming with the coefficients" in text
    assert f"c_kl = {saved['c_kl']:g}" in text


def test_distill_vocabulary_must_match_the_teacher(files, capsys, tmp_path):
    _assert_one_line_error(
        capsys,
        ["distill", "--teacher", files / "lm.keras", "--student",
         files / "lm.keras", "--data", files / "corpus.txt", "--level",
         "char", "--coefficients", "1,1,1", "--out", tmp_path],
        "char-level vocabulary of 13 tokens but the teacher predicts 16 "
        "classes")


def test_export_compiled_portable_and_tflite(files, capsys, tmp_path):
    small = tmp_path / "s.keras"
    _run(capsys, "compress", files / "lm.keras", "-o", small,
         "--input-scheme", "lgp_shuffle:4", "--recurrent-scheme",
         "lgp_shuffle:4")
    code, text, err = _run(capsys, "export", small, tmp_path / "compiled",
                           "--kernel", "compiled")
    assert code == 0, err
    assert (tmp_path / "compiled" / "saved_model.pb").exists()
    code, text, err = _run(capsys, "export", small, tmp_path / "portable",
                           "--tflite", tmp_path / "s.tflite")
    assert code == 0, err
    assert (tmp_path / "portable" / "saved_model.pb").exists()
    assert (tmp_path / "s.tflite").stat().st_size > 0
    _assert_one_line_error(capsys, ["export", small, tmp_path / "portable"],
                           "pass overwrite=True")


def test_export_quantized_tflite(files, capsys, tmp_path):
    small = tmp_path / "s.keras"
    _run(capsys, "compress", files / "lm.keras", "-o", small,
         "--input-scheme", "lgp_shuffle:4", "--recurrent-scheme",
         "lgp_shuffle:4")
    for q, extra in (("dynamic", []),
                     ("int8", ["--calibration-data", files / "ids.npz",
                               "--calibration-steps", "2",
                               "--num-steps", "6"])):
        out = tmp_path / f"{q}.tflite"
        code, text, err = _run(capsys, "export", small, tmp_path / q,
                               "--tflite", out, "--quantize", q, *extra)
        assert code == 0, err
        assert f"{q} int8" in text
        summary = am.tflite_summary(out)
        if q == "int8":  # (dynamic leaves matrices under 1024 elements)
            assert summary["weights"]["INT8"] > 0, summary
            assert "FLOAT32" not in summary["weights"], summary
    for argv, match in (
            (["--quantize", "dynamic"], "add --tflite FILE"),
            (["--tflite", tmp_path / "x.tflite", "--quantize", "int8"],
             "--quantize int8 calibrates on --calibration-data"),
            (["--tflite", tmp_path / "x.tflite", "--calibration-data",
              files / "ids.npz"], "(and only it does)")):
        _assert_one_line_error(capsys, ["export", small, tmp_path / "y",
                                        *argv], match)
    assert not (tmp_path / "y").exists()


def test_bench_times_each_path(files, capsys, tmp_path):
    code, text, err = _run(capsys, "bench", files / "lm.keras", "--steps", 4,
                           "--repeats", 2, "--paths", "keras,compiled",
                           "--json")
    assert code == 0, err
    times = json.loads(text.strip().splitlines()[-1])
    assert set(times) == {"keras", "compiled"}
    assert "stock Keras (ms)" in text and "Machine:" in text
    small = tmp_path / "s.keras"
    _run(capsys, "compress", files / "lm.keras", "-o", small)
    code, text, err = _run(capsys, "bench", small, "--steps", 4,
                           "--repeats", 2, "--json")
    assert code == 0, err
    times = json.loads(text.strip().splitlines()[-1])
    assert list(times) == ["compiled", "portable", "tflite"]
    _assert_one_line_error(capsys, ["bench", small, "--paths", "keras"],
                           "cannot be timed through 'keras'")


def test_demo_tiny_writes_its_summary(capsys, tmp_path):
    out = tmp_path / "demo"
    code, text, err = _run(capsys, "demo", "--tiny", "--verbose", "0",
                           "--out", out)
    assert code == 0, err
    assert "[6/6]" in text and f"Summary: {out}" in text
    assert {"summary.md", "summary.json", "summary.png", "teacher.keras",
            "student.keras", "export"} <= set(os.listdir(out))
    assert sorted(os.listdir(out / "export")) == [
        "student.tflite", "student_compiled", "student_portable",
        "teacher.tflite"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["student"]["latency"]) == {"portable", "compiled",
                                                  "tflite"}
    assert summary["teacher"]["lstm_macs"] == 8 * summary["student"][
        "lstm_macs"]  # lgp_shuffle:8 on both products
    md = (out / "summary.md").read_text()
    assert "| teacher / student |" in md
    assert os.listdir(tmp_path) == ["demo"]  # staging folder renamed


def test_demo_never_replaces_a_foreign_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _assert_one_line_error(capsys, ["demo", "--tiny", "--out", tmp_path],
                           "is not the folder of an earlier demo run")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_demo_failure_leaves_nothing(capsys, tmp_path):
    # lgp_shuffle:3 cannot split the tiny LSTM's 8 -> 64 input product:
    # the run fails after training the teacher, and no folder appears.
    code, _, err = _run(capsys, "demo", "--tiny", "--verbose", "0", "--out",
                        tmp_path / "fail", "--input-scheme", "lgp_shuffle:3")
    assert code == 2
    assert "LGPShuffle(groups=3) cannot compress" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, match", [
    (["compress", "{d}/missing.keras"], "missing.keras does not exist"),
    (["report", "{d}/lm.keras", "{d}/missing.keras"], "does not exist"),
    (["export", "{d}/missing.keras", "{d}/x"], "does not exist"),
    (["bench", "{d}/missing.keras"], "does not exist"),
    (["distill", "--teacher", "{d}/lm.keras", "--student", "{d}/lm.keras",
      "--data", "{d}/missing.txt"], "missing.txt does not exist"),
    (["compress", "{d}/mlp.keras"], "has no LSTM/GRU layers to compress"),
    (["compress", "{d}/lm.keras", "--input-scheme", "svd:2"],
     "Unknown scheme 'svd'"),
    (["compress", "{d}/lm.keras", "--recurrent-scheme", "lgp_shuffle:x"],
     "scheme arguments are integers"),
    (["compress", "{d}/lm.keras", "--recurrent-scheme", "lgp_shuffle:3",
      "-o", "{d}/never.keras"],
     "LGPShuffle(groups=3) cannot compress a 8 -> 32 product"),
    (["distill", "--teacher", "{d}/lm.keras", "--student", "{d}/lm.keras",
      "--data", "{d}/ids.npz", "--coefficients", "1,2"],
     "--coefficients takes three numbers"),
    (["distill", "--teacher", "{d}/lm.keras", "--student", "{d}/lm.keras",
      "--data", "{d}/big_ids.npz", "--coefficients", "1,1,1"],
     "training token ids span [0, 31] but the teacher predicts 16 classes"),
    (["distill", "--teacher", "{d}/lm.keras", "--student", "{d}/lm.keras",
      "--data", "{d}/matrix.npz", "--coefficients", "1,1,1"],
     "'train' must be a 1-D array of integer token ids"),
    (["compress", "{d}/lm.keras", "--layers", "{d}/policy_bad.json"],
     "layer 'lstm' maps to ['dense']; expected [input spec, recurrent spec]"),
    (["compress", "{d}/lm.keras", "--layers", "{d}/policy_broken.json"],
     "policy_broken.json is not valid JSON"),
    (["compress", "{d}/lm.keras", "-o", "{d}/lm.keras"],
     "lm.keras exists; pass --overwrite"),
    (["report", "{d}/not_a_model.keras"], "cannot load"),
    (["export", "{d}/lm.keras", "{d}/x", "--tflite", "{d}/x.bin"],
     "must end in .tflite"),
])
def test_errors_are_one_line_with_exit_code_2(files, capsys, argv, match,
                                             tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders would land here
    argv = [a.format(d=files) for a in argv]
    _assert_one_line_error(capsys, argv, match)
    assert not (files / "never.keras").exists()
    assert os.listdir(tmp_path) == []  # nothing written on failure


def test_console_error_in_a_fresh_process(files):
    # The real entry point: exit code 2, the error as stderr's last line
    # and no traceback (TF 2.21 itself prints notices at import).
    proc = subprocess.run(
        [sys.executable, "-m", "keras_antman", "compress",
         str(files / "lm.keras"), "--input-scheme", "lgp_shuffle:3"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("keras-antman compress: error: `lstm: input "
                           "product`: LGPShuffle(groups=3)"), last
    assert [line for line in proc.stderr.splitlines()
            if "keras-antman" in line] == [last]
