"""Config schema, loading, overrides, error messages and the DeepSpeed block (mixfast.config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from mixfast.config import (
    DEEPSPEED_DEFAULTS,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_reference_markdown,
    dump_config,
    load_config,
    to_deepspeed_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.json"))
# Real data sets are not on the test machine; the synthetic set needs no data.root on disk.
NO_DISK = ("data.name=synthetic",)


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path


def synthetic(**sections) -> dict:
    """A minimal valid config dict (synthetic data) with the given sections added."""
    return {"data": {"name": "synthetic"}, **sections}


def leaf_paths(model: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, found by walking the pydantic fields."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths += leaf_paths(field.annotation, f"{path}.")
        else:
            paths.append(path)
    return paths


# --- shipped configs ------------------------------------------------------------------------------


def test_configs_directory_is_not_empty():
    names = {p.name for p in CONFIG_FILES}
    assert {"in1k_mixmask.json", "cifar100_moco_mixmask_unmix.json", "tinyimagenet_moco_mixmask.json", "demo.json"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, NO_DISK)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_writes_every_key(path):
    """A config is documentation: each file spells out every schema key."""
    raw = json.loads(path.read_text())
    missing = []
    for dotted in leaf_paths():
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(dotted)
                break
            node = node[part]
    assert missing == []


def test_in1k_config_matches_spec_imagenet_column():
    cfg = load_config(REPO / "configs/in1k_mixmask.json", NO_DISK)
    assert (cfg.model.arch, cfg.model.head, cfg.model.feature_dim) == ("resnet50", "mlp", 128)
    assert (cfg.method.queue_size, cfg.method.momentum, cfg.method.temperature) == (65536, 0.999, 0.2)
    assert (cfg.mixing.mixmask.kind, cfg.mixing.mixmask.grid, cfg.mixing.mixmask.ratio) == ("block", 8, 0.5)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch_size) == (0.03, 1e-4, 256)
    assert cfg.deepspeed == {"gradient_clipping": 0.0, "zero_optimization": {"stage": 0}}


def test_cifar_config_matches_spec_cifar_column():
    cfg = load_config(REPO / "configs/cifar100_moco_mixmask_unmix.json", NO_DISK)
    assert (cfg.model.arch, cfg.model.cifar_stem, cfg.model.head, cfg.model.bn_splits) == ("resnet18", True, "linear", 8)
    assert (cfg.method.queue_size, cfg.method.momentum, cfg.method.temperature, cfg.method.symmetric) == (4096, 0.99, 0.1, True)
    assert cfg.mixing.mixmask.grid == 2 and cfg.mixing.unmix.enabled and cfg.mixing.unmix.prob_mixup == 0.5
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch_size, cfg.train.epochs) == (0.06, 5e-4, 512, 1000)


def test_demo_config_needs_no_data_on_disk():
    cfg = load_config(REPO / "configs/demo.json")
    assert cfg.data.name == "demo" and cfg.train.precision == "fp32"


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_follow_spec_imagenet_column():
    cfg = RunConfig.model_validate(synthetic())
    assert cfg.model.arch == "resnet50" and cfg.model.head == "mlp" and cfg.model.feature_dim == 128
    assert cfg.method.queue_size == 65536 and cfg.method.momentum == 0.999 and cfg.method.temperature == 0.2
    assert cfg.mixing.mixmask.kind == "block" and cfg.mixing.mixmask.grid == 8 and cfg.mixing.mixmask.ratio == 0.5
    assert cfg.mixing.unmix.prob_mixup == 0.5 and cfg.mixing.unmix.alpha == 1.0
    assert cfg.optim.lr == 0.03 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.eval.knn_k == 200 and cfg.eval.knn_t == 0.1
    assert DEEPSPEED_DEFAULTS["gradient_clipping"] == 0.0


def test_dump_config_round_trips_with_tuples_as_lists(tmp_path):
    cfg = load_config(write_config(tmp_path, synthetic(mixing={"mixmask": {"ratio": [0.25, 0.75]}})))
    dumped = dump_config(cfg)
    assert dumped["mixing"]["mixmask"]["ratio"] == [0.25, 0.75]
    assert load_config(write_config(tmp_path, json.loads(json.dumps(dumped)))) == cfg


# --- error messages -------------------------------------------------------------------------------


def test_unknown_nested_key_names_full_path_allowed_keys_and_suggestion(tmp_path):
    path = write_config(tmp_path, synthetic(mixing={"mixmask": {"gird": 4}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "mixing.mixmask.gird" in message
    assert "allowed keys: enabled, kind, grid, ratio, per_sample, fill, switch" in message
    assert "did you mean mixing.mixmask.grid" in message
    assert str(path) in message


def test_unknown_top_level_key_lists_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer: unknown key; allowed keys: model, method, mixing, masker, mae, mixedae, data, optim"):
        load_config(write_config(tmp_path, synthetic(optimizer={})))


def test_mistyped_value_names_path_value_and_reason(tmp_path):
    path = write_config(tmp_path, synthetic(mixing={"mixmask": {"grid": "eight"}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert 'mixing.mixmask.grid = "eight"' in str(err.value)
    assert "valid integer" in str(err.value)


def test_every_error_is_listed_one_per_line(tmp_path):
    path = write_config(tmp_path, synthetic(train={"epochs": 0, "batch_size": "big"}, log={"evry_steps": 1}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 3
    assert any(line.strip().startswith("train.epochs = 0:") for line in lines)
    assert any(line.strip().startswith('train.batch_size = "big":') for line in lines)
    assert any(line.strip().startswith("log.evry_steps: unknown key") for line in lines)


def test_field_validator_error_names_path(tmp_path):
    with pytest.raises(ConfigError, match=r"mixing\.mixmask\.ratio = 1\.5: ratio must lie in \(0, 1\)"):
        load_config(write_config(tmp_path, synthetic(mixing={"mixmask": {"ratio": 1.5}})))


def test_ratio_range_may_span_zero_to_one_as_in_paper_table_1():
    assert RunConfig.model_validate(synthetic(mixing={"mixmask": {"ratio": [0.0, 1.0]}})).mixing.mixmask.ratio == (0.0, 1.0)
    with pytest.raises(ValueError):
        RunConfig.model_validate(synthetic(mixing={"mixmask": {"ratio": [0.75, 0.25]}}))


def test_missing_data_root_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root is required"):
        load_config(write_config(tmp_path, {"data": {"name": "cifar10"}}))


def test_data_root_that_does_not_exist_names_path_and_key(tmp_path):
    missing = tmp_path / "no-such-imagenet"
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, {"data": {"name": "imagefolder", "root": str(missing)}}))
    assert str(missing) in str(err.value) and "data.root" in str(err.value)


def test_data_root_that_exists_loads(tmp_path):
    cfg = load_config(write_config(tmp_path, {"data": {"name": "cifar100", "root": str(tmp_path)}}))
    assert cfg.data.root == str(tmp_path)


def test_missing_config_file_names_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train": {"epochs": 10,}\n}')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and "column" in str(err.value)


def test_top_level_must_be_an_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(write_config(tmp_path, [1, 2]))


# --- --set overrides ------------------------------------------------------------------------------


def test_overrides_parse_json_values_and_fall_back_to_strings(tmp_path):
    cfg = load_config(write_config(tmp_path, synthetic()), [
        "mixing.mixmask.grid=4",                # int
        "method.temperature=0.07",              # float
        "method.symmetric=true",                # bool
        "mixing.mixmask.ratio=[0.25,0.75]",     # list -> tuple
        "train.output_dir=runs/x",              # not JSON -> string
        "train.max_steps=null",                 # null
    ])
    assert cfg.mixing.mixmask.grid == 4
    assert cfg.method.temperature == 0.07
    assert cfg.method.symmetric is True
    assert cfg.mixing.mixmask.ratio == (0.25, 0.75)
    assert cfg.train.output_dir == "runs/x"
    assert cfg.train.max_steps is None


def test_override_of_string_field_keeps_numeric_text(tmp_path):
    cfg = load_config(write_config(tmp_path, synthetic()), ["train.resume=1000", "data.root=null"])
    assert cfg.train.resume == "1000" and cfg.data.root is None


def test_override_selects_data_set_by_plain_name(tmp_path):
    cfg = load_config(write_config(tmp_path, {"data": {"name": "imagefolder", "root": "/no/such/dir"}}),
                      ["data.name=synthetic"])
    assert cfg.data.name == "synthetic"


def test_overrides_create_nested_deepspeed_keys(tmp_path):
    cfg = load_config(write_config(tmp_path, synthetic()),
                      ["deepspeed.zero_optimization.stage=2", "deepspeed.flops_profiler.enabled=true"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}, "flops_profiler": {"enabled": True}}


def test_overrides_merge_into_existing_deepspeed_dict(tmp_path):
    path = write_config(tmp_path, synthetic(deepspeed={"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    cfg = load_config(path, ["deepspeed.zero_optimization.stage=0"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 0, "overlap_comm": True}}


def test_later_override_wins(tmp_path):
    cfg = load_config(write_config(tmp_path, synthetic()), ["train.epochs=3", "train.epochs=5"])
    assert cfg.train.epochs == 5


def test_override_of_unknown_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, synthetic()), ["mixing.mixmask.gird=4"])
    assert "mixing.mixmask.gird" in str(err.value)
    assert "allowed keys: enabled, kind, grid" in str(err.value)
    assert "did you mean mixing.mixmask.grid" in str(err.value)


def test_override_below_a_leaf_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs is a value, not a section"):
        load_config(write_config(tmp_path, synthetic()), ["train.epochs.max=3"])


def test_override_without_equals_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write_config(tmp_path, synthetic()), ["train.epochs"])


def test_override_with_bad_value_names_path(tmp_path):
    with pytest.raises(ConfigError, match=r'mixing\.mixmask\.grid = "eight"'):
        load_config(write_config(tmp_path, synthetic()), ["mixing.mixmask.grid=eight"])


def test_config_from_dict_applies_overrides_validates_and_checks_the_data_root(tmp_path):
    cfg = config_from_dict({"model": {"arch": "resnet18"}}, ["data.name=synthetic", "model.width=16"], source="dict")
    assert (cfg.data.name, cfg.model.arch, cfg.model.width) == ("synthetic", "resnet18", 16)
    with pytest.raises(ConfigError, match=r"invalid config from-eval:\n  model\.width"):
        config_from_dict(synthetic(), ["model.width=\"wide\""], source="from-eval")
    missing = tmp_path / "no-such-imagenet"
    with pytest.raises(ConfigError, match=r"data\.root: .*no-such-imagenet does not exist"):
        config_from_dict({"data": {"name": "imagefolder", "root": str(missing)}}, source="dict")


# --- DeepSpeed block ------------------------------------------------------------------------------


def config(**sections) -> RunConfig:
    return RunConfig.model_validate(synthetic(**sections))


def test_deepspeed_config_fills_batch_sizes_and_keeps_defaults():
    ds = to_deepspeed_config(config(train={"batch_size": 256}), world_size=4)
    assert ds["train_batch_size"] == 256
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0 and ds["zero_allow_untested_optimizer"] is True


def test_deepspeed_config_deep_merges_user_section():
    ds = to_deepspeed_config(config(deepspeed={"zero_optimization": {"overlap_comm": True}}), world_size=1)
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True}


def test_deepspeed_config_does_not_share_dicts_with_the_defaults():
    ds = to_deepspeed_config(config(), world_size=1)
    ds["zero_optimization"]["stage"] = 3
    assert DEEPSPEED_DEFAULTS["zero_optimization"] == {"stage": 0}


def test_bf16_precision_uses_torch_autocast_with_deepspeed_casting_off():
    ds = to_deepspeed_config(config(train={"precision": "bf16"}), world_size=1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_fp32_precision_has_no_autocast():
    ds = to_deepspeed_config(config(train={"precision": "fp32"}), world_size=1)
    assert "torch_autocast" not in ds
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("block", ["bf16", "fp16"])
def test_deepspeed_weight_casting_is_refused(block):
    with pytest.raises(ConfigError, match=rf"deepspeed\.{block}\.enabled.*train\.precision"):
        to_deepspeed_config(config(deepspeed={block: {"enabled": True}}), world_size=1)


def test_deepspeed_bf16_is_refused_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match="momentum"):
        load_config(write_config(tmp_path, synthetic()), ["deepspeed.bf16.enabled=true"])


def test_user_may_keep_deepspeed_bf16_disabled():
    ds = to_deepspeed_config(config(deepspeed={"bf16": {"enabled": False}}), world_size=1)
    assert ds["bf16"] == {"enabled": False}


def test_indivisible_batch_is_refused_naming_key_and_world_size():
    with pytest.raises(ConfigError, match=r"train\.batch_size=100 .*world size 3"):
        to_deepspeed_config(config(train={"batch_size": 100}), world_size=3)


def test_batch_keys_set_by_user_are_refused():
    with pytest.raises(ConfigError, match=r"deepspeed\.train_batch_size.*train\.batch_size"):
        to_deepspeed_config(config(deepspeed={"train_batch_size": 64}), world_size=1)


# --- reference documentation and command line -----------------------------------------------------


def test_markdown_reference_mentions_every_leaf_key():
    markdown = config_reference_markdown()
    leaves = leaf_paths()
    assert "mixing.mixmask.grid" in leaves and "deepspeed" in leaves  # the walk reaches nested sections
    missing = [path for path in leaves if f"| `{path}` |" not in markdown]
    assert missing == []


def test_markdown_reference_shows_type_default_and_description():
    row = next(line for line in config_reference_markdown().splitlines() if line.startswith("| `mixing.mixmask.grid` |"))
    assert "int (≥ 2, ≤ 64)" in row and "`8`" in row and "Mask grid size" in row


def test_command_line_prints_resolved_config(tmp_path):
    path = write_config(tmp_path, synthetic())
    result = subprocess.run(
        [sys.executable, "-m", "mixfast.config", "--config", str(path), "--set", "train.epochs=7"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train"]["epochs"] == 7


def test_readme_documents_every_key_as_the_schema_does():
    from mixfast.config import replace_reference_block

    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert replace_reference_block(text) == text, (
        "README's config reference is stale: run `python -m mixfast.config --readme README.md`")
