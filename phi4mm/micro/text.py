"""The text side of the micro model's data: vocabulary and grammar, the invented language, question tables and
tools. `micro.data` builds the samples (and re-exports these names)."""
from __future__ import annotations

import random
import zlib
from typing import Any

LANGUAGE = "Vellish"

# ---- vocabulary and grammar ------------------------------------------------------------------------------
# Past-tense verbs agree with singular and plural subjects alike, so the grammar needs no agreement rules.
DETERMINERS = ("the", "my", "your", "this", "that", "his", "her", "our")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink")
SIZES = ("big", "small", "tall", "little", "old", "young")
NOUNS = ("dog", "cat", "bird", "bear", "horse", "cow", "duck", "frog", "mouse", "rabbit",
         "ball", "box", "car", "book", "cup", "hat", "chair", "boat", "tree", "kite")
PLURALS = ("dogs", "cats", "birds", "bears", "horses", "cows", "ducks", "frogs", "mice", "rabbits",
           "balls", "boxes", "cars", "books", "cups", "hats", "chairs", "boats", "trees", "kites")
VERBS_INTRANSITIVE = ("ran", "walked", "jumped", "slept", "sat", "swam", "played", "waited", "stopped", "danced")
VERBS_TRANSITIVE = ("saw", "found", "took", "liked", "wanted", "pushed", "carried", "watched", "followed", "painted")
PREPOSITIONS = ("to", "from", "near", "in", "under", "behind", "into", "past")
PLACES = ("house", "park", "garden", "school", "river", "forest", "beach", "city", "farm", "shop", "kitchen",
          "street")
TIMES = ("today", "yesterday", "tonight", "again", "early", "later")
VOCAB = tuple(sorted({*DETERMINERS, *NUMBERS, *COLOURS, *SIZES, *NOUNS, *PLURALS, *VERBS_INTRANSITIVE,
                      *VERBS_TRANSITIVE, *PREPOSITIONS, *PLACES, *TIMES, "and"}))
HELDOUT_MODULUS = 10  # crc32 % 10 == 0: ~10% of sentences are test-only
SENTENCE_WORDS = (4, 9)


def _invent_vellish() -> dict[str, str]:
    """English word -> invented CV-syllable word; seeded per word so adding a word moves no other word."""
    table: dict[str, str] = {}
    for word in VOCAB:
        rng = random.Random(f"vellish-{word}")
        while True:
            syllables = 1 + min(3, (len(word) + 1) // 3) if len(word) > 2 else 2
            w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
            w += rng.choice("nlrs") if rng.random() < 0.4 else ""
            if w not in VOCAB and w not in table.values():
                table[word] = w
                break
    return table


_VELLISH = _invent_vellish()


def to_vellish(text: str) -> str:
    """Translate an English VOCAB sentence word by word (order kept); unknown words pass through."""
    return " ".join(_VELLISH.get(w, w) for w in text.lower().split())


def _noun_phrase(rng: random.Random) -> list[str]:
    r = rng.random()
    adj = ([rng.choice(COLOURS)] if r < 0.3 else [rng.choice(SIZES)] if r < 0.5
           else [rng.choice(SIZES), rng.choice(COLOURS)] if r < 0.6 else [])
    k = rng.randrange(len(NOUNS))
    if rng.random() < 0.35:
        n = rng.randrange(len(NUMBERS))
        return [NUMBERS[n], *adj, NOUNS[k] if n == 0 else PLURALS[k]]
    return [rng.choice(DETERMINERS), *adj, NOUNS[k]]


def _place(rng: random.Random) -> list[str]:
    return [rng.choice(PREPOSITIONS), "the", *([rng.choice(SIZES)] if rng.random() < 0.3 else []), rng.choice(PLACES)]


def sentence(rng: random.Random) -> str:
    """A random 4-9 word lowercase sentence from VOCAB, e.g. 'three red dogs ran to the old house'."""
    while True:
        t = rng.randrange(5)
        when = [rng.choice(TIMES)] if rng.random() < 0.3 else []
        opt_place = _place(rng) if rng.random() < 0.6 else []
        if t == 0:
            words = [*_noun_phrase(rng), rng.choice(VERBS_INTRANSITIVE), *opt_place, *when]
        elif t == 1:
            words = [*_noun_phrase(rng), rng.choice(VERBS_TRANSITIVE), *_noun_phrase(rng), *when]
        elif t == 2:
            words = [*_noun_phrase(rng), rng.choice(VERBS_TRANSITIVE), *_noun_phrase(rng), *_place(rng)]
        elif t == 3:
            words = [*_noun_phrase(rng), "and", *_noun_phrase(rng), rng.choice(VERBS_INTRANSITIVE), *opt_place]
        else:
            words = [rng.choice(TIMES), *_noun_phrase(rng), rng.choice(VERBS_INTRANSITIVE), *_place(rng)]
        if SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1]:
            return " ".join(words)


