"""Train the tiny model's byte-level BPE tokenizer once (provenance of tokenizer.json).

The corpus is English prose generated here from word lists and sentence templates about
factories, tokens and serving, so the tokenizer owes nothing to any outside text.
Run: python train_tokenizer.py OUT_DIR
"""

import random
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

NOUNS = """factory token request model server engine worker scheduler cache block prefix batch
queue tenant tier price budget watt joule power grid accelerator device memory kernel tensor layer
head attention router gateway planner governor meter ledger invoice customer user assistant system
message answer question prompt reply story river mountain city garden kitchen library machine robot
teacher student doctor market window door table chair letter number minute hour day week month year
morning evening night summer winter season weather rain snow wind cloud sun moon star ocean island
forest tree flower leaf seed apple bread coffee tea water fire stone metal paper book page word
sentence language music song painting picture color light shadow sound voice signal network cable
packet message stream response latency throughput deadline schedule plan report chart table column
row file folder path record event clock timer counter limit quota policy rule decision state
function argument result error warning value weather forecast temperature location country person
team project company office meeting idea problem solution method example lesson history science
energy engineer operator manager developer artist writer reader traveler farmer worker builder""".split()
VERBS = """serve build run stream schedule route cache measure count price plan answer ask write read
compute generate predict sample decode encode split merge batch queue admit reject retry wait start
stop finish grow shrink move carry lift open close watch listen speak learn teach help make take give
find keep hold send receive store load save check test fix improve explain describe compare choose
follow lead travel visit cook bake paint sing play work rest sleep walk climb swim drive fly""".split()
ADJECTIVES = """small large fast slow quiet busy bright dark warm cold new old young simple careful
clever honest gentle steady quick heavy light early late cheap expensive efficient reliable
patient curious happy calm strong soft green blue red yellow golden silver wooden ancient modern
local remote shared private public parallel continuous distributed hungry tired friendly""".split()
ADVERBS = "quickly slowly carefully quietly always often rarely never together gently clearly".split()
PLACES = "in the factory|at the gateway|on the server|near the river|inside the cache|across the grid|" \
    "during the night|before the deadline|after the meeting|under the old bridge|behind the engine".split("|")
NAMES = "Ada Grace Alan Linus Marie Ravi Mei Sofia Omar Lena Tomas Aiko Nadia Pablo Yuki Zara".split()


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def inflect(verb: str, rng: random.Random) -> str:
    stem = verb[:-1] if verb.endswith("e") else verb
    return rng.choice([verb, verb + "s", stem + "ing", stem + "ed", stem + "er", stem + "able"])


def sentence(rng: random.Random) -> str:
    n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
    v, a, adv, place = rng.choice(VERBS), rng.choice(ADJECTIVES), rng.choice(ADVERBS), rng.choice(PLACES)
    name = rng.choice(NAMES)
    forms = [
        f"The {a} {n1} will {v} the {n2} {place}.",
        f"{name} said that every {n1} should {v} {adv}.",
        f"Why does the {n1} {v} so many {plural(n2)}?",
        f"A {a} {n1} can {v} {rng.randint(2, 999)} {plural(n2)} per second.",
        f"{name} wanted to {v} the {a} {n2}, but the {n1} was not ready.",
        f"If the {n1} is {a}, we {v} it {adv} and move on to the {n2}.",
        f"Each {n1} costs {rng.randint(1, 99)}.{rng.randint(0, 99):02d} dollars and uses "
        f"{rng.randint(1, 900)} joules.",
        f"\"Can you {v} the {n2}?\" asked {name}. \"Yes, {adv},\" answered the {n1}.",
        f"{plural(n1).capitalize()} {v} {plural(n2)} {place}; nobody knows why.",
        f"Today {name} learned how to {v} a {a} {n1} {place}.",
        f"The {inflect(v, rng)} {n1} was {inflect(rng.choice(VERBS), rng)} by {name} {place}.",
        f"{name} kept {inflect(v, rng)} while the {a}er {plural(n1)} were {inflect(rng.choice(VERBS), rng)}.",
        f"{a.capitalize()}ly, the {n1}{rng.choice(['less', 'ful', 'ness', 'ship', 'like'])} {n2} "
        f"{inflect(v, rng)} {rng.randint(0, 10**rng.randint(1, 6))} times.",
    ]
    return rng.choice(forms)


def structured(rng: random.Random) -> str:
    name, noun, verb = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(VERBS)
    forms = [
        f'{{"name": "{verb}_{noun}", "arguments": {{"{noun}": "{rng.choice(ADJECTIVES)}", "count": {rng.randint(0, 99)}}}}}',
        f"def {verb}_{noun}(self, {noun}: int = {rng.randint(0, 9)}) -> str:\n    return str({noun})\n",
        f"- {name}: {rng.randint(10, 99)}% of {plural(noun)} ({rng.randint(1, 12)}/{rng.randint(1, 28)}/2025)",
        f"Step {rng.randint(1, 9)}. {verb.capitalize()} the {noun}, then check the result.",
    ]
    return rng.choice(forms)


def corpus(num_paragraphs: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(num_paragraphs):
        parts = [sentence(rng) if rng.random() < 0.85 else structured(rng) for _ in range(rng.randint(2, 6))]
        paragraphs.append(" ".join(parts))
    return paragraphs


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL) - len(TOOL_TAGS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS])
    return tok


if __name__ == "__main__":
    out = Path(sys.argv[1])
    tokenizer = train()
    tokenizer.save(str(out / "tokenizer.json"))
    print("vocab size", tokenizer.get_vocab_size(), "bytes", (out / "tokenizer.json").stat().st_size)
