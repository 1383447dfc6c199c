"""General text prompts for keeping a pretrained LM's chat skills while it learns images.

REPLAY_PROMPTS feed stage-2 "text replay": the LM answers them itself before tuning starts, and
those (prompt, own answer) chats are mixed into the visual chats, so the loss also asks it to keep
answering as it did (self-distillation; no outside answers are needed). RETENTION_QUESTIONS are
held out from the replay and measure what tuning changed: the base model's greedy answers
against the tuned model's (`polymodal.eval.retention`). Both lists ask for short answers, which a
135M model gives in well under a hundred tokens.
"""
from __future__ import annotations

REPLAY_PROMPTS = (
    "What is the boiling point of water at sea level?",
    "Name three primary colors.",
    "Give me a synonym for 'happy'.",
    "What is 12 times 8?",
    "Which planet is closest to the sun?",
    "Write one sentence about autumn.",
    "What do bees make?",
    "How many days are in a leap year?",
    "What is the opposite of 'ancient'?",
    "Name a mammal that lives in the ocean.",
    "What language is spoken in Brazil?",
    "In one sentence, what is photosynthesis?",
    "What is the chemical symbol for gold?",
    "Suggest a name for a pet goldfish.",
    "How many legs does a spider have?",
    "What is the largest continent?",
    "Give one tip for sleeping better.",
    "Who wrote 'Romeo and Juliet'?",
    "What is the square root of 81?",
    "Describe a rainbow in one sentence.",
    "What is the freezing point of water in Fahrenheit?",
    "Name two fruits that are yellow.",
    "What gas do plants take in from the air?",
    "Complete the phrase: an apple a day...",
    "What is the tallest animal?",
    "How many sides does a hexagon have?",
    "What is the capital of Japan?",
    "Give an example of a renewable energy source.",
    "What instrument has 88 keys?",
    "Write a short greeting for a birthday card.",
    "What is the main ingredient of guacamole?",
    "How many minutes are in two hours?",
    "What do you call a baby cat?",
    "Name the four seasons.",
    "What is the past tense of 'run'?",
    "Which organ pumps blood through the body?",
    "What is 100 divided by 4?",
    "Give me a word that rhymes with 'light'.",
    "What is the longest river in Africa?",
    "Say something encouraging to a student before an exam.",
)

RETENTION_QUESTIONS = (
    "What is the capital of France?",
    "How many continents are there?",
    "What is 7 plus 5?",
    "Give me a word that means 'big'.",
    "What color is the sky on a clear day?",
    "Name an animal that can fly.",
    "What is water made of?",
    "Write one sentence about the moon.",
)
