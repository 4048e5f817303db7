"""Without transformers (or with one older than 5.24), ``import nsa_dist`` works and ``import nsa_dist.hf`` names the
extra to install."""
import subprocess
import sys
from unittest import mock

import pytest

SCRIPT = """
import sys
sys.modules["transformers"] = None  # what an environment without transformers gives: ImportError on import
import nsa_dist
try:
    import nsa_dist.hf
except ImportError as err:
    print(err)
"""


def test_missing_transformers_names_the_extra():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    assert 'pip install "nsa-dist[hf]"' in out and "transformers>=5.24" in out, out


def test_import_nsa_dist_does_not_import_transformers():
    code = "import sys, nsa_dist, nsa_dist.inference; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_too_old_transformers_names_the_extra():
    pytest.importorskip("transformers")
    from nsa_dist.hf.requirements import require_transformers

    with mock.patch("importlib.metadata.version", return_value="5.23.0"):
        with pytest.raises(ImportError, match=r'(?s)found transformers==5\.23\.0.*pip install "nsa-dist\[hf\]"'):
            require_transformers()
