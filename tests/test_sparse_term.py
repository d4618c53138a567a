"""The compiled op's sparse term (issue 16, part 4): ``chain(x) + x @ S``
with ``S`` as CSR of ``S^T``, the lowering of `Doped` (base stages plus the
term), `HMD` and `Kronecker` on the op, against NumPy LSTM / GRU over dense
matrices written out here (``np.kron``, ``u @ v``...), at 1 and 2 threads;
the layers on the compiled path, the compiled export in a fresh process,
and every CSR check of the raw op."""

import json

import numpy as np
import pytest
import tensorflow as tf
from test_export import _load_in_fresh_process

import keras_antman as am
from keras_antman import doping
from keras_antman import ops
from keras_antman._keras import keras

import reference
from conftest import randomize_weights

pytestmark = pytest.mark.skipif(
    not ops.is_available(), reason="the compiled op library is not built")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Runs the op on 1 or 2 threads, the parallel paths even on tiny
    shapes."""
    ops.set_num_threads(request.param)
    ops._set_min_parallel_work(0, 0)
    yield request.param
    ops.set_num_threads(1)
    ops._set_min_parallel_work(16 * 1024, 512 * 1024)


@pytest.fixture(params=["generic", "generic/windowed", "avx2",
                        "avx512/gathered", "avx512/windowed"])
def isa(request):
    """Runs the op's kernels for one instruction set (the recurrent term's
    kernels differ: AVX-512 and AVX2 gathers or a plain loop; on AVX-512
    each sliced form, which the op otherwise picks by cost; the windowed
    form's plain loop, forced on the generic kernels)."""
    name, _, form = request.param.partition("/")
    try:
        ops.set_instruction_set(name)
    except ValueError:
        pytest.skip(f"this CPU lacks {name}")
    ops._set_sparse_form(form or "auto")
    yield name
    ops.set_instruction_set(None)
    ops._set_sparse_form("auto")


def built(scheme, n, m, seed):
    """A `StructuredMatrix` with seeded random weights; a doped one pruned
    by magnitude to its sparsity."""
    s = scheme.bind(m)
    s.build((None, n))
    r = np.random.default_rng(seed)
    for name, w in s.scheme_weights().items():
        if name != "mask":
            w.assign(r.normal(scale=0.4, size=w.shape).astype("float32"))
    if isinstance(scheme, am.Doped):
        doping.prune(s, scheme.sparsity)
    return s


def dense_of(matrix):
    """W of a built matrix from the formulas, in float64."""
    w = {k: v.astype("float64") for k, v in matrix.weight_arrays().items()}
    sparse = 0.0
    if isinstance(matrix.scheme, am.Doped):
        sparse = w["sparse"] * w["mask"]
        w = {k[5:]: v for k, v in w.items() if k.startswith("base_")}
    if "a" in w:
        base = sum(np.kron(a, b) for a, b in zip(w["a"], w["b"]))
    elif "dense" in w:
        base = np.vstack([w["dense"], w["u"] @ w["v"]])
    elif "u" in w:
        base = w["u"] @ w["v"]
    elif "blocks" in w:
        base = reference.shuffled(reference.block_diag(w["blocks"]),
                                  w["blocks"].shape[0])
    else:
        base = w["kernel"]
    return base + sparse


BASES = {
    # m2 = 4 divides the 8 units, as the op's recurrent shuffle needs.
    "kronecker": lambda: am.Kronecker(b_shape=(4, 4)),
    "low_rank": lambda: am.LowRank(2),
    "hmd": lambda: am.HMD(2),
}
# (cell, gates, recurrent products as (name, width in units))
CELLS = {
    "lstm": (4, [("recurrent", 4)]),
    "gru": (3, [("recurrent", 3)]),
    "gru_reset_before": (3, [("recurrent", 2), ("candidate", 1)]),
}


