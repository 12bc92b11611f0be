"""Before a sweep resumes: the repair of the searcher's saved state.

Why: Tune saves a sweep's state as three files, written one after the other and
uploaded to the sweep's storage one by one in the background: ``experiment_state-*.json`` (the
trials), ``search_gen_state-*.json`` (the number of trials created, and the concurrency
limiter's live trials) and ``searcher-state-*.pkl`` (the Optuna study). A driver killed between
two of them leaves files from different moments, and Tune restores them as they are:

- a trial the study never heard of (it was proposed after the study was saved): Tune fails the
  sweep on that trial's first result (``KeyError`` in ``OptunaSearch``), and the study's seeded
  sampler, back where it was, proposes the very same configuration again;
- a trial the limiter still counts as running though it finished: with one trial at a time,
  the limiter never lets the searcher propose another, and the sweep waits forever;
- a trial that finished, but the study was saved while it ran: Optuna never learns its score.

:func:`repair_saved_search` rewrites the two searcher files so they agree with the trials in
the experiment state, which is what Tune resumes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray.cloudpickle as cloudpickle  # how Tune writes the generator's state
from ray.tune.experiment.trial import Trial
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict
from ray.tune.utils.serialization import _loads_with_cloudpickle  # Tune's own state: trusted

from hilbert import storage

# Tune's file names (``max`` of the names is the newest: they end in the session's start time).
EXPERIMENT_STATE = "experiment_state-"
GENERATOR_STATE = "search_gen_state-"
SEARCHER_STATE = "searcher-state-"


@dataclass(frozen=True)
class SavedTrial:
    """What the experiment state says of one trial."""

    trial_id: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    config: dict[str, Any]
    last_result: dict[str, Any]

    def runs_on_resume(self, retry_failed: bool) -> bool:
        return self.status != "TERMINATED" and (self.status != "ERROR" or retry_failed)


def repair_saved_search(tune_folder: str, *, retry_failed: bool) -> list[str]:
    """Make the newest saved searcher state agree with the newest saved experiment state (see
    the module's docstring); returns a line per repair, none when they already agreed.

    The experiment state is the truth (Tune resumes its trials whatever the searcher says):
    - the trial counter is at least the number of trials, so no extra trial is created;
    - the concurrency limiter's live trials are exactly those that run on resume;
    - the study holds every trial: one it lacks is added with its configuration (and its score
      when it finished), after which the sampler is reseeded so that it does not propose that
      configuration again; a trial that runs again (``retry_failed``) gets a fresh study trial
      with the same configuration; a study trial that Tune does not know (proposed just before
      the kill, never saved as a trial) ends FAILED.
    The two files are rewritten in place, each in one piece.
    """
    folder = storage.Folder(tune_folder)
    names = set(folder.files("", recursive=False))
    newest = {prefix: max((n for n in names if n.startswith(prefix)), default=None)
              for prefix in (EXPERIMENT_STATE, GENERATOR_STATE, SEARCHER_STATE)}
    if None in newest.values():
        return []  # nothing saved yet, or a searcher without state files
    trials = _saved_trials(folder.read_bytes(newest[EXPERIMENT_STATE]))
    repairs: list[str] = []
    generator_state = cloudpickle.loads(folder.read_bytes(newest[GENERATOR_STATE]))
    if _repair_generator(generator_state, trials, retry_failed, repairs):
        folder.write_bytes(newest[GENERATOR_STATE], cloudpickle.dumps(generator_state))
    with tempfile.TemporaryDirectory(prefix="hilbert-searcher-") as scratch:
        local = Path(scratch) / "searcher.pkl"
        local.write_bytes(folder.read_bytes(newest[SEARCHER_STATE]))
        if _repair_optuna(local, trials, retry_failed, repairs):
            folder.write_bytes(newest[SEARCHER_STATE], local.read_bytes())
    return repairs


def _saved_trials(experiment_state: bytes) -> list[SavedTrial]:
    state = _loads_with_cloudpickle(experiment_state)
    trials = []
    for json_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(json_state, stub=True)
        trial.restore_run_metadata(run_metadata)
        trials.append(SavedTrial(trial.trial_id, trial.status, dict(trial.config), dict(trial.last_result or {})))
    return trials


def _repair_generator(state: dict[str, Any], trials: list[SavedTrial], retry_failed: bool,
                      repairs: list[str]) -> bool:
    changed = False
    if state.get("counter", 0) < len(trials):
        repairs.append(f"trial counter {state['counter']} -> {len(trials)}")
        state["counter"], changed = len(trials), True
    limiter = state.get("name:ConcurrencyLimiter")
    if limiter is not None and limiter.get("_limit_concurrency", True) and not limiter.get("batch", False):
        live = {trial.trial_id for trial in trials if trial.runs_on_resume(retry_failed)}
        if set(limiter["live_trials"]) != live:
            repairs.append(f"running trials {sorted(limiter['live_trials'])} -> {sorted(live)}")
            limiter["live_trials"], limiter["num_unfinished_live_trials"], changed = live, len(live), True
    return changed


def saved_optuna_search(path: Path):
    """The ``OptunaSearch`` in a ``searcher-state-*.pkl`` file, as Tune saved it (no set-up)."""
    search = OptunaSearch.__new__(OptunaSearch)
    search.restore(str(path))
    return search


def _repair_optuna(path: Path, trials: list[SavedTrial], retry_failed: bool, repairs: list[str]) -> bool:
    search = saved_optuna_search(path)
    study = search._ot_study
    changed = unseen = False

    def add_to_study(trial: SavedTrial) -> None:
        flat = flatten_dict(trial.config, delimiter="/")
        study.enqueue_trial({key: flat[key] for key in search._space if key in flat})
        search._ot_trials[trial.trial_id] = study.ask(fixed_distributions=search._space)
        search._completed_trials.discard(trial.trial_id)

    ended_as = {ot_trial.number: ot_trial.state for ot_trial in study.get_trials(deepcopy=False)}
    for trial in trials:
        known = trial.trial_id in search._ot_trials
        open_in_study = known and trial.trial_id not in search._completed_trials
        if trial.runs_on_resume(retry_failed):
            # A study trial that completed stays (the resumed trial reports its score again,
            # which the searcher ignores); one that failed or was pruned runs again.
            completed = known and ended_as.get(search._ot_trials[trial.trial_id].number) == \
                optuna.trial.TrialState.COMPLETE
            if not open_in_study and not completed:
                repairs.append(f"study: {'reopened' if known else 'added'} trial {trial.trial_id}, which runs again")
                add_to_study(trial)
                unseen, changed = unseen or not known, True
            continue
        if not known:
            add_to_study(trial)
            unseen = True
        elif not open_in_study:
            continue  # the study knows how it ended
        repairs.append(f"study: told how trial {trial.trial_id} ended ({trial.status})")
        search.on_trial_complete(trial.trial_id, result=trial.last_result, error=trial.status == "ERROR")
        changed = True
    saved = {trial.trial_id for trial in trials}
    for trial_id, ot_trial in list(search._ot_trials.items()):
        if trial_id not in saved and trial_id not in search._completed_trials:
            repairs.append(f"study: {trial_id} was never saved as a trial, ended FAILED")
            study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            search._completed_trials.add(trial_id)
            changed = True
    if unseen:
        # The sampler's random state is from before it proposed the added trials: left as it is,
        # it would propose their configurations again.
        study.sampler.reseed_rng()
    if changed:
        search.save(str(path))
    return changed
