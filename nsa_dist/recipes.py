"""Named NSA recipes: one switch (``recipe``) for a combination of :class:`~nsa_dist.NSAConfig` options.

- ``"paper"`` (the default): the paper's semantics, nothing changed.
- ``"retrieval"``: the combination that learns long-range retrieval (``benchmarks/quality/README.md``; H200,
  2026-12-04: 99.6% at 4k and 96.6% at 16k against dense's 100% and 99.5%, 77.1% at 32k): blocks ranked by key
  bounds (``selection_scoring="key_bound"``), one K/V projection for the three branches (``kv_sharing="shared"``)
  and a full-selection warm-up (``selection_warmup_steps``, measured at 60% of the training steps).

A recipe fills its options where the settings leave them out; a setting that contradicts it is an error naming
both, never silently overridden (on the Megatron config, whose fields all have values, a field at the paper's
value counts as left out). The warm-up is a number of training steps, which only the training loop knows:
the training YAML fills it in from ``train.steps`` (:data:`WARMUP_FRACTION` of them); other users (the Megatron
config, ``NSAConfig.from_dict``) give ``selection_warmup_steps`` themselves.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "retrieval": {"selection_scoring": "key_bound", "kv_sharing": "shared"},
}
# recipes with a full-selection warm-up, and the fraction of the training steps it measured best at
WARMUP_RECIPES = ("retrieval",)
WARMUP_FRACTION = 0.6


def check_recipe(recipe: Any, where: str = "recipe") -> str:
    """``recipe`` if it names one of :data:`RECIPES`; else ``ValueError`` naming ``where`` and the choices."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"{where}={recipe!r} is not one of {tuple(RECIPES)}")
    return recipe


def with_recipe_warmup(nsa: Mapping[str, Any], train_steps: int, where: str = "model.nsa") -> Dict[str, Any]:
    """``nsa`` (a model's NSA settings) with ``selection_warmup_steps`` set to ``round(WARMUP_FRACTION *
    train_steps)`` (at least 1 for any positive step count) when its ``recipe`` has a warm-up and the key is
    missing; else unchanged."""
    nsa = dict(nsa)
    recipe = check_recipe(nsa.get("recipe", "paper"), f"{where}.recipe")
    if recipe in WARMUP_RECIPES and "selection_warmup_steps" not in nsa:
        nsa["selection_warmup_steps"] = round(WARMUP_FRACTION * train_steps)
    return nsa


def apply_recipe(values: Mapping[str, Any], where: str = "nsa") -> Dict[str, Any]:
    """``values`` (NSAConfig fields, possibly with a ``"recipe"`` key) with the recipe's options filled in and the
    ``"recipe"`` key removed.

    Raises ``ValueError`` (naming ``where``) for an unknown recipe, for a given option that contradicts the recipe,
    and, for a recipe with a warm-up, when ``selection_warmup_steps`` is missing or 0."""
    values = dict(values)
    recipe = check_recipe(values.pop("recipe", "paper"), f"{where}.recipe")
    for name, wanted in RECIPES[recipe].items():
        if name in values and values[name] != wanted:
            raise ValueError(f"{where}.{name}={values[name]!r} contradicts {where}.recipe={recipe!r}, which sets "
                             f"{name}={wanted!r}; remove one of the two")
        values[name] = wanted
    if recipe in WARMUP_RECIPES and not values.get("selection_warmup_steps"):
        raise ValueError(f"{where}.recipe={recipe!r} needs {where}.selection_warmup_steps > 0 (got "
                         f"{values.get('selection_warmup_steps')!r}): the full-selection warm-up, measured best at "
                         f"{WARMUP_FRACTION:.0%} of the training steps (the training YAML fills it in from "
                         "train.steps)")
    return values
