"""The training engine: data order, schedule, split-invariant loss, outputs, DDP on 2 CPU processes, kill-and-resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import phantoms_with_codes
from safetensors.torch import load_file

from healthgpt.data.records import DataError
from healthgpt.errors import CheckpointError
from healthgpt.tokens import ImageVocab
from healthgpt.training.checkpointing import checkpoints
from healthgpt.training.loop import run_stage
from healthgpt.training.stages import RecipeError, load_recipe
from healthgpt.training.steps import StepBatchSampler, corrupt_codes, lr_lambda

STAGE = "stage3_generation"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantoms_with_codes(tmp_path_factory.mktemp("phantoms"), seed=1)


def _overrides(phantoms: Path, out: Path, *extra: str) -> list[str]:
    """A stage-3 generation run from scratch on the phantoms (no init stage), 4 samples per step."""
    return [
        f"output_dir={out}",
        f"data.code_cache={phantoms / 'codes'}",
        f"{STAGE}.data=[{phantoms / 'train.json'}]",
        f"{STAGE}.init_from=[]",
        f"{STAGE}.global_batch_size=4",
        f"{STAGE}.adapter_lr=1e-3",
        f"{STAGE}.lr=1e-3",
        *extra,
    ]


def test_step_sampler_splits_each_global_batch_over_processes_and_accumulation() -> None:
    one = StepBatchSampler(n=10, global_batch=4, micro=1, rank=0, world=1, seed=3, start=0, total=5)
    two = [StepBatchSampler(10, 4, 2, rank, 2, 3, 0, 5) for rank in range(2)]
    steps = [sum(list(one)[s * 4 : (s + 1) * 4], []) for s in range(5)]
    per_rank = [list(s) for s in two]
    assert [per_rank[0][s] + per_rank[1][s] for s in range(5)] == steps
    assert sorted(steps[0] + steps[1]) == sorted(set(steps[0] + steps[1]))  # an epoch repeats no sample
    resumed = StepBatchSampler(10, 4, 1, 0, 1, 3, start=3, total=5)
    assert list(resumed) == list(one)[12:] and len(resumed) == 8


def test_step_sampler_swaps_samples_for_their_twins_at_the_rate_however_the_batch_is_split() -> None:
    twins = np.arange(40) % 2 == 0  # the even samples have a twin (index 40 + i)
    one = list(StepBatchSampler(40, 8, 8, 0, 1, 3, 0, 200, twins=twins, twin_rate=0.3))
    split = [list(StepBatchSampler(40, 8, 2, rank, 2, 3, 0, 200, twins=twins, twin_rate=0.3)) for rank in range(2)]
    plain = list(StepBatchSampler(40, 8, 8, 0, 1, 3, 0, 200))
    assert [sum(split[0][2 * s : 2 * s + 2] + split[1][2 * s : 2 * s + 2], []) for s in range(200)] == one
    swapped = [(a, b) for step, base in zip(one, plain, strict=True) for a, b in zip(step, base, strict=True) if a != b]
    assert all(a == b + 40 and b % 2 == 0 for a, b in swapped)  # only samples with a twin, only for their own
    with_twin = sum(i % 2 == 0 for step in plain for i in step)
    assert len(swapped) / with_twin == pytest.approx(0.3, abs=0.04)
    assert list(StepBatchSampler(40, 8, 8, 0, 1, 3, 0, 200, twins=twins, twin_rate=0.0)) == plain


def test_warmup_then_cosine_or_constant() -> None:
    values = [lr_lambda(s, warmup=2, total=10, schedule="cosine") for s in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)])
    assert [lr_lambda(s, 2, 10, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_corrupt_codes_replaces_code_inputs_at_the_rate_from_each_rows_own_stream() -> None:
    vocab = ImageVocab(start_id=99, first_code_id=100, num_codes=512, end_id=612, newline_id=613)
    text = torch.arange(0, 60)
    row = torch.cat([text, torch.randint(100, 612, (4000,), generator=torch.Generator().manual_seed(0)), text])
    padded = torch.cat([torch.zeros(7, dtype=torch.long), row[:-7]])  # 7 pads first: the same codes, shifted
    batch = torch.stack([row, padded])
    out = corrupt_codes(batch, vocab, 0.25, [(1, 2, 0), (1, 2, 0)])
    changed = out != batch
    assert not changed[0, :60].any() and not changed[1, :67].any() and not changed[:, -53:].any()  # text, padding
    assert ((out[changed] >= 100) & (out[changed] < 612)).all()
    # a code is hit with chance 0.25 and then drawn anew, equal to the old one 1 time in 512
    assert changed[0].sum().item() / 4000 == pytest.approx(0.25 * 511 / 512, abs=0.02)
    torch.testing.assert_close(out[1, 7:], out[0, :-7])  # a row's draws follow its codes, not its padding
    assert torch.equal(corrupt_codes(batch, vocab, 0.25, [(1, 2, 0), (1, 2, 0)]), out)
    assert not torch.equal(corrupt_codes(batch, vocab, 0.25, [(1, 2, 1), (1, 2, 0)])[0], out[0])
    assert torch.equal(corrupt_codes(batch, vocab, 0.0, [(1, 2, 0), (1, 2, 0)]), batch)


def test_code_noise_changes_the_training_but_not_its_split_invariance(phantoms: Path, tmp_path: Path) -> None:
    """Corrupted code inputs change what is learned; 1 x 4 and 4 x 1 (micro-batch x accumulation) learn the same.
    The embeddings train too: a fresh model's code rows all hold the mean embedding, so inputs could not differ."""
    curves, weights = {}, {}
    for micro, noise in ((4, 0.0), (1, 0.5), (4, 0.5)):
        out = tmp_path / f"micro{micro}noise{noise}"
        extra = [f"engine.micro_batch_size={micro}", f"{STAGE}.code_noise={noise}", f"{STAGE}.dropout=0"]
        extra += [f"{STAGE}.trainable=[plugin:generation, projector:generation, embeddings]"]
        result = run_stage(load_recipe(None, _overrides(phantoms, out, *extra, f"{STAGE}.max_steps=2")), STAGE)
        curves[micro, noise] = _history(result.metrics_file)
        weights[micro, noise] = load_file(result.output / "weights.safetensors")
    assert curves[1, 0.5] == pytest.approx(curves[4, 0.5], rel=1e-5)
    for key, value in weights[4, 0.5].items():
        torch.testing.assert_close(value, weights[1, 0.5][key], rtol=1e-4, atol=1e-5)
    moved = {key for key, value in weights[4, 0.5].items() if (value - weights[4, 0.0][key]).abs().max() > 1e-6}
    assert any("lora" in key for key in moved) and any("embed" in key for key in moved), sorted(moved)


