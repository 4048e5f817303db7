"""``NSAGPTForCausalLM``: an :class:`~nsa_dist.GPT` as a transformers causal LM (``save_pretrained``,
``from_pretrained``, ``generate``).

The module under ``model`` is the project's own ``GPT``; its forward and decode steps are those of
:mod:`nsa_dist.inference`. Padding: each row's tokens are the ones of ``attention_mask`` (one run per row: left
padding, as ``generate`` wants for decoder-only models, or right padding); they are moved to the right-padded layout
the GPT and its caches take, so a padded row gives what the prompt alone gives (positions start at its first token).

Generation cache: ``generate`` asks the model for its cache through ``_prepare_cache_for_generation`` (the hook that
receives the batch and ``max_length``); it is overridden here to hand out an
:class:`~nsa_dist.hf.cache.NSAGenerationCache` sized ``max_length - 1`` tokens, which the forward passes under
``cache`` (transformers >= 5.24 names the cache argument ``cache``). Greedy search and sampling are supported; beam
search, assisted and contrastive decoding would need cache reordering or rollback and are refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from ..compression import BlockCompressor
from ..inference import decode_step, prefill
from ..models.gpt import GPT
from ..rotary import RotaryEmbedding
from .cache import NSAGenerationCache
from .configuration import NSAGPTConfig
from .padding import from_right_padded, to_right_padded, token_spans

GENERATION_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class NSAGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~nsa_dist.GPT` (``self.model``) built from an :class:`NSAGPTConfig`; weights are saved under
    ``model.<GPT parameter name>``."""

    config_class = NSAGPTConfig
    base_model_prefix = "model"
    _input_embed_layer = "embed"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: NSAGPTConfig):
        super().__init__(config)
        self.model = GPT(config.gpt_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``[vocab, hidden]``."""
        return self.model.embed

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head ``hidden -> vocab`` (tied to the embedding when ``tie_embeddings``)."""
        return self.model.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        """The GPT's own initialisation of ``module`` (transformers calls it for each module it did not load, children
        first): linear layers and embeddings normal with ``init_std`` and zero biases, compressors back to mean
        pooling, norms to one, rotary frequencies (a buffer that is not saved) computed from ``rope_theta``."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            self.model._init_linear(module)
        elif isinstance(module, (BlockCompressor, nn.RMSNorm)):
            module.reset_parameters()
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(RotaryEmbedding(2 * module.inv_freq.numel(), self.config.rope_theta).inv_freq)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode: GenerationMode,
                                      batch_size: int, max_cache_length: int) -> None:
        """transformers' hook that puts ``generate``'s cache in ``model_kwargs["cache"]``: an
        :class:`NSAGenerationCache` of ``max_cache_length`` (``max_length - 1``) tokens per sequence, unless the
        caller passed one or ``use_cache=False``. ValueError naming the setting for a mode other than greedy search
        or sampling or for ``cache_implementation``; TypeError for a cache of another class."""
        if generation_mode not in GENERATION_MODES:
            raise ValueError(f"NSA GPT generation supports greedy search and sampling (num_beams=1, no assistant "
                             f"model, no penalty_alpha), got generation mode {generation_mode.value!r}")
        if generation_config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: NSA GPTs decode "
                             "through their own cache (NSAGenerationCache); leave cache_implementation unset")
        cache = model_kwargs.get("cache")
        if cache is not None and not isinstance(cache, NSAGenerationCache):
            raise TypeError(f"cache must be an NSAGenerationCache for NSA GPTs, got {type(cache).__name__}")
        if cache is None and generation_config.use_cache:
            model_kwargs["cache"] = NSAGenerationCache(max_cache_length)

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[NSAGenerationCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.Tensor] = None) -> CausalLMOutputWithPast:
        """Logits of ``input_ids [B, S]`` (int ids in ``[0, vocab_size)``).

        Args:
            input_ids: the batch's tokens; with an empty ``cache`` the prompts, with a filled one the next ``S``
                tokens of every sequence.
            attention_mask: ``[B, past + S]`` 1 at tokens, 0 at padding (``past``: columns the cache has seen,
                ``cache.get_seq_length()``); each row's ones form one run (left or right padding). Tokens after the
                prompts must all be 1. None: no padding.
            cache: None for one forward over the whole batch; an :class:`NSAGenerationCache` to prefill (the
                first call) or extend (later calls) the caches of every layer.
            use_cache: passed by ``generate``; a cache is used exactly when ``cache`` is given.
            labels: ``[B, S]`` targets for the causal LM loss (-100 where ignored; shifted inside), optional.
        Returns:
            ``CausalLMOutputWithPast(loss, logits [B, S, vocab], cache)``; logits at padding columns are 0.
        """
        if cache is None or cache.model_cache is None:
            spans = token_spans(attention_mask, *input_ids.shape, input_ids.device)
            tokens = to_right_padded(input_ids, spans)
            if cache is None:
                logits = self.model(tokens)
            else:
                model_cache = cache.allocate(self.model, *input_ids.shape)
                logits = prefill(self.model, tokens, model_cache, spans.lengths)
            logits = from_right_padded(logits, spans)
        else:
            self._check_step_mask(attention_mask, cache, input_ids.shape[1])
            logits = decode_step(self.model, input_ids, cache.model_cache)
        if cache is not None:
            cache.columns += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    @staticmethod
    def _check_step_mask(attention_mask: Optional[torch.Tensor], cache: NSAGenerationCache, steps: int) -> None:
        """A decode step's ``attention_mask`` (if given) must be ``[B, past + steps]`` with its last ``steps`` columns
        all 1: ValueError naming ``attention_mask`` otherwise."""
        if attention_mask is None:
            return
        expected = cache.get_seq_length() + steps
        if attention_mask.shape[-1] != expected:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns, expected {expected} (the "
                             f"{cache.get_seq_length()} the cache has seen plus {steps} new)")
        if not bool((attention_mask[:, -steps:] != 0).all()):
            raise ValueError("attention_mask marks padding among tokens after the prompts: only prompts may be padded")
