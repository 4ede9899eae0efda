"""koala_hf.recipe_support.arguments: the Trainer's arguments as the recipes use them."""

from koala_hf.recipe_support.arguments import RecipeTrainingArguments


def test_save_strategy_no_evaluates_the_final_model():
    args = RecipeTrainingArguments(output_dir="unused", save_strategy="no", report_to="none")
    assert args.load_best_model_at_end is False and args.evaluated_model == "final"
    assert RecipeTrainingArguments(output_dir="unused", report_to="none").evaluated_model == "best validation epoch"


def test_logging_scales_to_short_runs_unless_given():
    args = RecipeTrainingArguments(output_dir="unused", report_to="none")
    args.scale_logging(steps_per_epoch=4)
    assert args.logging_steps == 1
    args.scale_logging(steps_per_epoch=1000)
    assert args.logging_steps == 10
    given = RecipeTrainingArguments(output_dir="unused", report_to="none", logging_steps=3)
    given.scale_logging(steps_per_epoch=1000)
    assert given.logging_steps == 3
