"""The optional transformers dependency: a clear error naming the pip extra when it is missing or too old."""
from __future__ import annotations

SUPPORTED = "transformers>=5.24"
INSTALL = 'pip install "nsa-dist[hf]"'


def require_transformers() -> None:
    """Raise ``ImportError`` naming the extra to install when transformers is not importable or older than 5.24
    (which names the generation cache argument ``cache``)."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(f"nsa_dist.hf needs {SUPPORTED}: {INSTALL} (import failed: {err})") from err
    from transformers.utils.versions import require_version

    require_version(SUPPORTED, f"nsa_dist.hf needs it: {INSTALL}")
