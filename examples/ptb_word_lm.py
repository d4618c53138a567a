"""The AntMan paper's PTB experiments (Tables 2, 3 and 6) at a small scale.

A Zaremba-style word language model (Embedding -> 2 x LSTM(H) -> Dense) is
trained as the teacher; students at the same LSTM computation reduction
(LGP-Shuffle, LowRank-LGP, SVD and a smaller dense LSTM) and LGP-Shuffle at
larger reductions are distilled from it with `keras_antman.Distiller`; the
paper's coefficient method (`calibrate_coefficients`) and a small
coefficient grid like its Table 3 follow. ``--iss-reductions`` adds the
paper's ISS baseline (`keras_antman.iss.prune_to`, with and without the
teacher), shrunk to smaller stock LSTMs; ``--embed`` sets the embedding
width apart from the hidden size (``--embed 800 --hidden 100``: the
"input >> hidden" shape of the paper's Table 4). ``--students`` naming
dope, dope_nocmr, kp, hmd, lmf or prune adds the Doping paper's rows at
the LSTM param reductions ``--dope-reductions`` (doped Kronecker with and
without co-matrix dropout, plain Kronecker, HMD, LMF and magnitude
pruning; the doped and pruned ones log validation perplexity against
sparsity while annealing). ``--student-init calibrated`` starts the
compressed students from a data-aware fit (`compress` with
``calibration_data``), and ``--eval-at`` logs test perplexity during
distillation. ``--students tfmot`` (tf_keras only: run with
``TF_USE_LEGACY_KERAS=1``) adds unstructured pruning with tfmot's
``prune_low_magnitude`` at ``--tfmot-sparsities`` (the paper's Table 7
baseline; its latency: ``bench/unstructured_pruning.py``). A teacher
saved by the other Keras flavour is rebuilt and given its weights
(`load_lm`).

Every stage is resumable: results go to ``RUN_DIR/results.json`` as they
are produced, a model whose result exists is skipped, and every model in
training (teacher, students, grid) trains in chunks of ``--chunk-steps``
steps with ``BackupAndRestore`` (weights and optimizer state) and resumes at
the start of the chunk it was in, on the same batches. Calibration (three
short runs) and an ISS student (one ``prune_to`` call: its schedule and
masks are not checkpointed) restart if interrupted. ``--stages report``
writes the tables and the plot from ``results.json`` (``--report-name``
names the files).

Usage:
    python examples/ptb_word_lm.py --data ../shared/data/ptb \\
        --run-dir runs/ptb --teacher-epochs 2.5 --student-steps 300 \\
        --grid-steps 100 --calib-steps 80

The data is never copied: ``--data`` points at a directory holding
``ptb.{train,valid,test}.txt``. By default batches are stateless truncated
BPTT (every 35-step window starts from a zero state), which costs some
perplexity against Zaremba's stateful setup; every run recorded before
``--carry-state`` existed used it, and its commands still reproduce it.
``--carry-state`` is Zaremba's setup: each batch holds ``--batch-size``
contiguous streams (`datasets.bptt_dataset`: row r of batch i + 1
continues row r of batch i), every LSTM is ``stateful=True`` with that
fixed batch size, so its state carries from window to window, and the
states of the model being trained (a `Distiller`'s student and teacher
alike) are zeroed at every epoch start (`_ResetStates`). Evaluation then
carries the state over the whole valid / test stream; each row also
records the zero-state perplexities (``*_zero_state``). A resumed run
restarts its chunk from zero states (they are not in the backup).
``--teacher-schedule plateau`` decays the teacher's learning rate when its
validation perplexity stops improving and stops when it flattens
(`train_plateau`); ``--curve-every`` logs each student's validation and
test perplexity during training.
"""

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Keras 3, or tf_keras under TF_USE_LEGACY_KERAS=1 (as keras_antman picks).
LEGACY = os.environ.get("TF_USE_LEGACY_KERAS") in ("1", "true", "True")
if LEGACY:
    import tf_keras as keras
else:
    import keras
import numpy as np  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import datasets  # noqa: E402
from keras_antman import doping  # noqa: E402
from keras_antman import grow_prune  # noqa: E402
from keras_antman import iss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("teacher", "students", "calibrate", "grid", "report")
ISS_STRENGTH = 2e-3  # --iss-strength's default (see its help)


def language_model(vocab, hidden, embed, name, dropout=0.0, scheme=None,
                   batch_size=None):
    """Embedding -> dropout -> 2 x LSTM(hidden) -> dropout -> Dense logits.

    With ``scheme``, the LSTMs are `StructuredLSTM` layers with that scheme
    on both products, randomly initialised. With ``batch_size`` the model
    takes batches of exactly that size and its LSTMs are stateful (the
    state carries from one call to the next: ``--carry-state``)."""
    inputs = keras.Input(batch_shape=(batch_size, None), dtype="int32")
    h = keras.layers.Embedding(vocab, embed, name="embedding")(inputs)
    h = keras.layers.Dropout(dropout, name="dropout_in")(h)
    stateful = batch_size is not None
    for i in range(2):
        if scheme is None:
            lstm = keras.layers.LSTM(hidden, return_sequences=True,
                                     stateful=stateful, name=f"lstm_{i}")
        else:
            lstm = am.StructuredLSTM(hidden, input_scheme=scheme,
                                     recurrent_scheme=scheme,
                                     return_sequences=True,
                                     stateful=stateful, name=f"lstm_{i}")
        h = lstm(h)
    h = keras.layers.Dropout(dropout, name="dropout_out")(h)
    logits = keras.layers.Dense(vocab, name="logits")(h)
    return keras.Model(inputs, logits, name=name)


def carried_batch(args):
    """The fixed batch size of the models (``--carry-state``), else None."""
    return args.batch_size if args.carry_state else None


def _save_arrays(path, arrays):
    """``arrays`` to the ``.npz`` file ``path``, through a temporary file."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, *arrays)
    os.replace(tmp, path)


def with_state_layout(model, batch_size):
    """``model`` with stateful LSTMs and a fixed ``batch_size`` (or, with
    ``batch_size=None``, stateless ones and any batch size), the same
    weights; ``model`` itself if it already is so. Lets a run with
    ``--carry-state`` reuse a stateless teacher and the other way round."""
    if bool(am.calibration.stateful_layers(model)) == (batch_size is not None):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        c = layer["config"]
        for key in ("batch_shape", "batch_input_shape"):  # Keras 3, tf_keras
            if layer["class_name"] == "InputLayer" and key in c:
                c[key] = [batch_size, *c[key][1:]]
        if "stateful" in c:
            c["stateful"] = batch_size is not None
        shape = layer.get("build_config", {}).get("input_shape")
        if shape and not isinstance(shape[0], list):  # Keras 3 builds from it
            layer["build_config"]["input_shape"] = [batch_size, *shape[1:]]
    new = model.__class__.from_config(config)
    new.set_weights(model.get_weights())
    return new


def small_hidden(hidden, reduction=10.0, embed=None):
    """Units of the dense "direct design" student with ``reduction`` x fewer
    LSTM MACs than the teacher, its embedding staying ``embed`` (default
    ``hidden``) wide.

    Teacher: 4 (E H + H H) + 4 (H H + H H) = 4 E H + 12 H^2 MACs per token
    (16 H^2 at E = H); student with h units: 4 E h + 12 h^2.
    """
    h, e = hidden, embed or hidden
    teacher = 4 * e * h + 12 * h * h
    root = math.sqrt(16 * e * e + 48 * teacher / reduction)
    return max(2, round((-4 * e + root) / 24))


def embed_width(args):
    return args.embed or args.hidden


def student_specs(args):
    """``name -> (kind, arg)``: the students of Tables 2 and 6.

    With the defaults and H = 200 (every product is 200 -> 800):
    LGPShuffle(10) is 10x, LowRankLGP(10, 20, 2) exactly 10x, LowRank(10)
    (SVD, rank 20) 8x -- with r | 200, r = 8, 10, 20 give 6.4x, 8x, 16x;
    ``--svd-rank 16`` (``LowRank(rank=16)``) is exactly 10x -- a dense LSTM
    of 47 units 9.98x, and LGPShuffle(g) g x for the extra groups.
    ``--students`` keeps a subset (kinds lgp, lowrank_lgp, svd, dense,
    lgp<G> for each extra G). The exact reductions are measured with
    `keras_antman.report` and stored with each result.
    """
    g = args.groups
    gi, go, r = args.lowrank_lgp
    h = args.small_hidden or small_hidden(args.hidden, embed=args.embed)
    if args.svd_rank:
        svd_name = f"SVD (LowRank) rank={args.svd_rank}"
        svd = am.LowRank(rank=args.svd_rank)
    else:
        svd_name = f"SVD (LowRank) r={args.svd_r}"
        svd = am.LowRank(args.svd_r)
    specs = {
        f"LGP-Shuffle g={g}": ("compress", am.LGPShuffle(g)),
        f"LowRank-LGP g_in={gi} g_out={go} r={r}": (
            "compress", am.LowRankLGP(gi, go, r)),
        svd_name: ("compress", svd),
        f"Small dense LSTM h={h} (direct design)": ("small", h),
    }
    for e in args.extra_groups:
        specs[f"LGP-Shuffle g={e}"] = ("compress", am.LGPShuffle(e))
    if args.students:
        kinds = ["lgp", "lowrank_lgp", "svd", "dense"] + [
            f"lgp{e}" for e in args.extra_groups]
        specs = {name: spec for kind, (name, spec) in
                 zip(kinds, specs.items()) if kind in args.students}
    if args.student_init != "teacher":  # random or data-aware init
        kind_as, tag = {"random": ("structured", "random init"),
                        "calibrated": ("calibrated", "data-aware init")}[
                            args.student_init]
        specs = {(f"{name} ({tag})" if kind == "compress" else name):
                 (kind_as if kind == "compress" else kind, arg)
                 for name, (kind, arg) in specs.items()}
    return specs


def iss_specs(args):
    """``name -> (reduction, with teacher)``: the ISS students, one per
    ``--iss-reductions`` entry and ``--iss-trainers`` entry ("teacher":
    a `Distiller` with the calibrated coefficients; "label": the label
    loss alone). Kept by ``--students`` only if it names ``iss``. A
    lambda other than the default ``ISS_STRENGTH`` is in the name."""
    if args.students and "iss" not in args.students:
        return {}
    lam = ("" if args.iss_strength == ISS_STRENGTH
           else f" lambda={args.iss_strength:g}")
    return {
        f"ISS {r:g}x " + ("(distilled" if t == "teacher" else "(label loss")
        + lam + ")": (r, t == "teacher")
        for r in args.iss_reductions for t in args.iss_trainers}


def lstm_cost(model):
    rep = am.report(model)
    return rep.recurrent_total.params_before, rep.recurrent_total.macs_before


def _keras_major(path):
    """The Keras major version that wrote a ``.keras`` file (2: tf_keras)."""
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("metadata.json"))
    return int(meta["keras_version"].split(".")[0])


def load_lm(path, name="lm"):
    """A stock `language_model` from a ``.keras`` file written by either
    Keras flavour.

    Each flavour's loader rejects the other's files (their configs
    differ), but both write the weights in the same layout
    (``model.weights.h5`` inside the file), so a file from the other
    flavour is rebuilt with `language_model` at its shapes and given its
    weights. Structured models load only in the flavour that wrote them.
    """
    if _keras_major(path) == int(keras.__version__.split(".")[0]):
        return keras.models.load_model(path)
    import h5py

    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as d:
        weights = z.extract("model.weights.h5", d)
        with h5py.File(weights, "r") as f:
            vocab, embed = f["layers/embedding/vars/0"].shape
            hidden = f["layers/lstm/cell/vars/1"].shape[0]
        model = language_model(vocab, hidden, embed, name)
        model.load_weights(weights)
    return model


class Run:
    """The run directory: data, results.json and model files."""

    def __init__(self, args):
        self.args = args
        os.makedirs(args.run_dir, exist_ok=True)
        self.path = os.path.join(args.run_dir, "results.json")
        self.results = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.results = json.load(f)
        ptb = datasets.load_ptb(args.data)
        train = ptb.train
        if args.max_train_tokens:
            train = train[: args.max_train_tokens]
        self.train_tokens = len(train)
        self.vocab = ptb.vocab_size
        b, s = args.batch_size, args.num_steps
        self.train = datasets.bptt_dataset(train, b, s)
        self.epoch_steps = len(self.train)
        self.valid = datasets.bptt_dataset(ptb.valid, b, s)
        self.test = datasets.bptt_dataset(ptb.test, b, s)
        if args.eval_batches:
            self.valid = self.valid.take(args.eval_batches)
            self.test = self.test.take(args.eval_batches)

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.path)

    def file(self, name):
        return os.path.join(self.args.run_dir, name)

    def perplexities(self, model):
        """``(val ppl, test ppl)`` of ``model`` (see `scores`)."""
        scores = self.scores(model)
        return scores["val_ppl"], scores["test_ppl"]

    def scores(self, model):
        """``{"val_ppl", "test_ppl"}`` of ``model``; with ``--carry-state``
        the state carried over each whole split, plus the zero-state
        values as ``val_ppl_zero_state`` and ``test_ppl_zero_state``."""
        if not self.args.carry_state:
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
            return {f"{split}_ppl": math.exp(model.evaluate(ds, verbose=0))
                    for split, ds in (("val", self.valid),
                                      ("test", self.test))}
        ppl = _perplexity_fn(model)
        return {f"{split}_ppl{tag}": ppl(ds, carry=carry)
                for tag, carry in (("", True), ("_zero_state", False))
                for split, ds in (("val", self.valid), ("test", self.test))}


def optimizer(lr, args, decay_steps=0):
    """Adam (default) or plain SGD, clipping the global gradient norm at
    ``--clipnorm`` (Zaremba et al. clip at 5); with ``decay_steps`` the
    rate follows a cosine from ``lr`` to 0 over that many steps."""
    if decay_steps:
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps)
    if args.optimizer == "sgd":
        return keras.optimizers.SGD(lr, global_clipnorm=args.clipnorm)
    return keras.optimizers.Adam(lr, global_clipnorm=args.clipnorm)


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _step(model):
    """The optimizer step of the model being fitted."""
    return int(np.asarray(model.optimizer.iterations))


def _perplexity_fn(student):
    """``(batches, carry=False) -> perplexity`` of ``student`` in inference
    mode (a compiled forward pass; the batches are equal-sized, so the mean
    of their mean cross-entropies is the token mean). A stateful student
    starts from zero states and, with ``carry``, carries them from batch to
    batch (else each batch starts from zero); its states are put back
    afterwards, so a callback may evaluate in the middle of training."""
    import tensorflow as tf

    @tf.function
    def loss(x, y):
        logits = student(x, training=False)
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))

    def perplexity(batches, carry=False):
        losses = []
        with am.calibration.kept_states(student) as layers:
            for i, (x, y) in enumerate(batches):
                if i == 0 or not carry:
                    for layer in layers:
                        layer.reset_states()
                losses.append(float(loss(x, y)))
        return math.exp(sum(losses) / len(losses))

    return perplexity


class _Clock(keras.callbacks.Callback):
    """Adds each chunk's wall time to ``results["elapsed"][key]`` (so the
    training time survives a resume) after `BackupAndRestore` has saved."""

    def __init__(self, run, key):
        super().__init__()
        self.run, self.key = run, key

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = self.run.results.setdefault("elapsed", {})
        elapsed[self.key] = elapsed.get(self.key, 0.0) + time.time() - self.t0
        self.run.results.setdefault("chunks_done", {})[self.key] = epoch + 1
        self.run.save()


def chunks_done(run, key):
    """How many chunks of ``key`` its backup holds (0: no backup). Keras
    3's `BackupAndRestore` writes the count to training_metadata.json;
    tf_keras's keeps it inside a TF checkpoint, so `_Clock` also records it
    in the results after each chunk's backup."""
    backup = run.file(f"backup_{_slug(key)}")
    meta = os.path.join(backup, "training_metadata.json")
    if os.path.exists(meta):
        with open(meta) as f:
            return json.load(f).get("epoch", 0)
    if os.path.isdir(backup):
        return run.results.get("chunks_done", {}).get(key, 0)
    return 0


