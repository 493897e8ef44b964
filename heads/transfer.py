"""`python -m heads.transfer --cache A.h5 --cache B.h5 [--cache C.h5 ...] --out DIR`: does a head
trained on one dataset's features hold on another's? One head per cache, trained as heads.train
trains it (the same settings, a grid chosen on validation), scored on every cache's test split on
the classes the two share (cache/vocabulary.py); the diagonal is each head on its own test split.

    python -m heads.transfer --cache nih.h5 --cache chexpert.h5 --cache padchest.h5 --out outputs/transfer/resnet50
    python -m heads.transfer --cache nih.h5 --cache chexpert.h5 --train-fraction 0.01,0.1,1 --repeats 5
                     (label efficiency across datasets: heads/transfer_efficiency.py)

Every cache must hold the same encoder recipe's features (a matrix compares datasets, not
encoders). DIR holds:

    transfer.csv     source, target, class (shared name), source_class, target_class, auc, ci_low,
                     ci_high, n_pos, n_neg: one row per class pair of every cell
    transfer.md      the matrix (mean AUC and how many classes each cell averages), the drop from
                     the diagonal and its definition, every cell's class pairs
    transfer.png     the matrix as a heatmap, diagonal outlined
    transfer.json    the inputs: caches and fingerprints, head settings, resamples, versions
    runs/<source>/   each source's run directory (heads.train's files)
    evaluations/<source>-on-<target>/   each cell's evaluation folder (heads.evaluate's files),
                     whose predictions_test.csv every number of the cell recomputes from

The drop from the diagonal, per source: for each other target, the classes scorable both on the
source's own test split and on the target's, the source's mean AUC over them on its own test
split minus its mean AUC over them on the target's; then the mean of those over the targets
sharing a scorable class. Per cell, on the same classes, so a cell's class mix cannot pass for a drop.
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import cache
from cache.flags import OneLineParser, number_type
from cache.outdir import OutDirError, check_out_dir, discard_partial, finish_out_dir, prepare_out_dir
from cache.runtime import DeviceUnavailable, resolve_device, versions
from heads import settings as head_settings, transfer_efficiency
from heads.cli import BOOTSTRAP_VALID, add_operating_args, check_subgroup_request
from heads.data import HeadsError, load_head_data, scoring_warnings
from heads.estimator import Head, HeadGrid
from heads.external import (ExternalError, check_target, class_pairs, dataset_of, dataset_title, evaluate,
                            read_source_run, read_target, recipe_differences, write_evaluation)
from heads.report import recipe_marks, write_json
from heads.training import fit_and_report

KIND = "transfer"
COLUMNS = ["source", "target", "class", "source_class", "target_class", "auc", "ci_low", "ci_high", "n_pos", "n_neg"]
DROP_DEFINITION = (
    "drop of a source = the mean, over the other targets that share a class scorable on both test splits, of "
    "(its mean AUC on its own test split - its mean AUC on the target's test split), both means over the classes "
    "scorable in both cells; a positive drop: the head does worse away from home")


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.transfer", add_help=add_help,
                           description="Train a head per cache and score each on every cache's test split.")
    parser.add_argument("--cache", action="append", required=True, metavar="PATH",
                        help="a feature cache, one per dataset (at least two; the same encoder recipe for all)")
    parser.add_argument("--out", default=None, help="transfer folder (default: outputs/transfer/<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier transfer folder in --out")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bootstrap", type=number_type(int, BOOTSTRAP_VALID), default=1000,
                        help=f"patient resamples for every CI (default: 1000; allowed {BOOTSTRAP_VALID.describe()})")
    add_operating_args(parser)
    head_settings.add_setting_args(parser, grid=True)
    head_settings.add_efficiency_args(parser)
    return parser


@dataclass
class Source:
    name: str  # the cache's file name without .h5 (made unique)
    path: Path
    attrs: dict

    @property
    def dataset(self) -> str:
        return dataset_of(self.attrs)


def check_caches(paths) -> list[Source]:
    """Every cache readable and of the first one's encoder recipe, each named once; raises
    ExternalError or cache.CacheError before any work."""
    if len({str(Path(p).resolve()) for p in paths}) < len(paths) or len(paths) < 2:
        raise ExternalError(f"give at least two different caches (got {', '.join(map(str, paths))})")
    sources, names = [], set()
    for path in map(Path, paths):
        attrs = check_target(path)
        twin = next((source for source in sources if source.dataset == dataset_of(attrs)), None)
        if twin is not None:  # its test patients may be the other cache's train patients
            raise ExternalError(f"--cache {path} and --cache {twin.path} are both {dataset_title(twin.dataset)}: a "
                                f"transfer matrix has one cache per dataset (its diagonal is each dataset's own test)")
        differ = recipe_differences(sources[0].attrs, attrs) if sources else []
        if differ:
            raise ExternalError(f"--cache {path} holds other features than --cache {sources[0].path} (differ: "
                                f"{', '.join(differ)}); a transfer matrix compares datasets under one encoder: "
                                f"extract every dataset with the same recipe")
        name, number = path.stem, 2
        while name in names:
            name, number = f"{path.stem}-{number}", number + 1
        names.add(name)
        sources.append(Source(name=name, path=path, attrs=attrs))
    return sources


def check_metadata(sources: list[Source], by) -> None:
    """--by needs every cache's per-row metadata: refused before any training."""
    for source in sources:
        check_subgroup_request(cache.read_metadata(source.path), by, where=f"--cache {source.path}")


