"""Bounded memory (RELIABILITY.md): resident memory stays flat while a loader hands out augmented
pairs epoch after epoch, and the caches it holds are sized explicitly."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import wsitile

PAIRS = 200_000
WARMUP = 20_000
# Allowed growth after warm-up. What may legitimately still move then: batches in flight (3 of
# 256 x 2 x 80 x 80 x 3 bytes = 9.8 MB each) and malloc's arenas keeping freed batches around.
# Caches are full by then (the block cache holds the epoch's whole working set after the first
# epoch; OpenSlide's tile cache is capped at 16 MB here). A leak of 250 bytes per pair, or of one
# batch buffer every 40 batches, exceeds it over the 180,000 pairs after warm-up.
MAX_GROWTH_MB = 50


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_rss_flat_over_200k_augmented_pairs(tumour_slide):
    loader = wsitile.Loader(
        [(tumour_slide["slide"], None)],
        levels=(2, 3),
        window=80,
        stride=40,
        batch_size=256,
        threads=2,
        augment=True,
        shuffle=True,
        cache_mb=64,
        tile_cache_mb=16,
    )
    assert loader.num_samples > 1000  # several epochs, each a new order and new augmentations
    pairs, epochs, base, samples = 0, 0, None, []
    checksum = 0
    while pairs < PAIRS:
        for batch in loader:
            n = len(batch["labels"])
            assert batch["images"].shape == (n, 2, 80, 80, 3)
            checksum += int(batch["images"][:, :, 40, 40].sum())  # touch the pixels
            pairs += n
            if base is None and pairs >= WARMUP:
                gc.collect()
                base = rss_mb()
            elif base is not None and len(samples) < pairs // 5000:
                samples.append(rss_mb())
            if pairs >= PAIRS:
                break
        epochs += 1
    assert loader._core.cache_bytes_used <= 64 << 20  # the block cache stays within its size
    loader.close()
    assert checksum > 0 and epochs >= 3
    growth = max(samples) - base
    print(f"RSS after warm-up {base:.1f} MB; after {pairs} pairs in {epochs} epochs at most {max(samples):.1f} MB")
    assert growth < MAX_GROWTH_MB, f"RSS {base:.0f} MB after warm-up, then up to {max(samples):.0f} MB: {np.round(samples)}"


def test_caches_are_bounded_and_configurable(tumour_slide):
    """cache_mb bounds the block cache (checked after an epoch of random access that does not fit);
    tile_cache_mb sizes OpenSlide's tile cache (0 is allowed: no tile caching)."""
    slide = tumour_slide["slide"]
    with wsitile.Loader([(slide, None)], levels=(1, 2), window=64, stride=32, batch_size=512, threads=2,
                        shuffle=False, cache_mb=2, tile_cache_mb=0) as loader:
        for _ in loader:
            assert loader._core.cache_bytes_used <= 2 << 20
        assert loader._core.cache_bytes_used > 0
    with wsitile.Loader([(slide, None)], tile_cache_mb=1, cache_mb=0, threads=1) as loader:
        assert sum(len(b["labels"]) for b in loader) == loader.num_samples
    with pytest.raises(ValueError, match="tile_cache_mb"):
        wsitile.Loader([(slide, None)], tile_cache_mb=-1)
