"""A run on a converted BioCLIP folder loads on a machine that never saw that folder, and publishes no local path.

The base is converted from an offline fake Hub cache of imageomics/bioclip (tiny random weights); the run is
moved away and the converted folder deleted, so only the recorded recipe can bring the base back.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from fake_hub import TINY_BIOCLIP_MODEL_CFG, open_clip_files, use_offline_cache, write_snapshot
from PIL import Image

from mushroomclip.commands.convert import main as convert_main
from mushroomclip.config import ConfigError, load_train_config
from mushroomclip.hub import PushError, push_run
from mushroomclip.models.classifier import AdapterError, load_classifier
from mushroomclip.models.convert import RECIPE_FILE, converted_cache
from mushroomclip.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [Image.new("RGB", (40, 30), color) for color in ((180, 120, 40), (30, 90, 160), (220, 220, 200))]


class FakeApi:
    """Records what a push would upload: each uploaded file's text (binary files by name only)."""

    def __init__(self):
        self.files: dict[str, str | None] = {}
        self.repo = None

    def create_repo(self, repo_id, **kwargs):
        self.repo = repo_id
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, allow_patterns=None, **kwargs):
        for path in Path(folder_path).iterdir():
            if allow_patterns is None or path.name in allow_patterns:
                text = path.read_bytes().decode("utf-8", errors="replace") if path.suffix != ".png" else None
                self.files[path.name] = text


@pytest.fixture(scope="module")
def world(prepared, tmp_path_factory):
    """An offline fake Hub cache with imageomics/bioclip, a private HF_HOME, and the base converted into
    ``models/bioclip-hf`` as the README's command does."""
    root = tmp_path_factory.mktemp("portable")
    base_temp = tmp_path_factory.getbasetemp()  # holds this machine's paths of the run, data and models
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf_home"))
        cache = use_offline_cache(mp, root / "hub")
        write_snapshot(
            cache, "imageomics/bioclip", open_clip_files(TINY_BIOCLIP_MODEL_CFG, 0, "open_clip_pytorch_model.bin")
        )
        base = root / "models" / "bioclip-hf"
        assert convert_main(["--model", "bioclip", "--output", str(base)]) == 0
        yield base_temp, base, cache, prepared[0]


def train(world, name: str, base: Path, **extra) -> Path:
    _, converted, _, data = world
    out = converted.parents[1] / "runs" / name
    values = {
        "model.base": base,
        "data.path": data,
        "training.output_dir": out,
        "training.max_steps": 3,
        "training.eval_steps": 3,
        "training.logging_steps": 1,
        "data.num_workers": 0,
    } | extra
    run_training(load_train_config(ROOT / "configs/tiny.yaml", [f"{k}={v}" for k, v in values.items()]))
    return out


@pytest.fixture(scope="module")
def converted_run(world):
    return train(world, "on-converted", world[1])


