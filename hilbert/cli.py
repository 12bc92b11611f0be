"""The `hilbert` command line: thin wrappers that parse options, call the library, print tables."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from hilbert.data.manifest import Manifest, ManifestError, ValidationReport, load_manifest, validate_manifest

app = typer.Typer(
    name="hilbert",
    help="HILBERT: document-level audio-text embeddings from long recordings with transcripts.\n\n"
         "Typical flow: `hilbert demo-data` (or your own manifest) -> `hilbert validate` -> "
         "`hilbert extract` (frozen-encoder features, cached once) -> `hilbert train` (k-fold CV on "
         "Ray Train) -> `hilbert evaluate` / `predict` / `embed`. `hilbert demo` runs the whole job "
         "on the bundled demo corpus.",
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
    cache: Path = typer.Option(Path("cache"), "--cache", help="Feature cache folder (created if needed; "
                                                              "shared between runs and manifests)."),
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
    with _refusing(ExtractionError, ValueError, code=1):
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
    workdir: Path = typer.Option(Path("hilbert-demo"), help="Folder for the corpus, the feature cache and runs."),
    config: Path = typer.Option(Path("tune/train-demo.yaml"), help="Training config of the demo (run from the "
                                                                   "repository root, or point to your copy)."),
    documents: int = typer.Option(240, help="Documents in the demo corpus."),
    seed: int = typer.Option(0, help="Seed of the demo corpus."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray."),
) -> None:
    """The main job on the bundled demo corpus: write it, validate it, extract features (cached),
    then train HILBERT with k-fold CV on Ray Train and compare it with the baseline.

    A second run reuses the corpus and the feature cache.
    """
    from hilbert.config import ConfigError
    from hilbert.data.demo import write_demo_corpus
    from hilbert.features.extract import extract_features
    from hilbert.train.config import load_train_config
    from hilbert.train.run import run_cross_validation

    try:
        train_config = load_train_config(config, {"data": {"manifest": str(workdir / "corpus" / "manifest.jsonl"),
                                                           "cache_dir": str(workdir / "cache")},
                                                  "output_dir": str(workdir / "runs")})
    except ConfigError as error:
        errors.print(f"[red]{error}[/red]\n(run `hilbert demo` from the repository root, or pass --config)",
                     highlight=False)
        raise typer.Exit(2) from None
    manifest_path = Path(train_config.data.manifest)
    console.rule("1. demo corpus")
    if manifest_path.exists():
        console.print(f"reusing {manifest_path}")
    else:
        write_demo_corpus(manifest_path.parent, n_documents=documents, seed=seed)
        console.print(f"wrote {manifest_path}")
    console.rule("2. validate")
    report = validate_manifest(manifest_path)
    _print_problems(report)
    if not report.ok:
        raise typer.Exit(2)
    _print_summary(report)
    console.rule("3. extract features")
    corpus = Manifest(report.manifest_path, report.documents)
    extraction = extract_features(corpus, train_config.data.audio_encoder, train_config.data.text_encoder,
                                  train_config.data.cache_dir, address=address)
    console.print(extraction.throughput_line())
    console.rule("4. train: k-fold cross-validation on Ray Train")
    result = run_cross_validation(train_config, manifest=corpus, feature_set=extraction.feature_set,
                                  address=address, log=console.print)
    print_cross_validation(result)


METHOD_NAMES = {"hilbert": "HILBERT", "pairwise": "pairwise a<->t (CLAP-style)", "no_cka": "HILBERT - CKA",
                "no_balance": "HILBERT - balance", "linear_head": "HILBERT, linear head",
                "audio_only": "audio only", "text_only": "text only", "baseline_logreg": "baseline: logreg"}
DIAGNOSTICS = ("recall@1/audio_joint", "recall@1/text_joint", "cka/audio_joint", "cka/text_joint", "balance_gap",
               "experts/entropy")


def print_cross_validation(result) -> None:
    """The per-task table: mean +- std over folds of macro AUC, then balanced accuracy and F1."""
    for metric, title in (("auc", "macro one-vs-rest ROC AUC"), ("balanced_accuracy", "balanced accuracy"),
                          ("macro_f1", "macro F1")):
        table = Table(title=f"{title}, mean ± std over {result.folds} folds", title_justify="left")
        table.add_column("method")
        for task in result.tasks:
            table.add_column(task, justify="right")
        if metric == "auc":
            table.add_column("mean", justify="right")
        for method in result.methods:
            cells = []
            for task in result.tasks:
                mean, std = result.summary(method, f"{task}/{metric}")
                cells.append(f"{mean:.3f}±{std:.3f}")
            if metric == "auc":
                cells.append(f"{result.mean_auc(method):.3f}")
            table.add_row(METHOD_NAMES.get(method, method), *cells)
        console.print(table)
    table = Table(title="embedding diagnostics on validation folds (mean)", title_justify="left")
    table.add_column("method")
    for name in DIAGNOSTICS:
        table.add_column(name, justify="right")
    for method in result.methods:
        if method == "baseline_logreg":
            continue
        cells = [result.summary(method, name)[0] for name in DIAGNOSTICS]
        table.add_row(METHOD_NAMES.get(method, method), *("-" if c != c else f"{c:.3f}" for c in cells))
    console.print(table)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training YAML (see tune/train-demo.yaml)."),
    manifest: Optional[Path] = typer.Option(None, help="Override data.manifest."),
    cache: Optional[Path] = typer.Option(None, help="Override data.cache_dir."),
    workers: Optional[int] = typer.Option(None, help="Override scaling.num_workers (DDP workers per run)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Override scaling.use_gpu (NCCL on GPU, gloo on CPU)."),
    epochs: Optional[int] = typer.Option(None, help="Override optimization.epochs."),
    folds: Optional[int] = typer.Option(None, help="Override cv.folds."),
    variants: Optional[str] = typer.Option(None, help="Comma-separated variants: hilbert, pairwise, no_cka, "
                                                      "no_balance, linear_head, audio_only, text_only, or `all`."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: an embedded local Ray."),
    output: Optional[Path] = typer.Option(None, help="Run folder (default: <output_dir>/<name>-<time>)."),
) -> None:
    """k-fold cross-validated training with Ray Train (DDP), every variant and the baseline, in one table.

    Writes the config, the split, results.json and each variant's best fold models (safetensors +
    JSON) to the run folder.
    """
    from hilbert.config import ConfigError
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
    with _refusing(TrainingError, ValueError, code=1):
        result = run_cross_validation(train_config, manifest=corpus, address=address, run_dir=output,
                                      log=console.print)
    print_cross_validation(result)


MODEL_HELP = "A checkpoint folder, or a folder of fold checkpoints (a variant folder of a `hilbert train` run)."


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    manifest: Path = typer.Argument(..., help="Labelled manifest to evaluate on (features extracted through the cache)."),
    cache: Path = typer.Option(Path("cache"), help="Feature cache folder."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for extraction; default: local."),
    output: Optional[Path] = typer.Option(None, help="Also write the metrics as JSON here."),
) -> None:
    """Per-task AUC, balanced accuracy and macro F1 of a trained model on a labelled corpus."""
    from hilbert.features.batches import UnknownLabelError
    from hilbert.features.cache import atomic_write_json
    from hilbert.predict import ModelLocationError, evaluate_corpus, load_predictor

    corpus = _exit_on_bad_manifest(manifest)
    with _refusing(ModelLocationError, UnknownLabelError, FileNotFoundError):
        predictor = load_predictor(model)
        metrics = evaluate_corpus(predictor, corpus, cache, address=address)
    table = Table(title=f"{model} on {manifest} ({len(predictor.models)} model(s))", title_justify="left")
    for column in ("task", "labelled", "AUC", "balanced accuracy", "macro F1"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in predictor.label_maps.tasks:
        table.add_row(task, f"{metrics[f'{task}/labelled']:.0f}", *(f"{metrics[f'{task}/{m}']:.3f}" for m in
                                                                   ("auc", "balanced_accuracy", "macro_f1")))
    console.print(table)
    if output:
        atomic_write_json(output, metrics)
        console.print(f"metrics written to {output}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    manifest: Path = typer.Argument(..., help="Manifest of the documents to predict (labels not needed)."),
    out: Path = typer.Argument(..., help="Parquet file: doc_id, predicted class and class probabilities per task."),
    cache: Path = typer.Option(Path("cache"), help="Feature cache folder."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for extraction; default: local."),
) -> None:
    """Predict every task for new documents (fold models are averaged)."""
    from hilbert.predict import (ModelLocationError, load_predictor, predict_probabilities, predictions_table,
                                 write_parquet_atomically)

    corpus = _exit_on_bad_manifest(manifest)
    with _refusing(ModelLocationError, FileNotFoundError):
        predictor = load_predictor(model)
        _, probabilities = predict_probabilities(predictor, corpus, cache, address=address)
    write_parquet_atomically(predictions_table(corpus, predictor.label_maps, probabilities), out)
    console.print(f"predictions for {len(corpus)} documents written to {out}")


@app.command()
def embed(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    manifest: Path = typer.Argument(..., help="Manifest of the documents to embed (labels not needed)."),
    out: Path = typer.Argument(..., help="Parquet file: audio, text and joint embeddings and segment pooling weights."),
    cache: Path = typer.Option(Path("cache"), help="Feature cache folder."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for extraction; default: local."),
) -> None:
    """Document embeddings and which segments mattered (pooling weights), one row per document."""
    from hilbert.predict import ModelLocationError, embeddings_table, load_predictor, write_parquet_atomically

    corpus = _exit_on_bad_manifest(manifest)
    with _refusing(ModelLocationError, FileNotFoundError):
        predictor = load_predictor(model)
        table = embeddings_table(predictor, corpus, cache, address=address)
    write_parquet_atomically(table, out)
    console.print(f"embeddings of {len(corpus)} documents written to {out}")


def main() -> None:  # pragma: no cover - console script entry point
    sys.exit(app())
