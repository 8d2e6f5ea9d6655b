"""The training, evaluation and scoring commands through the real entry point (subprocesses on the nano model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt.config import get_variant
from healthgpt.data.phantoms import make_dataset
from healthgpt.evaluation import PROMPT_SETS
from healthgpt.metrics import image_metrics
from healthgpt.vqgan import VQGAN

SCRIPT = shutil.which("healthgpt")
ENTRY = [SCRIPT] if SCRIPT else [sys.executable, "-m", "healthgpt.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str | Path, cwd: Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*ENTRY, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)
    assert out.returncode == code, out.stderr
    return out


def _slake(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A SLAKE-format folder (English items of test.json, images under imgs/)."""
    (root / "imgs" / "xmlab1").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "imgs" / "xmlab1" / "source.jpg")
    records = [
        {
            "img_name": "xmlab1/source.jpg",
            "question": q,
            "answer": a,
            "q_lang": "en",
            "answer_type": kind,
            "modality": "CT",
            "content_type": "Abnormality",
            "qid": i,
        }
        for i, (q, a, kind) in enumerate(rows)
    ]
    (root / "test.json").write_text(json.dumps(records))
    return root


def test_eval_runs_resumes_and_compares(tmp_path: Path) -> None:
    data = _slake(tmp_path / "slake", [("Is there a lesion?", "yes", "CLOSED"), ("Which organ?", "liver", "OPEN")])
    args = ["eval", "--data", f"slake={data}", "--out", tmp_path / "run", "--max-new-tokens", "4", "--no-progress"]
    first = run(*args, cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "slake" in first.stdout
    run(*args, cwd=tmp_path)  # resumed: nothing answered twice, same metrics
    assert (tmp_path / "run" / "predictions.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    table = run("compare", tmp_path / "run", tmp_path / "run", "--label", "a", "--label", "b", cwd=tmp_path).stdout
    assert "| a |" in table and "| b |" in table
    bad = run("eval", "--data", f"vqa-med={data}", "--out", tmp_path / "x", cwd=tmp_path, code=2)
    assert bad.stderr.startswith("error: unknown benchmark 'vqa-med'")


def test_score_images_agrees_with_the_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "out").mkdir()
    (tmp_path / "ref").mkdir()
    target = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    output = np.clip(target.astype(int) + rng.integers(-20, 20, target.shape), 0, 255).astype(np.uint8)
    Image.fromarray(target).save(tmp_path / "ref" / "a.png")
    Image.fromarray(output).save(tmp_path / "out" / "a.png")
    scores = json.loads(run("score-images", tmp_path / "out", tmp_path / "ref", cwd=tmp_path).stdout)
    expected = image_metrics(output, target)
    assert scores["n"] == 1
    for key in ("ssim", "psnr", "mse"):
        assert scores[key] == pytest.approx(expected[key], rel=1e-6)
    Image.fromarray(output).save(tmp_path / "generated.png")  # two files of different names pair too
    pair = json.loads(run("score-images", tmp_path / "generated.png", tmp_path / "ref" / "a.png", cwd=tmp_path).stdout)
    assert pair["n"] == 1 and all(pair[k] == pytest.approx(expected[k], rel=1e-6) for k in ("ssim", "psnr", "mse"))


@pytest.mark.slow
def test_train_vqgan_then_tokenize_then_one_training_stage(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", 4, seed=3, size=64, test_fraction=0.0)
    run(
        "train-vqgan",
        tmp_path / "data" / "images",
        "--out",
        tmp_path / "vqgan",
        "--steps",
        "3",
        "--batch-size",
        "2",
        cwd=tmp_path,
    )
    vqgan = VQGAN.load(tmp_path / "vqgan")
    assert vqgan.grid == get_variant("nano").vq.grid
    out = run(
        "tokenize-images",
        tmp_path / "data" / "train.json",
        "--vqgan",
        tmp_path / "vqgan",
        "--cache",
        tmp_path / "codes",
        cwd=tmp_path,
    ).stdout
    assert "already cached 0" in out
    again = run(
        "tokenize-images",
        tmp_path / "data" / "train.json",
        "--vqgan",
        tmp_path / "vqgan",
        "--cache",
        tmp_path / "codes",
        cwd=tmp_path,
    ).stdout
    assert again.startswith("encoded 0")
    stage = "stage3_generation"
    trained = run(
        "train",
        "--stage",
        stage,
        f"output_dir={tmp_path / 'runs'}",
        f"data.code_cache={tmp_path / 'codes'}",
        f"{stage}.data=[{tmp_path / 'data' / 'train.json'}]",
        f"{stage}.init_from=[]",
        f"{stage}.global_batch_size=2",
        f"{stage}.max_steps=2",
        cwd=tmp_path,
    ).stdout
    assert trained.startswith(f"{stage}: 2 steps")
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))


