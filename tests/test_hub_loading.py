"""The registered Hub models through the production loading code, offline, from fake cache snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from fake_hub import (
    CLIP_B32_PREPROCESSOR,
    LOGIT_SCALE,
    OPENAI_MEAN,
    TINY_BIOCLIP2_MODEL_CFG,
    TINY_BIOCLIP_MODEL_CFG,
    clip_b32_files,
    open_clip_files,
    truncated,
    use_offline_cache,
    write_snapshot,
)
from PIL import Image

from mushroomclip.data.transforms import EvalPixels
from mushroomclip.models.backbones import ModelLoadError, hub_reachable, load_backbone

# name -> (repo, weight file, image size from its config, files builder)
REPOS = {
    "clip-b32": (
        "openai/clip-vit-base-patch32",
        "model.safetensors",
        CLIP_B32_PREPROCESSOR["crop_size"],
        clip_b32_files,
    ),
    "bioclip": (
        "imageomics/bioclip",
        "open_clip_pytorch_model.bin",
        32,
        lambda seed=0: open_clip_files(TINY_BIOCLIP_MODEL_CFG, seed, "open_clip_pytorch_model.bin"),
    ),
    "bioclip-2": (
        "imageomics/bioclip-2",
        "open_clip_model.safetensors",
        28,
        lambda seed=0: open_clip_files(TINY_BIOCLIP2_MODEL_CFG, seed),
    ),
}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub and transformers read, offline."""
    return use_offline_cache(monkeypatch, tmp_path / "hub")


@pytest.mark.parametrize("name", list(REPOS))
def test_registered_model_loads_from_a_complete_offline_snapshot(hub_cache, name):
    repo, weight_file, image_size, files = REPOS[name]
    write_snapshot(hub_cache, repo, files())
    backbone = load_backbone(name)
    assert backbone.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-5)  # the snapshot's weights; random init is 14.3
    pixels = EvalPixels(backbone.preprocess)(Image.new("RGB", (90, 60), (180, 120, 40)))
    assert pixels.shape == (3, image_size, image_size)  # preprocessing as the repo configures it
    assert list(backbone.preprocess.mean) == pytest.approx(OPENAI_MEAN)
    images, texts = backbone.encode_images(pixels[None]), backbone.encode_texts(["a photo of Amanita muscaria."])
    assert torch.isfinite(images).all() and torch.isfinite(texts).all()
    assert torch.allclose(images.norm(dim=-1), torch.ones(1), atol=1e-5)


def _one_line_error(name: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_backbone(name)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"could not load model {name!r}")
    return message


@pytest.mark.parametrize("name", list(REPOS))
def test_config_without_weights_is_a_one_line_error_naming_repo_and_file(hub_cache, name):
    repo, weight_file, _, files = REPOS[name]
    write_snapshot(hub_cache, repo, {k: v for k, v in files().items() if k != weight_file})
    message = _one_line_error(name)
    assert repo in message and weight_file in message
    assert "cache" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("name", list(REPOS))
def test_truncated_weight_file_is_a_one_line_error(hub_cache, name):
    repo, weight_file, _, files = REPOS[name]
    complete = files()
    write_snapshot(hub_cache, repo, complete | {weight_file: truncated(complete[weight_file])})
    message = _one_line_error(name)
    assert "cannot be" in message and "delete" in message


@pytest.mark.parametrize("name", list(REPOS))
def test_cache_id_follows_the_snapshot_commit_not_the_model_name(hub_cache, name):
    repo, _, _, files = REPOS[name]
    write_snapshot(hub_cache, repo, files(seed=0), commit="a" * 40)
    first, again = load_backbone(name).cache_id, load_backbone(name).cache_id
    write_snapshot(hub_cache, repo, files(seed=1), commit="b" * 40)  # refs/main moves to new weights
    assert first == again != load_backbone(name).cache_id


def test_cache_id_of_a_local_folder_follows_its_weight_file(hub_cache, tmp_path):
    folder = tmp_path / "clip"
    for seed in (0, 1):
        folder.mkdir(exist_ok=True)
        for file, data in clip_b32_files(seed).items():
            (folder / file).write_bytes(data)
        if seed == 0:
            first = load_backbone(f"hf:{folder}").cache_id
    assert load_backbone(f"hf:{folder}").cache_id != first


