"""The shipped drafter's training prompts: written here from templates, nothing downloaded.

Evaluation data stays evaluation data: no prompt comes from Spec-Bench, HumanEvalFix or the
Python standard library's sources and docstrings (a test checks the first two for overlap).
Tasks mirror what chat users ask — explanations, writing, rewriting, lists, advice, arithmetic
word problems, small coding tasks, translation of made-up sentences — over everyday topics,
combined deterministically so one seed always yields the same set.
"""

from __future__ import annotations

import random

TOPICS = (
    "houseplants",
    "bicycles",
    "a rainy weekend",
    "learning to cook",
    "public libraries",
    "volcanoes",
    "saving money",
    "a first job interview",
    "honeybees",
    "the night sky",
    "board games",
    "running a marathon",
    "composting",
    "a small bakery",
    "city buses",
    "lighthouses",
    "learning a new language",
    "sleep",
    "camping in the mountains",
    "the history of maps",
    "recycling plastic",
    "a birthday party",
    "electric cars",
    "penguins",
    "a school science fair",
    "knitting",
    "coffee",
    "the ocean tides",
    "moving to a new city",
    "a community garden",
    "thunderstorms",
    "teamwork",
    "the first day of school",
    "trains",
    "photography",
    "a lost cat",
    "winter holidays",
    "solar panels",
    "chess",
    "a museum visit",
    "healthy breakfasts",
    "kites",
    "rivers",
    "a job as a nurse",
    "time management",
    "deserts",
    "friendship",
    "the moon landing",
    "birdwatching",
    "a village market",
    "painting with watercolors",
    "earthquakes",
    "public speaking",
    "dinosaurs",
    "a road trip",
    "baking bread",
    "the human heart",
    "recycling paper",
    "a football match",
    "robots in factories",
)
TEMPLATES = (
    "Explain {topic} to a ten-year-old.",
    "Write a short story about {topic}.",
    "Write a poem about {topic}.",
    "Give me five tips about {topic}.",
    "What are the pros and cons of {topic}?",
    "Write a friendly email to a colleague about {topic}.",
    "Describe {topic} in three sentences.",
    "Write a blog post introduction about {topic}.",
    "List some interesting facts about {topic}.",
    "How would you teach a beginner about {topic}?",
    "Write a dialogue between two friends talking about {topic}.",
    "Summarize why people care about {topic}.",
    "What questions should I ask an expert on {topic}?",
    "Write a product description for something related to {topic}.",
    "Give a step-by-step plan for a project about {topic}.",
    "What are common mistakes people make with {topic}?",
    "Write a motivational message about {topic}.",
    "Compare {topic} with {other}.",
    "Write a short news report about {topic}.",
    "Rewrite this sentence to sound more formal: I really like {topic} a lot.",
)
CODE_TASKS = (
    "Write a Python function that returns the largest of three numbers.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that reverses the words in a sentence.",
    "Write a Python function that checks whether a number is even.",
    "Write a Python function that sums a list of numbers without using sum().",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that removes duplicates from a list, keeping order.",
    "Write a Python class for a simple bank account with deposit and withdraw.",
    "Write a Python function that returns the first n square numbers.",
    "Write a Python function that capitalizes the first letter of each word.",
    "Explain what a Python list comprehension is, with an example.",
    "Write a Python loop that prints a multiplication table for 7.",
    "Write a JavaScript function that adds two numbers.",
    "Write an SQL query that selects all customers from a table called customers.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a Python function that finds the average length of words in a text.",
)
NAMES = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "June")
THINGS = ("apples", "pencils", "books", "stickers", "marbles", "cookies", "tickets", "coins")
SENTENCES = (
    "The library opens at nine in the morning.",
    "My brother plays the guitar every evening.",
    "We are going to the beach tomorrow.",
    "The soup is too hot to eat.",
    "She forgot her umbrella at the station.",
    "The train was late because of the snow.",
    "Please close the window when you leave.",
    "Our neighbors have a very friendly dog.",
)
LANGUAGES = ("French", "Spanish", "German", "Italian")


def _math(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 40), rng.randint(2, 15), rng.randint(2, 9)
    name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
    forms = (
        f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?",
        f"{name} has {a * c} {thing} and shares them equally among {c} friends. "
        f"How many does each friend get?",
        f"{name} had {a + b} {thing} and gave {b} to {other}. How many are left?",
        f"A box holds {c} {thing}. How many {thing} are in {b} boxes?",
    )
    return rng.choice(forms) + " Explain your reasoning."


def synthetic_prompts(count: int = 400, seed: int = 0) -> list[dict[str, object]]:
    """``count`` chat requests (``{"messages": [...]}`` rows) from the templates above."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    while len(rows) < count:
        kind = rng.random()
        if kind < 0.62:
            topic, other = rng.sample(TOPICS, 2)
            text = rng.choice(TEMPLATES).format(topic=topic, other=other)
        elif kind < 0.77:
            text = rng.choice(CODE_TASKS)
        elif kind < 0.9:
            text = _math(rng)
        else:
            language = rng.choice(LANGUAGES)
            text = f"Translate into {language}: {rng.choice(SENTENCES)}"
        if text in seen and len(seen) < 0.9 * _capacity():
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "user", "content": text}]})
    return rows


def _capacity() -> int:
    """Roughly how many distinct prompts the templates can make (repeats allowed past it)."""
    pairs = len(TOPICS) * (len(TOPICS) - 1)
    return len(TEMPLATES) * pairs + len(CODE_TASKS) + len(SENTENCES) * len(LANGUAGES) + 10_000
