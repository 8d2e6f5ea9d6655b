"""The `healthgpt` command line: thin commands over the Python API."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="HealthGPT: ask questions about medical images and generate images with one model.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def demo(
    question: str = typer.Option("Is there a lesion in this CT image?", help="Question to ask about the image."),
    seed: int = typer.Option(0, help="Seed of the random nano model."),
    max_new_tokens: int = typer.Option(24, help="Longest answer, in tokens."),
) -> None:
    """Build the nano model offline and ask one question about pydicom's CT_small.dcm."""
    from pydicom.data import get_testdata_file

    from .api import HealthGPT
    from .io import load_image

    path = get_testdata_file("CT_small.dcm")
    image = load_image(path)
    console.print(f"[bold]Image[/bold]: {path} ({image.modality}, {image.array.shape})")
    model = HealthGPT.random("nano", seed=seed)
    console.print("[yellow]Model: nano, UNTRAINED random weights — the answer is not meaningful.[/yellow]")
    console.print(f"[bold]Q[/bold]: {question}")
    answer = model.ask(image.to_pil(), question, max_new_tokens=max_new_tokens)
    console.print(f"[bold]HealthGPT[/bold]: {answer}")


if __name__ == "__main__":
    app()
