"""Field and input checks shared by the configs and layers of ``nsa_dist``: each failure names the setting (or
argument), the value it got and what is allowed.

Integer fields use :func:`nsa_kernels.validation.check_positive_int` and ``check_non_negative_int``; this module
adds real numbers, booleans, choices, mappings and the layers' tensor inputs. Config checks raise ValueError
(also for a value of the wrong type: a config loaded from YAML is one bad value, whatever its type); tensor checks
raise TypeError for a wrong dtype and ValueError for a wrong shape or value.
"""
from __future__ import annotations

import math
import tempfile
from numbers import Real
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from nsa_kernels.validation import check_positive_int


def _number(bound: float) -> str:
    """``bound`` as written in a message: ``0``, ``0.5``, ``1e-05``."""
    return f"{bound:g}"


def describe_range(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                   high_open: bool = False) -> str:
    """The allowed range in words: ``"a number in [0, 1)"``, ``"> 0"``, ``">= 0"``, ``"<= 1"`` or (no bound)
    ``"a finite number"``; ``*_open`` excludes that bound."""
    has_low, has_high = low > -math.inf, high < math.inf
    if has_low and has_high:
        return f"a number in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
    if has_low:
        return f"{'>' if low_open else '>='} {_number(low)}"
    if has_high:
        return f"{'<' if high_open else '<='} {_number(high)}"
    return "a finite number"


def check_real(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False, optional: bool = False, note: str = "") -> None:
    """``value`` must be a finite real number (int or float, not bool) in the range ``low .. high`` (bounds
    included unless ``low_open`` / ``high_open``); None also passes when ``optional``.

    Raises ValueError naming ``name``, the value and the range, e.g. ``train.lr must be > 0, got 0``, ``rope_theta
    must be a number (> 0), got str '1e4'``, ``train.lr must be finite (> 0), got inf``; ``note`` (e.g. ``"0 turns
    clipping off"``) is appended in parentheses."""
    if optional and value is None:
        return
    allowed = describe_range(low, high, low_open, high_open) + (" or None" if optional else "")
    suffix = f" ({note})" if note else ""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number ({allowed}), got {type(value).__name__} {value!r}{suffix}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite ({allowed}), got {value!r}{suffix}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        raise ValueError(f"{name} must be {allowed}, got {value!r}{suffix}")


def check_optional_positive_int(name: str, value: Any) -> None:
    """``value`` must be None (YAML ``null``: the setting is off) or a positive int (ValueError naming ``name``)."""
    if value is not None:
        try:
            check_positive_int(name, value)
        except ValueError:
            raise ValueError(f"{name} must be a positive int or null, got {value!r}") from None


def check_bool(name: str, value: Any) -> None:
    """``value`` must be a bool (YAML ``true`` / ``false``), not 0/1 or a string (ValueError naming ``name``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_one_of(name: str, value: Any, choices: Sequence) -> None:
    """``value`` must be one of ``choices`` (ValueError ``name='x' is not one of (...)``)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def check_mapping(what: str, value: Any) -> None:
    """``value`` must be a dict (a YAML mapping of ``key: value`` lines); ``what`` names it in the ValueError,
    e.g. ``section 'train' must be a mapping, got list``."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {type(value).__name__}")


def check_hidden_states(x: Any, hidden_size: int, param_dtype: torch.dtype) -> None:
    """A layer's input ``x`` must be a ``[B, T, hidden_size]`` tensor in the layer's parameter dtype
    ``param_dtype``, unless autocast is on for its device (then the projections pick their own precision).

    Raises TypeError (not a tensor, or fp16 ``x`` into an fp32 layer) or ValueError (shape)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, T, hidden_size={hidden_size}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"x must be [B, T, hidden_size={hidden_size}], got shape {tuple(x.shape)}")
    if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {param_dtype}: cast x (or the layer, "
                        f"with .to(dtype)) so they agree, or run under torch.autocast")


def check_position_ids(position_ids: Optional[torch.Tensor], batch: int, seq_len: int, length_name: str = "T") \
        -> None:
    """``position_ids`` (None passes) must be an integer tensor ``[T]`` or ``[B, T]`` with ``T = seq_len`` (named
    ``length_name`` in the message, e.g. the global length under context parallelism)."""
    if position_ids is None:
        return
    expected = f"[{length_name}] = [{seq_len}] or [B, {length_name}] = [{batch}, {seq_len}]"
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be an integer tensor {expected}, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if tuple(position_ids.shape) not in ((seq_len,), (batch, seq_len)):
        raise ValueError(f"position_ids must be {expected}, got shape {tuple(position_ids.shape)}")


def check_layer_inputs(x: Any, position_ids: Optional[torch.Tensor], hidden_size: int, param_dtype: torch.dtype,
                       cp_size: int = 1) -> None:
    """The inputs of an attention layer (NSA or dense): ``x`` per :func:`check_hidden_states`, and
    ``position_ids`` per :func:`check_position_ids` over the sequence's length, which under context
    parallelism over ``cp_size`` ranks is the global ``T = cp_size * T_local``."""
    check_hidden_states(x, hidden_size, param_dtype)
    B, T_local = x.shape[:2]
    check_position_ids(position_ids, B, T_local * cp_size, "T" if cp_size == 1 else "global T")


def check_token_ids(tokens: Any, vocab_size: int) -> None:
    """``tokens`` must be an integer tensor ``[B, T]`` of ids in ``[0, vocab_size)``; the range costs one
    min/max reduction (a host sync on GPUs). Raises TypeError (dtype) or ValueError (shape, range)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be an integer tensor [B, T], got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of token ids, got {tokens.dtype}")
    if tokens.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(tokens))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"tokens must be ids in [0, vocab_size={vocab_size}), got values in [{low}, {high}]")


def ensure_writable_dir(path: Any, name: str = "out_dir") -> Path:
    """Create directory ``path`` (and parents) if needed and check that a file can be written in it, so that a
    run fails before its first step, not after training. Returns the ``Path``; raises ValueError naming ``name``
    and the path (not a directory, not creatable, or not writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{name}={str(path)!r} is not writable ({exc.strerror or exc}); choose another out_dir "
                         "(--out-dir)") from exc
    return path