def is_heldout(text: str) -> bool:
    """True for the ~10% of sentences reserved for the test split (a stable hash, same on every machine)."""
    return zlib.crc32(text.encode("utf-8")) % HELDOUT_MODULUS == 0


def split_sentence(rng: random.Random, split: str) -> str:
    """A sentence of the split's side of the held-out line (rejection sampling; ~10 draws for test)."""
    while True:
        s = sentence(rng)
        if is_heldout(s) == (split == "test"):
            return s


# ---- question tables (spoken questions, text facts) ------------------------------------------------------
def _qa_table() -> list[tuple[str, str]]:
    colours = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "black", "blood": "red",
               "banana": "yellow", "sea": "blue", "coal": "black", "milk": "white", "leaf": "green",
               "tomato": "red", "orange": "orange", "chocolate": "brown"}
    sounds = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "frog": "ribbit", "bird": "tweet",
              "mouse": "squeak", "horse": "neigh", "sheep": "baa", "lion": "roar"}
    pairs = [("big", "small"), ("hot", "cold"), ("up", "down"), ("day", "night"), ("old", "young"),
             ("fast", "slow"), ("tall", "short"), ("open", "closed"), ("black", "white"), ("happy", "sad"),
             ("left", "right"), ("in", "out"), ("yes", "no"), ("wet", "dry")]
    num = ("zero",) + NUMBERS
    qa = [(f"what color is the {k}", v) for k, v in colours.items()]
    qa += [(f"what does a {k} say", v) for k, v in sounds.items()]
    qa += [(f"what is the opposite of {a}", b) for a, b in pairs] + [(f"what is the opposite of {b}", a)
                                                                        for a, b in pairs]
    qa += [(f"what is {num[a]} plus {num[b]}", num[a + b]) for a in range(1, 10) for b in range(1, 11 - a)]
    qa += [(f"what is {num[a]} minus {num[b]}", num[a - b]) for a in range(2, 11) for b in range(1, a)]
    qa += [(f"what number comes after {num[a]}", num[a + 1]) for a in range(1, 10)]
    return qa


QA = _qa_table()
GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What can I do for you?"),
    ("Good morning!", "Good morning! How are you today?"), ("Good night.", "Good night! Sleep well."),
    ("How are you?", "I am fine, thank you. How are you?"), ("What is your name?", "I am a small assistant."),
    ("Who are you?", "I am a small assistant. I can read, listen and answer questions."),
    ("Thank you!", "You are welcome!"), ("Thanks a lot.", "Happy to help!"), ("Bye!", "Goodbye! Have a nice day."),
    ("See you later.", "See you later!"), ("Can you help me?", "Of course. What do you need?"),
    ("Are you a robot?", "I am a computer program, a small language model."),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse!"),
    ("I am happy today.", "That is great to hear!"), ("I am tired.", "Maybe it is time for a rest."),
    ("What can you do?", "I can answer questions, read words in images and listen to speech."),
    ("Do you like music?", "I cannot hear music for fun, but I like talking about it."),
    ("Good afternoon.", "Good afternoon! How can I help?"), ("Nice to meet you.", "Nice to meet you too!"),
    ("What day is it?", "I do not know today's date."), ("Say something nice.", "You are doing a great job!"),
    ("Are you smart?", "I am a very small model, so I know only a little."), ("Hey!", "Hey! What's up?"),
    ("I am bored.", "How about a walk or a good book?"), ("Do you sleep?", "No, I am always ready to help."),
    ("Where do you live?", "I live inside a computer."), ("Goodbye.", "Goodbye! Come back soon."),
)

