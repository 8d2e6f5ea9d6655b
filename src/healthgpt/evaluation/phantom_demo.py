"""What `healthgpt demo` shows: one held-out phantom case through every image task (input, truth, output and a figure
for each), a chest film from its report, and closed questions; one panel picture of it all."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from healthgpt.data.phantoms import QA, ChestCase, PhantomCase, check_lesions, chest_report, read_chest, vqa_pairs
from healthgpt.io.atomic import atomic_target
from healthgpt.metrics import image_metrics

from .phantom_goals import SUPER_RESOLUTION, held_out

if TYPE_CHECKING:
    from healthgpt.api import HealthGPT


@dataclass(frozen=True)
class DemoRow:
    """One task of the demo: what went in (an image, or the report), the truth, what came out, and how close."""

    task: str
    given: Image.Image | str
    truth: Image.Image
    output: Image.Image
    figure: str


def demo_case(seed: int, size: int) -> tuple[PhantomCase, ChestCase]:
    """The first held-out head phantom with a lesion, and the first chest film with a finding, of stream `seed`."""
    cases, chests = held_out(16, seed, size)
    case = next(c for c in cases if c.has_lesion)
    return case, next(c for c in chests if c.cardiomegaly or c.effusion != "none")


def image_rows(model: HealthGPT, case: PhantomCase, chest: ChestCase, report: str) -> list[DemoRow]:
    """Every image task on `case` (and `chest` from `report`): SSIM and lesions kept, or the findings read."""
    gray = {key: Image.fromarray(case.image(key)) for key in ("ct", "mri", "ct_low_res", "mri_low_res")}
    jobs = [  # task, instruction, input, truth key, truth modality
        ("reconstruct", "reconstruct", "ct", "ct", "CT"),
        ("ct2mri", "ct2mri", "ct", "mri", "MRI"),
        ("mri2ct", "mri2ct", "mri", "ct", "CT"),
        ("super_resolution", SUPER_RESOLUTION.format(m="MRI"), "mri_low_res", "mri", "MRI"),
    ]
    rows = []
    for task, instruction, source, target, modality in jobs:
        made = model.generate_image(gray[source].convert("RGB"), instruction, progress=False).image.convert("L")
        ssim = image_metrics(np.asarray(made), case.image(target))["ssim"]
        kept = check_lesions(made, case, modality).recalled
        figure = f"SSIM {ssim:.1f}, lesions kept {sum(kept)}/{len(kept)}"
        rows.append(DemoRow(task, gray[source], gray[target], made, figure))
    film = model.generate_image(None, "report_to_cxr", text=report, progress=False).image.convert("L")
    reading = read_chest(film)
    effusion = "no effusion" if reading.effusion == "none" else f"{reading.effusion} effusion"
    verdict = "matches" if reading.matches(chest) else "does not match"
    figure = f"read: CTR {reading.ctr:.2f}, {effusion}; {verdict} the report"
    rows.append(DemoRow("report_to_cxr", report, Image.fromarray(chest.render()), film, figure))
    return rows


def questions(case: PhantomCase, seed: int) -> list[QA]:
    """The closed questions of `case` on its CT (presence, count, side)."""
    return vqa_pairs(case, np.random.default_rng([seed, 0x5141]), "CT")


def write_demo_panel(path: Path, rows: list[DemoRow], title: str) -> None:
    """One picture: a row per task with its input (or report), truth and output, the figure under the output."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 2.2 * len(rows) + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, row in enumerate(rows):
        for c, (name, image) in enumerate((("input", row.given), ("truth", row.truth), ("output", row.output))):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(image, str):
                ax.text(0.5, 0.5, textwrap.fill(image, 22), ha="center", va="center", fontsize=8)
            else:
                ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{row.task}: {name}" if c == 0 else name, fontsize=8)
        axes[r][2].set_xlabel(textwrap.fill(row.figure, 34), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def report_of(chest: ChestCase, seed: int) -> str:
    """The report the demo asks a film for."""
    return chest_report(chest, np.random.default_rng([seed, 0x5243]))
