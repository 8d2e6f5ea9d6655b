"""`HealthGPT`: the facade every entry point uses — ask, stream, chat and generate images on one loaded model whose
plugins are chosen per request. `facade` holds the class (loading, prompts, text answers), `images` its image
generation."""

from .facade import HealthGPT, PromptTooLongError
from .images import GeneratedImage, ImageRequest

__all__ = ["GeneratedImage", "HealthGPT", "ImageRequest", "PromptTooLongError"]
