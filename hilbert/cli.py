"""The `hilbert` command line: thin wrappers that parse options, call the library, print tables."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from hilbert.config import ConfigError
from hilbert.data.manifest import Manifest, ManifestError, ValidationReport, load_manifest, validate_manifest
from hilbert.ray_runtime import VersionMismatch

# The commands import the rest of the library (torch, Ray, MLflow, scikit-learn behind it) inside
# their bodies, so that `hilbert --help` or `hilbert validate` does not wait seconds for them.

# A hilbert model is a few files of megabytes: MLflow's per-download progress bars only break up
# the command's tables (set the variable to "true" to have them back).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(
    name="hilbert",
    help="HILBERT: document-level audio-text embeddings from long recordings with transcripts.\n\n"
         "Typical flow: `hilbert demo-data` (or your own manifest) -> `hilbert validate` -> "
         "`hilbert extract` (frozen-encoder features, cached once) -> `hilbert train` (k-fold CV on "
         "Ray Train) or `hilbert sweep` (Ray Tune + Optuna over k-fold trials, logged to MLflow) -> "
         "`hilbert runs` (leaderboard) -> `hilbert promote` (challenger vs champion) -> `hilbert "
         "evaluate` / `predict` / `embed` (a folder or models:/NAME@champion). `hilbert demo` runs the "
         "whole job on the bundled demo corpus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables are wide; outside a terminal (logs, CI) rich would wrap them at 80 columns.
_WIDTH = shutil.get_terminal_size((150, 24)).columns
console = Console(width=_WIDTH)
errors = Console(stderr=True, width=_WIDTH)

AUDIO_ENCODER_HELP = ("Speech encoder: `logmel` (log-mel + prosody, no weights), or `hf:<model id or folder>` "
                      "for wav2vec2/HuBERT/WavLM/Whisper, with options such as `?layer=6` or `?layer=avg`.")
TEXT_ENCODER_HELP = ("Text encoder: `hashngram` (hashed n-grams, no weights), or `hf:<model id or folder>` "
                     "for BERT-family models (mean pooling), with options such as `?layer=-2`.")


@contextmanager
def _refusing(*kinds: type[BaseException], code: int = 2) -> Iterator[None]:
    """Turn errors a user can cause (and fix) into their message on stderr and an exit code."""
    try:
        yield
    except kinds as error:
        if isinstance(error, OSError) and error.filename is None:
            raise  # not a path the user gave: a bug to see with its traceback, not a one-line refusal
        errors.print(f"[red]{error}[/red]", highlight=False)
        raise typer.Exit(code) from None


def _exit_on_bad_manifest(path: Path) -> Manifest:
    """Load a manifest for a command; print every defect and exit 2 when it has any."""
    try:
        manifest = load_manifest(path)
    except ManifestError as error:
        _print_problems(error.report)
        errors.print(f"[red]refusing to continue: {len(error.report.errors)} error(s) in {path}; "
                     f"run `hilbert validate {path}` for the full report[/red]")
        raise typer.Exit(2) from None
    return manifest


def _print_problems(report: ValidationReport) -> None:
    for problem in report.problems:
        style = "red" if problem.severity == "error" else "yellow"
        errors.print(f"[{style}]{report.manifest_path}: {problem}[/{style}]", markup=True, highlight=False)


def _print_summary(report: ValidationReport) -> None:
    summary = report.summary()
    low, median, high = summary.segments_per_document
    console.print(f"{summary.documents} documents, {summary.audio_hours:.2f} hours of audio, "
                  f"{summary.segments_total} segments (per document: min {low}, median {median:g}, max {high})")
    if not summary.tasks:
        console.print("no label tasks (documents can be embedded, not used for supervised training)")
    for task in summary.tasks:
        table = Table(title=f"task {task.name!r}", title_justify="left")
        table.add_column("class")
        table.add_column("documents", justify="right")
        table.add_column("share", justify="right")
        labelled = sum(task.class_counts.values())
        for name, count in task.class_counts.items():
            table.add_row(name, str(count), f"{count / max(labelled, 1):.0%}")
        table.add_row("[dim](unlabelled)[/dim]", str(task.unlabelled), "")
        console.print(table)


@app.command()
def validate(
    manifest: Path = typer.Argument(..., help="Manifest JSONL file (one document per line)."),
    check_audio: bool = typer.Option(True, help="Also open every audio file's header (existence, "
                                                "decodability, duration for the segment bounds)."),
) -> None:
    """Report every defect of a manifest at once (line, doc_id, field), then summarise the corpus."""
    report = validate_manifest(manifest, check_audio=check_audio)
    _print_problems(report)
    if not report.ok:
        errors.print(f"[red]{len(report.errors)} error(s), {len(report.warnings)} warning(s) in {manifest}[/red]")
        raise typer.Exit(2)
    console.print(f"[green]{manifest}: valid[/green] ({len(report.warnings)} warning(s))")
    _print_summary(report)


@app.command()
def extract(
    manifest: Path = typer.Argument(..., help="Manifest JSONL file."),
    audio_encoder: str = typer.Option("logmel", "--audio-encoder", "-a", help=AUDIO_ENCODER_HELP),
    text_encoder: str = typer.Option("hashngram", "--text-encoder", "-t", help=TEXT_ENCODER_HELP),
    cache: str = typer.Option("cache", "--cache", help="Feature cache: a folder (created if needed; shared between "
                                                        "runs and manifests) or a URI every node reads, "
                                                        "e.g. s3://bucket/cache."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (`auto`, `ray://host:10001`); "
                                                     "default: an embedded local Ray."),
    actors: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, else one per CPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Encode on GPUs (default: when present)."),
    batch_documents: int = typer.Option(4, help="Documents per Ray Data batch."),
) -> None:
    """Encode every segment with frozen speech and text encoders into a content-addressed cache.

    A second run is a cache hit and encodes nothing; changing the manifest or an encoder
    recomputes only the documents whose features changed.
    """
    from hilbert.features.extract import ExtractionError, extract_features

    corpus = _exit_on_bad_manifest(manifest)
    with _refusing(VersionMismatch), _refusing(ExtractionError, ValueError, code=1):
        report = extract_features(corpus, audio_encoder, text_encoder, cache, address=address,
                                  num_actors=actors, use_gpu=gpu, documents_per_batch=batch_documents)
    feature_set = report.feature_set
    assert feature_set is not None
    console.print(f"audio {audio_encoder}: dim {feature_set.audio_dim}; text {text_encoder}: dim {feature_set.text_dim}")
    console.print(report.throughput_line())
    console.print(f"feature set: {report.feature_set_path}")


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder to write manifest.jsonl and audio/ into."),
    documents: int = typer.Option(240, help="Number of documents."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes byte-identical files."),
    sample_rate: int = typer.Option(16000, help="Audio sample rate in Hz."),
    channels: int = typer.Option(1, help="1 (mono) or 2 (stereo)."),
    audio_format: str = typer.Option("wav", "--format", help="wav, flac or ogg."),
) -> None:
    """Write the synthetic demo corpus: speech-like audio, transcripts, imbalanced label tasks."""
    from hilbert.data.demo import DEMO_TASKS, write_demo_corpus

    with _refusing(ValueError):
        path = write_demo_corpus(out_dir, n_documents=documents, seed=seed, sample_rate=sample_rate,
                                 channels=channels, audio_format=audio_format)
    console.print(f"wrote {documents} documents: {path}")
    table = Table(title="demo tasks", title_justify="left")
    for column in ("task", "classes (share)", "carried by", "cue"):
        table.add_column(column)
    for task in DEMO_TASKS:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in zip(task.classes, task.proportions))
        table.add_row(task.name, shares, task.modality, task.cue)
    console.print(table)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("hilbert-demo"), help="Folder for the corpus, the feature cache, the sweeps "
                                                            "and the MLflow store."),
    sweep_file: Optional[Path] = typer.Option(None, "--sweep", help="Sweep of the demo; default: the one shipped "
                                                                     "with hilbert (tune/demo.yaml in the repository)."),
    documents: int = typer.Option(240, help="Documents in the demo corpus."),
    seed: int = typer.Option(0, help="Seed of the demo corpus."),
    trials: Optional[int] = typer.Option(None, min=1, help="Trials of the sweep (default: the sweep file's)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs of each trial (default: the sweep file's)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray."),
) -> None:
    """The main job on the bundled demo corpus, end to end: write it, validate it, extract
    features (cached), run a Ray Tune + Optuna sweep of k-fold Ray Train DDP trials logged to a
    local MLflow store, register and promote the best model, predict held-out documents with it,
    and compare it with the baseline.

    A second run reuses the corpus and the feature cache, runs a new sweep and promotes its best
    model only if it beats the champion on the held-out documents.
    """
    from hilbert.demo_job import NoTrialFinished, run_demo
    from hilbert.predict import ModelLocationError
    from hilbert.tracking.registry import RegistryError
    from hilbert.sweep.state import SweepError, SweepInterrupted
    from hilbert.train.run import TrainingError

    with _refusing(ConfigError, SweepError, TrainingError, RegistryError, ModelLocationError, VersionMismatch), \
            _refusing(NoTrialFinished, code=1), _refusing(SweepInterrupted, code=130):
        try:
            result = run_demo(workdir, sweep_file=sweep_file, documents=documents, seed=seed, trials=trials,
                              epochs=epochs, address=address, log=console.print, section=console.rule,
                              on_validated=_print_validation, on_sweep=print_sweep_result,
                              on_promotion=print_promotion)
        except ManifestError as error:
            _print_problems(error.report)
            raise typer.Exit(2) from None
    print_held_out_comparison(result)


def _print_validation(report: ValidationReport) -> None:
    _print_problems(report)  # warnings only: a report with errors is refused
    _print_summary(report)


def print_held_out_comparison(result) -> None:
    """The demo's final table (champion and baseline on the held-out documents) and what to run next."""
    from hilbert.held_out import mean_auc
    from hilbert.tracking.store import ui_command

    table = Table(title=f"held-out documents ({len(result.held_out)}, speakers no trial saw): macro one-vs-rest "
                        "ROC AUC", title_justify="left")
    table.add_column("method")
    for task in result.tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for label, metrics in ((f"HILBERT champion (version {result.champion_version})", result.champion_metrics),
                           ("baseline: logreg on mean-pooled features", result.baseline_metrics)):
        table.add_row(label, *(_number(metrics.get(f"{task}/auc", float("nan"))) for task in result.tasks),
                      _number(mean_auc(metrics, result.tasks)))
    console.print(table)
    console.print(f"\nleaderboard again:  hilbert runs --tracking-uri {result.tracking_uri}")
    console.print(f"predict with it:    hilbert predict {result.champion} MANIFEST OUT.parquet --cache "
                  f"{result.cache_dir} --tracking-uri {result.tracking_uri}")
    console.print(f"open the MLflow UI: {ui_command(result.tracking_uri)}")


