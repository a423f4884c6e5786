"""Published figures shown beside ours in the benchmark table: quoted from their source, never run here.

The course codebase this project reproduces trains ResNets from scratch on the same Kaggle data and reports
OA / mF1 / mIoU on the official test split (GitHub issue 14 quotes its table). Its rows go into
``benchmark.md`` labelled as quoted, so they are never read as our measurements.
"""

from __future__ import annotations

from mushroomclip.evaluation.zeroshot import SUMMARY_KEYS

QUOTED_METHOD = "supervised, from scratch: quoted, not reproduced"
# model: (test mIoU, test mF1, test OA) in %, and the training time the course gives (one L40S)
COURSE_RESNETS = {
    "ResNet18": (69.0, 80.8, 85.1, "3h05"),
    "ResNet34": (70.4, 81.7, 85.8, "5h33"),
    "ResNet50": (73.4, 84.0, 87.4, "8h42"),
    "ResNet101": (75.2, 85.1, 88.4, "16h43"),
    "ResNet152": (75.3, 85.1, 88.3, "17h57"),
}
REFERENCE_NOTE = (
    "Rows marked 'quoted, not reproduced' are the course codebase's published test-split figures for ResNets "
    "trained from scratch on the Kaggle data (training time on one L40S: "
    + ", ".join(f"{name} {time}" for name, (*_, time) in COURSE_RESNETS.items())
    + "); they were not run here, and n/a marks what the course does not report."
)


def reference_rows() -> list[dict]:
    """The course's ResNet rows in the benchmark's row format (fractions; ``None`` where it reports nothing)."""
    return [
        dict.fromkeys(SUMMARY_KEYS)
        | {
            "model": f"{name} (course)",
            "method": QUOTED_METHOD,
            "text_type": None,
            "oa": oa / 100,
            "mf1": mf1 / 100,
            "miou": miou / 100,
            "quoted": True,
        }
        for name, (miou, mf1, oa, _) in COURSE_RESNETS.items()
    ]
