"""Full-selection warm-up: train the first steps with the selection branch attending every block.

Plain NSA learns the block scores that drive top-n only through the compressed branch's output, so a model that
learned a long-range lookup at short lengths (where the window and the top-n blocks cover the whole sequence)
meets longer sequences with block scores that point nowhere, and top-n gives them no gradient to improve. During
the warm-up the selected branch attends all earlier keys of the document (top-n over every block: causal
attention over the selection K/V), so the model learns the task as dense attention does, while the selection
loss (:mod:`nsa_dist.selection_loss`, whose teacher is exactly that attention) teaches the block scores where to
look; after it the layer runs the paper's top-n. The warm-up steps are training steps of the budget; they cost
about a dense attention per layer on top of NSA.

The switch is the layers' ``full_selection`` flag (:class:`FullSelectionSwitch`); the trainers set it from
``NSAConfig.selection_warmup_steps`` at every step with :func:`set_full_selection`, and evaluation always runs
the paper's top-n. A custom training loop (e.g. Megatron-LM's) calls
``set_full_selection(model, step < selection_warmup_steps)`` before each step.
"""
from __future__ import annotations

from torch import nn


class FullSelectionSwitch:
    """Mixin of the NSA layers: ``full_selection`` (default False) makes the layer's selected branch attend
    every block (see the module docstring)."""

    full_selection: bool = False


def set_full_selection(model: nn.Module, active: bool) -> int:
    """Set ``full_selection`` on every NSA layer of ``model`` (any module tree: a GPT, a DeepSpeed engine, a
    Megatron model); returns the number of layers switched (0 for a model without NSA layers)."""
    layers = [m for m in model.modules() if isinstance(m, FullSelectionSwitch)]
    for layer in layers:
        layer.full_selection = bool(active)
    return len(layers)
