"""MushroomCLIP: fine-grained mushroom species recognition with vision-language models.

The library behind ``train.py``, ``evaluate_zero_shot.py`` and ``data_scripts/``: taxonomy, data
preparation, metrics and (in later modules) models, prompts, losses and the LoRA trainer.
"""

__version__ = "0.1.0"
