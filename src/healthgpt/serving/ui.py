"""The Gradio app: analyze an image (streamed answer) or generate one (the task presets), with any of the loaded
models. Uploads may be any format `load_image` reads (PNG/JPEG/TIFF/BMP, DICOM with or without an extension,
NIfTI), with slice and window controls for volumes and medical files; previews and generated images are shown
enlarged to a readable size in their physical proportions; generated images download as PNG, and as DICOM/NIfTI when
the input was one. Models stay loaded: switching never reloads."""

from __future__ import annotations

import contextlib
import functools
import queue
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ..api import HealthGPT
from ..generation import Request, SamplingParams
from ..io import PRESETS, ImageInputError, MedicalImage, load_image, write_images
from ..io.atomic import scratch_folder
from ..quantize import format_memory
from ..tasks import TASKS
from ..templates import PromptError
from .batcher import Batcher, Failed, ImageDone, Job, TextDelta, TextDone, named_models

ANALYZE, GENERATE = "Analyze image", "Generate image"
CUSTOM = "custom instruction"
AUTO_WINDOW = "auto"
QUESTION_HINT = "e.g. Is there a lesion in this image?"
NOTICE = (
    "**Research tool, not a diagnostic device.** HealthGPT's answers and images may be wrong or invented; they must "
    "not be used to diagnose, treat or make any clinical decision. Do not upload images that identify a patient."
)
DISPLAY_SIZE = 384  # longer side (px) images are enlarged to on screen; files keep their own size


@functools.lru_cache(maxsize=8)
def _volume(path: str) -> MedicalImage:
    """The whole upload (every slice) in physical units, read once per file."""
    return load_image(path, slice_index="all")


def _medical(path: str) -> bool:
    return path.lower().endswith((".dcm", ".dicom", ".nii", ".nii.gz")) or bool(_volume(path).datasets)


