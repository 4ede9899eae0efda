"""The recipes: one script per task, run as ``python recipes/<script>.py`` or ``accelerate launch recipes/<script>.py``.

What they share is in the installed package (koala_hf.recipe_support); this file only lets the tests import
them as ``recipes.<script>`` from a checkout.
"""