def run_op(cell, x, mats, bias):
    """The whole sequence on the op, from each matrix's lowering."""
    zeros = np.zeros((x.shape[0], mats["recurrent"].input_dim), "float32")
    stages = {k: m.kernel_stages() for k, m in mats.items()}
    if cell == "lstm":
        return ops.structured_lstm(
            x, zeros, zeros, bias, stages["input"], stages["recurrent"],
            return_sequences=True)[0]
    return ops.structured_gru(
        x, zeros, bias, stages["input"], stages["recurrent"],
        candidate_stages=stages.get("candidate"),
        reset_after=cell == "gru", return_sequences=True)[0]


def run_numpy(cell, x, mats, bias):
    x = x.astype("float64")
    rec = np.concatenate([dense_of(mats[k]) for k in mats if k != "input"],
                         axis=1)
    if cell == "lstm":
        return reference.lstm(x, dense_of(mats["input"]), rec, bias)[0]
    return reference.gru(x, dense_of(mats["input"]), rec, bias,
                         reset_after=cell == "gru")[0]


def make_products(cell, make, features, units, seed):
    gates, recurrent = CELLS[cell]
    mats = {"input": built(make(), features, gates * units, seed)}
    for i, (name, width) in enumerate(recurrent):
        mats[name] = built(make(), units, width * units, seed + 1 + i)
    return mats


def random_bias(cell, units, rng):
    shape = (2, 3 * units) if cell == "gru" else (
        CELLS[cell][0] * units,)
    return rng.normal(scale=0.3, size=shape).astype("float32")


