"""Token ids from a user's text or ``.npz`` file, for ``keras-antman distill``.

Word level follows the PTB reader (`keras_antman.datasets.ptb`): words split
on whitespace, ``<eos>`` at the end of every line, the vocabulary ordered by
count (descending) then token, so a model trained on
`keras_antman.datasets.load_ptb` ids gets the same ids from the PTB text
files. Character level keeps every character, newlines included.
"""

import json
import os
from collections import Counter

import numpy as np

from keras_antman.datasets.ptb import EOS  # the same end-of-line token
from keras_antman.datasets.ptb import tokens_to_ids

UNK = "<unk>"
LEVELS = ("word", "char")


def tokenize(text, level):
    """Tokens of ``text`` at ``"word"`` or ``"char"`` level."""
    if level == "char":
        return list(text)
    if level != "word":
        raise ValueError(
            f"`level` must be one of {LEVELS}. Received: level={level!r}"
        )
    tokens = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def read_text(path):
    """The UTF-8 text of ``path`` (one clear error when it is not text)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}); give a text file or "
            "an .npz of token ids."
        ) from None


def build_vocabulary(tokens):
    """Tokens by count (descending), ties by token: index = id."""
    counts = Counter(tokens)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                 kv[0]))]


def to_ids(tokens, vocabulary, path=""):
    """``tokens`` as int32 ids; unknown tokens map to ``<unk>`` if the
    vocabulary has one, else raise."""
    return tokens_to_ids(tokens, {t: i for i, t in enumerate(vocabulary)},
                         path or "the text")


def save_vocabulary(path, vocabulary, level):
    """Writes ``{"level", "tokens"}`` as JSON (the id of a token is its
    index)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"level": level, "tokens": list(vocabulary)}, f,
                  ensure_ascii=False)


def load_vocabulary(path):
    """``(tokens, level)`` from a file written by `save_vocabulary`."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "tokens" not in data:
        raise ValueError(
            f"{path} is not a vocabulary file: expected JSON with a "
            "'tokens' list (as `keras-antman distill` writes)."
        )
    return list(data["tokens"]), data.get("level")


def load_npz(path):
    """``(train, valid or None)`` 1-D token-id arrays from an ``.npz``:
    keys ``train`` and optionally ``valid``, or a single array."""
    with np.load(path) as data:
        keys = list(data.keys())
        if "train" in keys:
            train = data["train"]
            valid = data["valid"] if "valid" in keys else None
        elif len(keys) == 1:
            train, valid = data[keys[0]], None
        else:
            raise ValueError(
                f"{path} holds arrays {keys}; expected 'train' (and "
                "optionally 'valid') 1-D token-id arrays, or a single array."
            )
    out = []
    for name, a in (("train", train), ("valid", valid)):
        if a is None:
            out.append(None)
            continue
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"{path}: '{name}' must be a 1-D array of integer token ids; "
                f"it has shape {a.shape} and dtype {a.dtype}."
            )
        out.append(a.astype(np.int32))
    return tuple(out)


def load_token_ids(path, level="word", vocabulary=None, valid_path=None):
    """Token ids of a text or ``.npz`` file.

    Args:
        path: a UTF-8 text file, or an ``.npz`` of token ids (see
            `load_npz`).
        level: ``"word"`` or ``"char"`` (text only).
        vocabulary: a token list to use; default: built from ``path``.
        valid_path: an optional validation file of the same kind.

    Returns:
        ``(train, valid, vocabulary)``: ``valid`` is ``None`` when there is
        no validation data; ``vocabulary`` is ``None`` for ``.npz`` data.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is neither text nor a usable ``.npz``.
    """
    for p in (path, valid_path):
        if p is not None and not os.path.isfile(p):
            raise FileNotFoundError(f"data file {p} does not exist")
    if str(path).endswith(".npz"):
        train, valid = load_npz(path)
        if valid_path is not None:
            valid, _ = load_npz(valid_path)
        return train, valid, None
    tokens = tokenize(read_text(path), level)
    if not tokens:
        raise ValueError(f"{path} contains no tokens")
    if vocabulary is None:
        vocabulary = build_vocabulary(tokens)
    train = to_ids(tokens, vocabulary, path)
    valid = None
    if valid_path is not None:
        valid = to_ids(tokenize(read_text(valid_path), level), vocabulary,
                       valid_path)
    return train, valid, vocabulary
