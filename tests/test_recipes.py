"""The one-switch recipes (``nsa.recipe``): ``"paper"`` changes nothing, ``"retrieval"`` sets key-bound scoring and
shared K/V, the training YAML fills its warm-up from ``train.steps``, and a contradicting or missing setting is an
error naming it."""
import pytest

from nsa_dist import NSAConfig
from nsa_dist.recipes import RECIPES, WARMUP_FRACTION
from nsa_dist.training import TrainConfig

SHAPE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)


def test_paper_recipe_is_the_default_config():
    assert NSAConfig.from_dict({**SHAPE, "recipe": "paper"}) == NSAConfig(**SHAPE)


def test_retrieval_recipe_sets_key_bound_scoring_and_shared_kv():
    got = NSAConfig.from_dict({**SHAPE, "recipe": "retrieval", "selection_warmup_steps": 7, "window": 64})
    assert got == NSAConfig(**SHAPE, selection_scoring="key_bound", kv_sharing="shared", selection_warmup_steps=7,
                            window=64)
    assert got != NSAConfig(**SHAPE, selection_warmup_steps=7, window=64)
    assert set(RECIPES["retrieval"]) == {"selection_scoring", "kv_sharing"}
    # the recipe's own values given again are no contradiction
    assert NSAConfig.from_dict({**SHAPE, "recipe": "retrieval", "kv_sharing": "shared", "selection_warmup_steps": 7,
                                "window": 64}) == got


@pytest.mark.parametrize("name,value", [("kv_sharing", "separate"), ("selection_scoring", "compressed")])
def test_contradicting_setting_names_both(name, value):
    with pytest.raises(ValueError, match=rf"model.nsa.{name}='{value}' contradicts model.nsa.recipe='retrieval'"):
        NSAConfig.from_dict({**SHAPE, "recipe": "retrieval", "selection_warmup_steps": 5, name: value},
                            where="model.nsa")


@pytest.mark.parametrize("warmup", [None, 0])
def test_retrieval_recipe_without_warmup_is_an_error(warmup):
    values = {**SHAPE, "recipe": "retrieval"}
    if warmup is not None:
        values["selection_warmup_steps"] = warmup
    with pytest.raises(ValueError, match=r"nsa.recipe='retrieval' needs nsa.selection_warmup_steps > 0"):
        NSAConfig.from_dict(values)


def test_unknown_recipe_is_an_error_listing_the_recipes():
    with pytest.raises(ValueError, match=r"nsa.recipe='fast' is not one of \('paper', 'retrieval'\)"):
        NSAConfig.from_dict({**SHAPE, "recipe": "fast"})


def train_config(nsa: dict, steps: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, nsa=dict(
            block_len=8, stride=4, select_len=16, top_n=3, window=16, **nsa)),
        "data": dict(kind="retrieval", seq_len=128, retrieval=dict(num_pairs=2, num_keys=8, num_values=8)),
        "train": dict(steps=steps, batch_size=2)})


@pytest.mark.parametrize("steps", [1, 7, 600, 1001])
def test_training_yaml_fills_the_warmup_from_train_steps(steps):
    nsa = train_config({"recipe": "retrieval"}, steps).gpt_config(100).nsa_config()
    assert nsa.selection_warmup_steps == round(WARMUP_FRACTION * steps)
    assert (nsa.selection_scoring, nsa.kv_sharing) == ("key_bound", "shared")
    given = train_config({"recipe": "retrieval", "selection_warmup_steps": 3}, steps).gpt_config(100).nsa_config()
    assert given.selection_warmup_steps == 3
    assert train_config({}, steps).gpt_config(100).nsa_config().selection_warmup_steps == 0


def test_training_yaml_with_unknown_recipe_names_the_setting():
    with pytest.raises(ValueError, match=r"model.nsa.recipe='fast' is not one of"):
        train_config({"recipe": "fast"}, 10)


def test_quality_experiments_recipe_variant_is_the_switch_at_1000_steps():
    """benchmarks/quality's ``nsa-recipe`` (explicit options, measured at 1000 steps) is ``recipe: retrieval``."""
    from tests.helpers.quality_scripts import load

    settings = load("settings", "quality_settings_for_recipes")

    def nsa_of(variant_nsa: dict) -> NSAConfig:
        model = settings.model_section("small", "nsa")
        model["nsa"] = {**model["nsa"], **variant_nsa}
        raw = settings.train_config("needle", 4096, "nsa", size="small", steps=1000, tokens_per_step=32768, lr=1e-3,
                                    seed=0, precision="fp32", text_file=None, out_dir="unused")
        return TrainConfig.from_dict({**raw, "model": model}).gpt_config(100).nsa_config()

    assert nsa_of(settings.VARIANTS["nsa-recipe"]["nsa"]) == nsa_of({"recipe": "retrieval"})
