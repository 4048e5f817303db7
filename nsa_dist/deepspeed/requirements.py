"""The optional deepspeed dependency: a clear error naming the pip extra when it is missing."""
from __future__ import annotations


def require_deepspeed() -> None:
    """Raise ``ImportError`` naming the extra to install when deepspeed is not importable."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the DeepSpeed backend needs deepspeed: pip install 'nsa-dist[deepspeed]' (import "
                          f"failed: {err})") from err
