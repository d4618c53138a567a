"""Hardware-guided PTB student next to AntMan, ISS and a small dense LSTM.

Yin et al. (arXiv 1901.10997) choose an LSTM's dimensions from latency
measured on the target machine and train the chosen network with grow and
prune. This script does that on the PTB word LM of
``examples/ptb_word_lm.py`` (whose teacher, calibration and AntMan / ISS
students it reuses from ``--teacher-run``) and compares the rows at equal
*measured* latency:

1. ``curve``: `keras_antman.hardware.profile` times the model's LSTM stack
   (2 layers, input = the embedding width, batch 1, ``--latency-steps``
   timesteps, one thread) over a fine sweep of hidden sizes, on stock
   Keras and on the compiled op with Dense, LGP-Shuffle and LowRank-LGP
   schemes. The budget is the measured latency of the AntMan 10x student's
   configuration (LGP-Shuffle g=10 at the teacher's size, on the op).
   `choose` reads the configuration with the most parameters within the
   budget (valleys preferred on ties) over every measured configuration,
   and over the Dense ones no wider than the teacher: grow and prune masks
   Dense kernels (`keras_antman.grow_prune`) and the student starts from
   the teacher's units, so the hardware-guided student is the Dense pick.
   Both picks are recorded.
2. ``students`` (run one at a time under the training lock):
   * ``hw``: the Dense pick, initialised from the teacher by an ISS-style
     shrink (each layer keeps the ``h`` hidden units whose ISS components
     have the largest L2 norms, `keras_antman.iss.shrink`; the output
     layer is sliced to match), then distilled with grow and prune: the
     seed mask keeps each kernel's largest-magnitude entries at the target
     sparsity, a grow phase activates dormant entries by gradient
     magnitude, a prune phase ramps back to the target (cubic), and the
     rest fine-tunes on the final mask. The target makes the nonzero LSTM
     parameters equal to the AntMan 10x student's (``--match-params``).
   * ``dense``: the same dimensions as a direct design (random init, the
     teacher's learning rate, as ``ptb_word_lm.py``'s small dense student):
     the smaller dense LSTM at the same measured latency.
   * ``shrunk``: (ablation) the hw student without grow and prune.
3. ``measure``: every row's LSTM stack, timed interleaved in one process
   (`keras_antman.hardware.measure`) on each path it has (stock Keras and
   the op with Dense schemes for stock LSTMs, zeros included; the op for
   structured ones); the best path is the row's latency.
4. ``report``: ``--out/<report-name>_results.{md,json}``.

``curve`` and ``measure`` set TensorFlow to one thread, so they run in a
command of their own (before any training stage in that process). Every
training stage resumes: ``BackupAndRestore`` chunks as in
``ptb_word_lm.py``, and the grow-and-prune masks and schedule position are
saved with each chunk.

Usage (from the repository root):
    python examples/ptb_hardware_guided.py --data ../shared/data/ptb \\
        --teacher-run runs/ptb_iss --run-dir runs/ptb_hw --stages curve
    python examples/ptb_hardware_guided.py ... --stages students --students hw
    python examples/ptb_hardware_guided.py ... --stages measure,report
"""

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Keras 3, or tf_keras under TF_USE_LEGACY_KERAS=1 (as keras_antman picks).
if os.environ.get("TF_USE_LEGACY_KERAS") in ("1", "true", "True"):
    import tf_keras as keras
else:
    import keras
import numpy as np  # noqa: E402
import ptb_word_lm as ptb  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import grow_prune as gp  # noqa: E402
from keras_antman import hardware as hw  # noqa: E402
from keras_antman import iss  # noqa: E402

STAGES = ("curve", "students", "measure", "report")
TOLERANCE = 0.05
VALLEYS = dict(tolerance=TOLERANCE, beyond_spread=True)
CURVE_SCHEMES = (
    am.Dense(), am.LGPShuffle(2), am.LGPShuffle(4), am.LGPShuffle(5),
    am.LGPShuffle(8), am.LGPShuffle(10), am.LowRankLGP(10, 20, 2),
    am.LowRankLGP(10, 4, 2))
# Rows of --teacher-run compared here: name there -> name here.
REUSED = {
    "LGP-Shuffle g=10": "AntMan LGP-Shuffle g=10 (10x)",
    "LowRank-LGP g_in=10 g_out=20 r=2": "AntMan LowRank-LGP g_in=10 "
                                        "g_out=20 r=2 (10x)",
    "ISS 10x (distilled)": "ISS 10x (distilled)",
}