def test_weights_missing_tensors_are_refused_not_initialised_randomly(hub_cache):
    from safetensors.torch import load, save

    files = clip_b32_files()
    tensors = load(files["model.safetensors"])
    tensors.pop("visual_projection.weight")
    write_snapshot(hub_cache, "openai/clip-vit-base-patch32", files | {"model.safetensors": save(tensors)})
    assert "visual_projection.weight" in _one_line_error("clip-b32")


def test_cached_open_clip_tag_loads_offline(hub_cache, monkeypatch):
    import open_clip.factory

    # ViT-B-32's real tag and repo; the architecture shrunk so the test stays small
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-B-32", TINY_BIOCLIP_MODEL_CFG)
    write_snapshot(hub_cache, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", open_clip_files(TINY_BIOCLIP_MODEL_CFG))
    backbone = load_backbone("openclip-b32-laion2b")
    assert backbone.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-5)
    assert backbone.encode_texts(["fly agaric"]).shape == (1, 32)


class _Hub(BaseHTTPRequestHandler):
    """Answers every request: stands in for the Hub, or for a proxy in front of it."""

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(monkeypatch):
    """``http://127.0.0.1:PORT`` answering HEAD requests; online mode for huggingface_hub."""
    from huggingface_hub import constants

    server = HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_reachable_asks_the_configured_endpoint_through_huggingface_hub(local_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", local_server)  # HF_ENDPOINT's value, as huggingface_hub reads it
    assert hub_reachable(timeout=5)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there (discard port)
    assert not hub_reachable(timeout=5)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", local_server)
    assert not hub_reachable()


def test_hub_reachable_goes_through_the_configured_proxy(local_server, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.invalid")  # only the proxy can answer for it
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, local_server)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    close_session()  # the session reads the proxy settings when it is created
    try:
        assert hub_reachable(timeout=5)
    finally:
        close_session()


def test_evaluate_cli_with_config_but_no_weights_exits_with_one_line(prepared, tmp_path):
    cache = tmp_path / "hub"
    files = REPOS["bioclip"][3]()
    write_snapshot(cache, "imageomics/bioclip", {"open_clip_config.json": files["open_clip_config.json"]})
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).parents[1] / "evaluate_zero_shot.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--data",
            str(prepared[0]),
            "--models",
            "bioclip",
            "--output",
            str(tmp_path / "r"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=300,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: could not load model 'bioclip'")
    assert "imageomics/bioclip" in lines[0] and "open_clip_pytorch_model.bin" in lines[0]
    assert not (tmp_path / "r" / "zero_shot").exists()


def test_text_embedding_cache_of_older_weights_is_not_reused(hub_cache, tmp_path):
    from mushroomclip.models.prompts import cached_class_text_embeddings
    from mushroomclip.taxonomy import load_taxonomy

    repo, _, _, files = REPOS["bioclip"]
    write_snapshot(hub_cache, repo, files(seed=0), commit="a" * 40)
    old, hit = cached_class_text_embeddings(load_backbone("bioclip"), load_taxonomy(), "sci", "single", tmp_path)
    write_snapshot(hub_cache, repo, files(seed=1), commit="b" * 40)
    new, hit_after_update = cached_class_text_embeddings(
        load_backbone("bioclip"), load_taxonomy(), "sci", "single", tmp_path
    )
    assert (hit, hit_after_update) == (False, False) and not torch.allclose(old, new)


def test_random_weights_of_a_hub_model_need_its_config_only(hub_cache):
    files = REPOS["bioclip"][3]()
    write_snapshot(hub_cache, "imageomics/bioclip", {"open_clip_config.json": files["open_clip_config.json"]})
    backbone = load_backbone("bioclip", random_weights=True)  # the config's architecture, announced as random
    assert backbone.encode_texts(["fly agaric"]).shape == (1, TINY_BIOCLIP_MODEL_CFG["embed_dim"])
    assert "open_clip_config.json" in _one_line_error("bioclip-2")  # nothing cached for it at all
