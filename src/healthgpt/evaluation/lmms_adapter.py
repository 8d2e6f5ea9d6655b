"""The HealthGPT side of the lmms-eval model interface, written without importing lmms-eval (which needs
torchvision and a large stack): request unpacking, generation settings, stop strings and log-likelihoods.

`healthgpt.evaluation.lmms_eval_model` binds it to lmms-eval's `lmms` base class; the package registers it under
the `lmms_eval.models` entry point, so `lmms-eval --model healthgpt --model_args pretrained=...` works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from healthgpt.errors import HealthGPTError

# lmms-eval generation kwargs -> our SamplingParams fields; `num_beams` > 1 is refused (no beam search here).
_SAMPLING_KEYS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}


class LMMSAdapterError(HealthGPTError):
    """A request the adapter cannot serve, with the reason."""


def sampling_from_gen_kwargs(gen_kwargs: Mapping[str, Any], default_max_new_tokens: int = 128) -> dict[str, Any]:
    """Our sampling settings from an lmms-eval `gen_kwargs` dict (`do_sample=False` or temperature 0 is greedy)."""
    if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
        raise LMMSAdapterError("beam search (num_beams > 1) is not supported; use greedy or sampling")
    out: dict[str, Any] = {"max_new_tokens": default_max_new_tokens}
    for key, ours in _SAMPLING_KEYS.items():
        if gen_kwargs.get(key) is not None:
            out[ours] = gen_kwargs[key]
    if not gen_kwargs.get("do_sample", False) or not out.get("temperature"):
        out.update(temperature=0.0)
        out.pop("top_p", None)
        out.pop("top_k", None)
    return out


def cut_at_stop_strings(text: str, until: str | Sequence[str] | None) -> str:
    """`text` up to the earliest of the `until` strings (lmms-eval's stop sequences)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _images(visuals: Any) -> list[Image.Image]:
    flat = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    images = [v for v in flat if v is not None]
    bad = [type(v).__name__ for v in images if not isinstance(v, Image.Image)]
    if bad:
        raise LMMSAdapterError(f"only images are supported as visuals, got {', '.join(sorted(set(bad)))}")
    return images


class HealthGPTLMMSCore:
    """Answers lmms-eval requests with a `HealthGPT` (anything with `answer` and `log_likelihood`)."""

    def __init__(self, model: Any, *, batch_size: int = 8, max_new_tokens: int = 128) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def generate_until(self, args: Sequence[tuple], task_dict: Mapping[str, Any]) -> list[str]:
        """`args[i] = (context, gen_kwargs, doc_to_visual, doc_id, task, split)` -> one answer each, in order.
        Requests with equal generation settings are batched together."""
        answers: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0])), []).append(i)
        for rows in groups.values():
            gen_kwargs = dict(args[rows[0]][1])
            until = gen_kwargs.pop("until", None)
            sampling = sampling_from_gen_kwargs(gen_kwargs, self.max_new_tokens)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                items = [(self._visuals(args[i], task_dict), args[i][0]) for i in chunk]
                for i, text in zip(chunk, self.model.answer(items, **sampling), strict=True):
                    answers[i] = cut_at_stop_strings(text, until)
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, args: Sequence[tuple], task_dict: Mapping[str, Any]) -> list[tuple[float, bool]]:
        """`args[i] = (context, continuation, doc_to_visual, doc_id, task, split)` -> (log-prob, is greedy)."""
        return [self.model.log_likelihood(self._visuals(a, task_dict), context=a[0], continuation=a[1]) for a in args]

    @staticmethod
    def _visuals(arg: tuple, task_dict: Mapping[str, Any]) -> list[Image.Image]:
        doc_to_visual: Callable[[Any], Any] = arg[2]
        doc_id, task, split = arg[3], arg[4], arg[5]
        return _images(doc_to_visual(task_dict[task][split][doc_id]))
