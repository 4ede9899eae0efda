"""Optimizers by name: create_optimizer and timm's factory."""

import pytest
import timm.optim

from koala_hf import KOALAM, KOALAV, KOALAPlusPlus, create_optimizer
from tests.helpers import tiny_network

NAMES = [
    ("koala++", "koalapp", KOALAPlusPlus, True),
    ("koala++ns", "koalappns", KOALAPlusPlus, False),
    ("koala-v", "koalav", KOALAV, None),
    ("koala-m", "koalam", KOALAM, None),
]


@pytest.mark.parametrize("name, timm_name, cls, symmetric", NAMES)
def test_names_create_the_right_optimizer(name, timm_name, cls, symmetric):
    for optimizer in (
        create_optimizer(name, tiny_network().parameters(), lr=0.3),
        create_optimizer(name.upper(), tiny_network().parameters(), lr=0.3),
        timm.optim.create_optimizer_v2(tiny_network(), opt=timm_name, lr=0.3, weight_decay=1e-4),
    ):
        assert type(optimizer) is cls
        assert all(group["lr"] == 0.3 for group in optimizer.param_groups)
        if symmetric is not None:
            assert optimizer.param_groups[0]["symmetric"] is symmetric


def test_timm_puts_biases_in_a_group_without_weight_decay():
    optimizer = timm.optim.create_optimizer_v2(tiny_network(), opt="koalapp", weight_decay=1e-4)
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 1e-4]
    assert optimizer.param_groups[0]["lr"] == 1.0  # the optimizer's own default


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="koala\\+\\+, koala\\+\\+ns, koala-v, koala-m"):
        create_optimizer("koala-x", tiny_network().parameters())


def test_registration_waits_for_timm_when_it_is_not_imported_yet():
    import subprocess
    import sys

    code = (
        "import sys, koala_hf; assert 'timm' not in sys.modules; "
        "import timm.optim, torch; "
        "print(type(timm.optim.create_optimizer_v2(torch.nn.Linear(2, 2), opt='koalam')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "KOALAM"
