"""python -m infer: batch text-to-image generation (not built yet; tracked in issues 5 and 7)."""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer", description="Batch text-to-image generation (planned).")
    p.parse_args(argv)
    print("error: generation is not implemented yet (issues 5 and 7); only `python -m convert` works today",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
