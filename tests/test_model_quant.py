import torch
from torch import nn

from conftest import tiny_llama
from fpbench.quant.model import quantize_model, target_linears
from fpbench.quant.weights import quantize_weight
from fpbench.quant.scheme import Granularity, Scheme


def test_rtn_quantizes_every_block_linear_and_keeps_the_head():
    model = tiny_llama(vocab_size=128)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    embedding = model.get_input_embeddings().weight.detach().clone()
    scheme = Scheme("int4", Granularity.parse("group:32"))
    result = quantize_model(model, scheme, progress=False)
    targets = target_linears(model)
    assert "lm_head" not in targets and len(targets) == 2 * 7
    assert set(result.weights) == set(targets)
    for name, module in targets.items():
        expected = quantize_weight(before[name], "int4", scheme.granularity).dequantize()
        assert torch.equal(module.weight, expected)
        assert torch.equal(result.weights[name].dequantize(), module.weight)
    assert torch.equal(model.lm_head.weight, before["lm_head"])
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_include_head_quantizes_head_but_not_tied_embedding():
    model = tiny_llama(vocab_size=128)
    embedding = model.get_input_embeddings().weight.detach().clone()
    quantize_model(model, Scheme("fp4_e2m1", Granularity.parse("channel")), include_head=True, progress=False)
    assert not torch.equal(model.lm_head.weight, embedding)
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_baseline_rounds_weights_to_dtype():
    model = tiny_llama(vocab_size=128)
    quantize_model(model, Scheme("bf16"), progress=False)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight, weight.to(torch.bfloat16).float())
