"""Write a tiny overfit split: train_split.csv == val_split.csv (on purpose) + overfit_report.json.

    python scripts/debug_prepare_overfit_split.py --data-root DIR --out-dir DIR [--num-pairs 64] [--seed 123] [--shuffle]

Without --shuffle the first N pairs by id are taken, with it a seeded random N. Asking for more pairs
than exist writes them all and prints a note. Exit codes: 0 done, 2 bad usage or data (one line on
stderr). The data root is never written to; an --out-dir inside it is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import autohdr  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autohdr.data import prepare_overfit_split  # noqa: E402

EXIT_OK, EXIT_USAGE = 0, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="folder of <id>_original / <id>_generated pairs")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the split CSVs and the report go")
    parser.add_argument("--num-pairs", type=int, default=64, help="pairs in the split (default: 64)")
    parser.add_argument("--seed", type=int, default=123, help="seed of the --shuffle selection (default: 123)")
    parser.add_argument("--shuffle", action="store_true", help="a seeded random N instead of the first N by id")
    args = parser.parse_args(argv)
    try:
        report = prepare_overfit_split(args.data_root, args.out_dir, args.num_pairs, args.seed, args.shuffle)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        print(f"debug_prepare_overfit_split: error: {' | '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    if report["note"]:
        print(f"note: {report['note']}")
    print(f"wrote {report['num_pairs_written']} pairs (train == val): {report['train_split']}, "
          f"{report['val_split']}, {Path(report['train_split']).parent / 'overfit_report.json'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
