"""ResNet image-classification task for nnx-trainer: data, transforms, model."""
