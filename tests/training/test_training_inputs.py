"""Bad training configs, YAML files and layer/model inputs fail before any work with an error naming the setting,
its value and what is allowed; YAML 1.2 numbers such as ``1e-3`` are numbers."""
import math
import re

import pytest
import torch

from nsa_dist import GPT, GPTConfig, NativeSparseAttention, NSAConfig
from nsa_dist.data import ByteTextDataset
from nsa_dist.models import DenseAttention
from nsa_dist.train import main as train_main
from nsa_dist.train import train
from nsa_dist.training import TrainConfig

TINY = "configs/train/tiny-cpu.yaml"
LAYER = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, block_len=8, stride=4, select_len=8,
             top_n=3, window=8)


def _tiny_raw():
    raw = TrainConfig.load(TINY).to_dict()
    raw["train"].update(cp=1, steps=2, eval_batches=1, batch_size=2)
    return raw


@pytest.mark.parametrize("key,value,message", [
    ("grad_clip", -1, "train.grad_clip must be >= 0, got -1 (the largest gradient norm; 0 turns clipping off)"),
    ("grad_clip", math.nan, "train.grad_clip must be finite (>= 0), got nan"),
    ("min_lr_ratio", 1.5, "train.min_lr_ratio must be a number in [0, 1], got 1.5"),
    ("min_lr_ratio", -0.1, "train.min_lr_ratio must be a number in [0, 1], got -0.1"),
    ("warmup_steps", -5, "train.warmup_steps must be a non-negative int, got -5"),
    ("weight_decay", -0.1, "train.weight_decay must be >= 0, got -0.1"),
    ("weight_decay", "0.1", "train.weight_decay must be a number (>= 0), got str '0.1'"),
    ("betas", [0.9, 0.95, 0.99], "train.betas must be a list of two numbers [beta1, beta2] in [0, 1), got"),
    ("betas", "0.9", "train.betas must be a list of two numbers"),
    ("betas", [0.9, 1.0], "train.betas[1] must be a number in [0, 1), got 1.0"),
    ("betas", [-0.1, 0.9], "train.betas[0] must be a number in [0, 1), got -0.1"),
    ("lr", "1e-3", "train.lr must be a number (> 0), got str '1e-3'"),
    ("lr", math.inf, "train.lr must be finite (> 0), got inf"),
    ("lr", 0, "train.lr must be > 0, got 0"),
    ("threads", 0, "train.threads must be a positive int or null, got 0"),
    ("keep_checkpoints", 0, "train.keep_checkpoints must be a positive int or null, got 0"),
    ("loss_chunk_tokens", -1, "train.loss_chunk_tokens must be a non-negative int, got -1"),
    ("loss_chunk_tokens", 1.5, "train.loss_chunk_tokens must be a non-negative int, got 1.5"),
    ("activation_checkpointing", "yes", "train.activation_checkpointing must be true or false, got 'yes'"),
])
def test_optimizer_settings_rejected(key, value, message):
    raw = _tiny_raw()
    raw["train"][key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict(raw)


@pytest.mark.parametrize("section,key,value,message", [
    ("model", "rope_theta", "1e4", "rope_theta must be a number (> 0), got str '1e4'"),
    ("model", "norm_eps", 0.0, "norm_eps must be > 0, got 0.0"),
    ("model", "init_std", -0.02, "init_std must be > 0, got -0.02"),
    ("model", "tie_embeddings", 1, "tie_embeddings must be true or false, got 1"),
    ("model", "head_dim", 0, "head_dim must be a positive int or null, got 0"),
    ("model", "nsa", [1, 2], "model.nsa must be a mapping, got list"),
    (None, "seed", -1, "seed must be a non-negative int, got -1"),
    (None, "out_dir", 3, "out_dir must be a directory path, got 3"),
])
def test_model_and_top_level_settings_rejected(section, key, value, message):
    raw = _tiny_raw()
    (raw[section] if section else raw)[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict(raw)


@pytest.mark.parametrize("override,message", [
    (dict(softmax_scale=math.nan), "softmax_scale must be finite (> 0 or None), got nan"),
    (dict(rope_theta=-1.0), "rope_theta must be > 0, got -1.0"),
    (dict(selection_loss_weight=math.inf), "selection_loss_weight must be finite (>= 0), got inf"),
    (dict(use_rope="false"), "use_rope must be true or false, got 'false'"),
])
def test_nsa_config_real_and_bool_fields(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NSAConfig(**{**LAYER, **override})


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """PyYAML reads ``1e-3`` as a string; the project's loader reads YAML 1.2 floats, as users write them."""
    text = open(TINY).read().replace("lr: 6.0e-3", "lr: 6e-3").replace("weight_decay: 0.1", "weight_decay: 1e-1")
    text = text.replace("  nsa:\n", "  rope_theta: 1e4\n  nsa:\n")
    assert "lr: 6e-3" in text and "weight_decay: 1e-1" in text and "rope_theta: 1e4" in text
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    config = TrainConfig.load(path)
    assert (config.train.lr, config.train.weight_decay, config.model["rope_theta"]) == (6e-3, 0.1, 1e4)
    assert TrainConfig.load(TINY).train.lr == config.train.lr


@pytest.mark.parametrize("text,error,message", [
    ("", ValueError, "is empty: it needs at least one of the sections model, data, train"),
    ("# only a comment\n", ValueError, "is empty"),
    ("- model\n- train\n", ValueError, "must hold a mapping of sections (model:, data:, train:), got list"),
    ("train: [1, 2]\n", ValueError, "section 'train' must be a mapping, got list"),
    ("data: seq_len\n", ValueError, "section 'data' must be a mapping, got str"),
    ("model: 3\n", ValueError, "section 'model' must be a mapping, got int"),
    ("train: {steps: 3\n", ValueError, "is not valid YAML"),
])
def test_bad_yaml_files(tmp_path, text, error, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=re.escape(message)):
        TrainConfig.load(path)


def test_config_paths(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(f"config file {str(tmp_path)!r} is a directory")):
        train_main(["--config", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"text data file {str(path)!r} is empty (0 bytes)")):
        ByteTextDataset(path)


@pytest.mark.parametrize("make_out_dir", [
    lambda tmp: tmp / "a-file",                 # an existing file
    lambda tmp: tmp / "a-file" / "runs",        # below a file: cannot be created (also as root)
], ids=["file", "below-file"])
def test_unwritable_out_dir_fails_before_training(tmp_path, make_out_dir, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    raw = _tiny_raw()
    raw["out_dir"] = str(make_out_dir(tmp_path))
    config = TrainConfig.from_dict(raw)
    steps = []
    monkeypatch.setattr("nsa_dist.training.plain.batch_loss", lambda *a, **k: steps.append(1))
    with pytest.raises(ValueError, match=re.escape(f"out_dir={raw['out_dir']!r}")):
        train(config, progress=False)
    assert not steps, "training started before out_dir was checked"


@pytest.fixture(params=["nsa", "dense"])
def layer(request):
    if request.param == "nsa":
        return NativeSparseAttention(NSAConfig(**LAYER))
    return DenseAttention(32, 4, 2, 8)


def test_layer_rejects_position_ids_of_wrong_length(layer, seed):
    x = torch.randn(2, 19, 32)
    for bad in (torch.arange(18), torch.arange(19).expand(3, 19), torch.arange(19).expand(2, 1, 19)):
        with pytest.raises(ValueError, match=re.escape(f"position_ids must be [T] = [19] or [B, T] = [2, 19], got "
                                                       f"shape {tuple(bad.shape)}")):
            layer(x, position_ids=bad)
    with pytest.raises(TypeError, match="position_ids must be an integer tensor, got torch.float32"):
        layer(x, position_ids=torch.arange(19.0))
    layer(x, position_ids=torch.arange(19))


def test_layer_rejects_half_input_into_fp32_layer(layer, seed):
    x = torch.randn(1, 19, 32)
    with pytest.raises(TypeError, match=re.escape("x has dtype torch.float16 but the layer's parameters are "
                                                  "torch.float32")):
        layer(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the projections' precision itself
        assert torch.isfinite(layer(x.bfloat16())).all()


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_gpt_rejects_token_ids_out_of_range(attention, seed):
    model = GPT(GPTConfig(vocab_size=11, hidden_size=32, num_heads=4, num_kv_heads=2, attention=attention,
                          nsa={k: LAYER[k] for k in ("block_len", "stride", "select_len", "top_n", "window")}))
    tokens = torch.randint(0, 11, (2, 17))
    model(tokens)
    for bad, span in ((11, "[0, 11]"), (-1, "[-1, 10]")):
        t = tokens.clone()
        t[1, 5] = bad
        t[0, 0], t[0, 1] = 0, 10
        with pytest.raises(ValueError, match=re.escape(f"tokens must be ids in [0, vocab_size=11), got values in "
                                                       f"{span}")):
            model(t)
    with pytest.raises(TypeError, match="tokens must be an integer tensor of token ids, got torch.float32"):
        model(tokens.float())
