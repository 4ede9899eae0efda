"""What the recipes (``recipes/``), the benchmarks and the Hub cards share, importable from the installed package.

* ``optimizers``: optimizers by name, KOALA and the papers' baselines, with a task's settings;
* ``arguments``: ``RecipeTrainingArguments``;
* ``machine``: accelerator, CPU threads, launcher, Hub reachability;
* ``history``: per-epoch timing and metrics from the Trainer's log history;
* ``results``: the ``results.json`` schema, written down once, and its writing and reading;
* ``plots`` and ``compare``: curves and comparison tables;
* ``archives``: image datasets in CIFAR-10's on-disk format (scikit-learn's digits);
* ``extras``: the one-line error naming a missing extra.

Nothing here imports ``datasets``, ``timm`` or ``matplotlib`` until it is used, so the core install imports it.
"""