def test_condition_dropout_changes_the_training_but_not_its_split_invariance(phantoms: Path, tmp_path: Path) -> None:
    """Generation samples learned now and then as their guidance twins change the loss curve; 1 x 4 and 4 x 1
    (micro-batch x accumulation) learn the same; a stage with no generation data to drop is refused."""
    curves = {}
    for micro, rate in ((4, 0.0), (1, 0.5), (4, 0.5)):
        extra = [f"engine.micro_batch_size={micro}", f"{STAGE}.condition_dropout={rate}", f"{STAGE}.dropout=0"]
        overrides = _overrides(phantoms, tmp_path / f"micro{micro}rate{rate}", *extra, f"{STAGE}.max_steps=3")
        curves[micro, rate] = _history(run_stage(load_recipe(None, overrides), STAGE).metrics_file)
    assert curves[1, 0.5] == pytest.approx(curves[4, 0.5], rel=1e-5)
    assert curves[4, 0.5] != pytest.approx(curves[4, 0.0], rel=1e-5)  # by more than any batch split changes it
    questions = "stage3_comprehension"
    overrides = [
        f"output_dir={tmp_path / 'questions'}",
        f"{questions}.data=[{phantoms / 'train.json'}]",
        f"{questions}.init_from=[]",
        f"{questions}.condition_dropout=0.1",
    ]
    with pytest.raises(RecipeError, match="no one-turn generation records to drop the condition of"):
        run_stage(load_recipe(None, overrides), questions)


def _history(metrics: Path) -> list[float]:
    return [row["loss"] for row in json.loads(metrics.read_text())["history"]]


def test_loss_curve_does_not_depend_on_how_the_global_batch_is_split(phantoms: Path, tmp_path: Path) -> None:
    """1 x 4, 2 x 2 and 4 x 1 (micro-batch x accumulation), and 2 x 2 with gradient checkpointing: one curve."""
    curves, weights = [], []
    for micro, checkpointing in ((1, False), (2, False), (4, False), (2, True)):
        out = tmp_path / f"micro{micro}{checkpointing}"
        extra = [f"engine.micro_batch_size={micro}", f"engine.gradient_checkpointing={checkpointing}"]
        overrides = _overrides(phantoms, out, *extra, f"{STAGE}.max_steps=3", f"{STAGE}.dropout=0")
        result = run_stage(load_recipe(None, overrides), STAGE)
        curves.append(_history(result.metrics_file))
        weights.append(load_file(result.output / "weights.safetensors"))
    assert curves[0][-1] < curves[0][0]
    for curve, state in zip(curves[1:], weights[1:], strict=True):
        assert curve == pytest.approx(curves[0], rel=1e-5)
        for key, value in state.items():
            torch.testing.assert_close(value, weights[0][key], rtol=1e-4, atol=1e-5)  # Adam: tiny grads