@pytest.mark.parametrize("sparsity", [None, 0.0, 0.9, 0.99, 1.0],
                         ids=lambda s: "plain" if s is None else f"S{s}")
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_op_equals_numpy(cell, base, sparsity, threads, rng):
    def make():
        scheme = BASES[base]()
        return scheme if sparsity is None else am.Doped(
            scheme, sparsity=sparsity)

    mats = make_products(cell, make, 8, 8, seed=7)
    if sparsity is not None:
        for m in mats.values():  # the lowering ends with S, all of it
            term = m.kernel_stages()[-1]
            assert isinstance(term, ops.SparseTerm)
            assert len(term.values) == m.scheme.nnz(m.input_dim,
                                                    m.output_dim)
    bias = random_bias(cell, 8, rng)
    for batch in (1, 3):
        x = rng.normal(size=(batch, 5, 8)).astype("float32")
        np.testing.assert_allclose(
            run_op(cell, x, mats, bias), run_numpy(cell, x, mats, bias),
            rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: am.Doped(am.Kronecker(b_shape=(8, 8)), sparsity=0.95),
    # Groups of 5 columns: the 2-thread column split of the intermediate
    # stage cuts a group (generic ISA), around the one-GEMM equal blocks.
    lambda: am.Doped(am.Kronecker(b_shape=(8, 5)), sparsity=0.9),
    lambda: am.Doped(am.Dense(), sparsity=0.9),
    lambda: am.Doped(am.LGPShuffle(4), sparsity=0.97),
], ids=["kronecker", "kronecker_b5", "dense", "lgp_shuffle"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_op_equals_numpy_at_larger_shapes(make, cell, threads, isa, rng):
    # 2 x 70 rows: two row chunks of the input product's sparse term, one
    # of them partial; 40 units: slices of 16 outputs that end mid-gate.
    mats = make_products(cell, make, 40, 40, seed=3)
    bias = random_bias(cell, 40, rng)
    x = rng.normal(size=(2, 70, 40)).astype("float32")
    np.testing.assert_allclose(
        run_op(cell, x, mats, bias), run_numpy(cell, x, mats, bias),
        rtol=2e-4, atol=2e-5)


def test_sparse_term_from_arrays_and_tensors(rng):
    s = rng.normal(size=(6, 9)) * (rng.random((6, 9)) < 0.3)
    s = s.astype("float32")
    for term in (ops.sparse_term(s), ops.sparse_term(tf.constant(s))):
        row_ptr, col, val = (np.asarray(a) for a in term)
        assert row_ptr.dtype == col.dtype == np.int32
        rebuilt = np.zeros((9, 6), "float32")  # S^T, one row per output
        for j in range(9):
            for k in range(row_ptr[j], row_ptr[j + 1]):
                rebuilt[j, col[k]] = val[k]
        np.testing.assert_array_equal(rebuilt.T, s)
        assert row_ptr[-1] == np.count_nonzero(s)


@pytest.mark.parametrize("scheme", [
    am.Doped(am.Kronecker(b_shape=(4, 4)), sparsity=0.8),
    am.Doped(am.HMD(2), sparsity=0.9),
    am.Doped(am.LowRank(2), sparsity=0.95),
], ids=["kronecker", "hmd", "low_rank"])
@pytest.mark.parametrize("cls,kwargs", [
    (am.StructuredLSTM, {}),
    (am.StructuredGRU, {"reset_after": True}),
    (am.StructuredGRU, {"reset_after": False}),
], ids=["lstm", "gru", "gru_reset_before"])
def test_doped_layers_run_on_the_compiled_op(scheme, cls, kwargs, rng):
    x = rng.normal(size=(3, 6, 8)).astype("float32")
    compiled = cls(8, input_scheme=scheme, recurrent_scheme=scheme,
                   return_sequences=True, go_backwards=True,
                   kernel="compiled", **kwargs)
    compiled(x)
    randomize_weights(compiled, seed=1, scale=0.4)
    for m in doping.doped_matrices(compiled):
        doping.prune(m, m.scheme.sparsity)
    assert compiled.compiled_blockers() == []
    portable = cls.from_config({**compiled.get_config(),
                                "kernel": "portable"})
    portable(x)
    portable.set_weights(compiled.get_weights())
    np.testing.assert_allclose(compiled(x), portable(x), rtol=1e-5,
                               atol=1e-5)
    fn = tf.function(lambda v: compiled(v))  # traced: S from the variables
    np.testing.assert_allclose(fn(x), portable(x), rtol=1e-5, atol=1e-5)


def _doped_model(rng):
    inp = keras.Input((6, 12))
    h = am.StructuredLSTM(
        16, input_scheme=am.Doped(am.Kronecker(), sparsity=0.9),
        recurrent_scheme=am.Doped(am.HMD(4), sparsity=0.95),
        return_sequences=True, name="lstm")(inp)
    h = am.StructuredGRU(
        8, reset_after=False,
        input_scheme=am.Doped(am.LowRank(2), sparsity=0.8),
        recurrent_scheme=am.Doped(am.Kronecker(b_shape=(4, 4)),
                                  sparsity=0.9), name="gru")(h)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    randomize_weights(model, seed=2, scale=0.3)
    for m in doping.doped_matrices(model):
        doping.prune(m, m.scheme.sparsity)
    return model


def test_compiled_export_round_trips_with_constant_csr(tmp_path, rng):
    model = _doped_model(rng)
    x = rng.normal(size=(2, 6, 12)).astype("float32")
    expected = np.asarray(model(x))
    path = am.export(model, tmp_path / "sm", kernel="compiled")
    proc = _load_in_fresh_process(
        path, x, tmp_path, "import keras_antman; keras_antman.ops.load()")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The op's sparse inputs are constants of the graph: no Where (the
    # dense-to-CSR conversion of a traced call) runs when serving.
    nodes = []
    for f in tf.saved_model.load(str(path)).serve.concrete_functions:
        graph = f.graph.as_graph_def()
        nodes += list(graph.node)
        for fn in graph.library.function:
            nodes += list(fn.node_def)
    ours = [n for n in nodes if n.op.startswith("KerasAntman>")]
    assert {n.op for n in ours} == {"KerasAntman>StructuredLstm",
                                    "KerasAntman>StructuredGru"}
    for n in ours:
        assert n.attr["num_input_sparse"].i == 1
        assert n.attr["num_recurrent_sparse"].i == 1
    assert not any(n.op == "Where" for n in nodes)


# -- bad CSR input: InvalidArgument naming the argument -----------------------

def _lstm_with(input_term=None, recurrent_term=None, raw=None):
    """An LSTM call (features 8, units 8) with the given sparse terms."""
    x = np.ones((1, 3, 8), "float32")
    z = np.zeros((1, 8), "float32")
    k = np.zeros((1, 8, 32), "float32")
    in_stages = [ops.Stage(k)] + ([input_term] if input_term else [])
    rec_stages = [ops.Stage(k)] + ([recurrent_term] if recurrent_term else [])
    return ops.structured_lstm(x, z, z, np.zeros(32, "float32"), in_stages,
                               rec_stages)


def _term(row_ptr=None, col=None, values=None):
    """A valid CSR of S^T for S [8, 32] (3 entries), with replacements."""
    base_ptr = np.zeros(33, "int32")
    base_ptr[5:] = 2
    base_ptr[20:] = 3
    return ops.SparseTerm(
        np.asarray(base_ptr if row_ptr is None else row_ptr, "int32"),
        np.asarray([1, 7, 0] if col is None else col, "int32"),
        np.asarray([1.0, 2.0, 3.0] if values is None else values,
                   "float32"))


def _bumped(i, value):
    t = _term()
    ptr = t.row_ptr.copy()
    ptr[i] = value
    return _term(row_ptr=ptr)


@pytest.mark.parametrize("term,pattern", [
    (_bumped(0, 1), r"input_sparse_row_ptr\[0\] must be 0; received 1"),
    (_bumped(10, 1), r"input_sparse_row_ptr must not decrease; received "
     r"input_sparse_row_ptr\[9\] = 2 > input_sparse_row_ptr\[10\] = 1"),
    (_bumped(32, 4), r"input_sparse_row_ptr\[m\] = input_sparse_row_ptr"
     r"\[32\] must equal nnz = 3 .*received 4"),
    (_bumped(32, 2**31 - 1), r"must equal nnz = 3"),
    (_term(col=[1, 8, 0]), r"input_sparse_col_idx\[1\] = 8 is not an input "
     r"index in \[0, 8\) of the input product"),
    (_term(col=[1, -1, 0]), r"input_sparse_col_idx\[1\] = -1 is not"),
    (_term(row_ptr=np.zeros(32)), r"input_sparse_row_ptr must have m \+ 1 "
     r"= 33 entries .*received shape \[32\]"),
    (_term(values=[1.0, 2.0]), r"input_sparse_col_idx and "
     r"input_sparse_values must have the same length nnz; received shapes "
     r"\[3\] and \[2\]"),
    (_term(row_ptr=np.zeros((1, 33))), r"input_sparse_row_ptr must be a "
     r"rank-1 int32 array \[m \+ 1\]"),
    (_term(col=[[1, 7, 0]]), r"input_sparse_col_idx must be a rank-1"),
])
def test_bad_csr_is_rejected_naming_the_input(term, pattern):
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        _lstm_with(input_term=term)


def test_bad_recurrent_csr_names_the_recurrent_product():
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"recurrent_sparse_col_idx\[1\] = 8 is not an "
                             r"input index in \[0, 8\) of the recurrent"):
        _lstm_with(recurrent_term=_term(col=[1, 8, 0]))