def curve_sizes(args):
    """Every hidden size from ``--curve-fine`` (a ``lo,hi`` range, step 1),
    multiples of 8 up to ``--curve-high``, the teacher's size +-2 and the
    sizes where Dense, g=2 and g=4 recurrent weights cross L2 / L3."""
    lo, hi = args.curve_fine
    sizes = set(range(lo, hi + 1))
    sizes.update(range(8 * -(-lo // 8), args.curve_high + 1, 8))
    sizes.update(range(args.hidden - 2, args.hidden + 3))
    sizes.update(hw.propose_sizes(around=(), low=lo, high=args.curve_high,
                                  coarse=args.curve_high, groups=(1, 2, 4)))
    return sorted(s for s in sizes if s >= 2)


def _budget_row(rows, hidden, groups):
    want = am.LGPShuffle(groups).describe()
    for r in rows:
        if r.path == "op" and r.scheme == want and r.hidden == hidden:
            return r
    raise ValueError(
        f"the curve has no op {want} row at hidden {hidden}: the budget "
        "is that configuration's measured latency; measure it (--hidden "
        "is the teacher's size).")


def _confirm(p, budget, swept, dense_rows, args):
    """The Dense pick again, from the budget row and the Dense rows within
    ``--confirm-window`` sizes of the sweep's pick, timed together
    (`Profile.remeasure`, ``--confirm-repeats`` interleaved calls) in
    ``--confirm-rounds`` separate rounds: a sweep's chunks run at different
    moments of a loaded machine, a round robin compares like with like,
    and a row fits only if it is within the budget in every round (its
    worst ratio to the round's budget row is at most 1). Returns (the pick,
    what was timed)."""
    near = [r for r in dense_rows
            if abs(r.hidden - swept.hidden) <= args.confirm_window]
    rounds = [p.remeasure([budget] + near, repeats=args.confirm_repeats,
                          seed=k) for k in range(args.confirm_rounds)]
    limits = [args.budget_ms or again[0].median_ms for again in rounds]
    limit = float(np.mean(limits))
    worst = [dataclasses.replace(r, median_ms=limit * max(
        again[i + 1].median_ms / lim for again, lim in zip(rounds, limits)))
        for i, r in enumerate(near)]
    try:
        pick = hw.choose(worst, budget_ms=limit, tolerance=TOLERANCE)
    except ValueError:  # none fits in every round: the smallest
        pick = min(worst, key=lambda r: r.params)
    rows = [[dict(hidden=r.hidden, path=r.path, scheme=r.scheme,
                  median_ms=r.median_ms, iqr_ms=r.spread_ms) for r in again]
            for again in rounds]
    return pick, dict(budget_ms=limit, budgets_ms=limits, rounds=rows,
                      swept=dataclasses.asdict(swept),
                      repeats=args.confirm_repeats)


def stage_curve(run):
    a = run.args
    if not am.ops.is_available():
        raise SystemExit("The compiled op is not built: "
                         + am.ops.HOW_TO_BUILD)
    p = hw.profile(curve_sizes(a), input_size=ptb.embed_width(a),
                   batch_size=1, steps=a.latency_steps, threads=1, depth=2,
                   schemes=CURVE_SCHEMES, paths=("keras", "op"),
                   repeats=a.curve_repeats, passes=a.curve_passes,
                   cache=run.file("profile"), progress=a.verbose == 1)
    load = [round(x, 2) for x in p.meta.get("load_average_start", [])]
    base = os.path.join(a.out, f"{a.report_name}_curve")
    os.makedirs(a.out, exist_ok=True)
    p.to_json(base + ".json")
    p.plot(base + ".png", **VALLEYS)
    budget = _budget_row(p.rows, a.hidden, a.groups)
    budget_ms = a.budget_ms or budget.median_ms
    best = hw.choose(p, budget_ms=budget_ms, tolerance=TOLERANCE)
    dense_rows = [r for r in p.rows
                  if r.spec == "dense" and r.hidden <= a.hidden]
    swept = hw.choose(dense_rows, budget_ms=budget_ms, tolerance=TOLERANCE)
    dense, confirm = _confirm(p, budget, swept, dense_rows, a)
    found = p.valleys(**VALLEYS)
    with open(base + ".md", "w") as f:
        f.write(f"# PTB LSTM stack: latency against size\n\n"
                f"Two stacked LSTMs, input {ptb.embed_width(a)}, batch 1, "
                f"{a.latency_steps} timesteps, one thread (TF intra/inter-op "
                f"1, the op's OpenMP team 1), median of {a.curve_repeats} "
                f"calls in {a.curve_passes} passes; load average (1, 5, 15 "
                f"min) {load} at the start of the sweep, "
                f"{[round(x, 2) for x in p.meta.get('load_average_end', [])]}"
                " at its end (a shared 2-core VM). Budget: "
                f"{budget_ms:.3f} ms "
                f"({budget.scheme} hidden {budget.hidden} on the op: "
                f"{budget.median_ms:.3f} ms). "
                f"`choose` over every row: {best.path} {best.scheme} hidden "
                f"{best.hidden} ({best.params:,} params, "
                f"{best.median_ms:.3f} ms); over Dense rows: {swept.path} "
                f"hidden {swept.hidden} ({swept.params:,} params, "
                f"{swept.median_ms:.3f} ms); confirmed by timing the budget "
                f"and the Dense rows within {a.confirm_window} sizes again "
                f"together, {a.confirm_rounds} rounds of "
                f"{a.confirm_repeats} calls each: {dense.path} hidden "
                f"{dense.hidden}, the largest within the budget in every "
                f"round (worst ratio to the budget "
                f"{dense.median_ms / confirm['budget_ms']:.3f}).\n\n"
                + p.to_markdown(**VALLEYS))
    run.results["curve"] = dict(
        budget_ms=budget_ms, budget=dataclasses.asdict(budget),
        choice=dataclasses.asdict(best),
        dense_choice=dataclasses.asdict(dense), confirm=confirm, key=p.key,
        valleys=[v.describe() for v in found], meta=p.meta,
        files=[base + e for e in (".json", ".md", ".png")])
    run.save()
    print(f"budget {budget_ms:.3f} ms; choice {best.path} "
          f"{best.scheme} h={best.hidden}; Dense choice {dense.path} "
          f"h={dense.hidden}", flush=True)


# -- students -----------------------------------------------------------


def shrink_teacher(run, teacher, units):
    """The teacher with ``units`` hidden units per LSTM: each layer keeps
    the units whose ISS components (`keras_antman.iss.GroupLasso`) have
    the largest L2 norms; the rest are removed (`iss.shrink`), slicing the
    next layer and the output layer to match."""
    a = run.args
    model = ptb.language_model(run.vocab, a.hidden, ptb.embed_width(a),
                               "hw", a.dropout)
    model.set_weights(teacher.get_weights())
    lasso = iss.GroupLasso(model, strength=0.0)
    norms = {sid: np.asarray(v)
             for sid, v in lasso.squared_norms().items()}
    lasso.zero({sid: np.argsort(n, kind="stable")[:len(n) - units]
                for sid, n in norms.items()})
    lasso.detach()
    return iss.shrink(model)


def target_sparsity(masks, nonzero):
    """The zero fraction of every kernel that leaves ``nonzero`` LSTM
    parameters (kernels plus biases, which are not masked)."""
    kernels = sum(int(np.prod(v.shape)) for _, _, v in masks.kernels)
    biases = sum(int(np.prod(w.shape)) for layer in _lstms(masks.model)
                 for w in layer.weights) - kernels
    return min(max(1.0 - (nonzero - biases) / kernels, 0.0), 0.99)


def _lstms(model):
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.LSTM)]


class _MaskState(keras.callbacks.Callback):
    """Saves the masks and the callbacks' step counters at each chunk's
    end (right after the chunk's backup), so a resumed run continues on the
    same masks and schedule."""

    def __init__(self, masks, grow, prune, path):
        super().__init__()
        self.masks, self.grow, self.prune, self.path = (
            masks, grow, prune, path)

    def restore(self, chunks):
        """Loads the state saved after ``chunks`` chunks; False if the
        saved state is of another chunk (or absent)."""
        if not os.path.exists(self.path + ".json"):
            return False
        with open(self.path + ".json") as f:
            s = json.load(f)
        if s["chunks"] != chunks:
            return False
        with np.load(self.path + ".npz") as f:
            self.masks.set_masks([f[f"m{i}"] for i in
                                  range(len(self.masks.masks))])
        self.grow.step, self.grow.grown = s["grow_step"], s["grown"]
        self.prune.step, self.prune.pruned = s["prune_step"], s["pruned"]
        return True

    def on_epoch_end(self, epoch, logs=None):
        arrays = {f"m{i}": a for i, a in enumerate(self.masks.mask_arrays())}
        np.savez(self.path + ".tmp.npz", **arrays)
        os.replace(self.path + ".tmp.npz", self.path + ".npz")
        with open(self.path + ".tmp", "w") as f:
            json.dump(dict(chunks=epoch + 1, grow_step=self.grow.step,
                           grown=self.grow.grown,
                           prune_step=self.prune.step,
                           pruned=self.prune.pruned), f)
        os.replace(self.path + ".tmp", self.path + ".json")


def _schedule(args):
    """(grow begin, grow end, prune begin, prune end) in steps."""
    s = args.student_steps
    g0, g1, p1 = (round(f * s) for f in args.gp_schedule)
    return g0, g1, g1 + args.gp_frequency, p1


def train_hw(run, teacher, units, name, grow_prune=True):
    a = run.args
    keras.utils.set_random_seed(a.seed)
    student = shrink_teacher(run, teacher, units)
    coeffs = ptb.coefficients(run)
    key = "student " + name
    info = dict(init=f"teacher, ISS-style shrink to {units} units")
    callbacks = []
    masks = None
    if grow_prune:
        masks = gp.KernelMasks(student)
        target = target_sparsity(masks, run.results["match_params"])
        g0, g1, p0, p1 = _schedule(a)
        grow = gp.Grow(masks, iter(run.train.repeat()), a.grow_fraction,
                       begin_step=g0, end_step=g1, frequency=a.gp_frequency)
        prune = gp.Prune(masks, target, begin_step=p0, end_step=p1,
                         frequency=a.gp_frequency)
        state = _MaskState(masks, grow, prune,
                           run.file(f"masks_{ptb._slug(name)}"))
        backup = run.file(f"backup_{ptb._slug(key)}")
        done = ptb.chunks_done(run, key) if os.path.isdir(backup) else -1
        if not state.restore(done):
            # Fresh, or killed between the masks' save and the backup's:
            # start over (the backup's weights need their masks).
            shutil.rmtree(backup, ignore_errors=True)
            masks.prune_to(target)  # the seed: largest magnitudes kept
        callbacks = [grow, prune, state]
        info.update(target_sparsity=target, grow_fraction=a.grow_fraction,
                    grow_steps=[g0, g1], prune_steps=[p0, p1],
                    frequency=a.gp_frequency)
    steps, seconds = ptb.distill(run, teacher, student, coeffs,
                                 a.student_steps, key, callbacks=callbacks)
    if masks is not None:
        info.update(layer_sparsity=masks.layer_sparsity(),
                    grown=grow.grown, pruned=prune.pruned)
        masks.detach()
    return student, steps, seconds, coeffs, a.student_lr, info


def train_dense(run, teacher, units):
    a = run.args
    keras.utils.set_random_seed(a.seed)
    student = ptb.make_student(run, teacher, "small", units)
    lr = a.scratch_lr or a.lr
    steps, seconds = ptb.distill(run, teacher, student, ptb.coefficients(run),
                                 a.student_steps,
                                 f"student dense h={units}", lr=lr)
    return student, steps, seconds, ptb.coefficients(run), lr, dict(
        init="random")


def student_names(units):
    return {
        "hw": f"Hardware-guided h={units} (grow-and-prune)",
        "dense": f"Small dense LSTM h={units} (direct design)",
        "shrunk": f"Dense h={units} from the teacher (no grow-and-prune)",
    }


def stage_students(run, teacher):
    a = run.args
    units = run.results["curve"]["dense_choice"]["hidden"]
    names = student_names(units)
    for kind in a.students or ("hw", "dense"):
        name = names[kind]
        if name in run.results.get("students", {}):
            continue
        if kind == "dense":
            out = train_dense(run, teacher, units)
        else:
            out = train_hw(run, teacher, units, name, kind == "hw")
        student, steps, seconds, coeffs, lr, info = out
        student.save(run.file(f"student_{ptb._slug(name)}.keras"))
        val, test = run.perplexities(student)
        params, macs = ptb.lstm_cost(student)
        nonzero = sum(int(np.count_nonzero(np.asarray(w)))
                      for layer in _lstms(student) for w in layer.weights)
        run.results.setdefault("students", {})[name] = dict(
            kind=kind, units=units, lstm_params=params, lstm_macs=macs,
            nonzero_lstm_params=nonzero,
            mac_reduction=run.results["teacher"]["lstm_macs"] / macs,
            val_ppl=val, test_ppl=test, train_seconds=seconds, steps=steps,
            epochs=steps / run.epoch_steps, coefficients=coeffs, lr=lr,
            schedule=a.student_schedule, **info)
        run.save()
        ptb.finish(run, "student " + name)
        print(f"{name}: val {val:.2f} test {test:.2f}", flush=True)


# -- measure and report ---------------------------------------------------


def lstm_stack(model, steps, width):
    """The model's LSTM layers (stock or structured) as a model of their
    own on ``[1, steps, width]`` inputs: what the latency rows time."""
    layers = [layer for layer in model.layers
              if isinstance(layer, (keras.layers.LSTM, am.StructuredLSTM))]
    return keras.Sequential([keras.Input((steps, width), batch_size=1)]
                            + layers)


def row_files(run):
    """``{row name: .keras file}`` of the rows compared."""
    src = run.args.teacher_run
    files = {"Teacher 2 x LSTM(200)": os.path.join(src, "teacher.keras")}
    for old, new in REUSED.items():
        files[new] = os.path.join(src, f"student_{ptb._slug(old)}.keras")
    for name in run.results.get("students", {}):
        files[name] = run.file(f"student_{ptb._slug(name)}.keras")
    return files


def stage_measure(run):
    a = run.args
    width, steps = ptb.embed_width(a), a.latency_steps
    am.ops.set_num_threads(1)
    candidates, paths = {}, {}
    for name, path in row_files(run).items():
        stack = lstm_stack(keras.models.load_model(path), steps, width)
        structured = any(isinstance(layer, am.StructuredLSTM)
                         for layer in stack.layers)
        if structured:
            candidates[f"{name}|op"] = stack
        else:
            candidates[f"{name}|keras"] = stack
            candidates[f"{name}|op"] = am.compress(stack)
        paths[name] = [k.split("|")[1] for k in candidates
                       if k.startswith(name + "|")]
    x = np.random.default_rng(0).normal(size=(1, steps, width)).astype(
        "float32")
    load = list(os.getloadavg())
    samples = dict(zip(candidates, hw.round_robin_samples(
        [_call(m, x) for m in candidates.values()], a.measure_repeats, 5)))
    out = {}
    for name, ps in paths.items():
        t = {p: _stats(samples[f"{name}|{p}"]) for p in ps}
        best = min(t, key=lambda p: t[p]["median_ms"])
        out[name] = dict(best_path=best, **t[best], paths=t)
    run.results["latency"] = dict(
        rows=out, steps=steps, width=width, batch=1, threads=1,
        repeats=a.measure_repeats, load_average_1_5_15_at_start=load,
        load_average_1_5_15_at_end=list(os.getloadavg()),
        machine=hw.machine_key(1, steps, 1), date=time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime()))
    run.save()
    for name, r in out.items():
        print(f"{name}: {r['median_ms']:.3f} ms ({r['best_path']})")


