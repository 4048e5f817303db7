"""``NSAByteTokenizer``: the byte-level text path of the training job (:class:`~nsa_dist.data.ByteTextDataset`) as a
transformers tokenizer.

The training data's tokens are a file's raw bytes: id ``b`` for byte ``b``, a vocabulary of exactly 256 ids and no
special ids. Text is encoded as its UTF-8 bytes, so a string gives the ids the training data gives the same text
in a UTF-8 file. Arbitrary bytes (not valid UTF-8) pass as strings decoded with ``errors="surrogateescape"``, whose
escapes (U+DC80 to U+DCFF) encode back to the original bytes, or through :meth:`NSAByteTokenizer.encode_bytes`.

Padding uses id 0 (the NUL byte, the ``pad_token_id`` of :meth:`nsa_dist.GPT.generate`): it is declared the pad
token so that ``tokenizer(texts, padding=True)`` works, on the left by default as ``generate`` wants; it is not an
extra id (a NUL byte in the text is the same id 0, and the attention mask tells padding from text). Decoding
therefore keeps id 0 unless ``skip_special_tokens=True``, which drops NUL bytes as padding.
"""
from __future__ import annotations

import codecs
from typing import Dict, Iterable, List, Optional, Tuple, Union

from transformers import AddedToken, PreTrainedTokenizer

from ..data.text import BYTE_VOCAB

PAD = "\x00"


class NSAByteTokenizer(PreTrainedTokenizer):
    """Text as UTF-8 bytes, one id per byte (``0 <= id < 256``), the ids of the training job's byte-level text data.

    Tokens are the one-character strings ``chr(b)`` of the bytes ``b`` (a character code, not the text: byte
    ``0xC3`` is the token ``"Ã"``). ``errors``: how :meth:`decode` turns bytes that are not valid UTF-8 into text,
    as in ``bytes.decode`` (``"replace"``: U+FFFD; ``"surrogateescape"``: a lossless round trip of any bytes);
    :meth:`decode_bytes` returns the bytes themselves. No ids are added to sequences (no BOS/EOS)."""

    vocab_files_names: Dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, errors: str = "replace", pad_token: Union[str, AddedToken] = PAD, padding_side: str = "left",
                 clean_up_tokenization_spaces: bool = False, **kwargs):
        """``errors``: the UTF-8 error handler of :meth:`decode` (LookupError for an unknown one); ``pad_token`` must
        be ``"\\x00"`` (byte 0; ValueError otherwise); ``padding_side``: where ``padding=True`` pads (left for
        ``generate``); other keyword arguments go to ``PreTrainedTokenizer``."""
        if str(pad_token) != PAD:
            raise ValueError(f"pad_token must be {PAD!r} (byte 0): the byte vocabulary has no other id to pad with, "
                             f"got {pad_token!r}")
        codecs.lookup_error(errors)  # LookupError naming an unknown error handler
        self.errors = errors
        super().__init__(errors=errors, pad_token=AddedToken(PAD, special=True, normalized=False),
                         padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)

    @property
    def vocab_size(self) -> int:
        """256: one id per byte value."""
        return BYTE_VOCAB

    def get_vocab(self) -> Dict[str, int]:
        """The 256 tokens ``chr(b)`` and their ids ``b``."""
        return {chr(b): b for b in range(BYTE_VOCAB)}

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        """The tokens ``chr(b)`` of the UTF-8 bytes of ``text`` (surrogate escapes back to their bytes)."""
        return [chr(b) for b in text.encode("utf-8", "surrogateescape")]

    def _convert_token_to_id(self, token: str) -> Optional[int]:
        """The byte of a one-character token below U+0100; None for any other string."""
        return ord(token) if len(token) == 1 and ord(token) < BYTE_VOCAB else None

    def _convert_id_to_token(self, index: int) -> str:
        """``chr(index)``; ValueError naming the id outside ``[0, 256)``."""
        if not 0 <= index < BYTE_VOCAB:
            raise ValueError(f"token id {index} is outside the byte vocabulary [0, {BYTE_VOCAB})")
        return chr(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """The bytes of ``tokens`` decoded as UTF-8 with the tokenizer's ``errors`` handler."""
        return bytes(ord(t) for t in tokens).decode("utf-8", self.errors)

    def encode_bytes(self, data: bytes) -> List[int]:
        """The ids of ``data`` (any bytes): ``list(data)``, what the training data reads from a file holding
        ``data``."""
        return self.encode(bytes(data).decode("utf-8", "surrogateescape"))

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The bytes of ``ids`` (ints or a 1-D tensor), exactly; ``skip_special_tokens`` drops id 0 (padding)."""
        tokens = self.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return bytes(ord(t) for t in tokens)

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, refusing a directory without ``tokenizer_config.json``: ``AutoTokenizer`` maps every
        ``nsa_gpt`` model here, but only models trained on byte-level text are saved with this tokenizer (a model of
        the retrieval task reads the task's ids). OSError naming the directory."""
        if resolved_vocab_files.get("tokenizer_config_file") is None:
            raise OSError(f"{pretrained_model_name_or_path} holds no tokenizer_config.json: nsa-dist export-hf saves "
                          "the byte tokenizer only beside models trained on byte-level text (data.kind: text); a "
                          "model of the synthetic retrieval task takes the task's token ids directly")
        return super()._from_pretrained(resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        """Nothing to write: the vocabulary is the 256 byte values (``tokenizer_config.json`` holds the settings)."""
        return ()
