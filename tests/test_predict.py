"""Prediction and adapter evaluation: the same pixels as the metrics, no NaN adapters, no adapter in the
wrong table, and a batch of photos that survives its bad files."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mushroomclip.config import load_train_config
from mushroomclip.evaluation.zeroshot import EvaluationArguments, evaluate
from mushroomclip.models.classifier import CLASSES_FILE, AdapterError, load_classifier
from mushroomclip.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]


def species_with_images(data: Path, splits=("train",)) -> list[str]:
    """Species named in the prepared folder's metadata.csv files: an independent reading of the data."""
    return sorted(set().union(*(pd.read_csv(data / s / "metadata.csv")["species"] for s in splits)))


def patch_record(run: Path, **changes) -> None:
    path = run / CLASSES_FILE
    record = json.loads(path.read_text()) | changes
    path.write_text(json.dumps({k: v for k, v in record.items() if v is not None}))


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory) -> Path:
    """A folder of runs holding one 2-step tiny adapter, ``good``, trained on the prepared data. Read-only."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = {
        "data.path": prepared[0],
        "training.output_dir": runs / "good",
        "training.max_steps": 2,
        "training.eval_steps": 2,
        "run.test_after": False,
        "data.num_workers": 0,
    }
    run_training(load_train_config(ROOT / "configs/tiny.yaml", [f"{k}={v}" for k, v in overrides.items()]))
    record = json.loads((runs / "good" / CLASSES_FILE).read_text())
    trained = species_with_images(prepared[0])
    assert record.get("trained_species", trained) == trained  # what the trainer writes, where it does
    patch_record(runs / "good", trained_species=trained)
    return runs


@pytest.fixture(scope="module")
def classifier(runs):
    return load_classifier(str(runs / "good"))


def copy_run(runs: Path, dest: Path) -> Path:
    return Path(shutil.copytree(runs / "good", dest, ignore=shutil.ignore_patterns("checkpoints")))


@pytest.fixture
def predict_cli(capsys):
    """``predict.py ARGS`` as a user runs it, in this process (no start-up cost): (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*args):
        capsys.readouterr()
        status = script.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


# 1. An adapter with NaN weights is refused, not turned into "nan%" predictions.


def test_adapter_with_non_finite_weights_is_refused_naming_it(runs, prepared, tmp_path, predict_cli):
    from safetensors.torch import load_file, save_file

    broken = copy_run(runs, tmp_path / "diverged")
    weights = load_file(broken / "adapter_model.safetensors")
    next(iter(weights.values())).view(-1)[0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"diverged is broken: 1 weight tensor\(s\) hold NaN or inf"):
        load_classifier(str(broken))
    image = next((prepared[0] / "test").rglob("*.jpg"))
    status, out, err = predict_cli(image, "--adapter", broken)
    assert status == 2 and "nan" not in out
    assert err.startswith(f"error: {broken} is broken") and len(err.splitlines()) == 1


# 2. A photo is scored as evaluation scores it: upright, through the same pixels.


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize("given_as", ["path", "pil"])
def test_photo_stored_rotated_with_exif_orientation_scores_exactly_like_the_upright_one(classifier, tmp_path, given_as):
    from mushroomclip.data.transforms import decode_rgb

    sensor = Image.new("RGB", (48, 32), (40, 90, 40))
    sensor.paste((230, 60, 20), (4, 4, 20, 28))  # something off-centre, so sideways crops differ
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held sideways: rotate 90 degrees clockwise to display
    (tmp_path / "rotated.jpg").write_bytes(_jpeg(sensor, exif=exif))
    (tmp_path / "plain.jpg").write_bytes(_jpeg(sensor))  # the same pixels, without the tag
    # the upright photo, lossless: the plain JPEG as the same decoder reads it, turned clockwise
    if given_as == "path":
        upright = torch.rot90(decode_rgb(tmp_path / "plain.jpg"), k=-1, dims=(1, 2))  # torchvision decodes paths
        Image.fromarray(upright.permute(1, 2, 0).numpy()).save(tmp_path / "upright.png")
    else:
        Image.open(tmp_path / "plain.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270).save(
            tmp_path / "upright.png"
        )

    def logits(name):
        path = tmp_path / name
        return classifier.logits([path if given_as == "path" else Image.open(path)])

    assert torch.equal(logits("rotated.jpg"), logits("upright.png"))
    assert not torch.equal(logits("plain.jpg"), logits("upright.png"))  # sideways would be noticed


