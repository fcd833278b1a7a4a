"""The built-in task suite: eleven procedurally generated families, the project's default data.

SPECS lists their TaskSpecs and MIXTURES the "builtin" and "builtin-choice" mixtures; the
registry (tasks/registry.py) is built from them, and importing this module registers nothing.

No files and no network: every example is generated from a seed, in a small regular language
(about 600 distinct words with the numbers: twenty names, a dozen places and objects, colours,
days), so a tiny Transformer trained from scratch on two CPU cores can learn the tasks in
minutes. Each family
copies the FORMAT and VERBALISER of a real benchmark of the paper, so the same training and
evaluation code serves the real datasets later.

    family               mirrors            candidates (index = label)         metrics
    synth/sentiment      SST-2              negative / positive                acc
    synth/acceptability  CoLA               no / yes  (~30% unacceptable)      mcc
    synth/paraphrase     MRPC, QQP          no / yes                           f1, acc
    synth/entailment     MNLI               True / Neither / False             acc
    synth/rte            RTE, QNLI          yes / no  (0 = entailment)         acc
    synth/similarity     STS-B              "0" ... "5" (value = float score)  pearson, spearman
    synth/race           RACE, ARC, OBQA    "A. option" ... "D. option"        acc
    synth/continuation   HellaSwag, PIQA    bare continuations (4, or 2)       acc
    synth/boolq          BoolQ              no / yes                           acc
    synth/preference     HH-RLHF            chosen vs rejected answer          acc
    synth/instruct       Alpaca             one exact answer (SFT, --generate)  -

Difficulty is graded inside each family, so that a small model trained by the quick start lands
between chance and 100%: part of the items has a surface cue a model picks up first (two thirds of
the reviews are settled by one keyword, most often a common one, "good", "bad"; half of the claims
in entailment, rte and boolq are worded in a way that hints at the label, as annotators' wording
does in MNLI: negated claims are mostly false, "someone" claims mostly true, comparisons mostly
open; 40% of the paraphrase negatives differ in polarity, "did not"; a fifth of the unacceptable
sentences has a verb form no acceptable one uses, "sleeped"), the others need composition (negation
and double negation, "but"/"although" clauses where the main clause decides, subject-verb agreement
across an intervening phrase, counting, comparing two people, tracking who holds what and who is
where through a story, the order of steps in a routine). A fraction NOISE (6%) of each family's
items is genuinely ambiguous and its gold label is drawn at random: a neutral or two-sided review,
a borderline sentence, "some apples" against "three apples", a hypothesis or question the passage
does not settle, an annotator-style jitter on the similarity score, a filler step as plausible as
the next one, two equally good answers. Each generator says which. So no readout can reach 100%,
and chance is the floor.

Sizes: train 2000, validation 200, test 300 per family (`n` overrides). The generator of each
(family, split) is seeded with crc32(f"{seed}/{family}/{split}"), so lists are identical across
runs and platforms. Splits are disjoint by construction: a generated item is kept only if the
crc32 of its split key falls in the split's share of buckets (validation 15%, test 15%, train
70%); the key is the passage or premise for the race, boolq, entailment and rte families (so
held-out passages are never seen in training, as in the real datasets) and the whole user
message for the others. No validation or test user message can therefore equal a training one,
whatever the seed or `n` of either side, and generating a split never needs another split.

    python -m tasks.suite      # prints, per family, sizes, label spread, prompt length and timing
"""
from __future__ import annotations

import random
import zlib

from .types import (SYSTEM_PROMPTS, ChoiceExample, InstructionExample, PreferenceExample, TaskError,
                    TaskSpec, lettered, prompt)

SIZES = {"train": 2000, "validation": 200, "test": 300}
NOISE = 0.06  # share of deliberately ambiguous items (gold drawn at random) in every family


def split_of(text: str) -> str:
    """The split a text (user message or passage) belongs to: a fixed partition of all texts."""
    bucket = zlib.crc32(text.encode("utf-8")) % 20
    return "validation" if bucket < 3 else "test" if bucket < 6 else "train"


# ----------------------------------------------------------------------------------------------
# Lexicon shared by the families

NAMES = ("Anna Ben Cara Dan Eva Finn Gina Hugo Ida Jack Kate Leo Mia Nick Olga Paul Rosa Sam "
         "Tina Will").split()  # even index: "she", odd index: "he"
PLACES = "park market library kitchen garden station school beach shop farm museum bakery".split()
PLURAL = {"apple": "apples", "book": "books", "ball": "balls", "cup": "cups", "key": "keys",
          "hat": "hats", "box": "boxes", "pen": "pens", "coin": "coins", "kite": "kites",
          "egg": "eggs", "card": "cards", "shell": "shells", "plate": "plates"}
OBJECTS = list(PLURAL)
CREATURES = {"dog": "dogs", "cat": "cats", "bird": "birds", "girl": "girls", "boy": "boys",
             "farmer": "farmers", "teacher": "teachers", "child": "children"}
ANIMALS = ("dog", "cat", "bird", "horse", "fox", "duck")
COLOURS = ("red", "blue", "green", "yellow", "black", "white")
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
           "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pron(name: str) -> str:
    return "she" if NAMES.index(name) % 2 == 0 else "he"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _count(n: int, noun: str) -> str:
    """'one apple', 'three apples'."""
    return f"{NUMBERS[n]} {noun if n == 1 else PLURAL[noun]}"


def _other(rng, options, *exclude):
    return rng.choice([o for o in options if o not in exclude])


def _choice(task, system_kind, fields, candidates, label, keep=None, choices=None, value=None):
    """A ChoiceExample, or None when `keep` (the split's test) rejects its user message."""
    messages = prompt(system_kind, fields, choices)
    if keep is not None and not keep(messages[-1]["content"]):
        return None
    return ChoiceExample(task, messages, list(candidates), label, value)


