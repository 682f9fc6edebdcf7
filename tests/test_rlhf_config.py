"""rlhf.config: defaults and help strings, YAML + key=value loading, type conversion, validation, round trip."""

import dataclasses

import pytest

pytest.importorskip("yaml")

from rlhf.config import (  # noqa: E402
    RewardConfig,
    SFTConfig,
    TrainConfig,
    config_help,
    config_to_dict,
    convert_value,
    format_default,
    load_config,
    save_config,
)

CLASSES = [TrainConfig, SFTConfig, RewardConfig]


@pytest.mark.parametrize("cls", CLASSES)
def test_every_field_has_default_and_help(cls):
    for f in dataclasses.fields(cls):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    cls().validate()  # the defaults are valid


def test_stage_defaults():
    sft, rm = SFTConfig(), RewardConfig()
    assert (sft.dataset, sft.output_dir, sft.lr) == ("builtin:sft", "runs/sft", 1e-4)
    assert (rm.dataset, rm.output_dir, rm.center_coef) == ("builtin:preference", "runs/rm", 0.0)
    assert not hasattr(sft, "center_coef")
    assert [f.name for f in dataclasses.fields(RewardConfig)][: len(dataclasses.fields(TrainConfig))] == [
        f.name for f in dataclasses.fields(TrainConfig)
    ]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    # PyYAML reads 1e-4 (no dot) as a string: the field type converts it.
    path.write_text("lr: 1e-4\nbatch_size: 4\nmax_steps: 7\ntokenizer: tok\nprogress: no\n")
    cfg = load_config(SFTConfig, path, ["batch_size=2", "tokenizer=None", "gradient_checkpointing=yes", "lr=3e-4"])
    assert isinstance(cfg, SFTConfig)
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 2 and cfg.max_steps == 7
    assert cfg.tokenizer is None and cfg.progress is False and cfg.gradient_checkpointing is True
    assert cfg.dataset == "builtin:sft"  # untouched fields keep the class default


def test_yaml_float_conversion_without_overrides(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 0\nchunk_size: 64\ncenter_coef: 0.01\n")
    cfg = load_config(RewardConfig, path, [])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)
    assert cfg.chunk_size == 64 and cfg.center_coef == 0.01


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("progress", "true", True),
        ("progress", "False", False),
        ("progress", "1", True),
        ("progress", "0", False),
        ("progress", "yes", True),
        ("progress", "no", False),
        ("batch_size", "16", 16),
        ("batch_size", "1e3", 1000),
        ("max_steps", "-1", -1),
        ("lr", "1e-4", 1e-4),
        ("lr", "2", 2.0),
        ("lora_alpha", "8.5", 8.5),
        ("tokenizer", "None", None),
        ("tokenizer", "null", None),
        ("tokenizer", "gpt2", "gpt2"),
        ("chunk_size", "none", None),
        ("chunk_size", "256", 256),
        ("model", "org/name", "org/name"),
        ("dataset", "builtin:sft", "builtin:sft"),
    ],
)
def test_override_conversion(name, text, expected):
    value = getattr(load_config(SFTConfig, None, [f"{name}={text}"]), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "name, text",
    [
        ("progress", "maybe"),
        ("batch_size", "1.5"),
        ("batch_size", "many"),
        ("batch_size", "None"),
        ("lr", "fast"),
        ("chunk_size", "x"),
    ],
)
def test_bad_value_names_field(name, text):
    with pytest.raises(ValueError, match=name):
        load_config(SFTConfig, None, [f"{name}={text}"])


def test_convert_value_from_yaml_types():
    assert convert_value("batch_size", 4.0, int) == 4
    assert convert_value("progress", 1, bool) is True
    assert convert_value("model", 123, str) == "123"
    with pytest.raises(ValueError, match="progress"):
        convert_value("progress", 2, bool)
    with pytest.raises(ValueError, match="batch_size"):
        convert_value("batch_size", True, int)
    with pytest.raises(ValueError, match="model"):
        convert_value("model", ["a"], str)


