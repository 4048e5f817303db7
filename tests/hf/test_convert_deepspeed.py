"""The DeepSpeed training job's checkpoints (CP 2 on 2 gloo CPU ranks, byte-level text) export with ``nsa-dist
export-hf`` into a transformers model and tokenizer whose logits and greedy generations are those of the GPT built
from the job's YAML holding the weights DeepSpeed's own zero_to_fp32 reassembles: the ZeRO-2 run of
docs/inference.md's commands as written (its Python example included), and a ZeRO-3 run with two tags."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from nsa_dist import GPT  # noqa: E402
from nsa_dist.cli import main  # noqa: E402
from nsa_dist.data.text import BYTE_VOCAB  # noqa: E402
from nsa_dist.hf import NSAByteTokenizer, NSAGPTForCausalLM  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402
from tests.helpers.deepspeed_jobs import launch, run_job, write_job  # noqa: E402
from tests.hf.byte_text import random_text  # noqa: E402
from tests.hf.inference_doc import REPO, bash_commands, option, run_python_example  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # DeepSpeed training runs
STEPS = 3  # DeepSpeed's warm-up starts at lr 0: step 3 is the first to move the weights


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The jobs' directory, holding a random UTF-8 corpus ``my_corpus.txt`` (the docs' name)."""
    root = tmp_path_factory.mktemp("deepspeed_export")
    generator = torch.Generator().manual_seed(torch.seed() % 2**63)
    (root / "my_corpus.txt").write_text(random_text(generator, 3000), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def docs_job(root) -> Path:
    """docs/inference.md's ``deepspeed`` command for ``STEPS`` steps, its relative paths under ``root`` (the
    launcher runs in the repository); its YAML."""
    train = bash_commands()[0]
    assert train[:2] == ["deepspeed", "--num_gpus"] and "nsa_dist.train" in train, train
    args = train[train.index("nsa_dist.train") + 1:]
    config = REPO / option(args, "--config")
    args = args[:args.index("--config")] + args[args.index("--config") + 2:]
    for name in ("--text-file", "--out-dir"):
        args[args.index(name) + 1] = str(root / option(args, name))
    proc = launch(config, int(option(train, "--num_gpus")), *args, "--steps", str(STEPS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return config


@pytest.fixture(scope="module")
def zero3_job(root) -> Path:
    """tiny-cpu under ZeRO-3, CP 2 on 2 ranks, on the corpus, checkpoints at steps 2 and ``STEPS``; its YAML."""
    path = write_job(root, "zero3", "zero3.json", cp=2, steps=STEPS, save_every=2)
    config = yaml.safe_load(path.read_text())
    config["data"] = {"kind": "text", "text_file": str(root / "my_corpus.txt"), "seq_len": 256}
    path.write_text(yaml.safe_dump(config))
    metrics = run_job(path, 2)
    assert (metrics["zero_stage"], metrics["cp"], metrics["dp"]) == (3, 2, 1)
    return path


def reference_gpt(config_path: Path, checkpoints: Path, tag: str) -> GPT:
    """The GPT of the job's YAML (vocabulary: the 256 bytes) holding zero_to_fp32's weights at ``tag``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = GPT(TrainConfig.load(config_path).gpt_config(BYTE_VOCAB))
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag))
    return model.eval()


def assert_export_is(out_dir: Path, gpt: GPT, seed: int) -> torch.Tensor:
    """The model and tokenizer exported to ``out_dir`` are ``gpt`` and the byte tokenizer: the same logits of a
    random UTF-8 prompt, and greedy ``generate`` on a left-padded batch of two gives ``gpt.generate``'s tokens.
    Returns the logits."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out_dir), AutoTokenizer.from_pretrained(out_dir)
    assert type(model) is NSAGPTForCausalLM and type(tokenizer) is NSAByteTokenizer
    assert model.config.gpt_config() == gpt.config and model.generation_config.pad_token_id == 0
    generator = torch.Generator().manual_seed(seed)
    prompts = [random_text(generator, 40), random_text(generator, 9)]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    tokens = batch["input_ids"][:1]  # the longer prompt: no padding
    with torch.no_grad():
        logits = model(tokens).logits
        assert torch.equal(logits, gpt(tokens)), f"seed {seed}"
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    lengths = batch["attention_mask"].sum(dim=1)
    right = torch.stack([row.roll(int(n)) for row, n in zip(batch["input_ids"], lengths)])  # left -> right padded
    reference = gpt.generate(right, 12, lengths=lengths)
    width = batch["input_ids"].shape[1]
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(out[row, width - n:], reference.tokens[row, :n + 12]), f"seed {seed}, row {row}"
        assert tokenizer.decode(out[row, width - n:]).startswith(prompts[row])
    return logits


def test_docs_deepspeed_commands_export_the_zero_to_fp32_model(root, docs_job, monkeypatch, capsys, seed):
    export = bash_commands()[1]
    assert export[:2] == ["nsa-dist", "export-hf"] and "--tag" not in export, export
    monkeypatch.chdir(root)
    main(export[1:])
    checkpoints, out_dir = root / option(export, "--checkpoint"), root / option(export, "--out")
    assert (checkpoints / "latest").read_text().strip() == f"step{STEPS}"
    metrics = (checkpoints.parent / "metrics.json").read_text()
    assert '"zero_stage": 2' in metrics and '"cp": 2' in metrics
    assert_export_is(out_dir, reference_gpt(docs_job, checkpoints, f"step{STEPS}"), seed)
    printed = run_python_example(capsys)
    assert printed.startswith("The quick brown ") and "\nOnce upon a " in printed, printed


def test_zero3_checkpoint_exports_at_latest_and_at_a_tag(zero3_job, tmp_path, seed):
    checkpoints = Path(TrainConfig.load(zero3_job).out_dir) / "checkpoints"
    main(["export-hf", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "latest")])
    main(["export-hf", "--checkpoint", str(checkpoints), "--tag", "step2", "--out", str(tmp_path / "step2")])
    latest = assert_export_is(tmp_path / "latest", reference_gpt(zero3_job, checkpoints, f"step{STEPS}"), seed)
    step2 = assert_export_is(tmp_path / "step2", reference_gpt(zero3_job, checkpoints, "step2"), seed)
    assert not torch.equal(latest, step2), "the last step did not move the weights: the tags are not told apart"
