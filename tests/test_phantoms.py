"""The phantom world: determinism, labels that agree with pixels, CT/MRI/low-res differences, files."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from healthgpt.data import phantoms as P
from healthgpt.data.phantoms.dataset import FINDINGS_TASK


def _cases(seed: int, n: int, **kwargs) -> list[P.PhantomCase]:
    rng = np.random.default_rng(seed)
    return [P.sample_case(rng, **kwargs) for _ in range(n)]


def test_same_seed_gives_identical_cases_and_images_different_seed_differs() -> None:
    a, b = _cases(7, 3), _cases(7, 3)
    assert a == b
    for case_a, case_b in zip(a, b, strict=True):
        for key in P.IMAGE_KEYS:
            np.testing.assert_array_equal(case_a.image(key), case_b.image(key))
    other = _cases(8, 3)
    assert all(not np.array_equal(x.ct, y.ct) for x, y in zip(a, other, strict=True))
    # the small per-case pose/contrast variation makes lesion-free cases of one seed differ from each other
    clean = _cases(0, 2, p_lesion=0.0)
    assert not np.array_equal(clean[0].mri, clean[1].mri)


@pytest.mark.parametrize("size", [32, 64, 97])
def test_labels_agree_with_pixels(size: int) -> None:
    midline = (size - 1) / 2
    for case in _cases(1, 25, size=size, p_lesion=1.0):
        assert case.has_lesion and case.count == len(case.lesions) and 1 <= case.count <= 3
        sides = {lesion.side for lesion in case.lesions}
        assert case.side == ("both" if len(sides) == 2 else sides.pop())
        rows, cols = np.indices((size, size))
        for modality, sign in (("CT", -1), ("MRI", 1)):  # lesions are dark-ish on CT, bright on MRI
            diff = case.render(modality).astype(int) - case.render(modality, lesions=False).astype(int)
            changed, n_blobs = ndimage.label(np.abs(diff) > 12)
            assert n_blobs == case.count
            for lesion in case.lesions:
                assert lesion.side == ("left" if lesion.x < midline else "right")
                assert abs(lesion.x - midline) >= lesion.radius  # the disc stays on its side
                dist = np.hypot(rows - lesion.y, cols - lesion.x)
                assert sign * diff[dist <= max(lesion.radius - 1, 0.5)].mean() > 20
                blob = changed[int(lesion.y), int(lesion.x)]
                assert blob > 0 and (cols[changed == blob].mean() < midline) == (lesion.side == "left")
            outside = np.min([np.hypot(rows - les.y, cols - les.x) - les.radius for les in case.lesions], axis=0)
            assert np.all(diff[outside > 1] == 0)


def test_lesion_free_cases() -> None:
    for case in _cases(2, 5, p_lesion=0.0):
        assert (case.has_lesion, case.count, case.side) == (False, 0, "none")
        np.testing.assert_array_equal(case.ct, case.render("CT", lesions=False))


def test_ct_and_mri_are_not_affine_related_and_swap_tissue_order() -> None:
    for case in _cases(3, 5):
        ct, mri = case.ct.astype(float).ravel(), case.mri.astype(float).ravel()
        assert abs(np.corrcoef(ct, mri)[0, 1]) < 0.95
        fit = np.polyval(np.polyfit(ct, mri, 1), ct)
        assert 1 - np.var(mri - fit) / np.var(mri) < 0.9
        head = ct > 20
        bone = ct > 190  # brightest on CT ...
        assert bone.sum() > 20 and mri[bone].mean() < mri[head].mean() - 30  # ... dark on MRI
        fluid = (mri > 170) & head  # brightest on MRI (CSF) ...
        assert fluid.sum() > 20 and ct[fluid].mean() < ct[head].mean() - 20  # ... dark on CT


def _high_frequency_energy(image: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image.astype(float) - image.mean()))) ** 2
    size = image.shape[0]
    freq = np.hypot(*np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2))
    return float(spectrum[freq > size / (2 * P.LOW_RES_FACTOR)].sum())


def test_low_res_copy_loses_high_frequencies() -> None:
    for case in _cases(4, 3):
        for key in ("ct", "mri"):
            high, low = case.image(key), case.image(f"{key}_low_res")
            assert low.shape == high.shape and low.dtype == np.uint8
            assert _high_frequency_energy(low) < 0.3 * _high_frequency_energy(high)
            assert np.abs(low.astype(int) - high.astype(int)).mean() < 15  # same content, blurred


@pytest.mark.parametrize("size", [32, 150, 512])
def test_sizes_and_rgb(size: int) -> None:
    (case,) = _cases(5, 1, size=size, p_lesion=1.0)
    for key in P.IMAGE_KEYS:
        assert case.image(key).shape == (size, size) and case.image(key).dtype == np.uint8
    rgb = case.rgb("mri")
    assert rgb.mode == "RGB" and rgb.size == (size, size)
    np.testing.assert_array_equal(np.asarray(rgb)[..., 1], case.mri)


def test_invalid_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    for kwargs in ({"size": 31}, {"size": 513}, {"max_lesions": 4}, {"p_lesion": 1.5}):
        with pytest.raises(ValueError):
            P.sample_case(rng, **kwargs)
    (case,) = _cases(0, 1)
    with pytest.raises(ValueError, match="modality"):
        case.render("PET")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown task"):
        list(P.iter_records(1, 0, tasks=("segmentation",)))


def test_vqa_answers_match_labels_and_phrasings_vary() -> None:
    rng = np.random.default_rng(6)
    questions = set()
    for case in _cases(6, 40):
        for modality in P.MODALITIES:
            pairs = {qa.kind: qa for qa in P.vqa_pairs(case, rng, modality)}
            assert set(pairs) == ({"presence", "side", "count"} if case.has_lesion else {"presence", "count"})
            assert pairs["presence"].answer == ("yes" if case.has_lesion else "no")
            assert pairs["count"].answer == ("zero", "one", "two", "three")[case.count]
            if case.has_lesion:
                assert pairs["side"].answer == case.side in {"left", "right", "both"}
            assert all(modality in qa.question for qa in pairs.values())
            questions |= {qa.question for qa in pairs.values()}
    assert "Is there a lesion in this CT image?" in questions
    assert len(questions) >= 15


def test_generation_pairs_use_paper_phrasings() -> None:
    rng = np.random.default_rng(9)
    seen: dict[str, set[str]] = {}
    for case in _cases(9, 30):
        pairs = {pair.kind: pair for pair in P.generation_pairs(case, rng)}
        assert set(pairs) == set(P.GENERATION_TASKS)
        assert (pairs["ct2mri"].source, pairs["ct2mri"].target) == ("ct", "mri")
        assert (pairs["mri2ct"].source, pairs["mri2ct"].target) == ("mri", "ct")
        assert pairs["reconstruct"].source == pairs["reconstruct"].target
        assert pairs["super_resolution"].source == f"{pairs['super_resolution'].target}_low_res"
        assert pairs["report2image"].source is None and P.report(case) in pairs["report2image"].instruction
        assert pairs["ct2mri"].reply == "The image has been transformed into MRI."
        assert pairs["mri2ct"].reply == "Here is the CT version of the MRI image."
        for kind, pair in pairs.items():
            seen.setdefault(kind, set()).add(pair.instruction)
    assert "I need a version of this CT representation in MRI." in seen["ct2mri"]
    assert "Transform the MRI display into a CT image." in seen["mri2ct"]
    assert "Reconstruct the image." in seen["reconstruct"]
    assert {
        "Could you improve the quality of this MRI image?",
        "Could you improve the quality of this CT image?",
    } & (seen["super_resolution"])


def test_caption_report_and_corpus() -> None:
    for case in _cases(10, 30):
        text = P.caption(case, "MRI")
        assert text.startswith("MRI image with ")
        assert ("no lesion" in text) == (not case.has_lesion)
        if case.has_lesion:
            assert f" {('one', 'two', 'three')[case.count - 1]} lesion" in text
            assert ("both sides" in text) == (case.side == "both")
            assert P.report(case).count(" mm lesion is seen on the ") == case.count
        else:
            assert P.report(case) == "No lesion is seen."
    corpus = P.phantom_corpus(np.random.default_rng(0), 300)
    assert len(corpus) == 300 and corpus == P.phantom_corpus(np.random.default_rng(0), 300)
    assert any(s.startswith("A ") and " mm lesion is seen" in s for s in corpus)
    assert any("?" in s and s.endswith((" yes", " no")) for s in corpus)
    assert corpus != P.phantom_corpus(np.random.default_rng(1), 300)


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_dataset_files_records_and_reproducibility(tmp_path) -> None:
    records = P.make_dataset(tmp_path / "a", n_cases=5, seed=3, size=48, test_fraction=0.4)
    files = _files(tmp_path / "a")
    assert not [name for name in files if name.endswith(".tmp")]
    for split, n_cases in (("train", 3), ("test", 2)):
        on_disk = json.loads(files[f"{split}.json"])
        assert on_disk == records[split] == [rec for rec, _ in P.iter_records(n_cases, 3, 48, split=split)]
        assert {rec["meta"]["case"] for rec in on_disk} == {f"{split}_{i:06d}" for i in range(n_cases)}
        for rec in on_disk:
            human, gpt = rec["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt") and gpt["value"]
            assert human["value"].count("<image>") == ("image" in rec)
            assert ("target_image" in rec) == (rec["task"] == "generation")
            for field in ("image", "target_image"):
                if field in rec:
                    with Image.open(tmp_path / "a" / rec[field]) as im:
                        assert im.size == (48, 48)
    texts = [rec for rec in records["train"] if "image" not in rec]
    assert texts and all(rec["meta"]["kind"] == "report2image" for rec in texts)
    P.make_dataset(tmp_path / "b", n_cases=5, seed=3, size=48, test_fraction=0.4)
    assert _files(tmp_path / "b") == files
    P.make_dataset(tmp_path / "c", n_cases=5, seed=4, size=48, test_fraction=0.4)
    assert _files(tmp_path / "c")["train.json"] != files["train.json"]


def test_in_memory_images_match_written_pngs(tmp_path) -> None:
    P.make_dataset(tmp_path, n_cases=2, seed=11, size=32, test_fraction=0.0)
    for record, images in P.iter_records(2, 11, 32):
        assert set(images) == {record[f] for f in ("image", "target_image") if f in record}
        for rel_path, pixels in images.items():
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / rel_path)), pixels)


def test_closed_answers_are_balanced(tmp_path) -> None:
    records = P.make_dataset(tmp_path, n_cases=200, seed=0, size=32, tasks=("presence",), test_fraction=0.5)
    answers = [rec["conversations"][1]["value"] for split in P.SPLITS for rec in records[split]]
    assert len(answers) == 200 * len(P.MODALITIES) and set(answers) == {"yes", "no"}
    assert 0.35 <= answers.count("yes") / len(answers) <= 0.65


def test_findings_records_on_request_report_each_render_and_change_nothing_else(tmp_path) -> None:
    tasks = ("presence", "side", "reconstruct")
    plain = P.make_dataset(tmp_path / "plain", n_cases=12, seed=5, size=32, tasks=tasks, test_fraction=0.5)
    both = P.make_dataset(
        tmp_path / "both", n_cases=12, seed=5, size=32, tasks=(*tasks, FINDINGS_TASK), test_fraction=0.5
    )
    assert (
        _files(tmp_path / "both")["images/train_000000_ct.png"]
        == _files(tmp_path / "plain")["images/train_000000_ct.png"]
    )
    questions = set()
    for split in P.SPLITS:
        assert [r for r in both[split] if r["meta"]["kind"] != FINDINGS_TASK] == plain[split]
        found = [r for r in both[split] if r["meta"]["kind"] == FINDINGS_TASK]
        assert len(found) == 6 * len(P.MODALITIES)  # one per render of each case
        for record in found:
            question, answer = (turn["value"] for turn in record["conversations"])
            meta = record["meta"]
            assert record["task"] == "comprehension" and question.startswith("<image>\n")
            assert meta["modality"] in question and record["image"].endswith(f"_{meta['modality'].lower()}.png")
            # the report: "No lesion is seen." or one sentence per lesion with its side, left to right
            sides = [s.split(" side")[0].rsplit(" ", 1)[-1] for s in answer.split(". ") if " side" in s]
            assert sides == [lesion["side"] for lesion in sorted(meta["lesions"], key=lambda lesion: lesion["x"])]
            assert len(sides) == meta["count"] and (answer == "No lesion is seen.") == (not meta["has_lesion"])
            questions.add(question)
    assert len(questions) > 2  # phrasings and modalities vary
