"""The ``keras-antman`` command: scheme parsing and a tiny demo run."""

import pytest

import keras_antman as am
from keras_antman import cli


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
    a = cli.synthetic_corpus(vocab=16, tokens=1000, seed=1)
    b = cli.synthetic_corpus(vocab=16, tokens=1000, seed=1)
    assert [len(x) for x in a] == [1000, 100, 100]
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].min() >= 0 and a[0].max() < 16


def test_demo_runs_end_to_end(tmp_path, capsys):
    args = cli.build_parser().parse_args([
        "demo", "--hidden", "16", "--embed", "8", "--epochs", "1",
        "--finetune-epochs", "1", "--input-scheme", "lgp_shuffle:4",
        "--recurrent-scheme", "lowrank_lgp:2,2,2", "--verbose", "0",
        "--out", str(tmp_path),
    ])
    result = cli.demo(args)
    out = capsys.readouterr().out
    assert "LowRankLGP(groups_in=2, groups_out=2, rank_reduction=2)" in out
    assert "Test perplexity" in out
    assert result["lstm_mac_reduction"] > 1
    assert result["teacher"] < 64  # better than uniform over 64 tokens
    assert (tmp_path / "student.keras").exists()


def test_main_reports_bad_scheme(capsys):
    code = cli.main(["demo", "--input-scheme", "lgp_shuffle:7",
                     "--epochs", "0", "--hidden", "16", "--embed", "8",
                     "--finetune-epochs", "0", "--verbose", "0"])
    assert code == 2
    assert "LGPShuffle(groups=7) cannot compress" in capsys.readouterr().err
