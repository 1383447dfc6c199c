"""Text tower: pooling rules and parity with transformers' CLIPTextModel / SiglipTextModel."""
import torch
import transformers

from polymodal.encoders.text import TextEncoderConfig, TextTransformer, pool_tokens


def _tiny(**kw) -> TextEncoderConfig:
    base = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=16,
                eos_token_id=99)
    return TextEncoderConfig(**{**base, **kw})


def _copy_hf_text(ours: TextTransformer, hf_text: torch.nn.Module) -> None:
    """Copy an HF CLIP/SigLIP text transformer's weights into ours (the name map the interop layer uses)."""
    with torch.no_grad():
        ours.token_embedding.weight.copy_(hf_text.embeddings.token_embedding.weight)
        ours.position_embedding.copy_(hf_text.embeddings.position_embedding.weight)
        for mine, theirs in zip(ours.encoder.layers, hf_text.encoder.layers):
            for a, b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
                getattr(mine.attn, a).load_state_dict(getattr(theirs.self_attn, b).state_dict())
            mine.attn_norm.load_state_dict(theirs.layer_norm1.state_dict())
            mine.mlp_norm.load_state_dict(theirs.layer_norm2.state_dict())
            mine.mlp.fc1.load_state_dict(theirs.mlp.fc1.state_dict())
            mine.mlp.fc2.load_state_dict(theirs.mlp.fc2.state_dict())
        ours.final_norm.load_state_dict(hf_text.final_layer_norm.state_dict())
        if ours.head is not None:
            ours.head.load_state_dict(hf_text.head.state_dict())


def test_pool_eos_first_occurrence_and_legacy_argmax():
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float).view(2, 5, 1)
    ids = torch.tensor([[5, 7, 9, 9, 9], [5, 9, 3, 1, 9]])
    assert pool_tokens(hidden, ids, None, "eos", 9)[:, 0].tolist() == [2.0, 6.0]  # first 9 in each row
    legacy = torch.tensor([[5, 70, 1, 0, 0], [80, 2, 3, 0, 0]])
    assert pool_tokens(hidden, legacy, None, "eos", 2)[:, 0].tolist() == [1.0, 5.0]  # argmax id
    assert pool_tokens(hidden, legacy, None, "eos", 2, legacy_eos_argmax=False)[:, 0].tolist() == [0.0, 6.0]


def test_pool_last_cls_mean():
    hidden = torch.tensor([[[1.0], [2.0], [3.0], [10.0]]])
    ids = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pool_tokens(hidden, ids, mask, "last", 0).item() == 10.0
    assert pool_tokens(hidden, ids, mask, "cls", 0).item() == 1.0
    assert pool_tokens(hidden, ids, mask, "mean", 0).item() == 2.0


def test_pooled_only_path_equals_full_forward():
    torch.manual_seed(0)
    ids = torch.randint(3, 98, (3, 10))
    ids[0, 5], ids[1, 9], ids[2, 3] = 99, 99, 99
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:], mask[2, 4:] = 0, 0
    for options in ({}, {"causal": False, "pool": "last", "head": True}, {"pool": "cls"}, {"pool": "mean"}):
        model = TextTransformer(_tiny(num_layers=3, **options)).eval()
        for m in (mask, None):
            torch.testing.assert_close(model.pooled(ids, m), model(ids, m).pooler_output, atol=1e-5, rtol=1e-5)


def test_causal_tower_ignores_padding_and_future_tokens():
    torch.manual_seed(0)
    model = TextTransformer(_tiny()).eval()
    ids = torch.tensor([[4, 5, 99, 0, 0, 0]])
    longer = torch.tensor([[4, 5, 99, 7, 8, 9]])
    a = model(ids, torch.tensor([[1, 1, 1, 0, 0, 0]])).pooler_output
    b = model(longer).pooler_output  # causal: tokens after eos cannot change the eos state
    torch.testing.assert_close(a, b)


def test_clip_text_parity_with_transformers():
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)
    hf = transformers.CLIPTextModel(hf_cfg).eval()
    ours = TextTransformer(_tiny()).eval()
    _copy_hf_text(ours, hf)
    ids = torch.tensor([[3, 10, 11, 99, 0, 0], [3, 12, 13, 14, 15, 99]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want, got = hf(input_ids=ids, attention_mask=mask), ours(ids, mask)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.last_hidden_state[1], want.last_hidden_state[1], atol=1e-5, rtol=1e-5)


def test_siglip_text_parity_with_transformers():
    torch.manual_seed(0)
    hf_cfg = transformers.SiglipTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=16, projection_size=24,
                                           bos_token_id=98, eos_token_id=99, pad_token_id=0)
    hf = transformers.SiglipTextModel(hf_cfg).eval()
    ours = TextTransformer(_tiny(act="gelu_tanh", norm_eps=1e-6, causal=False, pool="last", head=True,
                                 projection_size=24)).eval()
    _copy_hf_text(ours, hf)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want, got = hf(input_ids=ids), ours(ids)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
