"""Training throughput on Ray Train (1 vs 2 DDP workers) and step time per model component.

    python benchmarks/train.py [--documents 240] [--epochs 3] [--config tune/train-demo.yaml]

Prints two tables: documents/s of training for 1 and 2 workers (from the per-epoch timings the
workers report, so Ray start-up is excluded and shown apart), and where one training step of
one process spends its time: each model stage, each loss term, backward and the optimiser.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ray_throughput(config, data, workers: int, storage: Path) -> dict[str, float]:
    from hilbert.train.run import build_trainer, make_plan

    config.scaling.num_workers = workers
    config.scaling.cpus_per_worker = 1.0 if workers <= (os.cpu_count() or 1) else 0.5
    started = time.perf_counter()
    fit = build_trainer(make_plan(config, data, "hilbert"), config, f"bench-{workers}", storage).fit()
    wall = time.perf_counter() - started
    # Train V2 keeps the metrics of retained checkpoints only (num_to_keep=1): the last epoch's.
    last = fit.metrics
    epoch = last["time/train_seconds"] + last["time/validation_seconds"] + last["time/checkpoint_seconds"]
    return {"workers": workers, "docs_per_s": last["time/train_documents_per_second"], "epoch_s": epoch,
            "wall_s": wall, "epochs": config.optimization.epochs, "overhead_s": wall - epoch * config.optimization.epochs}


def component_times(config, data, steps: int = 20) -> list[tuple[str, float]]:
    """Median milliseconds per stage of one training step, one process, the demo config's model."""
    import torch

    from hilbert.features.batches import DocumentFeatures, collate_documents
    from hilbert.features.cache import FeatureCache
    from hilbert.losses import HilbertLoss, cka_loss, dual_contrastive_loss, information_balance_loss, masked_task_loss
    from hilbert.model.hilbert import HilbertModel

    ids = list(data.labels)[: config.optimization.batch_size]
    dataset = DocumentFeatures(FeatureCache(config.data.cache_dir), data.feature_set, ids,
                               [data.labels[i] for i in ids], config.data.max_segments)
    batch = collate_documents([dataset[i] for i in range(len(dataset))])
    model = HilbertModel(config.model_config(data.feature_set.audio_dim, data.feature_set.text_dim,
                                             data.label_maps.sizes()))
    objective = HilbertLoss(config.loss)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=1e-3)
    timings: dict[str, list[float]] = {}

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        timings.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        return value

    for _ in range(steps):
        streams = timed("model: projection + positions", model._project, batch["audio"], batch["text"], batch["mask"])
        streams = timed("model: cross-modal attention", model.encoder, streams, batch["mask"])
        timed("model: self-attentive pooling (a, t)", lambda: {m: p(streams[m], batch["mask"])
                                                              for m, p in model.poolings.items()})
        timed("model: joint pooling", model._pool_joint, streams, batch["mask"])
        output = timed("model: full forward", model, batch["audio"], batch["text"], batch["mask"])
        temperature = objective.temperature()
        timed("loss: task (masked CE)", masked_task_loss, output.logits, batch["labels"])
        timed("loss: dual contrastive", dual_contrastive_loss, output.audio_embedding, output.text_embedding,
              output.joint_embedding, temperature)
        timed("loss: CKA", cka_loss, output.audio_embedding, output.text_embedding, output.joint_embedding)
        timed("loss: information balance", information_balance_loss, output.audio_embedding, output.text_embedding,
              output.joint_embedding, temperature=temperature)
        loss, _ = timed("loss: total", objective, output, batch["labels"])
        optimizer.zero_grad()
        timed("backward", loss.backward)
        timed("optimizer step", optimizer.step)
    return [(name, statistics.median(values[2:])) for name, values in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--config", default="tune/train-demo.yaml")
    args = parser.parse_args()

    import torch

    from hilbert.data.demo import write_demo_corpus
    from hilbert.train.config import load_train_config
    from hilbert.train.run import prepare_data

    workdir = Path(tempfile.mkdtemp(prefix="hilbert-train-bench-"))
    manifest = write_demo_corpus(workdir / "corpus", n_documents=args.documents, seed=0)
    config = load_train_config(args.config, {"data": {"manifest": str(manifest), "cache_dir": str(workdir / "cache")},
                                             "optimization": {"epochs": args.epochs, "patience": 100}})
    data = prepare_data(config, log=lambda _: None)
    rows = [ray_throughput(config, data, workers, workdir / "ray") for workers in (1, 2)]
    print(f"training throughput, {args.documents} documents, {config.cv.folds} folds in lockstep, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{'workers':>7} {'docs/s':>8} {'epoch s':>8} {'epochs':>6} {'run wall s':>10} {'start-up+other s':>16}"
          "   (docs/s and epoch s: last epoch)")
    for row in rows:
        print(f"{row['workers']:>7} {row['docs_per_s']:>8.1f} {row['epoch_s']:>8.2f} {row['epochs']:>6} "
              f"{row['wall_s']:>10.1f} {row['overhead_s']:>16.1f}")
    print(f"speed-up 2 vs 1 worker: {rows[1]['docs_per_s'] / rows[0]['docs_per_s']:.2f}x")
    torch.set_num_threads(1)
    print(f"\none training step, batch {config.optimization.batch_size}, 1 process, 1 thread (median ms)")
    for name, milliseconds in component_times(config, data):
        print(f"  {name:<40} {milliseconds:>8.2f}")


if __name__ == "__main__":
    main()
