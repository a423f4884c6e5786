import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mushroomclip.data.splits import load_splits
from mushroomclip.data.transforms import EvalPixels, normalize, pixel_stats
from mushroomclip.evaluation.fewshot import sample_support, simpleshot_scores
from mushroomclip.evaluation.zeroshot import EvaluationArguments, evaluate
from mushroomclip.models.backbones import load_backbone
from mushroomclip.models.prompts import templates_for
from mushroomclip.taxonomy import load_taxonomy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluated(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cfg = EvaluationArguments(
        data=str(prepared[0]),
        models="tiny-clip,tiny-openclip",
        text_type="sci,taxon_com",
        templates="single",
        output=str(out),
        shots="1,3",
        seeds=2,
        probe=True,
        num_workers=0,
    )
    rows = evaluate(cfg)
    return cfg, out, rows


def _raw_text(backbone, text: str) -> torch.Tensor:
    ids = backbone.tokenize([text])
    if backbone.kind == "hf":
        return backbone.model.get_text_features(input_ids=ids).pooler_output[0]
    return backbone.model.encode_text(ids)[0]


def _raw_image(backbone, image) -> torch.Tensor:
    pixels = normalize(EvalPixels(backbone.preprocess)(image)[None], *pixel_stats(backbone.preprocess))
    if backbone.kind == "hf":
        return backbone.model.get_image_features(pixel_values=pixels).pooler_output[0]
    return backbone.model.encode_image(pixels)[0]


@torch.no_grad()
def brute_force_top1(backbone, split, taxonomy, text_type, templates) -> list[int]:
    """One image and one prompt at a time, straight through the underlying model."""
    classes = []
    for label in taxonomy.classes:
        per_template = [
            F.normalize(_raw_text(backbone, t.format(taxonomy.text(label, text_type))), dim=0) for t in templates
        ]
        classes.append(F.normalize(torch.stack(per_template).mean(0), dim=0))
    classes = torch.stack(classes)
    return [int((classes @ F.normalize(_raw_image(backbone, image), dim=0)).argmax()) for image in split["image"]]


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-openclip"])
@pytest.mark.parametrize("text_type", ["sci", "taxon_com"])
def test_zero_shot_top1_equals_brute_force_reference(evaluated, prepared, model, text_type):
    _, out, _ = evaluated
    predictions = pd.read_parquet(out / "zero_shot" / model / text_type / "predictions.parquet")
    reference = brute_force_top1(
        load_backbone(model), load_splits(prepared[0])["test"], load_taxonomy(), text_type, templates_for("single")
    )
    assert predictions["pred"].tolist() == reference


def reference_simpleshot(support, support_labels, query):
    """SimpleShot written out directly: normalise, centre on the support mean, normalise, nearest centroid."""

    def unit(v):
        return v / np.linalg.norm(v)

    support = np.array([unit(s) for s in support])
    mean = support.mean(axis=0)
    support = np.array([unit(s - mean) for s in support])
    centroids = {c: support[support_labels == c].mean(axis=0) for c in sorted(set(support_labels))}
    predictions = []
    for q in query:
        q = unit(unit(q) - mean)
        predictions.append(min(centroids, key=lambda c: np.linalg.norm(q - centroids[c])))
    return predictions


def test_simpleshot_equals_a_direct_numpy_implementation():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 16)) + np.repeat(rng.normal(size=(6, 16)) * 2, 20, axis=0)
    labels = np.repeat([3, 7, 8, 20, 21, 40], 20)
    query, query_labels = features[::3], labels[::3]
    support = sample_support(labels, 5, seed=1)
    assert all((labels[support] == c).sum() == 5 for c in np.unique(labels))
    scores = simpleshot_scores(features[support], labels[support], query, num_classes=50)
    assert scores.argmax(1).tolist() == reference_simpleshot(features[support], labels[support], query)
    assert np.isneginf(scores[:, 0]).all()  # classes without support are never predicted
    assert (scores.argmax(1) == query_labels).mean() > 0.8


