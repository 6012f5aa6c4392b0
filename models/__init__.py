"""wsitile.models: the JAX/Flax InceptionV3 and the Keras ImageNet-weight import (issue 4).

Needs the `wsitile[train]` extra (jax, flax, h5py); `import wsitile` never imports this package.
"""

from .inception_v3 import (
    KERAS_FREEZE_BOUNDARY,
    KERAS_LAYER_COUNT,
    InceptionV3,
    init_variables,
    keras_kernel_shapes,
    keras_layer_index,
    keras_weighted_layers,
    scaled_filters,
    trainable_mask,
)
from .keras_weights import inception_v3_features, load_keras_h5
from .two_tower import TwoTower, scale_to_inception

__all__ = [
    "KERAS_FREEZE_BOUNDARY",
    "KERAS_LAYER_COUNT",
    "InceptionV3",
    "TwoTower",
    "inception_v3_features",
    "init_variables",
    "keras_kernel_shapes",
    "keras_layer_index",
    "keras_weighted_layers",
    "load_keras_h5",
    "scale_to_inception",
    "scaled_filters",
    "trainable_mask",
]
