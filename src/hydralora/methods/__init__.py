"""Methods built on the asymmetric-LoRA idea that train in stages or with their own losses.

- LoPE (`lope`): a poisoning expert trained on generated noisy data, frozen, and masked at inference.
  "Noise-Robustness Through Noise: Asymmetric LoRA Adaption with Poisoning Expert", arXiv:2505.23868.
- ThanoRA (`thanora`): a plain LoRA whose rank is split into per-task subspaces at initialisation and kept apart
  by a regulariser; no router, so it merges and saves as a stock PEFT LoRA.
  "ThanoRA: Task Heterogeneity-Aware Multi-Task Low-Rank Adaptation", arXiv:2505.18640.
- MeTA-LoRA (`meta-lora`): per-task LoRA copies adapted on a few examples, then the shared LoRA updated with the
  query gradients aggregated across tasks (first-order meta-learning); the result is one stock PEFT LoRA.
  "MeTA-LoRA: Data-Efficient Multi-Task Fine-Tuning for Large Language Models", arXiv:2510.11598.

Each module holds the method's maths and training steps on a PEFT model; hydralora.recipes.methods connects them
to `hydralora train`.
"""

from .lope import freeze_expert, perturb_text, noisy_examples, poison_penalty, train_only_expert
from .meta_lora import meta_step, train_meta_lora
from .penalty import add_loss_penalty
from .thanora import allocate_ranks, init_task_subspaces, subspace_overlap, thanora_penalty

__all__ = [
    "add_loss_penalty",
    "allocate_ranks",
    "freeze_expert",
    "init_task_subspaces",
    "meta_step",
    "noisy_examples",
    "perturb_text",
    "poison_penalty",
    "subspace_overlap",
    "thanora_penalty",
    "train_meta_lora",
    "train_only_expert",
]