def test_serve_command_answers_health_and_requires_its_key(tmp_path: Path) -> None:
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [*ENTRY, "serve", "--port", str(port), "--api-key", "k3y"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        assert health.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k3y"}, timeout=5)
        assert models.status_code == 200 and models.json()["data"][0]["id"].startswith("healthgpt")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _phantom_benchmarks(root: Path) -> Path:
    """The five benchmarks' public on-disk layouts filled with held-out phantom CTs: closed presence questions
    (VQA-RAD OSF json, PathVQA jsonl), open count questions (SLAKE), and the same presence question as multiple
    choice (OmniMedVQA, MMMU Clinical_Medicine json)."""
    from healthgpt.data.phantoms import COUNT_WORDS, sample_case

    rng = np.random.default_rng(20261125)  # phantoms no part of the nano recipe saw
    rad, slake, path, omni, mmmu = (root / n for n in ("vqa-rad", "slake", "pathvqa", "omnimedvqa", "mmmu"))
    for folder in (
        rad / "VQA_RAD Image Folder",
        slake / "imgs",
        path / "images",
        omni / "Images" / "Phantom",
        omni / "QA_information" / "Open-access",
        mmmu / "Clinical_Medicine" / "img",
    ):
        folder.mkdir(parents=True)
    rows: dict[str, list] = {k: [] for k in ("rad", "slake", "path", "omni", "mmmu")}
    question = "Is there a lesion in this CT image?"
    for i in range(8):
        case = sample_case(rng, size=64)
        yes_no = "yes" if case.has_lesion else "no"
        for image in (
            rad / "VQA_RAD Image Folder" / f"synpic{i}.png",
            slake / "imgs" / f"{i}.png",
            path / "images" / f"{i}.png",
            omni / "Images" / "Phantom" / f"{i}.png",
            mmmu / "Clinical_Medicine" / "img" / f"{i}.png",
        ):
            case.rgb("ct").save(image)
        rows["rad"].append(
            {
                "qid": i,
                "image_name": f"synpic{i}.png",
                "question": question,
                "answer": yes_no,
                "answer_type": "CLOSED",
                "question_type": "PRES",
                "phrase_type": "test_freeform",
            }
        )
        rows["slake"].append(
            {
                "qid": i,
                "img_name": f"{i}.png",
                "question": "How many lesions are there?",
                "answer": COUNT_WORDS[case.count],
                "q_lang": "en",
                "answer_type": "OPEN",
                "modality": "CT",
                "content_type": "Quantity",
            }
        )
        rows["path"].append({"image": f"images/{i}.png", "question": question, "answer": yes_no, "id": str(i)})
        rows["omni"].append(
            {
                "dataset": "Phantom",
                "question_id": str(i),
                "question_type": "Lesion",
                "question": question,
                "image_path": f"Images/Phantom/{i}.png",
                "modality_type": "CT(Computed Tomography)",
                "gt_answer": yes_no,
                "option_A": "yes",
                "option_B": "no",
            }
        )
        mmmu_row = {
            "id": f"validation_Clinical_Medicine_{i}",
            "question": question,
            "options": "['yes', 'no']",
            "answer": "A" if case.has_lesion else "B",
            "question_type": "multiple-choice",
            "image_1": f"img/{i}.png",
        }
        rows["mmmu"].append(mmmu_row | {f"image_{k}": None for k in range(2, 8)})
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows["rad"]))
    (slake / "test.json").write_text(json.dumps(rows["slake"]))
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["path"]))
    (omni / "QA_information" / "Open-access" / "Phantom.json").write_text(json.dumps(rows["omni"]))
    (mmmu / "Clinical_Medicine" / "validation.json").write_text(json.dumps(rows["mmmu"]))
    for subject in ("Basic_Medical_Science", "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"):
        (mmmu / subject).mkdir()
        (mmmu / subject / "validation.json").write_text("[]")
    return root


