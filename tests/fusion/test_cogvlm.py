"""CogVLM visual expert: routing by position modality, identity at conversion, packing, decoding, recipe."""
import copy
import json
from pathlib import Path

import pytest
import torch

import polymodal
from polymodal.cli import main
from polymodal.errors import ConfigError
from polymodal.models.cogvlm import (
    CogVLM,
    CogVLMConfig,
    VisualExpertLinear,
    routed_to_experts,
)
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny
from polymodal.nn.lora import LoRAConfig
from polymodal.recipes.cogvlm import CogVLMRecipeConfig
from polymodal.recipes.mmllm import MMLLMRecipeConfig
from polymodal.sequence import Document, Segment, pack_documents

ROOT = Path(__file__).resolve().parents[2]


def _pair(perturb: bool = True) -> tuple[MultimodalLM, CogVLM]:
    """A plain tiny MM-LLM and a CogVLM made from a copy of it, experts moved away from the LM's weights."""
    torch.manual_seed(0)
    plain = MultimodalLM(mmllm_tiny()).eval()
    cog = CogVLM.from_mmllm(copy.deepcopy(plain)).eval()
    if perturb:
        with torch.no_grad():
            for layer in cog.expert:
                layer.weight.add_(0.2 * torch.randn_like(layer.weight))
    return plain, cog


def _ids_with_image(model, before: int, after: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    return torch.cat([torch.randint(0, image_id, (before,), generator=g), torch.full((model.image_tokens,), image_id),
                      torch.randint(0, image_id, (after,), generator=g)])[None]  # (1, T)


def test_text_positions_keep_the_plain_decoder_output_when_the_experts_differ():
    plain, cog = _pair()
    with torch.no_grad():
        text = torch.randint(0, 200, (2, 20))
        # Text only: every position runs the LM's own weights (below FUSED_QKV_MIN_TOKENS both
        # models run the same three q/k/v matmuls, so the logits are bit-identical).
        assert torch.equal(cog(text).logits, plain(text).logits)
        ids, pixels = _ids_with_image(cog, 5, 6), torch.randn(1, 3, 32, 32)
        mixed, reference = cog(ids, pixels).logits, plain(ids, pixels).logits
    # Causal attention: text before the image cannot see it, so it equals the plain model there;
    # the image positions (and the text reading them) differ because the expert weights do.
    assert torch.equal(mixed[:, :5], reference[:, :5])
    assert not torch.allclose(mixed[:, 5:5 + cog.image_tokens], reference[:, 5:5 + cog.image_tokens], atol=1e-3)


def test_image_positions_use_the_expert_weights_and_text_positions_the_lm_weights():
    """Oracles: routing every position equals a plain decoder holding the expert weights, and
    swapping text and expert weights while inverting the route gives the same output."""
    _, cog = _pair()
    swapped = copy.deepcopy(cog)
    experts_as_lm = copy.deepcopy(cog)
    with torch.no_grad():
        for layer, twin, plain_twin in zip(
                [m for m in cog.lm.modules() if isinstance(m, VisualExpertLinear)],
                [m for m in swapped.lm.modules() if isinstance(m, VisualExpertLinear)],
                [m for m in experts_as_lm.lm.modules() if isinstance(m, VisualExpertLinear)]):
            twin.weight.copy_(layer.expert.weight)
            twin.expert.weight.copy_(layer.weight)
            plain_twin.weight.copy_(layer.expert.weight)
        x = torch.randn(2, 9, cog.config.lm.hidden_size)
        route = torch.rand(2, 9) < 0.5
        with routed_to_experts(cog.lm, torch.ones(2, 9, dtype=torch.bool)):
            all_expert = cog.lm(inputs_embeds=x).logits
        torch.testing.assert_close(all_expert, experts_as_lm.lm(inputs_embeds=x).logits, rtol=0, atol=1e-6)
        with routed_to_experts(cog.lm, route):
            routed = cog.lm(inputs_embeds=x).logits
        with routed_to_experts(swapped.lm, ~route):
            inverted = swapped.lm(inputs_embeds=x).logits
    torch.testing.assert_close(routed, inverted, rtol=0, atol=1e-6)
    assert not torch.allclose(routed, all_expert, atol=1e-3)


def test_conversion_from_mmllm_keeps_its_outputs_and_names():
    plain, cog = _pair(perturb=False)
    ids, pixels = _ids_with_image(cog, 3, 4), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cog(ids, pixels).logits, plain(ids, pixels).logits, rtol=0, atol=1e-5)
    ours = cog.state_dict()
    assert set(plain.state_dict()) < set(ours)  # the LM keeps its names; the experts are added beside
    assert sum(".expert." in k for k in ours) == 7 * cog.config.lm.num_layers  # 7 bias-free linears per layer
    with pytest.raises(ValueError, match="image_mask"):
        cog(inputs_embeds=torch.randn(1, 4, cog.config.lm.hidden_size))