def test_graph_construction_checks_the_csr_shapes():
    term = _term(row_ptr=np.zeros(31))

    @tf.function
    def traced():
        return _lstm_with(input_term=ops.SparseTerm(
            *(tf.constant(a) for a in term)))

    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match=r"input_sparse_row_ptr must have m \+ 1 = 33"):
        traced()


def test_raw_op_term_counts():
    lib = ops.load()
    t = _term()
    k = np.zeros((1, 8, 32), "float32")
    z = np.zeros((1, 8), "float32")
    two = dict(input_sparse_row_ptr=[t.row_ptr] * 2,
               input_sparse_col_idx=[t.col_idx] * 2,
               input_sparse_values=[t.values] * 2)
    none = {f"recurrent_sparse_{p}": [] for p in
            ("row_ptr", "col_idx", "values")}
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"num_input_sparse must be 0 \(no sparse term\)"
                             r" or 1 .*received 2"):
        lib.keras_antman_structured_lstm(
            x=np.ones((1, 3, 8), "float32"), initial_h=z, initial_c=z,
            bias=np.zeros(32, "float32"), input_stages=[k],
            recurrent_stages=[k], input_shuffle=[False],
            recurrent_shuffle=[False], **two, **none)
    cand = _term(row_ptr=np.zeros(9))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"num_candidate_sparse must be 0 with "
                             r"reset_after=True"):
        lib.keras_antman_structured_gru(
            x=np.ones((1, 3, 8), "float32"), initial_h=z,
            bias=np.zeros((2, 24), "float32"),
            input_stages=[np.zeros((1, 8, 24), "float32")],
            recurrent_stages=[np.zeros((1, 8, 24), "float32")],
            candidate_stages=[], input_shuffle=[False],
            recurrent_shuffle=[False], reset_after=True,
            input_sparse_row_ptr=[], input_sparse_col_idx=[],
            input_sparse_values=[], **none,
            candidate_sparse_row_ptr=[cand.row_ptr],
            candidate_sparse_col_idx=[cand.col_idx],
            candidate_sparse_values=[cand.values])


