import pytest

from fpbench.errors import FpbenchError
from fpbench.models import DEFAULT_MODEL_CAVEAT, load_model


def test_missing_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(FpbenchError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FpbenchError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FpbenchError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_local_directory_round_trip(tmp_path, default_tokenizer):
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=len(default_tokenizer))
    model.save_pretrained(tmp_path)
    default_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.name == str(tmp_path) and loaded.caveat is None
    assert loaded.model.config.hidden_size == 64


@pytest.mark.slow
def test_default_model_loads_offline_with_caveat():
    loaded = load_model()
    assert loaded.caveat == DEFAULT_MODEL_CAVEAT
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.chat_template
