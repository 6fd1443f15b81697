"""Screenshot of the evaluation report of TotalSegmentator's fast model against its reference labels.

Runs ``medseg evaluate`` on ``../shared/datasets/TotalSegmentator_example_CT``
(labelsTr/example_ct_sm vs extras/example_ct_sm_seg_fast, CT image under the
contours) into ``benchmarks/work/report_totalseg/``, opens ``report.html`` in
headless Chromium and saves the page as
``benchmarks/results/metrics_report_totalseg.png`` (the top of the page:
summary table and plots). Exits 1 if Chromium reports an error.

Run: ``.venv/bin/python benchmarks/report_screenshot.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED  # noqa: E402

from medseg.cli.main import main as medseg_main  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def main() -> int:
    root = SHARED / "TotalSegmentator_example_CT"
    work = REPO / "benchmarks" / "work" / "report_totalseg"
    if work.exists():
        shutil.rmtree(work)
    for name, source in (
        ("pred", root / "extras" / "example_ct_sm_seg_fast.nii.gz"),
        ("ref", root / "labelsTr" / "example_ct_sm.nii.gz"),
        ("images", root / "imagesTr" / "example_ct_sm.nii.gz"),
    ):
        (work / name).mkdir(parents=True)
        (work / name / "example_ct_sm.nii.gz").symlink_to(source)
    code = medseg_main(
        [
            "evaluate", str(work / "pred"), str(work / "ref"), "-o", str(work / "out"),
            "--labels", str(root / "dataset.json"), "--images", str(work / "images"),
        ]
    )  # fmt: skip
    if code != 0:
        return code
    shot = RESULTS / "metrics_report_totalseg.png"
    result = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1300,2600", f"--screenshot={shot}", (work / "out" / "report.html").as_uri(),
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    print(f"chromium exit {result.returncode}; {shot}")
    return 0 if result.returncode == 0 and shot.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