METHOD_NAMES = {"hilbert": "HILBERT", "pairwise": "pairwise a<->t (CLAP-style)", "no_cka": "HILBERT - CKA",
                "no_balance": "HILBERT - balance", "no_contrastive": "HILBERT - contrastive",
                "shared_streams": "HILBERT, shared streams", "linear_head": "HILBERT, linear head",
                "audio_only": "audio only", "text_only": "text only", "baseline_logreg": "baseline: logreg"}
DIAGNOSTICS = ("recall@1/audio_joint", "recall@1/text_joint", "cka/audio_joint", "cka/text_joint", "balance/imbalance",
               "experts/entropy")


def _interval(values) -> str:
    return "[-, -]" if not values or values[0] is None else f"[{values[0]:.3f}, {values[1]:.3f}]"


def print_cross_validation(result) -> None:
    """Per task and method: the pooled out-of-fold test AUC with its 95 % bootstrap interval, the
    fold mean ± std (and how many folds defined it), and each method's paired difference from
    HILBERT (* where the interval excludes 0); then balanced accuracy, F1 and diagnostics."""
    folds = result.folds * result.repeats
    repeats = f", {result.repeats} repeats" if result.repeats > 1 else ""
    table = Table(title=f"test macro one-vs-rest ROC AUC: pooled out-of-fold [95 % CI]; mean ± std over folds "
                        f"(folds defining it / {folds}{repeats}); Δ vs HILBERT [95 % CI], * differs",
                  title_justify="left", show_lines=True)
    table.add_column("method")
    for task in result.tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for method in result.methods:
        cells = []
        for task in result.tasks:
            entry = result.comparison.get(method, {}).get(task, {})
            pooled = entry.get("pooled_auc")
            lines = [f"{pooled:.3f} {_interval(entry.get('ci95'))}" if pooled is not None else "-"]
            mean, std = entry.get("fold_mean"), entry.get("fold_std")
            lines.append(f"{_number(mean if mean is not None else float('nan'))}±"
                         f"{_number(std if std is not None else float('nan'))} "
                         f"({entry.get('folds_defined', 0)}/{entry.get('folds', folds)})")
            versus = entry.get("vs_reference")
            if versus and versus.get("difference") is not None:
                lines.append(f"Δ {versus['difference']:+.3f} {_interval(versus.get('ci95'))}"
                             f"{' *' if versus.get('differs') else ''}")
            cells.append("\n".join(lines))
        cells.append(_number(result.mean_auc(method)))
        table.add_row(METHOD_NAMES.get(method, method), *cells)
    console.print(table)
    for metric, title in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1")):
        table = Table(title=f"test {title}, mean ± std over folds", title_justify="left")
        table.add_column("method")
        for task in result.tasks:
            table.add_column(task, justify="right")
        for method in result.methods:
            fold_table = result.fold_table(method)
            names = [f"test/{task}/{metric}" for task in result.tasks]
            table.add_row(METHOD_NAMES.get(method, method),
                          *(f"{_number(fold_table.mean.get(name, float('nan')))}±"
                            f"{_number(fold_table.std.get(name, float('nan')))}" for name in names))
        console.print(table)
    table = Table(title="embedding diagnostics on the test folds (mean over folds)", title_justify="left")
    table.add_column("method")
    for name in DIAGNOSTICS:
        table.add_column(name, justify="right")
    for method in result.methods:
        if method == "baseline_logreg":
            continue
        fold_table = result.fold_table(method)
        cells = [fold_table.mean.get(f"test/{name}", float("nan")) for name in DIAGNOSTICS]
        table.add_row(METHOD_NAMES.get(method, method), *(_number(c, 3) for c in cells))
    console.print(table)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training YAML (see tune/train-demo.yaml)."),
    manifest: Optional[Path] = typer.Option(None, help="Override data.manifest."),
    cache: Optional[str] = typer.Option(None, help="Override data.cache_dir (a folder or a URI)."),
    workers: Optional[int] = typer.Option(None, help="Override scaling.num_workers (DDP workers per run)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Override scaling.use_gpu (NCCL on GPU, gloo on CPU)."),
    epochs: Optional[int] = typer.Option(None, help="Override optimization.epochs."),
    folds: Optional[int] = typer.Option(None, help="Override cv.folds."),
    variants: Optional[str] = typer.Option(None, help="Comma-separated variants: hilbert, pairwise, no_cka, "
                                                      "no_balance, no_contrastive, shared_streams, linear_head, "
                                                      "audio_only, text_only, or `all`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray."),
    output: Optional[Path] = typer.Option(None, help="Run folder (default: <output_dir>/<name>-<time>)."),
) -> None:
    """k-fold cross-validated training with Ray Train (DDP), every variant and the baseline, in one table.

    Each fold keeps the epoch chosen on its validation split and is scored once on its test fold;
    the table shows, per task, the pooled out-of-fold test AUC with its 95 % bootstrap interval,
    the fold mean ± std, and each method's paired difference from HILBERT. Writes the config,
    results.json, every method's test predictions (test_predictions/*.parquet) and each variant's
    fold models (safetensors + JSON) to the run folder.
    """
    from hilbert.train.config import VARIANTS, load_train_config
    from hilbert.train.run import TrainingError, run_cross_validation

    overrides: dict = {}
    for section, key, value in (("data", "manifest", manifest), ("data", "cache_dir", cache),
                                ("scaling", "num_workers", workers), ("scaling", "use_gpu", gpu),
                                ("optimization", "epochs", epochs), ("cv", "folds", folds)):
        if value is not None:
            overrides.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    if variants:
        overrides["variants"] = list(VARIANTS) if variants == "all" else [v.strip() for v in variants.split(",")]
    with _refusing(ConfigError):
        train_config = load_train_config(config, overrides)
    corpus = _exit_on_bad_manifest(Path(train_config.data.manifest))
    with _refusing(VersionMismatch), _refusing(TrainingError, ValueError, code=1):
        result = run_cross_validation(train_config, manifest=corpus, address=address, run_dir=output,
                                      log=console.print)
    print_cross_validation(result)


