"""The `hilbert` command line: thin wrappers that parse options, call the library, print tables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hilbert.data.manifest import Manifest, ManifestError, ValidationReport, load_manifest, validate_manifest

app = typer.Typer(
    name="hilbert",
    help="HILBERT: document-level audio-text embeddings from long recordings with transcripts.\n\n"
         "Typical flow: `hilbert demo-data` (or your own manifest) -> `hilbert validate` -> "
         "`hilbert extract` (frozen-encoder features, cached once). `hilbert demo` runs the whole job.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

AUDIO_ENCODER_HELP = ("Speech encoder: `logmel` (log-mel + prosody, no weights), or `hf:<model id or folder>` "
                      "for wav2vec2/HuBERT/WavLM/Whisper, with options such as `?layer=6` or `?layer=avg`.")
TEXT_ENCODER_HELP = ("Text encoder: `hashngram` (hashed n-grams, no weights), or `hf:<model id or folder>` "
                     "for BERT-family models (mean pooling), with options such as `?layer=-2`.")


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
    try:
        report = extract_features(corpus, audio_encoder, text_encoder, cache, address=address,
                                  num_actors=actors, use_gpu=gpu, documents_per_batch=batch_documents)
    except (ExtractionError, ValueError) as error:
        errors.print(f"[red]{error}[/red]", highlight=False)
        raise typer.Exit(1) from None
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

    path = write_demo_corpus(out_dir, n_documents=documents, seed=seed, sample_rate=sample_rate,
                             channels=channels, audio_format=audio_format)
    console.print(f"wrote {documents} documents: {path}")
    table = Table(title="demo tasks", title_justify="left")
    for column in ("task", "classes", "carried by"):
        table.add_column(column)
    for task in DEMO_TASKS:
        table.add_row(task.name, ", ".join(task.classes), task.modality)
    console.print(table)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("hilbert-demo"), help="Folder for the corpus, the feature cache and runs."),
    documents: int = typer.Option(240, help="Documents in the demo corpus."),
    seed: int = typer.Option(0, help="Seed of the demo corpus."),
) -> None:
    """The main job on the bundled demo corpus: write it, validate it, extract features (cached).

    Training, the sweep and MLflow tracking join this command as they land (see README).
    """
    from hilbert.data.demo import write_demo_corpus
    from hilbert.features.extract import extract_features

    corpus_dir = workdir / "corpus"
    manifest_path = corpus_dir / "manifest.jsonl"
    if manifest_path.exists():
        console.print(f"demo corpus already written: {manifest_path}")
    else:
        console.rule("1. demo corpus")
        write_demo_corpus(corpus_dir, n_documents=documents, seed=seed)
        console.print(f"wrote {manifest_path}")
    console.rule("2. validate")
    report = validate_manifest(manifest_path)
    _print_problems(report)
    if not report.ok:
        raise typer.Exit(2)
    _print_summary(report)
    console.rule("3. extract features")
    corpus = Manifest(report.manifest_path, report.documents)
    extraction = extract_features(corpus, "logmel", "hashngram", workdir / "cache")
    console.print(extraction.throughput_line())


def main() -> None:  # pragma: no cover - console script entry point
    sys.exit(app())