class _ResetStates(keras.callbacks.Callback):
    """``--carry-state``: zeroes the LSTM states of the model being fitted
    (a `Distiller`'s student and teacher alike, so the teacher always sees
    the student's state history) before every step that starts an epoch of
    the training data (optimizer step % ``epoch_steps`` == 0); in between,
    the stateful layers carry the state from window to window."""

    def __init__(self, epoch_steps):
        super().__init__()
        self.epoch_steps = epoch_steps

    def on_train_begin(self, logs=None):
        self.layers = am.calibration.stateful_layers(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        if _step(self.model) % self.epoch_steps == 0:
            for layer in self.layers:
                layer.reset_states()


def chunk_plan(run, steps):
    """``(chunks, chunk)``: equal chunks of at most ``--chunk-steps``
    steps, ``chunks * chunk`` being ``steps`` rounded up."""
    chunks = max(1, math.ceil(steps / run.args.chunk_steps))
    return chunks, math.ceil(steps / chunks)


def train_chunked(run, model, key, steps, callbacks=(), until=None):
    """``model.fit`` for ``steps`` steps, resumable chunk by chunk.

    Keras epochs are equal chunks of at most ``--chunk-steps`` steps (the
    total rounded up to a multiple of the chunk count) of the repeated
    training data; `BackupAndRestore` saves weights and optimizer state at
    each chunk's end, and a resumed run skips the batches already seen, so
    it continues on the same data as an uninterrupted one. ``callbacks``
    run after the restore (they may read the restored optimizer step)
    and before the clock; a callback that saves state at a chunk's end
    does so after that chunk's backup, so a run killed between the two
    must detect the mismatch on resume. ``until`` stops after that many
    chunks (of the plan for ``steps``) instead of all; a later call
    continues. With ``--carry-state``, `_ResetStates` zeroes the states
    at each epoch start. Returns
    ``(steps actually run, seconds spent over all sessions)``.
    """
    chunks, chunk = chunk_plan(run, steps)
    backup = run.file(f"backup_{_slug(key)}")
    done = chunks_done(run, key)
    if not done:  # a fresh start: forget time from a run that left no backup
        run.results.get("elapsed", {}).pop(key, None)
    if run.args.carry_state:
        callbacks = [_ResetStates(run.epoch_steps), *callbacks]
    data = run.train.repeat().skip(done * chunk)
    model.fit(data, epochs=chunks if until is None else until,
              steps_per_epoch=chunk, shuffle=False, verbose=run.args.verbose,
              callbacks=[keras.callbacks.BackupAndRestore(
                  backup, delete_checkpoint=False), *callbacks,
                  _Clock(run, key)])
    seconds = run.results.get("elapsed", {}).get(key, 0.0)
    return chunks * chunk, seconds


class _SetLR(keras.callbacks.Callback):
    """Sets the optimizer's learning rate after `BackupAndRestore` has
    restored the optimizer (which may hold an older rate)."""

    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate = self.lr


def _gain(log, i):
    """Relative improvement of ``log[i]``'s validation perplexity on the
    best before it (inf for the first)."""
    best = min((e["val_ppl"] for e in log[:i]), default=math.inf)
    return (best - log[i]["val_ppl"]) / best if i else math.inf


def plateau_step(log, args):
    """The plateau rule on the evaluations so far, ``log`` (dicts with
    ``val_ppl``, ``lr`` and ``decayed``, the newest last): returns
    ``(next lr, stop)``.

    If the newest validation perplexity improves on the best before it by
    less than ``--plateau-tol`` (relative), the rate is multiplied by
    ``--plateau-decay`` (Zaremba halves it each epoch once it has
    plateaued). Training stops, once the rate has been decayed, when the
    last ``--plateau-patience`` evaluations each improved on the best
    before them by less than ``--plateau-stop`` (worse counts as no
    improvement), or instead of a decay beyond ``--plateau-decays``."""
    if _gain(log, len(log) - 1) >= args.plateau_tol:
        return log[-1]["lr"], False
    decays = sum(e["decayed"] for e in log[:-1])
    stale = 0
    while stale < len(log) and _gain(log, len(log) - 1 - stale) < (
            args.plateau_stop):
        stale += 1
    if (decays and stale >= args.plateau_patience) or (
            decays >= args.plateau_decays):
        return log[-1]["lr"], True
    return log[-1]["lr"] * args.plateau_decay, False


def train_plateau(run, model, key, max_steps):
    """``train_chunked`` for at most ``max_steps`` steps with the plateau
    schedule: every ``--eval-every`` steps (rounded to whole chunks; 0: one
    epoch) the validation and test perplexities are measured and
    `plateau_step` sets the rate of the next period or stops; the weights
    of each new best validation perplexity are saved, and restored at the
    end. The log (``results["schedule"][key]``: step, lr of the period,
    val / test ppl, whether it decayed, whether its weights were kept as
    the best) is saved after each evaluation, and a resumed run continues
    from it: the rate it reached, an evaluation a kill skipped, or a stop
    it decided. Returns ``(steps run, seconds, log, step of the weights
    kept)``."""
    chunks, chunk = chunk_plan(run, max_steps)
    every = max(1, round((run.args.eval_every or run.epoch_steps) / chunk))
    log = run.results.setdefault("schedule", {}).setdefault(key, [])
    # The best evaluation's weights as plain arrays: tf_keras cannot reload
    # its own `.weights.h5` of a compiled model ("Layer 'loss' expected 2
    # variables"), and arrays read the same in both flavours.
    best_path = run.file(f"best_{_slug(key)}.npz")
    ppl = _perplexity_fn(model)
    while True:
        done = chunks_done(run, key)
        stopped = bool(log) and log[-1]["stopped"]
        due = done and (done % every == 0 or done == chunks) and not any(
            e["step"] == done * chunk for e in log)
        target = done if stopped or due else min(
            chunks, (done // every + 1) * every)
        lr = log[-1]["next_lr"] if log else run.args.lr
        train_chunked(run, model, key, max_steps, [_SetLR(lr)], until=target)
        step = target * chunk
        if not stopped and not any(e["step"] == step for e in log):
            entry = dict(step=step, lr=lr, **{
                f"{split}_ppl": ppl(ds, carry=run.args.carry_state)
                for split, ds in (("val", run.valid), ("test", run.test))})
            entry["best"] = entry["val_ppl"] < min(
                (e["val_ppl"] for e in log), default=math.inf)
            if entry["best"]:
                _save_arrays(best_path, model.get_weights())
            log.append(entry)
            entry["next_lr"], entry["stopped"] = plateau_step(log, run.args)
            entry["decayed"] = entry["next_lr"] != lr
            run.save()
            print(f"{key} step {step}: lr {lr:g} val {entry['val_ppl']:.2f} "
                  f"test {entry['test_ppl']:.2f}"
                  + (" -> stop" if entry["stopped"] else
                     f" -> lr {entry['next_lr']:g}" if entry["decayed"]
                     else ""), flush=True)
            stopped = entry["stopped"]
        if stopped or target == chunks:
            kept = step
            saved = [e for e in log if e.get("best")]
            if saved and saved[-1]["step"] != step and os.path.exists(
                    best_path):
                with np.load(best_path) as f:
                    model.set_weights([f[f"arr_{i}"]
                                       for i in range(len(f.files))])
                kept = saved[-1]["step"]
            seconds = run.results.get("elapsed", {}).get(key, 0.0)
            return step, seconds, log, kept


def finish(run, key):
    """After ``key``'s result is saved: drop its backup and clock."""
    shutil.rmtree(run.file(f"backup_{_slug(key)}"), ignore_errors=True)
    run.results.get("elapsed", {}).pop(key, None)
    run.results.get("chunks_done", {}).pop(key, None)
    run.save()


def stage_teacher(run):
    """The teacher: loaded if its result exists (in the state layout of
    this run, `with_state_layout`), else trained for ``--teacher-epochs``
    (with ``--teacher-schedule plateau``: at most that many, see
    `train_plateau`)."""
    args = run.args
    path = run.file("teacher.keras")
    if "teacher" in run.results and os.path.exists(path):
        return with_state_layout(load_lm(path, "teacher"),
                                 carried_batch(args))
    keras.utils.set_random_seed(args.seed)
    teacher = language_model(run.vocab, args.hidden, embed_width(args),
                             "teacher", args.dropout,
                             batch_size=carried_batch(args))
    teacher.compile(
        optimizer=optimizer(args.lr, args),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = max(1, round(args.teacher_epochs * run.epoch_steps))
    extra = {}
    if args.teacher_schedule == "plateau":
        steps, seconds, log, kept = train_plateau(run, teacher, "teacher",
                                                  steps)
        extra = dict(schedule="plateau", curve=log, weights_step=kept)
    else:
        steps, seconds = train_chunked(run, teacher, "teacher", steps)
    teacher.save(path)
    scores = run.scores(teacher)
    params, macs = lstm_cost(teacher)
    run.results["teacher"] = dict(
        lstm_params=params, lstm_macs=macs, mac_reduction=1.0, **scores,
        train_seconds=seconds, steps=steps, epochs=steps / run.epoch_steps,
        init="random", carry_state=args.carry_state, **extra)
    run.results.get("schedule", {}).pop("teacher", None)
    run.save()
    finish(run, "teacher")
    if os.path.exists(run.file("best_teacher.weights.h5")):
        os.remove(run.file("best_teacher.weights.h5"))
    print(f"teacher: val {scores['val_ppl']:.2f} test "
          f"{scores['test_ppl']:.2f}", flush=True)
    return teacher


def make_student(run, teacher, kind, arg):
    if kind == "compress":
        return am.compress(teacher, input_scheme=arg, recurrent_scheme=arg)
    if kind == "calibrated":  # data-aware init (issue 21)
        return am.compress(teacher, input_scheme=arg, recurrent_scheme=arg,
                           calibration_data=run.train,
                           calibration_steps=run.args.calibration_batches)
    batch = carried_batch(run.args)
    if kind == "structured":
        return language_model(run.vocab, run.args.hidden,
                              embed_width(run.args), "student",
                              run.args.dropout, scheme=arg, batch_size=batch)
    return language_model(run.vocab, arg, embed_width(run.args), "small",
                          run.args.dropout, batch_size=batch)


def distill(run, teacher, student, coefficients, steps, key, lr=None,
            callbacks=()):
    d = am.Distiller(student=student, teacher=teacher)
    lr = run.args.student_lr if lr is None else lr
    decay = steps if run.args.student_schedule == "cosine" else 0
    d.compile(optimizer=optimizer(lr, run.args, decay), **coefficients)
    return train_chunked(run, d, key, steps, callbacks)


def coefficients(run):
    calib = run.results.get("calibration")
    if calib is None:  # the paper's values, if calibration was not run
        return {"c_target": 1.0, "c_mse": 30.0, "c_kl": 1000.0}
    return {k: calib[k] for k in ("c_target", "c_mse", "c_kl")}


INITS = {"compress": "teacher (from_dense)",
         "calibrated": "teacher (data-aware: compress calibration_data)"}


class _EvalAt(keras.callbacks.Callback):
    """Test perplexity of ``student`` at the optimizer steps ``--eval-at``
    (step 0: before training), in ``results["progress"][name]`` as
    ``{"step": ppl}``; kept across a resume."""

    def __init__(self, run, name, student):
        super().__init__()
        self.run, self.name, self.student = run, name, student
        self.steps = set(run.args.eval_at)

    def on_train_begin(self, logs=None):
        self._ppl = _perplexity_fn(self.student)
        self._log = self.run.results.setdefault("progress", {}).setdefault(
            self.name, {})
        if 0 in self.steps and not _step(self.model):
            self._record(0)

    def _record(self, step):
        self._log[str(step)] = self._ppl(self.run.test,
                                         carry=self.run.args.carry_state)
        self.run.save()

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step in self.steps:
            self._record(step)


class _Curve(keras.callbacks.Callback):
    """Every ``--curve-every`` optimizer steps (and at step 0) the
    validation and test perplexity of ``student`` (state carried with
    ``--carry-state``), appended to ``results["curves"][name]`` as
    ``{"step", "val_ppl", "test_ppl"}``. A resumed run drops the entries
    past its restored step first."""

    def __init__(self, run, name, student):
        super().__init__()
        self.run, self.name, self.student = run, name, student
        self.every = run.args.curve_every

    def on_train_begin(self, logs=None):
        self._ppl = _perplexity_fn(self.student)
        step = _step(self.model)
        log = self.run.results.setdefault("curves", {}).setdefault(
            self.name, [])
        # A run restarted at step 0 records step 0 afresh, so drop it too.
        log[:] = [e for e in log if e["step"] <= step] if step else []
        if not step:
            self._record(0)

    def _record(self, step):
        carry = self.run.args.carry_state
        self.run.results["curves"][self.name].append(dict(
            step=step, val_ppl=self._ppl(self.run.valid, carry=carry),
            test_ppl=self._ppl(self.run.test, carry=carry)))
        self.run.save()

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step % self.every == 0:
            self._record(step)


def lgp10(run, teacher):
    g = am.LGPShuffle(run.args.groups)
    return am.compress(teacher, input_scheme=g, recurrent_scheme=g)


def stage_students(run, teacher):
    teacher_macs = run.results["teacher"]["lstm_macs"]
    for name, (kind, arg) in student_specs(run.args).items():
        if name in run.results.get("students", {}):
            continue
        keras.utils.set_random_seed(run.args.seed)
        student = make_student(run, teacher, kind, arg)
        coeffs = coefficients(run)
        if run.args.student_coefficients:  # instead of the calibrated ones
            coeffs = dict(zip(("c_target", "c_mse", "c_kl"),
                              run.args.student_coefficients))
        # A student trained from scratch gets the teacher's learning rate
        # unless --scratch-lr says otherwise; one initialised from the
        # teacher (compress) fine-tunes at --student-lr.
        lr = run.args.student_lr
        if kind not in ("compress", "calibrated"):
            lr = run.args.scratch_lr or run.args.lr
        callbacks = [_EvalAt(run, name, student)] if run.args.eval_at else []
        if run.args.curve_every:
            callbacks.append(_Curve(run, name, student))
        steps, seconds = distill(run, teacher, student, coeffs,
                                 run.args.student_steps, "student " + name,
                                 lr=lr, callbacks=callbacks)
        student.save(run.file(f"student_{_slug(name)}.keras"))
        scores = run.scores(student)
        val, test = scores["val_ppl"], scores["test_ppl"]
        params, macs = lstm_cost(student)
        run.results.setdefault("students", {})[name] = dict(
            lstm_params=params, lstm_macs=macs,
            mac_reduction=teacher_macs / macs, **scores,
            train_seconds=seconds, steps=steps,
            epochs=steps / run.epoch_steps,
            scheme=f"dense h={arg}" if kind == "small" else arg.describe(),
            init=INITS.get(kind, "random"), coefficients=coeffs, lr=lr,
            schedule=run.args.student_schedule)
        row = run.results["students"][name]
        if run.args.carry_state:
            row["carry_state"] = True
        if run.args.curve_every:
            row["curve"] = run.results["curves"].pop(name)
        if kind == "calibrated":
            row = run.results["students"][name]
            row["init"] += f" ({run.args.calibration_batches} batches)"
            row["calibration_errors"] = {
                f"{layer}/{part}": dict(from_dense=e.from_dense,
                                        fitted=e.fitted)
                for (layer, part), e in student.calibration_errors.items()}
        if run.args.eval_at:
            run.results["students"][name]["test_ppl_at"] = {
                **run.results.get("progress", {}).get(name, {}),
                str(steps): test}
        run.save()
        finish(run, "student " + name)
        print(f"{name}: val {val:.2f} test {test:.2f}", flush=True)
    stage_iss(run, teacher)
    stage_doping(run, teacher)
    stage_tfmot(run, teacher)


def stage_iss(run, teacher):
    """ISS students (Wen et al.; the AntMan paper's baseline).

    Each starts from the teacher's dense weights and runs
    `keras_antman.iss.prune_to` for ``--student-steps`` steps: lambda
    (``--iss-strength``) warms up over the first ``--iss-warmup`` of the
    steps, the recurrent-MAC budget ramps down to 1 / reduction over the
    next ``--iss-ramp`` (zeroing the weakest components), the rest
    fine-tunes with lambda 0; the optimizer (and cosine schedule) is the
    other students'. Then `shrink` gives a model of stock LSTMs, which is
    what is evaluated, measured (`report(teacher, shrunk)`) and saved.
    """
    args = run.args
    for name, (reduction, distilled) in iss_specs(args).items():
        if name in run.results.get("students", {}):
            continue
        keras.utils.set_random_seed(args.seed)
        student = language_model(run.vocab, args.hidden, embed_width(args),
                                 "iss", args.dropout)
        student.set_weights(teacher.get_weights())
        chunks = max(1, math.ceil(args.student_steps / args.chunk_steps))
        chunk = math.ceil(args.student_steps / chunks)
        steps = chunks * chunk
        decay = steps if args.student_schedule == "cosine" else 0
        opt = optimizer(args.student_lr, args, decay)
        coeffs = coefficients(run) if distilled else None
        if distilled:
            trainer = am.Distiller(student=student, teacher=teacher)
            trainer.compile(optimizer=opt, **coeffs)
        else:
            trainer = student
            student.compile(optimizer=opt,
                            loss=keras.losses.SparseCategoricalCrossentropy(
                                from_logits=True))
        t0 = time.time()
        shrunk, _ = iss.prune_to(
            student, run.train.repeat(), reduction=reduction,
            strength=args.iss_strength, epochs=chunks, steps_per_epoch=chunk,
            trainer=trainer, warmup=args.iss_warmup, ramp=args.iss_ramp,
            shuffle=False, verbose=args.verbose)
        seconds = time.time() - t0
        shrunk.save(run.file(f"student_{_slug(name)}.keras"))
        scores = run.scores(shrunk)
        val, test = scores["val_ppl"], scores["test_ppl"]
        cost = am.report(teacher, shrunk).recurrent_total
        units = [layer.units for layer in shrunk.layers
                 if isinstance(layer, keras.layers.LSTM)]
        run.results.setdefault("students", {})[name] = dict(
            lstm_params=cost.params_after, lstm_macs=cost.macs_after,
            mac_reduction=cost.mac_reduction, val_ppl=val, test_ppl=test,
            train_seconds=seconds, steps=steps,
            epochs=steps / run.epoch_steps,
            scheme=f"ISS -> LSTM({', '.join(map(str, units))}), "
                   f"lambda {args.iss_strength:g}",
            init="teacher (dense weights)", units=units,
            target_reduction=reduction, strength=args.iss_strength,
            warmup=args.iss_warmup, ramp=args.iss_ramp,
            trainer="Distiller" if distilled else "label loss",
            coefficients=coeffs, lr=args.student_lr,
            schedule=args.student_schedule)
        run.save()
        print(f"{name}: LSTM units {units}, {cost.mac_reduction:.2f}x, "
              f"val {val:.2f} test {test:.2f}", flush=True)


# -- Doping (Thakker et al., MLSys 2021) and its baselines ------------------

DOPING_KINDS = ("dope", "dope_nocmr", "kp", "hmd", "lmf", "prune")


def lstm_products(args):
    """``[(n, m)]`` of the teacher's four LSTM products and its bias count."""
    e, h = embed_width(args), args.hidden
    return [(e, 4 * h), (h, 4 * h), (h, 4 * h), (h, 4 * h)], 2 * 4 * h


def sparse_params(nnz, m):
    """Storage of a sparse ``n -> m`` matrix with ``nnz`` non-zeros, counted
    as `Doped.cost` counts ``S``: ``nnz`` values plus CSR indices of the
    transpose (``nnz`` column indices and ``m + 1`` row pointers)."""
    return 2 * nnz + m + 1


def lstm_params(args, scheme=None, sparsity=None):
    """LSTM params (both layers, biases included) of the teacher, of a
    student with ``scheme`` on every product, or (``sparsity``) of the
    dense kernels pruned to that sparsity and stored as CSR."""
    products, biases = lstm_products(args)
    if sparsity is not None:
        return biases + sum(
            sparse_params(doping.nonzeros(sparsity, n, m), m)
            for n, m in products)
    if scheme is None:
        return biases + sum(n * m for n, m in products)
    return biases + sum(scheme.cost(n, m)[0] for n, m in products)


def sparsity_for(args, reduction, base=None):
    """The sparsity (4 decimals) of ``S`` (with ``base``: `Doped`) or of
    the pruned kernels (``base=None``) whose LSTM params are closest to
    the teacher's / ``reduction``."""
    target = lstm_params(args) / reduction
    return min((i / 10000 for i in range(10000)), key=lambda s: abs(
        (lstm_params(args, am.Doped(base, sparsity=s)) if base
         else lstm_params(args, sparsity=s)) - target))


def closest(args, reduction, make, values):
    """``make(v)`` for the ``v`` in ``values`` whose LSTM params are
    closest to the teacher's / ``reduction`` (in ratio)."""
    teacher = lstm_params(args)
    return min((make(v) for v in values), key=lambda s: abs(math.log(
        teacher / lstm_params(args, s) / reduction)))


def doping_specs(args):
    """``name -> (kind, arg, reduction)``: the Doping rows at each
    ``--dope-reductions``
    entry (LSTM param reductions), for the kinds ``--students`` names:

    - ``dope`` / ``dope_nocmr``: ``Doped(Kronecker())`` (near-square
      factors, one term) with and without CMR (``--cmr-rate``), ``S``
      annealed to the sparsity that lands at the reduction;
    - ``kp``: plain Kronecker, the number of summed terms closest to it;
    - ``hmd``: `HMD` with ``--hmd-dense-rows``, the closest rank;
    - ``lmf``: the paper's LMF, `LowRank` of the closest rank;
    - ``prune``: magnitude pruning of the dense kernels to the sparsity
      (CSR-stored, counted as ``S``) that lands at the reduction.
    """
    kinds = [k for k in args.students if k in DOPING_KINDS]
    specs = {}
    for r in args.dope_reductions:
        kp = am.Kronecker()
        s = sparsity_for(args, r, kp)
        doped = {"dope": (f"Doped KP ~{r:g}x (CMR {args.cmr_rate:g})",
                          args.cmr_rate),
                 "dope_nocmr": (f"Doped KP ~{r:g}x (no CMR)", 0.0)}
        for kind in kinds:
            if kind in doped:
                name, rate = doped[kind]
                specs[name] = (kind, am.Doped(
                    kp, target_sparsity=s, cmr_rate=rate, seed=args.seed), r)
            elif kind == "kp":
                scheme = closest(args, r, lambda t: am.Kronecker(terms=t),
                                 range(1, 101))
                specs[f"KP ~{r:g}x (terms={scheme.terms})"] = (
                    kind, scheme, r)
            elif kind == "hmd":
                scheme = closest(args, r, lambda k: am.HMD(
                    k, args.hmd_dense_rows), range(1, 101))
                specs[f"HMD ~{r:g}x (rank={scheme.rank})"] = (
                    kind, scheme, r)
            elif kind == "lmf":
                scheme = closest(args, r, lambda k: am.LowRank(rank=k),
                                 range(1, 201))
                specs[f"LMF (LowRank) ~{r:g}x (rank={scheme.rank})"] = (
                    kind, scheme, r)
            else:
                specs[f"Magnitude pruning ~{r:g}x"] = (
                    kind, sparsity_for(args, r), r)
    return specs


class _AnnealLog(keras.callbacks.Callback):
    """Every ``--anneal-log`` optimizer steps (and at step 0), the
    validation perplexity of ``student`` (inference mode: no CMR) on the
    first ``--anneal-batches`` validation batches and the current sparsity
    (``sparsity()``), appended to ``results["anneal"][name]`` as
    ``[step, sparsity, val ppl]``. A resumed run drops the entries past its
    restored step first (and logs that step if it has no entry)."""

    def __init__(self, run, name, student, sparsity):
        super().__init__()
        self.run, self.name = run, name
        self.student, self.sparsity = student, sparsity
        self.batches = list(run.valid.take(run.args.anneal_batches))
        self.every = run.args.anneal_log

    def on_train_begin(self, logs=None):
        self._ppl = _perplexity_fn(self.student)
        step = _step(self.model)
        log = self.run.results.setdefault("anneal", {}).setdefault(
            self.name, [])
        log[:] = [e for e in log if e[0] <= step]
        if not log or log[-1][0] != step:
            self._record(step)

    def _record(self, step):
        self.run.results["anneal"][self.name].append(
            [step, self.sparsity(),
             self._ppl(self.batches, carry=self.run.args.carry_state)])
        self.run.save()

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step % self.every == 0:
            self._record(step)


class _ResumablePrune(grow_prune.Prune):
    """`grow_prune.Prune` that continues its ramp after a restore: it counts
    from the restored optimizer step and takes the masks from the restored
    kernels' zeros (the masks are not model variables)."""

    def on_train_begin(self, logs=None):
        self.step = int(np.asarray(
            self.model.optimizer.iterations))
        if self.step:
            self.masks.set_masks([
                np.asarray(v) != 0
                for _, _, v in self.masks.kernels])


def _doped_sparsity(student):
    masks = [np.asarray(m.mask)
             for m in doping.doped_matrices(student)]
    return 1.0 - sum(np.count_nonzero(m) for m in masks) / sum(
        m.size for m in masks)


def stage_doping(run, teacher):
    """The Doping rows (`doping_specs`), distilled like the other students
    from the teacher's weights for ``--student-steps``.

    A doped student starts from ``compress``: the nearest Kronecker product
    plus ``S`` = the dense residual (sparsity 0); `DopingSchedule` prunes
    ``S`` by magnitude on the cubic ramp every ``--anneal-every`` steps,
    reaching its target at ``--anneal-end`` of the steps. The pruning
    student is the teacher's stock LSTMs with `grow_prune.KernelMasks` and
    the same ramp (`grow_prune.Prune`). Both log the annealing
    (`_AnnealLog`). Params and MACs: `keras_antman.report` (``S`` counted
    by `Doped.cost`); the pruned kernels' by `sparse_params` (values + CSR
    indices; MACs = non-zeros).
    """
    args = run.args
    teacher_params = lstm_params(args)
    teacher_macs = run.results["teacher"]["lstm_macs"]
    end = max(1, round(args.anneal_end * args.student_steps))
    for name, (kind, arg, reduction) in doping_specs(args).items():
        if name in run.results.get("students", {}):
            continue
        keras.utils.set_random_seed(args.seed)
        callbacks, init = [], "teacher (from_dense)"
        if kind == "prune":
            student = language_model(run.vocab, args.hidden,
                                     embed_width(args), "pruned", args.dropout,
                                     batch_size=carried_batch(args))
            student.set_weights(teacher.get_weights())
            masks = grow_prune.KernelMasks(student)
            callbacks = [_ResumablePrune(masks, arg, 0, end,
                                         args.anneal_every),
                         _AnnealLog(run, name, student, lambda: float(
                             np.mean(list(masks.sparsity().values()))))]
            init = "teacher (dense weights)"
        else:
            student = am.compress(teacher, input_scheme=arg,
                                  recurrent_scheme=arg)
            if isinstance(arg, am.Doped):
                callbacks = [am.DopingSchedule(
                    0, end, initial_sparsity=0.0,
                    frequency=args.anneal_every),
                    _AnnealLog(run, name, student,
                               lambda s=student: _doped_sparsity(s))]
                init = "teacher (nearest KP + dense residual S)"
        steps, seconds = distill(run, teacher, student, coefficients(run),
                                 args.student_steps, "student " + name,
                                 callbacks=callbacks)
        if kind == "prune":
            masks.detach()
            products, biases = lstm_products(args)
            nnz = [int(np.count_nonzero(np.asarray(v)))
                   for _, _, v in masks.kernels]
            params = biases + sum(sparse_params(z, m)
                                  for z, (_, m) in zip(nnz, products))
            macs = sum(nnz)
            scheme = (f"dense kernels pruned to {arg:.2%} zeros (CSR), "
                      f"{sum(nnz):,} non-zeros")
        else:
            for matrix in doping.doped_matrices(student):  # after a resume
                mask = np.asarray(matrix.mask)
                matrix.scheme.set_sparsity(
                    1.0 - np.count_nonzero(mask) / mask.size)
            params, macs = lstm_cost(student)
            scheme = arg.describe()
        student.save(run.file(f"student_{_slug(name)}.keras"))
        scores = run.scores(student)
        val, test = scores["val_ppl"], scores["test_ppl"]
        run.results.setdefault("students", {})[name] = dict(
            lstm_params=params, lstm_macs=macs,
            mac_reduction=teacher_macs / macs,
            param_reduction=teacher_params / params, **scores,
            train_seconds=seconds, steps=steps,
            epochs=steps / run.epoch_steps, scheme=scheme, init=init,
            doping_kind=kind, budget_reduction=reduction,
            coefficients=coefficients(run),
            lr=args.student_lr, schedule=args.student_schedule,
            anneal_end_step=end if name in run.results.get("anneal", {})
            else None)
        run.save()
        finish(run, "student " + name)
        print(f"{name}: {teacher_params / params:.2f}x params, "
              f"val {val:.2f} test {test:.2f}", flush=True)


# -- Unstructured pruning with tfmot (the AntMan paper's Table 7) ---------


def tfmot_specs(args):
    """``name -> target sparsity``: one tfmot row per
    ``--tfmot-sparsities`` entry, if ``--students`` names ``tfmot``."""
    if "tfmot" not in args.students:
        return {}
    return {f"tfmot pruning {s:.0%}": s for s in args.tfmot_sparsities}


def tfmot_ramp(args):
    """``(begin, end, frequency)`` of the tfmot schedule: from step 0 to
    ``--anneal-end`` of the steps, rounded to a multiple of
    ``--anneal-every`` (tfmot prunes only on steps ``begin + k
    frequency``, so the target is reached only if ``end`` is one)."""
    every = args.anneal_every
    end = max(every, every * round(args.anneal_end * args.student_steps
                                   / every))
    return 0, end, every


def _import_tfmot():
    try:
        import tensorflow_model_optimization as tfmot
    except ImportError:
        raise SystemExit(
            "--students tfmot needs tensorflow-model-optimization: pip "
            "install tensorflow-model-optimization") from None
    return tfmot


def _pruned_kernels(model):
    """``{"lstm_0/kernel": array, ...}``: the LSTM kernels of a stock
    `language_model`, in `lstm_products` order."""
    out = {}
    for i in range(2):
        cell = model.get_layer(f"lstm_{i}").cell
        out[f"lstm_{i}/kernel"] = np.asarray(cell.kernel)
        out[f"lstm_{i}/recurrent_kernel"] = np.asarray(cell.recurrent_kernel)
    return out


def stage_tfmot(run, teacher):
    """Unstructured magnitude pruning with tfmot (tf_keras only), the
    baseline of the AntMan paper's Table 7.

    Each row starts from the teacher's weights; its two LSTMs (not the
    embedding nor the output layer) are wrapped with tfmot's
    ``prune_low_magnitude`` (``PolynomialDecay``: cubic, 0 to the target
    over `tfmot_ramp`) and distilled like the other students, with tfmot's
    ``UpdatePruningStep``; the wrappers' masks and step are model
    variables, so `BackupAndRestore` resumes them. ``strip_pruning`` then
    gives stock LSTMs with zeros, which are saved and evaluated; each
    kernel's share of zeros is checked against the target and recorded.
    Params count the kernels as CSR (as the ``prune`` rows), MACs their
    non-zeros.
    """
    args = run.args
    specs = tfmot_specs(args)
    if not specs:
        return
    sparsity = _import_tfmot().sparsity.keras
    teacher_params = lstm_params(args)
    teacher_macs = run.results["teacher"]["lstm_macs"]
    begin, end, every = tfmot_ramp(args)
    for name, target in specs.items():
        if name in run.results.get("students", {}):
            continue
        keras.utils.set_random_seed(args.seed)
        dense = language_model(run.vocab, args.hidden, embed_width(args),
                               "pruned", args.dropout)
        dense.set_weights(teacher.get_weights())
        schedule = sparsity.PolynomialDecay(
            0.0, target, begin_step=begin, end_step=end, frequency=every)
        pruned = keras.models.clone_model(dense, clone_function=lambda layer: (
            sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)
            if isinstance(layer, keras.layers.LSTM) else layer))
        # tfmot's wrapper class is not public API: find it by its masks.
        wrappers = [layer for layer in pruned.layers
                    if hasattr(layer, "pruning_vars")]

        def zeros(wrappers=wrappers):
            masks = [np.asarray(m) for w in wrappers
                     for _, m, _ in w.pruning_vars]
            return 1.0 - sum(np.count_nonzero(m) for m in masks) / sum(
                m.size for m in masks)

        callbacks = [sparsity.UpdatePruningStep(),
                     _AnnealLog(run, name, pruned, zeros)]
        steps, seconds = distill(run, teacher, pruned, coefficients(run),
                                 args.student_steps, "student " + name,
                                 callbacks=callbacks)
        student = sparsity.strip_pruning(pruned)
        kernels = _pruned_kernels(student)
        achieved = {k: 1.0 - int(np.count_nonzero(v)) / v.size
                    for k, v in kernels.items()}
        missed = {k: z for k, z in achieved.items() if abs(z - target) > 1e-3}
        if missed:
            raise RuntimeError(
                f"{name}: tfmot left these LSTM kernels away from the target "
                f"sparsity {target:g}: {missed}. Its ramp ends at step {end} "
                f"of {steps}; pass --student-steps above that or a lower "
                "--anneal-end.")
        student.save(run.file(f"student_{_slug(name)}.keras"))
        val, test = run.perplexities(student)
        products, biases = lstm_products(args)
        nnz = [int(np.count_nonzero(v)) for v in kernels.values()]
        params = biases + sum(sparse_params(z, m)
                              for z, (_, m) in zip(nnz, products))
        macs = sum(nnz)
        run.results.setdefault("students", {})[name] = dict(
            lstm_params=params, lstm_macs=macs,
            mac_reduction=teacher_macs / macs,
            param_reduction=teacher_params / params, val_ppl=val,
            test_ppl=test, train_seconds=seconds, steps=steps,
            epochs=steps / run.epoch_steps,
            scheme=f"tfmot prune_low_magnitude, LSTM kernels to "
                   f"{target:.0%} zeros (CSR), {macs:,} non-zeros",
            init="teacher (dense weights)", trainer="Distiller",
            target_sparsity=target, kernel_sparsity=achieved,
            schedule_tfmot=dict(kind="PolynomialDecay", power=3,
                                begin_step=begin, end_step=end,
                                frequency=every),
            coefficients=coefficients(run), lr=args.student_lr,
            schedule=args.student_schedule)
        run.save()
        finish(run, "student " + name)
        print(f"{name}: kernel zeros {achieved}, val {val:.2f} test "
              f"{test:.2f}", flush=True)


def stage_calibrate(run, teacher):
    if "calibration" in run.results:
        return
    keras.utils.set_random_seed(run.args.seed)
    student = lgp10(run, teacher)
    t0 = time.time()
    c = am.calibrate_coefficients(
        student, teacher, run.train.repeat(), validation_data=run.valid,
        steps=run.args.calib_steps, validation_steps=run.args.calib_eval,
        optimizer=optimizer(run.args.student_lr, run.args),
        reinitialize=True)
    run.results["calibration"] = dict(
        c_target=c.c_target, c_mse=c.c_mse, c_kl=c.c_kl,
        target_loss=c.target_loss, mse_loss=c.mse_loss, kl_loss=c.kl_loss,
        steps=run.args.calib_steps, validation_batches=run.args.calib_eval,
        seconds=time.time() - t0,
        student=f"LGP-Shuffle g={run.args.groups}, re-initialised "
                "(reinitialize=True, as the paper's students)")
    run.save()
    print(f"calibration: {run.results['calibration']}", flush=True)


def stage_grid(run, teacher):
    calib = coefficients(run)
    for c_mse in (0.0, calib["c_mse"]):
        for c_kl in (0.0, calib["c_kl"]):
            key = f"mse={c_mse:g},kl={c_kl:g}"
            if key in run.results.get("grid", {}):
                continue
            keras.utils.set_random_seed(run.args.seed)
            student = lgp10(run, teacher)
            coeffs = {"c_target": 1.0, "c_mse": c_mse, "c_kl": c_kl}
            steps, seconds = distill(run, teacher, student, coeffs,
                                     run.args.grid_steps, "grid " + key)
            scores = run.scores(student)
            val, test = scores["val_ppl"], scores["test_ppl"]
            run.results.setdefault("grid", {})[key] = dict(
                c_target=1.0, c_mse=c_mse, c_kl=c_kl, **scores,
                train_seconds=seconds, steps=steps)
            run.save()
            finish(run, "grid " + key)
            print(f"grid {key}: val {val:.2f} test {test:.2f}", flush=True)


def machine():
    """CPU model, cores, AVX-512 or not, and TensorFlow's thread settings."""
    import tensorflow as tf

    model, flags, named = platform.machine(), "", False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not named:
                    model, named = line.split(":", 1)[1].strip(), True
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    avx = "AVX-512" if "avx512f" in flags else (
        "AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    threads = (f"TF intra-op threads {intra or 'default (all cores)'}, "
               f"inter-op {inter or 'default'}")
    return f"{model}, {os.cpu_count()} cores ({avx}), {threads}"


def reuse_run(run, source):
    """Starts ``run`` from the teacher and calibration of the run dir
    ``source`` (copied once; nothing is retrained), and keeps ``source``'s
    students and grid as extra rows tagged with their step counts."""
    if "teacher" in run.results:
        return
    with open(os.path.join(source, "results.json")) as f:
        old = json.load(f)
    shutil.copyfile(os.path.join(source, "teacher.keras"),
                    run.file("teacher.keras"))
    res = run.results
    res["teacher"] = old["teacher"]
    res["reused_from"] = source
    if "calibration" in old:
        res["calibration"] = old["calibration"]
    config = dict(old.get("config", {}))
    config["reused_args"] = config.pop("args", {})
    res["config"] = config
    old_lr = old.get("config", {}).get("args", {}).get("student_lr")
    for name, r in old.get("students", {}).items():
        r.setdefault("lr", old_lr)
        if not name.endswith(" steps]"):  # not already from an earlier run
            name = f"{name} [{r['steps']} steps]"
        res.setdefault("students", {})[name] = r
    for key, grid in old.items():
        if key.startswith("grid ["):
            res[key] = grid
    if old.get("grid"):
        steps = sorted({g["steps"] for g in old["grid"].values()})
        res[f"grid [{', '.join(map(str, steps))} steps]"] = old["grid"]
    run.save()


def _setup_text(res):
    c = res.get("config", {})
    a = argparse.Namespace(**(c.get("args") or c.get("reused_args") or {}))
    if not vars(a):
        return "(no training configuration recorded)\n"
    tokens = c.get("train_tokens")
    epoch_steps = c.get("epoch_steps")
    commands = "\n".join(f"    {x}" for x in c.get("commands", []))
    embed = getattr(a, "embed", 0) or a.hidden
    iss_rows = [r for r in res.get("students", {}).values()
                if "target_reduction" in r]
    iss_text = ""
    if iss_rows:
        lams = sorted({r["strength"] for r in iss_rows})
        r0 = iss_rows[0]
        iss_text = (
            "ISS rows (Wen et al., the paper's baseline): "
            "`keras_antman.iss.prune_to` from the teacher's dense weights, "
            "group Lasso lambda = "
            + ", ".join(f"{x:g}" for x in lams)
            + f" (warmed up over the first {r0['warmup']:.0%} of the steps"
            f"; the recurrent-MAC budget then ramps to 1 / reduction over "
            f"the next {r0['ramp']:.0%}, zeroing the components of "
            "smallest RMS norm; the rest fine-tunes with lambda 0), "
            "trained by the `Distiller` (coefficients below) or by the "
            "label loss alone, same optimizer and lr schedule as the "
            "other students; then `shrink` to stock LSTMs (units in the "
            "scheme column), and the reduction is measured on the shrunk "
            "model, `report(teacher, shrunk).recurrent_total`. Keras "
            f"averages the loss over the {a.num_steps} steps of a window, "
            f"so lambda here is lambda_ref / {a.num_steps} in the "
            "reference code's scale (which sums over the window). ")
    teacher = res.get("teacher", {})
    plateau = teacher.get("schedule") == "plateau"
    carry = getattr(a, "carry_state", False)
    # A reused teacher was trained by the source run's optimizer.
    source = res.get("config", {}).get("reused_args") or {}
    teacher_opt = source.get("optimizer", getattr(a, "optimizer", "adam"))
    student_opt = getattr(a, "optimizer", "adam")
    return (
        f"**Scale.** Teacher 2 x LSTM({a.hidden}) "
        + (f"on a {embed}-wide embedding " if embed != a.hidden else "")
        + "trained "
        + (f"with the plateau schedule (below) to its plateau, "
           f"{teacher['epochs']:.2f} epochs (cap {a.teacher_epochs}) "
           if plateau else f"{a.teacher_epochs} epoch(s) ")
        + f"({epoch_steps} steps per epoch, "
        f"{tokens:,} training tokens); "
        + ("each student the distillation steps of its row (cosine "
           "schedules span them); " if plateau else
           f"each student {a.student_steps} distillation steps "
           f"({a.student_steps / epoch_steps:.2f} epoch); ")
        + (f"grid {a.grid_steps} steps per cell; " if res.get("grid") else "")
        + f"calibration {a.calib_steps} steps per loss. "
        + (f"Teacher and calibration come from the earlier run "
           f"`{res['reused_from']}` (reused with `--reuse`; the teacher was "
           "trained by the first command below), the rows tagged '[N "
           "steps]' from the earlier runs, the other rows from the commands "
           "on this run's directory; the steps column gives each row's "
           "count. "
           if res.get("reused_from") else "")
        + ("The paper trains 2 x LSTM(1500) for 39 epochs and its "
           "students to convergence; this run trains its teacher to its "
           "plateau and logs each student's perplexities during training "
           "(curves below) to show whether they have flattened, but the "
           "model is far smaller than the paper's, so its perplexities are "
           "not comparable with the paper's.\n\n" if plateau else
           "The paper trains 2 x LSTM(1500) for 39 epochs "
           "(and its students to convergence); this run is far smaller "
           "(sized to finish in about an hour on the machine below), so its "
           "perplexities are not comparable with the paper's and the "
           "students are not trained to convergence.\n\n")
        + f"**Setup.** Batch {a.batch_size}, {a.num_steps} steps, "
        + ("stateful truncated BPTT as Zaremba's (`--carry-state`): the "
           f"batch is {a.batch_size} contiguous streams, the LSTM state "
           "carries from window to window and is zeroed at each epoch "
           "start, for the teacher and every student (the Distiller's "
           "teacher runs on the same carried state), "
           if carry else
           "stateless truncated BPTT (every window starts from a zero "
           "state; Zaremba carries the state across windows), ")
        + "embedding width "
        + ("= hidden, " if embed == a.hidden else f"{embed}, ") +
        f"dropout {a.dropout} after the embedding and after the LSTMs. "
        f"Teacher: {teacher_opt.upper()}, lr {source.get('lr', a.lr)}"
        + (f" on the plateau schedule (evaluated every "
           f"{a.eval_every or epoch_steps} steps, rounded to whole chunks; "
           f"the lr is multiplied by {a.plateau_decay:g} when the "
           f"validation perplexity improves on the best by less than "
           f"{a.plateau_tol:.1%}; training stops once the lr has been "
           f"decayed and {getattr(a, 'plateau_patience', 1)} evaluation(s) "
           f"in a row improve on the best by less than "
           f"{a.plateau_stop:.1%}, or instead of a decay beyond "
           f"{a.plateau_decays}; the weights of the best validation "
           f"evaluation, step {teacher.get('weights_step', '?')}, are kept)"
           if plateau else "") + ", "
        f"students ({student_opt.upper()}) initialised from the teacher "
        f"lr {a.student_lr:g}"
        + (" (cosine decay to 0 over the student's steps)"
           if getattr(a, "student_schedule", "constant") == "cosine" else "")
        + ", the "
        "randomly initialised dense student lr "
        f"{getattr(a, 'scratch_lr', 0) or a.lr} (each row's lr is in the "
        "table), global gradient norm clipped at "
        f"{a.clipnorm}. Distillation: `keras_antman.Distiller` with the "
        "coefficients of the calibration below (C_target, C_mse, C_kl), "
        "temperature 1. Compressed students start from the teacher's "
        "weights (`compress`, `from_dense`) unless their init column says "
        "random; the dense direct-design student from a random init. "
        + iss_text +
        "LSTM params / MACs count both LSTM "
        "layers (`keras_antman.report`), MAC reduction = teacher's LSTM "
        "MACs / student's. Loss is the mean over tokens, so SGD lr 35 and "
        "clip 0.143 are Zaremba's lr 1 and clip 5 on the per-window sum. "
        "Evaluation: "
        + (f"first {a.eval_batches} batches of " if a.eval_batches
           else "all of ") +
        "the valid / test splits, perplexity = exp(mean cross-entropy)"
        + ("; the state is carried over each whole split (the "
           "zero-state column: every window from a zero state). "
           if carry else ". ") +
        f"Seed {a.seed} (`keras.utils.set_random_seed` before each "
        "model).\n\n"
        f"**Machine.** {c.get('machine', '?')}; Keras "
        f"{c.get('keras', '?')}, TensorFlow {c.get('tensorflow', '?')}. "
        "Training times are wall-clock on this shared 2-core VM.\n\n"
        f"**Command(s)** (from the repository root):\n\n{commands}\n")


# The Doping paper's abstract: perplexity vs the teacher at 25x on a medium
# PTB LSTM, by row kind.
PAPER_25X = {"dope": "+1.4%", "prune": "+7.9%", "hmd": "+15%", "lmf": "+27%"}
KIND_LABEL = {"dope": "doped KP + CMR", "dope_nocmr": "doped KP, no CMR",
              "kp": "plain KP", "hmd": "HMD", "lmf": "LMF (LowRank)",
              "prune": "magnitude pruning"}


def _doping_tables(res, t_ppl):
    """Markdown: one table per Doping reduction (the doped, KP, HMD, LMF
    and pruning rows, plus any other row within 10% of its LSTM param
    reduction), with the paper's abstract numbers at 25x."""
    students = res.get("students", {})
    teacher_params = res["teacher"]["lstm_params"]
    doped = {n: r for n, r in students.items() if "doping_kind" in r}
    targets = sorted({r["budget_reduction"] for r in doped.values()},
                     reverse=True)
    lines = []
    for target in targets:
        rows = [(n, r) for n, r in students.items()
                if abs(teacher_params / r["lstm_params"] / target - 1) < 0.1]
        rows.sort(key=lambda nr: nr[1]["test_ppl"])
        paper = target == 25
        lines += [
            f"\n## Doping at ~{target:g}x LSTM params"
            + (" (the paper's abstract: medium PTB LSTM, 25x)" if paper
               else "") + "\n",
            "| row | kind | LSTM params | param reduction | MAC reduction "
            "| val ppl | test ppl | test ppl vs teacher"
            + (" | paper (vs its teacher)" if paper else "") + " |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---:"
            + (" | ---:" if paper else "") + " |"]
        for n, r in rows:
            kind = r.get("doping_kind", "")
            lines.append(
                f"| {n} | {KIND_LABEL.get(kind, r.get('scheme', ''))} | "
                f"{r['lstm_params']:,} | "
                f"{teacher_params / r['lstm_params']:.2f}x | "
                f"{r['mac_reduction']:.2f}x | {r['val_ppl']:.2f} | "
                f"{r['test_ppl']:.2f} | "
                f"{100 * (r['test_ppl'] / t_ppl - 1):+.1f}%"
                + (f" | {PAPER_25X.get(kind, '-')}" if paper else "") + " |")
    return lines


def _tfmot_tables(res, t_ppl):
    """Markdown: the tfmot rows (target and achieved zeros per LSTM
    kernel) and, if ``bench/unstructured_pruning.py --run-dir`` stored
    them, the measured latencies against the theoretical speed-ups."""
    students = res.get("students", {})
    rows = [(n, r) for n, r in students.items() if "target_sparsity" in r]
    lines = []
    if rows:
        r0 = rows[0][1]["schedule_tfmot"]
        kernels = list(rows[0][1]["kernel_sparsity"])
        lines += [
            "\n## Unstructured pruning with tfmot (the paper's Table 7 "
            "baseline)\n",
            "tfmot 0.8 `prune_low_magnitude` on both LSTMs (kernel and "
            "recurrent kernel; not the embedding, the output layer or the "
            f"biases), `PolynomialDecay` (power {r0['power']}) from 0 to the "
            f"target over steps {r0['begin_step']}-{r0['end_step']}, every "
            f"{r0['frequency']} steps, `UpdatePruningStep`; distilled by the "
            "`Distiller` like the other students, then `strip_pruning`. "
            "Zeros per kernel are counted on the stripped model.\n",
            "| row | target zeros | "
            + " | ".join(f"zeros {k}" for k in kernels)
            + " | LSTM MAC reduction | test ppl | vs teacher |",
            "| --- |" + " ---: |" * (len(kernels) + 4)]
        for n, r in rows:
            lines.append(
                f"| {n} | {r['target_sparsity']:.0%} | "
                + " | ".join(f"{r['kernel_sparsity'][k]:.4f}"
                             for k in kernels)
                + f" | {r['mac_reduction']:.2f}x | {r['test_ppl']:.2f} | "
                f"{100 * (r['test_ppl'] / t_ppl - 1):+.1f}% |")
    lat = res.get("latency")
    if not lat:
        return lines
    base = lat["rows"][lat["baseline"][0]]["paths"][lat["baseline"][1]]
    lines += [
        "\n## Measured inference time against the theoretical speed-up\n",
        f"The LSTM stack of each row (two LSTM(200) layers; embedding and "
        f"output layer left out), batch {lat['batch']}, {lat['steps']} "
        f"steps, {lat['threads']} thread, {lat['repeats']} rounds of one "
        "call per path (random order) in one process, each path an "
        "`export(kernel="
        "\"compiled\")` SavedModel: *op dense* runs the kernels with their "
        "zeros (`Dense` schemes), *op CSR* only their non-zeros (the op's "
        "sparse term, lowered as a `Doped` matrix with a zero rank-1 base). "
        f"{lat['machine']}; load average {lat['load_start']} at the start, "
        f"{lat['load_end']} at the end. Speed-up: the teacher's median on "
        f"{lat['baseline'][1]} over the row's, by wall-clock median, by "
        "wall-clock 10th percentile (the least disturbed calls) and by the "
        "process's CPU time (which leaves out waiting for a core). "
        f"Command: `{lat['command']}`.\n",
        "| row | theoretical (LSTM MACs) | test ppl | path | wall median ms "
        "(IQR) | wall p10 ms | CPU median ms | speed-up, wall median | "
        "speed-up, wall p10 | speed-up, CPU | CPU speed-up / theoretical |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |"]
    for n, r in lat["rows"].items():
        ppl = r.get("test_ppl")
        for path, t in r["paths"].items():
            wall = base["median_ms"] / t["median_ms"]
            p10 = base["p10_ms"] / t["p10_ms"]
            cpu = base["cpu_median_ms"] / t["cpu_median_ms"]
            best = " (best)" if path == r["best"] and len(r["paths"]) > 1 \
                else ""
            lines.append(
                f"| {n} | {r['theoretical']:.2f}x | "
                + (f"{ppl:.2f}" if ppl else "-") + f" | {path}{best} | "
                f"{t['median_ms']:.3f} ({t['iqr_ms']:.3f}) | "
                f"{t['p10_ms']:.3f} | {t['cpu_median_ms']:.3f} | "
                f"{wall:.2f}x | {p10:.2f}x | {cpu:.2f}x | "
                f"{cpu / r['theoretical']:.2f} |")
    return lines


def _init_table(res, t_ppl):
    """Markdown: the rows logged with ``--eval-at`` (test perplexity during
    distillation) and, where a data-aware row recorded them, each product's
    relative output error on the calibration rows (``from_dense``: the
    naive init's, ``fitted``: the data-aware one's)."""
    rows = [(n, r) for n, r in res.get("students", {}).items()
            if "test_ppl_at" in r]
    steps = sorted({int(k) for _, r in rows for k in r["test_ppl_at"]})
    errors = {n.replace(" (data-aware init)", ""): r["calibration_errors"]
              for n, r in rows if "calibration_errors" in r}
    products = sorted({p for e in errors.values() for p in e})
    lines = [
        "\n## Initialisation: test perplexity during distillation\n",
        "Relative output error ||X W - X W_hat|| / ||X W|| of each product "
        "on the calibration rows (layer/product), for the weights the row "
        "starts from: `from_dense` for the naive init, the fit for the "
        "data-aware one (the better of fit and `from_dense`, as `compress` "
        "keeps).\n",
        "| row | " + " | ".join(products) + " | "
        + " | ".join(f"test ppl @ {s}" for s in steps)
        + " | final vs teacher |",
        "| --- |" + " ---: |" * (len(products) + len(steps) + 1)]
    for n, r in rows:
        base = n.replace(" (data-aware init)", "")
        e = errors.get(base, {})
        aware = base != n
        cells = [f"{(min(e[p].values()) if aware else e[p]['from_dense']):.3f}"
                 if p in e else "-" for p in products]
        ppl = [f"{r['test_ppl_at'][str(s)]:.2f}" if str(s) in r[
            "test_ppl_at"] else "-" for s in steps]
        lines.append(f"| {n} | " + " | ".join(cells + ppl) + " | "
                     f"{100 * (r['test_ppl'] / t_ppl - 1):+.1f}% |")
    return lines


def _plot_init(rows, path):
    """Test perplexity against distillation steps of the ``--eval-at``
    rows: data-aware init solid, the others dashed, one colour per
    scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for name, r in rows:
        base = name.replace(" (data-aware init)", "")
        colour = colours.setdefault(base, f"C{len(colours)}")
        points = sorted((int(k), v) for k, v in r["test_ppl_at"].items())
        ax.plot(*zip(*points), marker="o", color=colour, label=name,
                linestyle="-" if base != name else "--")
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("test perplexity (log scale)")
    ax.set_title("PTB 10x students: naive (dashed) vs data-aware init")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curve_tables(curves):
    """Markdown: each logged curve (the teacher's plateau schedule, the
    students' ``--curve-every`` log) as step / lr / val / test rows."""
    lines = ["\n## Perplexity during training\n",
             "Validation and test perplexity at the logged optimizer steps "
             "(state carried over each split when the run carries it). "
             "Teacher: the plateau schedule's evaluations, with the rate "
             "used up to each one and what the rule decided; students: "
             "every `--curve-every` distillation steps (step 0: the "
             "initial weights).\n"]
    for name, curve in curves:
        lines += [f"### {name}\n"]
        if "lr" in curve[0]:
            lines += ["| step | lr | val ppl | test ppl | then |",
                      "| ---: | ---: | ---: | ---: | --- |"]
            for e in curve:
                then = ("stop" if e["stopped"] else
                        f"lr {e['next_lr']:g}" if e["decayed"] else "-")
                then += " (best so far)" if e.get("best") else ""
                lines.append(f"| {e['step']} | {e['lr']:g} | "
                             f"{e['val_ppl']:.2f} | {e['test_ppl']:.2f} | "
                             f"{then} |")
        else:
            lines += ["| step | val ppl | test ppl |", "| ---: | ---: | ---: |"]
            lines += [f"| {e['step']} | {e['val_ppl']:.2f} | "
                      f"{e['test_ppl']:.2f} |" for e in curve]
        lines.append("")
    return lines


def _plot_curves(curves, path):
    """Validation perplexity against the step: the teacher (left) and the
    students (right; dashed: from a random init, solid: from the
    teacher's weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves:
        ax = left if name.startswith("Teacher") else right
        steps = [e["step"] for e in curve]
        ax.plot(steps, [e["val_ppl"] for e in curve], marker=".",
                label=name, linestyle="--" if "random init" in name else "-")
    left.set_title("teacher (plateau schedule)")
    right.set_title("students (distillation; dashed: random init)")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation perplexity (log scale)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_annealing(anneal, path):
    """Validation perplexity against ``S``'s density (left) and against the
    step (right) for each logged doped / pruned student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, log in sorted(anneal.items()):
        steps, sparsity, ppl = (np.array(c, float) for c in zip(*log))
        density = np.maximum(1.0 - sparsity, 1e-4)
        left.plot(density, ppl, marker=".", label=name)
        right.plot(steps, ppl, marker=".", label=name)
    left.set_xscale("log")
    left.invert_xaxis()
    left.set_xlabel("density of S / of the pruned kernels (1 - sparsity), "
                    "log scale")
    right.set_xlabel("distillation step")
    for ax in (left, right):
        ax.set_ylabel("validation perplexity (fixed batches)")
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle("PTB: validation perplexity while S or the pruned kernels "
                 "anneal (cubic ramp)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_report(run, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    res = run.results
    rows = [("Teacher", res["teacher"])] if "teacher" in res else []
    rows += list(res.get("students", {}).items())
    t_ppl = res.get("teacher", {}).get("test_ppl")
    cfg = res.get("config", {})
    lr0 = (cfg.get("args") or cfg.get("reused_args") or {}).get("lr", "-")
    iss_rows = any("target_reduction" in r for _, r in rows)
    zero = any("test_ppl_zero_state" in r for _, r in rows)
    lines = [
        "# PTB word LM: teacher and distilled students (paper Tables 2, 6"
        + (", ISS baseline" if iss_rows else "") + ")\n", _setup_text(res),
        "| model | scheme | LSTM params | LSTM MAC reduction | init | "
        "lr | val ppl | test ppl | test ppl vs teacher | "
        + ("test ppl, zero state | " if zero else "")
        + "train time (s) | steps (epochs) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: "
        "| ---: |" + (" ---: |" if zero else ""),
    ]
    for name, r in rows:
        delta = (f"{100 * (r['test_ppl'] / t_ppl - 1):+.1f}%"
                 if t_ppl else "-")
        lr = r.get("lr", "-") if name != "Teacher" else lr0
        if r.get("schedule", "constant") != "constant":
            lr = f"{lr} ({r['schedule']})"
        cell = ""
        if zero:
            z = r.get("test_ppl_zero_state")
            cell = "- | " if z is None else f"{z:.2f} | "
        lines.append(
            f"| {name} | {r.get('scheme', 'dense')} | {r['lstm_params']:,} "
            f"| {r['mac_reduction']:.2f}x | {r.get('init', '-')} | "
            f"{lr} | "
            f"{r['val_ppl']:.2f} | {r['test_ppl']:.2f} | {delta} | "
            f"{cell}{r['train_seconds']:.0f} | {r['steps']} "
            f"({r.get('epochs', 0):.2f}) |")
    if t_ppl and any("doping_kind" in r for _, r in rows):
        lines += _doping_tables(res, t_ppl)
    if t_ppl and any("test_ppl_at" in r for _, r in rows):
        lines += _init_table(res, t_ppl)
    if t_ppl:
        lines += _tfmot_tables(res, t_ppl)
    curves = [(n, r["curve"]) for n, r in rows if r.get("curve")]
    curves += [(f"{'Teacher' if key == 'teacher' else key} (in training)",
                log) for key, log in res.get("schedule", {}).items() if log]
    curves += [(f"{key} (in training)", log)
               for key, log in res.get("curves", {}).items() if log]
    if curves:
        lines += _curve_tables(curves)
        _plot_curves(curves, os.path.join(out_dir, f"{run.args.report_name}"
                                                   "_curves.png"))
    if run.args.notes:  # a hand-written discussion, kept in its own file
        with open(run.args.notes) as f:
            lines += ["", f.read().rstrip()]
    name = run.args.report_name
    progress = [(n, r) for n, r in rows if "test_ppl_at" in r]
    if progress:
        _plot_init(progress, os.path.join(out_dir, f"{name}_init_steps.png"))
    if res.get("anneal"):
        _plot_annealing(res["anneal"],
                        os.path.join(out_dir, f"{name}_annealing.png"))
    with open(os.path.join(out_dir, f"{name}_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    calib = res.get("calibration")
    lines = ["# Loss coefficients (paper section 4, Table 3) at small "
             "scale\n", _setup_text(res)]
    if calib:
        lines += [
            "## The paper's method: each loss alone, then equal terms\n",
            f"`calibrate_coefficients` trained the student "
            f"({calib['student']}) {calib['steps']} steps with each loss "
            f"alone and measured that loss on {calib['validation_batches']}"
            f" validation batches: target {calib['target_loss']:.4f}, MSE "
            f"{calib['mse_loss']:.4f}, KL {calib['kl_loss']:.4f} -> "
            f"C_target = {calib['c_target']:g}, C_mse = {calib['c_mse']:g}"
            f", C_kl = {calib['c_kl']:g} (ratios rounded to one "
            "significant digit; the paper measured 4.110, 0.133, 0.004 -> "
            f"1, 30, 1000). Took {calib['seconds']:.0f} s. These "
            "coefficients are used for every student above and the grid "
            "below.\n"]
    grids = [(k, v) for k, v in res.items()
             if k.startswith("grid") and isinstance(v, dict) and v]
    for gkey, grid in sorted(grids, key=lambda kv: kv[0] != "grid"):
        mses = sorted({g["c_mse"] for g in grid.values()})
        kls = sorted({g["c_kl"] for g in grid.values()})
        steps = sorted({g["steps"] for g in grid.values()})
        lines += [f"## Validation / test perplexity, LGP-Shuffle student, "
                  f"C_target = 1, {', '.join(map(str, steps))} steps each "
                  "from the teacher's weights"
                  + ("" if gkey == "grid" else " (earlier run)") + "\n",
                  "| C_mse \\ C_kl | " + " | ".join(f"{k:g}" for k in kls)
                  + " |", "| --- |" + " ---: |" * len(kls)]
        for m in mses:
            cells = []
            for k in kls:
                g = grid.get(f"mse={m:g},kl={k:g}")
                cells.append(f"{g['val_ppl']:.2f} / {g['test_ppl']:.2f}"
                             if g else "-")
            lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
        lines.append("\n(0, 0) is the label loss alone.\n")
    with open(os.path.join(out_dir, f"{name}_coefficients.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"{name}_results.json"), "w") as f:
        json.dump(res, f, indent=1)
    if rows:
        _plot(rows, os.path.join(out_dir, f"{name}_ppl_vs_params.png"))
    print(f"wrote {out_dir}/{name}_results.md, {name}_coefficients.md, "
          f"{name}_results.json, {name}_ppl_vs_params.png"
          + (f", {name}_init_steps.png" if progress else "")
          + (f", {name}_annealing.png" if res.get("anneal") else ""),
          flush=True)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # This run's rows (filled), and for a student it did not train the
    # longest-trained row reused from an earlier run ("... [N steps]",
    # hollow, labelled with its steps): fewer steps, not a like-for-like
    # comparison, so no line joins it to this run's points.
    current = {n for n, _ in rows if not n.endswith("steps]")}
    earlier = {}
    for n, r in rows:
        base = n.split(" [")[0]
        if n.endswith("steps]") and base not in current and (
                base not in earlier or r["steps"] > earlier[base][1]["steps"]):
            earlier[base] = (n, r)
    rows = [(n, r) for n, r in rows if n in current] + list(earlier.values())
    fig, ax = plt.subplots(figsize=(8, 5))
    lgp = sorted((r["lstm_params"], r["test_ppl"]) for n, r in rows
                 if n.startswith("LGP-Shuffle") and n in current
                 and r.get("init") != "random")
    if len(lgp) > 1:
        ax.plot(*zip(*lgp), color="tab:blue", alpha=0.4, zorder=1)
    for i, (name, r) in enumerate(sorted(rows,
                                         key=lambda nr: nr[1]["test_ppl"])):
        color = ("black" if name == "Teacher" else "tab:blue"
                 if name.startswith("LGP-Shuffle") else "tab:green"
                 if name.startswith("ISS") else "tab:red")
        ax.scatter(r["lstm_params"], r["test_ppl"], zorder=2,
                   color=color if name in current else "none",
                   edgecolors=color)
        label = name.replace(" (direct design)", "")
        ax.annotate(f"{label} ({r['mac_reduction']:.1f}x, "
                    f"{r['test_ppl']:.0f})",
                    (r["lstm_params"], r["test_ppl"]), fontsize=7,
                    xytext=(6 if i % 2 else -6, -3),
                    ha="left" if i % 2 else "right",
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("LSTM parameters (both layers)")
    ax.set_ylabel("test perplexity")
    ax.set_title("PTB: test perplexity vs LSTM parameters\n(students "
                 "distilled; hollow: from an earlier run, fewer steps)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def _coefficients(text):
    values = _floats(text)
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"expected three numbers >= 0, C_TARGET,C_MSE,C_KL (e.g. 1,0,0); "
            f"got {text!r}")
    return values


def _trainers(text):
    out = [x for x in text.split(",") if x.strip()]
    if set(out) - {"teacher", "label"}:
        raise argparse.ArgumentTypeError(
            f"--iss-trainers takes teacher and/or label, got {text!r}")
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True,
                   help="directory with ptb.{train,valid,test}.txt")
    p.add_argument("--run-dir", default="runs/ptb",
                   help="checkpoints and results.json (resumable)")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="where the report stage writes its files")
    p.add_argument("--report-name", default="ptb",
                   help="the report's files are NAME_results.md, "
                        "NAME_coefficients.md, NAME_results.json, "
                        "NAME_ppl_vs_params.png")
    p.add_argument("--notes", default="",
                   help="a Markdown file the report appends to "
                        "NAME_results.md (the discussion of the numbers)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--embed", type=int, default=0,
                   help="embedding width (0: --hidden); --embed 800 "
                        "--hidden 100 is the paper's input >> hidden shape")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--num-steps", type=int, default=35)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="0 as Zaremba's small config")
    p.add_argument("--teacher-epochs", type=float, default=2.5)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--grid-steps", type=int, default=100)
    p.add_argument("--calib-steps", type=int, default=80)
    p.add_argument("--calib-eval", type=int, default=20,
                   help="validation batches measuring each calibration loss")
    p.add_argument("--chunk-steps", type=int, default=200,
                   help="checkpoint every this many training steps")
    p.add_argument("--max-train-tokens", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=0,
                   help="evaluate on the first N batches only (0: all)")
    p.add_argument("--groups", type=int, default=10,
                   help="LGP-Shuffle groups of the ~10x student (calibration"
                        " and grid use it too)")
    p.add_argument("--lowrank-lgp", type=_ints, default=[10, 20, 2],
                   help="g_in,g_out,r of the LowRank-LGP student")
    p.add_argument("--svd-r", type=int, default=10,
                   help="rank reduction of the SVD (LowRank) student")
    p.add_argument("--svd-rank", type=int, default=0,
                   help="rank of the SVD student instead of --svd-r (16 is "
                        "exactly 10x at hidden 200)")
    p.add_argument("--students", type=lambda t: t.split(","), default=[],
                   help="comma-separated subset of the students: lgp, "
                        "lowrank_lgp, svd, dense, lgp<G>, iss (default: "
                        "all of these), and the Doping rows (only when "
                        "named): dope, dope_nocmr, kp, hmd, lmf, prune, and"
                        " tfmot (unstructured pruning with tfmot; tf_keras "
                        "only: set TF_USE_LEGACY_KERAS=1)")
    p.add_argument("--tfmot-sparsities", type=_floats, default=[0.5, 0.9],
                   help="target sparsities of the tfmot rows (their ramp: "
                        "--anneal-end, --anneal-every)")
    p.add_argument("--student-init",
                   choices=("teacher", "random", "calibrated"),
                   default="teacher",
                   help="structured students start from the teacher's "
                        "weights (compress + from_dense) or from a random "
                        "init (then at the --scratch-lr / --lr rate, as the"
                        " dense student); random-init rows are named '... "
                        "(random init)'; calibrated: the teacher's weights "
                        "fitted to the layers' recorded inputs (compress "
                        "calibration_data, --calibration-batches), rows "
                        "named '... (data-aware init)'")
    p.add_argument("--calibration-batches", type=int, default=20,
                   help="training batches recorded for the data-aware init")
    p.add_argument("--student-coefficients", type=_coefficients,
                   default=None, metavar="C_TARGET,C_MSE,C_KL",
                   help="the students' distillation coefficients instead of "
                        "the calibrated ones, e.g. 1,0,0 for the label loss "
                        "alone (recorded with each row)")
    p.add_argument("--eval-at", type=_ints, default=[],
                   help="also the test perplexity at these student steps, "
                        "e.g. 0,300 (0: before training)")
    p.add_argument("--student-schedule", choices=("constant", "cosine"),
                   default="constant",
                   help="students' learning rate: constant, or a cosine "
                        "decay to 0 over --student-steps")
    p.add_argument("--small-hidden", type=int, default=0,
                   help="units of the dense student (0: ~10x fewer MACs)")
    p.add_argument("--extra-groups", type=_ints, default=[25, 50],
                   help="LGP-Shuffle students at larger reductions")
    p.add_argument("--iss-reductions", type=_floats, default=[],
                   help="ISS students at these LSTM-MAC reductions, e.g. "
                        "5,10 (default: none)")
    p.add_argument("--iss-trainers", type=_trainers,
                   default=["teacher", "label"],
                   help="ISS with the teacher (Distiller) and/or the label "
                        "loss alone: teacher,label")
    p.add_argument("--iss-strength", type=float, default=ISS_STRENGTH,
                   help="ISS group Lasso lambda (Keras mean loss: the "
                        "reference code's lambda / --num-steps). 2e-3 lets "
                        "the penalty alone shrink a typical first-layer "
                        "component of the H=200 teacher (L2 norm ~10) by "
                        "~7 over the warm-up and ramp of 1000 steps at lr "
                        "10 (cosine): sum over those steps of lr * lambda")
    p.add_argument("--iss-warmup", type=float, default=0.25,
                   help="fraction of the ISS steps warming lambda up")
    p.add_argument("--iss-ramp", type=float, default=0.5,
                   help="fraction of the ISS steps ramping the MAC budget "
                        "down to the target")
    p.add_argument("--dope-reductions", type=_floats, default=[25.0],
                   help="LSTM param reductions of the Doping rows (kinds "
                        "dope, dope_nocmr, kp, hmd, lmf, prune in "
                        "--students)")
    p.add_argument("--cmr-rate", type=float, default=0.5,
                   help="co-matrix dropout rate of the 'dope' rows")
    p.add_argument("--hmd-dense-rows", type=float, default=0.025,
                   help="fraction of input rows HMD keeps dense")
    p.add_argument("--anneal-end", type=float, default=0.75,
                   help="fraction of the student steps over which S (or the "
                        "pruned kernels) reaches its target sparsity")
    p.add_argument("--anneal-every", type=int, default=10,
                   help="steps between pruning steps of the ramp")
    p.add_argument("--anneal-log", type=int, default=50,
                   help="log validation perplexity and sparsity every N "
                        "steps of a doped or pruned student")
    p.add_argument("--anneal-batches", type=int, default=20,
                   help="validation batches of that log")
    p.add_argument("--carry-state", action="store_true",
                   help="Zaremba's stateful BPTT: stateful LSTMs (fixed "
                        "batch size) carry the state from window to window, "
                        "zeroed at each epoch start, for the teacher and the"
                        " students (a Distiller's teacher too); evaluation "
                        "carries it over each split and also records the "
                        "zero-state perplexities. Not for the ISS rows")
    p.add_argument("--teacher-schedule", choices=("constant", "plateau"),
                   default="constant",
                   help="teacher's learning rate: constant for "
                        "--teacher-epochs, or plateau: decayed when the "
                        "validation perplexity stops improving, stopping "
                        "when it flattens (--teacher-epochs is then a cap)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="plateau schedule: steps between evaluations, "
                        "rounded to whole chunks (0: one epoch)")
    p.add_argument("--plateau-tol", type=float, default=0.01,
                   help="plateau schedule: decay when the validation "
                        "perplexity improves on the best so far by less "
                        "than this fraction")
    p.add_argument("--plateau-decay", type=float, default=0.5,
                   help="plateau schedule: factor of each decay")
    p.add_argument("--plateau-stop", type=float, default=0.002,
                   help="plateau schedule: an evaluation improving on the "
                        "best by less than this fraction counts towards "
                        "--plateau-patience")
    p.add_argument("--plateau-patience", type=int, default=2,
                   help="plateau schedule: once decayed, stop after this "
                        "many evaluations in a row improving by less than "
                        "--plateau-stop")
    p.add_argument("--plateau-decays", type=int, default=6,
                   help="plateau schedule: stop rather than decay more "
                        "often than this")
    p.add_argument("--curve-every", type=int, default=0,
                   help="log each student's validation and test perplexity "
                        "every N steps (0: never)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="for the teacher and the students")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--student-lr", type=float, default=1e-3)
    p.add_argument("--scratch-lr", type=float, default=0.0,
                   help="learning rate of the randomly initialised dense "
                        "student (0: the teacher's --lr)")
    p.add_argument("--clipnorm", type=float, default=5.0)
    p.add_argument("--reuse", default="",
                   help="an earlier run dir: take its teacher (teacher.keras"
                        " and result) and calibration, and keep its students"
                        " and grid as extra rows named '... [N steps]'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=2)
    p.add_argument("--eager", action="store_true",
                   help="run tf.functions eagerly: skips tracing, for tiny "
                        "smoke tests only (much slower at real scale)")
    return p


def main(argv=None):
    import sys

    import tensorflow as tf

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; use {STAGES}")
    if len(args.lowrank_lgp) != 3:
        raise SystemExit("--lowrank-lgp takes three ints: g_in,g_out,r")
    if "tfmot" in args.students and not LEGACY:
        raise SystemExit(
            "--students tfmot runs tfmot's prune_low_magnitude, which prunes "
            "only tf_keras models (tfmot 0.8 rejects Keras 3 ones): rerun "
            "with TF_USE_LEGACY_KERAS=1 (pip install tf_keras), e.g. "
            "TF_USE_LEGACY_KERAS=1 python examples/ptb_word_lm.py ...")
    bad = [s for s in args.tfmot_sparsities if not 0.0 < s < 1.0]
    if bad:
        raise SystemExit(f"--tfmot-sparsities must be in (0, 1); got {bad}")
    if args.carry_state and "students" in stages and iss_specs(args):
        raise SystemExit(
            "--carry-state does not cover the ISS rows (iss.prune_to runs "
            "its own fit without the state resets); leave iss out of "
            "--students or drop --carry-state")
    eager = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(args.eager or eager)
    try:
        return _main(args, argv, stages)
    finally:
        tf.config.run_functions_eagerly(eager)


def _main(args, argv, stages):
    import shlex

    import tensorflow as tf

    run = Run(args)
    if args.reuse:
        reuse_run(run, args.reuse)
    training = set(stages) & {"teacher", "students", "calibrate", "grid"}
    if training:
        config = run.results.setdefault("config", {})
        command = ("TF_USE_LEGACY_KERAS=1 " if LEGACY else "") + (
            "python examples/ptb_word_lm.py " + shlex.join(argv))
        config.setdefault("commands", [])
        if command not in config["commands"]:
            config["commands"].append(command)
        config.update(
            args=vars(args), machine=machine(), keras=keras.__version__,
            tensorflow=tf.__version__, train_tokens=run.train_tokens,
            epoch_steps=run.epoch_steps, vocab=run.vocab)
        run.save()
        teacher = stage_teacher(run)
    if "calibrate" in stages:
        stage_calibrate(run, teacher)
    if "students" in stages:
        stage_students(run, teacher)
    if "grid" in stages:
        stage_grid(run, teacher)
    if "report" in stages:
        stage_report(run, args.out)
    return run.results


if __name__ == "__main__":
    main()
