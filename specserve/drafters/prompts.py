"""The shipped drafter's training prompts: written here from templates, nothing downloaded.

Evaluation data stays evaluation data: no prompt comes from Spec-Bench, HumanEvalFix or the
Python standard library's sources and docstrings (a test checks the first two for overlap).
Tasks mirror what chat users ask — explanations, writing, rewriting, lists, advice, role-play,
science and history questions, arithmetic word problems, small coding tasks, translation of
made-up sentences in both directions — over everyday topics,
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
# Written here for translation *into* English (simple everyday sentences).
FOREIGN_SENTENCES = (
    ("German", "Der Zug nach Hamburg hat heute zwanzig Minuten Verspätung."),
    ("German", "Meine Schwester arbeitet seit drei Jahren in einer kleinen Buchhandlung."),
    ("German", "Im Sommer fahren wir oft mit dem Fahrrad an den See."),
    ("German", "Die Regierung will im nächsten Jahr mehr Geld für Schulen ausgeben."),
    ("German", "Kannst du mir bitte sagen, wo die nächste Apotheke ist?"),
    ("German", "Das neue Museum in der Altstadt wurde am Samstag eröffnet."),
    ("French", "Nous avons visité un petit village près de la mer pendant les vacances."),
    ("French", "Le marché ouvre tous les mercredis sur la place principale."),
    ("Spanish", "Mi abuela cocina la mejor sopa de verduras de la ciudad."),
    ("Spanish", "El concierto empezó tarde porque llovía mucho."),
)
ROLES = (
    "a ship captain",
    "a medieval blacksmith",
    "a park ranger",
    "a detective in an old city",
    "a friendly robot assistant",
    "a chef in a busy restaurant",
    "a tour guide in a mountain town",
    "an astronaut on a space station",
    "a librarian",
    "a football coach",
)
STEM = (
    "photosynthesis",
    "how magnets work",
    "the water cycle",
    "how vaccines train the immune system",
    "why the sky is blue",
    "how a battery stores energy",
    "what DNA does in a cell",
    "how airplanes stay in the air",
    "the difference between weather and climate",
    "how a compiler turns code into a program",
    "what an algorithm is",
    "how the internet sends data",
    "what a black hole is",
    "why we have seasons",
    "how a refrigerator keeps food cold",
    "prime numbers",
)
HISTORY = (
    "the invention of the printing press",
    "the industrial revolution",
    "the building of the first railways",
    "the history of the bicycle",
    "the spread of public schools",
    "the invention of the telephone",
    "ancient Egyptian farming",
    "the history of the Olympic games",
)
WRITING = (
    "Write a persuasive paragraph arguing that every town needs {topic}.",
    "Write a travel blog post about a weekend trip focused on {topic}.",
    "Write a short speech for a school assembly about {topic}.",
    "Write a review of an imaginary book about {topic}.",
    "Write the opening scene of a mystery story involving {topic}.",
    "Write a limerick about {topic}.",
)
ROLEPLAY = (
    "Pretend you are {role}. Describe a typical day in your life.",
    "You are {role}. Give advice to someone who wants to learn about {topic}.",
    "Imagine you are {role}. Write a diary entry about an unexpected event.",
)
QUESTIONS = (
    "Explain {stem} in simple terms.",
    "What are the most important ideas behind {stem}?",
    "Give an everyday example that illustrates {stem}.",
    "What were the causes and effects of {history}?",
    "Describe {history} and why it mattered.",
)
MORE_CODE_TASKS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that returns the nth Fibonacci number iteratively.",
    "Write a Python function that counts how often each word appears in a text.",
    "Write a JavaScript function that filters the even numbers out of an array.",
    "Write a C function that returns the length of a string without strlen.",
    "Write an SQL query that counts orders per customer in a table called orders.",
    "Explain what recursion is and give a short Python example.",
    "Explain the difference between a stack and a queue, with examples.",
    "Write a Python class for a to-do list with add, remove and list methods.",
    "Write a Python function that validates that a password has at least 8 characters "
    "and one digit.",
    "Write a shell command that counts the lines in every .txt file in a folder.",
)


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
        topic, other = rng.sample(TOPICS, 2)
        if kind < 0.42:
            text = rng.choice(TEMPLATES).format(topic=topic, other=other)
        elif kind < 0.52:
            text = rng.choice(WRITING).format(topic=topic)
        elif kind < 0.58:
            text = rng.choice(ROLEPLAY).format(role=rng.choice(ROLES), topic=topic)
        elif kind < 0.68:
            question = rng.choice(QUESTIONS)
            text = question.format(stem=rng.choice(STEM), history=rng.choice(HISTORY))
        elif kind < 0.8:
            text = rng.choice(CODE_TASKS + MORE_CODE_TASKS)
        elif kind < 0.9:
            text = _math(rng)
        elif kind < 0.95:
            language = rng.choice(LANGUAGES)
            text = f"Translate into {language}: {rng.choice(SENTENCES)}"
        else:
            language, sentence = rng.choice(FOREIGN_SENTENCES)
            text = f"Translate this {language} sentence into English: {sentence}"
        if text in seen and len(seen) < 0.9 * _capacity():
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "user", "content": text}]})
    return rows


def _capacity() -> int:
    """Roughly how many distinct prompts the templates can make (repeats allowed past it)."""
    pairs = len(TOPICS) * (len(TOPICS) - 1)
    questions = len(QUESTIONS) * max(len(STEM), len(HISTORY))
    roleplay = len(ROLEPLAY) * len(ROLES) * len(TOPICS)
    return (
        len(TEMPLATES) * pairs
        + len(WRITING) * len(TOPICS)
        + roleplay
        + questions
        + len(CODE_TASKS + MORE_CODE_TASKS)
        + len(SENTENCES) * len(LANGUAGES)
        + len(FOREIGN_SENTENCES)
        + 10_000
    )