def test_outputs_reports_and_guards(phantoms: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "image": "missing.png",
                    "target_image": "missing.png",
                    "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": ""}],
                }
            ]
        )
    )
    overrides = _overrides(
        phantoms,
        tmp_path / "run",
        f"{STAGE}.max_steps=2",
        "engine.save_every=1",
        "engine.keep_checkpoints=1",
        f"{STAGE}.data=[{phantoms / 'train.json'},{broken}]",
    )
    recipe = load_recipe(None, overrides)
    result = run_stage(recipe, STAGE)
    out = tmp_path / "run" / STAGE
    metrics = json.loads(result.metrics_file.read_text())
    assert [row["step"] for row in metrics["history"]] == [1, 2] and metrics["final_loss"] == result.final_loss
    assert (
        metrics["data"]["malformed_skipped"] == 1
        and "broken.json:1 (record 0, id 'x')" in metrics["data"]["malformed"][0]
    )
    assert metrics["data"]["by_task"] == {"generation": metrics["samples"]}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step_00000002"]  # keep_checkpoints=1
    with pytest.raises(RecipeError, match="already holds a run"):
        run_stage(recipe, STAGE)
    again = run_stage(recipe, STAGE, resume=True)  # already complete: nothing more to do, same output
    assert again.steps == 2 and torch.equal(
        load_file(again.output / "weights.safetensors")["projectors.generation.0.weight"],
        load_file(result.output / "weights.safetensors")["projectors.generation.0.weight"],
    )
    hidden = [p for p in out.rglob(".*")]  # the replaced output went with its replacement, no temporary is left
    assert hidden == [] and sorted(p.name for p in (out / "output").iterdir()) == [
        "config.json",
        "stage.json",
        "weights.safetensors",
    ]
    with pytest.raises(DataError, match="broken.json:1 .*missing image file"):
        run_stage(load_recipe(None, [*overrides, f"output_dir={tmp_path / 'strict'}", "data.on_error=raise"]), STAGE)


