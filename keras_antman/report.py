"""`report`: parameters and multiply-adds per layer, before and after.

Costs follow the AntMan paper's Table 1: a matrix product's multiply-adds
(MACs) are counted for one input vector, so a recurrent layer's MACs are per
timestep and a ``Dense`` layer's per position. Elementwise work (gates,
biases, activations) is not counted, which is the paper's convention, and
layers with no matrix product (``Embedding``...) count parameters only.
"""

import dataclasses
import math

from keras_antman import _keras
from keras_antman._keras import keras
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTMCell

_STOCK_CELLS = (keras.layers.LSTMCell, keras.layers.GRUCell)
_STRUCTURED_CELLS = (StructuredLSTMCell, StructuredGRUCell)


@dataclasses.dataclass(frozen=True)
class Cost:
    """The cost of one part of a layer (a product, a bias, a whole layer)."""

    layer: str
    part: str
    scheme: str
    params: int
    macs: int
    recurrent: bool
    detail: bool = False


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a `Report`: a part of a layer before and after."""

    layer: str
    part: str
    scheme_before: str
    scheme_after: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    recurrent: bool
    detail: bool = False
    error: object = None

    @property
    def param_reduction(self):
        """``params_before / params_after`` (``inf`` when removed)."""
        return _ratio(self.params_before, self.params_after)

    @property
    def mac_reduction(self):
        """``macs_before / macs_after`` (``nan`` when neither has MACs)."""
        return _ratio(self.macs_before, self.macs_after)


def _ratio(a, b):
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-part costs of two models; ``str()`` prints a table.

    Attributes:
        rows: one `Row` per layer part, in model order. ``row.error``
            is the product's `keras_antman.calibration.CalibrationError`
            when `report` was given ``errors``, else ``None``. A product whose
            scheme has several cost parts (`Scheme.cost_parts`, e.g. a
            doped matrix's base, sparse values and sparse indices) is
            followed by one ``detail`` row per part (``input/base``...),
            which the totals leave out.
        total: the sum over every row.
        recurrent_total: the sum over the recurrent layers only (the
            paper's "LSTM computation reduction").
    """

    rows: tuple

    @property
    def total(self):
        return _sum_rows("total", self.rows)

    @property
    def recurrent_total(self):
        return _sum_rows("recurrent", [r for r in self.rows if r.recurrent])

    def to_dicts(self):
        """The rows and totals as a list of plain dicts."""
        out = []
        for row in (*self.rows, self.recurrent_total, self.total):
            d = dataclasses.asdict(row)
            d["param_reduction"] = row.param_reduction
            d["mac_reduction"] = row.mac_reduction
            out.append(d)
        return out

    def __str__(self):
        head = (
            "layer", "part", "before", "after", "params before",
            "params after", "x", "MACs before", "MACs after", "x",
        )
        with_errors = any(r.error is not None for r in self.rows)
        if with_errors:
            head += ("error from_dense", "error kept")
        lines = []
        for row in (*self.rows, None, self.recurrent_total, self.total):
            if row is None:
                lines.append(None)
                continue
            errors = ()
            if with_errors:
                errors = ("", "") if row.error is None else (
                    f"{row.error.from_dense:.3f}", f"{row.error.kept:.3f}")
            if row.detail:  # a part of the product above: after only
                lines.append(
                    ("", f"  {row.part}", "", row.scheme_after, "",
                     f"{row.params_after:,}", "", "",
                     f"{row.macs_after:,}", "") + errors
                )
                continue
            lines.append(
                (
                    row.layer, row.part, row.scheme_before, row.scheme_after,
                    f"{row.params_before:,}", f"{row.params_after:,}",
                    _fmt_ratio(row.param_reduction),
                    f"{row.macs_before:,}", f"{row.macs_after:,}",
                    _fmt_ratio(row.mac_reduction),
                ) + errors
            )
        widths = [
            max(len(head[i]), *(len(x[i]) for x in lines if x))
            for i in range(len(head))
        ]
        rule = "  ".join("-" * w for w in widths)

        def fmt(cells):
            return "  ".join(
                c.ljust(w) if i < 4 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )

        text = [fmt(head), rule]
        text += [rule if x is None else fmt(x) for x in lines]
        text.append(
            "MACs: multiply-adds of the matrix products for one input vector "
            "(per timestep for recurrent layers)."
        )
        if with_errors:
            text.append(
                "error: relative output error ||XW - XW'|| / ||XW|| on the "
                "calibration rows, of from_dense and of the weights kept."
            )
        return "\n".join(text)


def _fmt_ratio(x):
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2f}x"


def _sum_rows(name, rows):
    rows = [r for r in rows if not r.detail]
    return Row(
        layer=name, part="", scheme_before="", scheme_after="",
        params_before=sum(r.params_before for r in rows),
        params_after=sum(r.params_after for r in rows),
        macs_before=sum(r.macs_before for r in rows),
        macs_after=sum(r.macs_after for r in rows),
        recurrent=True,
    )


