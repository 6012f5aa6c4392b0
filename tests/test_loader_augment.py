"""Augmentation fused into the loader equals augment_batch on the plain windows with the drawn params."""

from __future__ import annotations

import numpy as np
import pytest

import wsitile
from wsitile.augment import AugmentConfig, augment_batch, draw_params


def epoch_batches(loader):
    return [{k: v.copy() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("out_dtype", ["uint8", "float32", "inception"])
@pytest.mark.parametrize("balanced", [False, True])
def test_fused_augmentation_matches_augment_batch(tumour_slide, out_dtype, balanced):
    spec = [(tumour_slide["slide"], tumour_slide["mask"])]
    config = AugmentConfig(brightness=0.3, hue=0.2)
    kwargs = dict(seed=9, batch_size=48, threads=2, balanced=balanced)
    augmented = wsitile.Loader(spec, augment=config, out_dtype=out_dtype, **kwargs)
    plain = wsitile.Loader(spec, **kwargs)
    for epoch in range(2):
        got, ref = epoch_batches(augmented), epoch_batches(plain)
        assert len(got) == len(ref) > 0
        position = 0
        for a, p in zip(got, ref):
            np.testing.assert_array_equal(a["sample_index"], p["sample_index"])
            n = len(a["labels"])
            params = draw_params(config, 9, epoch, np.arange(position, position + n))
            expected = augment_batch(p["images"], out_dtype=out_dtype, **params)  # both towers share params
            assert a["images"].dtype == expected.dtype and a["images"].shape == p["images"].shape
            np.testing.assert_array_equal(a["images"], expected)
            position += n
        assert position == augmented.num_samples


def test_augmented_batches_do_not_depend_on_threads(tumour_slide):
    spec = [(tumour_slide["slide"], None)]
    runs = [epoch_batches(wsitile.Loader(spec, augment=True, seed=3, batch_size=40, threads=t)) for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a["images"], b["images"])


def test_augmentation_changes_pixels_and_identity_config_does_not(tumour_slide):
    spec = [(tumour_slide["slide"], None)]
    plain = next(iter(wsitile.Loader(spec, seed=1, batch_size=16)))["images"]
    jittered = next(iter(wsitile.Loader(spec, seed=1, batch_size=16, augment=True)))["images"]
    assert (plain != jittered).mean() > 0.5
    identity = AugmentConfig(orientation=False, colour=False)
    same = next(iter(wsitile.Loader(spec, seed=1, batch_size=16, augment=identity)))["images"]
    np.testing.assert_array_equal(same, plain)
    as_float = next(iter(wsitile.Loader(spec, seed=1, batch_size=16, out_dtype="float32")))["images"]
    np.testing.assert_allclose(as_float, plain / np.float32(255), atol=1e-7)


def test_bad_augment_arguments(tumour_slide):
    spec = [(tumour_slide["slide"], None)]
    with pytest.raises(ValueError, match="out_dtype"):
        wsitile.Loader(spec, out_dtype="float16")
    with pytest.raises(TypeError, match="augment"):
        wsitile.Loader(spec, augment="yes")
