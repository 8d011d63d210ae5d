"""Build src/flythinker/assets/sample_reviews.json: a small personalized-writing sample.

Written for this project (no external text): 36 synthetic reviewers, each with a consistent voice
(how they open, which words they favour, how long their sentences run, how they sign off), writing
product reviews in the LongLaMP product_review schema. 4 reviews form each user's profile and a 5th
is the target, so a model that reads the profile can learn the voice. Users 0-23 are `train`,
24-35 `test` (LongLaMP's user setting: test users are unseen). Deterministic: rerun to rebuild.

    python tools/make_sample_reviews.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPENERS = [
    "Okay, so here is the deal.", "Short version: it works.", "I bought this for my kitchen.",
    "Let me start with the packaging.", "Honest review, no fluff.", "Well, well, well.",
    "As a parent of three,", "I have owned many of these over the years.", "First impressions matter to me.",
    "Quick note before the details.", "I was skeptical at first.", "Right out of the box,",
]
CLOSERS = [
    "Would buy again!", "That is all, folks.", "Four stars from me, rounding down.", "Recommended, with caveats.",
    "Hope this helps someone.", "Cheers.", "Your mileage may vary.", "Bottom line: worth it.",
    "Thanks for reading my ramble.", "End of story.", "Verdict: keeper.", "Would not gift it, though.",
]
LIKES = [
    ["sturdy", "solid", "reliable"], ["gorgeous", "lovely", "charming"], ["fast", "snappy", "quick"],
    ["quiet", "calm", "gentle"], ["cheap", "affordable", "a bargain"], ["compact", "tiny", "light"],
]
GRIPES = [
    "the manual is useless", "the cord is too short", "it scratches easily", "the lid rattles",
    "the buttons are stiff", "the smell lasts a week", "the color is off from the photo", "shipping took ages",
]
PRODUCTS = [
    ("Stainless Steel Kettle 1.7L", "kettle"), ("Bamboo Cutting Board Set", "board"),
    ("Wireless Earbuds with Case", "earbuds"), ("LED Desk Lamp, Dimmable", "lamp"),
    ("Cast Iron Skillet 10 inch", "skillet"), ("Yoga Mat, Non-Slip", "mat"),
    ("Insulated Water Bottle 24oz", "bottle"), ("Mechanical Keyboard, Brown Switches", "keyboard"),
    ("Ceramic Coffee Mug Set", "mug set"), ("Hiking Backpack 30L", "backpack"),
    ("Electric Toothbrush", "toothbrush"), ("Phone Stand, Adjustable", "stand"),
]
DETAIL = [
    "I use the {noun} every single day.", "My partner tried the {noun} too and agreed.",
    "After two months the {noun} still looks new.", "Compared to my old one, this {noun} is a step up.",
    "The {noun} arrived a day early.", "I tested the {noun} in every way I could think of.",
]


def user_voice(rng: random.Random, user: int) -> dict:
    return {
        "opener": OPENERS[user % len(OPENERS)],
        "closer": CLOSERS[(user * 5) % len(CLOSERS)],
        "likes": LIKES[user % len(LIKES)],
        "exclaim": user % 3 == 0,
        "sentences": 3 + user % 4,
        "rating": rng.choice([3.0, 4.0, 5.0]),
    }


def review(rng: random.Random, voice: dict, product: tuple[str, str]) -> dict:
    title, noun = product
    end = "!" if voice["exclaim"] else "."
    like = rng.choice(voice["likes"])
    body = [voice["opener"], f"The {noun} is {like} and {rng.choice(voice['likes'])}{end}"]
    for _ in range(voice["sentences"]):
        body.append(rng.choice(DETAIL).format(noun=noun))
    body.append(f"My only complaint: {rng.choice(GRIPES)}{end}")
    body.append(voice["closer"])
    rating = voice["rating"]
    return {
        "overall": rating,
        "summary": f"{like.capitalize()} {noun}{end}",
        "description": title,
        "reviewText": " ".join(body),
    }


def build(n_users: int = 36, n_train_users: int = 24, seed: int = 0) -> dict:
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "test": []}
    for user in range(n_users):
        voice = user_voice(rng, user)
        products = rng.sample(PRODUCTS, 5)
        reviews = [review(rng, voice, p) for p in products]
        target = reviews[-1]
        record = {
            "reviewerId": f"sample-user-{user:02d}",
            "input": (
                f'Generate the review text written by a reviewer who has given an overall rating of '
                f'"{target["overall"]}" for a product with description "{target["description"]}". '
                f'The summary of the review text is "{target["summary"]}".'
            ),
            "output": target["reviewText"],
            "profile": reviews[:-1],
        }
        splits["train" if user < n_train_users else "test"].append(record)
    return splits


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "src/flythinker/assets/sample_reviews.json"
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {out}")