MODEL_HELP = ("The model: `models:/NAME@champion` (or `@challenger`, `models:/NAME/3`), `runs:/<run id>/model`, a "
              "checkpoint folder, or a folder of fold checkpoints (a variant folder of a `hilbert train` run).")
TRACKING_HELP = ("MLflow tracking store (default: $MLFLOW_TRACKING_URI, else runs/mlruns.db; the demo's is "
                 "hilbert-demo/runs/mlruns.db).")


@contextmanager
def _model(location: str, tracking_uri: Optional[str]) -> Iterator:
    """Load a model from the registry, a run or a folder (downloads go to a temporary folder)."""
    from hilbert.predict import ModelLocationError, load_predictor
    from hilbert.tracking.registry import RegistryError, resolve_model

    remote = "://" in location or location.startswith(("models:", "runs:"))
    with tempfile.TemporaryDirectory(prefix="hilbert-model-") as folder, _refusing(ModelLocationError, RegistryError):
        uri = _tracking_uri(tracking_uri) if location.startswith(("models:", "runs:")) else tracking_uri
        yield load_predictor(resolve_model(location, folder if remote else None, tracking_uri=uri))


def _tracking_uri(explicit: Optional[str]) -> str:
    from hilbert.tracking.store import resolve_tracking_uri

    return resolve_tracking_uri(explicit, Path("runs"))


