"""The optional megatron-core dependency: a clear error naming the pip extra when it is missing."""
from __future__ import annotations

SUPPORTED = "megatron-core>=0.15,<0.20"


def require_megatron() -> None:
    """Raise ``ImportError`` naming the extra to install when megatron-core is not importable."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as err:
        raise ImportError(f"nsa_dist.megatron needs {SUPPORTED}: pip install 'nsa-dist[megatron]' "
                          f"(import failed: {err})") from err