def test_output_files_have_the_documented_fields(evaluated):
    cfg, out, rows = evaluated
    for model in cfg.model_names:
        for text_type in cfg.text_types:
            folder = out / "zero_shot" / model / text_type
            record = json.loads((folder / "metrics.json").read_text())
            assert {"oa", "top5", "mf1", "miou", "rank_accuracy", "dangerous_as_edible"} <= set(record["metrics"])
            assert record["config"]["model"] == model and record["config"]["text_type"] == text_type
            assert {"seed", "versions", "git_commit", "taxonomy_sha256"} <= set(record)
            predictions = pd.read_parquet(folder / "predictions.parquet")
            assert list(predictions.columns) == [
                "source",
                "label",
                "species",
                "pred",
                "pred_species",
                "top5_ids",
                "top5_probs",
            ]
            assert len(predictions.iloc[0]["top5_ids"]) == 5 and np.all(np.diff(predictions.iloc[0]["top5_probs"]) <= 0)
            assert (folder / "confusion.png").stat().st_size > 0
        few = json.loads((out / "few_shot" / model / "k3" / "metrics.json").read_text())
        assert few["k"] == 3 and len(few["runs"]) == 2 and set(few["summary"]["miou"]) == {"mean", "std"}
        assert (out / "probe" / model / "metrics.json").is_file()
    summary, answers = (out / "summary.md").read_text().split("\n## Answers with back-off")
    assert summary.count("| tiny-clip | zero-shot |") == 2 and "| tiny-openclip | 3-shot |" in summary
    assert len(rows) == 2 * (2 + 2 + 1)
    # what predict.py would answer: a row per zero-shot head (few-shot and probe rows have no single answer)
    assert answers.count("| tiny-clip | zero-shot |") == 2 and "-shot" not in answers.replace("zero-shot", "")
    for row in rows:
        assert ("answers" in row) == (row["method"] == "zero-shot")


def test_image_features_are_cached_between_runs(evaluated, monkeypatch):
    import mushroomclip.evaluation.features as features

    cfg, out, _ = evaluated
    calls = []
    monkeypatch.setattr(features, "image_features", lambda *a, **k: calls.append(1))
    evaluate(dataclasses.replace(cfg, output=str(out)))
    assert calls == []  # every split of every model came from the cache


def test_decoding_on_the_device_gives_the_same_features_cached_apart(evaluated, prepared, monkeypatch, tmp_path):
    """--decode-on-device (issue 13): the workers only read files and each batch is decoded and preprocessed on the
    device; on the CPU (the same decoder) the features equal the default path's. The cache keeps the two apart: on
    a GPU nvJPEG's pixels can differ slightly."""
    import mushroomclip.evaluation.features as features

    cfg, out, _ = evaluated
    backbone = load_backbone("tiny-clip", device="cpu")
    split = load_splits(prepared[0])["test"]
    default, labels = features.image_features(backbone, split, batch_size=7, num_workers=0, progress=False)
    on_device, device_labels = features.image_features(
        backbone, split, batch_size=7, num_workers=1, progress=False, decode_on_device=True
    )
    np.testing.assert_array_equal(device_labels, labels)
    np.testing.assert_allclose(on_device, default, rtol=0, atol=1e-6)
    calls = []
    real = features.image_features
    monkeypatch.setattr(features, "image_features", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = dataclasses.replace(cfg, output=str(tmp_path), cache_dir=str(out / ".cache"), models="tiny-clip", shots="")
    evaluate(again)
    assert calls == []  # the default path's features, cached by the evaluated fixture
    evaluate(dataclasses.replace(again, decode_on_device=True))
    assert calls and all(k["decode_on_device"] for k in calls)  # not the default path's cached features


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate_zero_shot.py", *args], cwd=ROOT, capture_output=True, text=True)


# The flags evaluate_zero_shot.py has always had: each keeps its name (and --config its keys).
FLAGS = (
    "--config",
    "--data",
    "--split",
    "--models",
    "--text-type",
    "--templates",
    "--output",
    "--shots",
    "--seeds",
    "--probe",
    "--batch-size",
    "--num-workers",
    "--decode-on-device",
    "--device",
    "--random-weights",
    "--bootstrap",
    "--cache-dir",
    "--taxonomy",
    "--seed",
    "--include-adapters",
    "--list-models",
)


def test_every_argument_is_a_flag_and_every_flag_used_in_the_docs_exists():
    import re

    from mushroomclip.commands.evaluate import build_parser

    options = build_parser()._option_string_actions
    assert all(f"--{f.name.replace('_', '-')}" in options for f in dataclasses.fields(EvaluationArguments))
    assert set(FLAGS) <= set(options)
    pages = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    docs = "".join(page.read_text().replace("\\\n", " ") for page in pages)
    commands = re.findall(r"evaluate_zero_shot\.py([^;#>`|\n]*)", docs)  # up to the end of each command
    used = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(commands)))
    assert {"--config", "--include-adapters", "--text-type"} <= used and used <= set(options)


