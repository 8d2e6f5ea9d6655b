"""Pre-training of the components HealthGPT starts from: VQGAN, tokenizer and base LM, CLIP vision tower.

For the `nano` variant nothing pretrained exists offline, so these functions make the starting models; the same
functions fine-tune real ones (a taming VQGAN on a new modality, a CLIP tower on a user's image/caption pairs).
"""

from healthgpt.pretrain.clip import ContrastiveCLIP, linear_probe, pooled_features, pretrain_clip, retrieval_accuracy
from healthgpt.pretrain.lm import perplexity, pretrain_lm, train_tokenizer
from healthgpt.pretrain.nano import BUDGETS, NanoBudget, pretrain_nano
from healthgpt.pretrain.vqgan import evaluate_vqgan, train_vqgan

__all__ = [
    "BUDGETS",
    "ContrastiveCLIP",
    "NanoBudget",
    "evaluate_vqgan",
    "linear_probe",
    "perplexity",
    "pooled_features",
    "pretrain_clip",
    "pretrain_lm",
    "pretrain_nano",
    "retrieval_accuracy",
    "train_tokenizer",
    "train_vqgan",
]