def test_packed_forward_equals_per_document_forward():
    _, cog = _pair()
    size, image_id, k = 32, cog.config.image_token_id, cog.image_tokens
    g = torch.Generator().manual_seed(3)

    def doc(layout: str) -> Document:
        return Document([Segment("text", tokens=torch.randint(0, image_id, (4,), generator=g)) if part == "t" else
                         Segment("image", tokens=[image_id] * k, data=torch.randn(3, size, size, generator=g),
                                 target=None) for part in layout.split()])

    docs = [doc("t i t"), doc("i t"), doc("t"), doc("t i t i t")]
    batch = pack_documents(docs, max_tokens=64)
    assert batch.token_ids.shape[0] < len(docs)
    with torch.no_grad():
        packed = cog(packed=batch).logits
        for d, document in enumerate(docs):
            ids = torch.cat([s.tokens for s in document.segments])[None]
            images = [s.data for s in document.segments if s.modality == "image"]
            single = cog(ids, torch.stack(images) if images else None).logits[0]
            row, start = batch.document_rows[d]
            torch.testing.assert_close(packed[row, start:start + len(document)], single, atol=1e-5, rtol=1e-5)


def test_cached_generation_routes_new_tokens_as_text():
    """Greedy tokens decoded with the KV cache are the argmax of one full forward over prompt + reply."""
    _, cog = _pair()
    ids, pixels = _ids_with_image(cog, 3, 3, seed=1), torch.randn(1, 3, 32, 32)
    reply = cog.generate(ids.tolist(), pixels, max_new_tokens=6, eos_token_id=[])[0]
    with torch.no_grad():
        logits = cog(torch.cat([ids, torch.tensor([reply])], dim=1), pixels).logits[0]
    start = ids.shape[1] - 1
    full = logits[start:start + len(reply)].index_fill(-1, torch.tensor([cog.config.image_token_id]), float("-inf"))
    assert full.argmax(-1).tolist() == reply


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="expert_targets"):
        CogVLMConfig(expert_targets=["fc1"])
    with pytest.raises(ConfigError, match="expert_targets"):
        CogVLMConfig(expert_targets=[])
    with pytest.raises(ConfigError, match="image_lora"):
        CogVLMConfig(image_lora=LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="lora.rank"):
        CogVLMRecipeConfig(lora=LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="trainable"):
        MMLLMRecipeConfig(trainable=["expert"])  # only the cogvlm recipe's models have one


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_recipe_trains_and_a_converted_mmllm_keeps_its_text_answers(tmp_path):
    cog_out = tmp_path / "cog"
    assert main(["train", str(ROOT / "configs/fusion/cogvlm_tiny.yaml"), f"train.out_dir={cog_out}"]) == 0
    losses = _losses(cog_out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    model, _ = polymodal.load(cog_out / "final")
    assert model.family == "cogvlm" and len(model.expert) == 7 * model.config.lm.num_layers

    # From a trained mmllm checkpoint, the default trains the projector and the expert only.
    mm_out, conv_out = tmp_path / "mm", tmp_path / "conv"
    assert main(["train", str(ROOT / "configs/mmllm/tiny_align.yaml"), f"train.out_dir={mm_out}",
                 "train.steps=3"]) == 0
    assert main(["train", str(ROOT / "configs/fusion/cogvlm_tiny.yaml"), f"train.out_dir={conv_out}",
                 f"init_from={mm_out / 'final'}", "trainable=null", "train.steps=4"]) == 0
    mm, _ = polymodal.load(mm_out / "final")
    converted, _ = polymodal.load(conv_out / "final")
    assert converted.family == "cogvlm"
    text = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert torch.equal(converted(text).logits, mm(text).logits)  # the LM did not move
    # The experts started as copies of the LM's weights and trained away from them.
    routed = [x for x in converted.lm.modules() if isinstance(x, VisualExpertLinear)]
    assert any(not torch.equal(layer.expert.weight, layer.weight) for layer in routed)


def test_streamed_chat_with_an_image_routes_like_the_batched_reply():
    """`polymodal chat` streams: the prompt goes in as embeddings, and the image positions still
    reach the expert (the stream passes the image mask to the prefill)."""
    from polymodal.data.world import World, world_tokenizer
    from polymodal.infer.chat import chat, stream_chat
    from polymodal.models.mmllm import mmllm_tiny_for

    tokenizer = world_tokenizer()
    torch.manual_seed(0)
    cog = CogVLM.from_mmllm(MultimodalLM(mmllm_tiny_for(tokenizer))).eval()
    with torch.no_grad():
        for layer in cog.expert:
            layer.weight.add_(0.5 * torch.randn_like(layer.weight))
    messages, image = [{"role": "user", "content": "What color is the circle?"}], World("val", image_size=32)[0].image()
    streamed = "".join(stream_chat(cog, tokenizer, messages, [image], max_new_tokens=6))
    assert streamed == chat(cog, tokenizer, messages, [image], max_new_tokens=6)
