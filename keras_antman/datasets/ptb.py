"""Penn Treebank (PTB) language-modelling data and truncated-BPTT batches.

`load_ptb` (or `load_data`, the ``keras.datasets`` name) reads the
standard `ptb.{train,valid,test}.txt` of Mikolov's "simple-examples"
(10,000 words; 929,589 / 73,760 / 82,430 tokens counting `<eos>`) from a
directory, or downloads and caches them; `bptt_dataset`
cuts a token stream into Zaremba-style batches for truncated
backpropagation through time.
"""

import dataclasses
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import tensorflow as tf

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
# SHA-256 of the standard files (as in simple-examples/data).
PTB_SHA256 = {
    "ptb.train.txt": (
        "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"
    ),
    "ptb.valid.txt": (
        "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"
    ),
    "ptb.test.txt": (
        "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"
    ),
}
EOS = "<eos>"
UNK = "<unk>"
_SUMS_FILE = "SHA256SUMS"
_ENV_PATH = "KERAS_ANTMAN_PTB"
_TAR_MEMBER_DIR = "simple-examples/data/"


@dataclasses.dataclass(frozen=True)
class PTB:
    """Penn Treebank splits as word ids, with the vocabulary.

    Attributes:
        train: int32 array of the training tokens' ids.
        valid: int32 array of the validation tokens' ids.
        test: int32 array of the test tokens' ids.
        vocabulary: Words by id (most frequent first, ties alphabetical).
        word_to_id: Dict mapping each word to its id.
        directory: Directory the files were read from.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocabulary: tuple
    word_to_id: dict
    directory: str

    @property
    def vocab_size(self):
        """Number of words in the vocabulary (10,000 for standard PTB)."""
        return len(self.vocabulary)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sums_file(path):
    sums = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or len(parts[0]) != 64:
                raise ValueError(
                    f"load_ptb: malformed line {number} in {path}: expected "
                    f"'<64 hex digits>  <file name>', received {line!r}."
                )
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def _verify(path, expected, source):
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(
            f"load_ptb: {path} is corrupt or not the expected file: its "
            f"SHA-256 is {actual}, expected {expected} ({source}). Replace "
            "the file, or pass verify=False to load it anyway."
        )


def _read_tokens(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"load_ptb: {path} is not valid UTF-8 text (byte {e.start}: "
            f"{raw[e.start:e.start + 1]!r}); the file is corrupt or not a "
            "PTB text file."
        ) from e
    # One sentence per line, each ended by <eos> (as the TF PTB tutorial's
    # reader does by replacing every newline with <eos>).
    from keras_antman.datasets import text as text_lib

    return text_lib.tokenize(text, "word")


def _build_vocabulary(tokens):
    counts = Counter(tokens)
    return tuple(w for w, _ in sorted(counts.items(),
                                      key=lambda kv: (-kv[1], kv[0])))


def tokens_to_ids(tokens, word_to_id, where):
    """``tokens`` as int32 ids; unknown tokens map to ``<unk>`` if
    ``word_to_id`` has it, else a ValueError naming ``where``."""
    unk = word_to_id.get(UNK)
    ids = np.empty(len(tokens), dtype=np.int32)
    for i, word in enumerate(tokens):
        index = word_to_id.get(word, unk)
        if index is None:
            raise ValueError(
                f"token {word!r} (position {i}) of {where} is not in the "
                f"vocabulary, which has no {UNK!r} entry to map it to."
            )
        ids[i] = index
    return ids


def _load_directory(directory, verify):
    if not os.path.exists(directory):
        raise FileNotFoundError(
            f"load_ptb: path={directory!r} does not exist. Expected a "
            f"directory containing {', '.join(PTB_FILES)} (the 'data' folder "
            f"of {PTB_URL})."
        )
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            f"load_ptb: path={directory!r} is not a directory. Expected a "
            f"directory containing {', '.join(PTB_FILES)}."
        )
    paths = [os.path.join(directory, name) for name in PTB_FILES]
    missing = [name for name, p in zip(PTB_FILES, paths)
               if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"load_ptb: {', '.join(missing)} not found in {directory!r}. "
            f"Expected all of {', '.join(PTB_FILES)} (the 'data' folder of "
            f"{PTB_URL})."
        )

    if verify is True:
        for name, p in zip(PTB_FILES, paths):
            _verify(p, PTB_SHA256[name], "standard PTB checksum")
    elif verify == "auto":
        sums_path = os.path.join(directory, _SUMS_FILE)
        if os.path.isfile(sums_path):
            sums = _read_sums_file(sums_path)
            for name, p in zip(PTB_FILES, paths):
                if name in sums:
                    _verify(p, sums[name], f"listed in {sums_path}")

    token_lists = [_read_tokens(p) for p in paths]
    if not any(w != EOS for w in token_lists[0]):
        raise ValueError(
            f"load_ptb: {paths[0]} contains no words; the training split "
            "defines the vocabulary and cannot be empty."
        )
    vocabulary = _build_vocabulary(token_lists[0])
    word_to_id = {w: i for i, w in enumerate(vocabulary)}
    train, valid, test = (
        tokens_to_ids(t, word_to_id, f"{p} (load_ptb: the vocabulary is "
                      "built from ptb.train.txt)")
        for t, p in zip(token_lists, paths))
    return PTB(train=train, valid=valid, test=test, vocabulary=vocabulary,
               word_to_id=word_to_id, directory=directory)


def _default_cache_dir():
    home = os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))
    return os.path.join(os.path.expanduser(home), "datasets")


def _download(url, target_dir):
    """Downloads the simple-examples tarball and extracts the PTB files."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RuntimeError(
            f"load_ptb: could not download PTB from url={url!r} ({e}). "
            "Download and unpack simple-examples.tgz yourself and pass the "
            "directory holding ptb.train.txt, ptb.valid.txt and ptb.test.txt "
            "as `path` (or set the KERAS_ANTMAN_PTB environment variable)."
        ) from e
    os.makedirs(target_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=target_dir, prefix=".download-")
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
                for name in PTB_FILES:
                    member = None
                    for candidate in (_TAR_MEMBER_DIR + name,
                                      "./" + _TAR_MEMBER_DIR + name):
                        try:
                            member = tar.getmember(candidate)
                            break
                        except KeyError:
                            continue
                    if member is None or not member.isfile():
                        raise ValueError(
                            f"load_ptb: the archive from {url!r} has no "
                            f"{_TAR_MEMBER_DIR + name}."
                        )
                    source = tar.extractfile(member)
                    with open(os.path.join(staging, name), "wb") as out:
                        shutil.copyfileobj(source, out)
        except tarfile.TarError as e:
            raise ValueError(
                f"load_ptb: the download from {url!r} is not a readable "
                f"tar archive ({e})."
            ) from e
        for name in PTB_FILES:
            _verify(os.path.join(staging, name), PTB_SHA256[name],
                    f"standard PTB checksum; downloaded from {url}")
        for name in PTB_FILES:
            os.replace(os.path.join(staging, name),
                       os.path.join(target_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_ptb(path=None, cache_dir=None, url=PTB_URL, verify="auto"):
    """Loads Penn Treebank as word ids with the 10,000-word vocabulary.

    Reads `ptb.train.txt`, `ptb.valid.txt` and `ptb.test.txt`. Each line
    is one sentence; its whitespace-separated words are followed by `<eos>`.
    The vocabulary is built from the training split, ordered by decreasing
    frequency and then alphabetically (the TF PTB tutorial's order), so id 0
    is the most frequent word (`"the"` for PTB). Validation and test words
    missing from it map to `<unk>`.

    With `path=None` the directory in the `KERAS_ANTMAN_PTB` environment
    variable is used if set; otherwise the files cached in
    `<cache_dir>/ptb`; otherwise they are downloaded from `url`, checked
    against the standard SHA-256 sums and cached. Files are never copied
    anywhere when `path` is given.

    Args:
        path: Directory containing the three files, or `None`.
        cache_dir: Where downloads are cached. Defaults to
            `$KERAS_HOME/datasets` or `~/.keras/datasets`.
        url: Address of the simple-examples tarball. Defaults to `PTB_URL`.
        verify: Checksum policy. `True` requires the standard PTB files
            (SHA-256 sums built into this module). `"auto"` (default)
            checks the files against a `SHA256SUMS` file in the directory
            when there is one, and checks downloaded or cached files
            against the standard sums. `False` checks nothing.

    Returns:
        A `PTB` with `train`, `valid`, `test` (int32 id arrays),
        `vocabulary`, `word_to_id` and `vocab_size`.

    Raises:
        FileNotFoundError: If `path` or one of the files does not exist.
        NotADirectoryError: If `path` is not a directory.
        ValueError: If a file fails its checksum, is not UTF-8 text, the
            training split is empty, a word cannot be mapped, or `verify`
            is invalid.
        RuntimeError: If `path` is `None`, nothing is cached, and the
            download fails (the message says to pass `path`).

    Example:

    >>> data = load_ptb("/data/simple-examples/data")  # doctest: +SKIP
    >>> data.vocab_size, len(data.train)  # doctest: +SKIP
    (10000, 929589)
    """
    if verify not in (True, False, "auto"):
        raise ValueError(
            "load_ptb: `verify` must be True, False or 'auto'. "
            f"Received: verify={verify!r}"
        )
    if path is None:
        path = os.environ.get(_ENV_PATH) or None
    if path is not None:
        return _load_directory(os.fspath(path), verify)

    cache_dir = os.path.expanduser(
        os.fspath(cache_dir) if cache_dir is not None
        else _default_cache_dir()
    )
    target = os.path.join(cache_dir, "ptb")
    cached = all(os.path.isfile(os.path.join(target, n)) for n in PTB_FILES)
    if not cached:
        _download(url, target)
    return _load_directory(target, True if verify == "auto" else verify)


def _bptt_arrays(ids, batch_size, num_steps):
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(
            "bptt_dataset: `ids` must be a 1-D sequence of token ids. "
            f"Received shape {ids.shape}."
        )
    for name, value in (("batch_size", batch_size), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < 1:
            raise ValueError(
                f"bptt_dataset: `{name}` must be a positive int. "
                f"Received: {name}={value!r}"
            )
    row_len = len(ids) // batch_size
    steps = (row_len - 1) // num_steps
    if steps < 1:
        raise ValueError(
            f"bptt_dataset: {len(ids)} tokens are too few for batch_size="
            f"{batch_size} and num_steps={num_steps}; need at least "
            f"{batch_size * (num_steps + 1)}."
        )
    rows = ids[: batch_size * row_len].reshape(batch_size, row_len)
    used = steps * num_steps
    # [batch, steps * num_steps] -> [steps, batch, num_steps]
    x = rows[:, :used].reshape(batch_size, steps, num_steps)
    y = rows[:, 1:used + 1].reshape(batch_size, steps, num_steps)
    return (np.ascontiguousarray(x.transpose(1, 0, 2)),
            np.ascontiguousarray(y.transpose(1, 0, 2)))


def bptt_dataset(ids, batch_size, num_steps):
    """Cuts a token stream into batches for truncated BPTT (Zaremba et al.).

    The stream is split into `batch_size` contiguous rows (the tail that
    does not fill a row is dropped); batch `i` holds columns
    `[i * num_steps, (i + 1) * num_steps)` of every row as `x` and the same
    columns shifted by one token as `y`, the next word. Batches come in
    order and are never shuffled, so row `r` of batch `i + 1` continues row
    `r` of batch `i`: a stateful LM can carry its state across batches. For
    PTB's training split with `batch_size=20, num_steps=35` this gives the
    usual 1,327 batches per epoch.

    Args:
        ids: 1-D sequence of int token ids (e.g. `load_ptb(...).train`).
        batch_size: Rows per batch, a positive int.
        num_steps: Timesteps per batch (the truncation length), a positive
            int.

    Returns:
        A finite `tf.data.Dataset` of `(x, y)` int32 tensors, each of shape
        `[batch_size, num_steps]`, with `len()` equal to the number of
        batches.

    Raises:
        ValueError: If `ids` is not 1-D, `batch_size` or `num_steps` is not
            a positive int, or there are too few tokens for one batch.

    Example:

    >>> ds = bptt_dataset(list(range(10)), batch_size=2, num_steps=2)
    >>> [(x.tolist(), y.tolist()) for x, y in ds.as_numpy_iterator()]
    [([[0, 1], [5, 6]], [[1, 2], [6, 7]]), ([[2, 3], [7, 8]], [[3, 4], [8, 9]])]
    """
    x, y = _bptt_arrays(ids, batch_size, num_steps)
    return tf.data.Dataset.from_tensor_slices(
        (x.astype(np.int32), y.astype(np.int32))
    )


# The name ``keras.datasets`` modules use: ``datasets.ptb.load_data()``.
load_data = load_ptb
