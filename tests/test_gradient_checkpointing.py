"""training.activation_checkpointing: the same loss and LoRA gradients, with each layer's forward run twice."""

import torch
import torch.nn.functional as F

from mushroomclip.config import load_train_config
from mushroomclip.models.backbones import load_backbone
from mushroomclip.models.lora import add_lora
from mushroomclip.training.trainer import trainer_arguments


def _loss_and_lora_grads(checkpointing_kwargs: dict | None) -> tuple[torch.Tensor, dict, int]:
    """One forward/backward of a class-text loss through tiny CLIP + LoRA on both towers; also how often the
    last vision layer's first layer norm ran forward."""
    backbone = load_backbone("tiny-clip")
    torch.manual_seed(0)
    model = add_lora(backbone.model, 4, 8, 0.0, ["vision", "text"], ["q_proj", "v_proj", "fc1"], False)
    for name, param in model.named_parameters():  # LoRA's B starts at zero: make every gradient non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    if checkpointing_kwargs is not None:  # what Trainer.train does with TrainingArguments.activation_checkpointing
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    model.train()
    calls = []
    model.get_base_model().vision_model.encoder.layers[-1].layer_norm1.register_forward_hook(lambda *_: calls.append(1))
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = backbone.tokenize(["Amanita muscaria", "Boletus edulis", "Cantharellus cibarius"])
    clip = model.get_base_model()
    images = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    texts = F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
    loss = F.cross_entropy(clip.logit_scale.exp() * images @ texts.T, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads, len(calls)


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # trainer_arguments sets it
    cfg = load_train_config(None, ["model.base=tiny-clip", "training.activation_checkpointing=true"])
    args = trainer_arguments(cfg.training, tmp_path)
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}

    loss, grads, calls = _loss_and_lora_grads(None)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_lora_grads(args.activation_checkpointing_kwargs)
    assert (calls, calls_ckpt) == (1, 2)  # checkpointing is really on: the layer is recomputed in backward
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-7)
    assert (
        set(grads) == set(grads_ckpt)
        and any("vision_model" in n for n in grads)
        and any("text_model" in n for n in grads)
    )
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-6, atol=1e-8), name


def test_gradient_checkpointing_is_off_by_default_and_on_in_the_bioclip2_config(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not trainer_arguments(load_train_config(None).training, tmp_path).activation_checkpointing
    config = Path(__file__).parents[1] / "configs/lora_bioclip2.yaml"
    assert load_train_config(config).training.activation_checkpointing is True
    # transformers' deprecated name still works (its alias) and is also a key that may change on --resume
    assert load_train_config(None, ["training.gradient_checkpointing=true"]).training.activation_checkpointing


def test_a_run_may_be_resumed_with_gradient_checkpointing_switched(tmp_path):
    """Checkpointing changes memory, not results: after an out-of-memory stop, --resume may turn it on."""
    import yaml

    from mushroomclip.training.runs import CHECKPOINT_CONFIG, check_run_folder

    checkpoint = tmp_path / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / CHECKPOINT_CONFIG).write_text(yaml.safe_dump(load_train_config(None).to_dict()))
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        config = load_train_config(None, [f"training.{key}=true"]).to_dict()
        check_run_folder(tmp_path, config, resume=True, overwrite=False)  # no RunFolderError
