"""The multi-scale classifier: one InceptionV3 per tower level, pooled features concatenated, one logit.

Input is the loader's uint8 batch (N, T, H, W, 3); the [-1, 1] scaling InceptionV3 expects happens
here, on the device, so only uint8 crosses the host-device link.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .inception_v3 import InceptionV3


def scale_to_inception(images: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """uint8 [0, 255] -> dtype [-1, 1] (Keras's `preprocess_input(mode="tf")`)."""
    return images.astype(dtype) * (2.0 / 255.0) - 1.0


class TwoTower(nn.Module):
    """`towers` InceptionV3s with separate weights (named ``tower_0``, ``tower_1``, ...) and a dense head.

    `frozen_below` is the Keras layer index boundary of partial fine-tuning: BatchNorm layers below it
    keep their stored statistics even when ``train=True`` (the optimiser skips their parameters too;
    see `wsitile.training.params.trainable_paths`).
    """

    towers: int = 2
    width: float = 1.0
    dtype: Any = jnp.float32
    frozen_below: int = 0

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if images.ndim != 5 or images.shape[1] != self.towers:
            raise ValueError(f"images: expected (N, {self.towers}, H, W, 3), got {images.shape}")
        x = scale_to_inception(images, self.dtype) if images.dtype == jnp.uint8 else images.astype(self.dtype)
        features = [
            InceptionV3(width=self.width, dtype=self.dtype, frozen_below=self.frozen_below, name=f"tower_{t}")(
                x[:, t], train=train
            )
            for t in range(self.towers)
        ]
        logit = nn.Dense(1, dtype=self.dtype, name="head")(jnp.concatenate(features, axis=-1))
        return logit[:, 0].astype(jnp.float32)