@dataclass
class Cell:
    source: str
    target: str
    rows: list  # transfer.csv rows of its class pairs ([] when the caches share no class)
    mean_auc: float | None  # over its scorable pairs

    @property
    def scored(self) -> list:
        return [row["class"] for row in self.rows if row["auc"] is not None]


def train_source(partial: Path, source: Source, *, grid, device, n_bootstrap, by=(), sensitivity=None):
    """The source's run directory under runs/, exactly as heads.train writes one."""
    data = load_head_data([source.path], device=device)
    for line in scoring_warnings(data):
        print(f"warning ({source.name}): {line}", file=sys.stderr)
    estimator = Head(grid[0], device=device) if len(grid) == 1 else HeadGrid(grid, device=device)
    run_dir, metrics = fit_and_report(estimator, cache_path=[source.path], data=data, device=device,
                                      out=partial / "runs" / source.name, n_bootstrap=n_bootstrap, name=source.name,
                                      quiet=True, by=by, sensitivity=sensitivity)
    print(f"{source.name}: head trained on {source.path} (validation mean AUC {metrics['val']['mean_auc']:.4f}), "
          f"test mean AUC {metrics['test']['mean_auc']:.4f}")
    return read_source_run(run_dir, device=device)


def score_cell(partial: Path, out: Path, run, source: Source, target: Source, rows, *, n_bootstrap, by=(),
               sensitivity=None) -> Cell:
    """The run scored on the target's test rows, its evaluation folder written under evaluations/;
    a cell without a class in common says so and has no folder."""
    pairs, _, _ = class_pairs(source_dataset=run.dataset, source_classes=run.classes, target_dataset=rows.dataset,
                              target_classes=rows.classes)
    if not pairs:
        return Cell(source=source.name, target=target.name, rows=[], mean_auc=None)
    evaluation = evaluate(run, rows, n_bootstrap=n_bootstrap)
    folder = f"evaluations/{source.name}-on-{target.name}"
    built = prepare_out_dir(partial / folder, kind="evaluation", overwrite=False)
    write_evaluation(built, evaluation, run_path=out / "runs" / source.name, by=by, sensitivity=sensitivity,
                     n_bootstrap=n_bootstrap)
    finish_out_dir(built, partial / folder, kind="evaluation")
    test = evaluation.metrics["test"]
    cell_rows = [{"source": source.name, "target": target.name, "class": pair.shared, "source_class": pair.source,
                  "target_class": pair.target, "auc": test["auc"][pair.target], "ci_low": ci[0], "ci_high": ci[1],
                  "n_pos": test["n_pos"][pair.target], "n_neg": test["n_neg"][pair.target]}
                 for pair, ci in zip(evaluation.pairs, test["ci95"]["per_class"])]
    mean = test["mean_auc"] if test["mean_over"] else None
    return Cell(source=source.name, target=target.name, rows=cell_rows, mean_auc=mean)


