"""The world tokenizer: trained on world text, special tokens intact, cached on disk."""
from polymodal.data.world import World, world_tokenizer
from polymodal.data.world import tokenizer as world_tok
from polymodal.tokenizers.text import MODALITY_TOKENS


def test_world_tokenizer_round_trip_and_special_tokens():
    tok = world_tokenizer()
    scene = World("test", num_objects=(1, 5))[1]
    for text in scene.captions() + [m["content"] for m in scene.conversation(4)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text) / 2.5  # the BPE learned the world's words
    for token in list(world_tok.CHAT_TOKENS) + MODALITY_TOKENS:
        (token_id,) = tok.encode(token)
        assert tok.id_to_token(token_id) == token
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    chat = tok.apply_chat_template(scene.conversation(1))
    assert "<|im_start|>user\n<image>\n" in chat
    assert tok.decode(tok.encode("any unseen text: Ünïcode ✓")) == "any unseen text: Ünïcode ✓"


def test_world_tokenizer_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    monkeypatch.setattr(world_tok, "TRAIN_SCENES", 60)
    monkeypatch.setattr(world_tok, "TRAIN_CLIPS", 10)
    first = world_tok.world_tokenizer.__wrapped__()
    folder = world_tok.cache_dir()
    assert folder.parent == tmp_path and (folder / "tokenizer.json").is_file()
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    again = world_tok.world_tokenizer.__wrapped__()  # loaded, not retrained
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    retrained = world_tok.train_world_tokenizer()
    text = "Is the small red circle left of the blue square?"
    assert first.encode(text) == again.encode(text) == retrained.encode(text)


def test_chat_template_role_names_are_one_token_each():
    # The chat frame around every answer is most of a chat's tokens; spelt out letter by letter
    # ("u s er", "a ss is t an t") it made instruct chats ~30% longer.
    tok = world_tokenizer()
    messages = [{"role": "user", "content": "How many objects are there?"}, {"role": "assistant", "content": "2"}]
    tokens = [tok.id_to_token(i) for i in tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))]
    assert tokens.count("user") == 1 and tokens.count("assistant") == 1
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"]
