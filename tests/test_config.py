"""Configs travel with the model: JSON round trips, schema versions and clear refusals."""

from __future__ import annotations

import json

import pytest

from runtime.config import (
    SCHEMA_VERSION, ConfigError, DDPMUNetConfig, KerasUNetConfig, ModelSpec, NormalizationConfig, ScheduleConfig,
)
from trainer.config import RunConfig, TrainConfig
from trainer.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_run_config_round_trips_through_json(name):
    cfg = get_preset(name).config
    spec = cfg.to_spec(NormalizationConfig(mean=(0.5,) * cfg.model.channels, std=(0.25,) * cfg.model.channels))
    back = ModelSpec.from_json(spec.to_json())
    assert back.model == cfg.model and back.schedule == cfg.schedule
    assert back.normalization == spec.normalization
    assert RunConfig.from_spec(back) == cfg
    assert json.loads(spec.to_json())["schema_version"] == SCHEMA_VERSION == 2


def spec_dict():
    cfg = get_preset("fashion-mnist").config
    return json.loads(cfg.to_spec(NormalizationConfig(mean=(0.3,), std=(0.3,))).to_json())


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("schema_version"), "no schema_version"),
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.pop("schedule"), "no 'schedule' section"),
        (lambda d: d["model"].update(architecture="vit"), "unknown architecture 'vit'; allowed: keras, ddpm, diffusers"),
        (lambda d: d["model"].update(conditioning="class"), "unknown conditioning 'class'; allowed: noise_variance"),
        (lambda d: d["model"].update(conditioning="timestep"), "'timestep' needs a discrete schedule"),
        (lambda d: d["schedule"].update(clip_sample_range=0), "clip_sample_range must be > 0"),
        (lambda d: d["model"].update(depth=3), "unknown key.*depth.*allowed"),
        (lambda d: d["model"].update(widths="32"), "must be a list"),
        (lambda d: d["model"].update(image_size="32"), "must be an integer"),
        (lambda d: d["schedule"].update(name="sigmoid"), "allowed: cosine-angle"),
        (lambda d: d["normalization"].update(mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0]), "3 channels"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(mutate, message):
    d = spec_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_dict(d)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config"):
        ModelSpec.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.load(bad)


def test_widths_must_fit_the_image_size():
    with pytest.raises(ConfigError, match="does not fit widths.*multiple of 8"):
        KerasUNetConfig(image_size=36, channels=3, widths=(32, 64, 96, 128))
    KerasUNetConfig(image_size=40, channels=3, widths=(32, 64, 96, 128))


def test_training_config_validation():
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(steps=10, epochs=1)
    with pytest.raises(ConfigError, match="steps or epochs"):
        TrainConfig()
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(steps=1, batch_size=0)
    with pytest.raises(ConfigError, match="allowed: mae, mse"):
        TrainConfig(steps=1, loss="huber")  # type: ignore[arg-type]


def test_x0_bounds_follow_normalisation():
    lo, hi = NormalizationConfig(mean=(0.5, 0.25), std=(0.5, 0.25)).x0_bounds()
    assert lo == pytest.approx((-1.0, -1.0)) and hi == pytest.approx((1.0, 3.0))
    assert ScheduleConfig().discrete is False and ScheduleConfig(name="linear").discrete is True


