"""The searcher's saved state, repaired before a sweep resumes when Tune saved it at another
moment than its trials (a driver killed between the files: what CI hit, one run in four, with
the sweep on an object store). The files are written by Tune's own classes, as Tune writes them;
the repaired state is read back as Tune reads it on resume."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from ray.tune import PlacementGroupFactory
from ray.tune.experiment.trial import Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.utils.serialization import TuneFunctionEncoder

from hilbert.sweep.config import load_sweep
from hilbert.sweep.resume import repair_saved_search
from hilbert.sweep.search import make_searcher
from hilbert.train.report import OBJECTIVE

REPOSITORY = Path(__file__).parents[1]
SESSION = "2026-11-26_06-00-00"


def searcher_chain(concurrency: int = 1) -> tuple[SearchGenerator, ConcurrencyLimiter, object]:
    """What Tune builds from the sweep's searcher: generator(limiter(Optuna)). Every proposal of
    these tests is a seeded random one (TPE's start-up phase), as in the sweep CI saw fail."""
    sweep = load_sweep(REPOSITORY / "tune" / "demo.yaml")
    sweep.searcher.startup_trials = 10
    optuna_search = make_searcher(sweep)
    limiter = ConcurrencyLimiter(optuna_search, max_concurrent=concurrency)
    return SearchGenerator(limiter), limiter, optuna_search


def propose(generator: SearchGenerator, limiter: ConcurrencyLimiter, trial_id: str) -> dict:
    config = limiter.suggest(trial_id)
    assert config is not None, f"the searcher proposed nothing for {trial_id}"
    generator._counter += 1  # as SearchGenerator.next_trial counts the trials it creates
    return config


def write_experiment_state(folder: Path, trials: list[tuple[str, str, dict, dict]]) -> None:
    """``experiment_state-*.json`` as Tune's controller writes it: (trial id, status, config,
    last result) for each trial."""
    data = []
    for trial_id, status, config, result in trials:
        trial = Trial("hilbert_trial", config=config, trial_id=trial_id, stub=True,
                      placement_group_factory=PlacementGroupFactory([{"CPU": 1}]))
        trial.create_placement_group_factory()  # as the controller does when it adds a trial
        trial.status = status
        trial.run_metadata.last_result = result
        data.append(trial.get_json_state())
    state = {"trial_data": data, "runner_data": {}, "stats": {"start_time": 0.0}}
    (folder / f"experiment_state-{SESSION}.json").write_text(json.dumps(state, cls=TuneFunctionEncoder))


def restored(folder: Path, concurrency: int = 1) -> tuple[SearchGenerator, ConcurrencyLimiter, object]:
    """A fresh searcher chain restored from the folder, as ``Tuner.restore`` does."""
    generator, limiter, optuna_search = searcher_chain(concurrency)
    generator.restore_from_dir(str(folder))
    return generator, limiter, optuna_search


def study_states(optuna_search) -> list[optuna.trial.TrialState]:
    return [trial.state for trial in optuna_search._ot_study.get_trials(deepcopy=False)]


def test_a_study_saved_before_a_trial_was_proposed_learns_it_and_does_not_propose_it_again(tmp_path: Path):
    generator, limiter, _ = searcher_chain()
    first = propose(generator, limiter, "first")
    limiter.on_trial_complete("first", {OBJECTIVE: 0.7})
    generator.save_to_dir(str(tmp_path), SESSION)  # saved here: the study knows one trial
    second = propose(generator, limiter, "second")
    # ...but the trials were saved after the second trial started, then the driver died.
    write_experiment_state(tmp_path, [("first", "TERMINATED", first, {OBJECTIVE: 0.7}),
                                      ("second", "RUNNING", second, {OBJECTIVE: 0.5})])

    # Without the repair, Tune's restore fails on the second trial's first result.
    _, stale_limiter, _ = restored(tmp_path)
    with pytest.raises(KeyError):
        stale_limiter.on_trial_result("second", {OBJECTIVE: 0.6, "training_iteration": 2})

    repairs = repair_saved_search(str(tmp_path), retry_failed=False)
    assert any("second" in line for line in repairs), repairs
    generator, limiter, optuna_search = restored(tmp_path)
    assert generator._counter == 2
    assert limiter.live_trials == {"second"}
    limiter.on_trial_result("second", {OBJECTIVE: 0.6, "training_iteration": 2})
    limiter.on_trial_complete("second", {OBJECTIVE: 0.6})
    study = optuna_search._ot_study
    assert sorted(trial.value for trial in study.get_trials(deepcopy=False)) == [0.6, 0.7]
    added = study.get_trials(deepcopy=False)[1]
    assert all(added.params[key] == pytest.approx(value) for key, value in second.items())
    third = propose(generator, limiter, "third")
    assert third != second and third != first  # the sampler did not go back to where it was
    assert repair_saved_search(str(tmp_path), retry_failed=False) == []  # nothing left to repair


def test_a_limiter_saved_while_a_finished_trial_ran_lets_the_next_trial_start(tmp_path: Path):
    generator, limiter, _ = searcher_chain()
    first = propose(generator, limiter, "first")
    generator.save_to_dir(str(tmp_path), SESSION)  # saved while the first trial ran
    write_experiment_state(tmp_path, [("first", "TERMINATED", first, {OBJECTIVE: 0.7})])

    _, stale_limiter, _ = restored(tmp_path)
    assert stale_limiter.suggest("second") is None  # a sweep of one trial at a time would wait forever

    repair_saved_search(str(tmp_path), retry_failed=False)
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == set()
    assert study_states(optuna_search) == [optuna.trial.TrialState.COMPLETE]  # it learnt the score
    assert optuna_search._ot_study.best_value == 0.7
    assert propose(generator, limiter, "second") != first


def test_a_trial_the_study_proposed_but_tune_never_saved_ends_failed(tmp_path: Path):
    generator, limiter, optuna_search = searcher_chain()
    first = propose(generator, limiter, "first")
    limiter.on_trial_complete("first", {OBJECTIVE: 0.7})
    propose(generator, limiter, "lost")  # proposed just before the kill; Tune's state lacks it
    generator.save_to_dir(str(tmp_path), SESSION)
    write_experiment_state(tmp_path, [("first", "TERMINATED", first, {OBJECTIVE: 0.7})])

    repair_saved_search(str(tmp_path), retry_failed=False)
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == set()  # the lost trial holds no slot
    assert study_states(optuna_search) == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert generator._counter == 2  # the counter never goes back: trial ids stay unique
    assert propose(generator, limiter, "third")


def test_a_failed_trial_retried_gets_a_new_study_trial_and_its_score_counts(tmp_path: Path):
    generator, limiter, optuna_search = searcher_chain()
    failed = propose(generator, limiter, "failed")
    limiter.on_trial_complete("failed", error=True)
    generator.save_to_dir(str(tmp_path), SESSION)
    write_experiment_state(tmp_path, [("failed", "ERROR", failed, {})])

    assert repair_saved_search(str(tmp_path), retry_failed=False) == []  # kept as failed: agrees
    repair_saved_search(str(tmp_path), retry_failed=True)
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == {"failed"}
    limiter.on_trial_complete("failed", {OBJECTIVE: 0.8})
    assert study_states(optuna_search) == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert optuna_search._ot_study.best_trial.params == pytest.approx(failed)
