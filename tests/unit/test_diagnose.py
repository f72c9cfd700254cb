"""Which alternatives a refused int8 build tries, per target and precision (the builds themselves are tested in
tests/integration/test_accuracy_budget.py)."""

from edgeexport import diagnose
from edgeexport.targets import get_target
from tests.conftest import make_cfg

WORST = [{"node": "conv", "module": "stem", "output": "relu", "quantized_output": True,
          "float_fallback": ["conv", "relu", "next"]}]


def _hows(precision, options=None, target="ort", worst=WORST, used="percentile"):
    cfg = make_cfg(model="m.py:build", precision=precision, target=target, target_options=options or {})
    return [how for _, how, _ in diagnose.trials(cfg, get_target(target), worst, used)]


def test_static_int8_tries_16_bits_for_the_worst_layer_then_other_calibration_methods():
    # calibration 'auto' used percentile (a CNN): the other two are tried, not percentile again
    assert _hows("int8") == ["--option int16_tensors=[relu]", "--calib-method minmax", "--calib-method entropy"]
    assert _hows("int8", used="minmax")[1:] == ["--calib-method percentile", "--calib-method entropy"]


def test_tflite_tries_the_one_other_method_it_has():
    assert _hows("int8", target="tflite", worst=[]) == ["--calib-method minmax"]


def test_seven_bit_weights_are_tried_at_eight_bits():
    hows = _hows("int8", {"device": "x86-avx2"})
    assert hows[:2] == ["--option int16_tensors=[relu]", "--option reduce_range=false"]


def test_a_layer_whose_output_is_not_quantized_is_tried_in_float():
    worst = [{**WORST[0], "quantized_output": False}]
    assert _hows("int8", worst=worst)[0] == "--option exclude_nodes=[conv,relu,next]"


def test_dynamic_int8_tries_static_int8_and_no_calibration_methods():
    cfg = make_cfg(model="m.py:build", precision="int8-dynamic", target="ort")
    tried = diagnose.trials(cfg, get_target("ort"), [])
    assert [how for _, how, _ in tried] == ["--precision int8"] and tried[0][2].precision == "int8"


def test_tensorrt_has_no_16_bit_activations_so_the_worst_layer_goes_float():
    hows = _hows("int8", target="trt")
    assert hows[0].startswith("--option exclude_nodes=") and "--calib-method entropy" in hows