# A non-default value for every config field of every architecture, as typed and as stored.
CLI_VALUES = {
    ("model", "image_size"): ("64", 64),
    ("model", "channels"): ("3", 3),
    ("model", "embedding_min_frequency"): ("2", 2.0),
    ("model", "embedding_max_frequency"): ("500", 500.0),
    ("model", "widths"): ("8,16", (8, 16)),
    ("model", "block_depth"): ("1", 1),
    ("model", "embedding_dims"): ("8", 8),
    ("model", "base_width"): ("64", 64),
    ("model", "channel_mults"): ("1,2", (1, 2)),
    ("model", "num_res_blocks"): ("1", 1),
    ("model", "attention_resolutions"): ("none", ()),
    ("model", "dropout"): ("0.2", 0.2),
    ("model", "num_groups"): ("16", 16),
    ("model", "num_heads"): ("2", 2),
    ("schedule", "name"): ("linear", "linear"),
    ("schedule", "num_timesteps"): ("500", 500),
    ("schedule", "beta_start"): ("0.0002", 0.0002),
    ("schedule", "beta_end"): ("0.03", 0.03),
    ("schedule", "cosine_s"): ("0.01", 0.01),
    ("schedule", "min_signal_rate"): ("0.05", 0.05),
    ("schedule", "max_signal_rate"): ("0.9", 0.9),
    ("schedule", "clip_sample"): (None, True),
    ("schedule", "clip_sample_range"): ("1.5", 1.5),
    ("model", "conditioning"): ("timestep", "timestep"),
    ("data", "source"): ("folder", "folder"),
    ("data", "split"): ("val", "val"),
    ("data", "val_fraction"): ("0.3", 0.3),
    ("data", "split_seed"): ("7", 7),
    ("data", "random_flip"): (None, True),
    ("data", "normalization"): ("minus-one-one", "minus-one-one"),
    ("train", "batch_size"): ("8", 8),
    ("train", "lr"): ("0.0005", 0.0005),
    ("train", "weight_decay"): ("0.001", 0.001),
    ("train", "ema_decay"): ("0.99", 0.99),
    ("train", "ema_warmup"): (None, False),
    ("train", "loss"): ("mse", "mse"),
    ("train", "steps"): ("7", 7),
    ("train", "epochs"): ("3", 3),
    ("train", "dataset_repetitions"): ("2", 2),
    ("train", "warmup_steps"): ("5", 5),
    ("train", "grad_clip"): ("0.5", 0.5),
    ("train", "precision"): ("bf16", "bf16"),
    ("train", "seed"): ("3", 3),
    ("train", "sample_every"): ("9", 9),
    ("train", "sample_steps"): ("4", 4),
    ("train", "num_samples"): ("6", 6),
    ("train", "checkpoint_every"): ("11", 11),
    ("train", "keep_checkpoints"): ("2", 2),
    ("train", "log_every"): ("3", 3),
}
# Values that are valid only beside another option.
CLI_CONTEXT = {("model", "conditioning"): ["--schedule", "linear"]}


