"""Data throughput: the Trainer's Grain pipeline against what the train step consumes.

Two pipelines, built exactly as ``Trainer.fit`` builds them (``nnx_trainer.data.train_pipeline``
over ``ResNetTask``'s examples and transforms: each batch read with one batched read,
its transforms applied once to the whole batch through their ``map_batch``):

* ``digits``: the example's default (scikit-learn digits 16x16x1, RandomCrop + Normalize,
  batch 32), fed to the example's model (ResNet-8, 16/32/64 features);
* ``synthetic``: CIFAR-like 32x32x3 images generated per example
  (``resnet_task.data.load_synthetic``), RandomCrop + Flip + Normalize, batch 128, fed to
  ResNet-18 (CIFAR stem).

For each, the pipeline's images/s with 0, 1 and 2 Grain worker processes (timed after
the first batch, so worker start-up is excluded) is divided by the images/s the train
step consumes (a hand ``jax.jit`` loop over batches already on the device): the
pipeline should be at least 3x faster. Then a real ``Trainer.fit`` of each reports
the share of the loop spent waiting for data (``data_wait_seconds / fit_seconds``);
it should be under 2%.

The pipeline and the step are measured one at a time: on a machine with few cores they
share the same cores when they run together, which the fit's data-wait share shows.

    python benchmarks/data_throughput.py            # ~4 min here (2 shared cores)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import harness

PIPELINE_TARGET = 3.0
WAIT_TARGET = 0.02


@dataclass(frozen=True)
class Workload:
    """A pipeline, the model that consumes it, and how long to run each part."""

    name: str
    task_kwargs: dict
    batch_size: int
    pipeline_batches: int
    step_batches: int
    fit_epochs: int
    fit_batches_per_epoch: int | None  # None: whole epochs; 0: no fit
    fit_kwargs: tuple = ()  # further Trainer options of the real fit
    workers: tuple | None = None  # worker counts to measure (None: --workers)


def example_defaults() -> tuple[dict, int, tuple]:
    """The example's task configuration, batch size and logging cadence, from its own defaults."""
    import importlib.util

    path = harness.REPO_ROOT / "examples" / "train_resnet.py"
    spec = importlib.util.spec_from_file_location("train_resnet_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    a = example.parse_args([])
    model_kwargs = ()
    if a.model == "simple":
        model_kwargs = (("num_blocks", a.num_blocks), ("initial_features", a.initial_features))
    kwargs = dict(dataset=a.dataset, image_size=a.image_size, model=a.model, stem=a.stem,
                  model_kwargs=model_kwargs, optimizer=a.optimizer, learning_rate=a.lr,
                  weight_decay=a.weight_decay, seed=a.seed)
    return kwargs, a.batch_size, (("log_every_n_steps", a.log_every),)


def workloads_for(args: argparse.Namespace) -> list[Workload]:
    """The two workloads at full or ``--quick`` size."""
    example, example_batch, example_fit = example_defaults()
    if args.quick:
        return [
            Workload("digits", example, 8, 6, 3, 1, 4, example_fit),
            Workload("synthetic", dict(
                dataset="synthetic", image_size=16, model="simple",
                model_kwargs=(("num_blocks", 1), ("initial_features", 4)),
                dataset_kwargs=(("num_examples", 256),)), 16, 4, 0, 1, 0, workers=(0,)),
        ]
    return [
        Workload("digits", example, args.digits_batch_size or example_batch,
                 args.pipeline_batches, 30, args.digits_fit_epochs, None, example_fit),
        Workload("synthetic", dict(
            dataset="synthetic", model="resnet18",
            dataset_kwargs=(("num_examples", args.synthetic_examples),)),
            args.synthetic_batch_size, args.pipeline_batches, 3, 1, args.resnet18_fit_steps),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workloads", nargs="+", choices=["digits", "synthetic"],
                   default=["digits", "synthetic"], help="which pipelines to measure")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="Grain worker counts to measure the pipelines with")
    p.add_argument("--pipeline-batches", type=int, default=40,
                   help="batches timed per pipeline measurement (after the first)")
    p.add_argument("--digits-batch-size", type=int, default=None,
                   help="batch size of the digits pipeline (default: the example's)")
    p.add_argument("--synthetic-batch-size", type=int, default=128)
    p.add_argument("--synthetic-examples", type=int, default=8192,
                   help="size of the generated CIFAR-like set (80%% of it trains)")
    p.add_argument("--digits-fit-epochs", type=int, default=3,
                   help="epochs of the example's real fit whose data-wait share is reported "
                        "(0: skip)")
    p.add_argument("--resnet18-fit-steps", type=int, default=4,
                   help="steps of the ResNet-18 fit whose data-wait share is reported (0: skip)")
    harness.add_common_arguments(p)
    return p.parse_args(argv)


