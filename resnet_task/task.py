"""ResNetTask: image classification with a ResNet on Grain data (the example's task)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import nnx_trainer
from resnet_task.data import DatasetInfo, load_dataset
from resnet_task.image_folder import REPLACED_KEY
from resnet_task.imagenet import RECIPES, CenterCrop, RandomResizedCrop
from resnet_task.metrics import ReplacedExamples, TopKAccuracy
from resnet_task.models import create_model
from resnet_task.transforms import CheckLabels, Normalize, RandomCrop, RandomHorizontalFlip

OPTIMIZERS = ("sgd", "adamw")
#: ``ResNetConfig.freeze``: what stays fixed while fine-tuning.
FREEZE = ("none", "backbone")
#: The train metric that counts examples replaced under ``bad_images="skip"``
#: (logged as ``train/skipped_images``).
SKIPPED_METRIC = "skipped_images"


@dataclass(frozen=True)
class ResNetConfig:
    """Everything that defines the task: data, model, loss and optimizer."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    model: str = "resnet20"
    stem: str = "cifar"
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    # "auto": nnx_trainer.conv's convolution (faster backward) on CPU, XLA's on GPU/TPU,
    # chosen when the step is traced (building the task must not initialise the backend).
    conv_impl: str = "auto"
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0
    crop_padding: int = 4
    horizontal_flip: bool | None = None  # None: on, except for digits (a flipped 2 is no 2)
    seed: int = 0
    dataset_kwargs: tuple[tuple[str, Any], ...] = ()
    # "default": the images as loaded (resized to image_size), padded random crop + flip.
    # "imagenet": RandomResizedCrop + flip for training, resize + centre crop for
    # evaluation, both from the full-size image (resnet_task.imagenet). The recipe's
    # optimizer settings are the fields above; resnet_task.imagenet.resolve_recipe
    # fills them in (the example's --recipe imagenet).
    recipe: str = "default"
    # True: batches stay uint8 on the host and the step normalises them on the device
    # (XLA fuses it into the first convolution): a quarter of the bytes to stack, move
    # between Grain's workers and copy to the device, and no float pass per image on
    # the host, which costs about a third as much as decoding a 224 crop
    # (benchmarks/README.md, "Image decoding"). None: on for recipe "imagenet" only.
    normalize_on_device: bool | None = None
    # Fine-tuning (with Trainer.fit(init_from=...), the example's --pretrained): "backbone"
    # trains the head only (every parameter outside ``head`` frozen); "none" trains all.
    freeze: str = "none"


def weight_decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels; batch-norm scales and all biases are not decayed."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def classification_loss(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


