"""The strict check behind semantic hits: hard negatives are told apart, paraphrases are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetoll_sidecar.cache.verify import Signature, disagreement, signature

PAIRS = Path(__file__).resolve().parents[1] / "bench" / "cache_pairs" / "pairs.jsonl"

HARD_NEGATIVES = [
    # numbers: ids, amounts, quantities, sizes, ordinals, times, codes, written-out numbers
    ("Can I get a refund for order 1234?", "Can I get a refund for order 1235?", "number"),
    ("I was charged $49 this month.", "I was charged $94 this month.", "number"),
    ("Do you have these shoes in size 9?", "Do you have these shoes in size 10?", "number"),
    ("Is the first month free?", "Is the second month free?", "number"),
    ("Do you open at 9am?", "Do you open at 10am?", "number"),
    ("Can I get a refund after two weeks?", "Can I get a refund after three weeks?", "number"),
    ("My invoice INV-2023-0045 is wrong.", "My invoice INV-2023-0054 is wrong.", "number"),
    ("I ordered 3 items but only got 2.", "I ordered 2 items but only got 3.", "number"),
    # negation
    ("I was charged for my order.", "I wasn't charged for my order.", "negation"),
    ("My package was delivered.", "My package was never delivered.", "negation"),
    ("I want marketing emails.", "I no longer want marketing emails.", "negation"),
    ("can i cancel with a fee", "can i cancel without a fee", "negation"),
    ("my promo code works", "my promo code doesnt work", "negation"),
    # named things: plans, brands, places, capitalised product names, direction
    ("How much does the Pro plan cost?", "How much does the Basic plan cost?", "named_thing"),
    ("Do you ship to Canada?", "Do you ship to Mexico?", "named_thing"),
    ("do you deliver to germany", "do you deliver to france", "named_thing"),
    ("Can I pay with PayPal?", "Can I pay with Apple Pay?", "named_thing"),
    ("Is the Nimbus jacket waterproof?", "Is the Aurora jacket waterproof?", "named_thing"),
    ("How do I upgrade from Basic to Pro?", "How do I upgrade from Pro to Basic?", "named_thing"),
    # the action asked for
    ("How do I cancel my subscription?", "How do I pause my subscription?", "action"),
    ("How do I upgrade my plan?", "How do I downgrade my plan?", "action"),
    ("How do I enable two-factor authentication?", "How do I disable two-factor authentication?", "action"),
    ("how do i sign up", "how do i sign in", "action"),
    ("How do I buy a gift card?", "How do I redeem a gift card?", "action"),
    # the thing acted on
    ("How do I cancel my order?", "How do I cancel my subscription?", "object"),
    ("How do I reset my password?", "How do I reset my PIN?", "object"),
    ("How do I update my billing address?", "How do I update my shipping address?", "object"),
    ("Can I add my wife to my account?", "Can I add my son to my account?", "object"),
    # qualifiers
    ("Can I cancel before the trial ends?", "Can I cancel after the trial ends?", "qualifier"),
    ("Can I get a partial refund?", "Can I get a full refund?", "qualifier"),
    ("My package is missing.", "My package is damaged.", "qualifier"),
    ("Is the item in stock?", "Is the item out of stock?", "qualifier"),
    ("Can I delete my account temporarily?", "Can I delete my account permanently?", "qualifier"),
    # the kind of question
    ("When does my subscription renew?", "How do I renew my subscription?", "question"),
    # one unexplained word swapped for another
    ("Is the jacket waterproof?", "Is the jacket machine washable?", "content"),
    ("Can I bring my dog to the hotel?", "Can I bring my cat to the hotel?", "content"),
    ("Is the soup vegan?", "Is the soup gluten-free?", "content"),
]

PARAPHRASES = [
    ("How do I cancel my order?", "cancel my order please"),
    ("Where is my order?", "Can you track my package?"),
    ("Can I get a refund for order #1,234?", "refund for order 1234"),
    ("How do I reset my password?", "I forgot my password, what should I do?"),
    ("How long does it take to get a refund?", "When will I receive my refund?"),
    ("How can I change my card details?", "I want to change the credit card on my account."),
    ("How do I upgrade to the Pro plan?", "i want to upgrade to pro"),
    ("Do you ship to Canada?", "Do you deliver to Canada?"),
    ("I can't log in to my account.", "I'm unable to sign in."),
    ("How do I turn on two-factor authentication?", "How can I enable 2FA on my account?"),
    ("Hi! Quick question: how do I delete my account?", "How can I close my account?"),
    ("HOW DO I CANCEL MY SUBSCRIPTION", "how do i cancel my subscription"),
    ("How Do I Track My Order", "where is my order"),
    ("My order hasn't arrived yet.", "I still haven't received my package."),
    ("Can I swap these shoes for a bigger size?", "Can I exchange the shoes for a bigger size?"),
]


@pytest.mark.parametrize("a,b,why", HARD_NEGATIVES, ids=[f"{w}:{b}" for _, b, w in HARD_NEGATIVES])
def test_hard_negatives_disagree(a, b, why):
    assert disagreement(signature(a), signature(b)) == why
    assert disagreement(signature(b), signature(a)) == why  # symmetric


@pytest.mark.parametrize("a,b", PARAPHRASES, ids=[b for _, b in PARAPHRASES])
def test_paraphrases_agree(a, b):
    sa, sb = signature(a), signature(b)
    assert disagreement(sa, sb) is None, (sa.describe(), sb.describe())


def test_signature_survives_the_trip_through_redis():
    sig = signature("Can I upgrade from Basic to Pro for order #4521 before Friday? I don't want 2 seats.")
    back = Signature.from_json(sig.to_json())
    assert back == sig
    assert disagreement(back, sig) is None
    assert sig.negated and "from:basic" in sig.names and "to:pro" in sig.names and sig.numbers == ("4521", "2")


def test_capitalised_words_that_open_a_sentence_are_not_names():
    assert signature("Where is my order?").names == frozenset()
    assert signature("Hello. Quick question. Can I pay later?").names == frozenset()
    assert signature("Netflix keeps buffering").names == {"netflix"}
    assert signature("Does it work with Roku?").names == {"roku"}
    assert signature("is the API rate limited").names == {"api"}


def test_the_check_on_the_labelled_pairs():
    """A regression guard on bench/cache_pairs: the check alone (no embedding) must keep
    turning down hard negatives and passing paraphrases at the rates measured."""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 300
    different = [p for p in pairs if p["label"] == "different" and p["category"] != "unrelated"]
    same = [p for p in pairs if p["label"] == "same"]
    caught = sum(disagreement(signature(p["a"]), signature(p["b"])) is not None for p in different)
    passed = sum(disagreement(signature(p["a"]), signature(p["b"])) is None for p in same)
    assert caught / len(different) >= 0.98, (
        f"the check lets {len(different) - caught} of {len(different)} hard negatives through"
    )
    assert passed / len(same) >= 0.55, f"the check passes only {passed} of {len(same)} paraphrases"
