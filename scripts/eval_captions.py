r"""Caption an evaluation set with a base model and adapters, score it and write a report.

The same as ``vlm-lora eval`` (same options, same code), as a script:

    python scripts/eval_captions.py --model assets/tiny-llava --adapter runs/quickstart/adapter \
        --data assets/data/microscopy/eval.jsonl --out runs/quickstart/eval_report

Writes OUT/summary.json, predictions.jsonl, report.html and contact_sheet.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm_lora.cli import run_reporting_errors  # noqa: E402
from vlm_lora.eval.cli import add_eval_arguments, run_eval  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors("eval_captions", run_eval, args)


if __name__ == "__main__":
    sys.exit(main())
