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
the experiment state, which is what Tune resumes. It restores and saves them with Tune's own
``SearchGenerator.restore_from_dir`` / ``save_to_dir``, as Tune does on resume.

Why the study is not kept in Optuna's own storage (``OptunaSearch(storage=..., study_name=...)``,
written by Optuna at every ask and tell): Tune's ``searcher-state-*.pkl`` is OptunaSearch's whole
``__dict__``. Unpickled, the study reconnects to the storage, but the map from Tune's trial ids to
study trials, the set of trials already told and the sampler's random state still come from the
pickle's moment, so every case above remains, and one more appears (a trial the storage knows
finished but Tune's state shows running fails the sweep when it reports again:
``UpdateFinishedTrialError``). The repair would reconcile three moments instead of two, through
the same private fields, and a sweep folder on an object store has no place for an sqlite file.
docs/architecture.md ("Resume, the searcher's files") has the measurements.
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune.experiment.trial import Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from hilbert import storage

# Tune's file names (``max`` of the names is the newest: they end in the session's start time).
EXPERIMENT_STATE = "experiment_state-{}.json"  # TuneController.CKPT_FILE_TMPL
GENERATOR_STATE = SearchGenerator.CKPT_FILE_TMPL
SEARCHER_STATE = OptunaSearch.CKPT_FILE_TMPL


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
    newest = _newest_files(folder)
    if newest is None:
        return []  # nothing saved yet, or a searcher without state files
    trials = _saved_trials(folder.read_bytes(newest[EXPERIMENT_STATE]))
    with tempfile.TemporaryDirectory(prefix="hilbert-searcher-") as scratch:
        generator = _restore(folder, newest, Path(scratch))
        limiter, search = generator.searcher, generator.searcher.searcher
        repairs = (_repair_counter(generator, trials) + _repair_limiter(limiter, trials, retry_failed)
                   + _repair_study(search, trials, retry_failed))
        if repairs:
            _save(generator, folder, newest, Path(scratch))
    return repairs


def saved_study(tune_folder: str) -> optuna.Study | None:
    """The study in the searcher state Tune saved in a sweep's Tune folder (a path or a URI),
    restored as Tune restores it; None before the first save."""
    folder = storage.Folder(tune_folder)
    newest = _newest_files(folder)
    if newest is None:
        return None
    with tempfile.TemporaryDirectory(prefix="hilbert-searcher-") as scratch:
        return study_of(_restore(folder, newest, Path(scratch)).searcher.searcher)


def study_of(search: OptunaSearch) -> optuna.Study:
    """The study an ``OptunaSearch`` asks and tells (it has no public accessor for it)."""
    return _StudyTrials(search).study


def _newest_files(folder: storage.Folder) -> dict[str, str] | None:
    names = list(folder.files("", recursive=False))
    newest = {template: max(fnmatch.filter(names, template.format("*")), default=None)
              for template in (EXPERIMENT_STATE, GENERATOR_STATE, SEARCHER_STATE)}
    return None if None in newest.values() else newest


def _restore(folder: storage.Folder, newest: dict[str, str], scratch: Path) -> SearchGenerator:
    # Tune's chain for a searcher that cannot limit its own concurrency; restore_from_dir sets
    # every part's saved state (the limit too) over these defaults.
    generator = SearchGenerator(ConcurrencyLimiter(OptunaSearch(), max_concurrent=1))
    for template in (GENERATOR_STATE, SEARCHER_STATE):
        (scratch / newest[template]).write_bytes(folder.read_bytes(newest[template]))
    generator.restore_from_dir(str(scratch))
    return generator


def _save(generator: SearchGenerator, folder: storage.Folder, newest: dict[str, str], scratch: Path) -> None:
    """Tune's ``save_to_dir`` in the scratch folder, then each file over the one it replaces (the
    two newest may be from different sessions when the kill came between their uploads)."""
    prefix, suffix = GENERATOR_STATE.split("{}")
    session = newest[GENERATOR_STATE][len(prefix):-len(suffix)]
    generator.save_to_dir(str(scratch), session)
    for template in (GENERATOR_STATE, SEARCHER_STATE):
        folder.write_bytes(newest[template], (scratch / template.format(session)).read_bytes())


