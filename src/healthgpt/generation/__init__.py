"""Generation: the one loop (`loop`), decoding settings (`sampling`), image spans (`spans`) and the eager and
compiled decode sessions (`decoders`)."""

from .decoders import StaticEngine
from .detokenize import IncrementalDetokenizer
from .loop import Request, Step, generate, head_logits, left_pad, stream
from .sampling import SamplingParams
from .spans import ImageSpanConstraint

__all__ = [
    "ImageSpanConstraint",
    "IncrementalDetokenizer",
    "Request",
    "SamplingParams",
    "StaticEngine",
    "Step",
    "generate",
    "head_logits",
    "left_pad",
    "stream",
]
