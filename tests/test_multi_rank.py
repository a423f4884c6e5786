"""Two gloo ranks on the CPU give what one process gives on the whole batch / the whole split."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mushroomclip.losses import clip_loss, multi_positive_loss

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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
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


def _gathered_loss(rank: int, loss_name: str, out: Path) -> None:
    from mushroomclip.collectives import gather_batch

    image, text, labels = (t[SHARDS[rank]].clone() for t in contrastive_batch())
    image.requires_grad_(True), text.requires_grad_(True)
    loss = LOSSES[loss_name](gather_batch(image), gather_batch(text), gather_batch(labels))
    loss.backward()
    torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad}, out / f"rank{rank}.pt")


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_gathered_loss_and_gradients_on_two_ranks_equal_one_process_on_the_whole_batch(loss_name, tmp_path):
    image, text, labels = (t.clone() for t in contrastive_batch())
    image.requires_grad_(True), text.requires_grad_(True)
    loss = LOSSES[loss_name](image, text, labels)
    loss.backward()
    run_ranks(_gathered_loss, loss_name, tmp_path)
    for rank, rows in enumerate(SHARDS):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        # DDP averages gradients over the ranks: what each rank holds, divided by WORLD, is the whole batch's.
        assert torch.allclose(got["image"] / WORLD, image.grad[rows], atol=1e-6)
        assert torch.allclose(got["text"] / WORLD, text.grad[rows], atol=1e-6)


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
