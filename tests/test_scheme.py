import pytest

from fpbench.errors import FpbenchError
from fpbench.quant.scheme import Granularity, Scheme


@pytest.mark.parametrize("name", ["fp16", "bf16", "int4/g128/rtn", "fp6_e3m2/channel/rtn",
                                  "int8/tensor/rtn", "int4_asym/g32/rtn", "int4/channel/rtn-mse",
                                  "int4/g128/gptq@wikitext2"])
def test_scheme_name_round_trips(name):
    scheme = Scheme.parse(name)
    assert scheme.name == name
    assert Scheme.parse(scheme.name) == scheme


def test_aliases_normalise_and_baselines_need_no_granularity():
    assert Scheme("fp6", Granularity.parse("channel")).name == "fp6_e3m2/channel/rtn"
    assert Scheme("fp16").name == "fp16"
    assert Scheme("fp16", Granularity.parse("channel")).granularity is None


@pytest.mark.parametrize("text,expected", [("group:128", Granularity("group", 128)),
                                           ("g32", Granularity("group", 32)),
                                           ("Channel", Granularity("channel"))])
def test_granularity_parse(text, expected):
    assert Granularity.parse(text) == expected


@pytest.mark.parametrize("bad", ["group:0", "group:-4", "group:abc", "row", "g"])
def test_bad_granularity_is_a_clear_error(bad):
    with pytest.raises(FpbenchError, match="granularity"):
        Granularity.parse(bad)


def test_missing_granularity_and_bad_algo():
    with pytest.raises(FpbenchError, match="needs a granularity"):
        Scheme("int4")
    with pytest.raises(FpbenchError, match="algorithm"):
        Scheme("int4", Granularity.parse("channel"), algo="awq")
    with pytest.raises(FpbenchError, match="unknown format"):
        Scheme.parse("int5x/channel/rtn")


@pytest.mark.parametrize("name", ["int4/g128/rtn/s:fp32", "int4/g128/rtn/s:bf16", "int4/g32/rtn/s:e8m0",
                                  "fp6_e3m2/channel/rtn/s:fp8_e4m3", "int8/channel/rtn/s:fp32/a:int8-token-dynamic",
                                  "mxfp4_e2m1/g32/rtn", "mxfp4_e2m1:ceil/g32/rtn", "nvfp4/g16/gptq@wikitext2",
                                  "mxfp4_e2m1:ceil/g32/gptq", "nvfp4/g16/rtn", "mxint8/g32/rtn",
                                  "int8/channel/rtn/a:mxfp8_e4m3-block-dynamic", "nvfp4/g16/rtn/a:nvfp4-block-dynamic",
                                  "int4/g128/rtn/s:e8m0/a:int8-token-dynamic", "fp6_e3m2/channel/rtn/s:bf16"])
def test_scale_format_and_block_names_round_trip(name):
    scheme = Scheme.parse(name)
    assert scheme.name == name
    assert Scheme.parse(scheme.name) == scheme


def test_scale_format_defaults_and_record_fields():
    assert Scheme.parse("int4/g128/rtn").scale_format == "fp16"
    assert Scheme.parse("fp16").scale_format is None
    assert Scheme.parse("mxfp4_e2m1").scale_format == "e8m0"
    assert Scheme.parse("int4/g128/rtn/s:fp32").fields()["scale_format"] == "fp32"
    assert Scheme.parse("int4/g128/rtn/s:e4m3").name == "int4/g128/rtn/s:fp8_e4m3"
    with pytest.raises(FpbenchError, match="no scales"):
        Scheme("fp16", scale_format="fp32")
    with pytest.raises(FpbenchError, match="unknown format"):
        Scheme.parse("int4/g128/rtn/s:fp99")
