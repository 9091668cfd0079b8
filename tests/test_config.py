"""Configs travel with the model: JSON round trips, schema versions and clear refusals."""

from __future__ import annotations

import json

import pytest

from runtime.config import ConfigError, KerasUNetConfig, ModelSpec, NormalizationConfig, ScheduleConfig
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
    assert json.loads(spec.to_json())["schema_version"] == 1


def spec_dict():
    cfg = get_preset("fashion-mnist").config
    return json.loads(cfg.to_spec(NormalizationConfig(mean=(0.3,), std=(0.3,))).to_json())


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("schema_version"), "no schema_version"),
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.pop("schedule"), "no 'schedule' section"),
        (lambda d: d["model"].update(architecture="vit"), "unknown architecture 'vit'; allowed: keras, ddpm"),
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


def test_every_config_field_has_a_cli_option():
    """Options map onto dataclass fields: none is missing, none is orphaned."""
    import dataclasses as dc

    from runtime.config import KerasUNetConfig, ScheduleConfig
    from trainer.cli import DATA_FIELDS, MODEL_FIELDS, SCHEDULE_FIELDS, TRAIN_FIELDS, fit
    from trainer.config import DataConfig

    params = {p.name for p in fit.params}
    assert MODEL_FIELDS == {f.name for f in dc.fields(KerasUNetConfig)} - {"architecture"}
    assert set(SCHEDULE_FIELDS.values()) == {f.name for f in dc.fields(ScheduleConfig)}
    assert DATA_FIELDS == {f.name for f in dc.fields(DataConfig)} - {"source"}
    for name in MODEL_FIELDS | set(SCHEDULE_FIELDS) | DATA_FIELDS | TRAIN_FIELDS:
        assert name in params, f"no CLI option for {name}"


def test_ema_warmup_ramps_decay():
    import torch

    from trainer.ema import EMA

    ema = EMA(torch.nn.Linear(2, 2), decay=0.999, warmup=True)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(90) == 0.91 and ema.decay_at(10**6) == 0.999
    assert EMA(torch.nn.Linear(2, 2), decay=0.999).decay_at(0) == 0.999