@pytest.mark.parametrize("name", ["zero_shot", "benchmark", "benchmark_offline"])
def test_shipped_configs_parse(name):
    from mushroomclip.commands.evaluate import parse_arguments

    args, command = parse_arguments(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    assert args.model_names and args.shot_counts == [1, 5] and args.text_types and not command.list_models


def test_config_file_sets_defaults_and_the_command_line_overrides_them(tmp_path):
    from mushroomclip.commands.evaluate import parse_arguments

    config = tmp_path / "eval.yaml"
    config.write_text("models: [tiny-clip, tiny-openclip]\ntext_type: sci\nshots: [1, 3]\nseeds: 2\nprobe: true\n")
    args, _ = parse_arguments(["--config", str(config), "--seeds", "4", "--models", "tiny-clip", "--shots", ""])
    assert (args.model_names, args.seeds, args.shot_counts) == (["tiny-clip"], 4, [])  # the command line wins
    assert (args.text_types, args.probe) == (["sci"], True)  # the file's, where no flag is given
    assert args.batch_size == EvaluationArguments.batch_size and args.output == "results"  # neither: the defaults
    args, _ = parse_arguments(["--models", "tiny-clip,tiny-openclip", "--text-type", "all", "--probe"])
    assert args.model_names == ["tiny-clip", "tiny-openclip"] and len(args.text_types) == 5 and args.probe


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modles: [tiny-clip]\n", "unknown key 'modles' in {config}; did you mean 'models'?"),
        ("text_types: all\n", "unknown key 'text_types' in {config}; did you mean 'text_type'?"),
        ("split: train\n", "--split must be one of validation, test, got 'train'"),
        ("seeds: 2.5\n", "--seeds must be int, got 2.5"),
        ("cache_dir: 5\n", "--cache-dir must be str or unset, got 5"),
        ("shots: [1, five]\n", "--shots must be comma-separated whole numbers such as 1,5, got '1,five'"),
    ],
)
def test_bad_config_values_are_one_error_line(tmp_path, capsys, text, message):
    from mushroomclip.commands.evaluate import main

    config = tmp_path / "eval.yaml"
    config.write_text(text)
    assert main(["--config", str(config), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(config=config)) and err.count("\n") == 1


def test_list_models_prints_the_registry(capsys):
    from mushroomclip.commands.evaluate import main

    assert main(["--list-models"]) == 0
    assert "tiny-clip" in capsys.readouterr().out


def test_cli_help_documents_every_flag_in_the_docs(capsys):
    import re

    from mushroomclip.commands.evaluate import main

    with pytest.raises(SystemExit) as exit:  # in this process: the subprocess's imports cost ~10 s
        main(["--help"])
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"--[a-z][a-z-]+", help_text)) - {"--help"}
    assert {"--models", "--text-type", "--templates", "--shots", "--probe", "--config"} <= flags
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    assert not [f for f in flags if f not in docs], "flags missing from docs/evaluation.md"


def test_cli_unknown_model_lists_valid_names(prepared):
    result = run_cli("--data", str(prepared[0]), "--models", "bioclip3")
    assert result.returncode == 2
    assert "unknown model 'bioclip3'; valid names: clip-b32" in result.stderr and "Traceback" not in result.stderr


def test_cli_config_file_runs_and_rejects_typos(prepared, tmp_path):
    config = tmp_path / "zs.yaml"
    config.write_text(
        f"data: {prepared[0]}\nmodels: [tiny-openclip]\ntext_type: com\ntemplates: single\n"
        f"shots: []\noutput: {tmp_path / 'res'}\nnum_workers: 0\n"
    )
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "| tiny-openclip | zero-shot | com |" in (tmp_path / "res" / "summary.md").read_text()
    # the library's messages, shown once: open_clip's logging.warning gives the root logger a handler of its own
    assert result.stdout.count("tiny-openclip zero-shot (com, single templates) on test") == 1
    assert "INFO:mushroomclip" not in result.stderr
    config.write_text("modles: [tiny-clip]\n")
    result = run_cli("--config", str(config))
    assert (
        result.returncode == 2 and "unknown key 'modles'" in result.stderr and "did you mean 'models'?" in result.stderr
    )


def test_benchmark_report_has_every_row_and_says_when_it_is_offline(evaluated):
    from mushroomclip.evaluation.benchmark import OFFLINE_NOTE, write_report

    _, out, rows = evaluated
    report = write_report(out).read_text()
    assert OFFLINE_NOTE in report
    assert "| genus acc | family acc | dangerous→edible |" in report
    table = report.split("\n## ")[0]  # the main table; the answers-with-back-off table follows it
    assert len([line for line in table.splitlines() if line.startswith("| tiny-")]) == len(rows)
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    # Bertinetto et al.'s severity-vs-error figure and the best models' risk-coverage curves, linked below the table
    assert "![severity](severity.png)" in report and "![risk_coverage](risk_coverage.png)" in report
    for name in ("severity.png", "risk_coverage.png"):
        assert (out / name).stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert all("mistake_severity" in r for r in summary)  # what the severity figure plots


