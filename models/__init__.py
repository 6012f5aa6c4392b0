"""wsitile.models: the JAX/Flax two-tower InceptionV3 (issue 4); needs the `wsitile[train]` extra."""
