"""Chest radiograph phantoms: films with the findings drawn, reports that name them, a reader that recovers them."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from healthgpt.data.phantoms import degrade, make_dataset
from healthgpt.data.phantoms.chest import CTR_LIMIT, EFFUSIONS, chest_report, read_chest, sample_chest
from healthgpt.data.phantoms.dataset import CHEST_TASK

CASES = {size: [sample_chest(np.random.default_rng([5, size, i]), size) for i in range(150)] for size in (64, 128)}


@pytest.mark.parametrize("size", [64, 128])
def test_the_reader_recovers_every_drawn_finding(size):
    cases = CASES[size]
    assert {c.effusion for c in cases} == set(EFFUSIONS) and {c.cardiomegaly for c in cases} == {True, False}
    readings = [read_chest(case.render()) for case in cases]
    assert all(r.matches(c) for r, c in zip(readings, cases, strict=True))
    assert max(abs(r.ctr - c.ctr) for r, c in zip(readings, cases, strict=True)) < 0.04  # a pixel or two at 64


def test_blurred_films_still_read_right():
    """The super-resolution degradation (4x down, bicubic up) keeps the findings a VQGAN must keep."""
    assert all(read_chest(degrade(c.render())).matches(c) for c in CASES[64])


def test_effusions_show_on_the_opposite_side_of_the_picture():
    """The patient's left is on the image's right: its base is brighter there than on the image's left."""
    case = dataclasses.replace(CASES[128][0], effusion="left")
    film = case.render().astype(float)
    base = film[round(0.71 * 128) : round(0.74 * 128)]
    image_left, image_right = base[:, 64 - 33 : 64 - 24].mean(), base[:, 64 + 24 : 64 + 33].mean()
    assert image_right - image_left > 40
    assert read_chest(film).effusion == "left"
    assert read_chest(dataclasses.replace(case, effusion="right").render()).effusion == "right"


def test_a_film_read_against_other_findings_does_not_match():
    normal = dataclasses.replace(CASES[64][0], ctr=0.42, effusion="none")
    reading = read_chest(normal.render())
    assert reading.matches(normal) and reading.ctr < CTR_LIMIT
    assert not reading.matches(dataclasses.replace(normal, ctr=0.62))
    assert not reading.matches(dataclasses.replace(normal, effusion="right"))


def test_reports_name_the_findings():
    rng = np.random.default_rng(0)
    for case in CASES[64]:
        text = chest_report(case, rng)
        assert (("Cardiomegaly" in text) or ("enlarged" in text)) == case.cardiomegaly
        assert ("effusion" in text) == (case.effusion != "none")
        if case.effusion != "none":
            assert f"{case.effusion} pleural effusion" in text
        if not case.cardiomegaly and case.effusion == "none":
            assert "normal" in text or "No acute" in text


def test_a_size_out_of_range_is_refused():
    with pytest.raises(ValueError, match="size must be an int in 32..512"):
        sample_chest(np.random.default_rng(0), 16)


def test_the_dataset_adds_chest_films_on_request_and_changes_nothing_else(tmp_path):
    tasks = ("presence", "ct2mri")
    plain = make_dataset(tmp_path / "plain", 6, seed=2, tasks=tasks, test_fraction=0.5)
    chest = make_dataset(tmp_path / "chest", 6, seed=2, tasks=(*tasks, CHEST_TASK), test_fraction=0.5)
    for split in ("train", "test"):
        extra = [r for r in chest[split] if r not in plain[split]]
        assert [r for r in chest[split] if r["meta"]["kind"] != CHEST_TASK] == plain[split]
        assert len(extra) == 3 and all(r["meta"]["kind"] == CHEST_TASK and "image" not in r for r in extra)
        for record in extra:  # the film on disk shows what its report says
            film = np.asarray(Image.open(tmp_path / "chest" / record["target_image"]))
            reading = read_chest(film)
            assert reading.effusion == record["meta"]["effusion"]
            assert reading.cardiomegaly == (record["meta"]["ctr"] > CTR_LIMIT)
            report = record["conversations"][0]["value"]
            assert ("effusion" in report) == (record["meta"]["effusion"] != "none")
    other_seed = make_dataset(tmp_path / "seed3", 6, seed=3, tasks=(CHEST_TASK,), test_fraction=0.5)
    ctrs = [r["meta"]["ctr"] for r in chest["train"] if r["meta"]["kind"] == CHEST_TASK]
    assert [r["meta"]["ctr"] for r in other_seed["train"]] != ctrs  # each seed its own films
