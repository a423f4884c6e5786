"""The speed benchmark's arithmetic and outputs: FLOP counts, peaks, MFU, the baseline's loss, JSON and table.

No test times anything: the figures' correctness is checked, never their size.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mushroomclip.evaluation import speed


def test_flop_count_of_a_training_step_equals_the_analytic_count():
    a, b, c, batch = 16, 32, 8, 4
    model = torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c))
    x = torch.randn(batch, a)  # no gradient for the input: the first layer computes only its weight gradient

    def step(inputs):
        model(inputs).sum().backward()

    forward = 2 * batch * a * b + 2 * batch * b * c
    backward = 2 * batch * a * b + 2 * (2 * batch * b * c)  # layer 1: weight grad; layer 2: weight + input grads
    assert speed.count_flops(step, x) == forward + backward


def test_cpu_attention_is_counted_like_the_same_attention_written_as_matmuls():
    b, h, s, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))

    def fused(q, k, v):
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    def matmuls(q, k, v):
        (torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v).sum().backward()

    matmul = 2 * b * h * s * s * d  # one (s x d) @ (d x s) or (s x s) @ (s x d) per head
    with torch.no_grad():
        assert speed.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * matmul
        assert speed.count_flops(lambda: torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v) == 2 * matmul
    assert speed.count_flops(matmuls, q, k, v) == 6 * matmul
    # FlopCounterMode's flash-attention backward recomputes the scores: 5 matmuls, as on a GPU
    assert speed.count_flops(fused, q, k, v) == 7 * matmul


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA H100", None),  # SXM or PCIe? not guessed
    ],
)
def test_spec_peak_is_looked_up_by_device_name_and_never_guessed(name, tflops):
    peak, source = speed.spec_peak_tflops(name)
    assert peak == tflops
    assert (name in source) == (tflops is None)


def test_cpu_has_no_spec_peak():
    assert speed.spec_peak_tflops(None) == (None, "no spec peak for CPU")


def test_mfu_is_achieved_flops_over_each_peak():
    # 1 TFLOP per step of 10 images at 20 images/s: 2 steps/s = 2 TFLOP/s
    assert speed.efficiency(10**12, 10, 20.0, 100.0, 50.0) == pytest.approx(
        {"tflops_per_s": 2.0, "mfu_spec": 0.02, "mfu_matmul": 0.04}
    )
    assert speed.efficiency(10**12, 10, 20.0, None, 50.0)["mfu_spec"] is None


def test_baseline_loss_is_clip_loss_of_each_image_with_its_own_caption(prepared):
    from mushroomclip.data.splits import load_splits, prepared_taxonomy
    from mushroomclip.evaluation.throughput import _lora_model
    from mushroomclip.models.backbones import offline_clip_tokenizer
    from mushroomclip.training.losses import clip_loss

    backbone, peft = _lora_model("tiny-clip", "cpu", ("vision", "text"))
    peft.eval()
    split = load_splits(prepared[0])["train"]
    captions = speed.caption_dataset(
        split,
        prepared_taxonomy(prepared[0]),
        "taxon_com",
        "a photo of {}.",
        offline_clip_tokenizer(),
        backbone.preprocess,
    )
    rows = [captions[i] for i in range(0, len(split), len(split) // 6)][:6]
    batch = speed.caption_collate(rows)
    assert batch["input_ids"].shape == (6, 77) and batch["pixel_values"].shape == (6, 3, 32, 32)
    labels = [split[i]["label"] for i in range(0, len(split), len(split) // 6)][:6]
    for i in range(6):  # a caption per image, the same for images of one class
        for j in range(6):
            assert torch.equal(batch["input_ids"][i], batch["input_ids"][j]) == (labels[i] == labels[j])
    with torch.no_grad():
        loss = speed.baseline_loss(peft, batch)
        out = peft(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        expected = clip_loss(out.image_embeds, out.text_embeds, peft.get_base_model().logit_scale.exp())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_train_and_zero_shot_results_have_every_documented_field(prepared, tmp_path, capsys):
    from mushroomclip.evaluation.benchmark import main

    common = ["--data", str(prepared[0]), "--model", "tiny-clip", "--num-workers", "0", "--output", str(tmp_path)]
    assert main(["train-speed", "--batch-size", "4", "--steps", "1", *common]) == 0
    assert main(["speed", "--batch-size", "8", "--batches", "1", *common]) == 0
    # a batch other than the device's default is in the name: a BATCH=1024 lever run keeps the default run's file
    train = json.loads((tmp_path / "train-tiny-clip-vision+text-batch4-cpu.json").read_text())
    zero_shot = json.loads((tmp_path / "zero-shot-tiny-clip-batch8-cpu.json").read_text())
    assert set(speed.TRAIN_FIELDS) <= set(train) and set(speed.ZERO_SHOT_FIELDS) <= set(zero_shot)
    assert set(train["profile"]["forward_by_tower_ms"]) == {"vision", "text"}
    for result in (train, zero_shot):
        assert set(speed.MACHINE_FIELDS) <= set(result["machine"])
        assert result["spec_peak_tflops"] is None and result["spec_peak_source"] == "no spec peak for CPU"
        assert result["flops_per_step"] > 0 and result["matmul_tflops"] > 0
        assert result["model_only"]["peak_memory"]["kind"].startswith("cpu process peak RSS")
        for key in ("pipeline", "model_only"):
            eff = result[key]["efficiency"]
            assert eff["mfu_spec"] is None
            assert eff["mfu_matmul"] == pytest.approx(eff["tflops_per_s"] / result["matmul_tflops"])
    assert train["baseline"]["flops_per_step"] > 0 and "peak_memory" in train["baseline"]
    assert train["speedup_vs_baseline"] == pytest.approx(
        train["pipeline"]["images_per_s"] / train["baseline"]["images_per_s"]
    )
    assert zero_shot["split_encode"]["images"] == len(__import__("mushroomclip").load_splits(prepared[0])["train"])
    printed = capsys.readouterr().out
    assert "| bench-train | HF `run_clip.py`-style baseline" in printed and "no spec peak for CPU" in printed
    assert "profile (model only, 3 steps): a step of" in printed
    assert zero_shot["decode_on_device"] is False and "decoded_difference" not in zero_shot
    assert main(["speed", "--batch-size", "8", "--batches", "1", "--decode-on-device", *common]) == 0
    decoded = json.loads((tmp_path / "zero-shot-tiny-clip-device-decode-batch8-cpu.json").read_text())
    assert decoded["decode_on_device"] is True
    assert decoded["decoded_difference"]["max_abs"] == 0  # on the CPU: the same libjpeg-turbo as the workers
    assert "decoded on the device" in capsys.readouterr().out


def _gpu_result() -> dict:
    """A hand-made result file, as an H100 run would write it."""
    eff = {"tflops_per_s": 49.47, "mfu_spec": 0.05, "mfu_matmul": 0.07}
    memory = {"kind": "gpu max_memory_allocated", "bytes": 3 * 2**30}
    return {
        "benchmark": "bench-train",
        "model": "clip-b32",
        "device": "cuda",
        "dtype": "torch.bfloat16",
        "batch_size": 256,
        "num_workers": 16,
        "step": "training step (forward + backward)",
        "flops_per_step": 6.3e12,
        "spec_peak_tflops": 989.4,
        "spec_peak_source": "H100 SXM datasheet, dense bf16",
        "matmul_tflops": 700.0,
        "matmul_dtype": "torch.bfloat16",
        "ratio": 0.9,
        "speedup_vs_baseline": 3.0,
        "pipeline": {"images_per_s": 1800.0, "efficiency": eff},
        "model_only": {"images_per_s": 2000.0, "efficiency": eff, "peak_memory": memory},
        "baseline": {"images_per_s": 600.0, "efficiency": eff, "flops_per_step": 5e12, "peak_memory": memory},
        "loader_only": {"images_per_s": 6000.0},
        "machine": {
            "cpu": "Intel Xeon",
            "cores": 16,
            "gpu": "NVIDIA H100 80GB HBM3",
            "git_commit": "abc",
            "created": "2026-11-24T06:00:00+00:00",
        },
    }


def test_readme_speed_table_is_generated_between_its_markers_from_result_files(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "train.json").write_text(json.dumps(_gpu_result()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{speed.TABLE_START}\n| old | row |\n{speed.TABLE_END}\nafter\n")
    speed.update_readme(readme, tmp_path / "bench")
    text = readme.read_text()
    assert text.startswith("# T\n\nbefore\n") and text.endswith(f"{speed.TABLE_END}\nafter\n")
    assert "| old | row |" not in text
    rows = [line for line in text.splitlines() if line.startswith("| bench-train |")]
    assert len(rows) == 4  # model only, with data, baseline, loader alone
    assert (
        "| model only (synthetic tensors on the device) | `clip-b32`, batch 256, bfloat16, 16 workers | "
        "NVIDIA H100 80GB HBM3, 16-core Intel Xeon | 2,000 | 49.5 | 5% | 7% | 3.00 GiB" in rows[0]
    )
    assert "6,300 GFLOP per training step" in text and "3.00×" in text and "H100 SXM datasheet" in text
    speed.update_readme(readme, tmp_path / "bench")
    assert readme.read_text() == text  # regenerating changes nothing


def test_table_command_says_what_is_missing(tmp_path, capsys):
    from mushroomclip.evaluation.benchmark import main

    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert main(["table", "--readme", str(readme), "--results", str(tmp_path / "none")]) == 2
    assert "make bench-train" in capsys.readouterr().err
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "train.json").write_text(json.dumps(_gpu_result()))
    assert main(["table", "--readme", str(readme), "--results", str(tmp_path / "bench")]) == 2
    assert "bench-table:start" in capsys.readouterr().err and readme.read_text() == "# no markers\n"


def test_supervised_training_speed_is_measured_the_same_way(prepared, tmp_path, capsys):
    """bench-train for a supervised classifier: the classifier trainer's cross-entropy step, full fine-tune, every
    figure of a CLIP result but the run_clip.py baseline (a CLIP recipe)."""
    from mushroomclip.evaluation.benchmark import main

    common = ["--data", str(prepared[0]), "--num-workers", "0", "--output", str(tmp_path)]
    assert main(["train-speed", "--model", "tiny-resnet", "--batch-size", "4", "--steps", "1", *common]) == 0
    result = json.loads((tmp_path / "train-tiny-resnet-full-batch4-cpu.json").read_text())
    assert set(speed.TRAIN_FIELDS) - {"baseline", "speedup_vs_baseline"} <= set(result)
    assert "baseline" not in result and result["towers"] is None
    assert result["step"] == "training step (forward + backward), full fine-tune, cross-entropy"
    assert result["flops_per_step"] > 0 and result["model_only"]["images_per_s"] > 0
    assert "| bench-train | with the data pipeline | `tiny-resnet`" in capsys.readouterr().out


def test_the_offline_resnet_50_is_microsoft_resnet_50s_network():
    """Built from ResNetConfig's defaults: with ImageNet's 1000 classes, ResNet-50's 25,557,032 parameters."""
    from mushroomclip.models.supervised import random_classifier

    built = random_classifier("resnet-50", [f"c{i}" for i in range(1000)])
    assert sum(p.numel() for p in built.model.parameters()) == 25_557_032
    assert (built.preprocess.size, built.preprocess.resize_size) == ((224, 224), 256)


