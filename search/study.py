"""The study: created or resumed only when it searches the same thing on the same rows, with
the sampler and pruner the flags name, and counted so that it ends with exactly N trials."""
from __future__ import annotations

import json
import warnings

import optuna
from optuna.trial import TrialState

from heads.data import image_ids_sha256
from search.storage import SearchError, mask_text, mask_url, open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
FAIL_REASON = "fail_reason"  # the user attribute that says why a trial failed (trials.csv shows it)


def rows_digest(data) -> dict:
    """Which rows each split uses, as a count and a hash of the sorted image ids: two caches
    with one fingerprint but other rows done (an extraction finished later) differ here."""
    return {name: {"rows": len(split.image_ids), "sha256": image_ids_sha256(split.image_ids)[:16]}
            for name, split in data.splits.items()}


def study_identity(*, data, fingerprints: list, fixed: dict, space: dict) -> dict:
    """What a resumed study must match: the caches, the rows used, the searched space and the fixed settings."""
    return {"cache_fingerprint": fingerprints[0] if len(fingerprints) == 1 else fingerprints,
            "rows": rows_digest(data), "search_space": space, "fixed_settings": fixed}


def open_study(url: str, *, study_name: str, identity: dict, pruner: str, sampler_seed: int,
               max_epochs: int, stale_after: float) -> optuna.Study:
    """Create the study, or resume it after checking it searches the same thing on the same rows."""
    storage = open_storage(url, stale_after=stale_after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=make_pruner(pruner, max_epochs=max_epochs), load_if_exists=True)
    except Exception as err:  # storage backends raise many types
        raise SearchError(f"cannot open study {study_name!r} in {mask_url(url)}: "
                          f"{mask_text(str(err).strip().splitlines()[0], url)}") from None
    stored = study.user_attrs
    for key, value in identity.items():
        if key not in stored:
            study.set_user_attr(key, value)
        elif json.dumps(stored[key], sort_keys=True) != json.dumps(value, sort_keys=True):
            raise SearchError(f"study {study_name!r} in {mask_url(url)} was made with another {key} "
                              f"({stored[key]} vs now {value}); refusing to mix trials: use another "
                              f"--study-name or --out")
    return study


def make_pruner(name: str, *, max_epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def admitted(study, trial, target: int) -> bool:
    """Trial numbers are unique and in creation order in every Optuna storage, so counting the
    not-failed trials created before this one (finished, or asked and still running) decides,
    without a race, whether it is among the first `target` of the study."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
    return len(earlier) < target


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Trials left RUNNING in a study only this process can own were cut off by a kill."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        fail_trial(study, trial, "interrupted (process killed)")


def fail_trial(study: optuna.Study, trial, reason: str) -> bool:
    """Fail a RUNNING trial, its reason recorded first (a finished trial's attributes are frozen);
    False when it had already finished (another worker told or failed it first).

    Optuna's public API sets a trial's attributes only through the `optuna.Trial` that `ask()`
    returned to the process that asked for it. The trials failed here are mostly not that: a
    killed run's, or a dead worker's in a shared study, read back from the storage as
    FrozenTrials. So the reason is written through the storage by trial id, the one private
    call; the state is told through the public `tell`."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
        study.tell(trial.number, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
        return False
    return True


def best_trial(study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise SearchError(f"study {study.study_name!r} has no completed trial yet (all failed or pruned); "
                          f"see trials.csv for the reasons, then rerun") from None


def best_text(study) -> str:
    try:
        return f"best val AUC {study.best_value:.4f}"
    except ValueError:
        return ""
