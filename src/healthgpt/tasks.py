"""Named image-generation tasks: each an instruction preset in the paper's phrasing (REFERENCE §3.4).

A task name or any free instruction resolves to the instruction text the model sees and whether it needs an input
image (report-to-CXR is text to image: the radiology report is the instruction).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationTask:
    """An instruction preset: `instruction` may hold `{text}` for the user's text (the report for report_to_cxr);
    `modality` is the DICOM Modality of what it generates (None: the source's)."""

    name: str
    instruction: str
    needs_image: bool = True
    modality: str | None = None


# The prompt of the unconditional rows of classifier-free guidance when the condition is the text itself.
UNCONDITIONAL_INSTRUCTION = "Generate a medical image."

TASKS: dict[str, GenerationTask] = {
    t.name: t
    for t in (
        GenerationTask("reconstruct", "Reconstruct the image."),
        GenerationTask("ct2mri", "I need a version of this CT representation in MRI.", modality="MR"),
        GenerationTask("mri2ct", "Transform the MRI display into a CT image.", modality="CT"),
        GenerationTask("super_resolution", "Could you improve the quality of this MRI image?", modality="MR"),
        GenerationTask("report_to_cxr", "{text}", needs_image=False, modality="DX"),
    )
}


def resolve_instruction(task_or_instruction: str, text: str | None = None) -> tuple[str, GenerationTask | None]:
    """(instruction text, task) for a task name, or (the text itself, None) for a free instruction."""
    task = TASKS.get(task_or_instruction)
    if task is None:
        if not task_or_instruction.strip():
            raise ValueError(f"empty instruction: give one of the tasks {', '.join(TASKS)} or a free instruction")
        return task_or_instruction, None
    if "{text}" in task.instruction:
        if not text or not text.strip():
            raise ValueError(f"task {task.name!r} needs text, e.g. the radiology report (--text; text= in Python)")
        return task.instruction.format(text=text.strip()), task
    return task.instruction, task


def check_image_input(task: GenerationTask | None, has_image: bool) -> None:
    """Refuse a task the wrong input: no image for a task that transforms one, an image for text-to-image (a free
    instruction takes either). The one home of this check for the API, the CLI, the server and the app."""
    if task is not None and task.needs_image and not has_image:
        raise ValueError(f"task {task.name!r} transforms an image: give an input image")
    if task is not None and not task.needs_image and has_image:
        raise ValueError(f"task {task.name!r} makes an image from the text alone: give no input image")
