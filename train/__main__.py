"""python -m train: SJD2 fine-tuning (not built yet; tracked in issue 6)."""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description="Sharded next-clean-token fine-tuning (planned).")
    p.parse_args(argv)
    print("error: training is not implemented yet (issue 6); only `python -m convert` works today", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