def test_unknown_override_suggests_close_names():
    with pytest.raises(ValueError, match="unknown config key 'batchsize'.*batch_size"):
        load_config(SFTConfig, None, ["batchsize=4"])
    with pytest.raises(ValueError, match="'center_coef'"):
        load_config(SFTConfig, None, ["center_coef=0.1"])  # a RewardConfig-only field


def test_unknown_yaml_key_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"'learning_rate' in config file .*c\.yaml"):
        load_config(SFTConfig, path, [])


@pytest.mark.parametrize("item", ["lr", "=3", "lr:3"])
def test_malformed_override(item):
    with pytest.raises(ValueError, match="key=value"):
        load_config(SFTConfig, None, [item])


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(SFTConfig, tmp_path / "missing.yaml", [])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(SFTConfig, tmp_path / "list.yaml", [])
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(SFTConfig, tmp_path / "bad.yaml", [])
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(SFTConfig, tmp_path / "empty.yaml", []) == SFTConfig()


@pytest.mark.parametrize(
    "override, field",
    [
        ("schedule=exp", "schedule"),
        ("overlong=cut", "overlong"),
        ("dtype=fp8", "dtype"),
        ("mixed_precision=fp16", "mixed_precision"),
        ("device=tpu", "device"),
        ("device=cuda:x", "device"),
        ("batch_size=0", "batch_size"),
        ("eval_batch_size=0", "eval_batch_size"),
        ("grad_accum=0", "grad_accum"),
        ("eval_fraction=1.0", "eval_fraction"),
        ("eval_fraction=-0.1", "eval_fraction"),
        ("max_steps=0", "max_steps"),
        ("lr=0", "lr"),
        ("warmup_ratio=1", "warmup_ratio"),
        ("max_grad_norm=-1", "max_grad_norm"),
        ("lora_r=-1", "lora_r"),
        ("lora_dropout=1", "lora_dropout"),
        ("max_length=1", "max_length"),
        ("logging_steps=0", "logging_steps"),
        ("keep_checkpoints=-1", "keep_checkpoints"),
        ("chunk_size=0", "chunk_size"),
        ("model=", "model"),
    ],
)
def test_validate_names_field(override, field):
    with pytest.raises(ValueError, match=field):
        load_config(SFTConfig, None, [override])


def test_validate_rejects_negative_center_coef_and_wrong_types():
    with pytest.raises(ValueError, match="center_coef"):
        load_config(RewardConfig, None, ["center_coef=-1"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        SFTConfig(batch_size="8").validate()
    with pytest.raises(ValueError, match="progress must be bool"):
        SFTConfig(progress=1).validate()
    SFTConfig(lr=1, device="cuda:1", max_steps=5).validate()  # an int is a valid float


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip(cls, tmp_path):
    cfg = load_config(cls, None, ["lr=3e-5", "tokenizer=tok", "chunk_size=32", "progress=false", "max_steps=3"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(cls, path, []) == cfg
    assert list(config_to_dict(cfg)) == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", CLASSES)
def test_config_help_lists_every_field(cls):
    lines = config_help(cls).splitlines()
    fields = dataclasses.fields(cls)
    assert len(lines) == len(fields)
    for line, f in zip(lines, fields):
        words = line.split()
        assert words[0] == f.name
        assert words[3] == format_default(f.default), line
        assert f.metadata["help"] in line


def test_dpo_option_combinations_are_config_errors():
    from rlhf.config import DPOConfig

    with pytest.raises(ValueError, match="label_smoothing"):
        load_config(DPOConfig, None, ["loss_type=hinge", "label_smoothing=0.1"])
    with pytest.raises(ValueError, match="robust"):
        load_config(DPOConfig, None, ["loss_type=robust", "label_smoothing=0.6"])
    with pytest.raises(ValueError, match="simpo_gamma"):
        load_config(DPOConfig, None, ["simpo_gamma=0.5"])
    assert load_config(DPOConfig, None, ["loss_type=simpo", "simpo_gamma=0.5"]).simpo_gamma == 0.5
