"""What a recipe needs beyond the core install: a one-line error naming the extra to install."""

from __future__ import annotations

import importlib.util


def require_extras(*modules: str, extra: str) -> None:
    """Stop with ``pip install 'koala_hf[<extra>]'`` when any of ``modules`` is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"This recipe needs {', '.join(missing)}, which the core install leaves out: "
                         f"pip install 'koala_hf[{extra}]' (or pip install -e '.[{extra}]' in a checkout)")
