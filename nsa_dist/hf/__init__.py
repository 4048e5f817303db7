"""Hugging Face transformers integration (the optional extra ``pip install "nsa-dist[hf]"``).

- :class:`NSAGPTConfig` (``model_type: nsa_gpt``) and :class:`NSAGPTForCausalLM`, the project's
  :class:`~nsa_dist.GPT` as a transformers causal LM, registered with ``AutoConfig`` and ``AutoModelForCausalLM``
  when this package is imported.
- :class:`NSAGenerationCache`: the project's KV cache as ``generate``'s cache.
- :func:`convert_checkpoint` / :func:`load_checkpoint`: the training job's ``checkpoint.pt`` as a transformers model
  (command line: ``nsa-dist export-hf``).

``import nsa_dist`` does not import transformers; importing this package does (ImportError naming the extra when it
is missing).
"""
from .requirements import require_transformers

require_transformers()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .cache import NSAGenerationCache  # noqa: E402
from .configuration import NSAGPTConfig  # noqa: E402
from .convert import convert_checkpoint, load_checkpoint  # noqa: E402
from .modeling import NSAGPTForCausalLM  # noqa: E402

AutoConfig.register(NSAGPTConfig.model_type, NSAGPTConfig)
AutoModelForCausalLM.register(NSAGPTConfig, NSAGPTForCausalLM)

__all__ = ["NSAGPTConfig", "NSAGPTForCausalLM", "NSAGenerationCache", "convert_checkpoint", "load_checkpoint"]