def test_a_run_on_a_converted_folder_records_its_source_not_the_folder(world, converted_run):
    record = json.loads((converted_run / "classes.json").read_text())
    recipe = json.loads((world[1] / RECIPE_FILE).read_text())
    assert record["base_model"] == "convert:hf-hub:imageomics/bioclip"
    assert record["base_conversion"] == recipe and recipe["weights"].startswith("commit ")
    adapter = json.loads((converted_run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "convert:hf-hub:imageomics/bioclip"


def test_moved_run_loads_with_identical_logits_after_the_converted_folder_is_deleted(world, converted_run, tmp_path):
    from safetensors.torch import load_file

    root, base, _, _ = world
    before = load_classifier(str(converted_run)).logits(IMAGES)
    [remade] = list(converted_cache().iterdir())  # the base re-created from the recipe, once
    local, again = load_file(base / "model.safetensors"), load_file(remade / "model.safetensors")
    assert local.keys() == again.keys() and all(torch.equal(local[k], again[k]) for k in local)

    moved = Path(shutil.copytree(converted_run, tmp_path / "elsewhere" / "run"))
    hidden = Path(shutil.move(base, tmp_path / "hidden"))  # the converted folder is gone ...
    shutil.rmtree(converted_cache())  # ... and so is the cached re-conversion
    try:
        after = load_classifier(str(moved)).logits(IMAGES)
        assert torch.equal(before, after) and torch.isfinite(after).all()
        assert len(list(converted_cache().iterdir())) == 1  # converted on demand again, from the Hub cache
        IMAGES[0].save(tmp_path / "photo.png")
        spec = importlib.util.spec_from_file_location("predict_script", ROOT / "predict.py")
        predict = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(predict)
        assert predict.main([str(tmp_path / "photo.png"), "--adapter", str(moved), "--format", "json"]) == 0
    finally:
        shutil.move(hidden, base)


def _pushed(run: Path, repo: str) -> FakeApi:
    api = FakeApi()
    push_run(run, repo, api=api)
    return api


def _assert_no_local_path(api: FakeApi, root: Path) -> None:
    for name, text in api.files.items():
        if text is not None:
            assert str(root) not in text and "models/" not in text and "REPO_OR_FOLDER" not in text, name
            assert "huggingface-cli" not in text, name


def _snippets(card: str) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", card, flags=re.S))


def test_pushed_files_hold_no_local_path_and_the_card_snippet_runs_as_written(world, converted_run, tmp_path):
    from huggingface_hub import ModelCard

    root, base = world[0], world[1]
    run = Path(shutil.copytree(converted_run, tmp_path / "on-converted"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["command"] = f"train.py --config {root}/my.yaml model.base={base} training.output_dir={run}"
    (run / "metrics.json").write_text(json.dumps(metrics))
    api = _pushed(run, "someone/mushroomclip-bioclip")
    assert {"adapter_config.json", "classes.json", "config.yaml", "data.json", "metrics.json", "README.md"} <= set(
        api.files
    )
    _assert_no_local_path(api, root)
    assert json.loads(api.files["metrics.json"])["command"] == (
        "train.py --config my.yaml model.base=convert:hf-hub:imageomics/bioclip training.output_dir=on-converted"
    )
    card = ModelCard(api.files["README.md"])
    assert card.data.base_model == "imageomics/bioclip" and card.data.license == "mit"
    assert "https://huggingface.co/imageomics/bioclip" in card.text
    code = _snippets(card.text)
    assert 'load_classifier("someone/mushroomclip-bioclip")' in code and "CLIPModel" not in code
    moved = Path(shutil.copytree(converted_run, tmp_path / "from-the-hub"))
    namespace: dict = {}
    exec(code.replace("someone/mushroomclip-bioclip", str(moved)), namespace)  # noqa: S102 - the card's own code
    expected = load_classifier(str(converted_run)).logits(IMAGES)
    assert torch.equal(namespace["classifier"].logits(IMAGES), expected)
    # the local card stays usable: it names no repo yet
    assert "REPO_OR_FOLDER" in (converted_run / "README.md").read_text()


@pytest.fixture(scope="module")
def hub_id_run(world):
    """The converted folder published as someone/bioclip-hf (a fake cache snapshot) and named by model.base_hub_id."""
    _, base, cache, _ = world
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    write_snapshot(cache, "someone/bioclip-hf", files)
    return train(world, "on-hub-id", base, **{"model.base_hub_id": "someone/bioclip-hf"})


def test_a_hub_id_base_is_recorded_and_its_card_snippets_run_without_the_local_folder(world, hub_id_run, tmp_path):
    from huggingface_hub import ModelCard

    root, base, _, _ = world
    record = json.loads((hub_id_run / "classes.json").read_text())
    assert record["base_model"] == "someone/bioclip-hf"
    assert (
        json.loads((hub_id_run / "adapter_config.json").read_text())["base_model_name_or_path"] == "someone/bioclip-hf"
    )
    api = _pushed(hub_id_run, "someone/mushroomclip-bioclip-hub")
    _assert_no_local_path(api, root)
    card = ModelCard(api.files["README.md"])
    assert card.data.base_model == "someone/bioclip-hf" and card.data.license == "mit"  # the converted source's
    code = _snippets(card.text)
    assert 'CLIPModel.from_pretrained("someone/bioclip-hf")' in code and "load_classifier(" in code
    moved = Path(shutil.copytree(hub_id_run, tmp_path / "run"))
    hidden = Path(shutil.move(base, tmp_path / "hidden"))
    try:
        namespace: dict = {}
        exec(code.replace("someone/mushroomclip-bioclip-hub", str(moved)), namespace)  # noqa: S102
    finally:
        shutil.move(hidden, base)
    expected = load_classifier(str(hub_id_run)).logits(IMAGES)
    assert torch.equal(namespace["classifier"].logits(IMAGES), expected)
    assert type(namespace["model"]).__name__ == "PeftModel"


def test_a_folder_without_recipe_is_refused_at_push_and_is_a_clear_error_elsewhere(world, tmp_path):
    root, base, _, _ = world
    plain = Path(shutil.copytree(base, tmp_path / "models" / "plain-hf"))
    (plain / RECIPE_FILE).unlink()  # a folder of unknown origin
    run = train(world, "on-plain-folder", plain)
    assert json.loads((run / "classes.json").read_text())["base_model_is_folder"] is True
    assert "license" not in (run / "README.md").read_text().split("---")[1]  # unknown origin: no license claimed
    api = FakeApi()
    with pytest.raises(PushError, match="local model folder .*plain-hf.*mushroomclip.models.convert") as info:
        push_run(run, "someone/nope", api=api)
    assert "\n" not in str(info.value) and api.files == {} and api.repo is None
    with pytest.raises(ConfigError, match="hub.push: model.base .*plain-hf is a local folder"):
        load_train_config(None, [f"model.base={plain}", "hub.push=true", "hub.repo_id=someone/nope"])
    shutil.rmtree(plain)
    with pytest.raises(AdapterError, match="local model folder .*plain-hf.* not on this machine"):
        load_classifier(str(run))


def test_base_hub_id_must_be_a_repo_id():
    with pytest.raises(ConfigError, match="model.base_hub_id must be a Hub repo id"):
        load_train_config(None, ["model.base_hub_id=models/bioclip-hf/"])


def test_convert_push_to_hub_publishes_the_folder_with_a_card_crediting_the_source(world, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    out = tmp_path / "bioclip-hf"
    assert convert_main(["--model", "bioclip", "--output", str(out), "--push-to-hub", "someone/bioclip-hf"]) == 0
    assert api.repo == "someone/bioclip-hf"
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        RECIPE_FILE,
        "README.md",
    } <= set(api.files)
    card = ModelCard(api.files["README.md"])
    assert card.data.license == "mit" and card.data.base_model == "imageomics/bioclip"
    assert "https://huggingface.co/imageomics/bioclip" in card.text and "MIT" in card.text
    assert 'from_pretrained("someone/bioclip-hf")' in card.text and "REPO_ID" not in card.text
    assert str(tmp_path) not in api.files[RECIPE_FILE] + api.files["README.md"]


def test_a_convert_base_trains_and_loads_like_the_converted_folder(world):
    from mushroomclip.data.transforms import EvalPixels
    from mushroomclip.models.backbones import load_backbone
    from mushroomclip.models.classifier import backbone_name, base_record

    _, base, _, _ = world
    spec = "convert:hf-hub:imageomics/bioclip"
    assert base_record(spec) == {"base_model": spec, "base_conversion": json.loads((base / RECIPE_FILE).read_text())}
    assert base_record(str(base), "someone/bioclip-hf")["base_model"] == "someone/bioclip-hf"
    on_demand, folder = load_backbone(backbone_name(spec)), load_backbone(f"hf:{base}")
    pixels = torch.stack([EvalPixels(folder.preprocess)(im) for im in IMAGES])
    assert torch.equal(on_demand.encode_images(pixels), folder.encode_images(pixels))
    assert torch.equal(on_demand.encode_texts(["Amanita muscaria"]), folder.encode_texts(["Amanita muscaria"]))


def test_the_license_is_claimed_only_for_bases_known_to_be_mit():
    from mushroomclip.models.backbones import known_license

    mit = [
        "clip-b32",
        "openai/clip-vit-large-patch14",
        "bioclip",
        "bioclip-2",
        "imageomics/bioclip",
        "convert:hf-hub:imageomics/bioclip-2",
        "hf-hub:imageomics/bioclip",
    ]
    assert {known_license(b) for b in mit} == {"mit"}
    unknown = ["tiny-clip", "tiny-openclip", "openclip-b32-laion2b", "someone/bioclip-hf", "models/bioclip-hf"]
    assert {known_license(b) for b in unknown} == {None}


def test_on_demand_conversion_warns_when_the_source_weights_changed_since_training(world, caplog):
    from mushroomclip.models.convert import converted_folder

    with caplog.at_level("WARNING", logger="mushroomclip.models.convert"):
        converted_folder("convert:hf-hub:imageomics/bioclip", expected_weights="commit 0123abc")
    assert "trained on the weights of commit 0123abc" in caplog.text and "the source now has commit " in caplog.text


def test_a_failed_convert_push_is_one_line_and_keeps_the_folder(world, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    class Offline(FakeApi):
        def upload_folder(self, **kwargs):
            raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    out = tmp_path / "bioclip-hf"
    assert convert_main(["--model", "bioclip", "--output", str(out), "--push-to-hub", "someone/bioclip-hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not push") and "\n" not in err and "Network is unreachable" in err
    assert (out / RECIPE_FILE).is_file() and (out / "model.safetensors").is_file()