# The parameters evaluate, predict and embed share.
ModelArgument = Annotated[str, typer.Argument(help=MODEL_HELP)]
CacheOption = Annotated[str, typer.Option(help="Feature cache folder, or URI (s3://bucket/cache...).")]
ExtractionAddress = Annotated[Optional[str], typer.Option(help="Ray cluster address for extraction; default: "
                                                               "in this process, or a local Ray for large jobs.")]
TrackingOption = Annotated[Optional[str], typer.Option(help=TRACKING_HELP)]
BatchAddress = Annotated[Optional[str], typer.Option(
    help="Ray cluster address (`auto`, `ray://head:10001`, or `local` for a Ray on this machine): features are "
         "extracted and documents answered by Ray Data actors that hold the model; default: in this process "
         "(extraction on a local Ray when it is large).")]
ActorsOption = Annotated[Optional[int], typer.Option(
    help="With --address: how many actors hold the model (default: one per GPU, else one per CPU).")]
BatchOption = Annotated[int, typer.Option(help="With --address: documents per actor batch.")]


@app.command()
def evaluate(
    model: ModelArgument,
    manifest: Path = typer.Argument(..., help="Labelled manifest to evaluate on (features extracted through the cache)."),
    cache: CacheOption = "cache",
    address: ExtractionAddress = None,
    output: Optional[Path] = typer.Option(None, help="Also write the metrics as JSON here."),
    seen: str = typer.Option("report", help="Documents the model trained or chose its epoch on (matched by "
                                            "content): `report` scores them and warns, `exclude` scores only "
                                            "the others, `refuse` stops."),
    tracking_uri: TrackingOption = None,
) -> None:
    """Per-task AUC, balanced accuracy and macro F1 of a trained model on a labelled corpus."""
    from hilbert.features.batches import UnknownLabelError
    from hilbert.features.cache import atomic_write_json
    from hilbert.predict import SeenDocumentsError, evaluate_corpus

    if seen not in ("report", "exclude", "refuse"):
        errors.print(f"[red]--seen must be report, exclude or refuse, not {seen!r}[/red]", highlight=False)
        raise typer.Exit(2)
    corpus = _exit_on_bad_manifest(manifest)
    with _model(model, tracking_uri) as predictor, _refusing(UnknownLabelError, FileNotFoundError, SeenDocumentsError):
        metrics = evaluate_corpus(predictor, corpus, cache, address=address, seen=seen)
    scored = int(metrics["documents/evaluated"])
    table = Table(title=f"{model} on {manifest} ({len(predictor.models)} model(s), {scored} document(s))",
                  title_justify="left")
    for column in ("task", "labelled", "AUC", "balanced accuracy", "macro F1"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in predictor.label_maps.tasks:
        table.add_row(task, f"{metrics[f'{task}/labelled']:.0f}", *(_number(metrics[f"{task}/{m}"], 3) for m in
                                                                   ("auc", "balanced_accuracy", "macro_f1")))
    console.print(table)
    if any(math.isnan(metrics[f"{task}/auc"]) for task in predictor.label_maps.tasks):
        console.print("-: not defined here (AUC needs labelled documents of two classes or more; balanced "
                      "accuracy and F1 need one labelled document)")
    unscored = sorted({task for doc in corpus for task in doc.labels} - set(predictor.label_maps.tasks))
    if unscored:
        console.print(f"[yellow]not scored: task(s) {', '.join(map(repr, unscored))} of the corpus, which the "
                      f"model does not predict (it predicts {', '.join(predictor.label_maps.tasks)})[/yellow]")
    seen_count = metrics.get("documents/seen_in_training")
    if seen_count is None:
        console.print("[yellow]the model's checkpoints do not record their training documents (written before "
                      "they could): whether these documents are held-out is not known[/yellow]")
    elif seen_count and seen == "report":
        console.print(f"[yellow]warning: {seen_count:.0f} of {scored} documents were in the model's training or "
                      "validation splits, so these figures are not held-out (--seen exclude scores only the "
                      "others)[/yellow]")
    elif seen_count:
        console.print(f"{seen_count:.0f} document(s) the model trained or chose its epoch on were left out")
    if output:
        atomic_write_json(output, metrics)
        console.print(f"metrics written to {output}")


@app.command()
def predict(
    model: ModelArgument,
    manifest: Path = typer.Argument(..., help="Manifest of the documents to predict (labels not needed)."),
    out: Path = typer.Argument(..., help="Parquet file: doc_id, predicted class and class probabilities per task."),
    cache: CacheOption = "cache",
    address: BatchAddress = None,
    actors: ActorsOption = None,
    documents_per_batch: BatchOption = 64,
    tracking_uri: TrackingOption = None,
) -> None:
    """Predict every task for new documents (fold models are averaged)."""
    from hilbert.predict import write_predictions

    corpus = _exit_on_bad_manifest(manifest)
    with _model(model, tracking_uri) as predictor, _refusing(FileNotFoundError):
        if address:
            _batch_inference("predict", predictor, corpus, cache, out, address, actors, documents_per_batch)
        else:
            write_predictions(predictor, corpus, cache, out)
    console.print(f"predictions for {len(corpus)} documents written to {out}")


@app.command()
def embed(
    model: ModelArgument,
    manifest: Path = typer.Argument(..., help="Manifest of the documents to embed (labels not needed)."),
    out: Path = typer.Argument(..., help="Parquet file: audio, text and joint embeddings and segment pooling weights."),
    cache: CacheOption = "cache",
    address: BatchAddress = None,
    actors: ActorsOption = None,
    documents_per_batch: BatchOption = 64,
    tracking_uri: TrackingOption = None,
) -> None:
    """Document embeddings and which segments mattered (pooling weights), one row per document."""
    from hilbert.predict import embeddings_table
    from hilbert.storage import write_parquet

    corpus = _exit_on_bad_manifest(manifest)
    with _model(model, tracking_uri) as predictor, _refusing(FileNotFoundError):
        if address:
            _batch_inference("embed", predictor, corpus, cache, out, address, actors, documents_per_batch)
        else:
            write_parquet(embeddings_table(predictor, corpus, cache), out)
    console.print(f"embeddings of {len(corpus)} documents written to {out}")


def _batch_inference(kind: str, predictor, corpus, cache: str, out: Path, address: str, actors: Optional[int],
                     documents_per_batch: int) -> None:
    from hilbert.batch_inference import BatchInferenceError, run_batch_inference
    from hilbert.features.extract import ExtractionError

    with _refusing(BatchInferenceError, ExtractionError):
        report = run_batch_inference(kind, predictor, corpus, cache, out, address=address, actors=actors,
                                     documents_per_batch=documents_per_batch, log=console.print)
    console.print(f"{report.documents} documents in {report.seconds:.1f} s on {report.actors} actor(s) "
                  f"({report.documents_per_second:.1f} docs/s; extraction {report.extraction_seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------
# Sweeps, the MLflow leaderboard, promotion


@app.command()
def sweep(
    sweep_file: Optional[Path] = typer.Argument(None, help="Sweep definition (tune/*.yaml); optional with --resume."),
    name: Optional[str] = typer.Option(None, help="Name of the sweep (default: <sweep name>-<date-time>): its "
                                                  "folder under <output_dir>/sweeps and its MLflow parent run."),
    resume: Optional[str] = typer.Option(None, help="Continue the sweep of this name (after Ctrl-C, a crash or a "
                                                    "killed driver): finished trials are kept, unfinished ones go on "
                                                    "from their last epoch."),
    retry_failed: bool = typer.Option(False, help="With --resume: run the trials that failed again."),
    address: Optional[str] = typer.Option(None, help="Ray cluster: `auto` (the cluster this machine is in), "
                                                     "`ray://head:10001`; default: an embedded local Ray."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking store (default: tracking.uri of the "
                                                          "sweep, else $MLFLOW_TRACKING_URI, else "
                                                          "<output_dir>/mlruns.db)."),
    sweeps_dir: Optional[str] = typer.Option(None, help="Folder of sweep folders, a path or a URI every node "
                                                        "reaches on a cluster (s3://bucket/sweeps; default: "
                                                        "<output_dir>/sweeps of the base config; runs/sweeps "
                                                        "with --resume alone)."),
) -> None:
    """Search hyperparameters with Ray Tune + Optuna; each trial is a k-fold Ray Train DDP run.

    Every trial is an MLflow run nested under the sweep's run; the best model is registered as
    the `challenger` (promote it with `hilbert promote`).
    """
    from hilbert.tracking.registry import RegistryError
    from hilbert.sweep.runner import run_sweep
    from hilbert.sweep.state import SweepError, SweepInterrupted
    from hilbert.train.run import TrainingError

    with _refusing(ConfigError, SweepError, TrainingError, RegistryError, FileNotFoundError, VersionMismatch), \
            _refusing(SweepInterrupted, code=130):
        result = run_sweep(sweep_file, name=name, resume=resume, sweeps_dir=sweeps_dir, address=address,
                           tracking_uri=tracking_uri, retry_failed=retry_failed, log=console.print)
    print_sweep_result(result)


def print_sweep_result(result) -> None:
    from hilbert.tracking.store import ui_command

    print_leaderboard(result.rows, f"sweep {result.name}: {len(result.rows)} trial(s) in {result.seconds:.0f} s")
    if result.model_version:
        console.print(f"best: {result.best['name']} -> registered as {result.model_name} version "
                      f"{result.model_version} (alias challenger)")
        console.print(f"promote it: hilbert promote {result.model_name} --manifest HELD_OUT.jsonl "
                      f"--tracking-uri {result.tracking_uri}")
    console.print(f"MLflow UI: {ui_command(result.tracking_uri)}")


def print_leaderboard(rows: list[dict], title: str, limit: int = 20) -> None:
    """Trials in the order the sweep ranks them (validation objective, the selection signal):
    status, epochs, the validation and test objectives, per-task test AUC and the searched values."""
    tasks = sorted({key.split("/")[2] for row in rows for key in row["metrics"]
                    if key.startswith("cv_mean/test/") and key.endswith("/auc")})
    searched = sorted({key for row in rows for key in row["params"] if not key.startswith("config.")})
    table = Table(title=title, title_justify="left")
    table.caption = ("ranked by val objective (mean over folds of the chosen epoch's validation score: what Tune "
                     "and the registration select on); test: the outer test folds, scored once at that epoch "
                     "(mean over folds); the best of many trials still flatters its test score: the held-out "
                     f"promotion set is the unbiased figure; searched: {', '.join(searched)}")
    fixed = ("#", "trial", "status", "epochs", "val objective", "test objective")
    for column in (*fixed, *(f"{t} test AUC" for t in tasks), *(key.rsplit(".", 1)[-1] for key in searched)):
        # Fixed columns never shrink; task and parameter headers fold onto a second line instead
        # of being cut to "lambda_…" when the terminal is narrow.
        table.add_column(column, justify="left" if column in ("trial", "status") else "right",
                         no_wrap=column in fixed[:4], overflow="fold")
    for rank, row in enumerate(rows[:limit], 1):
        metrics = row["metrics"]
        status = row["status"] + (f" by {row['stopped_by']}" if row.get("stopped_by") else "")
        cells = [str(rank), row["name"], status, f"{metrics.get('epochs_completed', 0):.0f}", _number(row["objective"]),
                 _number(metrics.get("test/objective", float("nan")))]
        cells += [_number(metrics.get(f"cv_mean/test/{task}/auc", float("nan"))) for task in tasks]
        cells += [_param(row["params"].get(key, "")) for key in searched]
        table.add_row(*cells)
    console.print(table)


def _number(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _param(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.3g}"


@app.command()
def runs(
    sweep_name: Optional[str] = typer.Argument(None, help="Sweep (its parent run's name); default: the latest."),
    tracking_uri: TrackingOption = None,
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment; default: every experiment."),
    limit: int = typer.Option(20, help="Rows to show."),
    views: bool = typer.Option(True, help="Draw the study's views (history, importances, parallel coordinates, "
                                          "slices) and the trials' CSV into the parent run again, from the sweep "
                                          "folder: for a sweep still running, or one whose driver died."),
) -> None:
    """The leaderboard of a sweep from MLflow, and the command that opens the MLflow UI."""
    from hilbert.tracking.leaderboard import find_sweep, leaderboard
    from hilbert.tracking.store import ui_command

    uri = _tracking_uri(tracking_uri)
    with _refusing(LookupError):
        found, parent = find_sweep(uri, sweep_name, experiment)
    rows = leaderboard(found, parent.info.run_id)
    print_leaderboard(rows, f"sweep {parent.info.run_name} ({parent.info.status}) in experiment {found.name!r}: "
                            f"{len(rows)} trial(s)", limit)
    if views:
        from hilbert.sweep.views import refresh_sweep_views
        from hilbert.tracking.runs import SweepTracker

        logged = refresh_sweep_views(SweepTracker(found, parent.info.run_id), rows, log=console.print)
        if logged:
            console.print(f"logged to the sweep's parent run: {', '.join(logged)}")
    console.print(f"MLflow UI: {ui_command(uri)}")


@app.command()
def promote(
    model_name: str = typer.Argument(..., help="Registered model name (tracking.model_name of the sweep)."),
    manifest: Path = typer.Option(..., help="Held-out labelled documents that both models are scored on "
                                            "(mean macro AUC over tasks)."),
    cache: str = typer.Option("cache", help="Feature cache folder, or URI (s3://bucket/cache...)."),
    force: bool = typer.Option(False, help="Move `champion` to the challenger even if it scores lower."),
    tracking_uri: TrackingOption = None,
    address: Optional[str] = typer.Option(None, help="Ray cluster address for extraction; default: local."),
) -> None:
    """Compare the `challenger` with the `champion` on held-out documents; move `champion` when
    the challenger is better (or with --force). The decision goes into the version's tags."""
    from hilbert.held_out import held_out_metric, held_out_scorer
    from hilbert.predict import SeenDocumentsError
    from hilbert.tracking.registry import RegistryError, promote as promote_model

    corpus = _exit_on_bad_manifest(manifest)
    with _refusing(RegistryError, SeenDocumentsError):
        decision = promote_model(model_name, held_out_scorer(corpus, cache, address), force,
                                 tracking_uri=_tracking_uri(tracking_uri), metric=held_out_metric(manifest))
    print_promotion(decision)


def print_promotion(decision) -> None:
    verdict = "[green]promoted[/green]" if decision.promoted else "[yellow]not promoted[/yellow]"
    console.print(f"{decision.model_name} version {decision.challenger_version}: {verdict} — {decision.reason}")


@app.command("add-pyfunc")
def add_pyfunc(
    model: str = typer.Argument(..., help="A registered version: `models:/NAME/3` or `models:/NAME@champion`."),
    tracking_uri: TrackingOption = None,
) -> None:
    """Make a version registered before hilbert wrote MLflow's pyfunc flavour loadable by
    `mlflow.pyfunc.load_model` and `mlflow models serve`: its files are written beside its
    checkpoints (which stay as they are)."""
    from hilbert.tracking.registry import RegistryError, add_pyfunc_flavour

    with _refusing(RegistryError):
        added = add_pyfunc_flavour(model, tracking_uri=_tracking_uri(tracking_uri))
    console.print(f"{model}: added {', '.join(added)}" if added else f"{model} has the pyfunc flavour already")


# ---------------------------------------------------------------------------------------------
# Feature cache housekeeping

cache_app = typer.Typer(
    help="What a feature cache holds (`info`), and deleting what no feature set needs any more (`prune`). "
         "Both are safe while other processes read from the cache and extract into it.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

CACHE_HELP = "Feature cache: a folder, or a URI every node reads (s3://bucket/cache...)."


def _bytes(count: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as `du --si` and object stores count)."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def _print_json(payload) -> None:
    import json

    sys.stdout.write(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")  # plain: no markup, no wrapping


@cache_app.command("info")
def cache_info_command(
    cache: str = typer.Option("cache", "--cache", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the same as JSON (for scripts)."),
) -> None:
    """Entries and bytes per encoder, every feature set, unreferenced entries, leftovers, mirror."""
    from hilbert.features.cache import CacheError
    from hilbert.features.housekeeping import cache_info

    with _refusing(CacheError, code=1):
        info = cache_info(cache)
    if as_json:
        _print_json(info.to_json())
        return
    _print_cache_info(info)


def _print_cache_info(info) -> None:
    import time

    kind = "a URI: the store is authoritative" if info.is_uri else "a folder"
    mirror = (f"\nthis node's mirror: {info.mirror} ({info.mirror_size.files} files, {_bytes(info.mirror_size.bytes)})"
              if info.mirror else "")
    if not info.exists:
        console.print(f"no feature cache at {info.location} yet ({kind}): nothing has been extracted into it "
                      f"(`hilbert extract MANIFEST --cache {info.location}`){mirror}", highlight=False)
        return
    entries = sum(t.files for t in info.modalities.values())
    console.print(f"feature cache {info.location} ({kind}): {entries} entries, {len(info.sets)} feature set(s), "
                  f"{info.total.files} files, {_bytes(info.total.bytes)}{mirror}", highlight=False)
    table = Table(title="entries by encoder", title_justify="left")
    for column in ("modality", "encoder", "entries", "size", "unreferenced", "unreferenced size"):
        table.add_column(column, justify="left" if column in ("modality", "encoder") else "right")
    for row in info.encoders:
        table.add_row(row.modality, row.encoder, str(row.entries), _bytes(row.bytes), str(row.unreferenced_entries),
                      _bytes(row.unreferenced_bytes))
    for modality, tally in info.modalities.items():
        table.add_row(f"[bold]{modality}[/bold]", "[bold]all[/bold]", str(tally.files), _bytes(tally.bytes), "", "")
    console.print(table)
    if info.sets:
        sets = Table(title="feature sets", title_justify="left")
        for column in ("id", "manifest", "manifest now", "audio encoder", "text encoder", "documents", "created",
                       "size"):
            sets.add_column(column, justify="right" if column in ("documents", "size") else "left",
                            overflow="fold", no_wrap=column == "id")
        for summary in sorted(info.sets, key=lambda s: s.created):
            sets.add_row(summary.id, summary.manifest, summary.manifest_state, summary.audio_encoder,
                         summary.text_encoder,
                         str(summary.documents), time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.created)),
                         _bytes(summary.bytes))
        sets.caption = ("manifest now: `changed` when the file was edited since the set was made (nothing will read "
                        "that set again: a candidate for `hilbert cache prune --drop-set ID`)")
        console.print(sets)
    for summary in info.sets:
        if summary.missing_entries:
            errors.print(f"[yellow]feature set {summary.id} names {summary.missing_entries} entries the cache lacks: "
                         f"run `hilbert extract {summary.manifest}` again[/yellow]", highlight=False)
    console.print(f"unreferenced (named by no feature set or running extraction): {info.unreferenced.files} entries, "
                  f"{_bytes(info.unreferenced.bytes)}; `hilbert cache prune` deletes those older than its grace "
                  "period (1h)", highlight=False)
    console.print(f"running extractions (pending references): {info.pending_references.files}; "
                  f"prunes in progress: {info.prunes_in_progress}; temporaries: {info.temporaries.files} "
                  f"({_bytes(info.temporaries.bytes)}), {info.stale_temporaries.files} of them stale; "
                  f"other files: {info.other.files} ({_bytes(info.other.bytes)})", highlight=False)


@cache_app.command("prune")
def cache_prune_command(
    cache: str = typer.Option("cache", "--cache", help=CACHE_HELP),
    older_than: str = typer.Option("1h", "--older-than", metavar="DURATION",
                                   help="Grace period, like git gc's: only unreferenced entries older than this go "
                                        "(30m, 1h, 2d, 1h30m; 0 for none). Temporaries and pending references of "
                                        "running writers are kept at least 1h whatever it says."),
    drop_set: list[str] = typer.Option([], "--drop-set", metavar="ID",
                                       help="Delete this feature set first (an id from `hilbert cache info`; "
                                            "repeatable); its entries then go when no other set names them and "
                                            "they are past the grace period. Drop only sets no running job uses."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; delete nothing."),
    address: Optional[str] = typer.Option(None, help="Ray cluster (`auto`, `ray://head:10001`): prune the mirror of "
                                                     "every alive node (URI caches only); default: this node's."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON (for scripts)."),
) -> None:
    """Delete entries no feature set names once past the grace period, and stale leftovers.

    For a URI: in the store, then in this node's mirror (or every node's, with --address).

    Safe while other processes read and extract: no feature set is ever left naming a deleted entry.
    """
    from hilbert.features.cache import CacheError
    from hilbert.features.housekeeping import HousekeepingError, parse_duration, prune_cache
    from hilbert.ray_runtime import VersionMismatch

    try:
        grace = parse_duration(older_than)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--older-than'") from None
    with _refusing(HousekeepingError, VersionMismatch), _refusing(CacheError, code=1):
        reports = prune_cache(cache, older_than=grace, drop_sets=drop_set, dry_run=dry_run, cluster_address=address)
    if as_json:
        _print_json([report.to_json() for report in reports])
        return
    _print_prune_reports(reports)


def _print_prune_reports(reports) -> None:
    from hilbert.features.housekeeping import format_duration

    first = reports[0]
    verb = "would remove (dry run: nothing deleted)" if first.dry_run else "removed"
    console.print(f"{first.location}, grace period {format_duration(first.older_than)}: {verb}", highlight=False)
    table = Table()
    for column in ("where", "what", "files", "size"):
        table.add_column(column, justify="right" if column in ("files", "size") else "left", overflow="fold")
    for report in reports:
        where = report.tree if report.tree != "mirror" else f"mirror {report.path} on {report.node}"
        if report.error:
            table.add_row(where, f"[red]failed: {report.error}[/red]", "", "")
            continue
        removed = [(kind, tally) for kind, tally in report.removed.items() if tally.files]
        for kind, tally in removed or [("nothing", None)]:
            table.add_row(where, kind, str(tally.files) if tally else "0", _bytes(tally.bytes) if tally else "")
    console.print(table)
    if first.dropped_sets:
        console.print(f"feature sets {'to drop' if first.dry_run else 'dropped'}: {', '.join(first.dropped_sets)}")
    console.print(f"kept: {first.kept_young.files} unreferenced entries younger than "
                  f"{format_duration(first.older_than)} ({_bytes(first.kept_young.bytes)}), "
                  f"{first.kept_pending.files} named only by a running extraction ({_bytes(first.kept_pending.bytes)})",
                  highlight=False)


def main() -> None:  # pragma: no cover - console script entry point
    sys.exit(app())


if __name__ == "__main__":  # python -m hilbert.cli
    main()
