"""Models the web app offers and one answer from one or several photos of a find.

A model is named by a string: a run folder or Hub repo of a LoRA adapter (CLIP- or BioCLIP-based), or
``zero-shot:<backbone>`` for a plain CLIP / BioCLIP with class prompts. Every model is a
:class:`~mushroomclip.models.classifier.Classifier` (``classes``, ``taxonomy``, ``pixels``, ``logits``). Another kind of
run (a supervised head, say) plugs in as one more entry of :data:`RUN_LOADERS`, keyed by a file its folder holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

from mushroomclip.data.transforms import ImageError
from mushroomclip.models.backbones import load_backbone
from mushroomclip.models.classifier import Classifier, load_classifier
from mushroomclip.models.prompts import templates_for
from mushroomclip.prediction.answer import Answer, Thresholds, answer, fuse_log_probs, run_thresholds
from mushroomclip.taxonomy import load_taxonomy

ZERO_SHOT = "zero-shot:"
#: Zero-shot models the page lists; any registry name works after ``zero-shot:``.
ZERO_SHOT_CHOICES = ("zero-shot:bioclip", "zero-shot:clip-b32", "zero-shot:tiny-clip")
#: (file a run folder holds, loader(dir_or_repo, device) -> Classifier); the first match loads the run.
#: A Hub repo id (no local folder to inspect) goes to the first loader.
# (load_classifier also loads a supervised run: a LoRA one holds adapter_config.json, a full fine-tune config.json)
RUN_LOADERS: list[tuple[str, Callable[..., Classifier]]] = [
    ("adapter_config.json", load_classifier),
    ("config.json", load_classifier),
]


def zero_shot_classifier(backbone_name: str, device: str = "cpu", text_type: str = "taxon_com") -> Classifier:
    """A plain backbone scored against BioCLIP-style prompts of every species in the bundled taxonomy."""
    taxonomy = load_taxonomy()
    record = {"species": taxonomy.classes, "text_type": text_type, "templates": templates_for("openai")}
    return Classifier(load_backbone(backbone_name, device=device), record, taxonomy)


def load_model(name: str, device: str = "cpu") -> tuple[Classifier, Thresholds]:
    """The classifier ``name`` stands for and the abstention thresholds that apply to it."""
    if name.startswith(ZERO_SHOT):
        return zero_shot_classifier(name[len(ZERO_SHOT) :], device), Thresholds()
    folder = Path(name)
    loader = next((load for marker, load in RUN_LOADERS if (folder / marker).is_file()), None)
    if folder.is_dir() and loader is None:
        raise ValueError(f"{name} is not a run folder: it holds none of {', '.join(m for m, _ in RUN_LOADERS)}")
    classifier = (loader or RUN_LOADERS[0][1])(name, device=device)
    return classifier, thresholds_for(name)


def thresholds_for(name: str) -> Thresholds:
    """The thresholds a run folder, or the cached snapshot of a Hub run, records; else the defaults."""
    folder = Path(name)
    return run_thresholds(folder if folder.is_dir() else _cached_snapshot(name))


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hub run the loader has just fetched (its metrics.json may hold thresholds)."""
    cached = try_to_load_from_cache(repo_id, "classes.json")
    return Path(cached).parent if isinstance(cached, str) else None


def find_runs(folders: list[str | Path]) -> list[str]:
    """Run folders directly under ``folders`` that some loader of :data:`RUN_LOADERS` can read."""
    markers = [marker for marker, _ in RUN_LOADERS]
    return [
        str(run)
        for folder in map(Path, folders)
        if folder.is_dir()
        for run in sorted(folder.iterdir())
        if any((run / m).is_file() for m in markers) and (run / "classes.json").is_file()
    ]


def identify(
    classifier: Classifier, images: list, thresholds: Thresholds, k: int = 5
) -> tuple[Answer | None, list[str]]:
    """One answer for several photos of one find (mean of their log-probabilities), and one message per
    photo that could not be read (an unreadable or oversized file is never fatal). ``None`` if none could."""
    pixels, problems = [], []
    for image in images:
        try:
            pixels.append(classifier.pixels(image))
        except ImageError as err:
            problems.append(f"{Path(str(image)).name}: not usable as a photo ({err.reason})")
    if not pixels:
        return None, problems
    log_probs = torch.log_softmax(classifier.logits(torch.stack(pixels)).double(), dim=-1).numpy()
    return answer(classifier.classes, fuse_log_probs(log_probs), classifier.taxonomy, thresholds, k), problems