def pipeline_rate(task, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of the Trainer's training pipeline for ``task`` (first batch not timed)."""
    from nnx_trainer import data as data_lib

    config = data_lib.PipelineConfig(global_batch_size=batch_size, worker_count=workers)
    per_epoch = data_lib.train_steps_per_epoch(len(task.train_data()), batch_size)
    done, seconds, epoch = 0, 0.0, 0
    while done < batches:
        iterator = iter(data_lib.train_pipeline(
            task.train_data(), task.train_transforms(), config, seed=0, epoch=epoch))
        next(iterator)  # start-up: worker processes, read threads
        take = min(per_epoch - 1, batches - done)
        start = time.perf_counter()
        for _ in range(take):
            next(iterator)
        seconds += time.perf_counter() - start
        done += take
        epoch += 1
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return done * batch_size / seconds


def step_rate(task, batch_size: int, steps: int) -> tuple[float, float]:
    """Images/s the train step consumes (hand jax.jit loop, data on device); compile seconds."""
    import jax
    import workloads

    from nnx_trainer import data as data_lib

    config = data_lib.PipelineConfig(global_batch_size=batch_size)
    iterator = iter(data_lib.train_pipeline(
        task.train_data(), task.train_transforms(), config, seed=0, epoch=0))
    batches = [jax.device_put(next(iterator)) for _ in range(min(4, steps))]
    loop = workloads.HandLoop(task, batches, 1000)
    loop.run(1)
    return steps * batch_size / loop.run(steps), loop.compile_seconds


def fit_wait_share(task, batch_size: int, epochs: int, limit: int | None, **options) -> dict:
    """A real default-plugin fit: data wait over fit time (and over fit time less compile)."""
    import tempfile

    import workloads

    import nnx_trainer

    with tempfile.TemporaryDirectory(prefix="nnx-bench-") as run_dir:
        trainer = nnx_trainer.Trainer(
            max_epochs=epochs, batch_size=batch_size, limit_train_batches=limit,
            run_dir=run_dir, plugins=[workloads.quiet_progress()], **options,
        )
        trainer.fit(task)
    compile_s = trainer.compile_seconds.get("train", 0.0)
    return {
        "steps": trainer.global_step,
        "wait": trainer.data_wait_seconds,
        "fit": trainer.fit_seconds,
        "share": trainer.data_wait_seconds / trainer.fit_seconds,
        "share_after_compile": trainer.data_wait_seconds / (trainer.fit_seconds - compile_s),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    harness.print_header("data throughput: Grain pipeline vs train-step consumption", args)
    from resnet_task.task import ResNetTask

    worker_counts = [w for w in args.workers if not (args.quick and w > 1)]
    for work in [w for w in workloads_for(args) if w.name in args.workloads]:
        task = ResNetTask(**work.task_kwargs)
        info = task.dataset_info
        transforms = ", ".join(type(t).__name__ for t in task.train_transforms())
        print(f"\n[{work.name}] {info.num_train} training images {info.image_shape}, "
              f"transforms [{transforms}], batch {work.batch_size}, model "
              f"{task.config.model} {dict(task.config.model_kwargs) or ''}", flush=True)
        consume = None
        if work.step_batches:  # 0: the smoke run skips this model's compilation
            consume, compile_s = step_rate(task, work.batch_size, work.step_batches)
            print(f"  train step consumes {consume:10.0f} images/s  (hand jax.jit loop, data on "
                  f"device; compile {compile_s:.1f} s)", flush=True)
        for workers in work.workers or worker_counts:
            rate = pipeline_rate(task, work.batch_size, workers, work.pipeline_batches)
            line = f"  pipeline, worker_count={workers}: {rate:10.0f} images/s"
            if consume:
                ratio = rate / consume
                verdict = "met" if ratio >= PIPELINE_TARGET else "NOT met"
                line += (f"   ratio {work.name} pipeline/step: {ratio:.2f} "
                         f"(target >= {PIPELINE_TARGET:.0f}: {verdict})")
            print(line, flush=True)
        if work.fit_batches_per_epoch == 0 or work.fit_epochs == 0:
            continue
        fit = fit_wait_share(task, work.batch_size, work.fit_epochs, work.fit_batches_per_epoch,
                             **dict(work.fit_kwargs))
        verdict = "met" if fit["share"] < WAIT_TARGET else "NOT met"
        print(f"  Trainer.fit (worker_count=0, default plugins), {fit['steps']} steps: data wait "
              f"{fit['wait']:.3f} s of {fit['fit']:.1f} s; ratio {work.name} data-wait/fit: "
              f"{fit['share']:.4f} (target < {WAIT_TARGET}: {verdict}); excluding the first "
              f"step's compilation: {fit['share_after_compile']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
