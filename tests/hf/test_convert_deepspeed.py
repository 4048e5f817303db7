"""The DeepSpeed training job's checkpoints (ZeRO-2 and ZeRO-3, CP 2 on gloo CPU ranks, byte-level text) export with
``nsa-dist export-hf`` into a transformers model and tokenizer whose logits and greedy generations are those of the
GPT built from the job's YAML holding the weights DeepSpeed's own zero_to_fp32 reassembles."""
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
from tests.helpers.deepspeed_jobs import run_job, write_job  # noqa: E402
from tests.hf.byte_text import random_text  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # DeepSpeed training runs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict:
    """3 steps of tiny-cpu under ZeRO-2 and ZeRO-3 with CP 2 on 2 ranks, on a random UTF-8 corpus, checkpoints
    saved at steps 2 and 3 (DeepSpeed's warm-up starts at lr 0: step 3 is the first to move the weights). Maps the
    ZeRO JSON to the job's YAML."""
    root = tmp_path_factory.mktemp("deepspeed_export")
    corpus = root / "corpus.txt"
    corpus.write_text(random_text(torch.Generator().manual_seed(torch.seed() % 2**63), 3000), encoding="utf-8")
    configs = {}
    for zero_json in ("zero2.json", "zero3.json"):
        path = write_job(root, zero_json[:5], zero_json, cp=2, steps=3, save_every=2)
        config = yaml.safe_load(path.read_text())
        config["data"] = {"kind": "text", "text_file": str(corpus), "seq_len": 256}
        path.write_text(yaml.safe_dump(config))
        metrics = run_job(path, 2)
        assert (metrics["zero_stage"], metrics["cp"]) == (int(zero_json[4]), 2)
        configs[zero_json] = path
    return configs


def reference_gpt(config_path: Path, tag: str) -> GPT:
    """The GPT of the job's YAML (vocabulary: the 256 bytes) holding zero_to_fp32's weights at ``tag``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = TrainConfig.load(config_path)
    model = GPT(config.gpt_config(BYTE_VOCAB))
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(Path(config.out_dir) / "checkpoints"),
                                                                   tag=tag))
    return model.eval()


@pytest.mark.parametrize("zero_json", ["zero2.json", "zero3.json"])
def test_exported_deepspeed_checkpoint_is_the_zero_to_fp32_model(jobs, zero_json, tmp_path, seed):
    checkpoints = Path(TrainConfig.load(jobs[zero_json]).out_dir) / "checkpoints"
    main(["export-hf", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "hf")])  # the latest: step 3
    main(["export-hf", "--checkpoint", str(checkpoints), "--tag", "step2", "--out", str(tmp_path / "hf2")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(model) is NSAGPTForCausalLM and type(tokenizer) is NSAByteTokenizer
    gpt, gpt2 = reference_gpt(jobs[zero_json], "step3"), reference_gpt(jobs[zero_json], "step2")
    assert model.config.gpt_config() == gpt.config and model.generation_config.pad_token_id == 0
    generator = torch.Generator().manual_seed(seed)
    prompts = [random_text(generator, 40), random_text(generator, 9)]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    tokens = batch["input_ids"][:1]  # the longer prompt: no padding
    with torch.no_grad():
        expected = gpt(tokens)
        assert not torch.equal(expected, gpt2(tokens)), "step 3 did not move the weights: the tags are not told apart"
        assert torch.equal(model(tokens).logits, expected), f"seed {seed}"
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")(tokens).logits, gpt2(tokens))
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    lengths = batch["attention_mask"].sum(dim=1)
    right = torch.stack([row.roll(int(n)) for row, n in zip(batch["input_ids"], lengths)])  # left -> right padded
    reference = gpt.generate(right, 12, lengths=lengths)
    for row, n in enumerate(lengths.tolist()):
        width = batch["input_ids"].shape[1]
        assert torch.equal(out[row, width - n:], reference.tokens[row, :n + 12]), f"seed {seed}, row {row}"
        assert tokenizer.decode(out[row, width - n:]).startswith(prompts[row])
