"""Reasoning usage types: the tool-call loop (stops on a final answer, refuses unknown tools),
the think and tools chat variants, M-ICL prompts, and the side-by-side evaluation."""
import pytest
import torch

from polymodal.data.chat_documents import world_documents
from polymodal.data.conversation import ImageProcessor
from polymodal.data.world import World, world_tokenizer
from polymodal.data.world.reasoning import (
    TOOLS_SYSTEM,
    detect_objects,
    final_answer,
    object_list,
    reasoning_conversation,
    tool_call,
    tool_response,
)
from polymodal.eval.reasoning import evaluate_reasoning
from polymodal.infer.chat import encode_chat
from polymodal.infer.reasoning import (
    in_context_messages,
    parse_tool_call,
    run_with_tools,
    world_tools,
)
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny_for
from polymodal.recipes.mmllm import MMLLMDataConfig


class Scripted:
    """A responder that replies from a script per conversation (keyed by its first user message),
    recording what each round was asked."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.rounds: list[list[str]] = []

    def __call__(self, conversations):
        keys = [next(m["content"] for m in messages if m["role"] == "user") for messages, _ in conversations]
        self.rounds.append(keys)
        return [self.scripts[key].pop(0) for key in keys]


def _scene():
    return World("val", image_size=64, num_objects=(2, 3))[4]


def test_the_tool_loop_runs_the_detector_and_stops_on_a_final_answer():
    scene = _scene()
    respond = Scripted({"a": [tool_call("detect"), "Answer: 2", "never asked"],
                        "b": ["Answer: yes"]})
    runs = run_with_tools(respond, [([{"role": "user", "content": "a"}], [scene.render()]),
                                    ([{"role": "user", "content": "b"}], [scene.render()])], world_tools())
    assert [run.answer for run in runs] == ["Answer: 2", "Answer: yes"]
    assert runs[0].calls == ["detect"] and runs[1].calls == [] and runs[0].refused == []
    assert respond.rounds == [["a", "b"], ["a"]]  # a finished conversation is not asked again
    # The detector is the exact scorer: on a rendered scene it lists exactly the scene's objects.
    assert runs[0].messages[2] == {"role": "user", "content": tool_response(object_list(scene.objects))}
    assert respond.scripts["a"] == ["never asked"]


def test_the_tool_loop_refuses_unknown_tools_and_malformed_calls_and_stops_at_the_budget():
    ran = []
    tools = {"detect": lambda images: ran.append(len(images)) or "a red circle in the center"}
    respond = Scripted({"q": ['<tool_call>{"name": "calculator", "arguments": {"x": 1}}</tool_call>',
                              "<tool_call>{not json}</tool_call>", "Answer: 3"]})
    run = run_with_tools(respond, [([{"role": "user", "content": "q"}], ["img"])], tools)[0]
    assert run.answer == "Answer: 3" and run.refused == ["calculator", ""] and run.calls == [] and ran == []
    assert "unknown tool 'calculator'; available tools: detect" in run.messages[2]["content"]
    assert "must be JSON" in run.messages[4]["content"]

    forever = Scripted({"q": [tool_call("detect")] * 10})
    run = run_with_tools(forever, [([{"role": "user", "content": "q"}], ["img"])], tools, max_calls=2)[0]
    assert run.answer is None and run.calls == ["detect", "detect"] and len(forever.rounds) == 3 and ran == [1, 1]
    wrong_arguments = Scripted({"q": [tool_call("detect", {"color": "red"}), "Answer: 0"]})
    run = run_with_tools(wrong_arguments, [([{"role": "user", "content": "q"}], ["img"])], tools)[0]
    assert run.refused == ["detect"] and "error: detect" in run.messages[2]["content"]


def test_tool_call_parsing_and_final_answers():
    assert parse_tool_call("Sure. " + tool_call("detect") + " then") .name == "detect"
    assert parse_tool_call(tool_call("zoom", {"cell": "top"})).arguments == {"cell": "top"}
    assert parse_tool_call("Answer: 2") is None
    assert parse_tool_call('<tool_call>["detect"]</tool_call>').name == ""
    assert final_answer("Objects: a red star in the center. Answer: 1\nmore") == "1"
    assert final_answer("  yes\nno") == "yes"


def test_think_and_tools_variants_list_the_objects_before_the_answer():
    scene = _scene()
    think = reasoning_conversation(scene, "think", turns=2)
    assert len(think) == 4 and think[0]["content"].startswith("<image>\n")
    qas = {qa.question: qa.answer for qa in scene.questions()}
    for question, reply in zip(think[::2], think[1::2]):
        text = question["content"].removeprefix("<image>\n").removesuffix(" Think step by step.")
        assert final_answer(reply["content"]) == qas[text]
        assert reply["content"].index(object_list(scene.objects)) < reply["content"].index("Answer:")
    tools = reasoning_conversation(scene, "tools", turns=1)
    assert tools[0] == {"role": "system", "content": TOOLS_SYSTEM}
    assert parse_tool_call(tools[2]["content"]).name == "detect"
    assert tools[3]["content"] == tool_response(detect_objects(scene.render()))
    with pytest.raises(ValueError, match="variant"):
        reasoning_conversation(scene, "dream")


def test_reasoning_chats_enter_the_mmllm_data_and_in_context_prompts_encode():
    tokenizer = world_tokenizer()
    config = mmllm_tiny_for(tokenizer)
    torch.manual_seed(0)
    model = MultimodalLM(config).eval()
    world = World("train", image_size=config.image_size, num_objects=(1, 3))
    processor = ImageProcessor.for_model(config)
    document = world_documents("instruct", tokenizer, processor, world, config.image_token_id, model.image_tokens,
                               turns=1, caption_styles=["short"], think=0.5, tools=0.5)
    text = " ".join(tokenizer.decode(s.tokens.tolist()) for i in range(12) for s in document(i).segments
                    if s.modality == "text")
    assert "Answer:" in text and "<tool_call>" in text and "Objects:" in text
    with pytest.raises(ValueError, match="think \\+ tools"):
        MMLLMDataConfig(think=0.6, tools=0.6)

    scene = _scene()
    messages = in_context_messages([("How many objects are there?", "2"), ("How many objects are there?", "3")],
                                   "How many objects are there?")
    prompt = encode_chat(model, tokenizer, messages, [scene.render()] * 3)
    assert prompt.pixels.shape[0] == 3 and prompt.ids.count(config.image_token_id) == 3 * model.image_tokens


def test_the_evaluation_reports_every_mode_side_by_side():
    tokenizer = world_tokenizer()
    torch.manual_seed(0)
    model = MultimodalLM(mmllm_tiny_for(tokenizer))
    metrics = evaluate_reasoning(model, tokenizer, num_scenes=2, progress=False)
    for mode in ("plain", "icl", "think", "tools"):
        assert {f"{mode}_all", f"{mode}_count", f"{mode}_relation", f"{mode}_position"} <= set(metrics)
    assert 0.0 <= metrics["tools_called"] <= 1.0
    with pytest.raises(ValueError, match="modes"):
        evaluate_reasoning(model, tokenizer, num_scenes=1, modes=("guess",))