def test_an_interrupted_save_leaves_nothing_and_the_next_removes_what_a_killed_one_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    from healthgpt.training import checkpointing

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000001").mkdir(parents=True)  # a save killed by SIGKILL
    (root / ".tmp-step_00000001" / "optimizer.bin").write_bytes(b"half an optimizer")

    def interrupted(path: Path) -> None:
        assert (path.parent / "optimizer.bin").is_file() and not (root / ".tmp-step_00000001").exists()
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through terminate_on_signals, halfway through the save

    monkeypatch.setattr(checkpointing, "_save_rng_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(accelerator, root, {"step": 2}, 2, scheduler)
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    checkpointing.save_checkpoint(accelerator, root, {"step": 3}, 2, scheduler)
    assert [p.name for p in root.iterdir()] == ["step_00000003"] and checkpoints(root) == [root / "step_00000003"]


class _Payload:
    """Unpickling this creates the marker file: proof that a checkpoint file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_resume_checks_every_checkpoint_file_and_never_runs_a_planted_pickle(phantoms: Path, tmp_path: Path) -> None:
    extra = ["engine.micro_batch_size=2", f"{STAGE}.max_steps=3", "engine.save_every=1", "engine.keep_checkpoints=3"]
    full = run_stage(load_recipe(None, _overrides(phantoms, tmp_path / "full", *extra)), STAGE)  # dropout 0.05
    ckpts = tmp_path / "full" / STAGE / "checkpoints"
    step2 = ckpts / "step_00000002"
    names = sorted(str(p.relative_to(step2)) for p in step2.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith(".pkl")]  # no pickled scheduler or RNG state
    assert {"trainer_state.json", "scheduler.json", "rng_state_0.safetensors", "model.safetensors"} <= set(names)

    def run_from(checkpoint: Path, out: Path) -> Path:
        """A copy of the run whose newest checkpoint is `checkpoint` (a step-2 one), ready to resume."""
        target = out / STAGE / "checkpoints" / checkpoint.name
        shutil.copytree(checkpoint, target)
        return out

    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    planted = [(name, False) for name in [*names, "random_states_0.pkl", "custom_checkpoint_0.pkl"]]
    planted += [(name, True) for name, _ in planted if name != "trainer_state.json"]
    for i, (name, forged) in enumerate(planted):  # forged: the checksums rewritten to match, as whoever can plant can
        out = run_from(step2, tmp_path / f"planted{i}")
        folder = out / STAGE / "checkpoints" / step2.name
        (folder / name).write_bytes(payload)
        if forged:
            state = json.loads((folder / "trainer_state.json").read_text())
            state["files"][name] = hashlib.sha256(payload).hexdigest()
            (folder / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(
            CheckpointError, match=rf"step_00000002/{name}: .*(tampered|unreadable|planted|unusable)"
        ) as err:
            run_stage(load_recipe(None, _overrides(phantoms, out, *extra)), STAGE, resume=True)
        assert not marker.exists(), name
        assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    out = run_from(step2, tmp_path / "missing")
    (out / STAGE / "checkpoints" / step2.name / "rng_state_0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rng_state_0.safetensors: missing from the checkpoint"):
        run_stage(load_recipe(None, _overrides(phantoms, out, *extra)), STAGE, resume=True)

    # An untouched step-2 checkpoint resumes exactly: the third step (dropout draws included) equals the full run's.
    resumed = run_stage(
        load_recipe(None, _overrides(phantoms, run_from(step2, tmp_path / "ok"), *extra)), STAGE, resume=True
    )
    assert _history(resumed.metrics_file)[2:] == _history(full.metrics_file)[2:]
    a, b = load_file(full.output / "weights.safetensors"), load_file(resumed.output / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(body))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


@pytest.mark.slow
def test_two_cpu_processes_give_the_loss_curve_of_one(phantoms: Path, tmp_path: Path) -> None:
    extra = ["engine.micro_batch_size=2", f"{STAGE}.max_steps=4", f"{STAGE}.dropout=0"]
    script = _script(
        tmp_path,
        f"""
        import sys
        from healthgpt.training.loop import train
        train({STAGE!r}, None, sys.argv[1:])
        """,
    )
    overrides = _overrides(phantoms, tmp_path / "ddp", *extra)
    # `accelerate launch --cpu` spawns several processes only through mpirun; torchrun (`--multi_gpu`) with
    # ACCELERATE_USE_CPU=1 gives DDP over gloo on CPU processes.
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command = [sys.executable, *launch, "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *overrides]
    done = subprocess.run(
        command, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / STAGE / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["accumulation"] == 1
    single = run_stage(
        load_recipe(None, _overrides(phantoms, tmp_path / "one", *extra, "engine.micro_batch_size=1")), STAGE
    )
    assert json.loads(single.metrics_file.read_text())["accumulation"] == 4
    assert [r["loss"] for r in ddp["history"]] == pytest.approx(_history(single.metrics_file), rel=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(phantoms: Path, tmp_path: Path) -> None:
    extra = ["engine.micro_batch_size=2", f"{STAGE}.max_steps=8", "engine.save_every=2", "engine.keep_checkpoints=5"]
    full = run_stage(load_recipe(None, _overrides(phantoms, tmp_path / "full", *extra)), STAGE)  # dropout 0.05
    # The killed run dies inside its third checkpoint save (step 6), after the state files, before the rename.
    script = _script(
        tmp_path,
        """
        import os, signal, sys
        import accelerate
        from healthgpt.training.loop import train

        save_state, calls = accelerate.Accelerator.save_state, []

        def save_then_die(self, *args, **kwargs):
            out = save_state(self, *args, **kwargs)
            calls.append(out)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        accelerate.Accelerator.save_state = save_then_die
        train("stage3_generation", None, sys.argv[1:])
        """,
    )
    overrides = _overrides(phantoms, tmp_path / "killed", *extra)
    done = subprocess.run([sys.executable, str(script), *overrides], env=_env(), capture_output=True, timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    ckpts = tmp_path / "killed" / STAGE / "checkpoints"
    assert [p.name for p in checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    assert (ckpts / ".tmp-step_00000006").is_dir()  # the interrupted save, ignored on resume
    resumed = run_stage(load_recipe(None, overrides), STAGE, resume=True)
    assert _history(resumed.metrics_file) == _history(full.metrics_file)
    a, b = load_file(full.output / "weights.safetensors"), load_file(resumed.output / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bf16_autocast_on_cpu_follows_the_fp32_curve(phantoms: Path, tmp_path: Path) -> None:
    """Mixed precision is fixed per process by accelerate, so the bf16 run gets its own process."""
    extra = ["engine.micro_batch_size=2", f"{STAGE}.max_steps=3", f"{STAGE}.dropout=0"]
    script = _script(
        tmp_path, "import sys\nfrom healthgpt.training.loop import train\ntrain(sys.argv[1], None, sys.argv[2:])\n"
    )
    overrides = _overrides(phantoms, tmp_path / "bf16", *extra, "engine.mixed_precision=bf16")
    done = subprocess.run([sys.executable, str(script), STAGE, *overrides], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    fp32 = run_stage(load_recipe(None, _overrides(phantoms, tmp_path / "fp32", *extra)), STAGE)
    assert _history(tmp_path / "bf16" / STAGE / "metrics.json") == pytest.approx(_history(fp32.metrics_file), rel=2e-2)
