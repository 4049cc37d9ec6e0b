"""fpbench as an lm-eval model type, and the `fpbench lm-eval` pass-through."""

import pytest
import torch
from click.testing import CliRunner

import fpbench.eval.lm_eval_model  # noqa: F401  (registers the model type)
from fpbench.errors import FpbenchError
from fpbench.eval.lm_eval_model import FpbenchLM, _pop_option, scheme_from_args
from fpbench.quant.weights import quantize_weight
from fpbench.quant.scheme import Granularity
from fpbench.eval.zeroshot import lm_eval_include_dir


def test_scheme_from_model_args():
    assert scheme_from_args().name == "fp32"
    assert scheme_from_args(format="int4", granularity="group:128", algo="rtn").name == "int4/g128/rtn"
    assert scheme_from_args(scheme="fp6_e3m2/channel/rtn").name == "fp6_e3m2/channel/rtn"
    with pytest.raises(FpbenchError, match="not both"):
        scheme_from_args(scheme="fp16", format="int4")
    with pytest.raises(FpbenchError, match="needs a granularity"):
        scheme_from_args(format="int4")


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("fpbench") is FpbenchLM


def test_model_args_quantize_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    lm = FpbenchLM.create_from_arg_string(f"pretrained={tiny_model_dir},format=int4,granularity=group:32,algo=rtn",
                                          {"batch_size": 2, "device": "cpu"})
    assert lm.scheme.name == "int4/g32/rtn" and lm.batch_size == 2
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weight = original.model.layers[0].self_attn.q_proj.weight.data
    expected = quantize_weight(weight, "int4", Granularity("group", 32)).dequantize()
    assert torch.equal(lm.model.model.layers[0].self_attn.q_proj.weight.data, expected)
    info = lm.get_model_info()  # no hub look-up: fpbench's own description
    assert info["scheme"] == "int4/g32/rtn" and info["model_num_parameters"] > 0


def test_simple_evaluate_with_model_fpbench(tiny_model_dir, data_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    with lm_eval_include_dir(data_dir) as include:
        results = lm_eval.simple_evaluate(
            model="fpbench", model_args=f"pretrained={tiny_model_dir},scheme=fp8_e4m3/channel/rtn",
            tasks=["piqa_local"], limit=4, batch_size=4, log_samples=False,
            task_manager=TaskManager(include_path=str(include), include_defaults=False))
    assert results["config"]["scheme"] == "fp8_e4m3/channel/rtn"
    assert results["n-samples"]["piqa_local"]["effective"] == 4
    assert 0 <= results["results"]["piqa_local"]["acc,none"] <= 1


def test_pop_option():
    assert _pop_option(["--tasks", "piqa", "--data-dir", "D", "--limit", "2"], "--data-dir") == (
        ["--tasks", "piqa", "--limit", "2"], "D")
    assert _pop_option(["--data-dir=D", "--tasks", "piqa"], "--data-dir") == (["--tasks", "piqa"], "D")
    assert _pop_option(["--tasks", "piqa"], "--data-dir") == (["--tasks", "piqa"], None)


def test_cli_passes_everything_to_lm_eval(tiny_model_dir, data_dir, tmp_path):
    from fpbench.cli import main

    args = ["lm-eval", "run", "--model", "fpbench", "--model_args", f"pretrained={tiny_model_dir},format=fp6_e3m2,"
            "granularity=channel", "--tasks", "boolq_local", "--limit", "2", "--batch_size", "2",
            "--device", "cpu", "--data-dir", str(data_dir), "--output_path", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table_row = next(line for line in result.output.splitlines() if line.startswith("|boolq_local"))
    assert "acc" in table_row
    assert list(tmp_path.rglob("results_*.json"))  # lm-eval's own --output_path was honoured


def test_cli_help_shows_both_helps():
    from fpbench.cli import main

    result = CliRunner().invoke(main, ["lm-eval", "--help"])
    assert result.exit_code == 0
    assert "--model fpbench" in result.output and "Language Model Evaluation Harness" in result.output