def test_predict_scores_each_file_exactly_as_the_evaluation_pipeline(classifier, runs, prepared, predict_cli):
    from datasets import Image as ImageFeature

    from mushroomclip.data.splits import load_splits
    from mushroomclip.evaluation.features import image_features
    from mushroomclip.evaluation.zeroshot import zero_shot_scores

    split = load_splits(prepared[0])["test"].select(range(12))
    features, _ = image_features(classifier.backbone, split, batch_size=12, num_workers=0, progress=False)
    expected = zero_shot_scores(features, classifier.class_embeddings, classifier.backbone.logit_scale)
    paths = [cell["path"] for cell in split.cast_column("image", ImageFeature(decode=False))["image"]]
    torch.testing.assert_close(classifier.logits(paths), torch.from_numpy(expected), rtol=0, atol=1e-5)
    # and the CLI prints those very probabilities
    status, out, err = predict_cli(paths[0], "--adapter", runs / "good", "--top-k", "3", "--format", "json")
    assert status == 0, err
    probs = torch.from_numpy(expected[0]).softmax(0).topk(3)
    [record] = json.loads(out)
    assert [p["species"] for p in record["predictions"]] == [classifier.classes[i] for i in probs.indices]
    assert [p["probability"] for p in record["predictions"]] == pytest.approx(probs.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-openclip"])
def test_a_photo_reaches_the_model_as_the_same_pixels_in_the_metrics_and_in_prediction(model, tmp_path, monkeypatch):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    from mushroomclip.evaluation.features import image_features
    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.classifier import Classifier
    from mushroomclip.taxonomy import load_taxonomy

    sensor = Image.new("RGB", (90, 60), (40, 90, 40))
    sensor.paste((230, 60, 20), (4, 4, 30, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # taken sideways: the upright photo is 60 x 90
    (tmp_path / "photo.jpg").write_bytes(_jpeg(sensor, exif=exif))
    sensor.convert("RGBA").save(tmp_path / "photo.png")
    paths = [str(tmp_path / "photo.jpg"), str(tmp_path / "photo.png")]
    backbone, taxonomy = load_backbone(model), load_taxonomy()
    record = {"species": taxonomy.classes, "text_type": "sci", "templates": ["a photo of {}."]}
    classifier = Classifier(backbone, record, taxonomy)  # what predict.py and the app score with
    seen = []

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:  # what reaches the model
        seen.append(pixels.clone())
        return torch.zeros(len(pixels), classifier.class_embeddings.shape[1])

    monkeypatch.setattr(backbone, "encode_images", encode_images)
    split = Dataset.from_dict({"image": paths, "label": [0, 1]}).cast_column("image", ImageFeature())
    image_features(backbone, split, batch_size=2, num_workers=0, progress=False)  # the metrics' path
    classifier.logits(paths)  # predict.py's path
    metrics, prediction = seen
    assert metrics.dtype == torch.uint8 and metrics.shape == (2, 3, 32, 32)
    assert torch.equal(metrics, prediction)


# 6. --include-adapters takes a run only where it was trained on exactly this data's species.


def test_include_adapters_takes_only_runs_trained_on_the_datas_species(runs, prepared, tmp_path, caplog):
    from mushroomclip.taxonomy import load_taxonomy

    folder = tmp_path / "runs"
    copy_run(runs, folder / "same")
    wider = load_taxonomy().classes[:46]
    patch_record(copy_run(runs, folder / "wider"), trained_species=wider)
    patch_record(copy_run(runs, folder / "older"), trained_species=None)  # before trained_species was recorded
    (copy_run(runs, folder / "unfinished") / "adapter_config.json").unlink()
    rows = evaluate(
        EvaluationArguments(
            data=str(prepared[0]),
            models="",
            include_adapters=str(folder),
            shots="",
            output=str(tmp_path / "res"),
            num_workers=0,
        )
    )
    assert [(r["model"], r["method"]) for r in rows] == [("lora-same", "LoRA")]
    skipped = [line for line in caplog.messages if line.startswith("skipped ")]
    assert skipped == [
        f"skipped {folder / 'older'}: its classes.json does not say which species it was trained on "
        "(trained_species: an older run)",
        f"skipped {folder / 'unfinished'}: no adapter_config.json (an unfinished run?)",
        f"skipped {folder / 'wider'}: trained on 46 species, this data has 6 "
        f"({len(set(wider) & set(species_with_images(prepared[0])))} in common)",
    ]
    summary = (tmp_path / "res" / "summary.md").read_text()
    assert all(f"> {line}" in summary for line in skipped)
    # named in --models, a run is evaluated as asked, with the mismatch said above the table
    rows = evaluate(
        EvaluationArguments(
            data=str(prepared[0]),
            models=f"lora:{folder / 'wider'}",
            shots="",
            output=str(tmp_path / "named"),
            num_workers=0,
        )
    )
    assert [r["model"] for r in rows] == ["lora-wider"]
    assert (
        f"> lora:{folder / 'wider'}: {skipped[-1].split(': ', 1)[1]}; evaluated because --models names it"
        in (tmp_path / "named" / "summary.md").read_text()
    )


def test_adapter_for_other_classes_is_a_clear_error_not_a_shape_error(runs, prepared, tmp_path, caplog):
    from mushroomclip.taxonomy import load_taxonomy

    # an adapter whose own table lists only the 6 species it was trained on
    narrow = copy_run(runs, tmp_path / "runs" / "narrow")
    trained = species_with_images(prepared[0])
    lines = (narrow / "taxonomy.csv").read_text().splitlines(keepends=True)
    (narrow / "taxonomy.csv").write_text(
        lines[0] + "".join(line for line in lines[1:] if line.split(",")[0] in trained)
    )
    patch_record(narrow, species=trained, taxonomy_sha256=load_taxonomy(narrow / "taxonomy.csv").fingerprint)
    assert load_classifier(str(narrow)).classes == trained  # a sound adapter, for other classes
    cfg = EvaluationArguments(
        data=str(prepared[0]), models=f"lora:{narrow}", shots="", output=str(tmp_path / "res"), num_workers=0
    )
    with pytest.raises(
        AdapterError, match=rf"{narrow} was trained on other classes \(6 species, this data's taxonomy has 169"
    ):
        evaluate(cfg)
    evaluate(dataclasses.replace(cfg, models="", include_adapters=str(narrow.parent)))
    assert f"skipped {narrow}: its 6 classes are not this data's 169-species taxonomy" in caplog.messages


# 14 and 16. predict.py: arguments checked first, folders expanded, bad files reported, the rest predicted.


def test_top_k_below_one_is_one_line_before_anything_loads(predict_cli):
    assert predict_cli("photo.jpg", "--adapter", "runs/none", "--top-k", "0") == (
        2,
        "",
        "error: --top-k must be at least 1, got 0\n",
    )


def test_a_folder_of_photos_is_predicted_despite_its_bad_files(runs, prepared, tmp_path, predict_cli):
    from test_augment import png_claiming

    photos = tmp_path / "photos"
    good = sorted((prepared[0] / "test").rglob("*.jpg"))[:2]
    (photos / "day2").mkdir(parents=True)
    shutil.copy(good[0], photos / "a.jpg")
    shutil.copy(good[1], photos / "day2" / "b.jpg")
    (photos / "notes.jpg").write_text("not a photo")
    (photos / "cut.jpg").write_bytes(good[0].read_bytes()[:200])
    (photos / "bomb.png").write_bytes(png_claiming(20000, 20000))
    status, out, err = predict_cli(photos, "missing.jpg", "--adapter", runs / "good", "--format", "json")
    assert status == 1 and "Traceback" not in err
    assert [r["image"] for r in json.loads(out)] == [str(photos / "a.jpg"), str(photos / "day2" / "b.jpg")]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: cannot read image missing.jpg: no such file or folder"
    assert errors[1].startswith(f"error: cannot read image {photos / 'bomb.png'}: 400000000 pixels: over Pillow's")
    assert errors[2].startswith(f"error: cannot read image {photos / 'cut.jpg'}: ")
    assert (
        errors[3]
        == f"error: cannot read image {photos / 'notes.jpg'}: not an image file, or a format Pillow cannot read"
    )
    assert errors[4:] == ["error: 4 of 6 inputs could not be read (see above)"]
    status, out, err = predict_cli(photos / "notes.jpg", photos / "bomb.png", "--adapter", runs / "good")
    assert status == 2 and out == "" and err.splitlines()[-1] == "error: 2 of 2 inputs could not be read (see above)"


def test_a_folder_becomes_one_csv_row_per_input_with_the_safety_answer(runs, prepared, tmp_path, predict_cli):
    import pandas as pd

    from mushroomclip.prediction.answer import Thresholds, answer

    photos = tmp_path / "photos"
    photos.mkdir()
    good = sorted((prepared[0] / "test").rglob("*.jpg"))[:3]
    for i, path in enumerate(good):
        shutil.copy(path, photos / f"{i}.jpg")
    (photos / "notes.jpg").write_text("not a photo")
    status, _, err = predict_cli(photos, "missing.jpg", "--adapter", runs / "good", "--csv", tmp_path / "a.csv")
    assert status == 1 and "Traceback" not in err
    table = pd.read_csv(tmp_path / "a.csv", keep_default_na=False)
    assert len(table) == 5  # every input has its row, unreadable ones included
    failed = table[table["error"] != ""]
    assert sorted(failed["image"]) == ["", str(photos / "notes.jpg")]
    assert "missing.jpg" in " ".join(failed["error"])
    # each readable photo's row is the answer logic applied to the classifier's own probabilities
    classifier = load_classifier(str(runs / "good"))
    probs = classifier.logits([photos / f"{i}.jpg" for i in range(3)]).softmax(dim=-1).double().numpy()
    for i in range(3):
        row = table[table["image"] == str(photos / f"{i}.jpg")].iloc[0]
        expected = answer(classifier.classes, probs[i], classifier.taxonomy, Thresholds(), k=5)
        assert (row["answer"], row["kind"], row["warning"]) == (
            expected.headline,
            expected.kind,
            expected.warning or "",
        )
        assert row["top_species"].split(";") == [r.species for r in expected.rows]
        assert row["thresholds"] == "species 0.5, genus 0.8, family 0.8"  # which thresholds gave this answer
        assert row["thresholds_source"].startswith("documented defaults")


def test_a_csv_path_that_cannot_be_written_is_one_line_before_any_prediction(runs, prepared, tmp_path, predict_cli):
    image = next((prepared[0] / "test").rglob("*.jpg"))
    for target, expected in (
        (tmp_path / "missing" / "a.csv", "does not exist; create it"),
        (tmp_path, "is a folder; name a file"),
    ):
        status, out, err = predict_cli(image, "--adapter", runs / "good", "--csv", target)
        assert status == 2 and out == "" and err.startswith(f"error: --csv {target}: ")
        assert expected in err and len(err.splitlines()) == 1


def test_the_table_and_json_give_each_photo_the_answer_with_its_warning(runs, prepared, predict_cli):
    """Not only the ranked list: the abstaining / back-off answer of --csv and the app, below each photo's rows."""
    from mushroomclip.prediction.answer import Thresholds, answer

    photos = sorted((prepared[0] / "test").rglob("*.jpg"))[:4]
    classifier = load_classifier(str(runs / "good"))
    probs = classifier.logits(photos).softmax(dim=-1).double().numpy()
    expected = [answer(classifier.classes, p, classifier.taxonomy, Thresholds(), k=5) for p in probs]
    status, out, _ = predict_cli(*photos, "--adapter", runs / "good")
    assert status == 0
    assert out.splitlines()[0].startswith(
        "answers: a species from 50%; else the most probable genus from 80% or family from 80% (summed); else not sure"
    )
    assert [line[len("  -> ") :] for line in out.splitlines() if line.startswith("  -> ")] == [
        a.headline for a in expected
    ]
    status, out, _ = predict_cli(*photos, "--adapter", runs / "good", "--format", "json")
    records = json.loads(out)
    assert [r["answer"] for r in records] == [
        {
            "kind": a.kind,
            "text": a.headline,
            "warning": a.warning,
            "thresholds": {"species": 0.5, "genus": 0.8, "family": 0.8, "unknown": None, "source": a.thresholds.source},
        }
        for a in expected
    ]
    assert records[0]["answer"]["thresholds"]["source"].startswith("documented defaults")


def test_the_benchmarks_answers_row_counts_what_predict_answers(runs, prepared, tmp_path, predict_cli):
    """evaluate's "answers with back-off" (species named / genus / family / abstained) is what predict.py --csv
    answers for every test photo, with the run's own recorded thresholds."""
    import pandas as pd

    from mushroomclip.evaluation.selective import LEVELS

    run = copy_run(runs, tmp_path / "runs" / "good")
    photos = sorted((prepared[0] / "test").rglob("*.jpg"))
    top = np.sort(load_classifier(str(run)).logits(photos).softmax(dim=-1).max(dim=-1).values.double().numpy())
    between = lambda q: float(top[int(q * len(top))] + top[int(q * len(top)) + 1]) / 2  # noqa: E731 (no ties)
    recorded = {"species": between(0.7), "genus": between(0.4), "family": between(0.2)}
    (run / "metrics.json").write_text(json.dumps({"thresholds": recorded}))
    status, _, _ = predict_cli(prepared[0] / "test", "--adapter", run, "--csv", tmp_path / "a.csv")
    assert status == 0
    kinds = pd.read_csv(tmp_path / "a.csv", keep_default_na=False)["kind"]
    args = EvaluationArguments(
        data=str(prepared[0]), models="", include_adapters=str(tmp_path / "runs"), shots="", output=str(tmp_path / "r")
    )
    [row] = evaluate(dataclasses.replace(args, num_workers=0))
    answers = row["answers"]
    assert {k: answers["thresholds"][k] for k in recorded} == recorded and answers["images"] == len(kinds)
    for level in LEVELS:
        assert answers[level]["share"] == pytest.approx((kinds == level).mean()), level
    assert answers["abstained"] == pytest.approx(kinds.isin(["not_sure", "unknown"]).mean())
    assert answers["species"]["share"] > 0 and answers["abstained"] > 0
    assert answers["genus"]["share"] > 0 and answers["family"]["share"] > 0  # every level was compared
    assert "## Answers with back-off" in (tmp_path / "r" / "summary.md").read_text()


def test_a_broken_adapter_among_the_runs_is_skipped_not_fatal_to_the_table(runs, prepared, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "runs"
    copy_run(runs, folder / "lora-good")  # a folder named for its kind keeps its name: not lora-lora-good
    copy_run(runs, folder / "good")  # lora-good too: it must not share the other's output folder
    broken = copy_run(runs, folder / "nan")
    weights = load_file(broken / "adapter_model.safetensors")
    next(iter(weights.values())).view(-1)[0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    rows = evaluate(
        EvaluationArguments(
            data=str(prepared[0]),
            models="",
            include_adapters=str(folder),
            shots="",
            output=str(tmp_path / "res"),
            num_workers=0,
        )
    )
    assert [r["model"] for r in rows] == ["lora-good", "lora-good-2"]
    assert (tmp_path / "res/zero_shot/lora-good-2").is_dir() and "is already in the table" in caplog.text
    assert any(line.startswith(f"skipped {broken}: ") and "NaN or inf" in line for line in caplog.messages)
    assert f"> skipped {broken}: " in (tmp_path / "res" / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_device_this_machine_lacks_is_one_line(runs, prepared, predict_cli):
    image = next((prepared[0] / "test").rglob("*.jpg"))
    for device, expected in (("cuda", "no CUDA GPU is available here"), ("gpu0", "--device gpu0")):
        status, out, err = predict_cli(image, "--adapter", runs / "good", "--device", device)
        assert status == 2 and out == "" and len(err.splitlines()) == 1 and expected in err


def test_the_thresholds_line_says_what_an_open_set_threshold_changes():
    from mushroomclip.commands.predict import thresholds_line
    from mushroomclip.prediction.answer import Thresholds

    line = thresholds_line(Thresholds(unknown=0.7, source="test"))
    assert line.startswith("answers: a species from 70% (the open-set threshold); else the most probable genus")
    assert "else possibly not one of the known species below 70%, else not sure — thresholds: test" in line
