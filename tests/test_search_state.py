"""The searcher's saved state, repaired before a sweep resumes when Tune saved it at another
moment than its trials (a driver killed between the files: what CI hit, one run in four, with
the sweep on an object store). Everything goes through Tune's public classes as its controller
uses them: the searcher chain proposes real ``Trial`` objects (``SearchGenerator.next_trial``)
and saves and restores itself (``save_to_dir``, ``restore_from_dir``); the experiment state is
written from those trials' own ``get_json_state``; the study is read with Optuna's API."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from ray.tune.experiment import Experiment, Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.serialization import TuneFunctionEncoder

from hilbert.sweep.config import load_sweep
from hilbert.sweep.resume import repair_saved_search, saved_study, study_of
from hilbert.sweep.search import make_searcher
from hilbert.train.report import OBJECTIVE

REPOSITORY = Path(__file__).parents[1]
SESSION = "2026-11-26_06-00-00"
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def hilbert_trial(config):  # the trainable's stand-in: nothing here runs a trial
    pass


def searcher_chain(folder: Path, concurrency: int = 1) -> tuple[SearchGenerator, ConcurrencyLimiter, OptunaSearch]:
    """What Tune builds from the sweep's searcher: generator(limiter(Optuna)). Every proposal of
    these tests is a seeded random one (TPE's start-up phase), as in the sweep CI saw fail."""
    sweep = load_sweep(REPOSITORY / "tune" / "demo.yaml")
    sweep.searcher.startup_trials = 10
    optuna_search = make_searcher(sweep)
    limiter = ConcurrencyLimiter(optuna_search, max_concurrent=concurrency)
    generator = SearchGenerator(limiter)
    generator.add_configurations(Experiment("sweep", hilbert_trial, num_samples=10, storage_path=str(folder / "ray")))
    return generator, limiter, optuna_search


def propose(generator: SearchGenerator) -> Trial:
    trial = generator.next_trial()
    assert trial is not None, "the searcher proposed nothing"
    return trial


def write_experiment_state(folder: Path, trials: list[tuple[Trial, str, dict]]) -> None:
    """``experiment_state-*.json`` as Tune's controller writes it: each trial with its status and
    last result."""
    for trial, status, result in trials:
        trial.create_placement_group_factory()  # as the controller does when it adds a trial
        trial.set_status(status)
        trial.update_last_result(dict(result))
    state = {"trial_data": [trial.get_json_state() for trial, _, _ in trials], "runner_data": {},
             "stats": {"start_time": 0.0}}
    (folder / f"experiment_state-{SESSION}.json").write_text(json.dumps(state, cls=TuneFunctionEncoder))


def restored(folder: Path, concurrency: int = 1) -> tuple[SearchGenerator, ConcurrencyLimiter, OptunaSearch]:
    """A fresh searcher chain restored from the folder, as ``Tuner.restore`` does."""
    generator, limiter, optuna_search = searcher_chain(folder, concurrency)
    generator.restore_from_dir(str(folder))
    return generator, limiter, optuna_search


def study_states(study: optuna.Study) -> list[optuna.trial.TrialState]:
    return [trial.state for trial in study.trials]


def test_a_study_saved_before_a_trial_was_proposed_learns_it_and_does_not_propose_it_again(tmp_path: Path):
    generator, limiter, _ = searcher_chain(tmp_path)
    first = propose(generator)
    limiter.on_trial_complete(first.trial_id, {OBJECTIVE: 0.7})
    generator.save_to_dir(str(tmp_path), SESSION)  # saved here: the study knows one trial
    second = propose(generator)
    # ...but the trials were saved after the second trial started, then the driver died.
    write_experiment_state(tmp_path, [(first, "TERMINATED", {OBJECTIVE: 0.7}), (second, "RUNNING", {OBJECTIVE: 0.5})])

    # Without the repair, Tune's restore fails on the second trial's first result.
    _, stale_limiter, _ = restored(tmp_path)
    with pytest.raises(KeyError):
        stale_limiter.on_trial_result(second.trial_id, {OBJECTIVE: 0.6, "training_iteration": 2})

    repairs = repair_saved_search(str(tmp_path), retry_failed=False)
    assert any(second.trial_id in line for line in repairs), repairs
    generator, limiter, optuna_search = restored(tmp_path)
    assert generator.get_state()["counter"] == 2
    assert limiter.live_trials == {second.trial_id}
    limiter.on_trial_result(second.trial_id, {OBJECTIVE: 0.6, "training_iteration": 2})
    limiter.on_trial_complete(second.trial_id, {OBJECTIVE: 0.6})
    study = study_of(optuna_search)
    assert sorted(trial.value for trial in study.trials) == [0.6, 0.7]
    assert study.trials[1].params == pytest.approx(second.config)
    third = propose(generator)
    assert third.config != second.config and third.config != first.config  # the sampler did not go back
    assert repair_saved_search(str(tmp_path), retry_failed=False) == []  # nothing left to repair


def test_a_trial_proposed_and_finished_after_the_study_was_saved_is_added_with_its_score(tmp_path: Path):
    generator, limiter, _ = searcher_chain(tmp_path)
    generator.save_to_dir(str(tmp_path), SESSION)  # saved before any trial
    first = propose(generator)
    limiter.on_trial_complete(first.trial_id, {OBJECTIVE: 0.4})
    write_experiment_state(tmp_path, [(first, "TERMINATED", {OBJECTIVE: 0.4})])

    repair_saved_search(str(tmp_path), retry_failed=False)
    generator, limiter, _ = restored(tmp_path)
    study = saved_study(str(tmp_path))
    assert study_states(study) == [COMPLETE] and study.best_value == 0.4
    assert study.best_params == pytest.approx(first.config)
    assert generator.get_state()["counter"] == 1 and limiter.live_trials == set()
    assert propose(generator).config != first.config


def test_a_limiter_saved_while_a_finished_trial_ran_lets_the_next_trial_start_and_the_study_learns_its_score(
        tmp_path: Path):
    generator, limiter, _ = searcher_chain(tmp_path)
    first = propose(generator)
    generator.save_to_dir(str(tmp_path), SESSION)  # saved while the first trial ran
    write_experiment_state(tmp_path, [(first, "TERMINATED", {OBJECTIVE: 0.7})])

    stale_generator, _, _ = restored(tmp_path)
    assert stale_generator.next_trial() is None  # a sweep of one trial at a time would wait forever

    repair_saved_search(str(tmp_path), retry_failed=False)
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == set()
    study = study_of(optuna_search)
    assert study_states(study) == [COMPLETE] and study.best_value == 0.7  # it learnt the score
    assert propose(generator).config != first.config


def test_a_trial_the_study_proposed_but_tune_never_saved_ends_failed(tmp_path: Path):
    generator, limiter, _ = searcher_chain(tmp_path)
    first = propose(generator)
    limiter.on_trial_complete(first.trial_id, {OBJECTIVE: 0.7})
    lost = propose(generator)  # proposed just before the kill; Tune's state lacks it
    generator.save_to_dir(str(tmp_path), SESSION)
    write_experiment_state(tmp_path, [(first, "TERMINATED", {OBJECTIVE: 0.7})])

    repairs = repair_saved_search(str(tmp_path), retry_failed=False)
    assert any(lost.trial_id in line and "FAILED" in line for line in repairs), repairs
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == set()  # the lost trial holds no slot
    assert study_states(study_of(optuna_search)) == [COMPLETE, FAIL]
    assert generator.get_state()["counter"] == 2  # the counter never goes back
    assert propose(generator)


def test_a_failed_trial_retried_gets_a_new_study_trial_and_its_score_counts(tmp_path: Path):
    generator, limiter, _ = searcher_chain(tmp_path)
    failed = propose(generator)
    limiter.on_trial_complete(failed.trial_id, error=True)
    generator.save_to_dir(str(tmp_path), SESSION)
    write_experiment_state(tmp_path, [(failed, "ERROR", {})])

    assert repair_saved_search(str(tmp_path), retry_failed=False) == []  # kept as failed: agrees
    repair_saved_search(str(tmp_path), retry_failed=True)
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == {failed.trial_id}
    limiter.on_trial_result(failed.trial_id, {OBJECTIVE: 0.8, "training_iteration": 1})
    limiter.on_trial_complete(failed.trial_id, {OBJECTIVE: 0.8})
    study = study_of(optuna_search)
    assert study_states(study) == [FAIL, COMPLETE]
    assert study.best_trial.params == pytest.approx(failed.config)


def test_searcher_files_from_two_sessions_are_each_repaired_in_place(tmp_path: Path):
    later = "2026-11-27_06-00-00"
    generator, limiter, _ = searcher_chain(tmp_path)
    first = propose(generator)
    generator.save_to_dir(str(tmp_path), SESSION)  # the first session's files, while the trial ran
    limiter.on_trial_complete(first.trial_id, {OBJECTIVE: 0.7})
    generator.save_to_dir(str(tmp_path), later)  # a resumed session's, whose generator state...
    (tmp_path / f"search_gen_state-{later}.json").unlink()  # ...never reached the store
    write_experiment_state(tmp_path, [(first, "TERMINATED", {OBJECTIVE: 0.7})])

    assert repair_saved_search(str(tmp_path), retry_failed=False) == [f"running trials ['{first.trial_id}'] -> []"]
    assert sorted(path.name for path in tmp_path.glob("search*-*")) == [
        f"search_gen_state-{SESSION}.json", f"searcher-state-{SESSION}.pkl", f"searcher-state-{later}.pkl"]
    generator, limiter, optuna_search = restored(tmp_path)
    assert limiter.live_trials == set() and study_states(study_of(optuna_search)) == [COMPLETE]
    assert propose(generator).config != first.config