def test_an_unknown_speed_model_is_a_usage_error_naming_every_choice(prepared, capsys):
    from mushroomclip.evaluation.benchmark import main

    with pytest.raises(SystemExit) as exit_:
        main(["train-speed", "--data", str(prepared[0]), "--model", "resnet50"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown model 'resnet50'" in err and "train-speed also takes" in err
    assert "resnet-50" in err and "Traceback" not in err


def test_speed_levers_keep_the_steps_numerics(prepared):
    """Issue 13's compile and fused-AdamW levers change speed, not what is trained: the compiled loss and its LoRA
    gradients equal the eager ones, and a fused AdamW step the default one, within float tolerance (tiny-clip,
    LoRA dropout 0 so that both see the same computation)."""
    import tempfile

    from torch._dynamo.utils import counters
    from transformers import TrainingArguments

    from mushroomclip.data.splits import prepared_taxonomy
    from mushroomclip.evaluation.throughput import Levers, _train_model, step_loss

    taxonomy = prepared_taxonomy(prepared[0])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[])
    net, trainer, preprocess, _ = _train_model(
        "tiny-clip", "cpu", ("vision", "text"), taxonomy, args, Levers(lora_dropout=0.0)
    )
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.randint(0, 256, (4, 3, *preprocess.size), dtype=torch.uint8),
        "labels": torch.randint(0, len(taxonomy), (4,)),
    }
    params = [p for p in net.parameters() if p.requires_grad]

    def loss_and_grads(loss_of):
        net.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    eager, eager_grads = loss_and_grads(step_loss(trainer, net))
    counters.clear()
    compiled, compiled_grads = loss_and_grads(step_loss(trainer, net, Levers(compile=True)))
    assert counters["stats"]["unique_graphs"] >= 1  # the lever did compile
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    start = [p.detach().clone() for p in params]
    after = {}
    for fused in (False, True):
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
        step = speed.train_step(params, step_loss(trainer, net), "cpu", fused=fused)
        step(batch)
        optimizer = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.optim.AdamW))
        assert bool(optimizer.defaults["fused"]) == fused
        after[fused] = [p.detach().clone() for p in params]
    for a, b in zip(after[False], after[True], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # an update is lr = 1e-4 in size
    assert any(not torch.equal(a, s) for a, s in zip(after[True], start))  # the step did move the weights


def test_levers_are_named_in_the_file_the_record_and_the_table():
    from mushroomclip.evaluation.throughput import Levers

    assert Levers().tag() == "" and Levers(True, True, 0.0).tag() == "-compile-fused-dropout0"
    result = json.loads(json.dumps(_gpu_result()))
    result["levers"] = {"compile": True, "fused_adamw": False, "lora_dropout": 0.0}
    rows = {row.split(" | ")[1]: row for row in speed.table_rows(result)}
    assert ", compile, lora_dropout=0 |" in rows["with the data pipeline"]
    assert ", lora_dropout=0 |" in rows["HF `run_clip.py`-style baseline, with its data"]  # the same LoRA only
    assert "compile" not in rows["HF `run_clip.py`-style baseline, with its data"]
    assert Levers(bf16_base=True).tag() == "-bf16base"


def test_data_prepared_at_a_short_side_is_named_in_the_record_the_file_and_the_table(tmp_path, capsys):
    """SPEED_SHORT_SIDE (issue 13's data lever): the result says how the images were prepared, its file is not the
    default run's, and the rows fed by the data say so (model-only rows are not)."""
    from mushroomclip.data.prepare import PrepareArguments, prepare
    from mushroomclip.data.synthetic import make_synthetic_download
    from mushroomclip.evaluation.benchmark import main
    from mushroomclip.evaluation.throughput import prepared_images

    make_synthetic_download(tmp_path / "dl", classes=2, per_class=16, size=64)
    prepare(PrepareArguments(tmp_path / "dl", tmp_path / "short", short_side=48, num_proc=1, progress=False))
    assert prepared_images(tmp_path / "short") == {"max_side": 512, "short_side": 48}
    assert prepared_images(tmp_path / "nowhere") == {}
    common = ["--data", str(tmp_path / "short"), "--num-workers", "0", "--output", str(tmp_path / "bench")]
    assert main(["speed", "--model", "tiny-clip", "--batch-size", "4", "--batches", "1", *common]) == 0
    result = json.loads((tmp_path / "bench" / "zero-shot-tiny-clip-batch4-short48-cpu.json").read_text())
    assert result["prepared"] == {"max_side": 512, "short_side": 48}
    rows = {row.split(" | ")[1]: row for row in speed.table_rows(result)}
    assert ", images prepared at short side ≤48 px |" in rows["with the data pipeline"]
    assert "short side" not in rows["model only (synthetic tensors on the device)"]


def test_lora_levers_are_refused_where_there_is_no_lora(prepared, capsys):
    from mushroomclip.evaluation.benchmark import main

    for model, value, expected in (("tiny-resnet", "0", "without LoRA"), ("tiny-clip", "1.5", "must be in [0, 1)")):
        with pytest.raises(SystemExit):
            main(["train-speed", "--data", str(prepared[0]), "--model", model, "--lora-dropout", value])
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit):  # recorded but never applied, as --lora-dropout would have been
        main(["train-speed", "--data", str(prepared[0]), "--model", "tiny-resnet", "--bf16-base"])
    assert "--bf16-base: tiny-resnet is trained in full here, with no frozen base" in capsys.readouterr().err


