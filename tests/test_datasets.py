"""Tests for the PTB loader and truncated-BPTT batches."""

import hashlib
import os
import pathlib
import tarfile

import numpy as np
import pytest

from keras_antman import datasets
from keras_antman.datasets import bptt_dataset
from keras_antman.datasets import load_ptb

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def real_ptb_dir():
    env = os.environ.get("KERAS_ANTMAN_PTB")
    path = pathlib.Path(env) if env else REPO_ROOT.parent / "shared/data/ptb"
    return path if (path / "ptb.train.txt").is_file() else None


TRAIN = " b a c\n a b a\n d a\n"
VALID = " a b\n zzz\n"
TEST = " c d\n"


def write_ptb(directory, train=TRAIN, valid=VALID, test=TEST):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("ptb.train.txt", train), ("ptb.valid.txt", valid),
                       ("ptb.test.txt", test)):
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def tiny(tmp_path):
    return write_ptb(tmp_path / "ptb", train=TRAIN + " <unk>\n")


def test_vocabulary_ids_and_eos(tiny):
    data = load_ptb(tiny)
    # counts: a 4, <eos> 4, b 2, c 1, d 1, <unk> 1; ties alphabetical.
    assert data.vocabulary == ("<eos>", "a", "b", "<unk>", "c", "d")
    assert data.vocab_size == 6
    w = data.word_to_id
    assert data.train.dtype == np.int32
    np.testing.assert_array_equal(
        data.train,
        [w[t] for t in "b a c <eos> a b a <eos> d a <eos> <unk> <eos>".split()],
    )
    # "zzz" is not in the training vocabulary and maps to <unk>.
    np.testing.assert_array_equal(
        data.valid, [w["a"], w["b"], w["<eos>"], w["<unk>"], w["<eos>"]]
    )
    np.testing.assert_array_equal(data.test, [w["c"], w["d"], w["<eos>"]])
    assert data.directory == os.fspath(tiny)


def test_keras_style_module_reads_the_same_data(tiny):
    from keras_antman.datasets import ptb

    data = ptb.load_data(tiny)
    np.testing.assert_array_equal(data.train, load_ptb(tiny).train)
    assert datasets.ptb is ptb and ptb.bptt_dataset is bptt_dataset


def test_unknown_word_without_unk_entry(tmp_path):
    directory = write_ptb(tmp_path / "ptb")
    with pytest.raises(ValueError, match="'zzz'.*not in the vocabulary"):
        load_ptb(directory)


def test_bptt_shapes_and_next_word_shift():
    ids = np.arange(103)
    ds = bptt_dataset(ids, batch_size=4, num_steps=5)
    batches = list(ds.as_numpy_iterator())
    # 103 // 4 = 25 tokens per row; (25 - 1) // 5 = 4 batches.
    assert len(ds) == len(batches) == 4
    rows = ids[:100].reshape(4, 25)
    for i, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (4, 5)
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, rows[:, 5 * i:5 * i + 5])
        np.testing.assert_array_equal(y, rows[:, 5 * i + 1:5 * i + 6])
    # Row r of batch i + 1 continues row r of batch i (stateful LMs).
    for (x0, _), (x1, _) in zip(batches, batches[1:]):
        np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)


def test_bptt_on_loaded_data(tiny):
    data = load_ptb(tiny)
    x, y = next(iter(bptt_dataset(data.train, batch_size=2, num_steps=3)))
    np.testing.assert_array_equal(x.numpy()[0], data.train[:3])
    np.testing.assert_array_equal(y.numpy()[0], data.train[1:4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0, "num_steps": 2}, "`batch_size` must be a positive"),
        ({"batch_size": 2, "num_steps": 2.5}, "`num_steps` must be a positive"),
        ({"batch_size": 4, "num_steps": 5}, "too few for batch_size=4"),
    ],
)
def test_bptt_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bptt_dataset(np.arange(20), **kwargs)
    with pytest.raises(ValueError, match="must be a 1-D"):
        bptt_dataset(np.zeros((2, 50), "int32"), batch_size=2, num_steps=2)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="path=.*does not exist"):
        load_ptb(tmp_path / "nowhere")


def test_path_is_a_file(tiny):
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        load_ptb(tiny / "ptb.train.txt")


def test_missing_file(tiny):
    (tiny / "ptb.valid.txt").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"ptb\.valid\.txt not found in"):
        load_ptb(tiny)