def _chat(user: str) -> list:
    return [{"role": "system", "content": SYSTEM_PROMPTS["chat"]},
            {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------
# 1. Sentiment (SST-2)

TOPICS = "film movie show story meal book song game hotel play concert cafe".split()
ASPECTS = "acting music ending food service plot start cast sound room".split()
GOOD = "good great lovely fun charming clever warm funny fresh moving wonderful brilliant".split()
BAD = "bad dull boring awful weak silly slow messy cold flat poor terrible".split()
PLAIN = "long short loud quiet new old simple strange".split()
LIKE, DISLIKE = ("loved", "liked", "enjoyed"), ("hated", "disliked")
INTENSIFIERS = ("", "", "", "very ", "really ", "so ", "truly ")
SENTIMENT_FORMS = (  # (weight, template): Y = words of the label's polarity, N = the opposite one
    (16, "The {t} was {Y}."),  # a keyword decides (two thirds of the items)
    (8, "{name} {VY} the {t}."),
    (2, "The {t} was not {N}."),  # negation flips
    (1, "The {t} was never {N}."),
    (1, "It is not true that the {t} was {N}."),
    (1, "It is not true that the {t} was not {Y}."),  # double negation
    (2, "The {a} was {N}, but the {t} was {Y}."),  # the clause after "but" decides
    (1, "Although the {a} was {N}, the {t} was {Y}."),  # the main clause decides, first or last
    (1, "The {t} was {Y}, although the {a} was {N}."),
    (1, "The {a} was not {Y}, but the {t} was not {N}."),
    (1, "{name} {VN} the {a}, but {pron} {VY} the {t}."),
)
ZIPF = [1 / rank ** 2 for rank in range(1, len(GOOD) + 1)]
SETTINGS = ("On {day}, {name} and {other} went to the {place}.",
            "{name} told {other} about the {t}.", "{other} asked {name} about the {t}.", "", "", "")


def _make_sentiment(rng, keep):
    """Label first, then a sentence of that polarity. Noise: a review with no verdict on the whole
    (a plain adjective, or two aspects pulling both ways without a contrast word)."""
    y = rng.randrange(2)
    t, (a, a2), (name, other) = rng.choice(TOPICS), rng.sample(ASPECTS, 2), rng.sample(NAMES, 2)

    def adj(pol):  # the first words of each list are the most frequent ones (1/rank²)
        return rng.choice(INTENSIFIERS) + rng.choices(GOOD if pol else BAD, ZIPF)[0]

    if rng.random() < NOISE:
        s = rng.choice((f"The {t} was {rng.choice(PLAIN)}.",
                        f"The {a} was {adj(1)} and the {a2} was {adj(0)}."))
    else:
        form = rng.choices([f for _, f in SENTIMENT_FORMS], [w for w, _ in SENTIMENT_FORMS])[0]
        like, dislike = rng.choice(LIKE), rng.choice(DISLIKE)
        s = form.format(t=t, a=a, name=name, pron=_pron(name), Y=adj(y), N=adj(1 - y),
                        VY=like if y else dislike, VN=dislike if y else like)
    setting = rng.choice(SETTINGS).format(day=rng.choice(DAYS), name=name, other=other,
                                          place=rng.choice(PLACES), t=t)
    return _choice("synth/sentiment", "sentiment", [("Sentence", f"{setting} {_cap(s)}".strip())],
                   ["negative", "positive"], y, keep)


# ----------------------------------------------------------------------------------------------
# 2. Acceptability (CoLA)

TRANSITIVE = (("chases", "chase", "chased"), ("sees", "see", "saw"), ("likes", "like", "liked"),
              ("finds", "find", "found"), ("carries", "carry", "carried"),
              ("watches", "watch", "watched"), ("holds", "hold", "held"))
INTRANSITIVE = (("sleeps", "sleep", "slept"), ("runs", "run", "ran"), ("sings", "sing", "sang"),
                ("waits", "wait", "waited"), ("plays", "play", "played"))
BAD_FORMS = {  # base -> forms no acceptable sentence uses: an over-regular past, a bare -ing
    "chase": ("chasing",), "see": ("seed", "seeing"), "like": ("liking",),
    "find": ("finded", "finding"), "carry": ("carrying",), "watch": ("watching",),
    "hold": ("holded", "holding"), "sleep": ("sleeped", "sleeping"), "run": ("runned", "running"),
    "sing": ("singed", "singing"), "wait": ("waiting",), "play": ("playing",)}
SIZE_WORDS = ("big", "small", "tired", "happy", "young")
SINGULAR_DETS, PLURAL_DETS = ("the", "a", "this", "my"), ("the", "some", "these", "my", "two")


def _noun_phrase(rng, nouns, plural, adjectives):
    noun = rng.choice(list(nouns))
    words = [nouns[noun] if plural else noun]
    if rng.random() < 0.4:
        words.insert(0, rng.choice(adjectives))
    det = rng.choice(PLURAL_DETS if plural else SINGULAR_DETS)
    if det == "a":
        det = _a(words[0]).split()[0]
    return [det] + words


def _make_acceptability(rng, keep):
    """A small clause grammar (det, adjective, noun, verb, object, adjunct) with attractor phrases
    ("the dog near the cats chases"), coordinated subjects and relative clauses. ~30% broken by one
    error: agreement, swapped neighbours, missing verb, a wrong verb form ("the dog sleeped", "the
    dog running"), doubled or mismatched determiner, adjective after its noun. Noise: a transitive
    verb left without its object (borderline)."""
    plural = first_plural = rng.random() < 0.5
    subj = _noun_phrase(rng, CREATURES, plural, SIZE_WORDS)
    noun_i = len(subj) - 1
    shape = rng.random()
    if shape < 0.2:  # attractor of the other number between subject and verb
        subj += ["near"] + _noun_phrase(rng, CREATURES, not plural, SIZE_WORDS)
    elif shape < 0.3:  # coordination: the subject becomes plural
        subj += ["and"] + _noun_phrase(rng, CREATURES, rng.random() < 0.5, SIZE_WORDS)
        plural = True
    elif shape < 0.4:  # object relative clause with its own verb
        inner = rng.random() < 0.5
        subj += ["that"] + _noun_phrase(rng, CREATURES, inner, SIZE_WORDS)
        subj.append(rng.choice(TRANSITIVE)[1 if inner else 0])
    kind = rng.random()
    transitive = kind < NOISE or rng.random() < 0.65
    forms = rng.choice(TRANSITIVE if transitive else INTRANSITIVE)
    past = rng.random() < 0.2
    obj = _noun_phrase(rng, PLURAL, rng.random() < 0.4, COLOURS) if transitive else []
    tail = rng.choice(([], ["in", "the", rng.choice(PLACES)], ["on", rng.choice(DAYS)], ["today"]))
    vi = len(subj)
    words = subj + [forms[2] if past else forms[1] if plural else forms[0]] + obj + tail
    y = 1
    if kind < NOISE:
        words, y = subj + [words[vi]] + tail, rng.randrange(2)
    elif kind < NOISE + 0.3:
        y = 0
        error = rng.choice(("agreement", "agreement", "swap", "no_verb", "bad_form", "bad_form",
                            "bad_form", "double_det", "double_det", "det_number", "det_number",
                            "adj_after", "adj_after"))
        if error == "bad_form":
            words[vi] = rng.choice(BAD_FORMS[forms[1]])
        elif error == "agreement" and not past:
            words[vi] = forms[0] if plural else forms[1]
        elif error in ("agreement", "swap"):
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif error == "no_verb":
            del words[vi]
        elif error == "double_det":
            words.insert(0, words[0])
        elif error == "det_number":
            words[0] = rng.choice(("a", "this") if first_plural else ("these", "two", "many"))
        else:
            words.insert(noun_i + 1, rng.choice(SIZE_WORDS))
    sentence = _cap(" ".join(words)) + "."
    return _choice("synth/acceptability", "acceptability", [("Sentence", sentence)],
                   ["no", "yes"], y, keep)


# ----------------------------------------------------------------------------------------------
# 3 and 6. Events, rendered in several surface forms (paraphrase, similarity)

# Each verb is a set of synonyms, each synonym (past, participle, base).
THING_VERBS = (
    (("bought", "bought", "buy"), ("purchased", "purchased", "purchase")),
    (("found", "found", "find"), ("discovered", "discovered", "discover")),
    (("took", "taken", "take"), ("grabbed", "grabbed", "grab")),
    (("cleaned", "cleaned", "clean"), ("washed", "washed", "wash")),
    (("broke", "broken", "break"), ("smashed", "smashed", "smash")),
    (("lost", "lost", "lose"), ("misplaced", "misplaced", "misplace")),
    (("made", "made", "make"), ("built", "built", "build")),
    (("sold", "sold", "sell"),),
)
PERSON_VERBS = (
    (("helped", "helped", "help"), ("assisted", "assisted", "assist")),
    (("called", "called", "call"), ("phoned", "phoned", "phone")),
    (("thanked", "thanked", "thank"),),
    (("visited", "visited", "visit"),),
)


def _event(rng, kind=None):
    kind = kind or rng.choice(("thing", "thing", "person", "meet"))
    agent, patient = rng.sample(NAMES, 2)
    return {"kind": kind, "agent": agent, "patient": patient, "place": rng.choice(PLACES),
            "verb": rng.randrange(len(_verbs({"kind": kind}))),
            "n": rng.randint(1, 9), "colour": rng.choice(COLOURS), "obj": rng.choice(OBJECTS),
            "neg": rng.random() < 0.1}


def _verbs(e):
    return PERSON_VERBS if e["kind"] == "person" else THING_VERBS


def _render(rng, e) -> str:
    """A surface form: synonym, active or passive, number as word or digit, place first or last."""
    agent, patient, neg = e["agent"], e["patient"], e["neg"]
    if e["kind"] == "meet":  # symmetric: "A met B" = "B met A" = "A and B met"
        a, b = rng.sample((agent, patient), 2)
        core = rng.choice((f"{a} {'did not meet' if neg else 'met'} {b}",
                           f"{a} and {b} {'did not meet' if neg else 'met'}"))
    else:
        past, part, base = rng.choice(_verbs(e)[e["verb"]])
        if e["kind"] == "person":
            obj, many = patient, False
        else:
            num = "some" if e["n"] is None else rng.choice((NUMBERS[e["n"]], str(e["n"])))
            noun = e["obj"] if e["n"] == 1 else PLURAL[e["obj"]]
            obj, many = f"{num} {e['colour']} {noun}", e["n"] != 1
        if rng.random() < 0.4:
            be = ("were" if many else "was") + (" not" if neg else "")
            core = f"{obj} {be} {part} by {agent}"
        else:
            core = f"{agent} did not {base} {obj}" if neg else f"{agent} {past} {obj}"
    if rng.random() < 0.35:
        return f"At the {e['place']}, {core}."
    return _cap(f"{core} at the {e['place']}.")


def _change(rng, e, field):
    """A copy of event e with one field given another value ("swap" exchanges the two people)."""
    e = dict(e)
    if field == "swap":
        e["agent"], e["patient"] = e["patient"], e["agent"]
    elif field in ("agent", "patient"):
        e[field] = _other(rng, NAMES, e["agent"], e["patient"])
    elif field == "verb":
        e["verb"] = _other(rng, range(len(_verbs(e))), e["verb"])
    elif field == "neg":
        e["neg"] = not e["neg"]
    else:
        options = {"n": range(1, 10), "colour": COLOURS, "obj": OBJECTS, "place": PLACES}[field]
        e[field] = _other(rng, options, e[field])
    return e


CHANGEABLE = {"thing": ("agent", "verb", "n", "colour", "obj", "place", "neg"),
              "person": ("agent", "patient", "verb", "place", "neg", "swap", "swap"),
              "meet": ("agent", "patient", "place", "neg")}


NEG_SHARE = 0.4  # "no" pairs whose difference is the polarity ("did not", "was not")


def _make_paraphrase(rng, keep):
    """Yes: the same event in two surface forms (synonyms, active/passive, reordering, "met" is
    symmetric). No: the polarity changed (NEG_SHARE of them), or one argument, number, colour,
    place, verb or the polarity changed, or the two people swapped. Noise: "some apples" against
    a definite number."""
    e, y = _event(rng), rng.randrange(2)
    if rng.random() < NOISE:
        e = _event(rng, "thing")
        e2, y = dict(e, n=None), rng.randrange(2)
    else:
        field = "neg" if rng.random() < NEG_SHARE else rng.choice(CHANGEABLE[e["kind"]])
        e2 = e if y else _change(rng, e, field)
    a = _render(rng, e)
    b = _render(rng, e2)
    for _ in range(10):  # a paraphrase pair is never the same string twice
        if a != b:
            break
        b = _render(rng, e2)
    return _choice("synth/paraphrase", "paraphrase", [("Sentence 1", a), ("Sentence 2", b)],
                   ["no", "yes"], y, keep)


SIMILARITY_FIELDS = ("agent", "verb", "n", "obj", "place")


def _make_similarity(rng, keep):
    """Score = how many of five event fields the two sentences share (synonyms and passives keep a
    field), plus a small jitter N(0, 0.2); noise: the score moved by 0.6-1.2 as if one annotator
    disagreed. Each field is shared with one random probability per pair, so the six labels are
    equally likely."""
    e = _event(rng, "thing")
    e["neg"] = False
    share = rng.random()
    e2 = e
    for f in SIMILARITY_FIELDS:
        if rng.random() > share:
            e2 = _change(rng, e2, f)
    value = sum(e[f] == e2[f] for f in SIMILARITY_FIELDS) + rng.gauss(0.0, 0.2)
    if rng.random() < NOISE:
        value += rng.choice((-1, 1)) * rng.uniform(0.6, 1.2)
    value = round(min(5.0, max(0.0, value)), 2)
    return _choice("synth/similarity", "similarity",
                   [("Sentence 1", _render(rng, e)), ("Sentence 2", _render(rng, e2))],
                   [str(i) for i in range(6)], min(5, max(0, round(value))), keep, value=value)


# ----------------------------------------------------------------------------------------------
# 4, 5 and 9. A small world of facts, and claims checked against it (entailment, rte, boolq)

def _world(rng, n_people, n_facts):
    """Facts about a few people: how many of an object they have, where they are or are not."""
    w = {"people": rng.sample(NAMES, n_people), "objs": rng.sample(OBJECTS, 2),
         "places": rng.sample(PLACES, 3), "has": {}, "at": {}, "not_at": {}}
    facts = []
    while len(facts) < n_facts:
        p, r, pl = rng.choice(w["people"]), rng.random(), rng.choice(w["places"])
        if r < 0.5:
            o = rng.choice(w["objs"])
            if (p, o) not in w["has"]:
                w["has"][p, o] = n = rng.randint(1, 9)
                facts.append(f"{p} has {_count(n, o)}")
        elif r < 0.8:
            if p not in w["at"] and pl not in w["not_at"].get(p, ()):
                w["at"][p] = pl
                facts.append(f"{p} is at the {pl}")
        elif w["at"].get(p) != pl and pl not in w["not_at"].get(p, ()):
            w["not_at"].setdefault(p, set()).add(pl)
            facts.append(f"{p} is not at the {pl}")
    text = _cap(facts[0])
    for f in facts[1:]:
        text += (" and " if rng.random() < 0.25 else ". ") + f
    w["text"] = _cap(text) + "."
    return w


CLAIMS = ("has", "has", "more_than", "fewer_than", "some", "none", "someone_has", "more",
          "together", "at", "at", "not_at", "someone_at", "nobody_at")
CAN_BE = {  # claim kinds that can take each truth value (an open world never proves "nobody")
    True: [k for k in CLAIMS if k not in ("none", "nobody_at")],
    False: [k for k in CLAIMS if k not in ("some", "someone_has", "someone_at")],
    None: list(CLAIMS)}


def _claim(rng, w, kind):
    """A random claim (kind, person, other person, number, object, place), mostly about the
    world's own people, objects and places so that it is often settled by the facts."""
    def pick(own, pool):
        return rng.choice(own) if rng.random() < 0.85 else rng.choice(pool)
    p, q = pick(w["people"], NAMES), pick(w["people"], NAMES)
    o, pl = pick(w["objs"], OBJECTS), pick(w["places"], PLACES)
    if kind in ("more", "together"):  # compare people who hold the object, most of the time
        holders = [x for x in w["people"] if (x, o) in w["has"]]
        if len(holders) >= 2 and rng.random() < 0.7:
            p, q = rng.sample(holders, 2)
        elif p == q:
            q = _other(rng, w["people"] + [rng.choice(NAMES)], p)
    base = w["has"].get((p, o), rng.randint(1, 9))
    if kind == "together":
        base += w["has"].get((q, o), rng.randint(1, 9))
    n = min(20, max(2 if kind == "fewer_than" else 1, base + rng.choice((-2, -1, 0, 0, 0, 1, 2))))
    return kind, p, q, n, o, pl


def _truth(c, w):
    """True / False when the facts settle the claim, None when they do not (open world)."""
    kind, p, q, n, o, pl = c
    has, at, away = w["has"], w["at"], w["not_at"].get(p, ())
    k = has.get((p, o))
    if kind in ("has", "more_than", "fewer_than", "some", "none"):
        if k is None:
            return None
        return {"has": k == n, "more_than": k > n, "fewer_than": k < n, "some": True,
                "none": False}[kind]
    if kind == "someone_has":
        return True if any(obj == o for _, obj in has) else None
    if kind in ("more", "together"):
        k2 = has.get((q, o))
        if k is None or k2 is None:
            return None
        return k > k2 if kind == "more" else k + k2 == n
    if kind in ("at", "not_at"):
        there = at[p] == pl if p in at else (False if pl in away else None)
        return there if there is None or kind == "at" else not there
    if kind == "someone_at":
        return True if pl in at.values() else None
    return False if pl in at.values() else None  # nobody_at


def _phrase(c) -> str:
    kind, p, q, n, o, pl = c
    return {
        "has": f"{p} has {_count(n, o)}", "more_than": f"{p} has more than {_count(n, o)}",
        "fewer_than": f"{p} has fewer than {NUMBERS[n]} {PLURAL[o]}",
        "some": f"{p} has some {PLURAL[o]}", "none": f"{p} has no {PLURAL[o]}",
        "someone_has": f"someone has {PLURAL[o]}", "more": f"{p} has more {PLURAL[o]} than {q}",
        "together": f"{p} and {q} have {_count(n, o)} together",
        "at": f"{p} is at the {pl}", "not_at": f"{p} is not at the {pl}",
        "someone_at": f"someone is at the {pl}", "nobody_at": f"nobody is at the {pl}"}[kind]


def _say(c) -> str:
    return _cap(_phrase(c)) + "."


def _ask(c) -> str:
    kind, p, q, n, o, pl = c
    question = {
        "has": f"Does {p} have {_count(n, o)}?",
        "more_than": f"Does {p} have more than {_count(n, o)}?",
        "fewer_than": f"Does {p} have fewer than {NUMBERS[n]} {PLURAL[o]}?",
        "some": f"Does {p} have any {PLURAL[o]}?", "someone_has": f"Does anyone have {PLURAL[o]}?",
        "more": f"Does {p} have more {PLURAL[o]} than {q}?",
        "together": f"Do {p} and {q} have {_count(n, o)} together?",
        "at": f"Is {p} at the {pl}?", "someone_at": f"Is anyone at the {pl}?"}.get(kind)
    return question or f"Is it true that {_phrase(c)}?"


CUES = {True: ("some", "someone_has", "someone_at"), None: ("more", "together"),
        False: ("none", "nobody_at", "not_at")}
CUE_SHARE = 0.5  # claims whose wording alone hints at the label (MNLI's "annotation artifacts")


def _claim_with(rng, w, want):
    """A claim with truth value `want`: the kind first, then its arguments, retried; another kind
    if this world cannot give it. A share CUE_SHARE of the kinds comes from the label's cue kinds
    (negated claims are mostly false, "someone" claims mostly true, comparisons mostly open), as
    annotators' wording gives labels away in MNLI; the rest is uniform over the kinds that can
    take the value, so that easy kinds do not crowd out hard ones."""
    cue = rng.random() < CUE_SHARE
    for _ in range(200):
        kind = rng.choice(CUES[want] if cue else CAN_BE[want])
        cue = False
        for _ in range(20):
            c = _claim(rng, w, kind)
            if _truth(c, w) is want:
                return c
    raise RuntimeError("suite: no claim with the wanted truth value")  # not reached in practice


VAGUE = ("a few", "many", "lots of")


def _make_entailment(rng, keep):
    """Premise: 2-3 facts. Hypothesis: a claim the facts make true (restated, weakened, compared,
    summed), false (another number, place, negation) or leave open (someone or something not
    mentioned; "not at the park" says nothing of where). Noise: a vague amount ("many apples")."""
    w = _world(rng, rng.choice((2, 3)), rng.choice((2, 3)))
    if not keep(w["text"]):  # the premise decides the split: held-out premises are new
        return None
    if rng.random() < NOISE:
        p, o = rng.choice(w["people"]), rng.choice(w["objs"])
        h, label = f"{p} has {rng.choice(VAGUE)} {PLURAL[o]}.", rng.randrange(3)
    else:
        label = rng.randrange(3)
        h = _say(_claim_with(rng, w, (True, None, False)[label]))
    return _choice("synth/entailment", "nli3", [("Premise", w["text"]), ("Hypothesis", h)],
                   ["True", "Neither", "False"], label)


def _make_rte(rng, keep):
    """Two-way version of the entailment family on 3-4 facts: "no" merges contradiction and
    not-settled (half each). Noise: a vague amount, labelled at random."""
    w = _world(rng, 3, rng.choice((3, 4)))
    if not keep(w["text"]):
        return None
    if rng.random() < NOISE:
        p, o = rng.choice(w["people"]), rng.choice(w["objs"])
        h, label = f"{p} has {rng.choice(VAGUE)} {PLURAL[o]}.", rng.randrange(2)
    else:
        label = rng.randrange(2)
        h = _say(_claim_with(rng, w, True if label == 0 else rng.choice((False, None))))
    return _choice("synth/rte", "entailment", [("Premise", w["text"]), ("Hypothesis", h)],
                   ["yes", "no"], label)


BOOLQ_OPENINGS = ("On {day}, some friends spent the day in town.",
                  "It was a quiet {day} in the town.", "This is what happened on {day}.", "")


def _make_boolq(rng, keep):
    """Passage: an opening line and 4-5 facts. Question: a yes/no claim the facts settle, needing a
    lookup, a comparison, a sum, or reading a negation. Noise: a question the passage leaves open,
    answered at random."""
    w = _world(rng, 3, rng.choice((4, 5)))
    passage = (rng.choice(BOOLQ_OPENINGS).format(day=rng.choice(DAYS)) + " " + w["text"]).strip()
    if not keep(passage):
        return None
    want = None if rng.random() < NOISE else rng.choice((True, False))
    c = _claim_with(rng, w, want)
    label = rng.randrange(2) if want is None else int(want)
    return _choice("synth/boolq", "yes_no", [("Passage", passage), ("Question", _ask(c))],
                   ["no", "yes"], label)


# ----------------------------------------------------------------------------------------------
# 7. Reading comprehension (RACE, ARC, OpenBookQA)

ACQUIRE = (("bought", "buy"), ("found", "find"), ("picked up", "pick up"))


def _make_race(rng, keep):
    """A story about three people: they get objects, walk between places, give and lose things.
    Questions: who got X / what did P get (lookup), where is P at the end (tracking moves, some of
    them in pairs), how many X does P have at the end (counting through gifts and losses), where did
    P go after a place (order), who gave X to Q. Distractors come from the story. Noise: "who
    enjoyed the day most?", which the story does not say (gold drawn at random)."""
    people, places = rng.sample(NAMES, 3), rng.sample(PLACES, 4)
    loc = dict.fromkeys(people, places[0])
    path = {p: [places[0]] for p in people}
    inv = {p: {} for p in people}
    got, gave, got_n = {}, [], {}
    free = rng.sample(OBJECTS, 3)
    a, b, c = people
    story = [f"On {rng.choice(DAYS)}, {a}, {b} and {c} went to the {places[0]}."]
    for _ in range(rng.randint(6, 9)):
        holders = [(p, o) for p in people for o, k in inv[p].items() if k > 0]
        partners = [(p, o, q) for p, o in holders for q in people if q != p and loc[q] == loc[p]]
        r = rng.random()
        if free and (r < 0.35 or not holders):
            p, o, n, v = rng.choice(people), free.pop(), rng.randint(2, 6), rng.choice(ACQUIRE)
            inv[p][o], got[o], got_n[p, o] = n, (p, v), n
            story.append(f"{p} {v[0]} {_count(n, o)} at the {loc[p]}.")
        elif r < 0.8 and partners:
            p, o, q = rng.choice(partners)
            if r < 0.65:
                k = rng.randint(1, inv[p][o])
                gave.append((p, q, o))
                inv[q][o] = inv[q].get(o, 0) + k
                story.append(f"{p} gave {_count(k, o)} to {q}.")
            else:
                k = 1
                story.append(f"{p} lost one {o}.")
            inv[p][o] -= k
        else:
            movers = rng.sample(people, rng.choice((1, 1, 2)))
            dest = rng.choice([x for x in places if all(loc[m] != x for m in movers)])
            for m in movers:
                loc[m] = dest
                path[m].append(dest)
            walk = rng.choice(("walked", "went"))
            story.append(f"Then {' and '.join(movers)} {walk} to the {dest}.")
    passage = " ".join(story)
    if not keep(passage):
        return None
    outsider = _other(rng, NAMES, *people)
    spare = [PLURAL[x] for x in rng.sample(OBJECTS, 6)]  # objects the story may not mention

    def others(gold):
        return [x for x in people + [outsider] if x != gold]

    questions = {}  # question type -> [(question, gold, distractors)]

    def ask(kind, question, gold, wrong):
        questions.setdefault(kind, []).append((question, gold, wrong))

    for o, (p, v) in got.items():
        ask("who got", f"Who {v[0]} the {PLURAL[o]}?", p, others(p))
        if sum(who == p for who, _ in got.values()) == 1:
            ask("what got", f"What did {p} {v[1]}?", PLURAL[o], [PLURAL[x] for x in got] + spare)
    for p in people:
        ask("where end", f"Where is {p} at the end of the story?", f"the {loc[p]}",
            [f"the {x}" for x in places])
        for i, pl in enumerate(path[p][:-1]):
            if path[p].count(pl) == 1:
                ask("where after", f"Where did {p} go after the {pl}?", f"the {path[p][i + 1]}",
                    [f"the {x}" for x in places])
        for o, k in inv[p].items():
            near = (got_n.get((p, o), k + 3), k - 2, k - 1, k + 1, k + 2, k + 3)
            ask("how many", f"How many {PLURAL[o]} does {p} have at the end?", NUMBERS[k],
                [NUMBERS[x] for x in near if 0 <= x <= 12])
    for p, q, o in gave:
        if len({g for g, r, x in gave if r == q and x == o}) == 1:
            ask("who gave", f"Who gave {PLURAL[o]} to {q}?", p, others(p))
    if rng.random() < NOISE:
        gold = rng.choice(people)
        q, wrong = "Who enjoyed the day the most?", others(gold)
    else:  # a question type first, so that common types do not crowd out rare ones
        q, gold, wrong = rng.choice(questions[rng.choice(sorted(questions))])
    options = rng.sample([x for x in dict.fromkeys(wrong) if x != gold], 3)
    label = rng.randrange(4)
    options.insert(label, gold)
    return _choice("synth/race", "multiple_choice", [("Passage", passage), ("Question", q)],
                   lettered(options), label, choices=options)


# ----------------------------------------------------------------------------------------------
# 8. Continuation (HellaSwag: what happens next; PIQA: which solution reaches the goal)

SCRIPTS = (  # routines whose steps happen in this order
    ("boils some water", "puts a tea bag in a cup", "pours the hot water into the cup",
     "waits for the tea to cool", "drinks the tea"),
    ("digs a small hole", "drops a seed into the hole", "covers the seed with soil",
     "waters the soil", "watches the plant grow"),
    ("takes a sheet of paper", "writes a short letter", "folds the letter",
     "puts the letter in an envelope", "posts the letter"),
    ("mixes flour and water", "kneads the dough", "lets the dough rise",
     "bakes the dough in the oven", "cuts the warm bread"),
    ("puts the clothes in the machine", "adds some soap", "starts the machine",
     "hangs the wet clothes outside", "folds the dry clothes"),
    ("covers the floor with paper", "opens the can of paint", "dips the brush in the paint",
     "paints the wall", "cleans the brush"),
    ("changes into a swimsuit", "jumps into the pool", "swims to the far end",
     "climbs out of the pool", "dries off with a towel"),
    ("makes a shopping list", "walks to the shop", "puts food in a basket", "pays at the counter",
     "carries the bags home"),
    ("brushes the teeth", "puts on pyjamas", "gets into bed", "turns off the light",
     "falls asleep"),
    ("cracks two eggs into a bowl", "stirs in sugar and flour", "pours the mix into a tin",
     "bakes the cake", "puts candles on the cake"),
    ("finds the lead", "clips the lead to the dog", "walks the dog to the park",
     "throws a ball for the dog", "brings the dog home"),
    ("puts on a helmet", "gets on the bike", "rides to the station", "locks the bike to a post",
     "takes the train"),
)
FILLERS = ("looks out of the window", "hums a little song", "takes a short rest", "smiles")
TOOLS = {  # what each kind of tool is good for: goals need a property, tools have one
    "sharp": ("knife", "pair of scissors"), "holds water": ("bucket", "watering can"),
    "soaks": ("towel", "sponge"), "warm": ("blanket", "wool coat"),
    "hard": ("hammer", "heavy rock"), "tall": ("ladder", "step stool"),
    "cold": ("fridge", "bag of ice"), "light": ("lamp", "torch"),
}
GOALS = {
    "sharp": ("cut the rope", "cut the paper", "trim the string", "open the parcel"),
    "holds water": ("water the plants", "carry water to the horse", "fill the fish tank"),
    "soaks": ("dry the wet table", "wipe up the spilled milk", "clean the window"),
    "warm": ("stay warm in the snow", "keep the baby warm"),
    "hard": ("push a nail into the wall", "crack a nut"),
    "tall": ("reach the top shelf", "change the bulb in the ceiling"),
    "cold": ("keep the milk fresh", "cool a hot drink"),
    "light": ("read at night", "find the keys in the dark"),
}


def _make_continuation(rng, keep):
    """HellaSwag-like (2/3 of items, 4 candidates): one to three steps of a routine; the gold is
    the next step, distractors a later step (skips one), a step already done, steps of other
    routines. PIQA-like (2 candidates): a goal and two tools, one with the property the goal
    needs; harder items say the obvious tool is missing. Noise: a filler action, or a second tool
    that also works, competes with the gold and the label is drawn at random."""
    name = rng.choice(NAMES)
    he = _pron(name)
    noisy = rng.random() < NOISE
    if rng.random() < 2 / 3:
        s = rng.choice(SCRIPTS)
        i = rng.randrange(4)
        j = max(0, i - rng.randint(0, 2))
        ctx = f"{name} {s[j]}." + "".join(f" Then {he} {s[k]}." for k in range(j + 1, i + 1))
        if rng.random() < 0.3:
            ctx = f"On {rng.choice(DAYS)}, {ctx}"
        wrong = ([rng.choice(s[i + 2:])] if i < 3 else []) + [rng.choice(s[j:i + 1])]
        wrong += [rng.choice(t) for t in rng.sample([t for t in SCRIPTS if t is not s], 3)]
        steps = [s[i + 1]] + wrong[:3]
        if noisy:
            steps[1] = rng.choice(FILLERS)
        fields = [("Context", ctx)]
        candidates = [f"Then {he} {x}." for x in steps]
    else:
        need = rng.choice(list(TOOLS))
        goal, good = rng.choice(GOALS[need]), rng.choice(TOOLS[need])
        bad = rng.choice(TOOLS[_other(rng, list(TOOLS), need)])
        g = rng.choice((f"{name} wants to {goal}.", f"{name} needs to {goal}.",
                        f"How can {name} {goal}?"))
        if not noisy and rng.random() < 0.3:  # the usual tool is missing: take the other one
            missing = _other(rng, TOOLS[need], good)
            g = f"{name} needs to {goal}, but there is no {missing}."
            bad = missing if rng.random() < 0.6 else bad
        if noisy:
            bad = _other(rng, TOOLS[need], good)
        fields = [("Goal", g)]
        candidates = [f"Use {_a(good)}.", f"Use {_a(bad)}."]
    label = rng.randrange(2) if noisy else 0
    order = rng.sample(range(len(candidates)), len(candidates))
    return _choice("synth/continuation", "continuation", fields, [candidates[k] for k in order],
                   order.index(label), keep)


# ----------------------------------------------------------------------------------------------
# 10. Preference pairs (HH-RLHF-like) and 11. instructions (Alpaca-like)

RUDE = ("Do it yourself.", "That is a silly question.", "Stop asking me things.",
        "Why should I care?")
REFUSE = ("Sorry, I can not help with that.", "I do not want to answer that.",
          "I am not able to do that.")
OPENERS = ("", "", "Sure! ", "Of course. ", "Happy to help. ")
PHRASES = ("good morning", "thank you", "see you soon", "happy birthday", "well done",
           "have a nice day")
CATEGORIES = {"colours": COLOURS, "days of the week": DAYS, "animals": ANIMALS, "places": PLACES,
              "objects": OBJECTS}


def _listing(items):
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def _request(rng):
    """(request, correct answer, wrong answer): the request itself holds all a model needs."""
    kind = rng.randrange(7)
    if kind == 0:
        op = rng.choice(("plus", "minus", "times"))
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if op == "times":
            a, b = a % 10, b % 10
        elif op == "minus":
            a, b = max(a, b), min(a, b)
        c = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        off = c + rng.choice((1, 2, -1, -2)) if c > 1 else c + 1
        return f"What is {a} {op} {b}?", f"{a} {op} {b} is {c}.", f"{a} {op} {b} is {off}."
    if kind == 1:
        (p, q), o, (n, m) = rng.sample(NAMES, 2), rng.choice(OBJECTS), rng.sample(range(1, 10), 2)
        return (f"{p} has {_count(n, o)} and {q} has {_count(m, o)}. "
                f"How many {PLURAL[o]} does {p} have?",
                f"{p} has {_count(n, o)}.", f"{p} has {_count(m, o)}.")
    if kind == 2:
        p, o, n, k = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(1, 6), rng.randint(1, 6)
        return (f"{p} has {_count(n, o)} and gets {NUMBERS[k]} more. "
                f"How many {PLURAL[o]} does {p} have now?", f"{p} now has {_count(n + k, o)}.",
                f"{p} now has {_count(rng.choice((n, k, n + k + 1)), o)}.")
    if kind == 3:
        a, b = rng.sample(range(1, 50), 2)
        return (f"Which number is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}.",
                f"{min(a, b)} is bigger than {max(a, b)}.")
    if kind == 4:
        phrase = rng.choice(PHRASES) + rng.choice(("", ", " + rng.choice(NAMES).lower()))
        return (f"Please write '{phrase}' in capital letters.", phrase.upper() + ".",
                rng.choice((phrase, _cap(phrase))) + ".")
    if kind == 5:
        (cat, items), (_, others) = rng.sample(sorted(CATEGORIES.items()), 2)
        k = rng.randint(2, 4)
        return (f"Name {NUMBERS[k]} {cat}.",
                f"Here are {NUMBERS[k]} {cat}: {_listing(rng.sample(items, k))}.",
                f"Here are {NUMBERS[k]} {cat}: {_listing(rng.sample(others, k))}.")
    p, q = rng.sample(NAMES, 2)
    day = rng.choice(DAYS)
    return (f"Please write a short greeting for {p} for {day}.",
            f"Hello, {p}! I hope you have a lovely {day}.",
            f"Hello, {q}! I hope you have a lovely {day}.")


def _make_preference(rng, keep):
    """Chosen: correct, polite, on topic. Rejected: a wrong answer in the same style (half), a rude
    reply, a refusal or an off-topic sentence. Noise: two correct answers that differ only in
    their opening words; which is chosen is drawn at random."""
    request, right, wrong = _request(rng)
    chosen = rng.choice(OPENERS) + right
    r = rng.random()
    if r < NOISE:
        rejected = _other(rng, OPENERS, chosen[:-len(right)]) + right
    elif r < 0.5:
        rejected = rng.choice(OPENERS) + wrong
    elif r < 0.65:
        rejected = rng.choice(RUDE)
    elif r < 0.85:
        rejected = rng.choice(REFUSE)
    else:
        rejected = f"{rng.choice(NAMES)} went to the {rng.choice(PLACES)} on {rng.choice(DAYS)}."
    if not keep(request):
        return None
    return PreferenceExample("synth/preference", _chat(request), chosen, rejected)


WORDS = OBJECTS + list(COLOURS) + list(ANIMALS) + PLACES


def _make_instruct(rng, keep):
    """Deterministic string tasks with one exact answer."""
    kind, words = rng.randrange(9), rng.sample(WORDS, rng.randint(3, 5))
    nums = rng.sample(range(1, 30), rng.randint(2, 4))
    listed, spaced, numbers = ", ".join(words), " ".join(words), ", ".join(map(str, nums))
    if kind == 0:
        q, a = f"Reverse the order of these words: {spaced}", " ".join(words[::-1])
    elif kind == 1:
        q, a = f"Sort these words in alphabetical order: {listed}", ", ".join(sorted(words))
    elif kind == 2:
        q = f"Sort these numbers from smallest to largest: {numbers}"
        a = ", ".join(map(str, sorted(nums)))
    elif kind == 3:
        q, a = f"How many words are in this list: {listed}?", str(len(words))
    elif kind == 4:
        k = rng.randint(2, 5)
        q, a = f"Repeat the word {words[0]} {NUMBERS[k]} times.", " ".join([words[0]] * k)
    elif kind == 5:
        q, a = f"Write these words in capital letters: {spaced}", spaced.upper()
    elif kind == 6:
        q, a = f"Add these numbers: {numbers}.", str(sum(nums))
    elif kind == 7:
        animals, colour, place = rng.sample(ANIMALS, 2), rng.choice(COLOURS), rng.choice(PLACES)
        q = (f"List the animals in this sentence: The {animals[0]} and the {colour} {animals[1]} "
             f"are in the {place}.")
        a = ", ".join(animals)
    else:
        which = rng.choice(("first", "last"))
        q = f"What is the {which} word in this list: {listed}?"
        a = words[0 if which == "first" else -1]
    if not keep(q):
        return None
    return InstructionExample("synth/instruct", _chat(q), a, _near_misses(kind, q, a, words, nums))


def _swap_one(items, rng):
    """items with one random adjacent pair swapped (a single slip)."""
    items = list(items)
    i = rng.randrange(len(items) - 1)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def _near_misses(kind, q, a, words, nums):
    """Plausible wrong answers to an instruction (the rejected side of its DPH pairs): a half-done
    reversal, one slip in a sort, an off-by-one count or sum, a misspelling, the other end of a
    list. Drawn from the question's own generator, so the examples themselves never change."""
    rng = random.Random(zlib.crc32(q.encode("utf-8")))
    if kind == 0:
        half = len(words) // 2
        out = [" ".join(words), " ".join(words[half:][::-1] + words[:half]),
               " ".join(_swap_one(words[::-1], rng))]
    elif kind in (1, 2):
        key = sorted(words) if kind == 1 else [str(n) for n in sorted(nums)]
        given = words if kind == 1 else [str(n) for n in nums]
        out = [", ".join(given), ", ".join(key[::-1]), ", ".join(_swap_one(key, rng))]
    elif kind in (3, 6):
        n = int(a)
        out = [str(n - 1), str(n + 1), str(n + rng.choice((2, 10)))]
    elif kind == 4:
        k = len(a.split())
        out = [" ".join(a.split()[:1] * (k - 1)), " ".join(a.split()[:1] * (k + 1))]
    elif kind == 5:
        out = [" ".join(words), " ".join([words[0].upper()] + words[1:]),
               " ".join(w.upper() if i else w for i, w in enumerate(words))]
    elif kind == 7:
        out = [a.split(", ")[0], a.split(", ")[1], ", ".join(a.split(", ")[::-1]) + ", " +
               q.split("in the ")[-1].rstrip(".")]
    else:
        other = words[-1] if a == words[0] else words[0]
        out = [other, words[1], a[:-1] if len(a) > 3 else a + a[-1]]  # misspelt
    if kind in (0, 1) and len(a) > 4:  # a misspelling inside the right answer
        j = rng.randrange(1, len(a) - 1)
        if a[j].isalpha():
            out.append(a[:j] + a[j + 1:])
    return tuple(dict.fromkeys(o for o in out if o and o != a))


# ----------------------------------------------------------------------------------------------
# Loaders and specs

def _generate(family, make, split, seed, n):
    if split not in SIZES:
        raise TaskError(f"{family}: unknown split {split!r}; expected one of {', '.join(SIZES)}")
    n = SIZES[split] if n is None else int(n)
    rng = random.Random(zlib.crc32(f"{seed}/{family}/{split}".encode("utf-8")))
    out, tries = [], 0

    def keep(text):  # the split owns a fixed share of all texts, so splits never share one
        return split_of(text) == split

    while len(out) < n:
        ex = make(rng, keep)  # None: the item belongs to another split
        if ex is not None:
            out.append(ex)
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"{family}: could not generate {n} {split} examples")
    return out


def load_sentiment(split, seed=0, n=None, **_):
    return _generate("synth/sentiment", _make_sentiment, split, seed, n)


def load_acceptability(split, seed=0, n=None, **_):
    return _generate("synth/acceptability", _make_acceptability, split, seed, n)


def load_paraphrase(split, seed=0, n=None, **_):
    return _generate("synth/paraphrase", _make_paraphrase, split, seed, n)


def load_entailment(split, seed=0, n=None, **_):
    return _generate("synth/entailment", _make_entailment, split, seed, n)


def load_rte(split, seed=0, n=None, **_):
    return _generate("synth/rte", _make_rte, split, seed, n)


def load_similarity(split, seed=0, n=None, **_):
    return _generate("synth/similarity", _make_similarity, split, seed, n)


def load_race(split, seed=0, n=None, **_):
    return _generate("synth/race", _make_race, split, seed, n)


def load_continuation(split, seed=0, n=None, **_):
    return _generate("synth/continuation", _make_continuation, split, seed, n)


def load_boolq(split, seed=0, n=None, **_):
    return _generate("synth/boolq", _make_boolq, split, seed, n)


def load_preference(split, seed=0, n=None, **_):
    return _generate("synth/preference", _make_preference, split, seed, n)


def load_instruct(split, seed=0, n=None, **_):
    return _generate("synth/instruct", _make_instruct, split, seed, n)


FAMILIES = (  # name, kind, loader, metrics, what it mirrors
    ("synth/sentiment", "choice", load_sentiment, ("acc",),
     "SST-2: sentence sentiment, negative/positive"),
    ("synth/acceptability", "choice", load_acceptability, ("mcc",),
     "CoLA: grammatical acceptability, no/yes"),
    ("synth/paraphrase", "choice", load_paraphrase, ("f1", "acc"),
     "MRPC/QQP: are two sentences paraphrases, no/yes"),
    ("synth/entailment", "choice", load_entailment, ("acc",),
     "MNLI: premise/hypothesis, True/Neither/False"),
    ("synth/rte", "choice", load_rte, ("acc",), "RTE/QNLI: two-way entailment, yes/no"),
    ("synth/similarity", "choice", load_similarity, ("pearson", "spearman"),
     "STS-B: similarity rated 0-5"),
    ("synth/race", "choice", load_race, ("acc",),
     "RACE/ARC/OBQA: passage, question, four lettered options"),
    ("synth/continuation", "choice", load_continuation, ("acc",),
     "HellaSwag/PIQA: the plausible continuation or solution"),
    ("synth/boolq", "choice", load_boolq, ("acc",), "BoolQ: passage and a yes/no question"),
    ("synth/preference", "preference", load_preference, ("acc",),
     "HH-RLHF: chosen vs rejected assistant answers"),
    ("synth/instruct", "instruction", load_instruct, (),
     "Alpaca: instructions with one exact answer (SFT)"),
)
SPECS = [TaskSpec(name, kind, loader, metrics, "test", desc, "synth")
         for name, kind, loader, metrics, desc in FAMILIES]
MIXTURES = {
    "builtin": [f[0] for f in FAMILIES],
    "builtin-choice": [f[0] for f in FAMILIES if f[1] == "choice"],
}


def _report():
    import time
    from collections import Counter
    t0 = time.perf_counter()
    for spec in SPECS:
        name, t = spec.name, time.perf_counter()
        data = {s: spec.load(s) for s in SIZES}
        train = data["train"]
        words = sum(len(ex.messages[-1]["content"].split()) for ex in train) / len(train)
        spread = ""
        if isinstance(train[0], ChoiceExample):
            c = Counter(ex.label for ex in train)
            spread = " ".join(f"{k}:{c[k] / len(train):.2f}" for k in sorted(c))
        print(f"{name:22s} {'/'.join(str(len(v)) for v in data.values()):12s} "
              f"{words:5.1f} words  {time.perf_counter() - t:5.2f}s  {spread}")
    print(f"total {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    _report()
