"""lmms-eval model class `healthgpt` (imported only by lmms-eval, through the `lmms_eval.models` entry point).

lmms-eval --model healthgpt --model_args pretrained=/path/to/bundle,dtype=bfloat16,device=cuda --tasks vqarad
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from healthgpt.evaluation.lmms_adapter import HealthGPTLMMSCore


def manifest() -> ModelManifest:
    """The entry-point payload lmms-eval's registry loads."""
    return ModelManifest(model_id="healthgpt", simple_class_path=f"{__name__}.HealthGPTLMMs")


class HealthGPTLMMs(lmms):
    """HealthGPT in lmms-eval: greedy or sampled answers, log-likelihoods for multiple choice."""

    def __init__(
        self,
        pretrained: str = "nano",
        batch_size: int | str = 8,
        max_new_tokens: int | str = 128,
        dtype: str = "float32",
        device: str = "cpu",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from healthgpt.api import HealthGPT

        model = HealthGPT.from_pretrained(pretrained, dtype=dtype, device=device, **kwargs)
        self.core = HealthGPTLMMSCore(model, batch_size=int(batch_size), max_new_tokens=int(max_new_tokens))

    def generate_until(self, requests) -> list[str]:
        return self.core.generate_until([r.args for r in requests], self.task_dict)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.core.loglikelihood([r.args for r in requests], self.task_dict)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round lmms-eval tasks are not supported by the HealthGPT adapter")
