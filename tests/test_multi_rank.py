"""Two gloo ranks on the CPU give what one process gives on the whole batch / the whole split."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mushroomclip.training.losses import clip_loss, multi_positive_loss

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SCALE = torch.tensor(5.0)


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), so parallel test runs never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn, *args) -> None:
    """``fn(rank, *args)`` in WORLD processes joined in one gloo process group."""
    mp.spawn(_init_and_run, args=(free_port(), fn, args), nprocs=WORLD, join=True)


def _init_and_run(rank: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def contrastive_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 normalised image and text embeddings (an odd batch: the ranks hold 4 and 3) with repeated labels."""
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(7, 8, generator=generator), dim=-1) for _ in range(2))
    return image, text, torch.tensor([0, 1, 1, 2, 0, 3, 1])


LOSSES = {
    "clip": lambda image, text, labels: clip_loss(image, text, SCALE),
    "multi_positive": lambda image, text, labels: multi_positive_loss(image, text, labels, SCALE),
}
SHARDS = (slice(0, 4), slice(4, 7))


def _gathered_losses(rank: int, out: Path) -> None:
    from mushroomclip.training.collectives import gather_batch

    results = {}
    for name, loss_fn in LOSSES.items():
        image, text, labels = (t[SHARDS[rank]].clone() for t in contrastive_batch())
        image.requires_grad_(True), text.requires_grad_(True)
        loss = loss_fn(gather_batch(image), gather_batch(text), gather_batch(labels))
        loss.backward()
        results[name] = {"loss": loss.detach(), "image": image.grad, "text": text.grad}
    torch.save(results, out / f"rank{rank}.pt")


def test_gathered_losses_and_gradients_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    run_ranks(_gathered_losses, tmp_path)
    for name, loss_fn in LOSSES.items():
        image, text, labels = (t.clone() for t in contrastive_batch())
        image.requires_grad_(True), text.requires_grad_(True)
        loss = loss_fn(image, text, labels)
        loss.backward()
        for rank, rows in enumerate(SHARDS):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert torch.allclose(got["loss"], loss.detach(), atol=1e-6), name
            # DDP averages gradients over the ranks: what each rank holds, divided by WORLD, is the whole batch's.
            assert torch.allclose(got["image"] / WORLD, image.grad[rows], atol=1e-6), name
            assert torch.allclose(got["text"] / WORLD, text.grad[rows], atol=1e-6), name


def test_multi_gpu_accelerate_config_takes_the_number_of_gpus_from_the_command_line():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = Path(__file__).resolve().parents[1] / "configs/accelerate/multi_gpu.yaml"
    for gpus in (2, 3, 8):  # no number in the file to edit for another machine
        args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(gpus), "x.py"])
        _validate_launch_command(args)
        assert (args.num_processes, args.multi_gpu, args.mixed_precision) == (gpus, True, "bf16")
    args = launch_command_parser().parse_args(["--config_file", str(config), "x.py"])
    with pytest.raises(ValueError, match="pass in `--num_processes`"):  # never a silently wrong count
        _validate_launch_command(args)


EVAL_IMAGES = 5  # odd: the second rank's last batch is padding that must not count


def _eval_trainer(data: Path, out: Path, loss_name: str = "class_text"):
    """The same ContrastiveTrainer (tiny-clip, LoRA on both towers, seeded) in every process."""
    from transformers import TrainingArguments

    from mushroomclip.data.splits import prepared_taxonomy
    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.lora import add_lora
    from mushroomclip.models.prompts import templates_for
    from mushroomclip.training.trainer import ContrastiveTrainer, ZeroShotEvaluator, collate

    torch.manual_seed(0)
    backbone = load_backbone("tiny-clip")
    backbone.model = add_lora(backbone.model, 4, 8, 0.0, ["vision", "text"], ["q_proj", "v_proj"], False)
    taxonomy = prepared_taxonomy(data)
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        per_device_eval_batch_size=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
    )
    evaluator = ZeroShotEvaluator(backbone, taxonomy, "sci", templates_for("single"))
    ids = backbone.tokenize(taxonomy.classes[:6])
    return ContrastiveTrainer(
        model=backbone.model,
        args=args,
        class_input_ids=ids,
        loss_name=loss_name,
        evaluator=evaluator,
        data_collator=collate,
    )


def _validation(data: Path):
    from mushroomclip.data.splits import load_splits

    return load_splits(data)["validation"].select(range(EVAL_IMAGES))


def _loss_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(6, 3, 32, 32, generator=generator), "labels": torch.tensor([0, 1, 1, 2, 0, 3])}


