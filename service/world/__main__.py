"""Command line: generate a synthetic line-inspection dataset.

    python -m service.world --out data.zip --n 300 --seed 1 --kind inspection \
        [--size 96] [--format zip|jsonl] [--defect-rate 0.5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from service.world.dataset import DATASET_KINDS, generate_examples, summarize, write_jsonl_base64, write_zip
from service.world.scene import DEFECT_TYPES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m service.world``."""
    parser = argparse.ArgumentParser(
        prog="python -m service.world",
        description="Generate a synthetic line-inspection dataset in the /v1/finetune upload format.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output file (.zip or .jsonl)")
    parser.add_argument("--n", type=int, default=300, help="number of examples (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--kind", choices=DATASET_KINDS, default="inspection", help="question kind")
    parser.add_argument("--size", type=int, default=96, help="image size in px (default 96)")
    parser.add_argument("--format", choices=("zip", "jsonl"), default=None,
                        help="zip (data.jsonl + imgs/) or jsonl (base64 images); default from --out suffix")
    parser.add_argument("--defect-rate", type=float, default=0.5, help="probability of a defect (default 0.5)")
    parser.add_argument("--defect-types", default=None,
                        help=f"comma-separated subset of {','.join(DEFECT_TYPES)} (default all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be >= 0")
    if args.size < 24:
        parser.error("--size must be at least 24")
    if not 0.0 <= args.defect_rate <= 1.0:
        parser.error("--defect-rate must be between 0 and 1")
    defect_types = None
    if args.defect_types:
        defect_types = [name.strip() for name in args.defect_types.split(",") if name.strip()]
        unknown = sorted(set(defect_types) - set(DEFECT_TYPES))
        if unknown:
            parser.error(f"unknown defect types: {', '.join(unknown)}")
    fmt = args.format or ("jsonl" if args.out.suffix.lower() == ".jsonl" else "zip")
    examples = generate_examples(args.n, args.seed, args.kind, size=args.size,
                                 defect_rate=args.defect_rate, defect_types=defect_types)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        write_zip(args.out, examples)
    else:
        write_jsonl_base64(args.out, examples)
    print(f"wrote {args.out} ({fmt}): {summarize(examples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
