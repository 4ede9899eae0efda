"""Draw several runs on one figure and print a results table.

    python recipes/compare.py runs/koala runs/adamw --output runs/compare.png

Each argument is a run folder (or its results.json) written by a recipe. The
table is Markdown, ready for the README (koala_hf.recipe_support.compare).
"""

from __future__ import annotations

import argparse

from koala_hf.recipe_support.compare import figure, load, table


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or results.json files")
    parser.add_argument("--output", default="compare.png", help="figure to write")
    args = parser.parse_args(argv)
    runs = [load(run) for run in args.runs]
    text = table(runs)
    figure(runs, args.output)
    print(text)
    print(f"\nfigure: {args.output}")
    return text


if __name__ == "__main__":
    main()
