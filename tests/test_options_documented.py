"""Each list of options is defined once, next to its kernels; the config validation, `--help` and the README's
tables read it from there (a new loss type or mode that one of them misses fails here)."""

import re
from pathlib import Path

import pytest

import rlhf_kernels
from rlhf_kernels.ops.dpo_loss import AVERAGED_LOSS_TYPES

config = pytest.importorskip("rlhf.config")
grpo_core = pytest.importorskip("rlhf.grpo_core")

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

LISTS = {  # README table header (first column) -> (the list, the config field that takes it)
    "agg": (rlhf_kernels.AGG_MODES, "agg"),
    "loss_type": (rlhf_kernels.DPO_LOSS_TYPES, "loss_type"),
    "mode": (rlhf_kernels.RANK_LOSS_MODES, "rank_loss"),
    "kl_estimator": (rlhf_kernels.KL_ESTIMATORS, "kl_estimator"),
    "policy_loss": (rlhf_kernels.LOSS_TYPES, "policy_loss"),
    "ratio_level": (rlhf_kernels.RATIO_LEVELS, "ratio_level"),
    "advantage": (tuple(grpo_core.ADVANTAGE_ESTIMATORS), "advantage"),
    "rollout_correction": (grpo_core.ROLLOUT_CORRECTIONS, "rollout_correction"),
    "recipe": (tuple(grpo_core.RECIPES), "recipe"),
}


def readme_table(first_column: str) -> list[list[str]]:
    """The rows of the README table whose header starts with ``| first_column |``, as lists of cell texts."""
    lines = [line.strip() for line in README.splitlines()]  # tables inside list items are indented
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{first_column}\s*\|", line))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.parametrize("name", sorted(LISTS))
def test_readme_table_lists_exactly_the_options(name):
    options, _ = LISTS[name]
    documented = [row[0].strip('`"') for row in readme_table(name)]
    assert documented == list(options)


def test_readme_says_which_dpo_losses_average():
    for row in readme_table("loss_type"):
        assert ("averaged" in row[-1]) == (row[0].strip('`"') in AVERAGED_LOSS_TYPES), row


@pytest.mark.parametrize("name", sorted(LISTS))
def test_config_validation_and_help_read_the_list(name):
    options, field = LISTS[name]
    configs = (config.PPOConfig, config.DPOConfig, config.RewardConfig, grpo_core.GRPOConfig)
    cls = next(c for c in configs if hasattr(c(), field))
    help_text = config.config_help(cls)
    line = next(line for line in help_text.splitlines() if line.split()[0] == field)
    assert all(option in line for option in options), line
    for option in options:
        cfg = cls(**{field: option})
        if field == "loss_type" and option == "simpo":
            cfg.simpo_gamma = 0.5
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        cls(**{field: "not-an-option"}).validate()


def test_readme_recipes_state_their_values():
    """Each recipe row names its paper and every value it sets, as rlhf.grpo_core.RECIPES holds them."""
    for row in readme_table("recipe"):
        paper, values = grpo_core.RECIPES[row[0].strip("`")]
        assert paper.split(",")[0] in row[1]
        assert row[2] == ", ".join(f"{k}={v}" for k, v in values.items())
