"""`polymodal quickstart`: the smallest complete tour of the library, on a CPU, in minutes.

It generates shapes-world scenes, trains a small decoder LM from scratch to answer questions
about scenes *described in words* (packed, padding-free training; exact-match scoring), evaluates
it on held-out scenes, and saves a checkpoint, a loss plot and a grid of example answers.
The multimodal issue replaces the word description with the image itself.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from polymodal.backbones.decoder import DecoderConfig, DecoderLM
from polymodal.recipes.lm import LMDataConfig, LMRecipeConfig, train_lm, world_qa_accuracy, world_qa_documents, world_qa_text
from polymodal.sequence import pack_documents
from polymodal.train.loop import TrainConfig


def quickstart(minutes: float = 3.0, out: str | Path = "runs/quickstart", seed: int = 0, eval_scenes: int = 100) -> dict:
    """Run the quickstart within about `minutes` of training; returns the evaluation table
    (exact-match accuracy per question type over `eval_scenes` held-out scenes)."""
    from polymodal.data.world import World, world_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    print(f"polymodal quickstart: training budget {minutes:.1f} min, writing to {out}/")
    tokenizer = world_tokenizer()
    documents = world_qa_documents(20000, tokenizer, seed=seed)
    model_config = DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=192, intermediate_size=512,
                                 num_layers=4, num_heads=6, num_kv_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    model = DecoderLM(model_config)
    data = LMDataConfig(source="world-qa", docs_per_batch=32, max_tokens=512)
    steps = _steps_in_budget(model, documents, data, minutes)
    train_config = TrainConfig(steps=steps, lr=3e-3, warmup_steps=max(1, steps // 20), weight_decay=0.01,
                               out_dir=str(out), ckpt_every=max(1, steps // 4), seed=seed, resume=True)
    config = LMRecipeConfig(model=model_config, data=data, train=train_config)
    model, tokenizer, result = train_lm(config, documents, tokenizer, model)
    print("evaluating on held-out scenes (val split)...")
    table = world_qa_accuracy(model, tokenizer, num_scenes=eval_scenes, split="val")
    _print_table(table)
    grid = _answer_grid(model, tokenizer, World(split="val"), out / "examples.png")
    print(f"\nloss plot:        {out / 'loss.png'}\nexample answers:  {grid}\ncheckpoint:       {result.checkpoint}")
    print("\nnext:")
    print(f'  polymodal complete {result.checkpoint} "a small red circle in the center.\\nQ: what color is the circle?\\nA:"')
    print(f"  polymodal train configs/lm/world_qa.yaml train.out_dir={out}-recipe")
    return table


def _steps_in_budget(model, documents, data: LMDataConfig, minutes: float) -> int:
    """Time two training steps on real batches and fit as many as the budget allows."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    batch = pack_documents(documents[: data.docs_per_batch], data.max_tokens, truncate=True)
    model(packed=batch).loss.backward()  # warm-up (allocations, kernel selection)
    start = time.perf_counter()
    for _ in range(2):
        model(packed=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    per_step = (time.perf_counter() - start) / 2
    return max(10, int(minutes * 60 / per_step))


def _print_table(table: dict[str, float]) -> None:
    print("\n  question type   exact match")
    for qtype, acc in table.items():
        print(f"  {qtype:<14}  {100 * acc:6.1f}%")


@torch.no_grad()
def _answer_grid(model, tokenizer, world, path: Path, n: int = 8) -> Path:
    from polymodal.eval.grids import labelled_grid
    from polymodal.infer.generate import generate

    images, labels, correct = [], [], []
    for scene in world.scenes(n):
        qa = scene.questions()[scene.index % len(scene.questions())]
        prompt = world_qa_text(scene, qa)[0]
        out = generate(model, [tokenizer.encode(prompt)], max_new_tokens=8, stop_strings=("\n",), tokenizer=tokenizer)[0]
        answer = tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()
        images.append(scene.image(128))
        labels.append([qa.question, f"model: {answer}  (truth: {qa.answer})"])
        correct.append(answer == qa.answer)
    return labelled_grid(images, labels, path, correct)