def _call(model, x):
    """A call of ``model`` on ``x`` as `keras_antman.hardware.measure`
    makes it (inference, in a ``tf.function``)."""
    import tensorflow as tf

    fn = tf.function(lambda v: model(v, training=False))
    x = tf.constant(x)
    return lambda: fn(x)


def _stats(ms):
    """Median, interquartile range and 10th percentile of latencies (ms):
    on a loaded machine the 10th percentile is the least disturbed."""
    p10, q25, q50, q75 = np.percentile(ms, [10, 25, 50, 75])
    return dict(median_ms=float(q50), iqr_ms=float(q75 - q25),
                p10_ms=float(p10), repeats=len(ms))


def _reused_rows(run):
    with open(os.path.join(run.args.teacher_run, "results.json")) as f:
        old = json.load(f)
    rows = {"Teacher 2 x LSTM(200)": dict(old["teacher"], scheme="dense")}
    for o, new in REUSED.items():
        rows[new] = old["students"][o]
    return rows


def _loads(d, when):
    return ", ".join(f"{x:.2f}" for x in
                     d.get(f"load_average_1_5_15_at_{when}", []))


def stage_report(run):
    a = run.args
    res = run.results
    rows = {**_reused_rows(run), **res.get("students", {})}
    lat = res.get("latency", {}).get("rows", {})
    teacher = rows["Teacher 2 x LSTM(200)"]["test_ppl"]
    cv = res.get("curve", {})
    k = res.get("latency", {}).get("machine", cv.get("key", {}))
    table = [
        "| model | test ppl | vs teacher | LSTM params (nonzero) | LSTM "
        "MACs/token | latency median (ms) | IQR (ms) | 10th pct (ms) | "
        "median / AntMan 10x | path | other path, median (ms) | init | "
        "train (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "--- | --- | --- | ---: |"]
    ref = lat.get(REUSED["LGP-Shuffle g=10"], {}).get("median_ms")
    for name, r in rows.items():
        t = lat.get(name, {})
        others = ", ".join(f"{p} {v['median_ms']:.3f}" for p, v in
                           t.get("paths", {}).items() if p != t["best_path"])
        nz = r.get("nonzero_lstm_params", r["lstm_params"])
        table.append(
            f"| {name} | {r['test_ppl']:.2f} | "
            f"{100 * (r['test_ppl'] / teacher - 1):+.1f}% | "
            f"{r['lstm_params']:,} ({nz:,}) | {r['lstm_macs']:,} | "
            + (f"{t['median_ms']:.3f} | {t['iqr_ms']:.3f} | "
               f"{t.get('p10_ms', float('nan')):.3f} | "
               f"{t['median_ms'] / ref if ref else float('nan'):.2f} | "
               f"{t['best_path']} | {others or '-'} |" if t else
               "- | - | - | - | - | - |")
            + f" {r.get('init', '')} | {r.get('train_seconds', 0):.0f} |")
    budget = cv.get("budget", {})
    choice, dense = cv.get("choice", {}), cv.get("dense_choice", {})
    conf = cv.get("confirm", {})
    swept = conf.get("swept", {})
    lines = [
        "# PTB: a hardware-guided student at equal measured latency",
        "",
        "Yin et al.'s hardware-guided training (issue 17) on the PTB word LM "
        "of `examples/ptb_word_lm.py`, next to the AntMan, ISS and dense "
        f"rows of the same teacher (`{a.teacher_run}`, "
        "examples/results/ptb_iss_results.md). Latency is the LSTM stack "
        f"(2 layers, input {ptb.embed_width(a)}), batch 1, "
        f"{a.latency_steps} timesteps, 1 thread, measured on this machine.",
        "",
        f"**Machine.** {k.get('cpu')}, ISA {k.get('isa')}, TF "
        f"{k.get('tensorflow')}, Keras {k.get('keras')}; timing pinned to "
        "one core (`taskset -c 1`), TF intra/inter-op threads "
        f"{k.get('tf_threads')}, op threads 1. Load average (1, 5, 15 min) "
        f"at the start / end of the timing: "
        f"{_loads(res.get('latency', {}), 'start')} / "
        f"{_loads(res.get('latency', {}), 'end')} (a "
        "shared 2-core VM; the timing itself keeps one core busy, so a "
        "load near 1 means nothing else ran).",
        "",
        "## Rows at equal measured latency",
        "",
        *table,
        "",
        "Latency: every row's stack timed interleaved in one process "
        "(`keras_antman.hardware.round_robin_samples`, calls as "
        f"`hardware.measure` makes them: {a.measure_repeats} rounds, 5 "
        "warm-up calls), on each path it has: stock Keras (`keras`) and "
        "the compiled op with Dense schemes (`op`, `compress(stack)`) for "
        "stock LSTMs, zeros included (dense with zeros is this package's "
        "fastest path for the hardware-guided row's unstructured zeros: "
        "1.7x faster than the op's CSR term at its 35% zeros, "
        "bench/results/gp_sparse_path.md), the op for structured ones; "
        "the faster is the "
        "row's (lowest median). IQR: interquartile range; 10th pct: the "
        "10th percentile, the least disturbed by other jobs on this loaded "
        "machine; median / AntMan 10x: the row's median over the "
        "LGP-Shuffle g=10 row's, the latency budget. The stacks return "
        "every timestep (as in the model), so they differ slightly from "
        "the curve's, whose last layer returns the last step only. "
        "A row without latency was trained after the last `measure` "
        "(rerun `--stages measure,report` to time it). "
        "Params: both LSTM layers "
        "(weights + biases), nonzero in brackets; MACs as executed (zeros "
        "included).",
        "",
        "## How the hardware-guided row was chosen and trained",
        "",
        f"- **Curve** (`{a.report_name}_curve.md/.json/.png`): "
        "`hardware.profile(..., depth=2)` over hidden sizes "
        f"{a.curve_fine[0]}-{a.curve_fine[1]} (step 1) and multiples of 8 "
        f"to {a.curve_high}, stock Keras and the op with "
        + ", ".join(s.describe() for s in CURVE_SCHEMES)
        + f"; {a.curve_passes} passes, {a.curve_repeats} calls each.",
        f"- **Budget**: {cv.get('budget_ms', float('nan')):.3f} ms, the "
        f"curve's {budget.get('scheme')} hidden {budget.get('hidden')} on "
        "the op (the AntMan 10x configuration).",
        f"- **`choose(budget_ms=...)`** over every row: {choice.get('path')}"
        f" {choice.get('scheme')} hidden {choice.get('hidden')} "
        f"({choice.get('params', 0):,} params, "
        f"{choice.get('median_ms', float('nan')):.3f} ms); over the Dense "
        f"rows no wider than the teacher: {swept.get('path')} hidden "
        f"{swept.get('hidden')} ({swept.get('params', 0):,} params, "
        f"{swept.get('median_ms', float('nan')):.3f} ms). Confirmed by "
        "timing the budget row and the Dense rows within "
        f"{a.confirm_window} sizes of it again, together, in "
        f"{a.confirm_rounds} rounds of {a.confirm_repeats} interleaved "
        f"calls: {dense.get('path')} hidden {dense.get('hidden')} is the "
        "largest within the budget in every round (worst ratio "
        f"{dense.get('median_ms', 0) / conf.get('budget_ms', 1):.3f}; "
        "budget per round "
        + ", ".join(f"{b:.3f}" for b in conf.get("budgets_ms", []))
        + " ms). Grow and prune "
        "masks Dense kernels (`keras_antman.grow_prune`) and the student "
        "starts from the teacher's units, so the confirmed Dense pick is "
        "the hardware-guided student; the small dense row has the same "
        "dimensions.",
        "- **Init** (the issue leaves it open; the simplest reading): an "
        "ISS-style shrink of the teacher, each LSTM keeping the hidden "
        "units whose ISS components have the largest L2 norms "
        "(`iss.GroupLasso` norms, `iss.shrink`), the next layer and the "
        "output layer sliced to match. The small dense row starts from a "
        "random init (direct design, as in ptb_word_lm.py).",
        "- **Grow and prune** (per weight, `grow_prune.KernelMasks`, "
        "`Grow`, `Prune`, inside the `Distiller`'s fit): the target "
        "sparsity leaves as many nonzero LSTM parameters as the AntMan 10x "
        f"student ({res.get('match_params', 0):,}); the seed mask keeps each "
        "kernel's largest-magnitude entries at that sparsity; grow: "
        f"{a.grow_fraction:g} of each kernel's entries per event, the "
        "dormant ones with the largest |gradient| of the distillation "
        "loss on a training batch; prune: cubic ramp back to the target; "
        f"events every {a.gp_frequency} steps; steps "
        f"{_schedule(a)} = grow begin/end, prune begin/end; the rest "
        "fine-tunes on the final mask.",
        f"- **Training**: {a.student_steps} steps, SGD, cosine from the "
        "student lr, global clip "
        f"{a.clipnorm}, batch {a.batch_size} x {a.num_steps}, `Distiller` "
        f"with the teacher run's calibrated coefficients "
        f"{ptb.coefficients(run)}; teacher-initialised rows lr "
        f"{a.student_lr}, randomly initialised rows lr "
        f"{a.scratch_lr or a.lr} (ptb_word_lm.py's convention).",
        "",
        "## Commands",
        "",
        "From the repository root, in the order they last ran; the "
        "measure command under `taskset -c 1`, the training ones one at a "
        "time (all cores):",
        "",
        *[f"    {c}" for c in res.get("config", {}).get("commands", [])],
        "",
    ]
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"{a.report_name}_results")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump(dict(rows=rows, latency=res.get("latency"),
                       curve=cv, config=res.get("config")), f, indent=1)
    print(f"wrote {base}.md/.json")