def _print_config(*args: str) -> dict:
    import json

    from click.testing import CliRunner

    from trainer.cli import main

    result = CliRunner().invoke(main, ["fit", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_every_config_field_of_every_architecture_round_trips_through_the_cli():
    """fit's options are generated from the dataclasses: each field has a flag, and the value typed
    is the value in the resolved config."""
    import dataclasses as dc

    from runtime.config import MODEL_CONFIGS, ScheduleConfig
    from trainer.cli import CONFIG_OPTIONS
    from trainer.config import DataConfig, TrainConfig

    fields = {("model", f.name) for cls in MODEL_CONFIGS.values() for f in dc.fields(cls)} - {("model", "architecture")}
    for section, cls in (("schedule", ScheduleConfig), ("data", DataConfig), ("train", TrainConfig)):
        fields |= {(section, f.name) for f in dc.fields(cls)}
    assert fields == set(CLI_VALUES), "add a test value for every new config field"
    flags = {(o.section, o.field): o.opts[0] for o in CONFIG_OPTIONS}
    assert fields <= set(flags), f"no option for {sorted(fields - set(flags))}"

    for (section, name), (typed, stored) in CLI_VALUES.items():
        keras = section != "model" or name in {f.name for f in dc.fields(MODEL_CONFIGS["keras"])}
        preset = ["--preset", "fashion-mnist" if keras else "cifar10-64"]
        if typed is None:  # an on/off flag: set it to the opposite of the preset's
            flag = flags[(section, name)] if stored else flags[(section, name)].replace("--", "--no-", 1)
            args = [flag]
        else:
            args = [flags[(section, name)], typed]
        cfg = _print_config(*preset, *args, *CLI_CONTEXT.get((section, name), []))
        value = cfg[section][name]
        assert (tuple(value) if isinstance(value, list) else value) == stored, (section, name, cfg[section])


def test_cli_switches_architecture_and_refuses_the_other_u_nets_fields():
    from click.testing import CliRunner

    from trainer.cli import main

    cfg = _print_config("--preset", "cifar10-64", "--base-width", "64")
    assert cfg["model"]["base_width"] == 64 and cfg["model"]["architecture"] == "ddpm"
    cfg = _print_config("--architecture", "ddpm", "--base-width", "32", "--num-groups", "8")
    assert cfg["model"]["architecture"] == "ddpm" and cfg["model"]["image_size"] == 32  # kept from the preset
    assert cfg["model"]["channels"] == 1 and cfg["preset"] == "fashion-mnist"
    result = CliRunner().invoke(main, ["fit", "--preset", "cifar10-64", "--widths", "8,16", "--print-config"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: the ddpm U-Net (preset cifar10-64) has no --widths; "
                                     "they set the keras U-Net: add --architecture keras")


def test_fit_help_groups_options_and_shows_the_presets_values():
    from click.testing import CliRunner

    from trainer.cli import main

    text = CliRunner().invoke(main, ["fit", "--preset", "cifar10-64", "--help"]).output
    headings = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["Run:", "Model (both U-Nets):", "Model: Keras U-Net (--architecture keras):",
                        "Model: DDPM U-Net (--architecture ddpm):", "Noise schedule:", "Data:", "Training:",
                        "Size limits:", "Other options:"], headings
    assert "[default: 64 (cifar10-64)]" in " ".join(text.split())  # --base-width of that preset
    plain = " ".join(CliRunner().invoke(main, ["fit", "--help"]).output.split())
    assert "[default: 32,64,96 (fashion-mnist)]" in plain  # --widths of the default preset


def test_ema_warmup_ramps_decay():
    import torch

    from trainer.ema import EMA

    ema = EMA(torch.nn.Linear(2, 2), decay=0.999, warmup=True)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(90) == 0.91 and ema.decay_at(10**6) == 0.999
    assert EMA(torch.nn.Linear(2, 2), decay=0.999).decay_at(0) == 0.999


def test_every_export_option_field_has_a_generated_flag():
    """ddim-export packs no field by hand: each field of its option dataclasses is one generated option."""
    import dataclasses as dc

    from export.cli import SUB_OPTIONS, main
    from export.int8 import GateOptions, Int8Options
    from export.io_spec import BatchProfile
    from export.pipeline import ExportOptions
    from runtime.common.cliconfig import ConfigOption
    from runtime.common.limits import SizeLimits

    generated = {(p.section, p.field) for p in main.params if isinstance(p, ConfigOption)}
    wanted = {("export", f.name) for f in dc.fields(ExportOptions)} - {("export", n) for n in SUB_OPTIONS | {"opset"}}
    for name, cls in (("profile", BatchProfile), ("int8", Int8Options), ("gate", GateOptions), ("limits", SizeLimits)):
        wanted |= {(name, f.name) for f in dc.fields(cls)}
    assert generated == wanted


def test_schema_1_configs_read_as_noise_variance_conditioning_without_clipping():
    d = spec_dict()
    d["schema_version"] = 1
    for key in ("conditioning",):
        d["model"].pop(key)
    for key in ("clip_sample", "clip_sample_range"):
        d["schedule"].pop(key)
    spec = ModelSpec.from_dict(d)
    assert spec.model.conditioning == "noise_variance" and spec.schedule.clip_sample is False
    d["model"]["conditioning"] = "noise_variance"  # a schema-1 file never had this: it was edited
    with pytest.raises(ConfigError, match="schema_version 1 has no model.conditioning"):
        ModelSpec.from_dict(d)


def test_clip_bounds_follow_the_range_or_the_normalisation():
    model = DDPMUNetConfig(image_size=32, channels=3, conditioning="timestep")
    norm = NormalizationConfig(mean=(0.5,) * 3, std=(0.5,) * 3)
    spec = ModelSpec(model, ScheduleConfig(name="linear"), norm)
    assert spec.clip_bounds() == ((-1.0,) * 3, (1.0,) * 3)
    ranged = ModelSpec(model, ScheduleConfig(name="linear", clip_sample=True, clip_sample_range=2.5), norm)
    assert ranged.clip_bounds() == ((-2.5,) * 3, (2.5,) * 3)
    with pytest.raises(ConfigError, match="needs a discrete schedule"):
        ModelSpec(model, ScheduleConfig(name="cosine-angle"), norm)