def test_python_wrapper_places_the_term_last():
    k = ops.Stage(np.zeros((1, 8, 32), "float32"))
    with pytest.raises(TypeError, match=r"input_stages\[0\] is a SparseTerm, "
                                        r"which may only come last"):
        ops.structured_lstm(
            np.ones((1, 3, 8), "float32"), np.zeros((1, 8), "float32"),
            np.zeros((1, 8), "float32"), np.zeros(32, "float32"),
            [_term(), k], [k])
    with pytest.raises(ValueError, match="a SparseTerm alone is not a "
                                         "product"):
        ops.structured_lstm(
            np.ones((1, 3, 8), "float32"), np.zeros((1, 8), "float32"),
            np.zeros((1, 8), "float32"), np.zeros(32, "float32"),
            [_term()], [k])


# -- the recurrent term's sliced forms and their cache ------------------------

def _awkward_term(n, m, rng):
    """CSR of S^T for S [n, m] with what the sliced forms must get right:
    an empty output, one with every column, duplicate columns (they add),
    the last column, many entries of one output in one 32-column window,
    columns out of order within an output, m not a multiple of 16, and
    16 empty outputs in a row (a whole empty slice of the windowed form,
    which takes the outputs in order) before the end."""
    rows = [list(rng.permutation(np.flatnonzero(rng.random(n) < 0.1)))
            for _ in range(m)]
    rows[0] = []
    rows[16:32] = [[] for _ in range(16)] if m >= 48 else rows[16:32]
    rows[1] = list(rng.permutation(n))
    rows[2] = [n - 1, n - 1, 0, n - 1]
    rows[3] = list(range(32, min(n, 32 + 29)))[::-1]
    row_ptr = np.cumsum([0] + [len(r) for r in rows]).astype("int32")
    col = np.array([c for r in rows for c in r], "int32")
    val = rng.normal(size=col.size).astype("float32")
    return ops.SparseTerm(row_ptr, col, val)


def _dense_of_term(term, n, m):
    row_ptr, col, val = (np.asarray(a) for a in term)
    s = np.zeros((n, m))
    for j in range(m):
        for k in range(row_ptr[j], row_ptr[j + 1]):
            s[col[k], j] += val[k]
    return s


def _lstm_with_recurrent_term(x, w_in, w_rec, bias, term):
    batch, units = x.shape[0], w_rec.shape[0]
    z = np.zeros((batch, units), "float32")
    return ops.structured_lstm(
        x, z, z, bias, [ops.Stage(w_in[None])],
        [ops.Stage(w_rec[None]), term], return_sequences=True)[0]


@pytest.mark.parametrize("units", [70, 33, 8])
def test_awkward_recurrent_terms_equal_numpy(units, threads, isa, rng):
    # 70 units: windows of 32 columns ending in a partial one (6 columns);
    # 33: a window of one column; 8: less than a window. 4 * units outputs
    # end in a partial slice.
    n, m = units, 4 * units
    _assert_recurrent_term_equals_numpy(_awkward_term(n, m, rng), n, m,
                                        0.3, (3, 6, 5), rng)


