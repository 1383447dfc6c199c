"""The command line end to end: convert (HF/GGUF -> polymodal -> HF) and complete."""
import pytest
import torch
import transformers

from polymodal.assets import smollm2_gguf_path
from polymodal.cli import main


@pytest.fixture(scope="module")
def tiny_hf_llama(tmp_path_factory):
    from polymodal.tokenizers.text import TextTokenizer

    folder = tmp_path_factory.mktemp("hf_llama")
    tokenizer = TextTokenizer.train_bpe(["the cat sat on the mat", "a dog ran in the park"] * 20, vocab_size=300,
                                        special_tokens=["<|endoftext|>"])
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def test_convert_round_trip_and_complete(tiny_hf_llama, tmp_path, capsys):
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert main(["convert", str(tiny_hf_llama), str(ours)]) == 0
    assert main(["convert", str(ours), str(back), "--to", "hf"]) == 0
    ids = torch.tensor([[3, 5, 7, 9]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_llama)(ids).logits
    again = transformers.AutoModelForCausalLM.from_pretrained(back)(ids).logits
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["complete", str(ours), "the cat", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_complete_with_real_gguf_answers_a_factual_question(capsys):
    assert main(["complete", str(smollm2_gguf_path()), "What is the capital of France?", "--chat",
                 "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["complete", str(tmp_path / "nope"), "hi"]) == 2
    assert "nope" in capsys.readouterr().err
