"""Batch prediction and embedding throughput: one process against Ray Data actors, same corpus.

    python benchmarks/batch_inference.py [--documents 2000] [--actors 1 2] [--folds 5]

The corpus is the bundled demo generator's (``--unique`` documents) repeated under new doc_ids
up to ``--documents``: inference costs the same per document whatever its audio, and extraction
(which has its own benchmark, benchmarks/extract.py) then encodes only the unique ones. Features
are cached before anything is timed. The model is ``--folds`` fold models of the demo's training
config (tune/train-demo.yaml: d_model 64, logmel 140-d + hashngram 4096-d), with random weights:
throughput does not depend on what the weights learnt.

Each row is the wall time of ``hilbert predict`` / ``hilbert embed``'s work after features are
cached (and read once, so every path finds them in the page cache): in one process (``hilbert
predict`` without --address) with torch's default intra-op threads and with one, and on Ray Data
with N actors of one CPU (one thread) each on a local Ray (``--address local``; the Ray start is
printed apart, the actors' start is in the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml


def repeated_corpus(root: Path, unique: int, documents: int) -> Path:
    from hilbert.data.demo import write_demo_corpus

    source = write_demo_corpus(root / "corpus", n_documents=unique, seed=7)
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    lines = []
    for copy in range(-(-documents // unique)):
        for record in records:
            if len(lines) == documents:
                break
            lines.append(json.dumps({**record, "doc_id": f"{record['doc_id']}-r{copy}"}))
    manifest = root / "corpus" / "repeated.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def fold_models(folder: Path, folds: int, feature_set, tasks: dict[str, tuple[str, ...]]) -> Path:
    from hilbert.features.batches import LabelMaps
    from hilbert.model.hilbert import HilbertModel
    from hilbert.train.checkpoint import CheckpointInfo, save_checkpoint
    from hilbert.train.config import TrainConfig
    from hilbert.config import from_dict

    config = from_dict(TrainConfig, yaml.safe_load((Path(__file__).parents[1] / "tune" / "train-demo.yaml").read_text()))
    label_maps = LabelMaps(tasks)
    model_config = config.model_config(feature_set.audio_dim, feature_set.text_dim, label_maps.sizes())
    features = {"audio_encoder": feature_set.audio_encoder, "text_encoder": feature_set.text_encoder,
                "audio_fingerprint": feature_set.audio_fingerprint, "text_fingerprint": feature_set.text_fingerprint}
    for fold in range(folds):
        torch.manual_seed(fold)
        info = CheckpointInfo(model=model_config, label_maps=label_maps, metrics={"score": 0.5}, features=features,
                              training={"data": {"max_segments": config.data.max_segments}})
        save_checkpoint(folder / f"fold_{fold}", HilbertModel(model_config), info)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--unique", type=int, default=200)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--documents-per-batch", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from hilbert.batch_inference import run_batch_inference
    from hilbert.data.demo import DEMO_TASKS
    from hilbert.data.manifest import load_manifest
    from hilbert.features.cache import FeatureCache
    from hilbert.features.extract import extract_features
    from hilbert.predict import embeddings_table, load_predictor, write_predictions
    from hilbert.ray_runtime import connect
    from hilbert.storage import write_parquet

    with tempfile.TemporaryDirectory(prefix="hilbert-batch-bench-") as scratch:
        root = Path(scratch)
        manifest = load_manifest(repeated_corpus(root, args.unique, args.documents))
        started = time.perf_counter()
        report = extract_features(manifest, "logmel", "hashngram", root / "cache", progress=False, in_process=True)
        print(f"{len(manifest)} documents ({sum(len(d.segments) for d in manifest)} segments; {args.unique} unique "
              f"recordings), features cached in {time.perf_counter() - started:.0f} s; {args.folds} fold models; "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
        model = fold_models(root / "model", args.folds, report.feature_set,
                            {task.name: tuple(task.classes) for task in DEMO_TASKS})
        predictor = load_predictor(model)
        cache = FeatureCache(root / "cache")
        for doc in manifest:  # every entry read once: each path below finds them in the page cache
            cache.load_document(report.feature_set, doc.doc_id)
        rows = []
        default_threads = torch.get_num_threads()
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            for kind in ("predict", "embed"):
                started = time.perf_counter()
                if kind == "predict":
                    write_predictions(predictor, manifest, root / "cache", root / f"{kind}-single.parquet")
                else:
                    write_parquet(embeddings_table(predictor, manifest, root / "cache"), root / f"{kind}-single.parquet")
                rows.append((kind, f"one process, {threads} thread(s)", "-", time.perf_counter() - started))
        torch.set_num_threads(default_threads)
        started = time.perf_counter()
        connect(num_cpus=os.cpu_count())
        ray_start = time.perf_counter() - started
        for actors in args.actors:
            for kind in ("predict", "embed"):
                done = run_batch_inference(kind, predictor, manifest, root / "cache", root / f"{kind}-{actors}.parquet",
                                           address=None, actors=actors, documents_per_batch=args.documents_per_batch,
                                           log=lambda line: None)
                rows.append((kind, "Ray Data", str(done.actors), done.seconds))
        print(f"local Ray started in {ray_start:.1f} s (not in the figures below)")
        print(f"{'job':<8} {'path':<26} {'actors':>6} {'seconds':>8} {'docs/s':>8}")
        for kind, path, actors, seconds in rows:
            print(f"{kind:<8} {path:<26} {actors:>6} {seconds:>8.1f} {len(manifest) / seconds:>8.1f}")


if __name__ == "__main__":
    main()