def _assert_recurrent_term_equals_numpy(term, n, m, scale, x_shape, rng):
    """An LSTM (input 5, n units) whose recurrent product is a random
    dense matrix plus ``scale`` x ``term`` on the op, against NumPy's
    LSTM with the term written out densely."""
    w_in = rng.normal(scale=0.2, size=(5, m)).astype("float32")
    w_rec = rng.normal(scale=0.05, size=(n, m)).astype("float32")
    bias = rng.normal(scale=0.3, size=m).astype("float32")
    x = rng.normal(size=x_shape).astype("float32")
    expected = reference.lstm(x.astype("float64"), w_in,
                              w_rec + scale * _dense_of_term(term, n, m),
                              bias)[0]
    term = term._replace(values=term.values * np.float32(scale))
    np.testing.assert_allclose(
        _lstm_with_recurrent_term(x, w_in, w_rec, bias, term), expected,
        rtol=1e-4, atol=1e-5)


def _term_of_rows(rows, rng):
    row_ptr = np.cumsum([0] + [len(r) for r in rows]).astype("int32")
    col = np.array([c for r in rows for c in r], "int32")
    return ops.SparseTerm(row_ptr, col,
                          rng.normal(size=col.size).astype("float32"))


@pytest.mark.parametrize("pattern", ["dense", "one_each", "one_output"])
def test_windowed_lane_patterns_equal_numpy(pattern, threads, isa, rng):
    # The windowed form's values are stored lane-padded (zeros where a
    # vector's lane has no entry): every lane of every vector set (S
    # dense), one lane per vector (one entry per output, in scattered
    # blocks), one output with every column (one lane, 40 vectors).
    n, m = 40, 160
    rows = {
        "dense": [list(range(n)) for _ in range(m)],
        "one_each": [[(7 * j) % n] for j in range(m)],
        "one_output": [list(range(n)) if j == 37 else [] for j in range(m)],
    }[pattern]
    _assert_recurrent_term_equals_numpy(_term_of_rows(rows, rng), n, m,
                                        0.1, (2, 5, 5), rng)


def _structural_lstm(x, w_in, blocks, term, bias, h0):
    """NumPy LSTM whose recurrent product adds only stored entries (the
    block-diagonal base's [n, 1, 4] blocks and S's CSR entries), so an inf
    or NaN in h reaches exactly the outputs that read it, as in SciPy's
    sparse product (a dense ``h @ W`` would spread 0 * inf to all)."""
    row_ptr, col, val = (np.asarray(a) for a in term)
    h, c = h0.astype("float64"), np.zeros(h0.shape)
    outs = []
    with np.errstate(invalid="ignore", over="ignore"):
        for t in range(x.shape[1]):
            rec = (h[:, :, None] * blocks[:, 0, :]).reshape(h.shape[0], -1)
            for j in range(rec.shape[1]):
                k = slice(row_ptr[j], row_ptr[j + 1])
                rec[:, j] += (h[:, col[k]] * val[k]).sum(axis=1)
            z = x[:, t] @ w_in + rec + bias
            i, f, g, o = np.split(z, 4, axis=-1)
            c = reference.sigmoid(f) * c + reference.sigmoid(i) * np.tanh(g)
            h = reference.sigmoid(o) * np.tanh(c)
            outs.append(h)
    return np.stack(outs, 1)


