"""ResNet-50 (ImageNet stem) training throughput and MFU with ``Trainer(precision="bf16")``.

Synthetic 224x224x3 uint8 images in memory (the model casts them to bfloat16), 1000
classes, ``ResNetTask``'s loss and optimizer, ``Trainer.fit`` with the chosen strategy;
the steady state is timed within the second epoch (``--steps`` + 1 batches per epoch,
the first epoch compiles and warms up).

MFU = achieved training FLOP/s / the device's dense bf16 peak. Training FLOPs per image
are counted from the model itself: every convolution and matrix product in the traced
forward pass contributes ``2 x MACs`` (MACs from the operand shapes), and a training
step costs 3x the forward (forward, input gradients, weight gradients). BatchNorm,
ReLU and pooling are not counted, as is standard. Peaks (dense bf16, no sparsity):
``nnx_trainer.flops.PEAK_FLOPS`` (the one the Trainer's MFU uses); on a
device not in it pass ``--peak-flops``.

    python benchmarks/resnet50_gpu.py --batch-size 256 --steps 30   # on a GPU
    python benchmarks/resnet50_gpu.py --quick   # CPU smoke run: the smallest ResNet, same path
"""

from __future__ import annotations

import argparse
import sys

import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--strategy", default="single_device",
                   help="single_device, data_parallel or fsdp (the strategies plugin)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--width", type=int, default=64, help="stem width (64 = ResNet-50)")
    p.add_argument("--model", default="resnet50", help=argparse.SUPPRESS)
    p.add_argument("--stem", default="imagenet", help=argparse.SUPPRESS)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per device for MFU (default: from the device kind)")
    p.add_argument("--no-plugins", action="store_true",
                   help="plugin_autoload=False (default: every installed plugin)")
    harness.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:  # the smallest ResNet compiles in seconds; the script's path is the same
        args.image_size, args.model, args.stem = 16, "simple", "cifar"
        args.batch_size, args.steps = min(args.batch_size, 2), min(args.steps, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    harness.print_header("ResNet-50 bf16 training throughput and MFU", args)
    import jax
    import numpy as np
    import workloads
    from flax import nnx

    from nnx_trainer.flops import peak_flops

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}", flush=True)
    per_epoch = args.steps + 1
    images, labels = workloads.synthetic_arrays(
        per_epoch * args.batch_size, args.image_size, num_classes=1000, dtype=np.uint8)
    kwargs = () if args.width == 64 else (("width", args.width),)
    if args.model == "simple":
        kwargs = (("num_blocks", 1), ("initial_features", 4))
    spec = workloads.ModelSpec(args.model, stem=args.stem, kwargs=kwargs)
    task = workloads.InMemoryResNetTask(images, labels, spec, num_classes=1000)

    model = nnx.eval_shape(lambda: task.configure_model(nnx.Rngs(0)))  # shapes only
    macs = workloads.forward_macs(model, (1, args.image_size, args.image_size, 3))
    flops_per_image = 3 * 2 * macs
    print(f"model {spec.describe()}, {args.image_size}x{args.image_size}x3: forward "
          f"{macs / 1e9:.3f} GMACs/image, training {flops_per_image / 1e9:.2f} GFLOPs/image "
          "(3 x 2 x MACs)", flush=True)

    fit = workloads.timed_fit(task, batch_size=args.batch_size, epochs=2, precision="bf16",
                              strategy=args.strategy, default_plugins=not args.no_plugins)
    devices = fit.trainer.strategy.num_devices
    rate = fit.images_per_second
    achieved = rate * flops_per_image
    peak = args.peak_flops or peak_flops(device.device_kind, "bf16")
    print(f"  strategy {args.strategy} on {devices} device(s), batch {args.batch_size}, "
          f"{fit.timed_steps} timed steps, compile {fit.compile_seconds:.1f} s")
    print(f"  throughput: {rate:.1f} images/s ({rate / devices:.1f} per device), "
          f"{achieved / 1e12:.2f} TFLOP/s achieved")
    if peak:
        print(f"  MFU: {achieved / (peak * devices):.3f} of {peak / 1e12:.0f} TFLOP/s dense bf16 "
              f"peak per device ({device.device_kind})")
    else:
        print(f"  MFU: n/a (no bf16 peak known for {device.device_kind!r}; pass --peak-flops)")
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        print(f"  device memory peak: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    print(f"  data wait {fit.data_wait_share:.2%} of fit time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
