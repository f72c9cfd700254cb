import pytest

from edgeexport.config import BuildConfig, make_config, parse_input_spec, parse_tolerance
from edgeexport.errors import ConfigError


def test_input_spec_parses_named_dims_and_dtype():
    spec = parse_input_spec("image:batchx3x224x224:float16")
    assert spec.name == "image" and spec.shape == ["batch", 3, 224, 224] and spec.dtype == "float16"
    assert spec.dynamic_dims == {0: "batch"}
    assert parse_input_spec("x:1x6").dtype == "float32"


@pytest.mark.parametrize("text", ["image", "image:", ":1x3", "x:1x3:complex64", "x:0x3", "x:1x3-4", "a:1:b:c"])
def test_bad_input_specs_are_config_errors(text):
    with pytest.raises(ConfigError) as e:
        parse_input_spec(text)
    assert e.value.exit_code == 2 and e.value.fix


def test_tolerance_parsing_and_defaults():
    assert parse_tolerance(["cosine=0.995,top1=0.9", "snr_db=20"]) == {"cosine": 0.995, "top1": 0.9, "snr_db": 20.0}
    for bad in (["cosin=0.9"], ["cosine"], ["cosine=abc"]):
        with pytest.raises(ConfigError):
            parse_tolerance(bad)
    cfg = make_config({"model": "m.onnx", "precision": "int8", "tolerance": {"cosine": 0.5}})
    tol = cfg.resolved_tolerance()
    assert tol["cosine"] == 0.5 and tol["top1"] == 0.95 and tol["accuracy_drop"] == 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        make_config({"model": "m.onnx", "precision": "int4"})
    assert "precision" in e.value.why and "int4" in e.value.why
    with pytest.raises(ConfigError) as e:
        make_config({"model": "m.onnx", "calibration": {"samples": 0}})
    assert "calibration.samples" in e.value.why
    with pytest.raises(ConfigError):
        make_config({"model": "m.onnx", "surprise": 1})


def test_yaml_round_trip():
    import yaml

    cfg = make_config({"model": "m.onnx", "inputs": [parse_input_spec("x:batchx6").model_dump()],
                       "calibration": {"path": "d.npz", "method": "entropy"}, "target_options": {"reduce_range": False}})
    again = BuildConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_scalar_inputs_parse_as_rank_zero_and_pairs_parse():
    from edgeexport.config import parse_input_spec, parse_pairs

    spec = parse_input_spec("sr::int64")  # the syntax describe() prints for a scalar
    assert spec.shape == [] and spec.dtype == "int64" and spec.describe() == "sr::int64"
    with pytest.raises(ConfigError, match="cannot parse --input"):
        parse_input_spec("sr:")
    assert parse_pairs(["state=stateN", "h0=hn,c0=cn"], "--state", "=", "IN=OUT") == \
        {"state": "stateN", "h0": "hn", "c0": "cn"}
    assert parse_pairs(["prob:probability"], "--output", ":", "NAME:KIND") == {"prob": "probability"}
    with pytest.raises(ConfigError, match="cannot parse --state 'state'"):
        parse_pairs(["state"], "--state", "=", "IN=OUT")


def test_every_limit_can_be_lifted_for_timing_a_refused_build():
    """compare times a refused build again with every limit lifted: a new limit must be liftable too."""
    from edgeexport.compare import _LIFTED
    from edgeexport.config import TOLERANCE_KEYS

    assert set(TOLERANCE_KEYS) <= set(_LIFTED)
