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
    """VQA-RAD (OSF json) and SLAKE (test.json + imgs/) folders of held-out phantom CTs: closed presence
    questions and open count questions, in each benchmark's public on-disk format."""
    from healthgpt.data.phantoms import COUNT_WORDS, sample_case

    rng = np.random.default_rng(20261125)  # phantoms no part of the nano recipe saw
    rad, slake = root / "vqa-rad", root / "slake"
    (rad / "VQA_RAD Image Folder").mkdir(parents=True)
    (slake / "imgs" / "ct").mkdir(parents=True)
    rad_rows, slake_rows = [], []
    for i in range(8):
        case = sample_case(rng, size=64)
        case.rgb("ct").save(rad / "VQA_RAD Image Folder" / f"synpic{i}.png")
        case.rgb("ct").save(slake / "imgs" / "ct" / f"{i}.png")
        rad_rows.append(
            {
                "qid": i,
                "image_name": f"synpic{i}.png",
                "question": "Is there a lesion in this CT image?",
                "answer": "yes" if case.has_lesion else "no",
                "answer_type": "CLOSED",
                "question_type": "PRES",
                "phrase_type": "test_freeform",
                "image_organ": "HEAD",
            }
        )
        slake_rows.append(
            {
                "qid": i,
                "img_name": f"ct/{i}.png",
                "question": "How many lesions are there?",
                "answer": COUNT_WORDS[case.count],
                "q_lang": "en",
                "answer_type": "OPEN",
                "modality": "CT",
                "content_type": "Quantity",
            }
        )
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rad_rows))
    (slake / "test.json").write_text(json.dumps(slake_rows))
    return root


def test_eval_with_the_nano_model_matches_hand_computed_scores(tmp_path: Path) -> None:
    root = _phantom_benchmarks(tmp_path / "data")
    run(
        "eval",
        "--data",
        f"vqa-rad={root / 'vqa-rad'}",
        "--data",
        f"slake={root / 'slake'}",
        "--out",
        tmp_path / "run",
        "--prompts",
        "plain",
        "--no-progress",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["datasets"]
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    truth = {
        f"vqa-rad/{r['qid']}": r["answer"]
        for r in json.loads((root / "vqa-rad" / "VQA_RAD Dataset Public.json").read_text())
    }
    truth |= {f"slake/{r['qid']}": r["answer"] for r in json.loads((root / "slake" / "test.json").read_text())}

    def words(text: str) -> list[str]:
        return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()

    closed = [words(p["prediction"])[:1] == [truth[p["id"]]] for p in predictions if p["id"].startswith("vqa-rad")]
    recalls = [
        len(set(words(truth[p["id"]])) & set(words(p["prediction"]))) / len(set(words(truth[p["id"]])))
        for p in predictions
        if p["id"].startswith("slake")
    ]
    assert len(closed) == 8 and len(recalls) == 8
    assert metrics["vqa-rad"]["closed"]["accuracy"] == pytest.approx(100 * sum(closed) / 8)
    assert metrics["slake"]["open"]["recall"] == pytest.approx(100 * sum(recalls) / 8)
    assert sum(closed) >= 6  # the trained toy model does see the phantom lesions