def report(original, compressed=None, print_fn=None, errors=None):
    """Parameters and multiply-adds per layer of two models, and reductions.

    Layers are matched by name (``compress`` keeps names) and recurrent
    layers are broken down into their products (``input``, ``recurrent``,
    ``candidate`` for a GRU with ``reset_after=False``) and ``bias``. A
    product made of several parts (a `Doped` matrix: ``base``, ``sparse``
    values, ``sparse_index``) gets one sub-row per part after it.

    Args:
        original: the model (or layer) before compression.
        compressed: the model after compression; ``None`` reports
            ``original`` alone (before and after equal).
        print_fn: if given, called with the table text (e.g. ``print``).
        errors: ``{(layer, part): CalibrationError}``, e.g. the
            ``calibration_errors`` of a model made by `compress` with
            ``calibration_data``; adds two columns, the relative output
            errors of `from_dense` and of the weights kept.

    Returns:
        A `Report`: ``str(report)`` is the table, ``report.rows`` the data,
        ``report.recurrent_total.mac_reduction`` the recurrent computation
        reduction.
    """
    before = _costs(original)
    after = _costs(compressed if compressed is not None else original)
    after_by_key = {(c.layer, c.part): c for c in after}
    before_keys = {(c.layer, c.part) for c in before}
    rows = []
    seen = set()

    def add(b, a):
        ref = b or a
        seen.add((ref.layer, ref.part))
        rows.append(_row(b, a))
        # Parts of a product the original lacks go right after it.
        for c in after:
            if (c.detail and c.layer == ref.layer
                    and c.part.startswith(ref.part + "/")
                    and (c.layer, c.part) not in before_keys
                    and (c.layer, c.part) not in seen):
                seen.add((c.layer, c.part))
                rows.append(_row(None, c))

    for c in before:
        add(c, after_by_key.get((c.layer, c.part)))
    for c in after:
        if (c.layer, c.part) not in seen:
            add(None, c)
    if errors:
        rows = [dataclasses.replace(r, error=errors.get((r.layer, r.part)))
                for r in rows]
    result = Report(rows=tuple(rows))
    if print_fn is not None:
        print_fn(str(result))
    return result


def _row(b, a):
    ref = b or a
    return Row(
        layer=ref.layer, part=ref.part,
        scheme_before=b.scheme if b else "(none)",
        scheme_after=a.scheme if a else "(removed)",
        params_before=b.params if b else 0,
        params_after=a.params if a else 0,
        macs_before=b.macs if b else 0,
        macs_after=a.macs if a else 0,
        recurrent=(b or a).recurrent,
        detail=ref.detail,
    )


def _costs(obj, prefix=""):
    if _keras.is_graph_model(obj):
        out = []
        for layer in obj.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            nested = _keras.is_graph_model(layer)
            out += _costs(layer, f"{prefix}{layer.name}/" if nested else prefix)
        return out
    return _layer_costs(obj, prefix + obj.name)


def _layer_costs(layer, name):
    if isinstance(layer, keras.layers.Bidirectional):
        return [
            dataclasses.replace(c, part=f"{side}/{c.part}")
            for side, sub in (("forward", layer.forward_layer),
                              ("backward", layer.backward_layer))
            for c in _layer_costs(sub, name)
        ]
    if isinstance(layer, keras.layers.RNN):
        cell = layer.cell
        cells = (
            list(cell.cells)
            if isinstance(cell, keras.layers.StackedRNNCells) else [cell]
        )
        if all(isinstance(c, _STOCK_CELLS + _STRUCTURED_CELLS) for c in cells):
            if len(cells) == 1:
                return _cell_costs(cells[0], name, "")
            return [
                c for i, cell in enumerate(cells)
                for c in _cell_costs(cell, name, f"cell_{i}/")
            ]
    if isinstance(layer, keras.layers.Dense) and layer.built:
        n, m = layer.kernel.shape
        return [
            Cost(name, "", "Dense", layer.count_params(), n * m, False)
        ]
    params = layer.count_params() if layer.built else 0
    return [Cost(name, "", type(layer).__name__, params, 0, False)]


def _cell_costs(cell, name, prefix):
    if not cell.built:
        raise ValueError(
            f"Layer '{name}' is not built, so its cost is unknown: call the "
            "model on data or build it first."
        )
    out = []
    if isinstance(cell, _STRUCTURED_CELLS):
        for part, matrix in cell.products().items():
            p, m = matrix.params(), matrix.macs()
            out.append(Cost(name, prefix + part, matrix.describe(), p, m, True))
            parts = matrix.cost_parts()
            if len(parts) > 1:
                out += [
                    Cost(name, f"{prefix}{part}/{sub}", text, sp, sm, True,
                         detail=True)
                    for sub, text, sp, sm in parts
                ]
    else:
        n, m = cell.kernel.shape
        h = cell.units
        out.append(Cost(name, prefix + "input", "Dense", n * m, n * m, True))
        rec = [("recurrent", m)]
        if isinstance(cell, keras.layers.GRUCell) and not cell.reset_after:
            rec = [("recurrent", 2 * h), ("candidate", h)]
        for part, width in rec:
            out.append(
                Cost(name, prefix + part, "Dense", h * width, h * width, True)
            )
    if cell.bias is not None:
        size = int(math.prod(cell.bias.shape))
        out.append(Cost(name, prefix + "bias", "", size, 0, True))
    return out