def _slice(path: str, index: int | None, window: str | None) -> MedicalImage:
    """The chosen slice shown with the chosen window ("auto": the file's own, else the modality's)."""
    image = _volume(path)
    if image.is_volume:
        image = image.slice(image.num_slices // 2 if index is None else min(int(index), image.num_slices - 1))
    if window and window != AUTO_WINDOW and not image.color:
        image = image.with_window(window)
    return image


def _shown(picture: Image.Image, spacing: tuple[float, float] | None = None) -> Image.Image:
    """`picture` as displayed: in its physical proportions (pixel `spacing`, mm) and enlarged, without smoothing, until
    its longer side is `DISPLAY_SIZE`; larger pictures keep their size."""
    row_mm, col_mm = spacing or (1.0, 1.0)
    height, width = picture.height * row_mm, picture.width * col_mm
    scale = max(DISPLAY_SIZE, picture.width, picture.height) / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return picture if size == picture.size else picture.resize(size, Image.Resampling.NEAREST)


def _preview(image: MedicalImage) -> Image.Image:
    return _shown(image.to_pil(), image.pixel_spacing)


class _App:
    """The event handlers, over one batcher per loaded model."""

    def __init__(self, batchers: Mapping[str, Batcher], timeout: float) -> None:
        self.batchers = dict(batchers)
        self.timeout = timeout
        # generated files to download, kept while the app runs; a killed app's are removed at the next start
        self._scratch = contextlib.ExitStack()
        self.outputs = self._scratch.enter_context(scratch_folder("healthgpt-ui"))
        weakref.finalize(self, self._scratch.close)

    def on_upload(self, path: str | None) -> tuple[Any, Any, Any]:
        """Preview, slice slider and window choice for a new upload."""
        if not path:
            return None, gr.update(visible=False), gr.update(visible=False)
        try:
            volume = _volume(path)
            preview = _preview(_slice(path, None, None))
        except ImageInputError as exc:
            raise gr.Error(str(exc)) from None
        slices = volume.num_slices if volume.is_volume else 1
        slider = gr.update(visible=slices > 1, minimum=0, maximum=max(slices - 1, 1), value=slices // 2)
        window = gr.update(visible=_medical(path) and not volume.color, value=AUTO_WINDOW)
        return preview, slider, window

    def on_view(self, path: str | None, index: float | None, window: str | None) -> Image.Image | None:
        """The preview after a slice or window change."""
        if not path:
            return None
        try:
            return _preview(_slice(path, None if index is None else int(index), window))
        except ImageInputError as exc:
            raise gr.Error(str(exc)) from None

    def process(
        self,
        task: str,
        model: str,
        path: str | None,
        index: float | None,
        window: str | None,
        preset: str,
        question: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        seed: float | None,
        guidance: float | None = None,
    ) -> Iterator[tuple[Any, Any, Any]]:
        """Stream the answer (analyze) or show the generated image and its files (generate, with classifier-free
        `guidance`; None: the model's own scale)."""
        batcher = self.batchers[model]
        try:
            source = _slice(path, None if index is None else int(index), window) if path else None
            chosen = dict(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p) if top_p < 1 else None,
                seed=None if seed is None else int(seed),
            )
            sampling = batcher.model.sampling_params({k: v for k, v in chosen.items() if v is not None})
            if task == ANALYZE:
                if source is None:
                    raise ValueError("upload an image to analyze")
                if not question.strip():
                    raise ValueError("type a question about the image")
                yield from self._analyze(batcher, source, question, sampling)
            else:
                scale = batcher.model.resolve_guidance(None if guidance is None else float(guidance))
                yield self._generate(batcher, source, path, preset, question, sampling, scale)
        except (PromptError, ImageInputError, ValueError, RuntimeError) as exc:
            raise gr.Error(str(exc)) from None

    def _run(
        self,
        batcher: Batcher,
        request: Request,
        sampling: SamplingParams,
        unconditional: Request | None = None,
        guidance_scale: float = 1.0,
    ) -> Iterator[Any]:
        """Queue one job (an image job with its guidance twin and scale) and yield its events until the last one."""
        events: queue.Queue = queue.Queue()
        deadline = time.monotonic() + self.timeout
        job = Job(request, sampling, events.put, unconditional, guidance_scale, deadline=deadline)
        batcher.submit(job)
        try:
            while True:
                event = events.get(timeout=self.timeout)
                if isinstance(event, Failed):
                    raise RuntimeError(f"generation failed: {event.error}")
                yield event
                if not isinstance(event, TextDelta):
                    return
        except queue.Empty:
            raise RuntimeError("the model did not answer in time; try again") from None
        finally:
            job.cancel()

    def _analyze(
        self, batcher: Batcher, source: MedicalImage | None, question: str, sampling: SamplingParams
    ) -> Iterator[tuple[Any, Any, Any]]:
        shown = [source.to_pil()] if source is not None else []
        request = batcher.prepare(
            lambda hg: hg.build_request(
                [{"role": "user", "content": question}], shown, max_new_tokens=sampling.max_new_tokens
            )
        )
        text = ""
        for event in self._run(batcher, request, sampling):
            text = event.text if isinstance(event, TextDone) else text + event.text
            yield text.lstrip(), gr.update(), gr.update()

    def _generate(
        self,
        batcher: Batcher,
        source: MedicalImage | None,
        path: str | None,
        preset: str,
        text: str,
        sampling: SamplingParams,
        scale: float,
    ) -> tuple[Any, Any, Any]:
        shown = source.to_pil() if source is not None else None
        span = batcher.model.config.vq.num_image_tokens
        what = text if preset == CUSTOM else preset
        built = batcher.prepare(lambda hg: hg.build_image_request(shown, what, text=text, guided=scale != 1.0))
        sampling = replace(sampling, max_new_tokens=span + 1)
        events = self._run(batcher, built.request, sampling, built.unconditional, scale)
        done = [event for event in events if isinstance(event, ImageDone)][0]
        folder = Path(tempfile.mkdtemp(dir=self.outputs))
        files = [write_images([done.image], None, folder / "generated.png")]
        if source is not None and path is not None and source.datasets:
            series = write_images([done.image], source, folder / "dicom")
            files.append(next(series.iterdir()).rename(folder / "generated.dcm"))
        elif source is not None and path is not None and path.lower().endswith((".nii", ".nii.gz")):
            files.append(write_images([done.image], source, folder / "generated.nii.gz"))
        return gr.update(), _shown(done.image), gr.update(value=[str(f) for f in files], visible=True)

    def on_task(self, task: str) -> tuple[Any, ...]:
        """Show the answer box or the image outputs, the presets, and label the text box for the task."""
        analyze = task == ANALYZE
        label = "Question" if analyze else "Report (report_to_cxr) or instruction (custom); unused by other presets"
        return (
            gr.update(visible=not analyze),
            gr.update(label=label),
            gr.update(visible=analyze),
            gr.update(visible=not analyze),
            gr.update(visible=not analyze),
        )


def _models_line(batchers: Mapping[str, Batcher]) -> str:
    """One line per model: its base LLM's storage (full precision or the --quantize format) and its memory."""
    return "\n".join(
        f"- **{name}**: base LLM {b.model.quantization or 'full precision'}, {format_memory(b.model.memory())}"
        for name, b in batchers.items()
    )


def build_ui(batchers: Mapping[str, Batcher], *, timeout: float = 600.0) -> gr.Blocks:
    """The Gradio Blocks over running batchers (`{model name: batcher}`); the caller starts and closes them."""
    if not batchers:
        raise ValueError("the app needs at least one model")
    app = _App(batchers, timeout)
    names = list(batchers)
    with gr.Blocks(title="HealthGPT", analytics_enabled=False) as demo:
        gr.Markdown("# HealthGPT")
        gr.Markdown(NOTICE, elem_id="notice")
        gr.Markdown(_models_line(batchers), elem_id="models")
        with gr.Row():
            task = gr.Radio([ANALYZE, GENERATE], value=ANALYZE, label="Choose the task", elem_id="task")
            model = gr.Radio(names, value=names[0], label="Choose the model", elem_id="model")
        with gr.Row():
            with gr.Column():
                upload = gr.File(  # no type filter: DICOM often has no extension; bad files get a clear error
                    label="Image: PNG, JPEG, TIFF, BMP, DICOM (any name) or NIfTI", elem_id="upload"
                )
                preview = gr.Image(label="What the model sees", type="pil", interactive=False, elem_id="preview")
                index = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="slice")
                window = gr.Dropdown(
                    [AUTO_WINDOW, *PRESETS, "percentile", "multi"],
                    value=AUTO_WINDOW,
                    label="Window (a preset, or center,width)",
                    allow_custom_value=True,
                    visible=False,
                    elem_id="window",
                )
                preset = gr.Dropdown(
                    [*TASKS, CUSTOM], value="reconstruct", label="Generation task", visible=False, elem_id="preset"
                )
                question = gr.Textbox(lines=3, label="Question", placeholder=QUESTION_HINT, elem_id="question")
                with gr.Accordion("Sampling", open=False):
                    max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens (answers)")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
                    seed = gr.Number(value=None, precision=0, label="Seed (sampling only)")
                    guidance = gr.Number(value=None, label="Guidance scale (images; empty: the model's own)")
                process = gr.Button("Process", variant="primary", elem_id="process")
            with gr.Column():
                answer = gr.Textbox(label="HealthGPT answer", lines=20, elem_id="answer")
                generated = gr.Image(
                    label="Generated image (shown enlarged; the download keeps its size)",
                    type="pil",
                    format="png",
                    visible=False,
                    elem_id="generated",
                )
                files = gr.File(label="Download", file_count="multiple", visible=False, elem_id="files")

        upload.change(app.on_upload, upload, [preview, index, window])
        for control in (index, window):
            control.change(app.on_view, [upload, index, window], preview)
        task.change(app.on_task, task, [preset, question, answer, generated, files])
        inputs = [
            task,
            model,
            upload,
            index,
            window,
            preset,
            question,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            guidance,
        ]
        process.click(app.process, inputs, [answer, generated, files])
    return demo


def launch_ui(
    models: HealthGPT | Mapping[str, HealthGPT],
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    share: bool = False,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
) -> None:
    """Serve the app for `models` (a model, or `{name: model}`) until interrupted; each model is loaded once."""
    with contextlib.ExitStack() as stack:
        batchers = {
            name: stack.enter_context(
                Batcher(m, max_batch_size=max_batch_size, max_wait=batch_wait_ms / 1000, name=name)
            )
            for name, m in named_models(models).items()
        }
        build_ui(batchers).launch(server_name=host, server_port=port, share=share, footer_links=[])
