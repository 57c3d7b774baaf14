"""Synthetic localized-degradation pairs (armature.data.synthetic): every pair differs from its
source only inside its mask, exactly, after the round trip through PNG bytes."""

import numpy as np
import pytest

from armature.data.pairs import check_record, decode_image
from armature.data.synthetic import (
    DEGRADATIONS,
    box_mask,
    degrade,
    keypoint_box,
    make_pair,
    procedural_sources,
    region_mask,
)


@pytest.fixture(scope="module")
def sources():
    return procedural_sources(6, size=32, seed=3)


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_pairs_differ_from_the_source_only_inside_the_mask(sources, kind):
    for i, source in enumerate(sources):
        pair = make_pair(source, np.random.default_rng(i), kinds=[kind])
        assert pair is not None and pair["source"] == f"synthetic:{kind}" and pair["label"] == "w"
        w, l = decode_image(pair["image_w"]), decode_image(pair["image_l"])
        mask = decode_image(pair["mask"], "L") > 0
        np.testing.assert_array_equal(w, source["image"])  # the preferred image is the source
        changed = (w != l).any(-1)
        assert not (changed & ~mask).any(), f"{kind}: {int((changed & ~mask).sum())} pixels changed outside"
        assert changed.any(), f"{kind} left the region unchanged"
        assert check_record(pair)[0] is None


def test_degradations_on_a_given_mask_of_any_shape():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:40, :48]
    mask = (yy - 20) ** 2 + (xx - 30) ** 2 < 49  # a disc, not a box
    for kind in DEGRADATIONS:
        out = degrade(image, mask, kind, np.random.default_rng(1))
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out[~mask], image[~mask])
        assert (out[mask] != image[mask]).any(), kind
    with pytest.raises(ValueError, match="empty"):
        degrade(image, np.zeros((40, 48), bool), "mirror", rng)
    with pytest.raises(ValueError, match="degradation"):
        degrade(image, mask, "melt", rng)


def test_regions_from_a_mask_a_box_keypoints_or_at_random():
    rng = np.random.default_rng(0)
    shape = (32, 32)
    box = box_mask(shape, (4, 6, 10, 9))
    assert box.sum() == 6 * 3 and box[6, 4] and box[8, 9] and not box[9, 4]
    assert box_mask(shape, (-5, -5, 3, 2)).sum() == 3 * 2  # clipped to the image
    # keypoints (x, y[, confidence]): the padded box around the confident ones
    points = [[10, 12, 0.9], [14, 20, 0.8], [30, 30, 0.1]]
    assert keypoint_box(points, shape, pad=2, min_confidence=0.5) == (8, 10, 17, 23)
    with pytest.raises(ValueError, match="confidence"):
        keypoint_box(points, shape, min_confidence=0.95)
    from_points = region_mask({"keypoints": points[:2]}, shape, rng, pad=2)
    np.testing.assert_array_equal(from_points, box_mask(shape, (8, 10, 17, 23)))
    given = np.zeros(shape, bool)
    given[3, 3] = True
    np.testing.assert_array_equal(region_mask({"mask": given, "box": (0, 0, 9, 9)}, shape, rng), given)
    np.testing.assert_array_equal(region_mask({"box": (0, 0, 9, 9)}, shape, rng), box_mask(shape, (0, 0, 9, 9)))
    random = region_mask({}, shape, rng)
    assert random.sum() == 8 * 8


def test_make_pair_is_deterministic_and_reports_unchangeable_regions(sources):
    a = make_pair(sources[0], np.random.default_rng(5))
    b = make_pair(sources[0], np.random.default_rng(5))
    assert a == b
    flat = {"id": "flat", "prompt": "", "image": np.full((16, 16, 3), 7, np.uint8), "box": (2, 2, 8, 8)}
    assert make_pair(flat, np.random.default_rng(0)) is None  # nothing to break in a flat patch
