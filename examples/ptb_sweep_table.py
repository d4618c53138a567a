"""One table from the run directories of examples/ptb_1000_step_sweep.sh.

Each sweep row trains in its own run directory (``runs/ptb_sweep_NAME``)
and writes its own report; this gathers the rows that the sweep added
(one distilled student per directory, the reused rows left out) into
``examples/results/ptb_1000_step_sweep.md``, with the command of each.

Usage:
    python examples/ptb_sweep_table.py [--runs runs] [--out FILE]
"""

import argparse
import glob
import json
import os

from ptb_word_lm import _plot_init

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(runs):
    """(name, student, entry, command, teacher test ppl) per sweep row; a
    coefficient-grid cell is a row whose student is "grid C_mse, C_kl"."""
    out = []
    for path in sorted(glob.glob(os.path.join(runs, "ptb_sweep_*",
                                              "results.json"))):
        name = os.path.basename(os.path.dirname(path))[len("ptb_sweep_"):]
        with open(path) as f:
            res = json.load(f)
        teacher = res["teacher"]["test_ppl"]
        command = res["config"]["commands"][-1]
        for student, entry in res["students"].items():
            if "[" in student:  # a row reused from the source run
                continue
            out.append((name, student, entry, command, teacher))
        for i, cell in enumerate(res.get("grid", {}).values()):
            student = (f"LGP-Shuffle g=10, grid C_mse {cell['c_mse']:g}, "
                       f"C_kl {cell['c_kl']:g}")
            if i:  # trained after another cell in the same process
                student += " (withdrawn: partly frozen student)"
            out.append((name, student, dict(
                cell, lr=res["config"]["args"]["student_lr"],
                coefficients={k: cell[k] for k in
                              ("c_target", "c_mse", "c_kl")}),
                command, teacher))
    return out


def _ppl(entry, step):
    value = entry.get("test_ppl_at", {}).get(str(step))
    return "-" if value is None else f"{value:.1f}"


def table(found):
    head = ("| sweep row | student | optimizer, lr (cosine) | C | val ppl | "
            "test ppl at 0 / 300 / 1000 | test vs teacher |\n"
            "| --- | --- | --- | --- | ---: | ---: | ---: |\n")
    body = []
    for name, student, e, command, teacher in found:
        opt = "Adam" if "--optimizer adam" in command else "SGD"
        c = e["coefficients"]
        body.append(
            f"| {name} | {student} | {opt} {e['lr']:g} | "
            f"{c['c_target']:g}, {c['c_mse']:g}, {c['c_kl']:g} | "
            f"{e['val_ppl']:.2f} | {_ppl(e, 0)} / {_ppl(e, 300)} / "
            f"{e['test_ppl']:.2f} | {100 * (e['test_ppl'] / teacher - 1):+.1f}%"
            " |")
    return head + "\n".join(body) + "\n"


def errors_table(found):
    """Each data-aware student's relative output error per product on the
    calibration rows, ``from_dense`` against the fit (once per student:
    the rows of one student share its init)."""
    lines, seen = [], set()
    for name, student, e, _, _ in found:
        if student in seen:
            continue
        seen.add(student)
        for product, err in sorted(e.get("calibration_errors", {}).items()):
            lines.append(f"| {name} | {student} | {product} | "
                         f"{err['from_dense']:.3f} | {err['fitted']:.3f} |")
    if not lines:
        return ""
    return ("\nRelative output error ||X W - X W_hat|| / ||X W|| of each "
            "product on the calibration rows, `from_dense` (the naive "
            "init) against the fit (the data-aware init):\n\n"
            "| sweep row | student | layer/product | from_dense | fitted |\n"
            "| --- | --- | --- | ---: | ---: |\n" + "\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "ptb_1000_step_sweep.md"))
    parser.add_argument("--plot-prefix", default="adam1e-2",
                        help="plot test perplexity against the step for the "
                             "rows named PREFIX or PREFIX_* (naive dashed, "
                             "data-aware solid) next to --out")
    args = parser.parse_args()
    found = rows(args.runs)
    if not found:
        raise SystemExit(f"no finished sweep row under {args.runs}/ptb_sweep_*"
                         " (run examples/ptb_1000_step_sweep.sh first)")
    teacher = found[0][4]
    text = (
        "# PTB: 1000 distillation steps, the settings tried "
        "(issue 21's target)\n\n"
        f"Teacher: the carried-state plateau teacher of `runs/ptb_conv`, "
        f"test perplexity {teacher:.2f}. Every row: 10x student (LSTM "
        "multiply-adds), 1000 steps, cosine decay to 0, global gradient "
        "norm clipped at 0.143, carried state, made by "
        "`examples/ptb_1000_step_sweep.sh` (commands below). Choose on "
        "validation perplexity; test is reported. The grid row's cells "
        "ran in one process, and every cell after its first (C_mse or C_kl "
        "> 0) trained a partly frozen student (a bug fixed in session 9: "
        "a Distiller had frozen the teacher, and compress copied its "
        "flags), so only its label-only cell stands; rows adam1e-2_kl, "
        "adam1e-2_mse and adam1e-2_naive rerun the other cells, each in a "
        "process of its own.\n\n"
        + table(found) + errors_table(found) + "\nCommands:\n\n"
        + "\n".join(f"    {c}" for c in dict.fromkeys(
            c for _, _, _, c, _ in found)) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    plotted = [(student, e) for name, student, e, _, _ in found
               if "test_ppl_at" in e and (name == args.plot_prefix or
                                          name.startswith(args.plot_prefix
                                                          + "_"))]
    if plotted:
        path = os.path.splitext(args.out)[0] + "_init_steps.png"
        _plot_init(plotted, path)
        print("wrote", path)


if __name__ == "__main__":
    main()