def _saved_trials(experiment_state: bytes) -> list[SavedTrial]:
    # Plain JSON around each trial's own JSON document, which Trial.from_json_state decodes (the
    # rest, the controller's state, is not read: it may hold values only Tune's private decoder opens).
    state = json.loads(experiment_state)
    trials = []
    for json_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(json_state, stub=True)
        trial.restore_run_metadata(run_metadata)
        trials.append(SavedTrial(trial.trial_id, trial.status, dict(trial.config), dict(trial.last_result or {})))
    return trials


def _repair_counter(generator: SearchGenerator, trials: list[SavedTrial]) -> list[str]:
    state = generator.get_state()
    if state["counter"] >= len(trials):
        return []
    generator.set_state({**state, "counter": len(trials)})
    return [f"trial counter {state['counter']} -> {len(trials)}"]


def _repair_limiter(limiter: ConcurrencyLimiter, trials: list[SavedTrial], retry_failed: bool) -> list[str]:
    live = {trial.trial_id for trial in trials if trial.runs_on_resume(retry_failed)}
    if limiter.live_trials == live:
        return []
    repair = f"running trials {sorted(limiter.live_trials)} -> {sorted(live)}"
    limiter.live_trials, limiter.num_unfinished_live_trials = live, len(live)
    return [repair]


def _repair_study(search: OptunaSearch, trials: list[SavedTrial], retry_failed: bool) -> list[str]:
    study = _StudyTrials(search)
    repairs: list[str] = []
    added = False
    for trial in trials:
        if trial.runs_on_resume(retry_failed):
            # A study trial that completed stays (the resumed trial reports its score again,
            # which the searcher ignores); one that failed or was pruned runs again.
            if not study.is_open(trial.trial_id) and study.ended_as(trial.trial_id) != optuna.trial.TrialState.COMPLETE:
                repairs.append(f"study: {'reopened' if study.knows(trial.trial_id) else 'added'} trial "
                               f"{trial.trial_id}, which runs again")
                added = added or not study.knows(trial.trial_id)
                study.add(trial.trial_id, trial.config)
            continue
        if not study.knows(trial.trial_id):
            study.add(trial.trial_id, trial.config)
            added = True
        elif not study.is_open(trial.trial_id):
            continue  # the study knows how it ended
        repairs.append(f"study: told how trial {trial.trial_id} ended ({trial.status})")
        search.on_trial_complete(trial.trial_id, result=trial.last_result, error=trial.status == "ERROR")
    saved = {trial.trial_id for trial in trials}
    for trial_id in study.open_trial_ids() - saved:
        repairs.append(f"study: {trial_id} was never saved as a trial, ended FAILED")
        search.on_trial_complete(trial_id, error=True)
    if added:
        # The sampler's random state is from before it proposed the added trials: left as it is,
        # it would propose their configurations again.
        study.study.sampler.reseed_rng()
    return repairs


class _StudyTrials:
    """Which study trial is which Tune trial, in an ``OptunaSearch``. It keeps that in private
    fields (``_ot_study``, ``_ot_trials``: Tune trial id -> study trial, ``_completed_trials``:
    those it has told) and has no public accessor: this class is the one place that reads them,
    and writes only to forget a trial that runs again. Everything else goes through
    ``OptunaSearch``'s public ``suggest``/``on_trial_complete`` and Optuna's public API."""

    def __init__(self, search: OptunaSearch):
        fields = ("_ot_study", "_ot_trials", "_completed_trials")
        assert all(hasattr(search, field) for field in fields), \
            f"this Ray's OptunaSearch lacks {fields}: hilbert.sweep.resume needs updating for it"
        self._search = search
        self.study: optuna.Study = search._ot_study

    def knows(self, trial_id: str) -> bool:
        return trial_id in self._search._ot_trials

    def is_open(self, trial_id: str) -> bool:
        return self.knows(trial_id) and trial_id not in self._search._completed_trials

    def ended_as(self, trial_id: str) -> optuna.trial.TrialState | None:
        if not self.knows(trial_id):
            return None
        return self.study.get_trials(deepcopy=False)[self._search._ot_trials[trial_id].number].state

    def open_trial_ids(self) -> set[str]:
        return {trial_id for trial_id in self._search._ot_trials if self.is_open(trial_id)}

    def add(self, trial_id: str, config: dict[str, Any]) -> None:
        """A fresh study trial with this configuration, asked and mapped by ``suggest``."""
        self._search._ot_trials.pop(trial_id, None)
        self._search._completed_trials.discard(trial_id)
        self.study.enqueue_trial(flatten_dict(config, delimiter="/"))
        self._search.suggest(trial_id)
