"""What the training state's checks cost: the NaN guard's and the checkpoint fingerprint's.

Both read every array of the state on the device (``nnx_trainer.state.finite_and_checksums``:
one small jitted program per kind of array, shape x dtype x sharding, dispatched per
array). The alternative it replaced is one jitted program over all arrays, written out
below as ``one program``. Per variant, in its own child process, on ResNet-50's state
(ImageNet stem, SGD with momentum: 429 arrays), after the eager build's programs are
dropped and the heap trimmed:

* the first check (compiling it), then the median of five more;
* the host memory the compiled programs keep (RSS after the checks and a trim, minus
  before).

    python benchmarks/state_checks.py
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import harness

SCRIPT = Path(__file__).resolve()
VARIANTS = ("one program", "per kind")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet50")
    harness.add_common_arguments(p)
    p.add_argument("--_variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import workloads
    from flax import nnx

    from nnx_trainer import state as state_lib
    from nnx_trainer.host_memory import release_free_host_memory

    spec = workloads.ModelSpec(args.model, stem="imagenet" if args.model == "resnet50" else
                               "cifar", kwargs=(("width", 4),) if args.quick else ())
    images, labels = workloads.synthetic_arrays(8, 32)
    task = workloads.InMemoryResNetTask(images, labels, spec)
    with jax.threefry_partitionable(False):  # as the Trainer builds
        model = task.configure_model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, task.configure_optimizer(1000), wrt=nnx.Param)
    leaves = jax.tree.leaves(nnx.state((model, optimizer)))
    kinds = len({(x.shape, x.dtype) for x in leaves})

    if args._variant == "per kind":
        def check() -> object:
            return state_lib.finite_and_checksums(leaves)
    else:
        @jax.jit
        def all_at_once(arrays: list[jax.Array]) -> jax.Array:
            finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]).astype(jnp.uint32)
            sums = jnp.stack([state_lib._checksum(x) for x in arrays])
            return jnp.stack([finite, sums], axis=1)

        def check() -> object:
            return jax.device_get(all_at_once(leaves))

    jax.clear_caches()
    gc.collect()
    release_free_host_memory()
    before = harness.rss_mib_self()
    start = time.perf_counter()
    check()
    first = time.perf_counter() - start
    times = []
    for _ in range(5):
        start = time.perf_counter()
        check()
        times.append(time.perf_counter() - start)
    gc.collect()
    release_free_host_memory()
    return {"arrays": len(leaves), "kinds": kinds, "first_seconds": first,
            "check_seconds": harness.median(times),
            "kept_mib": harness.rss_mib_self() - before}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    if args._variant:
        harness.emit_result(worker(args))
        return 0
    harness.print_header(f"state checks: {args.model}", args)
    results = {}
    for variant in VARIANTS:
        r = harness.child_result(harness.this_script_argv(
            SCRIPT, "--_variant", variant, "--model", args.model,
            *(["--quick"] if args.quick else [])))
        results[variant] = r
        print(f"  {variant:12s} {r['arrays']} arrays ({r['kinds']} kinds): first check "
              f"{r['first_seconds']:.2f} s, then {r['check_seconds'] * 1e3:.1f} ms; "
              f"programs keep {r['kept_mib']:.0f} MiB", flush=True)
    one, per = results["one program"], results["per kind"]
    print(f"ratio first check per kind/one program: "
          f"{per['first_seconds'] / one['first_seconds']:.2f}")
    print(f"ratio later checks per kind/one program: "
          f"{per['check_seconds'] / one['check_seconds']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
