"""Every head setting, defined once: its default, its help, and its search range.

`heads.train` turns these into command-line options; `search` turns the ones with a `space`
into Optuna suggestions. A space is ("int", low, high), ("float", low, high),
("log", low, high) for a log-uniform float, or ("choice", [options]).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    help: str
    space: tuple | None = None  # None: not searched
    choices: tuple | None = None
    hidden_only: bool = False  # meaningless for a linear head (depth 0): not searched there


SETTINGS = (
    Setting("depth", 0, "hidden layers; 0 is a linear (logistic) head", ("int", 0, 4)),
    Setting("width", 512, "units per hidden layer", ("choice", [128, 256, 512, 1024]), hidden_only=True),
    Setting("dropout", 0.0, "dropout after each hidden layer", ("float", 0.0, 0.6), hidden_only=True),
    Setting("lr", 1e-3, "learning rate", ("log", 1e-5, 1e-2)),
    Setting("weight_decay", 0.0, "L2 penalty (Adam) or decoupled decay (AdamW)", ("log", 1e-7, 1e-2)),
    Setting("batch_size", 512, "rows per step", ("choice", [256, 512, 1024, 2048])),
    Setting("class_weighting", "balanced",
            "BCE weights per class from train frequencies: balanced, sqrt (of balanced), none",
            ("choice", ["balanced", "sqrt", "none"]), choices=("balanced", "sqrt", "none")),
    Setting("optimizer", "adam", "adam or adamw", choices=("adam", "adamw")),
    Setting("max_epochs", 100, "upper bound on epochs; early stopping usually ends sooner"),
    Setting("patience", 5, "epochs without a better validation mean AUC before stopping"),
    Setting("seed", 0, "seed for initialisation, shuffling and dropout"),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}
DEFAULTS = {setting.name: setting.default for setting in SETTINGS}


def add_setting_args(parser: argparse.ArgumentParser, *, searched: bool = True) -> None:
    """One option per setting; `searched=False` leaves out the ones a search chooses."""
    group = parser.add_argument_group("head settings (defaults and search ranges: heads/settings.py)")
    for setting in SETTINGS:
        if not searched and setting.space is not None:
            continue
        searched_in = f"; search: {describe_space(setting.space)}" if setting.space else ""
        group.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default),
                           default=setting.default, choices=setting.choices,
                           help=f"{setting.help} (default: {setting.default}{searched_in})")


def describe_space(space: tuple) -> str:
    kind, *bounds = space
    if kind == "choice":
        return " | ".join(map(str, bounds[0]))
    return f"{'log-uniform' if kind == 'log' else kind} {bounds[0]:g} to {bounds[1]:g}"


def settings_from_args(args) -> dict:
    """The settings given on the command line (those the parser has), over the defaults."""
    return {name: getattr(args, name, default) for name, default in DEFAULTS.items()}


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
