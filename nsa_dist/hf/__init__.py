"""Hugging Face transformers integration (the optional extra ``pip install "nsa-dist[hf]"``).

- :class:`NSAGPTConfig` (``model_type: nsa_gpt``) and :class:`NSAGPTForCausalLM`, the project's
  :class:`~nsa_dist.GPT` as a transformers causal LM, registered with ``AutoConfig`` and ``AutoModelForCausalLM``
  when this package is imported.
- :class:`NSAByteTokenizer`: the byte-level text data's ids (the bytes) as a transformers tokenizer, registered with
  ``AutoTokenizer`` for ``nsa_gpt`` models.
- :class:`NSAGenerationCache`: the project's KV cache as ``generate``'s cache.
- :func:`convert_checkpoint` / :func:`load_checkpoint`: the training job's checkpoints (the plain backend's
  ``checkpoint.pt``, the DeepSpeed backend's checkpoint directories) as a transformers model, with the tokenizer for
  byte-level text (command line: ``nsa-dist export-hf``).

``import nsa_dist`` does not import transformers; importing this package does (ImportError naming the extra when it
is missing). DeepSpeed is imported only to read a DeepSpeed checkpoint.
"""
from .requirements import require_transformers

require_transformers()

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .cache import NSAGenerationCache  # noqa: E402
from .configuration import NSAGPTConfig  # noqa: E402
from .convert import convert_checkpoint, load_checkpoint  # noqa: E402
from .modeling import NSAGPTForCausalLM  # noqa: E402
from .tokenizer import NSAByteTokenizer  # noqa: E402

AutoConfig.register(NSAGPTConfig.model_type, NSAGPTConfig)
AutoModelForCausalLM.register(NSAGPTConfig, NSAGPTForCausalLM)
AutoTokenizer.register(NSAGPTConfig, tokenizer_class=NSAByteTokenizer)

__all__ = ["NSAByteTokenizer", "NSAGPTConfig", "NSAGPTForCausalLM", "NSAGenerationCache", "convert_checkpoint",
           "load_checkpoint"]
