#!/usr/bin/env python
"""MushroomCLIP web app: identify a mushroom photo in the browser (Gradio; a Hugging Face Space as is).

python app.py --model runs/lora-b32              # a run folder; every run under --runs is offered too
python app.py --model USER/mushroomclip-lora-b32  # a Hub adapter (needs network once)
python app.py --model zero-shot:bioclip           # BioCLIP zero-shot

Serves on 127.0.0.1 only (no share link, no analytics); uploads are deleted once answered.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model shown first: run folder, Hub adapter repo or zero-shot:<backbone>; repeat to list "
        "more (default: $MUSHROOMCLIP_MODEL, else the first run found, else zero-shot:bioclip)",
    )
    p.add_argument("--runs", nargs="*", default=["runs", "demo/runs"], help="folders whose runs the page offers")
    p.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to serve on (0.0.0.0 exposes it to the network; Spaces set GRADIO_SERVER_NAME)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
        help="port (0: the first free one from 7860)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--max-file-size", default="20mb", help="largest upload accepted")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Gradio reads these at import: uploads go to a private folder removed at exit, no telemetry
    upload_dir = tempfile.mkdtemp(prefix="mushroomclip-app-")
    atexit.register(shutil.rmtree, upload_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server runs atexit too
    os.environ.update(GRADIO_TEMP_DIR=upload_dir, GRADIO_ANALYTICS_ENABLED="False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web app needs gradio: pip install '.[app]'", file=sys.stderr)
        return 2
    from mushroomclip.prediction.identify import ZERO_SHOT_CHOICES, find_runs
    from mushroomclip.prediction.webapp import build_app

    chosen = args.model or [m for m in [os.environ.get("MUSHROOMCLIP_MODEL")] if m]
    runs = find_runs(args.runs)
    models = list(dict.fromkeys(chosen + runs + list(ZERO_SHOT_CHOICES)))
    app = build_app(models, device=args.device)
    app.launch(
        server_name=args.host,
        server_port=args.port or None,
        share=False,
        max_file_size=args.max_file_size,
        show_error=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