def _rank_metrics_and_loss(rank: int, data: Path, out: Path) -> None:
    import json

    from transformers import TrainerCallback

    from mushroomclip.metrics import to_jsonable

    class CountSteps(TrainerCallback):
        steps = 0

        def on_prediction_step(self, *args, **kwargs):
            CountSteps.steps += 1

    trainer = _eval_trainer(data, out / f"rank{rank}", "clip")
    assert trainer.args.world_size == WORLD
    trainer.add_callback(CountSteps)
    scalars = trainer.evaluate(_validation(data))
    metrics = trainer.score(_validation(data))
    inputs = {k: v[rank * 3 : rank * 3 + 3] for k, v in _loss_inputs().items()}
    loss = trainer.compute_loss(trainer.model.train(), inputs).item()
    result = {"metrics": to_jsonable(metrics), "miou": scalars["eval_miou"], "loss": loss, "steps": CountSteps.steps}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_give_exactly_the_single_process_metrics_and_contrastive_loss(prepared, tmp_path):
    import json

    from mushroomclip.metrics import to_jsonable

    trainer = _eval_trainer(prepared[0], tmp_path / "single", "clip")
    expected = to_jsonable(trainer.score(_validation(prepared[0])))
    assert expected["num_images"] == EVAL_IMAGES
    loss = trainer.compute_loss(trainer.model.train(), _loss_inputs()).item()
    run_ranks(_rank_metrics_and_loss, prepared[0], tmp_path)
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["metrics"] == expected  # every image once, padding dropped, split order kept
        assert got["miou"] == expected["miou"]  # what Trainer logs and picks the best checkpoint on
        assert got["loss"] == pytest.approx(loss, abs=1e-6)  # the clip loss over the 6 images of both ranks
        assert got["steps"] == 2 * 3  # each rank scored its share (3 one-image batches of 5), not all 5, twice


def test_torchrun_trains_two_cpu_ranks_that_agree_and_only_rank_zero_writes(prepared, tmp_path):
    from test_training import tiny_overrides

    out = tmp_path / "ddp"
    # Each rank's debug line (LoRA checksum) goes to a file of its own: a sitecustomize module sets up the logger.
    (tmp_path / "sitecustomize.py").write_text(
        "import logging, os\n"
        "if 'RANK' in os.environ:\n"
        "    logger = logging.getLogger('mushroomclip')\n"
        "    logger.setLevel(logging.DEBUG)\n"
        f"    logger.addHandler(logging.FileHandler(f'{tmp_path}/rank{{os.environ[\"RANK\"]}}.log'))\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    # The documented command for several CPU processes (gloo); --standalone picks a free port.
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        "train.py",
        "--config",
        "configs/tiny.yaml",
        *tiny_overrides(
            prepared[0],
            out,
            **{"training.max_steps": 10, "training.eval_steps": 10, "training.per_device_train_batch_size": 8},
        ),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "lora-checksum" not in output and "accelerate launch --cpu starts" not in output
    # rank 0's file also holds its progress lines (INFO): the checksum line of each rank is compared
    ranks = [
        next(
            line for line in (tmp_path / f"rank{rank}.log").read_text().splitlines() if "lora-checksum" in line
        ).split()
        for rank in range(WORLD)
    ]
    assert [words[1] for words in ranks] == ["0", "1"]  # both ranks trained ...
    assert ranks[0][2:] == ranks[1][2:], ranks  # ... to the same step, LoRA weights and val mIoU
    assert output.count("best validation mIoU") == 1  # the summary comes from rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 10 and metrics["processes"] == WORLD and metrics["precision"] == "fp32"


def _launch_env(accelerate_args: list[str], monkeypatch) -> dict[str, str]:
    """The environment ``accelerate launch ACCELERATE_ARGS train.py`` gives the process it starts."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "PMI_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*accelerate_args, "train.py"]))
    assert args.cpu  # with --cpu, accelerate's launch_command always takes its single-process launcher
    command, env = prepare_simple_launcher_cmd_env(args)
    assert command[-1] == "train.py" and "mpirun" not in command[0]  # one process, this one
    return env


@pytest.mark.parametrize(
    ("accelerate_args", "extra_env", "alone"),
    [
        (["--cpu", "--num_processes", "2"], {}, True),
        (["--cpu", "--num_processes", "3", "--num_machines", "1", "--main_process_port", "29999"], {}, True),
        (["--cpu"], {}, False),
        (["--cpu", "--num_processes", "1"], {}, False),
        (["--cpu", "--num_processes", "2"], {"PMI_SIZE": "2"}, False),  # one rank of an MPI launch
    ],
)
def test_warning_when_accelerate_starts_one_of_several_cpu_processes(
    accelerate_args, extra_env, alone, monkeypatch, caplog
):
    from mushroomclip.training import collectives

    monkeypatch.setattr(os, "environ", _launch_env(accelerate_args, monkeypatch) | extra_env)
    assert collectives.accelerate_started_one_cpu_process() is alone
    collectives.warn_if_accelerate_started_one_cpu_process()
    warnings = [r.getMessage() for r in caplog.records if r.name == collectives.__name__]
    assert len(warnings) == alone
    assert all("\n" not in line and "torchrun --standalone --nproc_per_node N" in line for line in warnings)
