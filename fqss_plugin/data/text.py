"""Procedurally generated English sentences (no corpus, no download).

A sentence is one or more *clauses* joined by conjunctions; each clause follows
one of a handful of templates over small hand-written word lists
(``NP V NP``, ``NP V PP``, ``TIME NP V ADV`` ...).  Clauses are appended until
the sentence reaches the requested number of words, so the caller controls the
spoken duration through the word count (duration ~ words / speaking rate).

``transcript(text)`` gives the LibriSpeech-style transcript of a sentence:
upper case, no punctuation except apostrophes.
"""
from __future__ import annotations

import re

import numpy as np

NAMES = (
    "Anna", "Arthur", "Beatrice", "Bernard", "Clara", "Daniel", "Edith", "Felix", "Grace", "Harold",
    "Irene", "Jasper", "Katherine", "Leonard", "Margaret", "Nathan", "Olive", "Peter", "Rosa",
    "Samuel", "Theresa", "Victor", "Walter", "Eleanor", "Thomas", "Lucy", "Martin", "Helen",
)
DETERMINERS = ("the", "a", "every", "this", "that", "one", "my", "our", "their", "his", "her", "some")
ADJECTIVES = (
    "old", "young", "quiet", "bright", "dark", "small", "large", "heavy", "gentle", "silver", "golden",
    "narrow", "broad", "distant", "ancient", "cold", "warm", "empty", "busy", "tired", "clever", "patient",
    "curious", "simple", "strange", "famous", "humble", "wooden", "stone", "green", "yellow", "crimson",
    "pale", "sudden", "early", "late", "careful", "honest", "proud", "lonely", "noisy", "steady",
    "hidden", "open", "broken", "shining", "thin", "round", "square", "sharp", "soft", "wild",
)
NOUNS = (
    "farmer", "captain", "doctor", "teacher", "soldier", "merchant", "painter", "sailor", "child",
    "stranger", "neighbour", "gardener", "traveller", "king", "queen", "baker", "miller", "student",
    "river", "mountain", "village", "garden", "window", "letter", "bridge", "lantern", "harbour", "forest",
    "carriage", "table", "candle", "kettle", "basket", "ladder", "mirror", "orchard", "meadow", "castle",
    "cottage", "road", "field", "ship", "horse", "dog", "bird", "clock", "door", "book", "map", "coat",
    "hill", "lake", "tower", "market", "chapel", "library", "kitchen", "valley", "island", "storm",
    "fire", "song", "story", "voice", "question", "answer", "journey", "promise", "secret", "morning",
)
TRANSITIVE_VERBS = (
    "found", "carried", "painted", "opened", "closed", "watched", "followed", "repaired", "visited",
    "remembered", "forgot", "described", "answered", "admired", "noticed", "crossed", "built", "sold",
    "bought", "mended", "cleaned", "counted", "lifted", "pushed", "pulled", "wrote", "read", "heard",
    "saw", "greeted", "guarded", "measured", "studied", "borrowed", "returned", "hid", "showed",
)
INTRANSITIVE_VERBS = (
    "waited", "laughed", "wandered", "listened", "rested", "smiled", "travelled", "worked", "hurried",
    "stopped", "slept", "danced", "sang", "whispered", "shouted", "returned", "arrived", "departed",
    "trembled", "hesitated", "spoke", "sighed", "nodded", "paused",
)
ADVERBS = (
    "slowly", "quickly", "quietly", "suddenly", "carefully", "happily", "silently", "gently", "again",
    "together", "alone", "early", "late", "patiently", "eagerly", "calmly", "softly", "loudly", "often",
)
PREPOSITIONS = (
    "near", "behind", "beside", "across", "under", "over", "inside", "outside", "beyond", "along",
    "toward", "around", "through", "past", "below", "above",
)
TIME_PHRASES = (
    "in the morning", "at noon", "after supper", "before dawn", "in the evening", "on sunday",
    "that winter", "last summer", "the next day", "at midnight", "in the spring", "after the storm",
    "by the time the bells rang", "long ago", "once again",
)
CONJUNCTIONS = ("and", "but", "while", "because", "so", "although", "when", "before", "after", "until")
SLACK = 3
REDRAWS = 8
SPEECH_VERBS = ("said", "thought", "knew", "believed", "remembered", "explained", "wrote")


class SentenceGenerator:
    """Draws sentences from the templates with a caller-owned random generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def _pick(self, words: tuple[str, ...]) -> str:
        return words[int(self._rng.integers(len(words)))]

    def _noun_phrase(self) -> str:
        choice = self._rng.random()
        if choice < 0.15:
            return self._pick(NAMES)
        if choice < 0.6:
            words = [self._pick(DETERMINERS), self._pick(ADJECTIVES), self._pick(NOUNS)]
        elif choice < 0.85:
            words = [self._pick(DETERMINERS), self._pick(NOUNS)]
        else:
            words = [self._pick(DETERMINERS), self._pick(NOUNS), "of", "the", self._pick(NOUNS)]
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)

    def _clause(self) -> str:
        template = int(self._rng.integers(6))
        subject = self._noun_phrase()
        if template == 0:
            return f"{subject} {self._pick(TRANSITIVE_VERBS)} {self._noun_phrase()}"
        if template == 1:
            return f"{subject} {self._pick(INTRANSITIVE_VERBS)} {self._pick(ADVERBS)}"
        if template == 2:
            return f"{subject} {self._pick(INTRANSITIVE_VERBS)} {self._pick(PREPOSITIONS)} {self._noun_phrase()}"
        if template == 3:
            return (f"{subject} {self._pick(TRANSITIVE_VERBS)} {self._noun_phrase()} "
                    f"{self._pick(PREPOSITIONS)} {self._noun_phrase()}")
        if template == 4:
            return f"{self._pick(TIME_PHRASES)} {subject} {self._pick(INTRANSITIVE_VERBS)} {self._pick(ADVERBS)}"
        return f"{self._pick(NAMES)} {self._pick(SPEECH_VERBS)} that {subject} {self._pick(TRANSITIVE_VERBS)} {self._noun_phrase()}"

    def sentence(self, n_words: int) -> str:
        """A sentence of about ``n_words`` words (never fewer than one clause).

        Clauses (3-14 words) are appended while the sentence is shorter than
        ``n_words``; a clause that would overshoot by more than :data:`SLACK`
        words is redrawn (up to :data:`REDRAWS` times), so short targets give
        short sentences.
        """
        words = self._fitting_clause(n_words)
        while len(words) < n_words:
            words += [self._pick(CONJUNCTIONS)] + self._fitting_clause(n_words - len(words) - 1)
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."

    def _fitting_clause(self, room: int) -> list[str]:
        clause = self._clause().split()
        for _ in range(REDRAWS):
            if len(clause) <= room + SLACK:
                break
            clause = self._clause().split()
        return clause


def transcript(text: str) -> str:
    """LibriSpeech-style transcript: upper case words, apostrophes kept, other punctuation dropped."""
    return " ".join(re.sub(r"[^A-Za-z' ]+", " ", text).upper().split())
