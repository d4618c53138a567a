"""Hardware-guided design: measure LSTM latency, then choose from the curve.

Yin et al., *Hardware-Guided Symbiotic Training for Compact, Accurate, yet
Execution-Efficient LSTM* (arXiv 1901.10997): on real hardware an LSTM's
latency is not monotonic in its size ("latency hysteresis"): SIMD widths,
cache sizes and library kernel choices make some larger configurations
faster than smaller ones, so the smallest model is often not the fastest.
Choose dimensions from a measured curve, not from a cost model.

The workflow:

1. `profile` times real inference of one LSTM layer on this machine over a
   fine sweep of hidden sizes (`propose_sizes`), on the stock
   ``keras.layers.LSTM`` and on the compiled op with each scheme, and keeps
   the table on disk keyed by the machine and the software.
2. `valleys` names the hysteresis points of the curve; `choose` picks the
   configuration with the most capacity within a latency budget (or the
   fastest reaching a capacity reduction); `policy` turns that choice into a
   ``compress(model, layers=policy(...))`` policy.
3. `keras_antman.grow_prune` trains sparse kernels (grow and prune), and
   `measure` times the result on the paths the package has.

Readings of the paper's open points (the simplest a user can reproduce):

* a *configuration* is one LSTM layer (input = hidden unless told), batch
  ``batch_size``, ``steps`` timesteps, float32 inference, timed as a whole
  layer call in a ``tf.function`` (what a served model pays, TF dispatch
  included); one scheme serves both products (input and recurrent);
* *capacity* is the parameter count (or MACs, or any function of a row);
* a *valley* is a configuration that some smaller configuration of the
  same curve (same path and scheme) is slower than.

TFLite is not profiled: converting one model per configuration costs
seconds each, more than timing it (`keras_antman.export` gives the
portable SavedModel if you want to time it yourself).
"""

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings

import numpy as np
import tensorflow as tf

from keras_antman import ops as compiled_ops
from keras_antman import schemes as schemes_lib
from keras_antman._keras import keras

PATHS = ("keras", "op", "portable", "tflite")
DEFAULT_SCHEMES = (
    schemes_lib.Dense(),
    schemes_lib.LGPShuffle(2),
    schemes_lib.LGPShuffle(4),
    schemes_lib.LGPShuffle(8),
    schemes_lib.LGPDense(4),
    schemes_lib.LowRankLGP(4, 4, 2),
)
_CACHE_ENV = "KERAS_ANTMAN_CACHE"


# -- the machine -----------------------------------------------------------