def test_checksum_mismatch_from_sums_file(tiny):
    good = hashlib.sha256((tiny / "ptb.train.txt").read_bytes()).hexdigest()
    lines = [f"{good}  ptb.train.txt"]
    for name in ("ptb.valid.txt", "ptb.test.txt"):
        digest = hashlib.sha256((tiny / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}")
    (tiny / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    load_ptb(tiny)  # all sums match
    with open(tiny / "ptb.test.txt", "a") as f:
        f.write(" d c\n")  # corrupt one file
    with pytest.raises(ValueError,
                       match=r"ptb\.test\.txt is corrupt.*SHA-256 is"):
        load_ptb(tiny)
    assert load_ptb(tiny, verify=False).test.size == 6


def test_standard_checksums_when_required(tiny):
    with pytest.raises(ValueError, match=(
            r"ptb\.train\.txt is corrupt.*expected "
            + datasets.PTB_SHA256["ptb.train.txt"])):
        load_ptb(tiny, verify=True)


def test_malformed_sums_file(tiny):
    (tiny / "SHA256SUMS").write_text("abc ptb.train.txt\n")
    with pytest.raises(ValueError, match="malformed line 1"):
        load_ptb(tiny)


def test_undecodable_file(tiny):
    (tiny / "ptb.train.txt").write_bytes(b" a b\n \xff\xfe c\n")
    with pytest.raises(ValueError, match=r"not valid UTF-8 text \(byte 6"):
        load_ptb(tiny)


def test_empty_training_file(tiny):
    (tiny / "ptb.train.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="contains no words"):
        load_ptb(tiny)


def test_invalid_verify(tiny):
    with pytest.raises(ValueError, match="`verify` must be True, False"):
        load_ptb(tiny, verify="yes")


def test_download_failure_says_to_pass_a_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_ANTMAN_PTB", raising=False)
    url = (tmp_path / "missing.tgz").as_uri()
    with pytest.raises(RuntimeError,
                       match="could not download PTB.*pass the directory"):
        load_ptb(cache_dir=tmp_path / "cache", url=url)
    assert not (tmp_path / "cache" / "ptb").exists()


def test_environment_variable_names_the_directory(tiny, monkeypatch):
    monkeypatch.setenv("KERAS_ANTMAN_PTB", os.fspath(tiny))
    assert load_ptb().vocab_size == 6


def make_tarball(path, source_dir):
    with tarfile.open(path, "w:gz") as tar:
        for name in datasets.PTB_FILES:
            tar.add(source_dir / name,
                    arcname=f"./simple-examples/data/{name}")
    return path


def test_download_rejects_files_with_wrong_checksums(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_ANTMAN_PTB", raising=False)
    tarball = make_tarball(tmp_path / "simple-examples.tgz",
                           write_ptb(tmp_path / "src"))
    with pytest.raises(ValueError, match="corrupt or not the expected file"):
        load_ptb(cache_dir=tmp_path / "cache", url=tarball.as_uri())
    assert not (tmp_path / "cache" / "ptb" / "ptb.train.txt").exists()


REAL = real_ptb_dir()
needs_real_ptb = pytest.mark.skipif(
    REAL is None,
    reason="PTB not found at ../shared/data/ptb or $KERAS_ANTMAN_PTB",
)


@needs_real_ptb
def test_real_ptb():
    data = load_ptb(REAL, verify=True)
    assert data.vocab_size == 10000
    assert (len(data.train), len(data.valid), len(data.test)) == (
        929589, 73760, 82430)
    assert data.vocabulary[:3] == ("the", "<unk>", "<eos>")
    # The TF PTB tutorial's ids for the first words of the training split.
    np.testing.assert_array_equal(data.train[:5],
                                  [9970, 9971, 9972, 9974, 9975])
    assert len(bptt_dataset(data.train, batch_size=20, num_steps=35)) == 1327


@needs_real_ptb
def test_download_and_cache_from_a_local_tarball(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_ANTMAN_PTB", raising=False)
    tarball = make_tarball(tmp_path / "simple-examples.tgz", REAL)
    cache = tmp_path / "cache"
    data = load_ptb(cache_dir=cache, url=tarball.as_uri())
    assert len(data.train) == 929589
    assert data.directory == os.fspath(cache / "ptb")
    tarball.unlink()  # the second call must use the cache
    assert len(load_ptb(cache_dir=cache, url=tarball.as_uri()).test) == 82430