class ResNetTask(nnx_trainer.Task):
    """A ResNet classifier. The data is loaded (and checked) when the task is built."""

    example_name = "images"

    def __init__(self, config: ResNetConfig | None = None, **overrides: Any) -> None:
        config = config or ResNetConfig()
        if overrides:
            config = ResNetConfig(**{**asdict(config), **overrides})
        if config.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {config.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
        if not 0.0 <= config.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {config.warmup_fraction}")
        if not config.learning_rate > 0:
            raise ValueError(
                f"learning_rate must be positive, got {config.learning_rate} (e.g. --lr 0.1)"
            )
        if not config.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
        if config.recipe not in RECIPES:
            raise ValueError(
                f"unknown recipe {config.recipe!r}; choose one of: {', '.join(RECIPES)}"
            )
        if config.freeze not in FREEZE:
            raise ValueError(f"unknown freeze {config.freeze!r}; choose one of: "
                             f"{', '.join(FREEZE)}")
        self.config = config
        dataset_kwargs = dict(config.dataset_kwargs)
        if config.recipe == "imagenet" and config.dataset in ("folder", "arrayrecord"):
            dataset_kwargs["encoded"] = True  # the crops decode the full-size files themselves
        self._train, self._val, self.info = load_dataset(
            config.dataset, config.data_dir, config.image_size, seed=config.seed,
            **dataset_kwargs,
        )
        # Build one model abstractly now so an unknown model name or bad kwargs fail
        # before any training starts, without paying for the real initialisation.
        nnx.eval_shape(lambda: self._create(nnx.Rngs(0), jnp.float32))

    @property
    def dataset_info(self) -> DatasetInfo:
        """Number of classes, image shape and normalisation of the loaded dataset."""
        return self.info

    def _create(self, rngs: nnx.Rngs, dtype) -> nnx.Module:
        return create_model(
            self.config.model, num_classes=self.info.num_classes,
            in_channels=self.info.image_shape[-1], stem=self.config.stem, dtype=dtype,
            rngs=rngs, **{"conv_impl": self.config.conv_impl, **dict(self.config.model_kwargs)},
        )

    def configure_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The configured ResNet in the Trainer's compute dtype (parameters float32)."""
        return self._create(rngs, self.compute_dtype)

    def configure_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """SGD (Nesterov momentum) or AdamW; linear warmup then cosine decay to zero."""
        c = self.config
        warmup = int(c.warmup_fraction * total_steps)
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=c.learning_rate, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=0.0,
        )
        self.learning_rate_schedule = schedule
        if c.optimizer == "adamw":
            return optax.adamw(schedule, weight_decay=c.weight_decay, mask=weight_decay_mask)
        return optax.chain(
            optax.add_decayed_weights(c.weight_decay, mask=weight_decay_mask),
            optax.sgd(schedule, momentum=c.momentum, nesterov=c.nesterov),
        )

    @property
    def skips_bad_images(self) -> bool:
        """Whether undecodable files are replaced (``dataset_kwargs`` ``bad_images="skip"``)."""
        return dict(self.config.dataset_kwargs).get("bad_images", "stop") == "skip"

    def configure_train_metrics(self) -> nnx.MultiMetric:
        """Training loss and top-1 accuracy, accumulated on device; under
        ``bad_images="skip"`` also ``skipped_images``, the examples replaced so far in
        the fit (a running total, see :class:`ReplacedExamples`)."""
        metrics: dict[str, nnx.metrics.Metric] = {
            "loss": nnx.metrics.Average("loss"), "accuracy": nnx.metrics.Accuracy()}
        if self.skips_bad_images:
            metrics[SKIPPED_METRIC] = ReplacedExamples()
        return nnx.MultiMetric(**metrics)

    def configure_metrics(self) -> nnx.MultiMetric:
        """Evaluation loss, top-1 and top-5 accuracy."""
        return nnx.MultiMetric(
            loss=nnx.metrics.Average("loss"),
            accuracy=nnx.metrics.Accuracy(),
            top5_accuracy=TopKAccuracy(5),
        )

    # ---- data -----------------------------------------------------------------

    def train_data(self) -> grain.MapDataset:
        """Training examples (uint8 images, int32 labels)."""
        return self._train

    def val_data(self) -> grain.MapDataset:
        """The held-out split."""
        return self._val

    def _check_labels(self, source: str) -> CheckLabels:
        """Labels outside the model's classes fail the batch, naming ``source``."""
        return CheckLabels(self.info.num_classes, f"{type(self).__name__}.{source}()")

    def train_transforms(self) -> list[Any]:
        """Random crop with padding (recipe "imagenet": a random resized crop, per
        example), a label check (every label in ``[0, num_classes)``), horizontal flip
        (not for digits), normalisation."""
        c = self.config
        flip = c.horizontal_flip if c.horizontal_flip is not None else c.dataset != "digits"
        # The check is the first batch transform: per-example ones (the resized crop) go first.
        check = self._check_labels("train_data")
        transforms: list[Any] = []
        if c.recipe == "imagenet":
            transforms += [RandomResizedCrop(self.info.image_shape[0]), check]
        else:
            transforms.append(check)
            if c.crop_padding:
                transforms.append(RandomCrop(c.crop_padding))
        if flip:
            transforms.append(RandomHorizontalFlip())
        return transforms + self._host_normalize()

    def eval_transforms(self) -> list[Any]:
        """Normalisation (recipe "imagenet": after resize + centre crop), after a label check."""
        crop = [CenterCrop(self.info.image_shape[0])] if self.config.recipe == "imagenet" else []
        # Evaluation and prediction share these: the check names every source it may be.
        check = self._check_labels("val_data/test_data/predict_data")
        return [*crop, check, *self._host_normalize()]

    @property
    def normalizes_on_device(self) -> bool:
        """Whether the steps normalise uint8 batches (see ``ResNetConfig.normalize_on_device``)."""
        on = self.config.normalize_on_device
        return self.config.recipe == "imagenet" if on is None else bool(on)

    def _host_normalize(self) -> list[Normalize]:
        return [] if self.normalizes_on_device else [Normalize(self.info.mean, self.info.std)]

    def _images(self, batch) -> jax.Array:
        """The batch's images as the model takes them: normalised float32."""
        images = batch["image"]
        if not self.normalizes_on_device:
            return images
        norm = Normalize(self.info.mean, self.info.std)  # the host transform's constants
        return images.astype(jnp.float32) * norm.scale - norm.shift

    # ---- steps ------------------------------------------------------------------

    def training_step(self, model: nnx.Module, batch) -> tuple[jax.Array, dict[str, Any]]:
        """Mean (smoothed) cross-entropy; logits and labels feed the train accuracy, the
        ``replaced`` flags (``bad_images="skip"``) the count of skipped images."""
        logits = model(self._images(batch))
        loss = classification_loss(logits, batch["label"], self.config.label_smoothing).mean()
        aux = {"logits": logits, "labels": batch["label"]}
        if REPLACED_KEY in batch:
            aux[REPLACED_KEY] = batch[REPLACED_KEY]
        return loss, aux

    def validation_step(self, model: nnx.Module, batch) -> dict[str, Any]:
        """Per-example loss (unsmoothed) and logits for the masked metrics."""
        logits = model(self._images(batch))
        return {
            "loss": classification_loss(logits, batch["label"]),
            "logits": logits,
            "labels": batch["label"],
        }

    def predict_step(self, model: nnx.Module, batch) -> dict[str, jax.Array]:
        """Class probabilities and the predicted class."""
        logits = model(self._images(batch))
        return {"probabilities": jax.nn.softmax(logits), "prediction": logits.argmax(-1)}

    def frozen_parameters(self) -> Any:
        """``freeze="backbone"``: every parameter but the classifier head's."""
        if self.config.freeze == "backbone":
            return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head")))
        return nnx.Nothing

    def import_weights(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """``fit(init_from=...)`` of a torchvision/timm ResNet state dict: renamed to our
        paths and layouts (``resnet_task.torchvision_weights.nnx_weights``)."""
        from resnet_task.torchvision_weights import is_torchvision_state_dict, nnx_weights

        return nnx_weights(tensors) if is_torchvision_state_dict(tensors) else tensors

    def hparams(self) -> dict[str, Any]:
        """The task configuration plus the dataset's facts."""
        return {**asdict(self.config), "num_classes": self.info.num_classes,
                "image_shape": list(self.info.image_shape)}