def test_method_names_a_runs_loss_and_safety_settings(tmp_path):
    from mushroomclip.evaluation.zeroshot import training_label

    assert training_label(tmp_path) == ""  # no config: nothing to say
    (tmp_path / "config.yaml").write_text("loss: {name: class_text, beta: 10.0, alpha: 0.1, danger_weight: 0.0}\n")
    assert training_label(tmp_path) == ""
    (tmp_path / "config.yaml").write_text(
        "loss: {name: hierarchical_soft, beta: 10.0, alpha: 0.1, danger_weight: 1.0}\n"
    )
    assert training_label(tmp_path) == "hierarchical_soft β=10, danger_weight=1"
    (tmp_path / "config.yaml").write_text("loss: {name: hierarchical_xent, beta: 10.0, alpha: 0.5, danger_weight: 0}\n")
    assert training_label(tmp_path) == "hierarchical_xent α=0.5"
    (tmp_path / "config.yaml").write_text("loss: {name: class_text, danger_weight: 0, logit_adjust: 1.0}\n")
    assert training_label(tmp_path) == "logit_adjust τ=1"
    (tmp_path / "config.yaml").write_text("loss: {name: cross_entropy}\nrun: {max_danger: 0.001}\n")
    assert training_label(tmp_path) == "max_danger=0.001"


def test_k_shot_rows_say_how_many_images_classes_really_had(evaluated, prepared, tmp_path, caplog):
    cfg, out, _ = evaluated
    per_class = pd.read_csv(prepared[0] / "train" / "metadata.csv")["species"].value_counts()
    k, over = int(per_class.median()), int(per_class.max()) + 1  # some classes have fewer than k; none has `over`
    short = per_class[per_class < k]
    assert 0 < len(short) < len(per_class)
    rows = evaluate(
        EvaluationArguments(
            data=cfg.data,
            models="tiny-clip",
            text_type="sci",
            templates="single",
            shots=f"{k},{over}",
            seeds=2,
            output=str(tmp_path),
            cache_dir=str(out / ".cache"),
            num_workers=0,
        )
    )
    label = f"{k}-shot (k<{k} for {len(short)}/{len(per_class)} classes, min {short.min()})"
    assert [r["method"] for r in rows if "shot" in r["method"]] == ["zero-shot", label]
    record = json.loads((tmp_path / "few_shot" / "tiny-clip" / f"k{k}" / "metrics.json").read_text())
    assert record["k_used"] == {
        "min": short.min(),
        "mean": pytest.approx(per_class.clip(upper=k).mean()),
        "max": k,
        "classes_below_k": len(short),
        "classes": len(per_class),
    }
    skipped = f"tiny-clip: {over}-shot skipped: no class has {over} training images (at most {over - 1})"
    assert skipped in caplog.messages and f"> {skipped}" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "few_shot" / "tiny-clip" / f"k{over}").exists()


def test_shots_accept_ten():
    """The new-species protocol's k values are also evaluate_zero_shot.py's."""
    assert EvaluationArguments(shots="1,5,10").shot_counts == [1, 5, 10]


def test_every_result_names_the_loss_settings_a_run_trained_with():
    """The summary line, the card and the method column say danger_weight, logit_adjust, β and α, not the name alone."""
    from mushroomclip.config import describe_loss

    assert describe_loss({"name": "class_text", "danger_weight": 0.0, "logit_adjust": 0.0}) == "class_text"
    assert describe_loss({"name": "cross_entropy", "logit_adjust": 1.0}) == "cross_entropy (logit_adjust τ=1)"
    assert describe_loss({"name": "hierarchical_xent", "alpha": 0.5, "danger_weight": 2}) == (
        "hierarchical_xent (α=0.5, danger_weight=2)"
    )


def test_a_missing_image_is_the_same_one_line_error_when_decoding_on_the_device(prepared, tmp_path):
    """--decode-on-device's workers read the files: a prepared image gone since is the error of the default path,
    naming the file and the fix, not an OSError from a worker."""
    import shutil

    from mushroomclip.data.transforms import ImageError
    from mushroomclip.evaluation.features import image_batches

    data = Path(shutil.copytree(prepared[0], tmp_path / "prepared"))
    split = load_splits(data)["test"].select(range(4))
    backbone = load_backbone("tiny-clip", device="cpu")
    missing = sorted((data / "test").rglob("*.jpg"))
    for path in missing:
        path.unlink()
    for on_device in (False, True):
        with pytest.raises(ImageError, match=r"cannot read .*\.jpg \(FileNotFoundError.*prepare_kaggle\.py"):
            next(image_batches(split, backbone.preprocess, "cpu", 4, 0, decode_on_device=on_device))
