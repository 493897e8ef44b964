"""Every head setting, defined once: its default, its help, and its search range.

`heads.train` turns these into command-line options; `search` turns the ones with a `space`
into Optuna suggestions. A space is ("int", low, high), ("float", low, high),
("log", low, high) for a log-uniform float, or ("choice", [options]).
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

from cache.flags import Valid, parse_number


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    help: str
    space: tuple | None = None  # None: not searched
    choices: tuple | None = None
    hidden_only: bool = False  # meaningless for a linear head (depth 0): not searched there
    valid: Valid | None = None  # the range of a numeric setting


SETTINGS = (
    # depth and width bound the memory of one head: depth 8 x width 8192 is 2.2 GB of weights
    Setting("depth", 0, "hidden layers; 0 is a linear (logistic) head", ("int", 0, 4), valid=Valid(0, 8)),
    Setting("width", 512, "units per hidden layer", ("choice", [128, 256, 512, 1024]), hidden_only=True,
            valid=Valid(1, 8192)),
    Setting("dropout", 0.0, "dropout after each hidden layer", ("float", 0.0, 0.6), hidden_only=True,
            valid=Valid(0.0, 1.0, high_open=True)),
    Setting("lr", 1e-3, "learning rate", ("log", 1e-5, 1e-2), valid=Valid(0.0, 1.0, low_open=True)),
    Setting("weight_decay", 0.0, "L2 penalty (Adam) or decoupled decay (AdamW)", ("log", 1e-7, 1e-2),
            valid=Valid(0.0)),
    Setting("batch_size", 512, "rows per step", ("choice", [256, 512, 1024, 2048]), valid=Valid(1, 2 ** 20)),
    Setting("class_weighting", "balanced",
            "BCE weights per class from train frequencies: balanced, sqrt (of balanced), none",
            ("choice", ["balanced", "sqrt", "none"]), choices=("balanced", "sqrt", "none")),
    Setting("optimizer", "adam", "adam or adamw", choices=("adam", "adamw")),
    Setting("max_epochs", 100, "upper bound on epochs; early stopping usually ends sooner", valid=Valid(1, 100_000)),
    Setting("patience", 5, "epochs without a better validation mean AUC before stopping", valid=Valid(1, 100_000)),
    Setting("seed", 0, "seed for initialisation, shuffling and dropout", valid=Valid(0, 2 ** 63 - 1)),
    Setting("precision", "auto", "training precision; auto: bf16 autocast on CUDA and on CPUs with native bf16 "
            "(avx512_bf16 or amx_bf16), fp32 elsewhere (emulated bf16 is slower there)",
            choices=("auto", "fp32", "bf16")),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}
DEFAULTS = {setting.name: setting.default for setting in SETTINGS}

# Label efficiency (heads.train --train-fraction, heads/efficiency.py): settings of the run, not
# of a head, so they stay out of SETTINGS (and out of every head's settings and the search).
TRAIN_FRACTION = Setting("train_fraction", None, "comma list of shares of the train split's patients to train "
                         "on, each once (e.g. 0.01,0.1,0.25,1); writes a label-efficiency run",
                         valid=Valid(0.0, 1.0, low_open=True))
# each repeat fits one head (or grid) per fraction; the bound keeps a typo from queueing days of fits
REPEATS = Setting("repeats", 1, "repeats of --train-fraction, each with its own patient order and head seed",
                  valid=Valid(1, 1000))


def option(setting: Setting) -> str:
    return f"--{setting.name.replace('_', '-')}"


def parse_value(setting: Setting, text: str):
    """One command-line value of `setting`, checked against its type, choices and range;
    raises argparse.ArgumentTypeError with the allowed range (argparse turns it into one
    line and exit 2)."""
    if setting.choices is not None:
        if text not in setting.choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(setting.choices)}")
        return text
    return parse_number(text, kind=type(setting.default), valid=setting.valid)


def value_parser(setting: Setting, *, grid: bool):
    """argparse `type=` for a setting; with `grid`, a comma list gives a tuple of values."""
    def parse(text: str):
        if grid and "," in text:
            values = tuple(parse_value(setting, part.strip()) for part in text.split(","))
            if len(set(values)) < len(values):
                raise argparse.ArgumentTypeError(f"{text!r} lists a value twice")
            return values
        return parse_value(setting, text)
    parse.__name__ = setting.name  # argparse names the type in some messages
    return parse


def add_setting_args(parser: argparse.ArgumentParser, *, searched: bool = True, grid: bool = False) -> None:
    """One option per setting; `searched=False` leaves out the ones a search chooses. With
    `grid`, the searched settings also take comma lists (heads.train trains every combination)."""
    group = parser.add_argument_group("head settings (defaults and search ranges: heads/settings.py)")
    for setting in SETTINGS:
        if not searched and setting.space is not None:
            continue
        searched_in = f"; search: {describe_space(setting.space)}" if setting.space else ""
        allowed = f"; allowed {setting.valid.describe()}" if setting.valid else ""
        listed = "; a comma list trains each value" if grid and setting.space else ""
        group.add_argument(option(setting), type=value_parser(setting, grid=grid and setting.space is not None),
                           default=setting.default,
                           metavar=setting.name.upper() if setting.choices is None else "{" + ",".join(setting.choices) + "}",
                           help=f"{setting.help} (default: {setting.default}{allowed}{searched_in}{listed})")


def parse_fractions(text: str) -> tuple:
    """--train-fraction as argparse `type=`: a comma list of shares in TRAIN_FRACTION's range,
    each given once, in increasing order."""
    fractions = [parse_number(part.strip(), kind=float, valid=TRAIN_FRACTION.valid) for part in text.split(",")]
    if len(set(fractions)) < len(fractions):
        raise argparse.ArgumentTypeError(f"{text!r} lists a fraction twice; give each once")
    return tuple(sorted(fractions))


def add_efficiency_args(parser: argparse.ArgumentParser) -> None:
    """--train-fraction and --repeats (heads/efficiency.py)."""
    group = parser.add_argument_group("label efficiency (heads/efficiency.py)")
    group.add_argument(option(TRAIN_FRACTION), type=parse_fractions, default=None, metavar="F[,F...]",
                       help=f"{TRAIN_FRACTION.help} (default: off; allowed {TRAIN_FRACTION.valid.describe()})")
    group.add_argument(option(REPEATS), type=value_parser(REPEATS, grid=False), default=None,
                       metavar="N", help=f"{REPEATS.help} (default: {REPEATS.default}; allowed "
                                         f"{REPEATS.valid.describe()}; needs --train-fraction)")


def describe_space(space: tuple) -> str:
    kind, *bounds = space
    if kind == "choice":
        return " | ".join(map(str, bounds[0]))
    return f"{'log-uniform' if kind == 'log' else kind} {bounds[0]:g} to {bounds[1]:g}"


def settings_from_args(args) -> dict:
    """The settings given on the command line (those the parser has), over the defaults."""
    return {name: getattr(args, name, default) for name, default in DEFAULTS.items()}


def settings_grid(args) -> list:
    """Every combination of the settings given as comma lists (one dict when none is), in the
    order the lists were written."""
    given = settings_from_args(args)
    listed = {name: value for name, value in given.items() if isinstance(value, tuple)}
    combinations = itertools.product(*listed.values())
    return [{**given, **dict(zip(listed, values))} for values in combinations]


def search_space() -> dict:
    """The searched settings and their spaces: what a study is created with."""
    return {s.name: list(s.space) for s in SETTINGS if s.space is not None}


def suggest(trial, base: dict | None = None) -> dict:
    """Ask an Optuna trial for a full settings dict: searched ones suggested, the rest from
    `base` (default: DEFAULTS)."""
    chosen = dict(base or DEFAULTS)
    for setting in SETTINGS:
        if setting.space is None or (setting.hidden_only and chosen["depth"] == 0):
            continue
        kind, *bounds = setting.space
        if kind == "int":
            chosen[setting.name] = trial.suggest_int(setting.name, *bounds)
        elif kind == "float":
            chosen[setting.name] = trial.suggest_float(setting.name, *bounds)
        elif kind == "log":
            chosen[setting.name] = trial.suggest_float(setting.name, *bounds, log=True)
        else:
            chosen[setting.name] = trial.suggest_categorical(setting.name, bounds[0])
    return chosen
