"""What the sweep orchestration costs: the same N trials as a plain sequential Optuna loop in one
process, and through ``hilbert sweep`` (Ray Tune + Ray Train + MLflow), measured in one run.

    python benchmarks/sweep.py [--trials 10] [--epochs 8] [--sweep tune/demo.yaml] [--modes loop,ddp,concurrent]

Run from the repository root after `hilbert demo` (it uses the demo corpus and its feature
cache). Every mode samples the same configurations (Optuna's random sampler, same seed, no
early stopping by a scheduler, patience past the last epoch) on the same folds, so the training
work is the same; "training" is the sum of the per-epoch train + validation + checkpoint
seconds the training loop measures itself, and "overhead a trial" is what the rest of the wall
time costs per trial: process and actor start-up, DDP set-up, MLflow logging, figures, model
upload, Tune's bookkeeping. Equal total CPU: the loop runs with 2 torch threads; the sweep runs
either 1 trial x 2 DDP workers x 1 CPU or 2 concurrent trials x 1 worker x 1 CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
EPOCH_PARTS = ("time/train_seconds", "time/validation_seconds", "time/checkpoint_seconds")


def sweep_file(source: Path, folder: Path, *, trials: int, epochs: int, concurrency: int, workers: int,
               experiment: str) -> Path:
    """The benchmark's variant of a sweep YAML: no scheduler, random search, fixed epochs."""
    definition = yaml.safe_load(source.read_text(encoding="utf-8"))
    definition["base"] = str((source.parent / definition["base"]).resolve())
    overrides = definition.setdefault("overrides", {})
    overrides["optimization"] = {**overrides.get("optimization", {}), "epochs": epochs, "patience": epochs + 1}
    overrides["output_dir"] = str(folder / "runs")
    definition.update(trials=trials, concurrency=concurrency, scheduler={"type": "none"},
                      searcher={"type": "random", "seed": 0},
                      resources={"workers_per_trial": workers, "cpus_per_worker": 1},
                      tracking={"experiment": experiment, "model_name": f"bench-{experiment}",
                                "uri": f"sqlite:///{folder / 'mlruns.db'}"})
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(definition), encoding="utf-8")
    return path