# ---- tools ------------------------------------------------------------------------------------------------
SYSTEM_TOOLS = "You are a helpful assistant with some tools."
NO_TOOL_ANSWER = "Sorry, I can't do that with the tools I have."
NO_TOOL_SHARE = 0.15
CITIES = ("Paris", "London", "Tokyo", "New York", "Berlin", "Madrid", "Rome", "Cairo", "Sydney", "Toronto",
          "Mumbai", "Seoul", "Lima", "Oslo", "Dublin", "Chicago", "Moscow", "Nairobi", "Bangkok", "Mexico City")
PEOPLE = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Mia", "Noah", "Sam")
MESSAGES = ("I will be late", "see you soon", "call me back", "happy birthday", "dinner is ready",
            "I am on my way", "the meeting moved to three", "thank you for the gift")
ARTISTS = ("The Beatles", "Mozart", "Taylor Swift", "Queen", "Bach", "Miles Davis", "Adele", "Bob Marley",
           "Coldplay", "Beyonce")
QUERIES = ("how to bake bread", "the tallest mountain", "best pizza near me", "how far is the moon",
           "easy pasta recipes", "how to tie a tie", "cheap flights to {city}", "news about {city}")
ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway")
# name: (description, {param: (JSON type, description)}, phrasings)
TOOL_TABLE: dict[str, tuple[str, dict[str, tuple[str, str]], tuple[str, ...]]] = {
    "get_weather": ("Get the current weather for a city.", {"city": ("string", "The city name.")},
                    ("What's the weather like in {city}?", "Is it raining in {city} right now?",
                     "Tell me the weather in {city}.", "weather in {city}", "How warm is it in {city} today?")),
    "set_timer": ("Start a countdown timer.", {"minutes": ("integer", "Length of the timer in minutes.")},
                  ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.",
                   "Remind me in {minutes} minutes.", "timer {minutes} min please")),
    "send_message": ("Send a text message to a contact.", {"to": ("string", "The contact's name."),
                                                           "text": ("string", "The message.")},
                     ("Send a message to {to} saying {text}.", "Text {to}: {text}", "Tell {to} that {text}.",
                      "Message {to} '{text}'")),
    "play_music": ("Play music by an artist.", {"artist": ("string", "The artist or band.")},
                   ("Play some {artist}.", "Put on music by {artist}.", "I want to listen to {artist}.",
                    "play {artist}")),
    "add_numbers": ("Add two integers.", {"a": ("integer", "First number."), "b": ("integer", "Second number.")},
                    ("What is {a} plus {b}?", "Add {a} and {b}.", "Can you add {a} to {b}?", "sum of {a} and {b}")),
    "search_web": ("Search the web.", {"query": ("string", "What to search for.")},
                   ("Search the web for {query}.", "Look up {query} online.", "Find information about {query}.",
                    "google {query}")),
    "get_time": ("Get the current local time in a city.", {"city": ("string", "The city name.")},
                 ("What time is it in {city}?", "Tell me the current time in {city}.", "what's the time in {city}")),
    "turn_on_light": ("Turn on the light in a room.", {"room": ("string", "The room.")},
                      ("Turn on the light in the {room}.", "Switch on the {room} light.",
                       "Lights on in the {room}, please.", "Can you light up the {room}?")),
}


def tool_spec(name: str) -> dict[str, Any]:
    """The OpenAI-style function description of a TOOL_TABLE entry."""
    desc, params, _ = TOOL_TABLE[name]
    props = {p: {"type": t, "description": d} for p, (t, d) in params.items()}
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": list(params)}}}


def tool_args(name: str, rng: random.Random) -> dict[str, Any]:
    city = rng.choice(CITIES)
    values = {"city": city, "minutes": rng.randint(1, 90), "to": rng.choice(PEOPLE), "text": rng.choice(MESSAGES),
              "artist": rng.choice(ARTISTS), "a": rng.randint(0, 999), "b": rng.randint(0, 999),
              "query": rng.choice(QUERIES).format(city=city), "room": rng.choice(ROOMS)}
    return {p: values[p] for p in TOOL_TABLE[name][1]}
