"""examples/ptb_word_lm.py end to end at a tiny scale on made-up data."""

import importlib.util
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_example():
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


def test_every_stage_runs_and_resumes(tmp_path):
    example = _load_example()
    data = tmp_path / "ptb"
    data.mkdir()
    _tiny_ptb(data)
    argv = ["--data", str(data), "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "out"), "--hidden", "200",
            "--batch-size", "4", "--num-steps", "5", "--teacher-epochs",
            "1", "--student-steps", "2", "--grid-steps", "2",
            "--calib-steps", "2", "--verbose", "0"]
    results = example.main(argv)
    students = results["students"]
    assert set(students) == set(example.student_specs(200))
    assert abs(students["LGP-Shuffle g=10"]["mac_reduction"] - 10) < 1e-9
    assert abs(
        students["LowRank-LGP (10, 20, r=2)"]["mac_reduction"] - 10) < 1e-9
    assert abs(students["SVD r=10"]["mac_reduction"] - 8) < 1e-9
    assert 9.5 < students["Small dense LSTM h=47"]["mac_reduction"] < 10.5
    assert len(results["grid"]) == 4
    assert {"c_mse", "c_kl", "mse_loss"} <= set(results["calibration"])
    for name in ("ptb_results.md", "ptb_coefficients.md",
                 "ptb_results.json", "ptb_ppl_vs_params.png"):
        assert (tmp_path / "out" / name).exists()
    table = (tmp_path / "out" / "ptb_results.md").read_text()
    assert all(name in table for name in students)
    # A second run finds everything done and trains nothing.
    before = json.loads((tmp_path / "run" / "results.json").read_text())
    again = example.main(argv)
    assert again == before
