"""koala_hf.recipe_support.optimizers: optimizers by name with a task's settings."""

import pytest

from koala_hf.recipe_support.arguments import RecipeTrainingArguments
from koala_hf.recipe_support.optimizers import canonical_optimizer_name, optimizer_cls_and_kwargs
from recipes import wikitext2_gpt


@pytest.mark.parametrize("spelling", ["koalapp", "KOALA++", "koalappns", "koalav", "koala-m", "adamw"])
def test_every_registered_optimizer_name_is_accepted(spelling):
    args = RecipeTrainingArguments(output_dir="unused", report_to="none")
    cls, kwargs = args.resolve_optimizer(spelling, wikitext2_gpt.OPTIMIZER_SETTINGS, {})
    canonical = canonical_optimizer_name(spelling)
    assert canonical in wikitext2_gpt.OPTIMIZER_SETTINGS
    assert args.learning_rate == wikitext2_gpt.OPTIMIZER_SETTINGS[canonical]["lr"] == kwargs["lr"]
    with pytest.raises(SystemExit, match="--optimizer 'koala' is unknown; choose one of: .*koalapp"):
        canonical_optimizer_name("koala")


def test_an_argument_the_optimizer_does_not_take_is_refused_naming_the_ones_it_does():
    with pytest.raises(SystemExit, match="koala-v does not take symmetric; its arguments are .*sigma"):
        optimizer_cls_and_kwargs("koala-v", {}, {"symmetric": False})