# -- driver -----------------------------------------------------------------


def build_parser():
    p = ptb.build_parser()
    p.description = __doc__.splitlines()[0]
    p.set_defaults(run_dir="runs/ptb_hw", report_name="ptb_hardware",
                   stages="curve", optimizer="sgd", lr=35.0,
                   student_lr=10.0, clipnorm=0.143, student_steps=1000,
                   student_schedule="cosine")
    p.add_argument("--teacher-run", default="runs/ptb_iss",
                   help="run dir of ptb_word_lm.py with the teacher, its "
                        "calibration and the AntMan / ISS rows")
    p.add_argument("--latency-steps", type=int, default=35,
                   help="timesteps of the timed input (batch 1)")
    p.add_argument("--curve-fine", type=ptb._ints, default=[32, 128],
                   help="lo,hi: every hidden size in this range is measured")
    p.add_argument("--curve-high", type=int, default=256)
    p.add_argument("--curve-repeats", type=int, default=30)
    p.add_argument("--curve-passes", type=int, default=3)
    p.add_argument("--budget-ms", type=float, default=0.0,
                   help="latency budget of the LSTM stack in ms (default: "
                        "the measured latency of LGP-Shuffle --groups at "
                        "--hidden on the op, the AntMan 10x student)")
    p.add_argument("--confirm-window", type=int, default=16)
    p.add_argument("--confirm-repeats", type=int, default=121)
    p.add_argument("--confirm-rounds", type=int, default=3)
    p.add_argument("--measure-repeats", type=int, default=1001)
    p.add_argument("--grow-fraction", type=float, default=0.05,
                   help="of each kernel's entries grown per event")
    p.add_argument("--gp-frequency", type=int, default=50)
    p.add_argument("--gp-schedule", type=ptb._floats,
                   default=[0.05, 0.2, 0.75],
                   help="grow begin, grow end (= prune begin), prune end, "
                        "as fractions of --student-steps")
    return p