def test_non_finite_state_reaches_only_the_outputs_that_read_it(
        threads, isa, rng):
    # The windowed form multiply-adds its lane-padded values unmasked when
    # h is finite; its padded lanes read a column of h (often a block's
    # first, where the inf and NaN sit here), so a state holding inf or
    # NaN must take the masked form: NaN and inf then land where the
    # stored entries put them, step after step. Row 1 of the batch stays
    # finite.
    n, m = 40, 160
    term = _term_of_rows(
        [list(rng.permutation(np.flatnonzero(rng.random(n) < 0.06)))
         for _ in range(m)], rng)
    term = term._replace(values=term.values * np.float32(0.3))
    blocks = rng.normal(scale=0.1, size=(n, 1, 4)).astype("float32")
    w_in = rng.normal(scale=0.2, size=(5, m)).astype("float32")
    bias = rng.normal(scale=0.3, size=m).astype("float32")
    x = rng.normal(size=(2, 2, 5)).astype("float32")
    h0 = rng.normal(size=(2, n)).astype("float32")
    h0[0, [0, 16, 24]] = [np.nan, np.inf, -np.inf]
    expected = _structural_lstm(x.astype("float64"), w_in, blocks, term,
                                bias, h0)
    got = ops.structured_lstm(
        x, h0, np.zeros((2, n), "float32"), bias, [ops.Stage(w_in[None])],
        [ops.Stage(blocks), term], return_sequences=True)[0].numpy()
    bad = ~np.isfinite(expected[0, 0])
    assert 0 < bad.sum() < n / 2, "step 1 should leave most units finite"
    assert np.isfinite(expected[1]).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_sliced_term_is_packed_once_per_csr_contents(isa, rng):
    # In one graph the kernel is the same: unchanged arrays reuse the
    # packing; new values written into the same variable, or another
    # instruction set, pack again, and the results follow the new values.
    n, m = 40, 160
    term = _awkward_term(n, m, rng)
    w_in = rng.normal(scale=0.2, size=(5, m)).astype("float32")
    w_rec = np.zeros((n, m), "float32")
    bias = np.zeros(m, "float32")
    x = rng.normal(size=(1, 4, 5)).astype("float32")
    values = tf.Variable(term.values)

    @tf.function
    def run():
        return _lstm_with_recurrent_term(
            x, w_in, w_rec, bias, term._replace(values=values))

    def expected():
        t = term._replace(values=values.numpy())
        return reference.lstm(x.astype("float64"), w_in,
                              _dense_of_term(t, n, m), bias)[0]

    before = ops._sparse_packs()
    np.testing.assert_allclose(run(), expected(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(), expected(), rtol=1e-4, atol=1e-5)
    assert ops._sparse_packs() == before + 1
    values.assign(term.values[::-1].copy())  # the same buffer, new values
    np.testing.assert_allclose(run(), expected(), rtol=1e-4, atol=1e-5)
    assert ops._sparse_packs() == before + 2
    v = values.numpy()
    v[-1] = np.nextafter(v[-1], np.float32(np.inf))  # one ulp
    values.assign(v)
    run()
    assert ops._sparse_packs() == before + 3
    # Packed for AVX-512 or for the others (unless the windowed form is
    # forced, which both run).
    other = "generic" if isa == "avx512" else "avx512"
    ops._set_sparse_form("auto")
    if other in ops.supported_instruction_sets():
        ops.set_instruction_set(other)
        np.testing.assert_allclose(run(), expected(), rtol=1e-4, atol=1e-5)
        assert ops._sparse_packs() == before + 4


def test_changed_csr_is_checked_again_after_a_cached_call():
    # Same shapes as a packed call, contents now invalid: the cache must
    # not skip the checks.
    col = tf.Variable([1, 7, 0])

    @tf.function
    def run():
        return _lstm_with(recurrent_term=_term()._replace(col_idx=col))

    run()
    run()
    col.assign([1, 8, 0])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"recurrent_sparse_col_idx\[1\] = 8 is not an "
                             r"input index in \[0, 8\)"):
        run()


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_csr_variables_written_in_place_between_calls(traced, isa, rng):
    # The same variables, assigned new contents between calls (assign, a
    # sliced assign, assign_add, a scatter), give the new term's results
    # and invalid contents the clear error, never the cached packing (a
    # cache keyed on the data pointers alone failed this when traced).
    n, m = 40, 160
    lengths = rng.integers(0, 5, size=m)
    a = _term_of_rows([list(rng.integers(0, n, size=k)) for k in lengths],
                      rng)
    b = _term_of_rows([list(rng.integers(0, n, size=k))
                       for k in np.roll(lengths, 7)], rng)
    row_ptr, col, values = (tf.Variable(t) for t in a)
    w_in = rng.normal(scale=0.2, size=(5, m)).astype("float32")
    w_rec = rng.normal(scale=0.05, size=(n, m)).astype("float32")
    bias = rng.normal(scale=0.3, size=m).astype("float32")
    x = rng.normal(size=(2, 4, 5)).astype("float32")

    def call():
        return _lstm_with_recurrent_term(
            x, w_in, w_rec, bias, ops.SparseTerm(row_ptr, col, values))

    fn = tf.function(call) if traced else call

    def check():
        term = ops.SparseTerm(row_ptr.numpy(), col.numpy(), values.numpy())
        expected = reference.lstm(x.astype("float64"), w_in,
                                  w_rec + _dense_of_term(term, n, m),
                                  bias)[0]
        for _ in range(2):  # packed, then the cached packing
            np.testing.assert_allclose(fn(), expected, rtol=1e-4,
                                       atol=1e-5)

    check()
    row_ptr.assign(b.row_ptr)
    col.assign(b.col_idx)
    values.assign(b.values)
    check()
    col[5].assign((col[5] + 1) % n)
    check()
    values.assign_add(np.full(values.shape, 0.25, "float32"))
    check()
    col.scatter_nd_update([[3]], [n])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"recurrent_sparse_col_idx\[3\] = {n} is not "
                             rf"an input index in \[0, {n}\)"):
        fn()
    col.scatter_nd_update([[3]], [0])
    check()
    row_ptr.scatter_nd_update([[m]], [row_ptr[m] + 1])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"recurrent_sparse_row_ptr\[m\] = "
                             rf"recurrent_sparse_row_ptr\[{m}\] must equal "
                             rf"nnz = {col.shape[0]}"):
        fn()


