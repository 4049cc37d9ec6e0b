"""The options table: one declaration per option drives the CLI flags, the sweep keys,
the run key and the typed stage objects."""

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from fpbench import options as options_module
from fpbench.cli import main
from fpbench.errors import FpbenchError
from fpbench.options import (OPTIONS, Option, click_options, default_of, run_options, stage_options,
                             sweep_keys)
from fpbench.quant.gptq import DEFAULT_DAMP, GptqOptions
from fpbench.runner import plan_runs
from fpbench.sweep import expand, load_config


def _values(**given):
    """Option values as `fpbench run` hands them over: every flag, at its default."""
    values = {o.name: (() if o.multiple else o.field_default) for o in OPTIONS}
    return values | given


def test_every_option_is_declared_once_and_has_help():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    assert all(o.help for o in OPTIONS)


def test_defaults_come_from_the_stage_dataclasses():
    assert default_of("damp") == DEFAULT_DAMP == GptqOptions().damp
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert f"[default: {DEFAULT_DAMP};" in help_text and "--act-order" in help_text


def test_headline_defaults_granularity_and_activation_scales():
    config, = plan_runs(_values(format="fp6", task="humaneval"))
    assert config.scheme.name == "fp6_e3m2/channel/rtn"
    config, = plan_runs(_values(format="int8", granularity="channel", act_format="fp8_e4m3", task="wikitext2"))
    assert config.scheme.name == "int8/channel/rtn/a:fp8_e4m3-token-dynamic"


def test_only_values_that_differ_from_the_default_enter_the_key():
    assert run_options({"damp": DEFAULT_DAMP, "act_order": False, "samples": None, "seed": 3}) == {}
    assert run_options({"damp": 0.1, "act_order": True}) == {"damp": 0.1, "act_order": True}
    gptq = stage_options("gptq", {"damp": 0.1, "samples": 4})
    assert gptq == GptqOptions(damp=0.1)


def test_run_and_sweep_give_the_same_key(tmp_path):
    """An explicit default (damp: 0.01) is the same run as leaving it out, on both paths."""
    cli, = plan_runs(_values(format="int4", granularity="group:128", algo="gptq", damp=DEFAULT_DAMP,
                             act_order=True, task="wikitext2", limit=2))
    path = tmp_path / "c.yaml"
    path.write_text("schemes:\n  - {format: int4, granularity: 'group:128', algo: gptq, damp: 0.01, "
                    "act_order: true}\ntasks: [wikitext2]\nlimit: 2\n")
    sweep, = [run for run, _ in expand(load_config(path))]
    assert cli.scheme.name == sweep.scheme.name == "int4/g128/gptq@wikitext2"
    assert cli.options == sweep.options == {"act_order": True}
    assert cli.key() == sweep.key()


def test_sweep_values_are_checked_against_the_table(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("schemes: [int4/g128/rtn]\ntasks: [wikitext2]\noptions: {calib_samples: 0}\n")
    with pytest.raises(FpbenchError, match="calib_samples"):
        load_config(path)
    path.write_text("schemes: [int4/g128/rtn]\ntasks: [wikitext2]\noptions: {prompt_mode: poem}\n")
    with pytest.raises(FpbenchError, match="prompt_mode"):
        load_config(path)


def test_adding_an_option_is_one_row(monkeypatch):
    """A new stage option: a field in its stage's dataclass and one Option row; the CLI
    flag, the sweep key, the run key and the typed object follow."""

    @dataclass(frozen=True)
    class NewStage:
        beam_width: int = 1

    row = Option("beam_width", "Beams per answer.", "newstage", type=click.IntRange(min=1))
    monkeypatch.setitem(options_module.STAGES, "newstage", NewStage)
    monkeypatch.setattr(options_module, "OPTIONS", OPTIONS + (row,))
    monkeypatch.setitem(options_module.BY_NAME, "beam_width", row)

    @click.command()
    @click_options(stages=("newstage",))
    def command(**values):
        click.echo(repr(stage_options("newstage", values)))

    result = CliRunner().invoke(command, ["--beam-width", "4"])
    assert result.exit_code == 0 and "NewStage(beam_width=4)" in result.output
    assert "beam_width" in sweep_keys()
    assert run_options({"beam_width": 4}) == {"beam_width": 4} and run_options({"beam_width": 1}) == {}


def test_calib_file_joins_the_name_by_base_name(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("some calibration text " * 50)
    config, = plan_runs(_values(scheme=("int4/g128/gptq",), calib=str(text), calib_samples=16,
                                calib_seqlen=512, act_order=True, task="wikitext2"))
    assert config.scheme.name == "int4/g128/gptq@mine.txt"
    assert config.options == {"calib_samples": 16, "calib_seqlen": 512, "act_order": True,
                              "calib_path": str(text.resolve())}
    assert config.calibration.source == str(text.resolve())
