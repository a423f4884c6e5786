"""The Gradio page: photos in, an :class:`~mushroomclip.prediction.answer.Answer` rendered as HTML out.

Uploads live in Gradio's upload folder (``GRADIO_TEMP_DIR``, set by ``app.py`` before Gradio is imported)
only until their answer is computed: :func:`forget_uploads` deletes them then.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from mushroomclip.prediction.answer import Answer
from mushroomclip.prediction.identify import identify, load_model

EDIBILITY_COLOURS = {
    "deadly": "#7f0000",
    "poisonous": "#c62828",
    "psychoactive": "#6a1b9a",
    "edible": "#2e7d32",
    "inedible": "#6d4c41",
    "unknown": "#616161",
}
DISCLAIMER = "A model's guess, not an identification: check with an expert before eating any wild mushroom."
RANKS_SHOWN = ("kingdom", "phylum", "class", "order", "family", "genus")


def answer_html(result: Answer | None, problems: list[str], model: str) -> str:
    """The answer as an HTML fragment: headline, warning, the top species with bars, badges and lineage."""
    esc = html.escape
    parts = [f'<div class="mc-problems">{esc(p)}</div>' for p in problems]
    if result is None:
        return "".join(parts) or '<div class="mc-problems">No photo given: upload, paste or take one.</div>'
    if result.warning:
        parts.append(
            f'<div class="mc-warning" style="background:#b71c1c;color:#fff;padding:12px;border-radius:8px;'
            f'font-size:1.15em;font-weight:bold">⚠ {esc(result.warning)}</div>'
        )
    parts.append(f'<h2 class="mc-headline">{esc(result.headline)}</h2>')
    rows = []
    for row in result.rows:
        colour = EDIBILITY_COLOURS.get(row.edibility, "#616161")
        lineage = " → ".join(esc(row.lineage[r]) for r in RANKS_SHOWN)
        rows.append(
            f'<tr class="mc-row"><td><i>{esc(row.species)}</i><br><small>{esc(row.common_name)}</small></td>'
            f'<td style="min-width:160px"><div style="background:#ddd;border-radius:4px">'
            f'<div style="width:{100 * row.probability:.1f}%;background:#1565c0;height:12px;border-radius:4px"></div>'
            f"</div>{100 * row.probability:.1f}%</td>"
            f'<td><span class="mc-badge" style="background:{colour};color:#fff;padding:2px 8px;border-radius:10px">'
            f"{esc(row.edibility)}</span></td><td><small>{lineage}</small></td></tr>"
        )
    parts.append(
        '<table class="mc-top"><tr><th>species</th><th>probability</th><th>edibility</th>'
        f"<th>lineage (kingdom → genus)</th></tr>{''.join(rows)}</table>"
    )
    t = result.thresholds
    parts.append(
        f'<p class="mc-thresholds"><small>Model: {esc(model)}. Thresholds: species {100 * t.species:.0f}%, '
        f"genus {100 * t.genus:.0f}%, family {100 * t.family:.0f}% ({esc(t.source)}). {DISCLAIMER}</small></p>"
    )
    return "".join(parts)


def model_answer_html(load: Callable, name: str, paths: list[str]) -> str:
    """The answer of model ``name`` (loaded by ``load``) to ``paths``; a model that cannot load is a message."""
    try:
        classifier, thresholds = load(name)
    except (ValueError, RuntimeError, OSError) as err:  # e.g. not a run folder, no network for a Hub model
        return f'<div class="mc-problems">Model {html.escape(name)} cannot be used: {html.escape(str(err))}</div>'
    return answer_html(*identify(classifier, paths, thresholds), name)


def forget_uploads(paths: list[str]) -> None:
    """Delete uploaded files (and their emptied folders) inside Gradio's upload folder; nothing outside it."""
    from gradio.utils import get_upload_folder  # here, not at the top: gradio is the optional app extra

    root = Path(get_upload_folder()).resolve()
    for path in map(Path, paths):
        path = path.resolve()
        if root in path.parents and path.is_file():
            path.unlink()
            if path.parent != root and not any(path.parent.iterdir()):
                path.parent.rmdir()


def build_app(models: list[str], device: str = "cpu"):
    """The page: an Identify tab (several photos of one find, one answer) and a Compare tab (two models)."""
    import gradio as gr  # here, not at the top: gradio is the optional app extra

    @lru_cache(maxsize=4)
    def model(name: str):
        return load_model(name, device)

    def answer_for(name: str, paths: list[str]) -> str:
        return model_answer_html(model, name, paths)

    def on_identify(name: str, files: list[str] | None, snapshot: str | None) -> str:
        paths = list(files or []) + ([snapshot] if snapshot else [])
        try:
            return answer_for(name, paths)
        finally:
            forget_uploads(paths)

    def on_compare(left: str, right: str, photo: str | None) -> tuple[str, str]:
        paths = [photo] if photo else []
        try:
            return answer_for(left, paths), answer_for(right, paths)
        finally:
            forget_uploads(paths)

    choose = dict(choices=models, allow_custom_value=True)
    # No file_types filter: Gradio would refuse a non-image before our code could delete the uploads; ours
    # names it instead. delete_cache removes uploads never answered (a page closed before Identify).
    with gr.Blocks(title="MushroomCLIP", delete_cache=(600, 600)) as app:
        gr.Markdown(f"# MushroomCLIP: which mushroom is this?\n{DISCLAIMER}")
        with gr.Tab("Identify"):
            name = gr.Dropdown(value=models[0], label="Model (run folder, Hub adapter or zero-shot)", **choose)
            with gr.Row():
                files = gr.File(
                    label="Photos of one find (cap, gills, stem): combined into one answer",
                    file_count="multiple",
                    elem_id="photos",
                )
                snapshot = gr.Image(
                    label="or paste / take a photo", sources=["clipboard", "webcam"], type="filepath", image_mode=None
                )
            button = gr.Button("Identify", variant="primary", elem_id="identify")
            result = gr.HTML(elem_id="answer")
            button.click(on_identify, [name, files, snapshot], result)
        with gr.Tab("Compare"):
            with gr.Row():
                left = gr.Dropdown(value=models[0], label="Model A", **choose)
                right = gr.Dropdown(value=models[-1], label="Model B", **choose)
            photo = gr.File(label="One photo", elem_id="compare-photo")
            compare = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Row():
                out_left, out_right = gr.HTML(elem_id="compare-a"), gr.HTML(elem_id="compare-b")
            compare.click(on_compare, [left, right, photo], [out_left, out_right])
    return app