def test_csr_ref_variables_written_in_place_between_runs():
    # TF1 reference variables (graph mode, use_resource=False): Assign
    # copies into the variable's buffer in place even while another tensor
    # holds it, so a cache keyed on the buffer would keep the old term.
    # The cache compares contents: new values change the result, an
    # invalid index is rejected.
    rng = np.random.default_rng(0)
    k = rng.normal(scale=0.3, size=(1, 8, 32)).astype("float32")
    x = rng.normal(size=(1, 5, 8)).astype("float32")
    bias = rng.normal(size=32).astype("float32")
    term = _term()
    with tf.Graph().as_default():
        col = tf.compat.v1.Variable(term.col_idx, use_resource=False)
        values = tf.compat.v1.Variable(term.values, use_resource=False)
        assert col.dtype != col.dtype.base_dtype  # a reference type
        z = tf.zeros((1, 8))
        out = ops.structured_lstm(
            x, z, z, bias, [ops.Stage(k)],
            [ops.Stage(k), term._replace(col_idx=col, values=values)])[1]
        new_values = tf.compat.v1.assign(values, [10.0, -20.0, 30.0])
        bad_col = tf.compat.v1.assign(col, [1, 8, 0])
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())

            def expected():
                t = term._replace(values=sess.run(values))
                return reference.lstm(x.astype("float64"), k[0],
                                      k[0] + _dense_of_term(t, 8, 32),
                                      bias)[1]

            for _ in range(2):
                np.testing.assert_allclose(sess.run(out), expected(),
                                           rtol=1e-4, atol=1e-5)
            sess.run(new_values)
            np.testing.assert_allclose(sess.run(out), expected(), rtol=1e-4,
                                       atol=1e-5)
            sess.run(bad_col)
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=r"recurrent_sparse_col_idx\[1\] = 8 "
                                     r"is not an input index in \[0, 8\)"):
                sess.run(out)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_masked_sparse_term_follows_values_and_mask(traced, rng):
    # The cached pattern is checked on every call: new values, a new mask
    # (also one with the same count of ones), a mask that is not 0/1.
    n, m = 7, 9
    values = tf.Variable(rng.normal(size=(n, m)).astype("float32"))
    mask = tf.Variable((rng.random((n, m)) < 0.4).astype("float32"))
    cache = {}

    def term():
        return ops.masked_sparse_term(values, mask, cache)

    fn = tf.function(term) if traced else term

    def check():
        got = _dense_of_term(fn(), n, m)
        np.testing.assert_array_equal(got, values.numpy() * mask.numpy())

    check()
    assert cache["pattern"].nnz == np.count_nonzero(mask.numpy())
    values.assign(rng.normal(size=(n, m)).astype("float32"))
    check()
    mask.assign((rng.random((n, m)) < 0.2).astype("float32"))
    check()
    mask.assign(np.roll(mask.numpy(), 1, axis=1))  # same count, moved
    check()
    mask.assign(mask * 0.5)
    check()