def sequential_optuna(path: Path, trials: int) -> dict[str, float]:
    """A researcher's notebook loop: Optuna asks, one process trains all folds, Optuna is told."""
    import optuna
    import torch

    from hilbert.config import to_dict
    from hilbert.sweep.config import load_sweep
    from hilbert.train.loop import WorkerContext, train_folds
    from hilbert.train.run import make_plan, prepare_data

    torch.set_num_threads(2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    sweep = load_sweep(path)
    data = prepare_data(sweep.trial_config({}), log=lambda line: None)
    training, objectives = [], []

    def objective(trial: optuna.Trial) -> float:
        sampled = dict(trial.params)
        config = sweep.trial_config(sweep.trial_values(sampled))
        plan = {**make_plan(config, data, "hilbert"), "config": to_dict(config.variant("hilbert"))}
        seconds, last = [0.0], {}

        def report(metrics, checkpoint):
            seconds[0] += sum(metrics[part] for part in EPOCH_PARTS)
            last.update(metrics)

        train_folds(plan, WorkerContext(report=report))
        training.append(seconds[0])
        objectives.append(last["objective"])
        return last["objective"]

    # ask/tell with the sweep's distributions: what Tune's OptunaSearch does, so both sample alike.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    space = {key: parameter.optuna_distribution() for key, parameter in sweep.search.items()}
    for _ in range(trials):
        trial = study.ask(space)
        study.tell(trial, objective(trial))
    wall = time.perf_counter() - started
    return summary("sequential Optuna loop, 1 process, 2 threads", wall, training, objectives, start=0.0, slots=1)


def through_hilbert_sweep(path: Path, label: str, slots: int) -> dict[str, float]:
    from hilbert.ray_runtime import connect
    from hilbert.sweep.runner import run_sweep
    from hilbert.tracking.runs import child_runs

    started = time.perf_counter()
    connect(None)  # Ray's start is paid once per session, not per trial: timed apart
    ray_start = time.perf_counter() - started
    result = run_sweep(path, name=path.stem, log=lambda line: None)
    wall = time.perf_counter() - started
    training, objectives, parts, spans = [], [], [], []
    client = result.experiment.client
    seen_processes: set[str] = set()
    last_end: dict[str, float] = {}  # actor process -> when its latest trial ended
    added: list[float] = []  # what a trial on a reused actor adds: hand-over gap + its own overhead
    for run in sorted(child_runs(result.experiment, result.parent_run_id), key=lambda run: run.info.start_time):
        histories = [client.get_metric_history(run.info.run_id, part) for part in EPOCH_PARTS]
        training.append(sum(m.value for history in histories for m in history))
        objectives.append(run.data.metrics.get("objective", math.nan))
        metrics = run.data.metrics
        # Tune's start of the trial: the driver logs the trial's wall time when Tune ends it.
        (tune_wall,) = client.get_metric_history(run.info.run_id, "time/trial_wall_seconds") or [None]
        process = f"{run.data.tags.get('ray.node_id')}/{run.data.tags.get('ray.pid')}"
        if tune_wall is not None:
            end = tune_wall.timestamp / 1000
            spans.append((end - tune_wall.value, end))
            if process in last_end:
                added.append(end - last_end[process] - training[-1])
            last_end[process] = end
        wall_trial = metrics.get("time/trial_wall_seconds", math.nan)
        inside = sum(metrics.get(f"time/{k}", math.nan) for k in ("trial_setup_seconds", "fit_seconds",
                                                                   "trial_logging_seconds"))
        fresh = process not in seen_processes  # the first trial of its actor process (the rest reuse it)
        seen_processes.add(process)
        parts.append({"fresh": fresh, "before the trial function": wall_trial - inside,
                      "trial set-up (MLflow run, plan)": metrics.get("time/trial_setup_seconds", math.nan),
                      "Train start-up and teardown": metrics.get("time/fit_seconds", math.nan) - training[-1],
                      "epochs (train + validation + checkpoint)": training[-1],
                      "fold table, figures, model upload": metrics.get("time/trial_logging_seconds", math.nan),
                      "Tune's trial wall time": wall_trial})
    row = summary(label, wall, training, objectives, start=ray_start, slots=slots)
    if spans:
        # Trials run from the first one's start to the last one's end; the rest of the wall time
        # is paid once per sweep (corpus check, MLflow experiment, Tune's start, registration).
        trials_span = max(end for _, end in spans) - min(begin for begin, _ in spans)
        row["fixed_s"] = wall - ray_start - trials_span
        row["per_trial_s"] = (slots * trials_span - sum(training)) / len(training)
    if added:
        row["added_s"] = statistics.fmean(added)
    row["parts"] = {}
    for fresh in (True, False):
        group = [p for p in parts if p["fresh"] == fresh]
        if group:
            row["parts"][f"{'new actor' if fresh else 'reused actor'} ({len(group)})"] = {
                name: statistics.fmean(p[name] for p in group) for name in group[0] if name != "fresh"}
    return row


def summary(label: str, wall: float, training: list[float], objectives: list[float], start: float,
            slots: int) -> dict:
    """``slots`` trials train at once: the overhead a trial is the slot-seconds not spent training."""
    trials = len(training)
    return {"mode": label, "trials": trials, "wall_s": wall, "ray_start_s": start, "training_s": sum(training),
            "overhead_per_trial_s": (slots * (wall - start) - sum(training)) / max(trials, 1),
            "mean_objective": statistics.fmean(objectives) if objectives else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sweep", type=Path, default=Path("tune/demo.yaml"))
    parser.add_argument("--modes", default="loop,ddp,concurrent", help="comma-separated: loop, ddp, concurrent")
    arguments = parser.parse_args()
    modes = arguments.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hilbert-bench-sweep-") as folder:
        folder = Path(folder)
        common = dict(trials=arguments.trials, epochs=arguments.epochs)
        if "loop" in modes:
            path = sweep_file(arguments.sweep, folder, concurrency=1, workers=1, experiment="loop", **common)
            rows.append(sequential_optuna(path, arguments.trials))
        if "ddp" in modes:
            path = sweep_file(arguments.sweep, folder, concurrency=1, workers=2, experiment="ddp", **common)
            rows.append(through_hilbert_sweep(path, "hilbert sweep, 1 trial at a time x 2 DDP workers x 1 CPU",
                                             slots=1))
        if "concurrent" in modes:
            path = sweep_file(arguments.sweep, folder, concurrency=2, workers=1, experiment="concurrent", **common)
            rows.append(through_hilbert_sweep(path, "hilbert sweep, 2 trials at a time x 1 worker x 1 CPU",
                                             slots=2))
    print(f"\n{arguments.trials} trials x {arguments.epochs} epochs, every fold, {os.cpu_count()} CPU cores")
    header = (f"{'mode':58} {'wall s':>7} {'Ray start s':>11} {'training s':>10} {'overhead/trial s':>16} "
              f"{'once a sweep s':>14} {'each trial s':>12} {'one more trial s':>16} {'objective':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['mode']:58} {row['wall_s']:7.1f} {row['ray_start_s']:11.1f} {row['training_s']:10.1f} "
              f"{row['overhead_per_trial_s']:16.1f} {row.get('fixed_s', math.nan):14.1f} "
              f"{row.get('per_trial_s', math.nan):12.1f} {row.get('added_s', math.nan):16.1f} "
              f"{row['mean_objective']:9.4f}")
    print("overhead/trial: (slots x (wall - Ray start) - training) / trials, all of the orchestration's cost;\n"
          "once a sweep: wall time before the first trial starts and after the last one ends;\n"
          "each trial: (slots x (last trial end - first trial start) - training) / trials;\n"
          "one more trial: a trial on a reused actor, from the previous trial's end to its own, less its training")
    for row in rows:
        for group, mean_parts in row.get("parts", {}).items():
            print(f"\nwhere a trial's time goes, mean over trials on a {group}: {row['mode']}")
            for name, seconds in mean_parts.items():
                print(f"  {name:45} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
