"""LoRA: adapters start as the identity update, train alone, merge exactly, and checkpoints load."""
import pytest
import torch

from polymodal.backbones.decoder import DecoderLM, shift_labels
from polymodal.models.lm import lm_tiny
from polymodal.nn.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from polymodal.train.objectives import token_cross_entropy


def _model(tied: bool = True):
    torch.manual_seed(0)
    config = lm_tiny()
    config.tie_word_embeddings = tied
    return DecoderLM(config)


def test_apply_lora_freezes_base_and_starts_at_base():
    model = _model()
    ids = torch.randint(0, 256, (2, 10))
    before = model(ids).logits
    names = apply_lora(model, targets=("q_proj", "v_proj"), rank=4, alpha=8)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    torch.testing.assert_close(model(ids).logits, before)  # lora_B = 0 at start
    assert model.lm_head.weight is model.embed_tokens.weight  # tying untouched


def test_merged_forward_equals_unmerged_forward(tmp_path):
    model = _model()
    apply_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), rank=3, alpha=6)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 256, (2, 12))
    for _ in range(3):  # make B nonzero so the merge has something to fold
        token_cross_entropy(model(ids).logits, shift_labels(ids)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    unmerged = model(ids).logits
    assert merge_lora(model) == 10
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)

    # the merged model's state dict has the plain names, so its checkpoint loads as a plain LM
    from polymodal.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_dropout_only_in_training_and_errors():
    model = _model()
    apply_lora(model, targets=("q_proj",), rank=2, dropout=0.5)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 64)
    model.eval()
    torch.testing.assert_close(layer(x), layer(x))
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(_model(), targets=("nope",))
    with pytest.raises(TypeError, match="sequence"):
        apply_lora(_model(), targets="q_proj")
