"""LoRA on CLIP's towers with peft: which layers, and the wrapped model that trains."""

from __future__ import annotations

import contextlib
import warnings

from peft import LoraConfig, get_peft_model

TOWER_PREFIX = {"vision": "vision_model", "text": "text_model"}


def lora_target_regex(towers: list[str], modules: list[str]) -> str:
    """peft ``target_modules`` regex for the chosen towers and layer names (q/k/v/out_proj, fc1, fc2)."""
    tower = "|".join(TOWER_PREFIX[t] for t in towers)
    return rf"^({tower})\.encoder\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(modules)})$"


@contextlib.contextmanager
def quiet_peft():
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning
    in every process: noise a user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(model, r: int, alpha: int, dropout: float, towers: list[str], modules: list[str], train_logit_scale: bool):
    """Wrap a ``CLIPModel`` in a ``PeftModel``; only LoRA weights (and, on request, logit_scale) train.

    No peft ``task_type``: the task wrappers assume a language model's forward and break CLIP's.
    """
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(towers, modules))
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    peft_model.get_base_model().logit_scale.requires_grad_(train_logit_scale)
    return peft_model
