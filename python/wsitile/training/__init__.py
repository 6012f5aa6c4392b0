"""The parts of training that `wsitile.train` (the fit loop and the public API) builds on.

config: TrainConfig and the model it defines; params: flat parameter dicts, initialisation and the
trainable split; steps: optimiser, TrainState and the jitted steps over a device mesh; checkpoints:
orbax save/find/restore; slide_sets: slides split by slide and shared between processes.

Import them through `wsitile.train`; needs the `wsitile[train]` extra.
"""
