"""Bad data and bad flags end in one line that names the file or option and the fix, before any work is wasted."""

import os
import socket
import subprocess
import sys
import time

import pytest

from recipes import timm_vision
from recipes import wikitext2_gpt
from tests.conftest import ROOT
from tests.recipes.archives import write_cifar10, write_cifar100


def lm_main(data_dir, tmp_path, *extra):
    return wikitext2_gpt.main(["--preset", "smoke", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"),
                               "--disable_tqdm", "true", "--report_to", "none", *extra])


def wikitext_folder(tmp_path, valid: str, test: str = " = A = \n" + " word " * 400 + "\n") -> object:
    folder = tmp_path / "wt"
    folder.mkdir()
    (folder / "valid.txt").write_text(valid)
    (folder / "test.txt").write_text(test)
    return folder


@pytest.mark.parametrize("valid", ["", "\n \n\n", " = Title = \n"], ids=["empty", "blank", "one-line"])
def test_an_empty_blank_or_one_line_training_text_names_the_file(tmp_path, valid):
    folder = wikitext_folder(tmp_path, valid)
    with pytest.raises(SystemExit) as error:
        lm_main(folder, tmp_path, "--train_split", "validation", "--halve_test_split")
    message = str(error.value)
    assert "valid.txt" in message and ("empty or blank" in message or "too short" in message)
    assert "\n" not in message


def test_a_folder_without_train_txt_says_to_train_on_the_validation_text(tmp_path):
    folder = wikitext_folder(tmp_path, " some words here \n" * 50)
    with pytest.raises(SystemExit, match=r"has no train.txt .*--train_split validation --halve_test_split"):
        lm_main(folder, tmp_path)


def test_invalid_optimizer_kwargs_are_refused_before_the_data_is_read(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the data was read before the optimizer arguments were checked")

    monkeypatch.setattr(wikitext2_gpt, "read_splits", must_not_run)
    monkeypatch.setattr(timm_vision, "read_splits", must_not_run)
    with pytest.raises(SystemExit, match=r"--optimizer_kwargs is not valid JSON .*sigma"):
        lm_main(tmp_path, tmp_path, "--optimizer_kwargs", "{sigma: 0.2}")
    with pytest.raises(SystemExit, match=r"--optimizer_kwargs: koala\+\+ does not take sigmma; its arguments are .*sigma"):
        lm_main(tmp_path, tmp_path, "--optimizer_kwargs", '{"sigmma": 0.2}')
    with pytest.raises(SystemExit, match=r"--optimizer_kwargs: sgd does not take betas"):
        timm_vision.main(["--preset", "smoke", "--optimizer", "sgd", "--optimizer_kwargs", '{"betas": [0.9, 0.99]}',
                          "--output_dir", str(tmp_path / "v")])
    with pytest.raises(SystemExit, match="must be a JSON object"):
        lm_main(tmp_path, tmp_path, "--optimizer_kwargs", "[1, 2]")


def test_the_trainers_optim_flag_is_refused_with_a_pointer_to_optimizer(tmp_path):
    with pytest.raises(SystemExit, match=r"--optim sgd is the Trainer's optimizer flag.*--optimizer"):
        lm_main(tmp_path, tmp_path, "--optim", "sgd")


def test_boolean_flags_take_no_value():
    parser = timm_vision.HfArgumentParser((timm_vision.DataArguments, timm_vision.ModelArguments))
    _, model = parser.parse_args_into_dataclasses(["--cutout"])
    assert model.cutout is True and model.no_cutout is False
    _, model = parser.parse_args_into_dataclasses(["--no_cutout"])
    assert model.no_cutout is True
    lm = wikitext2_gpt.HfArgumentParser((wikitext2_gpt.DataArguments,))
    (data,) = lm.parse_args_into_dataclasses(["--halve_test_split"])
    assert data.halve_test_split is True


def test_a_truncated_cifar_pickle_is_named(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(SystemExit, match=r"data_batch_3 is not a readable python-pickle batch .*truncated"):
        timm_vision.read_cifar(tmp_path, "cifar10")


def test_a_cifar100_archive_given_as_cifar10_says_which_dataset_to_pass(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(SystemExit, match=r"It holds cifar-100-python: pass --dataset cifar100"):
        timm_vision.read_cifar(tmp_path, "cifar10")
    # The same files under CIFAR-10's names.
    root = tmp_path / "renamed" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes((tmp_path / "cifar-100-python" / "train").read_bytes())
    (root / "test_batch").write_bytes((tmp_path / "cifar-100-python" / "test").read_bytes())
    with pytest.raises(SystemExit, match=r"data_batch_1 has no labels .*looks like CIFAR-100: pass --dataset cifar100"):
        timm_vision.read_cifar(tmp_path / "renamed", "cifar10")


def test_cifar10_archives_given_as_cifar100_are_refused(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(SystemExit, match=r"It holds cifar-10-batches-py: pass --dataset cifar10"):
        timm_vision.read_cifar(tmp_path, "cifar100")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wikitext2_gpt", "timm_vision"])
def test_offline_without_a_data_dir_fails_at_once_naming_the_option(recipe):
    code = (f"import {recipe} as r; r.main(['--preset', 'smoke', '--output_dir', 'unused', '--report_to', 'none'])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "recipes")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "HF_HUB_OFFLINE" in last_line and "--data_dir" in last_line and "Traceback" not in result.stderr
    assert time.perf_counter() - start < 60  # the interpreter and imports; no Hub retries


def test_an_unreachable_hub_fails_fast_naming_the_option(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(SystemExit, match=r"cannot be reached .*Pass --data_dir"):
        wikitext2_gpt.read_splits(wikitext2_gpt.DataArguments())


@pytest.mark.parametrize("recipe, module", [("wikitext2_gpt", "datasets"), ("timm_vision", "timm")])
def test_a_missing_extra_names_the_extra_to_install(recipe, module):
    code = ("import importlib.util as u, runpy\n"
            "real = u.find_spec\n"
            f"u.find_spec = lambda name, *a: None if name == {module!r} else real(name, *a)\n"
            f"runpy.run_path('recipes/{recipe}.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"This recipe needs {module}" in result.stderr and "pip install 'koala_hf[recipes]'" in result.stderr