def test_eval_with_the_nano_model_matches_hand_computed_scores(tmp_path: Path) -> None:
    """`healthgpt eval` end to end on all five layouts; every score equals one computed here by hand from the
    predictions file (first word for closed questions, word recall for open ones, letter or option text for MCQ)."""
    root = _phantom_benchmarks(tmp_path / "data")
    names = {
        "vqa-rad": "vqa-rad",
        "slake": "slake",
        "pathvqa": "pathvqa",
        "omnimedvqa": "omnimedvqa",
        "mmmu-med": "mmmu",
    }
    data = [arg for name, folder in names.items() for arg in ("--data", f"{name}={root / folder}")]
    run("eval", *data, "--out", tmp_path / "run", "--no-progress", cwd=tmp_path)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["prompts"] == PROMPT_SETS["plain"].to_dict()  # nano's default: the questions as it was trained
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["datasets"]
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]

    def words(text: str) -> list[str]:
        return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()

    def truth(dataset: str) -> list[str]:
        folder = root / names[dataset]
        if dataset == "vqa-rad":
            return [r["answer"] for r in json.loads((folder / "VQA_RAD Dataset Public.json").read_text())]
        if dataset == "slake":
            return [r["answer"] for r in json.loads((folder / "test.json").read_text())]
        if dataset == "pathvqa":
            return [json.loads(line)["answer"] for line in (folder / "test.jsonl").read_text().splitlines()]
        if dataset == "omnimedvqa":
            return [
                r["gt_answer"] for r in json.loads((folder / "QA_information/Open-access/Phantom.json").read_text())
            ]
        return [
            ("yes", "no")["AB".index(r["answer"])]
            for r in json.loads((folder / "Clinical_Medicine" / "validation.json").read_text())
        ]

    def score(dataset: str, prediction: str, answer: str) -> float:
        said = words(prediction)
        if dataset == "slake":  # open: share of the answer's words in the prediction
            return len(set(words(answer)) & set(said)) / len(set(words(answer)))
        if dataset in ("omnimedvqa", "mmmu-med"):  # MCQ over A=yes, B=no: the letter, or the option text alone
            letter = "ab"[("yes", "no").index(answer)]
            other = "no" if answer == "yes" else "yes"
            return float(said == [letter] or (answer in said and other not in said))
        return float(said[:1] == [answer])  # closed: the first word

    for dataset in names:
        preds = [p["prediction"] for p in predictions if p["dataset"] == dataset]
        assert len(preds) == 8, dataset
        expected = 100 * sum(score(dataset, p, a) for p, a in zip(preds, truth(dataset), strict=True)) / 8
        kind = {"slake": ("open", "recall"), "omnimedvqa": ("mcq", "accuracy"), "mmmu-med": ("mcq", "accuracy")}
        section, key = kind.get(dataset, ("closed", "accuracy"))
        assert metrics[dataset][section][key] == pytest.approx(expected), dataset
    closed = [
        score("vqa-rad", p["prediction"], a)
        for p, a in zip([p for p in predictions if p["dataset"] == "vqa-rad"], truth("vqa-rad"), strict=True)
    ]
    assert sum(closed) >= 6  # the trained toy model does see the phantom lesions


@pytest.mark.slow
def test_fine_tuning_the_shipped_nano_model_with_the_readme_commands(tmp_path: Path) -> None:
    """The README's recipe: start from all of nano's weights, train the comprehension plugin only (no code cache,
    although the data hold generation records), export the one stage-3 output; only that plugin changed."""
    from safetensors.torch import load_file

    from healthgpt.checkpoints import embedded_bundle

    make_dataset(tmp_path / "data", 4, seed=3, size=64, test_fraction=0.0)
    (tmp_path / "recipe.yaml").write_text(
        "output_dir: runs/mine\nmodel:\n  init: nano\nstages:\n  stage3_comprehension:\n"
        "    init_from: []\n    global_batch_size: 4\n    max_steps: 2\n"
    )
    out = run(
        "train",
        "--stage",
        "stage3_comprehension",
        "--config",
        "recipe.yaml",
        "train.data=data/train.json",
        cwd=tmp_path,
    )
    assert "stage3_comprehension: 2 steps" in out.stdout
    run("export", "mine", "--config", "recipe.yaml", "--include-base", cwd=tmp_path)
    nano = embedded_bundle("nano")
    for plugin, changed in (("comprehension", True), ("generation", False)):
        before, after = (load_file(f / "plugins" / f"{plugin}.safetensors") for f in (nano, tmp_path / "mine"))
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before) == changed, plugin
    image = sorted((tmp_path / "data" / "images").rglob("*.png"))[0]
    answer = run("ask", image, "Is there a lesion?", "--model", "mine", "--max-new-tokens", "4", cwd=tmp_path)
    assert answer.stdout.strip() and answer.stderr == ""


def test_healthgpt_model_names_the_model_where_no_option_does(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    env = {**ENV, "HEALTHGPT_MODEL": "./bundles/gone", "COLUMNS": "200"}
    shown = subprocess.run([*ENTRY, "ask", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert "[env var: HEALTHGPT_MODEL]" in shown.stdout and "[default: nano]" in shown.stdout
    asked = [*ENTRY, "ask", get_testdata_file("CT_small.dcm"), "Why?"]
    done = subprocess.run(asked, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2 and "--model ./bundles/gone: no such folder" in done.stderr
    passed = subprocess.run([*asked, "--model", "nano"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert passed.returncode == 0 and passed.stdout.strip(), passed.stderr  # the option wins over the variable