def build_matrix(partial: Path, out: Path, sources: list[Source], *, grid, device, n_bootstrap, by=(),
                 sensitivity=None) -> dict:
    """{(source, target): Cell} for every pair of caches, the diagonal included; `by` and
    `sensitivity` as heads.train takes them, for every run and every cell."""
    test_rows = {source.name: read_target(source.path, split="test") for source in sources}
    cells = {}
    for source in sources:
        run = train_source(partial, source, grid=grid, device=device, n_bootstrap=n_bootstrap, by=by,
                           sensitivity=sensitivity)
        for target in sources:
            cells[source.name, target.name] = score_cell(partial, out, run, source, target, test_rows[target.name],
                                                         n_bootstrap=n_bootstrap, by=by, sensitivity=sensitivity)
    return cells


def drops(cells: dict, names: list) -> dict:
    """Per source: {"drop": the mean drop (None: no target shares a scorable class), "cells":
    {target: (drop, classes it is over)}} as DROP_DEFINITION says."""
    result = {}
    for source in names:
        home = {row["class"]: row["auc"] for row in cells[source, source].rows if row["auc"] is not None}
        per_target = {}
        for target in names:
            if target == source:
                continue
            away = {row["class"]: row["auc"] for row in cells[source, target].rows if row["auc"] is not None}
            common = [c for c in away if c in home]
            if common:
                per_target[target] = (float(np.mean([home[c] for c in common]) - np.mean([away[c] for c in common])),
                                      common)
        result[source] = {"drop": float(np.mean([d for d, _ in per_target.values()])) if per_target else None,
                          "cells": per_target}
    return result


def transfer_table(cells: dict) -> pd.DataFrame:
    return pd.DataFrame([row for cell in cells.values() for row in cell.rows], columns=COLUMNS)


