"""One settings object for every front end: typed presets, validation, and the CLI round trip."""
from __future__ import annotations

import dataclasses

import pytest

from msdseg.cli.main import build_parser
from msdseg.core.errors import InputError
from msdseg.core.settings import DEFAULT_PRESET, PRESETS, Preset, SegmentSettings

pytestmark = pytest.mark.unit

#: A value other than the default for every field, so the round trip has something to carry.
NON_DEFAULT = dict(preset="accurate", device="cpu", steps=3, samples=5, uncertainty=True, seed=11,
                   model="/models/m.safetensors", precision="fp32", spacing_mm=4.0, check_brain=False,
                   mirror=False, refine_mm=1.0, intensity=False, output_mm=1.0)


def _parse(settings: SegmentSettings) -> SegmentSettings:
    args = build_parser().parse_args(["segment", "in.nii.gz", "-o", "out", *settings.cli_options()])
    return SegmentSettings.from_cli(args)


def test_every_field_is_exercised_here():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(SegmentSettings)}


def test_settings_survive_the_command_line_round_trip():
    """What the console API, the Slicer module or the web app set, ``msdseg segment`` receives."""
    for settings in (SegmentSettings(), SegmentSettings(**NON_DEFAULT),
                     SegmentSettings(mirror=True, intensity=True, refine_mm=0.0)):
        assert _parse(settings) == settings


def test_each_field_alone_survives_the_round_trip():
    for name, value in NON_DEFAULT.items():
        settings = SegmentSettings(**{name: value})
        assert _parse(settings) == settings, name


def test_presets_are_typed_and_the_default_is_one_of_them():
    assert DEFAULT_PRESET in PRESETS and SegmentSettings().preset == DEFAULT_PRESET
    for name, preset in PRESETS.items():
        assert isinstance(preset, Preset) and preset.name == name
        assert preset.label().startswith(f"{name} (")
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["fast"].steps = 9  # type: ignore[misc]


def test_resolved_applies_overrides_and_drops_a_refinement_that_cannot_happen():
    plan = SegmentSettings(preset="fast", samples=3, mirror=True).resolved()
    assert (plan.steps, plan.samples, plan.mirror, plan.mirrored) == (PRESETS["fast"].steps, 3, True, True)
    assert SegmentSettings(refine_mm=1.0).resolved().refine_mm == 1.0
    assert SegmentSettings(refine_mm=1.0, steps=0).resolved().refine_mm is None  # one deterministic pass
    assert SegmentSettings(refine_mm=4.0).resolved().refine_mm is None  # not finer than the entry
    assert SegmentSettings(refine_mm=0.0).resolved().refine_mm is None


@pytest.mark.parametrize("field, value, message", [
    ("preset", "slow", "unknown preset"), ("device", "tpu", "unknown device"),
    ("precision", "int4", "unknown precision"), ("steps", -1, "--steps"), ("samples", 0, "--samples"),
    ("refine_mm", -1.0, "--refine"), ("spacing_mm", 0.0, "--spacing"), ("output_mm", 0.0, "--output-spacing"),
])
def test_bad_values_fail_with_one_line_naming_them(field, value, message):
    with pytest.raises(InputError, match=message) as info:
        SegmentSettings(**{field: value}).validate()
    assert "\n" not in str(info.value)


def test_enums_from_a_parameter_node_become_names():
    from MultiscaleDiffSegLib.settings import Device, Preset as PresetEnum, settings_from_widgets

    s = settings_from_widgets(PresetEnum.fast, Device.cpu, steps=-1, samples=0)
    assert (s.preset, s.device, s.steps, s.samples) == ("fast", "cpu", None, None)
    assert settings_from_widgets("balanced", "auto", precision="fp32", intensity=False).intensity is False
