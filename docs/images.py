"""Copy the screenshots the headless-Chromium tests take (test-artifacts/) into docs/images/ for the site, as
256-colour PNGs (a few hundred KB each instead of megabytes). Run by `make docs-images`, after the tests; never
edit the pictures by hand: rerun the target.

    python docs/images.py [ARTIFACTS] [IMAGES]      (defaults: test-artifacts docs/images)
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# screenshot in test-artifacts/ -> (picture in docs/images/, the test that takes it, height kept in pixels)
PICTURES = {
    "mlflow-model-version.png": ("mlflow-model-version.png", "tests/test_ui.py", 1600),
    "quarantine-report.png": ("quarantine-report.png", "tests/test_report_page_ui.py", 1800),
    "monitor-report.png": ("monitor-report.png", "tests/test_monitor_ui.py", 1800),
    "prefect-flow-run-artifacts.png": ("prefect-flow-run-artifacts.png", "tests/test_team_mode.py (team, ui)", 900),
    "prefect-retrain-artifact.png": ("prefect-retrain-artifact.png", "tests/test_team_mode.py (team, ui)", 900),
}


def crop_blank_bottom(image: Image.Image, keep: int) -> Image.Image:
    """The top ``keep`` pixels, less the blank rows at the bottom (screenshots are taken at a fixed tall window)."""
    image = image.convert("RGB").crop((0, 0, image.width, min(keep, image.height)))
    grey = image.convert("L")
    bottom = grey.height
    while bottom > 200 and grey.crop((0, bottom - 20, grey.width, bottom)).getextrema()[0] > 245:
        bottom -= 20
    return image.crop((0, 0, image.width, bottom))


def main(artifacts: Path, images: Path) -> int:
    images.mkdir(parents=True, exist_ok=True)
    missing = []
    for shot, (picture, test, keep) in PICTURES.items():
        source = artifacts / shot
        if not source.exists():
            missing.append(f"{shot} (taken by {test})")
            continue
        out = crop_blank_bottom(Image.open(source), keep).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out.save(images / picture, optimize=True)
        print(f"{images / picture}: {(images / picture).stat().st_size // 1024} KB from {source}")
    if missing:
        print("not taken, kept as they were: " + "; ".join(missing), file=sys.stderr)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(
        main(
            Path(args[0]) if args else ROOT / "test-artifacts",
            Path(args[1]) if len(args) > 1 else ROOT / "docs" / "images",
        )
    )