def cell_text(cell: Cell) -> str:
    if not cell.rows:
        return "no shared class"
    if cell.mean_auc is None:
        return "no shared scorable class"
    return f"{cell.mean_auc:.3f} ({_count(len(cell.scored), 'class')})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def write_markdown(path: Path, *, sources, cells, dropped, settings_grid, n_bootstrap) -> None:
    names = [s.name for s in sources]
    lines = ["# Transfer matrix", "",
             "Rows: the dataset a head was trained on (chosen on its own validation split); columns: the test split "
             "it is scored on. Each cell: mean AUC over the class pairs both datasets share and the target can score "
             "(how many in brackets). The diagonal (**bold**) is each head on its own test split.", "",
             "| trained on \\ tested on | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for source in names:
        texts = [cell_text(cells[source, t]) for t in names]
        texts = [f"**{t}**" if target == source else t for t, target in zip(texts, names)]
        lines.append(f"| {source} | " + " | ".join(texts) + " |")
    lines += ["", "## Drop from the diagonal", "", DROP_DEFINITION + ".", "",
              "| source | drop | per target (classes) |", "|---|---|---|"]
    for source in names:
        drop = dropped[source]["drop"]
        detail = "; ".join(f"{t}: {d:+.3f} ({len(c)})" for t, (d, c) in dropped[source]["cells"].items())
        drop = "-" if drop is None else f"{drop:+.3f}"
        lines.append(f"| {source} | {drop} | {detail or 'no target shares a scorable class'} |")
    lines += ["", "## Caches", "", "| name | dataset | classes | path | fingerprint |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {dataset_title(s.dataset)} | {len(s.attrs['classes'])} | {s.path.resolve()} | "
              f"{s.attrs['fingerprint'][:12]} |" for s in sources]
    lines += ["", "## Every cell", "", "| source | target | class pair | AUC | 95% CI | n+ | n- |",
              "|---|---|---|---|---|---|---|"]
    for cell in cells.values():
        for row in cell.rows:
            auc = "not scorable" if row["auc"] is None else f"{row['auc']:.3f}"
            ci = "" if row["auc"] is None else f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            pair = (f"{row['source_class']} ({dataset_title(_dataset(sources, cell.source))}) vs {row['target_class']} "
                    f"({dataset_title(_dataset(sources, cell.target))})")
            lines.append(f"| {cell.source} | {cell.target} | {pair} | {auc} | {ci} | {row['n_pos']} | {row['n_neg']} |")
    lines += ["", f"CIs: {n_bootstrap} patient-bootstrap resamples of each target's test split. Head settings "
              f"({len(settings_grid)} in the grid, chosen per source on its validation split): "
              "runs/<source>/config.json. "
              "Every AUC recomputes from evaluations/<source>-on-<target>/predictions_test.csv."]
    marks = _marks(sources)
    if marks:
        lines += ["", "**" + "; ".join(marks) + "**"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _dataset(sources, name) -> str:
    return next(s.dataset for s in sources if s.name == name)


def _marks(sources) -> list:
    return recipe_marks([source.attrs for source in sources])


def plot_matrix(path: Path, *, sources, cells, dropped) -> None:
    """Heatmap of the cells' mean AUCs, each annotated with its mean and class count; the
    diagonal outlined; cells without a shared scorable class grey and saying so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = [s.name for s in sources]
    values = np.array([[np.nan if cells[s, t].mean_auc is None else cells[s, t].mean_auc for t in names]
                       for s in names])
    size = 1.6 + 1.3 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # grey: no shared scorable class
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.5, vmax=1.0)
    fig.colorbar(image, ax=ax, label="mean AUC over shared classes")
    for i, source in enumerate(names):
        for j, target in enumerate(names):
            cell = cells[source, target]
            ax.text(j, i, _two_lines(cell_text(cell)), ha="center", va="center", fontsize=8,
                    color="black" if cell.mean_auc is None or cell.mean_auc > 0.75 else "white")
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, edgecolor="red"))
    ax.set_xticks(range(len(names)), [f"{n}\n({dataset_title(_dataset(sources, n))})" for n in names], fontsize=8)
    ax.set_yticks(range(len(names)), [f"{n}\n({dataset_title(_dataset(sources, n))})" for n in names], fontsize=8)
    ax.set_xlabel("tested on (test split)")
    ax.set_ylabel("trained on")
    drop_text = ", ".join(f"{s} {d['drop']:+.3f}" for s, d in dropped.items() if d["drop"] is not None)
    title = (f"{sources[0].attrs['backbone']}: transfer matrix (diagonal outlined)\n"
             f"drop from the diagonal: {drop_text or '-'}")
    ax.set_title(title, fontsize=9)
    if _marks(sources):
        fig.suptitle("; ".join(_marks(sources)), color="red", fontsize=9, weight="bold")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _two_lines(text: str) -> str:
    """A cell's text in two lines: `0.913` over `(4 classes)`, or `no` over `shared class`."""
    head, bracket, tail = text.partition(" (")
    return f"{head}\n({tail}" if bracket else text.replace(" ", "\n", 1)


def format_matrix(sources, cells, dropped) -> str:
    names = [s.name for s in sources]
    width = max(24, *(len(n) + 2 for n in names))
    lines = [f"{'trained on / tested on':<{width}}" + "".join(f"{n:>{width}}" for n in names)]
    for source in names:
        texts = [("*" if t == source else "") + cell_text(cells[source, t]) for t in names]
        lines.append(f"{source:<{width}}" + "".join(f"{t:>{width}}" for t in texts))
    lines.append("(* the diagonal: each head on its own test split)")
    for source in names:
        drop, targets = dropped[source]["drop"], len(dropped[source]["cells"])
        said = "no target shares a scorable class" if drop is None else f"{drop:+.3f} over {_count(targets, 'target')}"
        lines.append(f"drop from the diagonal, {source}: {said}")
    lines.append(f"({DROP_DEFINITION})")
    return "\n".join(lines)


def write_transfer(partial: Path, *, sources, cells, grid, n_bootstrap) -> dict:
    dropped = drops(cells, [s.name for s in sources])
    transfer_table(cells).to_csv(partial / "transfer.csv", index=False, float_format="%.6g")
    write_markdown(partial / "transfer.md", sources=sources, cells=cells, dropped=dropped, settings_grid=grid,
                   n_bootstrap=n_bootstrap)
    plot_matrix(partial / "transfer.png", sources=sources, cells=cells, dropped=dropped)
    write_json(partial / "transfer.json", {
        "caches": [{"name": s.name, "path": str(s.path.resolve()), "dataset": s.dataset,
                    "fingerprint": s.attrs["fingerprint"]} for s in sources],
        "settings_grid": grid, "bootstrap": {"resamples": n_bootstrap, "unit": "patient"},
        "drop_definition": DROP_DEFINITION, "drops": {s: d["drop"] for s, d in dropped.items()},
        "versions": versions()})
    return dropped


def main(args) -> int:
    out = Path(args.out or f"outputs/transfer/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    grid = head_settings.settings_grid(args)
    try:
        check_out_dir(out, kind=KIND, overwrite=args.overwrite)  # before any work
        check_efficiency_request(args)
        sources = check_caches(args.cache)
        check_metadata(sources, args.by)
        if args.train_fraction is not None:
            transfer_efficiency.check_train_patients(sources, args.train_fraction)
        device = resolve_device(args.device)
        partial = prepare_out_dir(out, kind=KIND, overwrite=args.overwrite)
    except (ExternalError, HeadsError, cache.CacheError, OutDirError, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.train_fraction is not None:
            table = transfer_efficiency.run_transfer_efficiency(
                partial, sources, grid=grid, device=device, fractions=args.train_fraction,
                repeats=args.repeats or head_settings.REPEATS.default)
            summary = transfer_efficiency.write_outputs(partial, table, sources=sources, grid=grid,
                                                       fractions=args.train_fraction, repeats=args.repeats or 1)
        else:
            cells = build_matrix(partial, out, sources, grid=grid, device=device, n_bootstrap=args.bootstrap,
                                 by=args.by, sensitivity=args.sensitivity)
            dropped = write_transfer(partial, sources=sources, cells=cells, grid=grid, n_bootstrap=args.bootstrap)
        finish_out_dir(partial, out, kind=KIND)
    except (HeadsError, ExternalError, cache.CacheError) as err:  # a source that cannot be trained on
        discard_partial(partial, kind=KIND)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutDirError as err:  # --out changed while the matrix was built: the work is kept in partial
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        discard_partial(partial, kind=KIND)
        raise
    if args.train_fraction is not None:
        print(transfer_efficiency.format_summary(summary, sources=sources))
        print(f"transfer: {out} (transfer_efficiency.md, .csv, .png; runs/ holds each source's efficiency run, "
              f"evaluations/ every fit's predictions on every test split)")
        return 0
    print(format_matrix(sources, cells, dropped))
    print(f"transfer: {out} (transfer.md, transfer.csv, transfer.png; runs/ and evaluations/ hold every run and cell)")
    return 0


def check_efficiency_request(args) -> None:
    """--repeats needs --train-fraction; a label-efficiency matrix reports AUCs per fraction only."""
    if args.repeats is not None and args.train_fraction is None:
        raise HeadsError("--repeats repeats a label-efficiency run; give --train-fraction too")
    if args.train_fraction is not None and (args.by or args.sensitivity is not None):
        raise HeadsError("--by and --sensitivity are not reported with --train-fraction (its figures are AUCs per "
                         "fraction); run heads.transfer without --train-fraction for them")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
