"""ImageNet-style input pipeline: images/s per core, ours (folder, ArrayRecord) vs torchvision.

Generates an ImageNet-like set (``--images`` JPEGs of 500x375 at quality 90, in
``--classes`` class folders under ``train/``, plus a small ``val/``; kept between runs in
``--cache-dir``) and converts it once to ArrayRecord shards (``resnet_task.convert``).
Then, each in its own child process (so JAX and PyTorch never share one, and a fork
never copies a multithreaded parent), for 0, 1 and 2 worker processes:

* ``folder``: ``ResNetTask(dataset="folder", recipe="imagenet")``'s training pipeline,
  exactly as ``Trainer.fit`` reads it (``nnx_trainer.data.train_pipeline``): each file
  decoded (``resnet_task.jpeg``: simplejpeg when installed, else Pillow) at a reduced
  JPEG scale where the crop allows, RandomResizedCrop 224, then per batch a flip,
  ``--batch`` images per batch, as uint8: the recipe normalises on the device, in the
  train step;
* ``folder-hostnorm``: the same with ``normalize_on_device=False``: normalised to
  float32 on the host, as torchvision's pipeline is;
* ``arrayrecord``: ``folder`` from the converted shards;
* ``torchvision``: ``ImageFolder`` + ``DataLoader`` with ``RandomResizedCrop(224)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (full decode with Pillow), if
  torchvision can be imported (otherwise skipped, saying why).

How cores are counted: "per core" is images/s / max(1, workers). With 0 workers the
main process does the work (ours: Grain's 2 read threads, whose Pillow decoding can
overlap; torchvision: one thread, plus torch's intra-op threads in ToTensor/Normalize),
so the "images per CPU-second" column (CPU time of the child and all its worker
processes over the timed window) is the machine-independent comparison.

    python benchmarks/image_pipeline.py                 # ~5 min here, + ~1 min the first time
    python benchmarks/image_pipeline.py --workers 0,2 --batches 20
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

PIPELINES = ("folder", "folder-hostnorm", "arrayrecord", "torchvision")
IMAGE_SIZE = (500, 375)  # (w, h): ImageNet's typical photo
VAL_PER_CLASS = 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=None,
                   help="training JPEGs to generate (default 2000; --quick: 32)")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch (default 256; --quick: 8)")
    p.add_argument("--crop", type=int, default=224, help="RandomResizedCrop output size")
    p.add_argument("--workers", default=None,
                   help="comma-separated worker counts (default 0,1,2; --quick: 0,1)")
    p.add_argument("--batches", type=int, default=None,
                   help="batches timed per configuration (default 12; --quick: 2)")
    p.add_argument("--warmup", type=int, default=3,
                   help="batches read before the timing starts: worker start-up, and the "
                        "batches that concurrent read threads finish together at the start")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help="which of folder, arrayrecord, torchvision to run")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "nnx-image-bench"),
                   help="where the generated images and shards are kept between runs")
    p.add_argument("--torch-python", default=sys.executable,
                   help="the Python that runs the torchvision side: e.g. a venv's with a "
                        "torch + torchvision pair that import together, when this "
                        "environment's torch has no matching torchvision")
    p.add_argument("--decoder-images", type=int, default=None,
                   help="files the single-thread decoder comparison (Pillow, simplejpeg, "
                        "OpenCV) decodes (default 300; --quick: 16; 0: skip it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one config
    harness.add_common_arguments(p)
    args = p.parse_args(argv)
    quick = {"images": 32, "batch": 8, "workers": "0,1", "batches": 2, "decoder_images": 16}
    full = {"images": 2000, "batch": 256, "workers": "0,1,2", "batches": 12,
            "decoder_images": 300}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.child is None:
        args.cache_dir = str(Path(args.cache_dir) / "quick")
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w != ""]
    args.pipeline_names = [x for x in args.pipelines.split(",") if x]
    unknown = set(args.pipeline_names) - set(PIPELINES)
    if unknown:
        p.error(f"unknown pipelines {sorted(unknown)}; choose from {', '.join(PIPELINES)}")
    return args


# ---- data --------------------------------------------------------------------------------


def _photo(rng, width: int, height: int):
    """A photo-like image: smooth random structure at several scales plus sensor noise,
    so its JPEG has realistic size and decoding cost (flat or pure-noise images do not)."""
    import numpy as np
    from PIL import Image

    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (16, 45.0), (64, 20.0), (160, 25.0)):
        grid = rng.uniform(-1, 1, (cells * height // width + 1, cells, 3)) * amplitude
        layer = Image.fromarray(((grid + 128).clip(0, 255)).astype(np.uint8))
        out += np.asarray(layer.resize((width, height), Image.Resampling.BICUBIC),
                          np.float32) - 128
    out += 128 + rng.normal(0, 12, out.shape)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def generate(root: Path, images: int, classes: int) -> float:
    """Write ``root/train`` and ``root/val`` unless complete; the seconds it took (0: cached)."""
    import numpy as np

    done = root / ".complete"
    if done.exists():
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    width, height = IMAGE_SIZE
    for split, count in (("train", images), ("val", VAL_PER_CLASS * classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            _photo(rng, width, height).save(folder / f"{split}_{i:07d}.JPEG", quality=90)
    done.write_text("ok")
    return time.perf_counter() - start


def convert_once(root: Path, shards: Path) -> float:
    """ArrayRecord shards of ``root`` in ``shards`` unless there; the seconds it took."""
    if (shards / "metadata.json").is_file():
        return 0.0
    from resnet_task.convert import convert

    start = time.perf_counter()
    convert(root, shards, workers=2, progress=False)
    return time.perf_counter() - start


# ---- one configuration, in a child process ----------------------------------------------


def _cpu_seconds() -> float:
    """CPU time of this process and its live descendants (the pipeline's workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total


def _time_batches(batches, warmup: int, timed: int, batch_size: int) -> dict[str, float]:
    """Consume ``warmup`` batches, then time ``timed`` more (wall and CPU)."""
    it = iter(batches)
    for _ in range(warmup):  # worker start-up and first reads are not steady state
        next(it)
    try:
        cpu0 = _cpu_seconds()
    except ImportError:
        cpu0 = None
    start = time.perf_counter()
    for _ in range(timed):
        batch = next(it)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0 if cpu0 is not None else float("nan")
    shape = tuple(batch["image"].shape) if isinstance(batch, dict) else tuple(batch[0].shape)
    if shape[0] != batch_size:
        raise RuntimeError(f"batch of shape {shape}, expected {batch_size} images")
    return {"seconds": wall, "cpu_seconds": cpu, "images": timed * batch_size,
            "shape": list(shape)}


def _epochs_needed(num_examples: int, batch: int, batches: int) -> int:
    return math.ceil(batches / max(1, num_examples // batch))


def run_ours(kind: str, data_dir: Path, workers: int, args: argparse.Namespace) -> dict:
    from nnx_trainer.data import PipelineConfig, train_pipeline
    from resnet_task.jpeg import decoder_name
    from resnet_task.task import ResNetConfig, ResNetTask

    host_norm = kind.endswith("-hostnorm")
    task = ResNetTask(ResNetConfig(dataset=kind.removesuffix("-hostnorm"),
                                   data_dir=str(data_dir), image_size=args.crop,
                                   model="resnet18", stem="imagenet", recipe="imagenet",
                                   normalize_on_device=not host_norm))
    examples = task.train_data()
    needed = args.warmup + args.batches
    pipeline = train_pipeline(
        examples, task.train_transforms(),
        PipelineConfig(global_batch_size=args.batch, worker_count=workers),
        seed=0, epoch=0, num_epochs=_epochs_needed(len(examples), args.batch, needed))
    return {**_time_batches(pipeline, args.warmup, args.batches, args.batch),
            "versions": f"decoder {decoder_name()}, "
                        + ("float32 batches" if host_norm else "uint8 batches")}


def compare_decoders(root: Path, count: int, crop: int) -> list[tuple[str, float, str]]:
    """Single-thread CPU ms per file of decode + RandomResizedCrop ``crop`` (the same boxes)
    for Pillow, simplejpeg and OpenCV; ``(decoder, ms, note)``, fastest identical first."""
    import io
    import os

    import numpy as np

    from resnet_task import jpeg
    from resnet_task.imagenet import decode_crop, sample_crop_box

    files = sorted((root / "train").rglob("*.JPEG"))[:count]
    datas = [f.read_bytes() for f in files]
    draws = np.random.default_rng(0).uniform(size=(len(datas), 10, 4))

    def ours(name: str):
        def run(i: int, data: bytes) -> np.ndarray:
            os.environ[jpeg.ENV_VAR] = name
            return decode_crop(io.BytesIO(data), lambda h, w: sample_crop_box(h, w, draws[i]),
                               crop)
        return run

    candidates = {"pillow": ours("pillow")}
    if jpeg.simplejpeg is not None:
        candidates["simplejpeg"] = ours("simplejpeg")
    try:
        import cv2

        cv2.setNumThreads(1)

        def opencv(i: int, data: bytes) -> np.ndarray:
            # Full decode (imdecode's IMREAD_REDUCED_* fixes the scale before the size is
            # known), then the same box, area-averaged down (nearest to Pillow's filter).
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                               cv2.COLOR_BGR2RGB)
            top, left, h, w = (int(v) for v in sample_crop_box(*rgb.shape[:2], draws[i]))
            return cv2.resize(rgb[top:top + h, left:left + w], (crop, crop),
                              interpolation=cv2.INTER_AREA)
        candidates["opencv"] = opencv
        if jpeg.simplejpeg is not None:
            def simplejpeg_cv_resize(i: int, data: bytes) -> np.ndarray:
                # Separates the resize from the decode: simplejpeg's reduced-scale decode,
                # then OpenCV's area resize of the box instead of Pillow's bilinear one.
                height, width, _, _ = jpeg.simplejpeg.decode_jpeg_header(data)
                top, left, h, w = sample_crop_box(height, width, draws[i])
                request = (math.ceil(width * crop / w), math.ceil(height * crop / h))
                scale = jpeg.draft_scale(width, height, request)
                rgb = jpeg.simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=scale,
                                                  min_height=-(-height // scale),
                                                  min_width=-(-width // scale))
                y, x, hh, ww = (round(v / scale) for v in (top, left, h, w))
                return cv2.resize(rgb[y:y + hh, x:x + ww], (crop, crop),
                                  interpolation=cv2.INTER_AREA)
            candidates["simplejpeg+opencv-resize"] = simplejpeg_cv_resize
    except ImportError:
        pass
    reference = [candidates["pillow"](i, d) for i, d in enumerate(datas)]
    rows = []
    for name, fn in candidates.items():
        best = math.inf
        for _ in range(3):  # best of 3 passes: the least disturbed
            start = time.process_time()
            out = [fn(i, d) for i, d in enumerate(datas)]
            best = min(best, (time.process_time() - start) / len(datas))
        diff = max(float(np.abs(o.astype(int) - r).mean())
                   for o, r in zip(out, reference, strict=True))
        rows.append((name, best * 1e3, "same pixels as Pillow" if diff == 0 else
                     f"mean |difference| from Pillow up to {diff:.2f} levels"))
    os.environ.pop(jpeg.ENV_VAR, None)
    return rows


def run_torchvision(root: Path, workers: int, args: argparse.Namespace) -> dict:
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    dataset = datasets.ImageFolder(str(root / "train"), transform=T.Compose([
        T.RandomResizedCrop(args.crop), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    needed = args.warmup + args.batches

    def batches():
        for _ in range(_epochs_needed(len(dataset), args.batch, needed)):
            for images, labels in loader:
                yield {"image": images, "label": labels}

    import torchvision

    return {**_time_batches(batches(), args.warmup, args.batches, args.batch),
            "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                        f"{torch.get_num_threads()} intra-op threads"}


def child_main(args: argparse.Namespace) -> int:
    kind, workers = args.child.split(":")
    root = Path(args.cache_dir) / "images"
    if kind == "decoders":
        result = {"rows": compare_decoders(root, args.decoder_images, args.crop)}
    elif kind == "torchvision":
        result = run_torchvision(root, int(workers), args)
    else:
        data_dir = Path(args.cache_dir) / "shards" if kind == "arrayrecord" else root
        result = run_ours(kind, data_dir, int(workers), args)
    harness.emit_result(result)
    return 0


# ---- the parent --------------------------------------------------------------------------


def _torchvision_available(python: str = sys.executable) -> str | None:
    """Why torchvision cannot run under ``python``, or None if it can.

    Tried in a child: a torchvision wheel built for another torch (e.g. a CUDA build next
    to torch's CPU wheel) fails on import with a RuntimeError, not an ImportError.
    """
    proc = subprocess.run([python, "-c", "import torchvision.datasets"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    return (f"torchvision: skipped, it cannot be imported here ({last}); install the "
            "torchvision build that matches the installed torch (torch 2.13 <-> torchvision "
            "0.28) to compare against it, or pass --torch-python with one that does")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    if args.child is not None:
        return child_main(args)
    harness.print_header("image pipeline: decode + RandomResizedCrop + flip + normalise + batch",
                         args, extra_packages=("pillow", "torch", "torchvision", "psutil"))
    # "v2": the generator's version; a change of _photo must change the name.
    cache = Path(args.cache_dir) / f"set-v2-{args.images}-{args.classes}"
    root = cache / "images"
    written = generate(root, args.images, args.classes)
    sizes = [p.stat().st_size for p in (root / "train").rglob("*.JPEG")]
    print(f"data: {len(sizes)} training JPEGs of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, quality 90, "
          f"mean {sum(sizes) / len(sizes) / 1024:.0f} KiB, in {args.classes} classes under "
          f"{root}" + (f" (written now in {written:.1f} s)" if written else " (cached)"),
          flush=True)
    if "arrayrecord" in args.pipeline_names:
        converted = convert_once(root, cache / "shards")
        print("shards: " + str(cache / "shards")
              + (f" (converted now in {converted:.1f} s)" if converted else " (cached)"),
              flush=True)
    skip = _torchvision_available(args.torch_python)
    if skip and "torchvision" in args.pipeline_names:
        print(skip, flush=True)
    script = str(Path(__file__).resolve())
    common = ["--cache-dir", str(cache), "--images", str(args.images), "--batch",
              str(args.batch), "--crop", str(args.crop), "--batches", str(args.batches),
              "--warmup", str(args.warmup), "--decoder-images", str(args.decoder_images)]
    if args.quick:
        common.append("--quick")
    if args.decoder_images:
        res = harness.run_child([sys.executable, script, "--child", "decoders:0", *common],
                                timeout=1800)
        if res["returncode"] != 0 or "result" not in res:
            print(f"decoder comparison FAILED:\n{res['stderr'][-3000:]}")
            return 1
        print(f"decoders (one thread, decode + RandomResizedCrop {args.crop}, best of 3 "
              f"passes over {args.decoder_images} files):")
        pillow_ms = res["result"]["rows"][0][1]
        for name, ms, note in res["result"]["rows"]:
            print(f"result: decoder {name} {ms:.3f} ms/image, {1e3 / ms:.0f} images/CPU-s, "
                  f"{pillow_ms / ms:.2f}x Pillow ({note})", flush=True)
    rows = []
    for kind in args.pipeline_names:
        if kind == "torchvision" and skip:
            continue
        for workers in args.worker_counts:
            python = args.torch_python if kind == "torchvision" else sys.executable
            res = harness.run_child([python, script, "--child", f"{kind}:{workers}",
                                     *common], timeout=1800)
            if res["returncode"] != 0 or "result" not in res:
                print(f"{kind} with {workers} workers FAILED:\n{res['stderr'][-3000:]}")
                return 1
            r = res["result"]
            rate = r["images"] / r["seconds"]
            rows.append((kind, workers, rate, rate / max(1, workers),
                         r["images"] / r["cpu_seconds"] if r["cpu_seconds"] else float("nan"),
                         res["peak_rss_mib"]))
            print(f"  {kind:<15} workers {workers}: {rate:8.1f} images/s"
                  + (f" ({r['versions']})" if "versions" in r else ""), flush=True)

    print()
    print(f"batch {args.batch}, crop {args.crop}, {args.batches} batches timed after "
          f"{args.warmup} warm-up batches; cores: per core = images/s / max(1, workers) "
          f"(0 workers: the main process decodes, ours with 2 read threads); "
          f"images/CPU-s: all processes' CPU time")
    print(f"| {'pipeline':<15} | workers | images/s | per core | images/CPU-s | peak RSS MiB |")
    print(f"|{'-' * 17}|---------|----------|----------|--------------|--------------|")
    for kind, workers, rate, per_core, per_cpu, rss in rows:
        print(f"| {kind:<15} | {workers:7d} | {rate:8.1f} | {per_core:8.1f} | {per_cpu:12.1f} "
              f"| {rss:12.0f} |")
    print()
    per_core = {(kind, workers): pc for kind, workers, _, pc, _, _ in rows}
    for kind in dict.fromkeys(k for k, *_ in rows):
        figures = ", ".join(f"{pc:.1f} ({w} workers)" for (k, w), pc in per_core.items()
                            if k == kind)
        print(f"result: images/s per core {kind} {figures}")
    per_cpu = {(kind, workers): pc for kind, workers, _, _, pc, _ in rows}
    for ours in ("folder", "folder-hostnorm", "arrayrecord"):
        common_workers = [w for w in args.worker_counts
                          if (ours, w) in per_core and ("torchvision", w) in per_core]
        if common_workers:
            ratios = ", ".join(f"{per_core[(ours, w)] / per_core[('torchvision', w)]:.2f} "
                               f"({w} workers)" for w in common_workers)
            print(f"result: ratio {ours}/torchvision per core {ratios}")
            ratios = ", ".join(f"{per_cpu[(ours, w)] / per_cpu[('torchvision', w)]:.2f} "
                               f"({w} workers)" for w in common_workers)
            print(f"result: ratio {ours}/torchvision images per CPU-second {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
