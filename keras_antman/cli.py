"""The ``keras-antman`` command: the package's main job end to end.

``keras-antman demo`` trains a small LSTM language model (on an embedded
synthetic corpus by default, on Penn Treebank with ``--ptb DIR``),
compresses its LSTMs with AntMan schemes, prints the cost report and the
perplexity of the teacher, of the compressed model as initialised from the
teacher's weights, and of the compressed model after a short fine-tuning.
"""

import argparse
import math
import os
import sys
import time

SCHEME_HELP = (
    "dense | low_rank:R | low_rank:rank=K | lgp_shuffle:G | lgp_dense:G | "
    "low_rank_lgp:G_IN,G_OUT,R (underscores optional: lowrank_lgp:10,10,2)"
)


def parse_scheme(text):
    """A scheme from ``name:args`` text (`keras_antman.schemes.from_spec`).

    Raises:
        ValueError: for an unknown name or malformed arguments.
    """
    from keras_antman import schemes

    return schemes.from_spec(text)


def synthetic_corpus(vocab=64, tokens=120_000, seed=0):
    """Token ids from a sparse random second-order Markov chain.

    Each pair of previous tokens allows a handful of next tokens, so an LSTM
    can learn it well and a compressed one visibly less well at first: a
    small, offline stand-in for a language-modelling corpus.

    Args:
        vocab: vocabulary size.
        tokens: number of tokens in the training split; the validation and
            test splits get a tenth of that each.
        seed: random seed.

    Returns:
        ``(train, valid, test)`` int32 arrays.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, vocab, 4))
    probs = rng.dirichlet(np.ones(4) * 0.5, size=(vocab, vocab))
    total = tokens + 2 * (tokens // 10)
    out = np.empty(total, dtype=np.int32)
    out[:2] = rng.integers(0, vocab, 2)
    u = rng.random(total)
    for t in range(2, total):
        p = probs[out[t - 2], out[t - 1]]
        k = min(int(np.searchsorted(np.cumsum(p), u[t])), 3)
        out[t] = successors[out[t - 2], out[t - 1], k]
    n_eval = tokens // 10
    return out[:tokens], out[tokens:tokens + n_eval], out[tokens + n_eval:]


def language_model(vocab, hidden, embed, layers=2):
    """Embedding -> ``layers`` x LSTM(hidden) -> Dense(vocab) logits."""
    import keras

    inputs = keras.Input((None,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(vocab, embed, name="embedding")(inputs)
    for i in range(layers):
        h = keras.layers.LSTM(hidden, return_sequences=True,
                              name=f"lstm_{i}")(h)
    logits = keras.layers.Dense(vocab, name="logits")(h)
    return keras.Model(inputs, logits, name="lm")


def _perplexity(model, data):
    loss = model.evaluate(data, verbose=0)
    loss = loss[0] if isinstance(loss, list) else loss
    return math.exp(loss)


def _compile(model, lr):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(lr, clipnorm=5.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def demo(args):
    """Train, compress, report, fine-tune; returns a dict of results."""
    import keras

    import keras_antman as am
    from keras_antman import datasets

    keras.utils.set_random_seed(args.seed)
    if args.ptb:
        ptb = datasets.load_ptb(args.ptb)
        train, valid, test = ptb.train, ptb.valid, ptb.test
        vocab = len(ptb.vocabulary)
        source = f"Penn Treebank from {ptb.directory}"
        if args.max_tokens:
            train = train[: args.max_tokens]
    else:
        vocab = 64
        train, valid, test = synthetic_corpus(vocab, seed=args.seed)
        source = "synthetic second-order Markov corpus (embedded default)"

    def batches(ids):
        return datasets.bptt_dataset(ids, args.batch_size, args.num_steps)

    train_ds, valid_ds, test_ds = batches(train), batches(valid), batches(test)
    print(f"Data: {source}; vocabulary {vocab}, {len(train):,} training "
          f"tokens.")

    teacher = language_model(vocab, args.hidden, args.embed)
    _compile(teacher, args.lr)
    print(f"\n[1/4] Training the teacher: 2 x LSTM({args.hidden}), "
          f"{args.epochs} epoch(s).")
    t0 = time.time()
    teacher.fit(train_ds, validation_data=valid_ds, epochs=args.epochs,
                shuffle=False, verbose=args.verbose)
    teacher_time = time.time() - t0

    input_scheme = parse_scheme(args.input_scheme)
    recurrent_scheme = parse_scheme(args.recurrent_scheme)
    print(f"\n[2/4] Compressing: input {input_scheme.describe()}, "
          f"recurrent {recurrent_scheme.describe()}.")
    student = am.compress(teacher, input_scheme=input_scheme,
                          recurrent_scheme=recurrent_scheme)
    rep = am.report(teacher, student, print_fn=print)

    _compile(student, args.lr)
    ppl_teacher = _perplexity(teacher, test_ds)
    ppl_init = _perplexity(student, test_ds)
    print(f"\n[3/4] Fine-tuning the compressed model, {args.finetune_epochs} "
          f"epoch(s) (label loss only; see Distiller for distillation).")
    t0 = time.time()
    student.fit(train_ds, validation_data=valid_ds,
                epochs=args.finetune_epochs, shuffle=False,
                verbose=args.verbose)
    finetune_time = time.time() - t0
    ppl_student = _perplexity(student, test_ds)

    print("\n[4/4] Test perplexity")
    print(f"  teacher                          {ppl_teacher:10.2f}  "
          f"({teacher_time:.0f} s training)")
    print(f"  compressed, from teacher weights {ppl_init:10.2f}")
    print(f"  compressed, fine-tuned           {ppl_student:10.2f}  "
          f"({finetune_time:.0f} s training)")
    print(f"  LSTM multiply-add reduction      "
          f"{rep.recurrent_total.mac_reduction:10.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        teacher.save(os.path.join(args.out, "teacher.keras"))
        student.save(os.path.join(args.out, "student.keras"))
        print(f"  saved teacher.keras and student.keras in {args.out}")
    return {
        "teacher": ppl_teacher,
        "compressed_init": ppl_init,
        "compressed_finetuned": ppl_student,
        "lstm_mac_reduction": rep.recurrent_total.mac_reduction,
    }


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-antman",
        description="Structured (AntMan) compression of Keras LSTM models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="train a small LSTM language model, compress it, report.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--ptb", metavar="DIR",
                   help="directory with ptb.{train,valid,test}.txt "
                        "(default: embedded synthetic corpus)")
    d.add_argument("--max-tokens", type=int, default=0,
                   help="use only this many PTB training tokens (0: all)")
    d.add_argument("--hidden", type=int, default=128)
    d.add_argument("--embed", type=int, default=64)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--finetune-epochs", type=int, default=2)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--num-steps", type=int, default=20)
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--input-scheme", default="lgp_shuffle:8",
                   help=f"scheme of the input products ({SCHEME_HELP})")
    d.add_argument("--recurrent-scheme", default="lgp_shuffle:8",
                   help="scheme of the recurrent products")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", metavar="DIR",
                   help="save teacher.keras and student.keras here")
    d.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2),
                   help="Keras fit verbosity (1: progress bar)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.command == "demo":
            demo(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"keras-antman: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
