"""Sentence generator for the demo model: a voice-assistant domain.

Sentences are drawn from a small probabilistic grammar (commands for lights,
media, timers, alarms, reminders, weather, calls, messages, navigation,
shopping lists, arithmetic and short dictation), with numbers, times and dates
spelled out as words. Everything is lower case letters, spaces and
apostrophes, so it maps 1:1 onto the demo model's character table.

Reproducible: ``generate(n, seed)`` returns the same list for the same seed.
"""

from __future__ import annotations

import random
from typing import Callable

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
         "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
            "seventeenth", "eighteenth", "nineteenth", "twentieth", "twenty first",
            "twenty second", "twenty third", "twenty fourth", "twenty fifth", "twenty sixth",
            "twenty seventh", "twenty eighth", "twenty ninth", "thirtieth", "thirty first"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "garage", "office", "hallway",
         "dining room", "basement", "garden", "porch", "nursery", "attic", "patio"]
DEVICES = ["lights", "lamp", "fan", "heater", "air conditioner", "television", "radio",
           "speaker", "coffee machine", "dishwasher", "washing machine", "oven", "kettle",
           "blinds", "curtains", "door lock", "camera", "printer", "computer", "sprinkler"]
COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "warm white",
          "cool white", "gold", "violet", "teal"]
CITIES = ["paris", "london", "berlin", "tokyo", "madrid", "rome", "boston", "chicago",
          "seattle", "denver", "dallas", "miami", "toronto", "sydney", "dublin", "vienna",
          "oslo", "prague", "lisbon", "austin", "portland", "atlanta", "houston", "phoenix"]
PEOPLE = ["mom", "dad", "grandma", "grandpa", "john", "mary", "peter", "susan", "david",
          "emma", "olivia", "james", "sophia", "lucas", "anna", "robert", "linda", "michael",
          "sarah", "daniel", "laura", "kevin", "julia", "thomas", "the doctor", "my boss",
          "my sister", "my brother", "the office", "the school"]
GENRES = ["jazz", "rock", "classical music", "pop music", "the news", "country music",
          "hip hop", "blues", "relaxing music", "a podcast", "an audiobook", "folk music",
          "some piano music", "the radio", "workout music", "rain sounds"]
GROCERIES = ["milk", "eggs", "bread", "butter", "cheese", "apples", "bananas", "coffee", "tea",
             "rice", "pasta", "tomatoes", "potatoes", "onions", "carrots", "chicken", "fish",
             "yogurt", "orange juice", "cereal", "sugar", "flour", "salt", "olive oil",
             "batteries", "soap", "toothpaste", "paper towels", "dog food", "cat food"]
TASKS = ["call the dentist", "water the plants", "take out the trash", "pay the rent",
         "pick up the kids", "feed the cat", "walk the dog", "buy a birthday card",
         "book the flight", "send the report", "check the mail", "charge my phone",
         "clean the kitchen", "go to the gym", "take my medicine", "return the library books",
         "renew my passport", "finish the homework", "bake a cake", "wash the car",
         "fix the bike", "order new shoes", "cancel the meeting", "visit grandma"]
PLACES = ["the airport", "the train station", "the nearest gas station", "the hospital",
          "the supermarket", "the city center", "the museum", "the beach", "the park",
          "the nearest pharmacy", "the post office", "the stadium", "the library",
          "a coffee shop", "a pizza place", "the hotel", "the bank", "work", "home", "school"]
EVENTS = ["meeting", "dentist appointment", "lunch", "dinner", "team call", "doctor visit",
          "yoga class", "football practice", "piano lesson", "interview", "party", "flight"]
DICTATION = [
    "i will be there in ten minutes", "running a little late", "see you tonight",
    "thanks for your help", "can we meet tomorrow morning", "the meeting is canceled",
    "please call me back", "i am on my way", "happy birthday", "dinner is ready",
    "don't forget the keys", "let's talk later", "i can't make it today", "good morning",
    "i love you", "the package has arrived", "where are you", "it's raining here",
    "let me know when you're home", "we need more coffee", "the car is in the garage",
    "i left my wallet at home", "the kids are asleep", "call me when you land",
]


def number_words(n: int) -> str:
    """Spell out 0 <= n < 10000 in words ("four hundred twenty")."""
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    thousands, rest = divmod(n, 1000)
    return number_words(thousands) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