def _tiny_clip_step(prepared, levers=None):
    """tiny-clip's benchmark training step (LoRA dropout 0 unless ``levers`` say), a fixed batch and its LoRA
    parameters."""
    import tempfile

    from transformers import TrainingArguments

    from mushroomclip.data.splits import prepared_taxonomy
    from mushroomclip.evaluation.throughput import Levers, _train_model

    taxonomy = prepared_taxonomy(prepared[0])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[])
    levers = levers or Levers(lora_dropout=0.0)
    net, trainer, preprocess, _ = _train_model("tiny-clip", "cpu", ("vision", "text"), taxonomy, args, levers)
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.randint(0, 256, (4, 3, *preprocess.size), dtype=torch.uint8),
        "labels": torch.randint(0, len(taxonomy), (4,)),
    }
    return net, trainer, batch, [p for p in net.parameters() if p.requires_grad]


def test_bf16_base_lever_holds_only_frozen_layer_weights_in_bf16_and_keeps_the_loss(prepared):
    """Issue 13's bf16-frozen-base lever: the frozen linear/conv weights are stored in bf16, LoRA's weights (what
    AdamW updates), embeddings, norms and logit_scale stay fp32; under bf16 autocast the loss and LoRA gradients
    are those of the fp32-held model (autocast rounds its weights to bf16 the same way), and the loss is within
    bf16 tolerance of the fp32 step's."""
    from mushroomclip.evaluation.throughput import Levers, step_loss

    net, trainer, batch, params = _tiny_clip_step(prepared)
    held, held_trainer, _, held_params = _tiny_clip_step(prepared, Levers(lora_dropout=0.0, bf16_base=True))
    held.load_state_dict({k: v.to(held.state_dict()[k].dtype) for k, v in net.state_dict().items()})
    dtypes = {name: p.dtype for name, p in held.named_parameters()}
    frozen_linear = [n for n in dtypes if "base_layer.weight" in n or n.endswith("patch_embedding.weight")]
    assert frozen_linear and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    assert all(p.dtype == torch.float32 for p in held_params)  # LoRA: what trains, and the optimizer's state
    for name in ("logit_scale", "position_embedding.weight", "layer_norm1.weight", "token_embedding.weight"):
        matches = [n for n in dtypes if n.endswith(name)]
        assert matches and all(dtypes[n] == torch.float32 for n in matches), name

    def loss_and_grads(model, trainer, params, autocast=True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = step_loss(trainer, model)(batch)
        loss.backward()
        return loss.detach().float(), [p.grad.clone() for p in params]

    reference, reference_grads = loss_and_grads(net, trainer, params)
    bf16_held, bf16_grads = loss_and_grads(held, held_trainer, held_params)
    fp32, _ = loss_and_grads(net, trainer, params, autocast=False)
    assert bf16_held.item() == pytest.approx(reference.item(), rel=1e-3)
    for a, b in zip(reference_grads, bf16_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-5)
    assert bf16_held.item() == pytest.approx(fp32.item(), rel=2e-2)  # bf16 has 8 significant bits


def test_profile_says_where_a_steps_time_goes(prepared):
    """The profile of ``make bench-train``: the phases add up to the step, the CLIP towers' forward times are there,
    the kinds add up to the profiler's clock, the top operators are sorted, and the hooks are gone afterwards."""
    from mushroomclip.evaluation import profiling
    from mushroomclip.evaluation.throughput import step_loss

    net, trainer, batch, params = _tiny_clip_step(prepared)
    step = speed.train_step(params, step_loss(trainer, net), "cpu")
    profile = profiling.profile_step(step, batch, "cpu", net, steps=2)
    assert set(profile["phases_ms"]) == {"forward", "backward", "optimizer"}
    assert profile["step_ms"] == pytest.approx(sum(profile["phases_ms"].values()))
    assert all(ms > 0 for ms in profile["phases_ms"].values())
    assert set(profile["forward_by_tower_ms"]) == {"vision", "text"}
    assert 0 < sum(profile["forward_by_tower_ms"].values()) < profile["clocked_ms"]
    assert sum(profile["kinds_ms"].values()) == pytest.approx(profile["clocked_ms"])
    assert profile["kinds_ms"]["matmul"] > 0 and profile["kinds_ms"]["attention"] > 0
    ms = [op["ms"] for op in profile["top_ops"]]
    assert ms == sorted(ms, reverse=True) and len(ms) <= profiling.TOP_OPS
    assert {op["kind"] for op in profile["top_ops"]} <= {k for k, _ in profiling.KINDS} | {profiling.OTHER}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    line = profiling.summary(profile)
    assert "vision tower" in line and "text tower" in line and "matmul" in line


def test_profile_of_a_gpu_step_counts_kernel_time_once(monkeypatch):
    """On a GPU (faked ``key_averages()`` entries, as Kineto gives them): an operator's share is the time of the kernels
    it launched itself, the clock is every device-side event but the annotations' GPU spans (which include idle gaps),
    and a tower's forward is its CPU-side range (the kernels of the operators inside it), not its GPU span."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from mushroomclip.evaluation import profiling

    def event(key, device_type, self_device=0.0, device_total=0.0, annotation=False, count=2):
        return SimpleNamespace(
            key=key,
            device_type=device_type,
            self_device_time_total=self_device,
            device_time_total=device_total,
            self_cpu_time_total=1.0,
            cpu_time_total=1.0,
            count=count,
            is_user_annotation=annotation,
        )

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [
        event("aten::mm", cpu, self_device=6000.0, device_total=6000.0),
        event("aten::mul", cpu, self_device=1000.0, device_total=1000.0),
        event("cudaLaunchKernel", cpu),
        event("sm90_xmma_gemm_bf16", gpu, self_device=6000.0, device_total=6000.0),
        event("elementwise_kernel", gpu, self_device=1000.0, device_total=1000.0),
        event("Memcpy HtoD", gpu, self_device=1000.0, device_total=1000.0),
        event("forward: vision tower", cpu, device_total=4000.0),
        event("forward: vision tower", gpu, self_device=9000.0, device_total=9000.0, annotation=True),
        event("step: forward", gpu, self_device=20000.0, device_total=20000.0, annotation=True),
    ]
    result = profiling.aggregate(events, cuda=True, steps=2)
    assert result["clocked_ms"] == pytest.approx(4.0)  # (6000 + 1000 + 1000) us over 2 steps
    assert result["forward_by_tower_ms"] == {"vision": pytest.approx(2.0)}  # the CPU-side range, not the 9 ms span
    assert result["kinds_ms"] == {"matmul": pytest.approx(3.0), "elementwise and other": pytest.approx(0.5)}
    assert [(op["op"], op["ms"], op["calls"]) for op in result["top_ops"]] == [
        ("aten::mm", 3.0, 1.0),
        ("aten::mul", 0.5, 1.0),
    ]
    no_kernels = [e for e in events if e.device_type == cpu]
    with pytest.raises(RuntimeError, match="recorded no GPU kernel: is CUPTI available"):
        profiling.aggregate(no_kernels, cuda=True, steps=2)


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_backward", "attention"),
        ("aten::bernoulli_", "dropout and random draws"),
        ("aten::native_layer_norm_backward", "normalisation"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::_to_copy", "copy and cast"),
        ("aten::mul", "elementwise and other"),
        ("aten::convolution_backward", "convolution"),
    ],
)
def test_profile_kinds_of_operators(op, expected):
    from mushroomclip.evaluation import profiling

    assert profiling.kind(op) == expected


def test_every_bench_gpu_run_has_the_batches_its_steady_state_needs():
    """make bench-gpu on a 16-core GPU machine with the default speed data (169 species x 130 images): every run's
    1 warm-up + 2 prefetched per worker + timed batches fit in the train split, or the run would stop with "prepare
    more images" (its leading '-' would hide that, and the figure would be missing)."""
    import re
    from pathlib import Path

    from mushroomclip.data.synthetic import _split_counts
    from mushroomclip.evaluation.throughput import _steady_state_plan

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\nbench-gpu:", 1)[1].split("\n\n", 1)[0]
    runs = [line for line in recipe.splitlines() if re.search(r"bench-(train|zero-shot)\b", line)]
    assert len(runs) >= 10
    train_images = 169 * _split_counts(130)["train"]
    for line in runs:
        settings = dict(re.findall(r"\b(BATCH|STEPS|WORKERS|ZS_BATCH|ZS_BATCHES)=(\d+)", line))
        workers = int(settings.get("WORKERS", 16))
        if "bench-train" in line:
            batch, timed = int(settings.get("BATCH", 256)), int(settings.get("STEPS", 20))  # train-speed's GPU defaults
        else:
            batch, timed = int(settings.get("ZS_BATCH", 256)), int(settings.get("ZS_BATCHES", 10))
        _steady_state_plan("speed data", "the train split", train_images // batch, batch, workers, timed, "", "")
