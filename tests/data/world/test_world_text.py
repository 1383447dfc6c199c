"""Captions, QA and conversations agree with the scene's objects."""
import re

import pytest

from polymodal.data.world import COLORS, POSITION_NAMES, QTYPES, SHAPES, SIZES, World
from polymodal.data.world.text import LOCATIVES, captions_of

_BY_LOCATIVE = {LOCATIVES[name]: cell for cell, name in POSITION_NAMES.items()}
_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}
_ANSWERS = {
    "color": set(COLORS),
    "shape": set(SHAPES),
    "size": set(SIZES),
    "count": {str(n) for n in range(10)},
    "position": set(POSITION_NAMES.values()),
    "existence": {"yes", "no"},
    "relation": {"yes", "no"},
}


def _find(objects, phrase):
    """Objects named by "red circle" or "small red circle"."""
    words = phrase.split()
    if len(words) == 3:
        return [o for o in objects if [o.size, o.color, o.shape] == words]
    return [o for o in objects if [o.color, o.shape] == words]


def _check(qa, objects):
    """Recompute the answer of `qa` from the objects, independently of text.py."""
    if m := re.fullmatch(r"What color is the (\w+) (.+)\?", qa.question):
        (obj,) = [o for o in objects if o.cell == _BY_LOCATIVE[m[2]]]
        assert obj.shape == m[1]
        return obj.color
    if m := re.fullmatch(r"What is the shape of the object (.+)\?", qa.question):
        return next(o.shape for o in objects if o.cell == _BY_LOCATIVE[m[1]])
    if m := re.fullmatch(r"What size is the (\w+) (\w+) (.+)\?", qa.question):
        (obj,) = [o for o in objects if o.cell == _BY_LOCATIVE[m[3]]]
        assert (obj.color, obj.shape) == (m[1], m[2])
        return obj.size
    if m := re.fullmatch(r"Where is the (.+)\?", qa.question):
        (obj,) = _find(objects, m[1])
        return POSITION_NAMES[obj.cell]
    if qa.question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", qa.question):
        return str(sum(o.color == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", qa.question):
        return str(sum(_PLURALS[o.shape] == m[1] for o in objects))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", qa.question):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"Is the (.+) (left of|above) the (.+)\?", qa.question):
        (a,), (b,) = _find(objects, m[1]), _find(objects, m[3])
        axis = 1 if m[2] == "left of" else 0
        return "yes" if a.cell[axis] < b.cell[axis] else "no"
    raise AssertionError(f"unrecognised question {qa.question!r}")


def test_every_answer_matches_the_objects():
    seen_types, seen_answers = set(), set()
    for scene in World("train", num_objects=(1, 9), background="mixed").scenes(80):
        for qa in scene.questions():
            assert qa.qtype in QTYPES
            assert qa.answer in _ANSWERS[qa.qtype], qa
            assert _check(qa, scene.objects) == qa.answer, qa
            seen_types.add(qa.qtype)
            seen_answers.add((qa.qtype, qa.answer))
    assert seen_types == set(QTYPES)
    for qtype in ("existence", "relation"):
        assert {(qtype, "yes"), (qtype, "no")} <= seen_answers


def test_captions_name_every_object_and_position():
    scene = World("val", num_objects=(2, 4), background="texture")[3]
    captions = scene.captions()
    assert len(captions) == len(set(captions)) >= 6
    for caption in captions:
        for obj in scene.objects:
            assert f"{obj.color} {obj.shape}" in caption
    for variant in range(3):
        detailed = scene.caption("detailed", variant)
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.shape}" in detailed
            assert LOCATIVES[obj.position] in detailed.lower()
    assert scene.caption("short") in captions and scene.caption("detailed") in captions
    assert "textured" in scene.caption("short", 3)
    with pytest.raises(ValueError, match="style"):
        scene.caption("poem")
    with pytest.raises(ValueError, match="variant"):
        scene.caption("short", 9)


def test_grounded_caption_names_each_place_before_its_object():
    scene = World("val", num_objects=(3, 3))[5]
    grounded = scene.caption("grounded")
    assert captions_of(scene, ["grounded"]) == [grounded] and grounded in scene.captions()
    for obj in scene.objects:
        clause = f"{LOCATIVES[obj.position]} there is a{'n' if obj.size[0] in 'aeiou' else ''} {obj.size} {obj.color} {obj.shape}"
        assert clause in grounded.lower()
    assert captions_of(scene, ["short", "grounded"]) == scene.captions()[:4] + [grounded]
    with pytest.raises(ValueError, match="poem"):
        captions_of(scene, ["poem"])



def test_located_caption_names_each_object_before_its_place_in_a_seeded_order():
    scenes = World("val", num_objects=(3, 3)).scenes(20)
    orders = set()
    for scene in scenes:
        located = scene.caption("located")
        assert captions_of(scene, ["located"]) == [located] and located == scene.caption("located")
        clauses = located.rstrip(".").split("; ")
        assert len(clauses) == len(scene.objects)
        named = []
        for clause in clauses:
            phrase, locative = clause.lower().split(" is ")
            size, color, shape = phrase.split()[1:]
            (obj,) = [o for o in scene.objects if (o.size, o.color, o.shape) == (size, color, shape)
                      and LOCATIVES[o.position] == locative]
            named.append(scene.objects.index(obj))
        assert sorted(named) == list(range(len(scene.objects)))
        orders.add(tuple(named))
    assert len(orders) > 1  # not always reading order
def test_conversation_format():
    for scene in World("train", num_objects=(1, 5)).scenes(20):
        for turns in (1, 3, 5):
            chat = scene.conversation(turns)
            assert scene.conversation(turns) == chat
            assert len(chat) == 2 * turns
            assert [m["role"] for m in chat] == ["user", "assistant"] * turns
            assert chat[0]["content"].startswith("<image>\n")
            assert all("<image>" not in m["content"] for m in chat[1:])
            qa = {(q.question, q.answer) for q in scene.questions()}
            for user, reply in zip(chat[::2], chat[1::2]):
                question = user["content"].removeprefix("<image>\n")
                assert (question, reply["content"]) in qa or question.startswith(("Describe", "What do you see"))


def test_conversation_weights_ask_a_question_type_more_often():
    scenes = list(World("train", num_objects=(2, 3)).scenes(300))

    def share(weights):
        asked = [s.conversation(1, describe=0.0, weights=weights)[0]["content"].split("\n", 1)[1] for s in scenes]
        existence = [{qa.question for qa in s.questions() if qa.qtype == "existence"} for s in scenes]
        return sum(q in e for q, e in zip(asked, existence)) / len(scenes)

    assert share(None) < 0.22 and share({"existence": 4}) > 0.3
    assert all(s.conversation(3) == s.conversation(3, weights={}) for s in scenes[:20])
    for bad in ({"poem": 2}, {"existence": 0}, {"count": 1.5}):
        with pytest.raises(ValueError, match="weights"):
            scenes[0].conversation(2, weights=bad)


def test_conversation_describe_sets_the_share_of_chats_that_open_with_a_description():
    from polymodal.data.world.text import DESCRIBE_PROMPTS

    def opens_with_description(chat):
        return chat[0]["content"].removeprefix("<image>\n") in DESCRIBE_PROMPTS

    scenes = list(World("train", num_objects=(1, 3)).scenes(200))
    assert not any(opens_with_description(s.conversation(1, describe=0.0)) for s in scenes)
    assert all(opens_with_description(s.conversation(1, describe=1.0)) for s in scenes)
    share = sum(opens_with_description(s.conversation(1, describe=0.125)) for s in scenes) / len(scenes)
    assert 0.05 < share < 0.22
    assert all(s.conversation(4) == s.conversation(4, describe=0.5) for s in scenes[:20])
    with pytest.raises(ValueError, match="describe"):
        scenes[0].conversation(2, describe=1.5)


def test_conversation_describe_styles_choose_the_description_templates():
    from polymodal.data.world.text import caption, captions_of

    scenes = list(World("train", num_objects=(2, 3)).scenes(30))
    for scene in scenes:
        assert scene.conversation(1, describe=1.0, describe_styles=["located"])[1]["content"] == caption(scene, "located")
        assert scene.conversation(1, describe=1.0)[1]["content"] in captions_of(scene, ["detailed"])
        # The description's draw comes from the scene's seed and leaves the question turns as they were.
        assert (scene.conversation(3, describe=1.0, describe_styles=["located"])[2:]
                == scene.conversation(3, describe=1.0)[2:])
    with pytest.raises(ValueError, match="poem"):
        scenes[0].conversation(1, describe_styles=["poem"])
    with pytest.raises(ValueError, match="describe_styles"):
        scenes[0].conversation(1, describe_styles=[])

