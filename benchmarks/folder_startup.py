"""Image-folder start-up: seconds from building a 100,000-file folder dataset to the first step.

Generates a tree of small JPEGs (``--classes`` folders, ``--files`` files in all; kept
between runs in ``--cache-dir``, so only the first run pays for writing them), then, in
one process:

* ``scan``: ``resnet_task.data.load_image_folder`` (lists the folders, opens no file);
* ``to first step``: ``Trainer.fit`` of ``ResNetTask(dataset="folder")`` with a tiny
  model and ``max_steps=1``, from the call to the end of step 0 (compilation included;
  the compile seconds are printed separately so the data part can be read off);
* ``verify`` (``--verify``): the opt-in full check (``--verify-images``) for comparison,
  the pass over every file that building no longer does.

    python benchmarks/folder_startup.py              # ~1 min here, + ~1 min the first time
    python benchmarks/folder_startup.py --verify
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="image files in the tree")
    p.add_argument("--classes", type=int, default=100, help="class folders")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nnx-folder-bench"),
                   help="where the generated tree is kept between runs")
    p.add_argument("--verify", action="store_true", help="also time the full --verify-images pass")
    harness.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.classes = 200, 4
        args.cache_dir = str(Path(args.cache_dir) / "quick")
    return args


def generate(root: Path, files: int, classes: int) -> float:
    """Write the tree unless a complete one is there; the seconds it took (0 if cached)."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists() and done.read_text() == f"{files} {classes}":
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    encoded = []
    for c in range(classes):  # one small JPEG per class, written many times (speed)
        pixels = np.clip(rng.normal(40 + 2 * c, 30, (24, 32, 3)), 0, 255).astype(np.uint8)
        path = root / "tmp.jpg"
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        encoded.append(path.read_bytes())
        path.unlink()
    for i in range(files):
        c = i % classes
        folder = root / f"class{c:04d}"
        if i < classes:
            folder.mkdir(exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(encoded[c])
    done.write_text(f"{files} {classes}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    harness.print_header("image-folder start-up: scan and time to the first step", args)
    root = Path(args.cache_dir) / f"tree-{args.files}-{args.classes}"
    written = generate(root, args.files, args.classes)
    print(f"tree: {args.files} JPEGs of 32x24 in {args.classes} class folders under {root}"
          + (f" (written now in {written:.1f} s)" if written else " (cached)"), flush=True)

    import nnx_trainer
    from resnet_task.data import load_image_folder
    from resnet_task.image_folder import scan_folder, verify_images
    from resnet_task.task import ResNetConfig, ResNetTask

    start = time.perf_counter()
    train, val, info = load_image_folder(root, image_size=16)
    scan = time.perf_counter() - start
    print(f"scan (load_image_folder): {scan:.2f} s for {info.num_train} train / "
          f"{info.num_val} val files", flush=True)

    first_step: list[float] = []

    class FirstStep:
        name = "benchmark_first_step"

        @nnx_trainer.hookimpl
        def on_train_batch_end(self, loss):
            import jax

            jax.block_until_ready(loss)
            first_step.append(time.perf_counter())

    start = time.perf_counter()
    task = ResNetTask(ResNetConfig(dataset="folder", data_dir=str(root), image_size=16,
                                   model="simple", model_kwargs=(("num_blocks", 1),
                                                                 ("initial_features", 4))))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = nnx_trainer.Trainer(max_steps=1, batch_size=64, run_dir=run_dir,
                                      plugin_autoload=False, plugins=[FirstStep()])
        trainer.fit(task)
    to_first = first_step[0] - start
    compile_s = trainer.compile_seconds.get("train", float("nan"))
    print(f"to first step (task build + fit until step 0 ends): {to_first:.2f} s, of which "
          f"compiling the step {compile_s:.2f} s", flush=True)
    if args.verify:
        _, paths, _ = scan_folder(root)
        start = time.perf_counter()
        verify_images(paths, progress=False)
        print(f"verify (--verify-images, every file opened): {time.perf_counter() - start:.2f} s",
              flush=True)
    print(f"result: seconds to first step {to_first:.2f} ({args.files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
