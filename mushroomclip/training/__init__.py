"""Training: the LoRA trainer (``trainer``), supervised classifiers (``supervised``), losses, run folders."""

# mushroomclip.config loads transformers' integrations with their import-time print silenced (under
# WANDB_MODE=offline); loaded here first, so that importing the trainers, which load transformers.Trainer, stays
# as quiet as the commands.
from mushroomclip import config as _config  # noqa: F401