def main(argv=None):
    import tensorflow as tf

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; use {STAGES}")
    timing = {"curve", "measure"} & set(stages)
    if timing and "students" in stages:
        raise SystemExit("run the curve / measure stages (one thread) and "
                         "the students stage (all cores) as separate "
                         "commands")
    if timing:  # before TF's runtime starts (loading data starts it)
        for setter in (tf.config.threading.set_intra_op_parallelism_threads,
                       tf.config.threading.set_inter_op_parallelism_threads):
            try:
                setter(1)
            except RuntimeError:  # already started (a test's process)
                pass
    if len(args.gp_schedule) != 3:
        raise SystemExit("--gp-schedule takes three fractions")
    eager = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(args.eager or eager)
    try:
        return _main(args, argv, stages)
    finally:
        tf.config.run_functions_eagerly(eager)


def _main(args, argv, stages):
    import tensorflow as tf

    run = ptb.Run(args)
    if "teacher" not in run.results:
        with open(os.path.join(args.teacher_run, "results.json")) as f:
            old = json.load(f)
        run.results["teacher"] = old["teacher"]
        run.results["calibration"] = old["calibration"]
        run.results["match_params"] = old["students"][
            f"LGP-Shuffle g={args.groups}"]["lstm_params"]
    config = run.results.setdefault("config", {})
    command = ("python examples/ptb_hardware_guided.py "
               + shlex.join(argv))
    commands = config.setdefault("commands", [])
    if stages != ["report"]:  # in the order they last ran
        if command in commands:
            commands.remove(command)
        commands.append(command)
    config.update(args=vars(args), keras=keras.__version__,
                  tensorflow=tf.__version__, epoch_steps=run.epoch_steps)
    run.save()
    if "curve" in stages:
        stage_curve(run)
    if "students" in stages:
        teacher = keras.models.load_model(
            os.path.join(args.teacher_run, "teacher.keras"))
        stage_students(run, teacher)
    if "measure" in stages:
        stage_measure(run)
    if "report" in stages:
        stage_report(run)
    return run.results


if __name__ == "__main__":
    main()