class Grammar:
    """Random sentence generator over the voice-assistant domain."""

    def __init__(self, rng: random.Random):
        self.r = rng
        self.templates: list[tuple[float, Callable[[], str]]] = [
            (3, self.lights), (2, self.device), (2, self.media), (3, self.timer),
            (2, self.alarm), (3, self.reminder), (2, self.weather), (2, self.call),
            (2, self.message), (2, self.navigate), (2, self.shopping), (1, self.math),
            (2, self.calendar), (1, self.question), (1, self.thermostat),
        ]
        self.weights = [w for w, _ in self.templates]

    def pick(self, items):
        return self.r.choice(items)

    def maybe(self, text: str, p: float = 0.5) -> str:
        return text if self.r.random() < p else ""

    def polite(self) -> str:
        return self.pick(["", "", "", "please ", "could you ", "can you ", "hey computer ",
                          "okay computer ", "i want you to ", "would you "])

    def small_number(self) -> str:
        return number_words(self.r.randint(1, 99))

    def time(self) -> str:
        hour = self.r.randint(1, 12)
        minute = self.pick([0, 0, 15, 30, 45, self.r.randint(1, 59)])
        if minute == 0:
            spoken = number_words(hour) + self.pick([" o'clock", "", ""])
        elif minute < 10:
            spoken = number_words(hour) + " oh " + number_words(minute)
        else:
            spoken = number_words(hour) + " " + number_words(minute)
        return spoken + self.pick(["", " am", " pm", " in the morning", " in the evening",
                                   " at night", " in the afternoon"])

    def date(self) -> str:
        return self.pick([
            lambda: self.pick(["today", "tomorrow", "tonight", "this weekend", "next week"]),
            lambda: self.pick(["on ", "next ", "this "]) + self.pick(WEEKDAYS),
            lambda: "on " + self.pick(MONTHS) + " " + self.pick(ORDINALS),
            lambda: "on the " + self.pick(ORDINALS) + " of " + self.pick(MONTHS),
        ])()

    def duration(self) -> str:
        n = self.r.randint(1, 90)
        unit = self.pick(["minute", "minute", "second", "hour"])
        return ("one " + unit if n == 1 else number_words(n) + " " + unit + "s") + \
            self.maybe(" and thirty seconds", 0.1)

    def lights(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}turn {self.pick(['on', 'off'])} the {self.pick(ROOMS)} lights",
            lambda: f"{self.polite()}dim the lights in the {self.pick(ROOMS)} to "
                    f"{number_words(self.r.randint(1, 10) * 10)} percent",
            lambda: f"{self.polite()}set the {self.pick(ROOMS)} lights to {self.pick(COLORS)}",
            lambda: f"switch {self.pick(['on', 'off'])} all the lights"
                    f"{self.maybe(' ' + self.date())}",
            lambda: f"make the {self.pick(ROOMS)} {self.pick(['brighter', 'darker'])}",
        ])()

    def device(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}turn {self.pick(['on', 'off'])} the {self.pick(DEVICES)}"
                    f"{self.maybe(' in the ' + self.pick(ROOMS))}",
            lambda: f"is the {self.pick(DEVICES)} in the {self.pick(ROOMS)} still on",
            lambda: f"start the {self.pick(DEVICES)} at {self.time()}",
            lambda: f"{self.pick(['open', 'close'])} the {self.pick(['blinds', 'curtains', 'garage door', 'front door', 'windows'])}"
                    f"{self.maybe(' in the ' + self.pick(ROOMS))}",
            lambda: f"lock the {self.pick(['front door', 'back door', 'garage', 'door lock'])}",
        ])()

    def media(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}play {self.pick(GENRES)}"
                    f"{self.maybe(' in the ' + self.pick(ROOMS))}",
            lambda: f"{self.pick(['pause', 'stop', 'resume'])} the music",
            lambda: f"skip this song",
            lambda: f"turn the volume {self.pick(['up', 'down'])}"
                    f"{self.maybe(' to ' + self.small_number())}",
            lambda: f"set the volume to {number_words(self.r.randint(0, 10))}",
            lambda: f"play the next {self.pick(['song', 'episode', 'chapter'])}",
            lambda: f"what song is this",
        ])()

    def timer(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}set a timer for {self.duration()}",
            lambda: f"{self.polite()}start a {self.duration().replace('s ', ' ').rstrip('s')} timer",
            lambda: f"how much time is left on the {self.pick(['timer', 'pasta timer', 'oven timer'])}",
            lambda: f"cancel the {self.pick(['timer', 'alarm', 'second timer', 'last timer'])}",
            lambda: f"add {self.duration()} to the timer",
        ])()

    def alarm(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}wake me up at {self.time()}{self.maybe(' ' + self.date())}",
            lambda: f"{self.polite()}set an alarm for {self.time()}{self.maybe(' ' + self.date())}",
            lambda: f"snooze the alarm for {self.duration()}",
            lambda: f"turn off my {self.pick(WEEKDAYS)} alarm",
            lambda: f"what alarms do i have {self.date()}",
        ])()

    def reminder(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}remind me to {self.pick(TASKS)}"
                    f"{self.maybe(' at ' + self.time())}{self.maybe(' ' + self.date())}",
            lambda: f"remind me {self.date()} to {self.pick(TASKS)}",
            lambda: f"remind me in {self.duration()} to {self.pick(TASKS)}",
            lambda: f"don't let me forget to {self.pick(TASKS)}",
        ])()

    def weather(self) -> str:
        return self.pick([
            lambda: f"what is the weather{self.maybe(' in ' + self.pick(CITIES))}"
                    f"{self.maybe(' ' + self.date())}",
            lambda: f"will it {self.pick(['rain', 'snow', 'be windy', 'be sunny', 'be cold'])}"
                    f" in {self.pick(CITIES)} {self.date()}",
            lambda: f"how {self.pick(['hot', 'cold', 'warm'])} is it in {self.pick(CITIES)}",
            lambda: f"do i need an umbrella {self.date()}",
            lambda: f"what is the temperature {self.pick(['outside', 'in ' + self.pick(CITIES)])}",
        ])()

    def call(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}call {self.pick(PEOPLE)}{self.maybe(' on speaker', 0.2)}",
            lambda: f"dial {' '.join(self.pick(ONES) for _ in range(self.r.randint(3, 7)))}",
            lambda: f"video call {self.pick(PEOPLE)}",
            lambda: f"call {self.pick(PEOPLE)} back {self.maybe('at ' + self.time())}".strip(),
        ])()

    def message(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}send a message to {self.pick(PEOPLE)} saying {self.pick(DICTATION)}",
            lambda: f"text {self.pick(PEOPLE)} {self.pick(DICTATION)}",
            lambda: f"read my {self.pick(['messages', 'new messages', 'last message', 'email'])}",
            lambda: f"reply {self.pick(DICTATION)}",
            lambda: f"email {self.pick(PEOPLE)} that {self.pick(DICTATION)}",
        ])()

    def navigate(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}navigate to {self.pick(PLACES)}",
            lambda: f"how long does it take to get to {self.pick(PLACES)}",
            lambda: f"how far is {self.pick(PLACES)}{self.maybe(' from ' + self.pick(PLACES))}",
            lambda: f"find {self.pick(PLACES)} near me",
            lambda: f"is there traffic on the way to {self.pick(PLACES)}",
            lambda: f"take me {self.pick(['home', 'to work', 'to ' + self.pick(CITIES)])}",
        ])()

    def shopping(self) -> str:
        items = self.r.sample(GROCERIES, self.r.randint(1, 3))
        listed = items[0] if len(items) == 1 else ", ".join(items[:-1]).replace(",", "") + " and " + items[-1]
        return self.pick([
            lambda: f"{self.polite()}add {listed} to my shopping list",
            lambda: f"remove {self.pick(GROCERIES)} from the shopping list",
            lambda: f"do we need {self.pick(GROCERIES)}",
            lambda: f"order {self.small_number()} {self.pick(['bottles', 'boxes', 'packs', 'bags'])}"
                    f" of {self.pick(GROCERIES)}",
            lambda: f"what is on my shopping list",
        ])()

    def math(self) -> str:
        a, b = self.r.randint(1, 999), self.r.randint(1, 99)
        op = self.pick(["plus", "minus", "times", "divided by"])
        return self.pick([
            lambda: f"what is {number_words(a)} {op} {number_words(b)}",
            lambda: f"convert {number_words(b)} {self.pick(['miles', 'pounds', 'degrees', 'inches', 'cups'])}"
                    f" to {self.pick(['kilometers', 'kilograms', 'celsius', 'centimeters', 'liters'])}",
            lambda: f"how many {self.pick(['days', 'weeks', 'hours'])} until {self.pick(MONTHS)}",
        ])()

    def calendar(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}schedule a {self.pick(EVENTS)} {self.date()} at {self.time()}",
            lambda: f"what is on my calendar {self.date()}",
            lambda: f"move my {self.pick(EVENTS)} to {self.time()}",
            lambda: f"when is my next {self.pick(EVENTS)}",
            lambda: f"cancel my {self.pick(EVENTS)} {self.date()}",
        ])()

    def question(self) -> str:
        return self.pick([
            lambda: "what time is it",
            lambda: f"what day is it {self.pick(['today', 'tomorrow'])}",
            lambda: f"what is the date {self.date()}",
            lambda: f"when does the sun {self.pick(['rise', 'set'])} {self.date()}",
            lambda: f"what time is it in {self.pick(CITIES)}",
        ])()

    def thermostat(self) -> str:
        return self.pick([
            lambda: f"{self.polite()}set the temperature to {number_words(self.r.randint(55, 85))} degrees",
            lambda: f"make it {self.pick(['warmer', 'cooler'])} in the {self.pick(ROOMS)}",
            lambda: f"turn the heat {self.pick(['up', 'down'])} by {number_words(self.r.randint(1, 5))} degrees",
            lambda: f"what is the temperature in the {self.pick(ROOMS)}",
        ])()

    def sentence(self) -> str:
        make = self.r.choices([t for _, t in self.templates], weights=self.weights)[0]
        return " ".join(make().split())


def generate(n: int, seed: int) -> list[str]:
    """``n`` sentences (duplicates possible) from the grammar, reproducible from ``seed``."""
    grammar = Grammar(random.Random(seed))
    return [grammar.sentence() for _ in range(n)]


def vocabulary(sentences: list[str]) -> list[str]:
    """Sorted set of words used in ``sentences``."""
    return sorted({w for s in sentences for w in s.split()})


if __name__ == "__main__":  # pragma: no cover - manual inspection
    sample = generate(20000, 0)
    print(len(set(sample)), "distinct of", len(sample), "; vocabulary", len(vocabulary(sample)))
    for s in sample[:15]:
        print(s)
