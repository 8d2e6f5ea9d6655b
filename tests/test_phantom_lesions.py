"""The lesion measure of generated phantoms: recall of true lesions, false lesions at decoy spots."""

import dataclasses

import numpy as np
import pytest

from healthgpt.data.phantoms import Lesion, check_lesions, degrade, lesion_contrast, lesion_rates, sample_case
from healthgpt.data.phantoms.lesions import decoys

CASES = [sample_case(np.random.default_rng([7, i]), 64, p_lesion=1.0) for i in range(40)]


def test_contrast_is_disc_mean_minus_ring_mean():
    image = np.full((32, 32), 100.0)
    rows, cols = np.indices(image.shape)
    distance = np.hypot(rows - 16, cols - 12)
    image[distance <= 3] = 180.0
    image[(distance > 4) & (distance <= 6)] = 60.0  # the ring, 1..3 pixels outside the edge
    assert lesion_contrast(image, Lesion(12.0, 16.0, 3.0, 1.0, "left")) == pytest.approx(120.0)
    other = Lesion(12.0, 21.0, 1.0, 1.0, "left")  # its surround is cut out of the ring
    ring = (distance > 4) & (distance <= 6) & (np.hypot(rows - 21, cols - 12) > 2.0)
    image[21, 12] = 0.0
    expected = image[distance <= 3].mean() - image[ring].mean()
    assert lesion_contrast(image, Lesion(12.0, 16.0, 3.0, 1.0, "left"), [other]) == pytest.approx(expected)


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_the_truth_keeps_every_lesion_and_invents_almost_none(modality):
    key = "ct" if modality == "CT" else "mri"
    rates = lesion_rates([check_lesions(case.image(key), case, modality) for case in CASES])
    assert rates == {"lesion_recall": 1.0, "false_lesions": 0.0}


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_images_without_lesions_or_of_the_other_modality_recall_few(modality):
    other = "mri" if modality == "CT" else "ct"
    bare = lesion_rates([check_lesions(c.render(modality, lesions=False), c, modality) for c in CASES])
    swapped = lesion_rates([check_lesions(c.image(other), c, modality) for c in CASES])
    assert bare["lesion_recall"] <= 0.1 and swapped["lesion_recall"] <= 0.1


def test_lesions_drawn_at_the_decoys_count_as_false():
    case = CASES[0]
    spots = decoys(case)
    assert spots == decoys(case) and len(spots) == 3
    for spot in spots:  # clear of the true lesions
        assert all(np.hypot(spot.x - le.x, spot.y - le.y) > spot.radius + le.radius for le in case.lesions)
    faked = dataclasses.replace(case, lesions=case.lesions + spots).render("MRI")
    check = check_lesions(faked, case, "MRI")
    assert all(check.recalled) and all(check.false)


def test_blurring_loses_some_lesions():
    """Bicubic upsampling of a 4x smaller image (the super-resolution input) keeps most, not all."""
    rates = lesion_rates([check_lesions(degrade(case.mri), case, "MRI") for case in CASES])
    assert 0.6 <= rates["lesion_recall"] < 1.0


def test_an_image_of_another_size_is_refused():
    with pytest.raises(ValueError, match="image is 32x32 but the case is 64x64: resize it first"):
        check_lesions(np.zeros((32, 32), np.uint8), CASES[0], "CT")


def test_nothing_to_count_is_nan():
    assert all(np.isnan(v) for v in lesion_rates([]).values())
