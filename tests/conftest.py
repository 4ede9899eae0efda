"""Shared fixtures: the WikiText-2 text kept in the repository, smoke runs trained once (the recipes import as ``recipes.<script>``).

The optimizer tests run the Triton kernels (``fused="triton"``) on CPU tensors through Triton's interpreter:
``TRITON_INTERPRET=1`` is set here, before any test module imports Triton (TRL does), since Triton fixes the
mode when it is first imported; the two-process tests' workers inherit it.
"""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "recipes" / "data" / "wikitext-2"  # WikiText-2's validation and test text (its README)


# Tests that use these fixtures train a recipe model: they belong to the slow set (pytest -m "not slow" skips them).
SLOW_FIXTURES = {"lm_smoke_run", "vision_smoke_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    reason = triton_interpreter_missing()
    if reason:  # the tests that run the kernels through the interpreter (compiling them needs no interpreter)
        for item in items:
            if "triton" in item.nodeid.lower() and not item.get_closest_marker("compiles_triton"):
                item.add_marker(pytest.mark.skip(reason=reason))


def triton_interpreter_missing() -> str | None:
    """Why the Triton kernels cannot be tested on this machine's CPU, or ``None`` (koala_hf.optim.triton_runtime)."""
    from koala_hf.optim import triton_runtime

    return triton_runtime.unavailable({"cpu"})


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (WIKITEXT / "valid.txt").exists():
        pytest.fail(f"{WIKITEXT} is missing: it is part of the repository")
    return WIKITEXT


@pytest.fixture(scope="session")
def lm_smoke_run(wikitext_dir, tmp_path_factory):
    """The LM smoke preset on the real WikiText-2 text, with KOALA++: (results, output folder)."""
    from recipes import wikitext2_gpt
    output = tmp_path_factory.mktemp("smoke-koala")
    # lr=1.0 (KOALA++'s default) rather than the paper's WikiText-2 setting of 2e-3, which moves a
    # 2-epoch smoke model too little to show learning (see the README's results).
    results = wikitext2_gpt.main([
        "--preset", "smoke", "--data_dir", str(wikitext_dir), "--train_split", "validation", "--halve_test_split",
        "--output_dir", str(output), "--disable_tqdm", "true", "--optimizer", "koala++", "--learning_rate", "1.0",
    ])
    return results, output


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    from tests.recipes.archives import write_cifar10

    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def vision_smoke_run(cifar_dir, tmp_path_factory):
    """The vision smoke preset with KOALA++ on tiny CIFAR-10 archives: (results, output folder)."""
    from recipes import timm_vision
    output = tmp_path_factory.mktemp("smoke-vision")
    results = timm_vision.main([
        "--preset", "smoke", "--data_dir", str(cifar_dir), "--optimizer", "koala++", "--output_dir", str(output),
        "--disable_tqdm", "true", "--measure_batches", "3",
    ])
    return results, output
