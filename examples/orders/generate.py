"""orders: a second small structured task, to check that tunesmith's defaults are not tuned to goDrive.

goDrive is Chinese, `{"input", "output"}` records and a rule-based answer. This one is English,
alpaca-shaped (`{"instruction", "input", "output"}`) and the answer is JSON extracted from a free-form
customer message: which product, how many, what colour, where to, and how fast.

    python examples/orders/generate.py    # rewrites train.jsonl (1,200) and test.jsonl (100), seeded

The message wording varies (templates, synonyms, number words, order of the facts), the JSON keys and
their order never do, so answers can be scored by exact match and by JSON validity.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from tunesmith.atomic import write_text

INSTRUCTION = "Extract the order from the customer's message as JSON."
PRODUCTS = {"mug": ["mug", "mugs"], "t-shirt": ["t-shirt", "t-shirts"], "notebook": ["notebook", "notebooks"],
            "backpack": ["backpack", "backpacks"], "umbrella": ["umbrella", "umbrellas"], "lamp": ["lamp", "lamps"]}
COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
CITIES = ["Oslo", "Lyon", "Porto", "Leeds", "Graz", "Turku", "Bergen", "Ghent"]
SHIPPING = {"express": ["by express", "as fast as possible", "with express shipping", "urgently"],
            "standard": ["with standard shipping", "no rush", "whenever convenient", "by regular post"]}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
TEMPLATES = [
    "Hi, I'd like {qty} {colour} {product} sent to {city} {shipping}.",
    "Please ship {qty} {product} in {colour} to {city}, {shipping}.",
    "Can you send {qty} {colour} {product} {shipping}? Delivery address is in {city}.",
    "Order for {city}: {qty} {product}, colour {colour}, {shipping}.",
    "{shipping_cap}, I need {qty} {colour} {product} delivered to {city}.",
    "We want {qty} {product} ({colour}) for our office in {city}; {shipping}, thanks.",
]


def sample(rng: random.Random) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    qty = rng.randint(1, 8)
    shipping = rng.choice(sorted(SHIPPING))
    return {"product": product, "quantity": qty, "colour": rng.choice(COLOURS), "city": rng.choice(CITIES),
            "shipping": shipping}


def render(order: dict, rng: random.Random) -> str:
    qty = order["quantity"]
    phrase = rng.choice(SHIPPING[order["shipping"]])
    return rng.choice(TEMPLATES).format(
        qty=NUMBER_WORDS[qty] if rng.random() < 0.5 else str(qty),
        colour=order["colour"], product=PRODUCTS[order["product"]][qty > 1], city=order["city"],
        shipping=phrase, shipping_cap=phrase[0].upper() + phrase[1:])


def expected(order: dict) -> str:
    return json.dumps(order, ensure_ascii=False)


def generate(train_size: int = 1200, test_size: int = 100, seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < train_size + test_size:
        order = sample(rng)
        key = expected(order)
        if key in seen:  # test orders never occur in training, whatever their wording
            continue
        seen.add(key)
        records.append({"instruction": INSTRUCTION, "input": render(order, rng), "output": key})
    return records[:train_size], records[train_size:]


def main() -> None:
    train, test = generate()
    for name, records in [("train.jsonl", train), ("test.jsonl", test)]:
        write_text(HERE / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


if __name__ == "__main__":
    main()
