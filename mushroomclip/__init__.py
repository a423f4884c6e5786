"""MushroomCLIP: fine-grained mushroom species recognition with vision-language models.

The library behind ``train.py``, ``evaluate_zero_shot.py``, ``predict.py`` and ``data_scripts/``:
taxonomy, data preparation, metrics, backbones, prompts, zero-/few-shot evaluation, losses, the LoRA
trainer and Hub publishing. ``mushroomclip.load_classifier`` and ``mushroomclip.load_splits`` are the
two entry points most users need; heavy modules load only when used.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_classifier": "mushroomclip.models.classifier",
    "load_splits": "mushroomclip.data.splits",
    "load_taxonomy": "mushroomclip.taxonomy",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mushroomclip' has no attribute {name!r}")