def cache_sizes():
    """``{"L1": bytes, "L2": bytes, "L3": bytes}`` of CPU 0's data caches,
    read from sysfs (empty where sysfs has no cache information)."""
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    if not os.path.isdir(base):
        return out
    for entry in sorted(os.listdir(base)):
        def read(name, entry=entry):
            with open(os.path.join(base, entry, name)) as f:
                return f.read().strip()
        try:
            if read("type") == "Instruction":
                continue
            size = read("size")
            level = f"L{read('level')}"
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        digits = size[:-1] if size[-1] in "KMG" else size
        out[level] = int(digits) * scale
    return out


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (else `platform`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa():
    try:
        return compiled_ops.instruction_set()
    except compiled_ops.CompiledOpsUnavailableError:
        return "op unavailable"


def _set_tf_threads(threads):
    """Ask TF for ``threads`` intra/inter-op threads; TF refuses once its
    runtime has started, so return what it actually uses (0: TF's default,
    all cores)."""
    conf = tf.config.threading
    for setter in (conf.set_intra_op_parallelism_threads,
                   conf.set_inter_op_parallelism_threads):
        try:
            setter(threads)
        except RuntimeError:
            pass
    return (conf.get_intra_op_parallelism_threads(),
            conf.get_inter_op_parallelism_threads())


def machine_key(batch_size=1, steps=100, threads=1, depth=1):
    """What a profile depends on: the persisted file is reused only when
    every entry is equal (``depth`` is an entry only when it is not 1, so
    files of single-layer profiles stay valid)."""
    from keras_antman import __version__

    key = {
        "cpu": cpu_model(),
        "isa": _isa(),
        "threads": int(threads),
        "tf_threads": list(_set_tf_threads(threads)),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_antman": __version__,
        "batch_size": int(batch_size),
        "steps": int(steps),
    }
    if int(depth) != 1:
        key["depth"] = int(depth)
    return key


# -- the sweep ---------------------------------------------------------------


def propose_sizes(around=(256, 512), low=64, high=1024, coarse=64,
                  groups=(1,), caches=None):
    """Hidden sizes fine enough to show SIMD-width and cache effects.

    Args:
        around: sizes of interest; around each: every size within +-2
            (steps of 1), multiples of 8 within +-32 and of 16 within +-64.
        low, high: the range kept (inclusive).
        coarse: multiples of this over the whole range.
        groups: for each ``g``, the sizes where the fused recurrent weights
            of a ``g``-group LSTM (``16 h^2 / g`` bytes, float32) cross
            each cache of ``caches``: the largest ``h`` that fits and
            ``h + 1``.
        caches: ``{"L2": bytes, ...}``; default: this machine's L2 and L3
            (`cache_sizes`).

    Returns:
        Sorted list of distinct sizes.
    """
    sizes = set(range(coarse, high + 1, coarse))
    for s in around:
        sizes.update(range(s - 2, s + 3))
        sizes.update(range(s - 32, s + 33, 8))
        sizes.update(range(s - 64, s + 65, 16))
    if caches is None:
        caches = {k: v for k, v in cache_sizes().items() if k in ("L2", "L3")}
    for g in groups:
        for size in caches.values():
            h = math.isqrt(g * size // 16)
            sizes.update((h, h + 1))
    return sorted(s for s in sizes if low <= s <= high)


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured configuration.

    Attributes:
        path: ``"keras"`` (stock ``keras.layers.LSTM``), ``"op"`` (a
            `StructuredLSTM` on the compiled op), ``"portable"`` (a
            `StructuredLSTM` on stock TF ops) or ``"tflite"`` (the TFLite
            interpreter, XNNPACK, on the portable export of that layer).
        scheme: the scheme's text (``"LGPShuffle(groups=4)"``).
        spec: the scheme as spec text (`keras_antman.schemes.from_spec`).
        hidden, input: the layer's units and input features (of the first
            layer, for a stack: `profile`'s ``depth``).
        params: weights of the layer (both products and the bias), summed
            over the layers of a stack.
        macs: multiply-adds of both products per timestep and example
            (summed over a stack's layers).
        median_ms: median latency of one layer call.
        spread_ms: interquartile range of the latencies.
        repeats: how many timed calls.
    """

    path: str
    scheme: str
    spec: str
    hidden: int
    input: int
    params: int
    macs: int
    median_ms: float
    spread_ms: float
    repeats: int

    @property
    def config(self):
        """What identifies the configuration: path, spec and dims."""
        return (self.path, self.spec, self.hidden, self.input)

    def make_scheme(self):
        """The `Scheme` of this row."""
        return schemes_lib.from_spec(self.spec)


def _spec(scheme):
    args = ",".join(f"{k}={v}" for k, v in scheme.get_config().items())
    name = type(scheme).spec_name
    if name is None:
        raise ValueError(
            f"{scheme.describe()} has no `spec_name`, so a profile cannot "
            "store it; give its class a `spec_name`."
        )
    return f"{name}:{args}" if args else name


def _cost(scheme, n, h, depth=1):
    params = macs = 0
    for i in range(depth):
        p_in, m_in = scheme.cost(n if i == 0 else h, 4 * h)
        p_rec, m_rec = scheme.cost(h, 4 * h)
        params += p_in + p_rec + 4 * h
        macs += m_in + m_rec
    return params, macs


def _valid(scheme, n, h):
    try:
        scheme.check(n, 4 * h)
        scheme.check(h, 4 * h)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class Timing:
    """Median and interquartile range of repeated calls, in ms."""

    median_ms: float
    spread_ms: float
    repeats: int


def round_robin_samples(fns, repeats=21, warmup=2):
    """Latencies (ms) of callables timed interleaved: every repeat calls
    each once, in turn.

    Each callable is called ``warmup`` times first. Repeat ``r`` starts at
    callable ``r mod len(fns)``, so no callable always follows the same
    one, and a slow drift of the machine (another job starting) spreads
    over all of them instead of biasing the last ones.

    Returns:
        One list of ``repeats`` latencies per callable.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    n = len(fns)
    for r in range(repeats):
        for k in range(n):
            i = (r + k) % n
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(1e3 * (time.perf_counter() - t0))
    return times


def _timing(samples):
    q25, q50, q75 = np.percentile(np.asarray(samples), [25, 50, 75])
    return Timing(float(q50), float(q75 - q25), len(samples))


def time_round_robin(fns, repeats=21, warmup=2):
    """`round_robin_samples` reduced to one `Timing` (median, IQR) per
    callable."""
    return [_timing(t) for t in round_robin_samples(fns, repeats, warmup)]


class _QuietRetracing:
    """Silences TF's retracing warning while many one-off functions are
    traced (one per configuration, by design)."""

    def __enter__(self):
        self.logger = tf.get_logger()
        self.level = self.logger.level
        self.logger.setLevel("ERROR")

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _layer_fn(layer, x):
    x = tf.constant(x)
    layer(x)
    fn = tf.function(lambda v: layer(v))
    return lambda: fn(x)


def _tflite_layer_fn(layer, x, threads, folder):
    """Times ``layer`` as TFLite: the portable export of a model around it,
    converted with built-in ops only, run by the interpreter."""
    from keras_antman import benchmark
    from keras_antman.export import export_tflite

    inputs = keras.Input(batch_shape=x.shape)
    model = keras.Model(inputs, layer(inputs))
    path = export_tflite(model, os.path.join(folder, f"{id(layer)}.tflite"),
                         batch_size=x.shape[0])
    return benchmark._tflite_fn(path, x, int(threads))


def _make_layer(path, scheme, n, h, batch_size, steps, seed, depth=1):
    """One LSTM layer (``depth`` 1) or a ``keras.Sequential`` stack of
    ``depth`` (every layer but the last returns sequences), built on
    ``[batch_size, steps, n]`` with seeded random weights."""

    def one(return_sequences):
        if path == "keras":
            return keras.layers.LSTM(h, return_sequences=return_sequences)
        from keras_antman.layers import StructuredLSTM

        kernel = "compiled" if path == "op" else "portable"  # tflite too
        return StructuredLSTM(h, input_scheme=scheme,
                              recurrent_scheme=scheme, kernel=kernel,
                              return_sequences=return_sequences)

    if depth == 1:
        layer = one(False)
    else:
        layer = keras.Sequential([one(i < depth - 1) for i in range(depth)])
    layer.build((batch_size, steps, n))
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.normal(scale=0.05, size=w.shape).astype("float32"))
    return layer


# -- the profile ----------------------------------------------------------


@dataclasses.dataclass
class Profile:
    """Measured latencies of LSTM configurations on one machine.

    Attributes:
        key: what the measurements depend on (`machine_key`).
        rows: the measured `Row` s.
        meta: context (date, load average before and after, caches).
        measured: how many configurations this call measured (0 when every
            row came from the persisted file); not persisted.
        file: the persisted file, if any.
    """

    key: dict
    rows: list
    meta: dict = dataclasses.field(default_factory=dict)
    measured: int = 0
    file: str = None

    def valleys(self, tolerance=0.0, beyond_spread=False):
        """`valleys` of the rows."""
        return valleys(self.rows, tolerance=tolerance,
                       beyond_spread=beyond_spread)

    def remeasure(self, rows, repeats=61, warmup=2, seed=0):
        """Times ``rows`` again, all interleaved in one round robin, on
        this machine with this profile's batch and steps (to confirm a
        valley: give it the valley and the smaller rows it beats).

        Returns:
            New `Row` s (same configurations, new timings), in order; the
            profile itself is unchanged.
        """
        rows = [_as_row(r) for r in rows]
        b, t = self.key.get("batch_size", 1), self.key.get("steps", 100)
        depth = self.key.get("depth", 1)
        fns = []
        for i, r in enumerate(rows):
            layer = _make_layer(r.path, r.make_scheme(), r.input, r.hidden,
                                b, t, seed + i, depth)
            x = np.random.default_rng(seed).normal(
                size=(b, t, r.input)).astype("float32")
            fns.append(_layer_fn(layer, x))
        with _QuietRetracing():
            times = time_round_robin(fns, repeats, warmup)
        return [dataclasses.replace(r, median_ms=m.median_ms,
                                    spread_ms=m.spread_ms, repeats=m.repeats)
                for r, m in zip(rows, times)]

    def to_json(self, path=None):
        """The profile as JSON text; also written to ``path`` if given."""
        text = json.dumps(
            {"key": self.key, "meta": self.meta,
             "rows": [dataclasses.asdict(r) for r in self.rows]},
            indent=1)
        if path is not None:
            _write_atomic(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path):
        """A `Profile` from `to_json` text or a file holding it."""
        text = text_or_path
        if not str(text).lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        data = json.loads(text)
        return cls(key=data["key"], meta=data.get("meta", {}),
                   rows=[Row(**r) for r in data["rows"]])

    def to_markdown(self, tolerance=0.0, beyond_spread=False):
        """A Markdown table of the rows (valleys in bold), then the list of
        valleys (`valleys` with these arguments)."""
        found = valleys(self.rows, tolerance=tolerance,
                        beyond_spread=beyond_spread)
        valley_configs = {v.row.config for v in found}
        k = self.key
        lines = [
            f"Machine: {k.get('cpu')}, ISA {k.get('isa')}; op threads "
            f"{k.get('threads')}, TF intra/inter-op threads "
            f"{k.get('tf_threads')}; TF {k.get('tensorflow')}, Keras "
            f"{k.get('keras')}, keras-antman {k.get('keras_antman')}; "
            f"batch {k.get('batch_size')}, {k.get('steps')} timesteps.",
            "",
            "| path | scheme | hidden | input | params | MACs/step | "
            "median (ms) | IQR (ms) | valley |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in sorted(self.rows, key=lambda r: (r.path, r.scheme,
                                                  r.hidden, r.input)):
            v = r.config in valley_configs
            ms = f"**{r.median_ms:.3f}**" if v else f"{r.median_ms:.3f}"
            lines.append(
                f"| {r.path} | {r.scheme} | {r.hidden} | {r.input} | "
                f"{r.params:,} | {r.macs:,} | {ms} | {r.spread_ms:.3f} | "
                f"{'yes' if v else ''} |")
        lines += ["", f"Valleys (tolerance {tolerance:g}"
                  f"{', beyond the spreads' if beyond_spread else ''}): a "
                  "configuration that a smaller one of the same path and "
                  "scheme is slower than.", ""]
        lines += [f"- {v.describe()}" for v in found] or ["- none"]
        return "\n".join(lines) + "\n"

    def plot(self, path, tolerance=0.0, beyond_spread=False):
        """Writes a PNG of latency against hidden size, one line per path
        and scheme, valleys circled and the sizes where Dense recurrent
        weights cross L2 and L3 marked. Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        curves = {}
        for r in self.rows:
            curves.setdefault((r.path, r.scheme), []).append(r)
        for (p, s), rows in sorted(curves.items()):
            rows.sort(key=lambda r: r.hidden)
            label = f"{p}: {s}"
            line, = ax.plot([r.hidden for r in rows],
                            [r.median_ms for r in rows], marker=".",
                            lw=1, label=label)
            ax2.plot([r.params for r in rows], [r.median_ms for r in rows],
                     marker=".", lw=1, color=line.get_color(), label=label)
        found = valleys(self.rows, tolerance=tolerance,
                        beyond_spread=beyond_spread)
        if found:
            kw = dict(s=90, facecolors="none", edgecolors="red", zorder=5)
            ax.scatter([v.row.hidden for v in found],
                       [v.row.median_ms for v in found], label="valley",
                       **kw)
            ax2.scatter([v.row.params for v in found],
                        [v.row.median_ms for v in found], **kw)
        caches = self.meta.get("caches", {})
        hs = [r.hidden for r in self.rows]
        for level, size in caches.items():
            h = math.sqrt(size / 16)
            if level in ("L2", "L3") and hs and min(hs) <= h <= max(hs):
                ax.axvline(h, ls=":", color="gray")
                ax.text(h, ax.get_ylim()[1], f" Dense W_rec = {level}",
                        rotation=90, va="top", fontsize=7, color="gray")
        k = self.key
        ax.set_xlabel(f"hidden size (input = {_input_text(self.rows)}; "
                      f"batch {k.get('batch_size')}, {k.get('steps')} steps)")
        ax.set_ylabel("median latency of one layer call (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax2.set_xlabel("parameters")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"LSTM latency on {k.get('cpu')} ({k.get('threads')} "
                     "thread(s)); red circles: valleys", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _input_text(rows):
    if all(r.input == r.hidden for r in rows):
        return "hidden"
    return "/".join(sorted({str(r.input) for r in rows}))


def _write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def default_cache_dir():
    """``$KERAS_ANTMAN_CACHE``, else ``$XDG_CACHE_HOME/keras_antman``, else
    ``~/.cache/keras_antman``."""
    if os.environ.get(_CACHE_ENV):
        return os.environ[_CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "keras_antman")


def profile_file(key, cache_dir=None):
    """The file a profile with ``key`` is persisted in."""
    digest = hashlib.sha1(
        json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(),
                        f"lstm_profile_{digest}.json")


def profile(hidden_sizes=None, input_size=None, batch_size=1, steps=100,
            threads=1, schemes=DEFAULT_SCHEMES, paths=("keras", "op"),
            repeats=21, warmup=2, cache=None, chunk=12, passes=1,
            progress=True, seed=0, depth=1):
    """Measures LSTM inference latency on this machine.

    For every hidden size, path and scheme (configurations a scheme cannot
    build at a size are skipped), one LSTM layer is built with seeded
    random weights and called in a ``tf.function`` on a constant input
    ``[batch_size, steps, input]``. Configurations are timed in chunks of
    ``chunk`` (neighbouring sizes together): ``warmup`` calls each, then
    ``repeats`` rounds that call every configuration of the chunk once, in
    rotating order (`time_round_robin`); a row keeps the median and the
    interquartile range. With ``passes > 1`` the whole sweep runs
    ``passes`` times (alternately from small to large sizes and back), each
    pass timing every configuration ``ceil(repeats / passes)`` times, and
    a row keeps the median and IQR of all its calls: a burst of load from
    another process then lands on every size instead of on one chunk of
    neighbouring sizes (where it would draw false valleys).

    Persistence: rows are kept in a JSON file per `machine_key` (CPU model,
    the op's instruction set, thread counts, TF, Keras and package
    versions, batch, steps) under ``cache``. A configuration already in
    that file with at least ``repeats`` timed calls is not measured again;
    the file is rewritten after every chunk, so an interrupted profile
    resumes where it stopped (with ``passes > 1``, configurations whose
    passes were not all done are measured again from scratch). Rows of
    different calls were measured at different times (and machine loads):
    compare rows of one call when the difference matters.

    Threads: the op uses ``threads`` OpenMP threads
    (`keras_antman.ops.set_num_threads`, left set afterwards). TF's
    intra/inter-op pools are set to ``threads`` too, but TF only allows
    that before its runtime starts: the key records what TF really uses,
    so call `profile` early in a fresh process (as ``bench/latency_curve.py``
    does) for one-thread Keras times.

    Args:
        hidden_sizes: the sizes; default `propose_sizes()`.
        input_size: input features; default: equal to each hidden size.
        batch_size, steps: the input's batch and timesteps.
        threads: threads of the op (and of TF, see above).
        schemes: `Scheme` s (or spec texts) for the ``"op"`` and
            ``"portable"`` paths; the ``"keras"`` path is always Dense.
        paths: any of ``"keras"``, ``"op"``, ``"portable"``, ``"tflite"``
            (the layer's portable export converted to TFLite with built-in
            ops and run by the interpreter with ``threads`` threads; a
            conversion per configuration, a few seconds each). Without the
            compiled op the ``"op"`` path is skipped with a warning.
        repeats, warmup: timed and untimed calls per configuration.
        cache: a directory for the persisted file; ``None``: the default
            (`default_cache_dir`); ``False``: do not persist.
        chunk: configurations timed together.
        passes: sweeps over all configurations (see above).
        progress: show a `keras.utils.Progbar` over the configurations.
        seed: of the random weights.
        depth: LSTM layers per configuration. Above 1, a stack as in a
            stacked model (the first layer reads ``input_size`` features,
            the others the previous layer's ``hidden``; every layer but the
            last returns sequences), timed as one call; rows then give the
            stack's parameters and MACs. ``depth`` is part of the key.

    Returns:
        A `Profile` of the requested configurations.

    Raises:
        ValueError: an unknown path, or an empty sweep.
    """
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(
            f"`paths` must be among {PATHS}. Received unknown {unknown}.")
    schemes = [schemes_lib.get(s) for s in schemes]
    paths = list(paths)
    if "op" in paths and not compiled_ops.is_available():
        warnings.warn(
            "profile: the compiled op is not available, so the 'op' path is "
            "skipped. " + compiled_ops.HOW_TO_BUILD, RuntimeWarning,
            stacklevel=2)
        paths.remove("op")
    sizes = sorted(set(hidden_sizes or propose_sizes()))
    configs = []
    for h in sizes:
        n = input_size or h
        for p in paths:
            for s in ([schemes_lib.Dense()] if p == "keras" else schemes):
                if _valid(s, n, h):
                    configs.append((p, s, h, n))
    if not configs:
        raise ValueError(
            "profile: no configuration to measure (every scheme is invalid "
            f"for the sizes {sizes}).")

    if compiled_ops.is_available():
        compiled_ops.set_num_threads(int(threads))
    if int(depth) < 1:
        raise ValueError(
            f"profile: `depth` must be >= 1. Received: depth={depth!r}")
    key = machine_key(batch_size, steps, threads, depth)
    file = None if cache is False else profile_file(
        key, None if cache is None else str(cache))
    stored = {}
    meta = {}
    if file and os.path.exists(file):
        old = Profile.from_json(file)
        if old.key == key:
            stored = {r.config: r for r in old.rows}
            meta = old.meta
    meta.setdefault("caches", cache_sizes())

    def cfg_key(c):
        return (c[0], _spec(c[1]), c[2], c[3])

    todo = [c for c in configs
            if cfg_key(c) not in stored
            or stored[cfg_key(c)].repeats < repeats]
    if todo:
        # Load and date of the latest call that measured something.
        meta["load_average_start"] = list(os.getloadavg())
        meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                        time.gmtime())
    passes = max(int(passes), 1)
    bar = (keras.utils.Progbar(len(todo) * passes)
           if progress and todo else None)
    with _QuietRetracing():
        _measure_chunks(todo, chunk, passes, stored, meta, key, file, bar,
                        batch_size, steps, repeats, warmup, seed,
                        int(depth), threads)
    rows = [stored[cfg_key(c)] for c in configs]
    return Profile(key, rows, meta, measured=len(todo), file=file)


def _measure_chunks(todo, chunk, passes, stored, meta, key, file, bar,
                    batch_size, steps, repeats, warmup, seed, depth=1,
                    threads=1):
    per_pass = -(-repeats // passes)
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    samples = {}
    done = 0
    for p in range(passes):
        for part in (chunks if p % 2 == 0 else chunks[::-1]):
            fns = []
            folder = tempfile.mkdtemp(prefix=".antman-profile-")
            for i, (path, s, h, n) in enumerate(part):
                layer = _make_layer(path, s, n, h, batch_size, steps,
                                    seed + i, depth)
                x = np.random.default_rng(seed).normal(
                    size=(batch_size, steps, n)).astype("float32")
                fns.append(_tflite_layer_fn(layer, x, threads, folder)
                           if path == "tflite" else _layer_fn(layer, x))
            for c, t in zip(part, round_robin_samples(fns, per_pass,
                                                      warmup)):
                path, s, h, n = c
                acc = samples.setdefault((path, _spec(s), h, n), [])
                acc.extend(t)
                params, macs = _cost(s, n, h, depth)
                timing = _timing(acc)
                row = Row(path, s.describe(), _spec(s), h, n, params, macs,
                          timing.median_ms, timing.spread_ms, timing.repeats)
                stored[row.config] = row
            done += len(part)
            meta["load_average_end"] = list(os.getloadavg())
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                             time.gmtime())
            if file:
                os.makedirs(os.path.dirname(file), exist_ok=True)
                Profile(key, list(stored.values()), meta).to_json(file)
            if bar is not None:
                bar.update(done)
            del fns
            shutil.rmtree(folder, ignore_errors=True)


# -- reading the curve ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Valley:
    """A configuration faster than smaller ones of its curve.

    Attributes:
        row: the configuration.
        beats: the smaller configurations of the same path and scheme
            that are slower, smallest first.
    """

    row: Row
    beats: tuple

    def describe(self):
        r = self.row
        worst = max(self.beats, key=lambda b: b.median_ms)
        return (f"{r.path} {r.scheme} hidden {r.hidden}: {r.median_ms:.3f} "
                f"ms, faster than {len(self.beats)} smaller size(s), e.g. "
                f"hidden {worst.hidden} at {worst.median_ms:.3f} ms "
                f"({worst.median_ms / r.median_ms:.2f}x slower)")


def _as_row(r):
    return r if isinstance(r, Row) else Row(**r)


def _capacity_fn(capacity):
    if callable(capacity):
        return capacity
    if capacity in ("params", "macs"):
        return lambda r: getattr(r, capacity)
    raise ValueError(
        "`capacity` must be 'params', 'macs' or a callable(row) -> number. "
        f"Received: capacity={capacity!r}")


def valleys(rows, tolerance=0.0, capacity="params", beyond_spread=False):
    """The non-monotonic points of latency curves (pure function).

    Rows are grouped into curves by path and scheme (and input size). A
    configuration is a valley if some configuration of the same curve
    with less capacity is slower by more than ``tolerance``:
    ``smaller.median_ms > (1 + tolerance) * row.median_ms``. Measurements
    are noisy: give a ``tolerance`` (0.05: 5% slower) and/or
    ``beyond_spread=True`` (also ``smaller.median_ms - smaller.spread_ms / 2
    > row.median_ms + row.spread_ms / 2``: the interquartile bands, taken
    as centred on the medians, do not overlap) to keep only clear valleys.

    Args:
        rows: `Row` s (or their dicts).
        tolerance: relative margin, >= 0.
        capacity: ``"params"``, ``"macs"`` or ``callable(row)``: what
            "smaller" means.
        beyond_spread: require the spreads to be apart too (see above).

    Returns:
        List of `Valley`, in the order of the rows.
    """
    rows = [_as_row(r) for r in rows]
    cap = _capacity_fn(capacity)
    curves = {}
    for r in rows:
        curves.setdefault(_curve(r), []).append(r)
    out = []
    for r in rows:
        curve = curves[_curve(r)]
        beats = sorted(
            (o for o in curve if cap(o) < cap(r)
             and o.median_ms > (1.0 + tolerance) * r.median_ms
             and (not beyond_spread
                  or o.median_ms - o.spread_ms / 2
                  > r.median_ms + r.spread_ms / 2)),
            key=cap)
        if beats:
            out.append(Valley(r, tuple(beats)))
    return out


def _curve(r):
    return (r.path, r.spec, "=hidden" if r.input == r.hidden else r.input)


def _rows_of(profile_or_rows):
    rows = getattr(profile_or_rows, "rows", profile_or_rows)
    return [_as_row(r) for r in rows]


def choose(profile, budget_ms=None, reduction=None, baseline_hidden=None,
           capacity="params", paths=None, tolerance=0.0):
    """The configuration to build, read from a measured profile.

    Give exactly one of:

    * ``budget_ms``: among the configurations whose median latency is at
      most ``budget_ms``, the one with the most capacity; on equal
      capacity a valley (`valleys`) wins, then the faster one;
    * ``reduction``: among the configurations with at most
      ``capacity(baseline) / reduction`` capacity, where the baseline is
      the Dense configuration at ``baseline_hidden``, the fastest; on
      equal latency the one with more capacity. This is where latency
      hysteresis pays: the smallest configuration is often not it.

    Args:
        profile: a `Profile` or a list of rows.
        budget_ms: latency budget of one layer call, in ms.
        reduction: capacity reduction to reach, e.g. 4.
        baseline_hidden: hidden size of the Dense baseline; default: the
            largest hidden size with a Dense row.
        capacity: ``"params"``, ``"macs"`` or ``callable(row)``.
        paths: restrict to these paths (default: every path measured).
        tolerance: of `valleys` (ties only).

    Returns:
        The chosen `Row`.

    Raises:
        ValueError: not exactly one of ``budget_ms`` and ``reduction``, no
            baseline row, or no configuration meets the request (the
            message gives the closest one).
    """
    if (budget_ms is None) == (reduction is None):
        raise ValueError(
            "choose: give exactly one of `budget_ms` and `reduction`. "
            f"Received: budget_ms={budget_ms!r}, reduction={reduction!r}")
    cap = _capacity_fn(capacity)
    rows = _rows_of(profile)
    if paths is not None:
        rows = [r for r in rows if r.path in paths]
    if not rows:
        raise ValueError(f"choose: no measured row on paths {paths}.")
    valley_configs = {v.row.config for v in valleys(rows, tolerance,
                                                    capacity)}
    if budget_ms is not None:
        fit = [r for r in rows if r.median_ms <= budget_ms]
        if not fit:
            fastest = min(rows, key=lambda r: r.median_ms)
            raise ValueError(
                f"choose: no measured configuration runs within "
                f"budget_ms={budget_ms}; the fastest is {fastest.path} "
                f"{fastest.scheme} hidden {fastest.hidden} at "
                f"{fastest.median_ms:.3f} ms.")
        return max(fit, key=lambda r: (cap(r), r.config in valley_configs,
                                       -r.median_ms))
    if not reduction > 0:
        raise ValueError(
            f"choose: `reduction` must be > 0. Received: {reduction!r}")
    dense = [r for r in rows if r.spec == "dense"]
    if baseline_hidden is None and dense:
        baseline_hidden = max(r.hidden for r in dense)
    base = [r for r in dense if r.hidden == baseline_hidden]
    if not base:
        raise ValueError(
            f"choose: no Dense row at baseline_hidden={baseline_hidden}; "
            f"Dense rows exist at {sorted({r.hidden for r in dense})}.")
    limit = cap(base[0]) / reduction
    fit = [r for r in rows if cap(r) <= limit]
    if not fit:
        smallest = min(rows, key=cap)
        raise ValueError(
            f"choose: no measured configuration reaches reduction="
            f"{reduction} (capacity <= {limit:.0f}); the smallest is "
            f"{smallest.scheme} hidden {smallest.hidden} with "
            f"{cap(smallest)}.")
    return min(fit, key=lambda r: (r.median_ms, -cap(r)))


def _layer_dims(layer):
    """``(input features, units)`` of a built LSTM layer, or None."""
    cell = getattr(layer, "cell", None)
    if cell is None or not layer.built:
        return None
    if hasattr(cell, "input_matrix"):
        return cell.input_matrix.input_dim, cell.units
    return int(cell.kernel.shape[0]), cell.units


def policy(profile, budget_ms=None, reduction=None, capacity="params",
           on_missing="raise", paths=("op", "keras"), tolerance=0.0):
    """A ``compress(model, layers=...)`` policy that picks each LSTM's
    scheme from measured latencies.

    For each LSTM layer (stock or structured) it takes the rows of the
    profile at the layer's hidden size (and its input size, when the
    profile measured that input size; else any input size), keeps the
    schemes that fit the layer's dims and calls `choose` on them: with
    ``budget_ms`` (a per-layer budget: for ``k`` layers in a row, pass
    ``total / k``) the most capacity within the budget, with ``reduction``
    the fastest configuration with ``1/reduction`` of the layer's own Dense
    capacity. An ``"op"`` row becomes ``(scheme, scheme)`` (both products);
    a ``"keras"`` row (the stock layer was the best choice) leaves the layer
    as it is. GRU layers are left as they are (profiles measure LSTMs).

    Args:
        profile: a `Profile`.
        budget_ms, reduction, capacity, tolerance: see `choose`.
        on_missing: what to do for a hidden size the profile did not
            measure: ``"raise"`` (a `ValueError` naming the layer and the
            measured sizes) or ``"nearest"`` (use the nearest measured
            size, the larger on a tie; its latencies are not this layer's).
        paths: the paths to choose from (``"portable"`` and ``"tflite"``
            rows are never what `compress` builds on a machine with the
            op).

    Returns:
        ``callable(layer) -> (input_scheme, recurrent_scheme) or None``;
        its ``choices`` attribute maps each layer's name to the chosen
        `Row` once `compress` has called it.
    """
    if on_missing not in ("raise", "nearest"):
        raise ValueError(
            "`on_missing` must be 'raise' or 'nearest'. Received: "
            f"on_missing={on_missing!r}")
    depth = getattr(profile, "key", {}).get("depth", 1)
    if depth != 1:
        raise ValueError(
            f"policy: the profile times stacks of {depth} LSTMs "
            "(`profile(depth=...)`), but a policy picks each layer's scheme "
            "from single-layer latencies; profile with depth=1.")
    rows = [r for r in _rows_of(profile) if r.path in paths]

    def pick(layer):
        if not isinstance(getattr(layer, "cell", None),
                          (keras.layers.LSTMCell, _structured_lstm_cell())):
            return None
        dims = _layer_dims(layer)
        if dims is None:
            raise ValueError(
                f"policy: layer '{layer.name}' is not built; build the model "
                "before compressing it.")
        n, h = dims
        sizes = sorted({r.hidden for r in rows})
        at = h
        if h not in sizes:
            if on_missing == "raise" or not sizes:
                raise ValueError(
                    f"policy: layer '{layer.name}' has {h} units, a size "
                    f"the profile did not measure (it has {sizes}). Profile "
                    f"that size (`profile(hidden_sizes=[{h}], "
                    f"input_size={n})`) or pass on_missing='nearest'.")
            at = min(sizes, key=lambda s: (abs(s - h), -s))
        cand = [r for r in rows if r.hidden == at]
        if any(r.input == n for r in cand):
            cand = [r for r in cand if r.input == n]
        cand = [r for r in cand if _valid(r.make_scheme(), n, h)]
        if not cand:
            raise ValueError(
                f"policy: no measured scheme at hidden {at} fits layer "
                f"'{layer.name}' ({n} -> 4 x {h}).")
        row = choose(cand, budget_ms=budget_ms, reduction=reduction,
                     baseline_hidden=at, capacity=capacity,
                     tolerance=tolerance)
        pick.choices[layer.name] = row
        if row.path == "keras":
            return None
        s = row.make_scheme()
        return (s, s)

    pick.choices = {}
    return pick


def _structured_lstm_cell():
    from keras_antman.layers import StructuredLSTMCell

    return StructuredLSTMCell


# -- measuring a model ------------------------------------------------------


def measure(models, inputs, repeats=21, warmup=2):
    """Inference latency of models, timed as `profile` times layers.

    Each model is called with ``training=False`` in a ``tf.function`` on
    the constant ``inputs``; with several models the calls are interleaved
    (`time_round_robin`), so they share the machine's state.

    Args:
        models: a model, or ``{name: model}``.
        inputs: one batch (array or tensor).
        repeats, warmup: timed and untimed calls per model.

    Returns:
        A `Timing`, or ``{name: Timing}``.

    Example:

    >>> t = am.hardware.measure({"stock": model, "op": am.compress(model)},
    ...                         x[:1])
    """
    single = not isinstance(models, dict)
    named = {"model": models} if single else dict(models)
    x = tf.constant(inputs)
    fns = []
    for m in named.values():
        f = tf.function(lambda v, m=m: m(v, training=False))
        fns.append(lambda f=f: f(x))
    with _QuietRetracing():
        times = dict(zip(named, time_round_robin(fns, repeats, warmup)))
    return times["model"] if single else times


def fastest_path(model, inputs, repeats=21, warmup=2):
    """The faster of ``model`` as it is (stock layers, zeros included) and
    ``compress(model)`` with Dense schemes (the compiled op), measured.

    Sparsity from `keras_antman.grow_prune` is unstructured: neither path
    skips the zeros, so this is how a sparse model runs fastest here.

    Returns:
        ``(model, {"keras": Timing, "op": Timing})``: the faster model and
        both timings (no ``"op"`` entry without the compiled op).
    """
    from keras_antman.compress import compress

    candidates = {"keras": model}
    if compiled_ops.is_available():
        candidates["op"] = compress(model)
    times = measure(candidates, inputs, repeats, warmup)
    best = min(times, key=lambda k: times[k].median_ms)
    return candidates[best], times
