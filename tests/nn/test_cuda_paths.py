"""CUDA-only paths: the FlexAttention block mask, bf16 autocast training and a packed MM-LLM recipe run.

These need a CUDA GPU, which CI never has; they run on the lent GPU machine (see
benchmarks/RESULTS.md). Every CPU-side piece they build on is tested elsewhere.
"""
import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.models.lm import lm_tiny
from polymodal.sequence import Document, Segment, pack_documents

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def _mixed_docs():
    g = torch.Generator().manual_seed(0)
    return [Document([Segment(tokens=torch.randint(0, 256, (n,), generator=g)),
                      Segment("image", tokens=torch.randint(0, 256, (9,), generator=g), bidirectional=True),
                      Segment(tokens=torch.randint(0, 256, (5,), generator=g))]) for n in (30, 70, 11, 150)]


def test_flex_block_mask_matches_dense_mask_forward():
    torch.manual_seed(0)
    model = DecoderLM(lm_tiny()).cuda().eval()
    packed = pack_documents(_mixed_docs(), max_tokens=256).to("cuda")
    with torch.no_grad():
        flex = model(packed=packed).logits  # BlockMask on CUDA
        x = model.embed_tokens(packed.token_ids)
        dense = model.lm_head(model.norm(model.layers(x, rope=model.rope(packed.positions), mask=packed.dense_mask())))
    real = packed.document_ids >= 0
    torch.testing.assert_close(flex[real], dense[real], atol=2e-4, rtol=2e-4)


def test_bf16_autocast_training_step_is_finite():
    from polymodal.train.loop import TrainConfig, train
    from polymodal.train.objectives import sequence_loss

    torch.manual_seed(0)
    model = DecoderLM(lm_tiny())
    packed = pack_documents(_mixed_docs(), max_tokens=256)
    result = train(model, [packed] * 4, sequence_loss, TrainConfig(steps=4, precision="auto", device="cuda"))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_mmllm_recipe_trains_packed_multimodal_batches_on_cuda(tmp_path):
    """The loop moves each `PackedBatch` to the GPU; the images follow the batch's device."""
    from pathlib import Path

    from polymodal.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "mmllm" / "tiny_align.yaml"
    assert main(["train", str(config), f"train.out_dir={tmp_path}", "train.steps=3", "train.device=cuda"]) == 0
    assert (tmp_path / "final" / "config.json").exists()


def test_blip_evaluation_runs_with_the_model_on_cuda():
    """Texts follow the model to the GPU; scores come back to the CPU for the metrics."""
    from polymodal.data.world import world_tokenizer
    from polymodal.eval.blip import evaluate
    from polymodal.models.blip import BlipModel, blip_tiny
    from polymodal.recipes.blip import world_blip_config

    torch.manual_seed(0)
    tokenizer = world_tokenizer()
    model = BlipModel(world_blip_config(blip_tiny(), tokenizer))
    on_cpu = evaluate(model, tokenizer, n=8, progress=False)
    on_gpu = evaluate(model.cuda(), tokenizer, n=8, progress=False)
    assert on_gpu.keys() == on_cpu.keys()
    assert abs(on_gpu["t2i_R@1"] - on_cpu["t2i_R@1"]) <= 0.125 and abs(on_gpu["cider"] - on_cpu["cider"]) < 0.1
