"""Writes the labelled question pairs for judging a semantic cache on support/FAQ traffic.

* `pairs.jsonl`: the first 438 pairs (English), generated from the lists below. The strict
  check's rules were tuned on them, so every row is `split: dev`.
* `test.jsonl`: the frozen test split, compiled from the hand-written `written/test/*.txt`.
* `dev_more.jsonl`: more dev pairs of the same kinds, from `written/dev_more/*.txt`.
* `dev_retired_test.jsonl`: the first held-out split, from `written/dev_retired_test/*.txt`;
  its wrong answers were read to write guards, so it is dev data now (README.md).

Run `python bench/cache_pairs/make_pairs.py` to regenerate (deterministic), or with
`--check` to verify that the files on disk are what the sources compile to. test.jsonl
is frozen by its sha256 (README.md, tests/test_cache_pairs_frozen.py): never rewrite it
to suit a verifier. See README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "pairs.jsonl"
TEST_OUT = HERE / "test.jsonl"
DEV_MORE_OUT = HERE / "dev_more.jsonl"
RETIRED_OUT = HERE / "dev_retired_test.jsonl"
WRITTEN = HERE / "written"

FIELDS = ("id", "a", "b", "label", "category", "split", "domain", "lang")
LANGS = ("en", "de", "es", "fr")
DOMAINS = ("ecommerce", "it_helpdesk", "banking", "travel", "healthcare_admin", "saas_billing")
LEGACY_DOMAIN = "mixed"  # pairs.jsonl spans orders, accounts, telecom, banking, travel
SAME_CATEGORIES = ("typo", "filler", "acronym", "synonym", "register", "paraphrase")
DIFFERENT_CATEGORIES = (
    "negation_scope",
    "role_swap",
    "time",
    "date",
    "tense",
    "one_sided_qualifier",
    "sub_question",
    "number",
    "id_code",
    "action",
    "object",
    "product",
    "place",
    "unrelated",
)
# The categories pairs.jsonl already used (kept as they were: its rows are not relabelled).
LEGACY_CATEGORIES = {
    "same": ("paraphrase",),
    "different": (
        "action",
        "object",
        "product",
        "place",
        "negation",
        "number",
        "qualifier",
        "question",
        "attribute",
        "unrelated",
    ),
}


def pair_id(a: str, b: str) -> str:
    """The stable id of a pair: its two questions, hashed (the same scheme pairs.jsonl always used)."""
    return hashlib.sha1(f"{a}\x00{b}".encode()).hexdigest()[:10]


def normalized(text: str) -> str:
    """A question reduced to its words: accents, case, punctuation and spacing gone (for near-duplicates)."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join(re.findall(r"\w+", plain))


# --------------------------------------------------------------------------- paraphrase groups
# Each group: questions a support team would answer with the same text. Written to
# sound like real tickets and chat messages: typos-free but casual, with fillers,
# lower case, and different wordings of the same request.

GROUPS: list[list[str]] = [
    [
        "How do I cancel my order?",
        "I need to cancel an order I just placed.",
        "Can I still cancel my order?",
        "What's the process for cancelling an order?",
        "cancel my order please",
    ],
    [
        "How do I cancel my subscription?",
        "I want to end my subscription, how do I do that?",
        "How can I cancel my membership?",
        "Where do I go to cancel my plan?",
    ],
    [
        "Can I pause my subscription for a few months?",
        "Is it possible to put my subscription on hold?",
        "How do I temporarily suspend my membership?",
    ],
    [
        "How do I reset my password?",
        "I forgot my password, what should I do?",
        "How can I change my password if I can't remember it?",
        "Password reset steps?",
        "reset password",
    ],
    [
        "Where is my order?",
        "How can I track my package?",
        "Can you tell me the status of my order?",
        "I'd like to know where my parcel is.",
        "track my order",
    ],
    [
        "How long does it take to get a refund?",
        "When will I receive my refund?",
        "How many days until my refund shows up?",
        "What's the refund processing time?",
    ],
    [
        "What is your return policy?",
        "How do returns work?",
        "What's the policy on returning products?",
        "Can you explain your returns policy?",
    ],
    [
        "How do I change the shipping address on my order?",
        "Can I update the delivery address for my order?",
        "I entered the wrong address, can I change it?",
        "I need to edit the shipping address of an order.",
    ],
    [
        "How do I update my payment method?",
        "How can I change my card details?",
        "Where do I update my billing info?",
        "I want to change the credit card on my account.",
    ],
    [
        "How do I contact customer support?",
        "How can I talk to a human?",
        "How do I get in touch with your support team?",
        "I want to speak to an agent.",
    ],
    [
        "How do I delete my account?",
        "How can I close my account?",
        "I want to permanently delete my account.",
        "Please remove my account and all my data.",
    ],
    [
        "Do you ship to Canada?",
        "Can I get my order delivered to Canada?",
        "Is shipping available to Canada?",
        "Do you deliver to Canada?",
    ],
    [
        "How much does the Pro plan cost?",
        "What's the price of Pro?",
        "Pro plan pricing?",
        "How much is the Pro subscription per month?",
    ],
    [
        "How do I upgrade to Premium?",
        "I'd like to upgrade my plan to Premium.",
        "Can I switch to the Premium plan?",
        "How can I move up to Premium?",
    ],
    ["How long is the free trial?", "How many days is the free trial?", "What's the length of the trial period?"],
    [
        "I was charged twice for the same order.",
        "There's a duplicate charge on my card for my order.",
        "Why did I get billed two times for one order?",
        "My card was charged twice for one purchase.",
    ],
    [
        "How do I turn on two-factor authentication?",
        "How can I enable 2FA on my account?",
        "Where do I set up two-factor authentication?",
        "How to activate two factor auth?",
    ],
    [
        "Can I pay with a gift card?",
        "Do you accept gift cards as payment?",
        "Can I use a gift card to pay for my order?",
    ],
    [
        "How do I use a promo code?",
        "Where do I enter a discount code?",
        "How can I apply a coupon to my order?",
        "Where do I put my voucher code at checkout?",
    ],
    [
        "My order hasn't arrived yet.",
        "I still haven't received my package.",
        "My package never showed up.",
        "It's been a while and my order still hasn't come.",
    ],
    [
        "My item arrived damaged, what can I do?",
        "The product I received is broken.",
        "What should I do if my order arrives broken?",
        "I got a damaged package, can I get a replacement?",
    ],
    [
        "I received the wrong item.",
        "You sent me the wrong product.",
        "Got the wrong thing in my order.",
        "The item in my package isn't what I ordered.",
    ],
    [
        "I can't log in to my account.",
        "I'm unable to sign in.",
        "Login isn't working for me.",
        "Why can't I access my account?",
    ],
    [
        "Where can I download my invoices?",
        "How do I download past invoices?",
        "How do I get a copy of my invoice?",
        "Can I download a receipt for my purchase?",
    ],
    [
        "What are your opening hours?",
        "When are you open?",
        "What time does the store open?",
        "What are your business hours?",
    ],
    [
        "How much is international shipping?",
        "What does it cost to ship internationally?",
        "What are your shipping fees for overseas orders?",
    ],
    [
        "How do I change my email address?",
        "Can I update the email on my account?",
        "I need to use a different email for my account.",
    ],
    [
        "How do I add a user to my team?",
        "How can I invite a teammate to my workspace?",
        "Can I add more members to my team account?",
    ],
    ["Do you offer a student discount?", "Is there a discount for students?", "Can students get a cheaper price?"],
    [
        "If I cancel now, will I get a refund?",
        "Do I get my money back if I cancel?",
        "Will I be refunded if I cancel my subscription?",
    ],
    [
        "How do I turn off auto-renewal?",
        "How can I stop my subscription from renewing automatically?",
        "I don't want my plan to renew automatically.",
    ],
    [
        "Can I exchange my shoes for a different size?",
        "How do I exchange an item for another size?",
        "The shoes are too small, can I swap them for a bigger size?",
    ],
    [
        "Can I place an order without creating an account?",
        "Do I need an account to buy something?",
        "Is guest checkout available?",
    ],
    ["What payment methods do you accept?", "Which payment options are available?", "How can I pay for my order?"],
    [
        "How long does standard shipping take?",
        "How many days does standard delivery take?",
        "When will my order arrive with standard shipping?",
    ],
    [
        "The app keeps crashing on my iPhone.",
        "Your app crashes every time I open it on iPhone.",
        "The iPhone app won't stay open.",
    ],
    ["How do I export my data?", "Can I download all my data?", "Is there a way to get a copy of my data?"],
    [
        "Can I add an item to an order I already placed?",
        "Is it possible to add something to my existing order?",
        "I forgot to add a product to my order, can I still add it?",
    ],
    [
        "Does my plan work abroad?",
        "Can I use my phone plan when travelling internationally?",
        "Will my plan cover roaming overseas?",
    ],
    [
        "I lost my debit card, what should I do?",
        "What do I do if I lose my bank card?",
        "My card is missing, how do I block it?",
    ],
    [
        "How long is the warranty on your products?",
        "What warranty do your products come with?",
        "How many years of warranty do I get?",
    ],
    [
        "How do I unsubscribe from your newsletter?",
        "How can I opt out of promotional emails?",
        "Please stop sending me marketing emails.",
    ],
    [
        "Can I switch from monthly to annual billing?",
        "How do I change my billing from monthly to yearly?",
        "I want to move my subscription from monthly to annual payments.",
    ],
    [
        "How do I cancel my flight booking?",
        "I need to cancel my flight reservation.",
        "Can I cancel a flight I booked?",
    ],
    ["What is the baggage allowance?", "How much luggage can I bring?", "How many bags am I allowed to check?"],
    ["How do I change my username?", "Can I pick a new username?", "Is it possible to edit my user name?"],
    ["Why was my card declined?", "My card keeps getting declined, why?", "Why is my payment being rejected?"],
    [
        "How do I return an item?",
        "What are the steps to send an item back?",
        "I want to return something I bought, how?",
    ],
    ["Do you price match?", "Will you match a competitor's price?", "Do you offer price matching?"],
    [
        "Can I change my delivery date?",
        "Is it possible to reschedule my delivery?",
        "How do I pick a different delivery day?",
    ],
]

# --------------------------------------------------------------------------- hard negatives, hand-written
# (a, b, category): questions that look alike and must NOT share an answer.

HARD: list[tuple[str, str, str]] = [
    # the action asked for
    ("How do I cancel my subscription?", "How do I pause my subscription?", "action"),
    ("How do I cancel my subscription?", "How do I renew my subscription?", "action"),
    ("How do I upgrade my plan?", "How do I downgrade my plan?", "action"),
    ("Can I cancel my order?", "Can I change my order?", "action"),
    ("How do I return an item?", "How do I exchange an item?", "action"),
    ("How do I delete my account?", "How do I deactivate my account?", "action"),
    ("How do I reset my password?", "How do I change my password?", "action"),
    ("How do I track my order?", "How do I cancel my order?", "action"),
    ("How do I add a payment method?", "How do I remove a payment method?", "action"),
    ("How do I enable two-factor authentication?", "How do I disable two-factor authentication?", "action"),
    ("How do I log in?", "How do I log out?", "action"),
    ("How do I download the app?", "How do I uninstall the app?", "action"),
    ("How do I subscribe to the newsletter?", "How do I unsubscribe from the newsletter?", "action"),
    ("How do I link my bank account?", "How do I unlink my bank account?", "action"),
    (
        "Can I transfer my subscription to another account?",
        "Can I share my subscription with another account?",
        "action",
    ),
    ("How do I book an appointment?", "How do I reschedule an appointment?", "action"),
    ("How do I book an appointment?", "How do I cancel an appointment?", "action"),
    ("How do I buy a gift card?", "How do I redeem a gift card?", "action"),
    ("How do I verify my email?", "How do I change my email?", "action"),
    ("I want to pause my membership.", "I want to cancel my membership.", "action"),
    ("How do I resume my paused subscription?", "How do I pause my subscription?", "action"),
    ("Can I extend my free trial?", "Can I cancel my free trial?", "action"),
    ("How do I freeze my card?", "How do I cancel my card?", "action"),
    ("How do I activate my new card?", "How do I cancel my new card?", "action"),
    ("Can I upgrade my flight?", "Can I cancel my flight?", "action"),
    ("Can I return my order?", "Can I track my order?", "action"),
    ("How do I pay my bill?", "How do I dispute my bill?", "action"),
    ("How do I connect my account to Slack?", "How do I disconnect my account from Slack?", "action"),
    ("How do I install the desktop app?", "How do I uninstall the desktop app?", "action"),
    ("Can I reschedule my delivery?", "Can I cancel my delivery?", "action"),
    ("I'd like to upgrade my subscription.", "I'd like to cancel my subscription.", "action"),
    ("Help me renew my membership", "Help me cancel my membership", "action"),
    ("how do i sign up", "how do i sign in", "action"),
    ("Can I return a gift?", "Can I exchange a gift?", "action"),
    ("How do I print my invoice?", "How do I download my invoice?", "action"),
    ("Can I buy a gift card online?", "Can I sell a gift card online?", "action"),
    # the thing acted on
    ("How do I cancel my order?", "How do I cancel my subscription?", "object"),
    ("How do I cancel my order?", "How do I cancel my account?", "object"),
    ("How do I reset my password?", "How do I reset my PIN?", "object"),
    ("How do I change my email address?", "How do I change my username?", "object"),
    ("How do I change my email address?", "How do I change my phone number?", "object"),
    ("How do I update my billing address?", "How do I update my shipping address?", "object"),
    ("How do I delete my account?", "How do I delete my review?", "object"),
    ("How do I delete my account?", "How do I delete my payment method?", "object"),
    ("Where can I download my invoices?", "Where can I download my data?", "object"),
    ("How do I add a user to my team?", "How do I add a payment method to my team?", "object"),
    ("How do I cancel my flight?", "How do I cancel my hotel booking?", "object"),
    ("Can I change the size of my order?", "Can I change the color of my order?", "object"),
    ("I lost my card.", "I lost my password.", "object"),
    ("How do I update my name?", "How do I update my address?", "object"),
    ("Can I add my wife to my account?", "Can I add my son to my account?", "object"),
    ("How do I change my profile picture?", "How do I change my profile name?", "object"),
    ("Is my data encrypted?", "Is my password encrypted?", "object"),
    ("How do I track my order?", "How do I track my refund?", "object"),
    ("Can I return a gift card?", "Can I return a gift?", "object"),
    ("How do I cancel my order?", "How do I cancel my booking?", "object"),
    ("How do I reset my router?", "How do I reset my password?", "object"),
    ("Can I change my seat?", "Can I change my flight?", "object"),
    ("How do I update the app?", "How do I update my payment method?", "object"),
    ("Where can I see my order history?", "Where can I see my invoices?", "object"),
    # products, plans, brands, platforms
    ("How much does the Pro plan cost?", "How much does the Basic plan cost?", "product"),
    ("Does the Premium plan include offline downloads?", "Does the Plus plan include offline downloads?", "product"),
    ("What's included in the Family plan?", "What's included in the Individual plan?", "product"),
    ("Does the Business plan include SSO?", "Does the Enterprise plan include SSO?", "product"),
    ("Does the Pro plan include API access?", "Does the Team plan include API access?", "product"),
    ("Is the app available on iPhone?", "Is the app available on Android?", "product"),
    ("Does it work on Mac?", "Does it work on Windows?", "product"),
    ("Can I pay with PayPal?", "Can I pay with Apple Pay?", "product"),
    ("Do you accept Visa?", "Do you accept American Express?", "product"),
    ("Do you ship with UPS?", "Do you ship with FedEx?", "product"),
    ("Do you have the Air Max in stock?", "Do you have the Air Force 1 in stock?", "product"),
    ("Is the Nimbus jacket waterproof?", "Is the Aurora jacket waterproof?", "product"),
    ("Can I integrate with Slack?", "Can I integrate with Zoom?", "product"),
    ("Does it work with Alexa?", "Does it work with Google Home?", "product"),
    ("can i pay with paypal", "can i pay with klarna", "product"),
    ("is the nimbus jacket waterproof", "is the aurora jacket waterproof", "product"),
    ("does the pro plan have priority support", "does the basic plan have priority support", "product"),
    ("Is the Galaxy Buds case sold separately?", "Is the AirPods case sold separately?", "product"),
    ("How do I connect my Fitbit?", "How do I connect my Garmin?", "product"),
    ("Can I stream on my Roku?", "Can I stream on my Xbox?", "product"),
    ("Is the Chef's Knife dishwasher safe?", "Is the Bread Knife dishwasher safe?", "product"),
    ("What's the difference between Pro and Premium?", "What's the difference between Basic and Premium?", "product"),
    ("Does Netflix come with the bundle?", "Does Disney+ come with the bundle?", "product"),
    ("How do I cancel Spotify Premium through you?", "How do I cancel Apple Music through you?", "product"),
    # places
    ("Do you ship to Canada?", "Do you ship to Mexico?", "place"),
    ("Do you ship to the UK?", "Do you ship to Ireland?", "place"),
    ("Can you deliver to Alaska?", "Can you deliver to Hawaii?", "place"),
    ("What are the opening hours of the London store?", "What are the opening hours of the Paris store?", "place"),
    ("Is there a store in Chicago?", "Is there a store in Boston?", "place"),
    ("do you deliver to germany", "do you deliver to france", "place"),
    ("How long does shipping to Australia take?", "How long does shipping to New Zealand take?", "place"),
    ("Can I pick up my order at the Main Street store?", "Can I pick up my order at the Harbor Mall store?", "place"),
    ("Is the Toronto office open on weekends?", "Is the Seattle office open on weekends?", "place"),
    ("Does my plan include roaming in Europe?", "Does my plan include roaming in Asia?", "place"),
    # negation
    ("I was charged for my order.", "I wasn't charged for my order.", "negation"),
    ("My order arrived.", "My order didn't arrive.", "negation"),
    ("My promo code works.", "My promo code doesn't work.", "negation"),
    ("I received a confirmation email.", "I didn't receive a confirmation email.", "negation"),
    ("I can log in on my phone.", "I can't log in on my phone.", "negation"),
    ("My package was delivered.", "My package was not delivered.", "negation"),
    ("I have a tracking number.", "I don't have a tracking number.", "negation"),
    ("My subscription renewed.", "My subscription didn't renew.", "negation"),
    (
        "I want my subscription to renew automatically.",
        "I don't want my subscription to renew automatically.",
        "negation",
    ),
    ("The discount was applied to my order.", "The discount wasn't applied to my order.", "negation"),
    ("My account is verified.", "My account isn't verified.", "negation"),
    ("I received my refund.", "I never received my refund.", "negation"),
    ("I want to receive marketing emails.", "I no longer want to receive marketing emails.", "negation"),
    ("Can I return an item I have opened?", "Can I return an item I have not opened?", "negation"),
    ("Is the item in stock?", "Is the item out of stock?", "negation"),
    ("Is the price including VAT?", "Is the price excluding VAT?", "negation"),
    ("Can I cancel with a fee?", "Can I cancel without a fee?", "negation"),
    ("The app is syncing my data.", "The app is not syncing my data.", "negation"),
    ("my card was accepted", "my card was not accepted", "negation"),
    ("Why did my payment go through?", "Why didn't my payment go through?", "negation"),
    ("Does the Pro plan include phone support?", "Does the Pro plan exclude phone support?", "negation"),
    ("I got the email with my receipt", "I never got the email with my receipt", "negation"),
    # numbers
    ("Can I get a refund for order 1234?", "Can I get a refund for order 1235?", "number"),
    ("What's the status of order #55120?", "What's the status of order #55102?", "number"),
    ("Can I return an item after 30 days?", "Can I return an item after 60 days?", "number"),
    ("Is there a discount for 5 seats?", "Is there a discount for 50 seats?", "number"),
    ("Do you have these shoes in size 9?", "Do you have these shoes in size 10?", "number"),
    ("I was charged $49 this month.", "I was charged $94 this month.", "number"),
    ("Can I add 2 users to my plan?", "Can I add 3 users to my plan?", "number"),
    ("Does the plan include 10 GB of storage?", "Does the plan include 100 GB of storage?", "number"),
    ("Is delivery within 2 days possible?", "Is delivery within 5 days possible?", "number"),
    ("Is the iPhone 14 supported?", "Is the iPhone 15 supported?", "number"),
    ("Can I change my order within 1 hour?", "Can I change my order within 24 hours?", "number"),
    ("Where is my order from March 3?", "Where is my order from March 13?", "number"),
    ("Do you open at 9am on Saturdays?", "Do you open at 10am on Saturdays?", "number"),
    ("Can I get a refund after two weeks?", "Can I get a refund after three weeks?", "number"),
    ("I ordered 3 items but only got 2.", "I ordered 2 items but only got 3.", "number"),
    ("Is the first month free?", "Is the second month free?", "number"),
    ("Can I buy 1 ticket for the event?", "Can I buy 10 tickets for the event?", "number"),
    ("My invoice INV-2023-0045 is wrong.", "My invoice INV-2023-0054 is wrong.", "number"),
    ("How much is the 12-month plan?", "How much is the 24-month plan?", "number"),
    ("Can I use 4 devices at once?", "Can I use 6 devices at once?", "number"),
    ("Is there a fee for a 20 kg bag?", "Is there a fee for a 30 kg bag?", "number"),
    ("Do you deliver orders over $50 for free?", "Do you deliver orders over $35 for free?", "number"),
    ("Does the 256GB model come in blue?", "Does the 512GB model come in blue?", "number"),
    ("Can I have 3 people on the family plan?", "Can I have 6 people on the family plan?", "number"),
    ("Is there a 10% discount for students?", "Is there a 15% discount for students?", "number"),
    ("Flight BA117 is delayed, what now?", "Flight BA171 is delayed, what now?", "number"),
    # qualifiers that change the answer
    ("Can I cancel before the trial ends?", "Can I cancel after the trial ends?", "qualifier"),
    ("Is international shipping free?", "Is domestic shipping free?", "qualifier"),
    ("Can I get a partial refund?", "Can I get a full refund?", "qualifier"),
    ("Can I return a used item?", "Can I return an unused item?", "qualifier"),
    ("Do you offer express shipping?", "Do you offer standard shipping?", "qualifier"),
    ("My order is late.", "My order is damaged.", "qualifier"),
    ("My package is missing.", "My package is damaged.", "qualifier"),
    ("Can I pay monthly?", "Can I pay annually?", "qualifier"),
    ("Why is my card declined?", "Why is my card locked?", "qualifier"),
    ("Can I delete my account temporarily?", "Can I delete my account permanently?", "qualifier"),
    ("Can I return sale items?", "Can I return full-price items?", "qualifier"),
    ("Can I cancel all my orders?", "Can I cancel just one of my orders?", "qualifier"),
    ("My order arrived late.", "My order arrived early.", "qualifier"),
    (
        "Is the refund sent to my original payment method automatically?",
        "Is the refund sent to my original payment method manually?",
        "qualifier",
    ),
    ("Can I upgrade to a cheaper plan?", "Can I upgrade to a faster plan?", "qualifier"),
    ("Can I order online and pick up in store?", "Can I order in store and get it delivered?", "qualifier"),
    ("My account was hacked.", "My account was locked.", "qualifier"),
    ("Can I send my order as a gift?", "Can I send my order to someone else?", "qualifier"),
    ("Is my old card still valid?", "Is my new card valid?", "qualifier"),
    ("Do you charge more for overnight delivery?", "Do you charge less for slow delivery?", "qualifier"),
    # the kind of question
    ("When will my refund arrive?", "Why hasn't my refund arrived?", "question"),
    ("When does my subscription renew?", "How do I renew my subscription?", "question"),
    ("How long does shipping take?", "How much does shipping cost?", "question"),
    ("When will I be charged?", "Why was I charged?", "question"),
    ("Who can see my profile?", "How do I change my profile?", "question"),
    ("When will my order ship?", "Why hasn't my order shipped?", "question"),
    ("How many devices can I use?", "Which devices can I use?", "question"),
    ("Why was my account suspended?", "When will my account be reactivated?", "question"),
    ("When is the sale ending?", "Why is the sale ending?", "question"),
    ("Who do I contact about a billing error?", "When will a billing error be fixed?", "question"),
    # a property or thing the strict check's lexicons do not know: only the
    # similarity threshold stands between these and a wrong answer (added after
    # the first measurement, to find where the threshold must sit; the lexicons
    # were deliberately not extended for them)
    ("Is the jacket waterproof?", "Is the jacket machine washable?", "attribute"),
    ("Does the phone come with a charger?", "Does the phone come with a case?", "attribute"),
    ("Is the soup vegan?", "Is the soup gluten-free?", "attribute"),
    ("Is the battery replaceable?", "Is the battery rechargeable?", "attribute"),
    ("Can I bring my dog to the hotel?", "Can I bring my cat to the hotel?", "attribute"),
    ("Is breakfast included in the room rate?", "Is parking included in the room rate?", "attribute"),
    ("Is the blender dishwasher safe?", "Is the blender noisy?", "attribute"),
    ("Does the sofa come assembled?", "Does the sofa come with cushions?", "attribute"),
    ("Does the cake contain nuts?", "Does the cake contain eggs?", "attribute"),
    ("Is the hotel pool heated?", "Is the hotel pool indoors?", "attribute"),
    ("Do the headphones support noise cancelling?", "Do the headphones support wireless charging?", "attribute"),
    ("Can I wash the rug?", "Can I vacuum the rug?", "attribute"),
    ("Is the mattress firm?", "Is the mattress soft?", "attribute"),
    ("Does the course include a certificate?", "Does the course include homework?", "attribute"),
    ("Is there a gym at the hotel?", "Is there a spa at the hotel?", "attribute"),
    ("Do you sell refurbished laptops?", "Do you sell gaming laptops?", "attribute"),
    ("Can I bring food on the plane?", "Can I bring liquids on the plane?", "attribute"),
    ("Does the car have cruise control?", "Does the car have a sunroof?", "attribute"),
    ("Is the table made of oak?", "Is the table made of pine?", "attribute"),
    ("Does the watch track sleep?", "Does the watch track steps?", "attribute"),
    ("Are the shoes true to size?", "Are the shoes comfortable?", "attribute"),
    ("Is the jacket warm enough for winter?", "Is the jacket warm enough for skiing?", "attribute"),
    ("Are the meal kits organic?", "Are the meal kits halal?", "attribute"),
    ("Does the printer scan?", "Does the printer fax?", "attribute"),
    ("Is the camera weatherproof?", "Is the camera shockproof?", "attribute"),
    ("Do you have vegetarian options?", "Do you have dairy-free options?", "attribute"),
    ("Can I pay in installments?", "Can I pay on delivery?", "attribute"),
    ("Is the apartment furnished?", "Is the apartment pet friendly?", "attribute"),
    ("Does the hotel have an airport shuttle?", "Does the hotel have room service?", "attribute"),
    ("Does the laptop have a backlit keyboard?", "Does the laptop have a touchscreen?", "attribute"),
    ("Is the coffee decaf?", "Is the coffee organic?", "attribute"),
    ("Is the tent lightweight?", "Is the tent windproof?", "attribute"),
    ("Is the sunscreen safe for sensitive skin?", "Is the sunscreen reef safe?", "attribute"),
    ("Can I wear the watch while swimming?", "Can I wear the watch while sleeping?", "attribute"),
    ("Does the vacuum work on carpets?", "Does the vacuum work on hardwood floors?", "attribute"),
    # unrelated (easy negatives: what most traffic looks like)
    ("What is your return policy?", "How do I reset my password?", "unrelated"),
    ("Do you ship to Canada?", "How do I cancel my subscription?", "unrelated"),
    ("Where is my order?", "Do you offer a student discount?", "unrelated"),
    ("How do I contact support?", "What payment methods do you accept?", "unrelated"),
    ("Can I pay with PayPal?", "My app keeps crashing.", "unrelated"),
    ("How long is the free trial?", "How do I change my email address?", "unrelated"),
    ("What are your opening hours?", "How do I delete my account?", "unrelated"),
    ("I was charged twice.", "How do I add a user to my team?", "unrelated"),
    ("Is the jacket waterproof?", "How do I turn on two-factor authentication?", "unrelated"),
    ("What is the baggage allowance?", "Can I change my delivery date?", "unrelated"),
]

# --------------------------------------------------------------------------- templated hard negatives
# Same sentence, one slot changed; several sentence shapes per slot so the set is
# not one template repeated.

ACTION_TEMPLATES = [
    "How do I {a} my {o}?",
    "Is it possible to {a} my {o}?",
    "I'd like to {a} my {o}, can you help?",
    "can i {a} my {o} online",
    "What's the easiest way to {a} my {o}?",
]
ACTION_SETS = {
    "subscription": ["cancel", "pause", "renew", "upgrade", "downgrade"],
    "order": ["cancel", "track", "change", "return"],
    "account": ["delete", "deactivate", "verify", "reactivate"],
    "card": ["activate", "freeze", "cancel", "replace"],
    "booking": ["cancel", "change", "confirm"],
}
OBJECT_TEMPLATES = [
    ("How do I {a} my {o}?", "change", ["email address", "username", "phone number", "password", "billing address"]),
    ("Can I {a} my {o} after it's placed?", "cancel", ["order", "hotel booking", "gym membership"]),
    ("Where do I {a} my {o}?", "download", ["invoice", "data", "statement"]),
    ("I need to {a} my {o}.", "reset", ["password", "PIN", "router"]),
    ("Can I {a} my {o} to someone else?", "transfer", ["subscription", "ticket", "gift card"]),
]
PRODUCT_TEMPLATES = [
    ("Does the {p} plan include priority support?", ["Pro", "Basic", "Premium", "Starter"]),
    ("Is the app available on {p}?", ["iPad", "Android tablets", "Apple TV", "Fire TV"]),
    ("Can I pay with {p}?", ["PayPal", "Klarna", "Venmo", "Bitcoin"]),
    ("How much does the {p} cost?", ["Pixel 8", "Galaxy S24", "iPhone 15 Pro"]),
    ("Do you have the {p} in stock?", ["Trailblazer backpack", "Summit backpack", "Voyager duffel"]),
    ("Is shipping free to {p}?", ["Canada", "Mexico", "Germany", "Japan"]),
]
NUMBER_TEMPLATES = [
    ("Can I return an item after {n} days?", ["14", "30", "45", "90"]),
    ("Is there a discount for {n} seats?", ["10", "25", "100"]),
    ("I need an update on order {n}.", ["88213", "88231", "82213"]),
    ("Can I change my flight {n} hours before departure?", ["2", "12", "24", "48"]),
    ("Do you have the dress in size {n}?", ["6", "8", "12"]),
    ("I was billed ${n} instead of the usual amount.", ["19.99", "29.99", "199.99"]),
]
PARAPHRASE_TEMPLATES = [
    # (question shapes that mean the same, slot values)
    (
        [
            "How do I {a} my {o}?",
            "How can I {a} my {o}?",
            "What do I need to do to {a} my {o}?",
            "Can you help me {a} my {o}?",
        ],
        [
            ("cancel", "subscription"),
            ("track", "order"),
            ("delete", "account"),
            ("verify", "email address"),
            ("freeze", "card"),
            ("renew", "membership"),
        ],
    ),
]


def _pairs_from_slots(
    templates: list[str], fill: dict[str, list[str]], slot: str, fixed: dict[str, str], rng: random.Random, k: int
) -> list[tuple[str, str]]:
    vals = fill[slot]
    combos = list(itertools.combinations(vals, 2))
    rng.shuffle(combos)
    out = []
    for x, y in combos[:k]:
        t = rng.choice(templates)
        out.append((t.format(**{**fixed, slot: x}), t.format(**{**fixed, slot: y})))
    return out


def build() -> list[dict[str, str]]:
    """pairs.jsonl's rows. All `dev`: the strict check was tuned on them (README.md)."""
    rng = random.Random(20240601)
    rows: list[tuple[str, str, str, str]] = []
    for group in GROUPS:
        combos = list(itertools.combinations(group, 2))
        rng.shuffle(combos)
        for a, b in combos[:3]:
            rows.append((a, b, "same", "paraphrase"))
    for a, b, cat in HARD:
        rows.append((a, b, "different", cat))
    for obj, acts in ACTION_SETS.items():
        for a, b in _pairs_from_slots(ACTION_TEMPLATES, {"a": acts}, "a", {"o": obj}, rng, 3):
            rows.append((a, b, "different", "action"))
    for tmpl, action, objs in OBJECT_TEMPLATES:
        combos = list(itertools.combinations(objs, 2))
        rng.shuffle(combos)
        for x, y in combos[:3]:
            rows.append((tmpl.format(a=action, o=x), tmpl.format(a=action, o=y), "different", "object"))
    for tmpl, products in PRODUCT_TEMPLATES:
        combos = list(itertools.combinations(products, 2))
        rng.shuffle(combos)
        for x, y in combos[:3]:
            cat = "place" if "free to" in tmpl else "product"
            rows.append((tmpl.format(p=x), tmpl.format(p=y), "different", cat))
    for tmpl, numbers in NUMBER_TEMPLATES:
        combos = list(itertools.combinations(numbers, 2))
        rng.shuffle(combos)
        for x, y in combos[:3]:
            rows.append((tmpl.format(n=x), tmpl.format(n=y), "different", "number"))
    for shapes, slots in PARAPHRASE_TEMPLATES:
        for a, o in slots:
            x, y = rng.sample(shapes, 2)
            rows.append((x.format(a=a, o=o), y.format(a=a, o=o), "same", "paraphrase"))
    seen = set()
    out = []
    for a, b, label, cat in rows:
        key = (a, b)
        if key in seen or a == b:
            continue
        seen.add(key)
        # The rows once carried a dev/test split by the id's hash; the "test" third was
        # consulted while the strict check was being fixed, so none of it is held out.
        out.append(
            {
                "id": pair_id(a, b),
                "a": a,
                "b": b,
                "label": label,
                "category": cat,
                "split": "dev",
                "domain": LEGACY_DOMAIN,
                "lang": "en",
            }
        )
    return out


# --------------------------------------------------------------------------- hand-written pairs

_LINE = re.compile(r"^(same|different) ([a-z_]+) \| (.+?) \| (.+)$")


def parse_written(path: Path, split: str) -> list[dict[str, str]]:
    """The pairs of one hand-written file (`written/<split>/<domain>.txt`); a malformed line is an error.

    Format: `@ <lang>` opens a block; `<same|different> <category> | <a> | <b>` is a pair;
    `#` lines and blank lines are ignored.
    """
    domain = path.stem
    if domain not in DOMAINS:
        raise ValueError(f"{path}: {domain!r} is not a domain (one of {', '.join(DOMAINS)})")
    lang = None
    out = []
    for no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path.parent.name}/{path.name}:{no}"
        if line.startswith("@"):
            lang = line[1:].strip()
            if lang not in LANGS:
                raise ValueError(f"{where}: language {lang!r} is not one of {', '.join(LANGS)}")
            continue
        m = _LINE.match(line)
        if not m or " | " in m.group(4):
            raise ValueError(f"{where}: expected '<same|different> <category> | <a> | <b>', got {raw!r}")
        if lang is None:
            raise ValueError(f"{where}: a pair before any '@ <lang>' line")
        label, category, a, b = m.groups()
        allowed = SAME_CATEGORIES if label == "same" else DIFFERENT_CATEGORIES
        if category not in allowed:
            raise ValueError(f"{where}: {category!r} is not a {label} category (one of {', '.join(allowed)})")
        # Exact text only: a pair may differ in nothing but accents or punctuation
        # ("sesion" / "sesión"), a real typo that near-duplicate checks would fold away.
        if a == b:
            raise ValueError(f"{where}: the two questions are the same text")
        out.append(
            {
                "id": pair_id(a, b),
                "a": a,
                "b": b,
                "label": label,
                "category": category,
                "split": split,
                "domain": domain,
                "lang": lang,
            }
        )
    return out


def build_written(folder_name: str, split: str) -> list[dict[str, str]]:
    """Every pair of `written/<folder_name>/`, in domain order, labelled `split`."""
    folder = WRITTEN / folder_name
    files = sorted(folder.glob("*.txt"), key=lambda p: DOMAINS.index(p.stem) if p.stem in DOMAINS else -1)
    if not files:
        raise ValueError(f"no hand-written pairs in {folder}")
    rows = [r for f in files for r in parse_written(f, split)]
    return rows


def check_disjoint(files: dict[str, list[dict[str, str]]]) -> None:
    """No id twice anywhere, and no test question (normalised) anywhere in the dev data."""
    problems = []
    seen: dict[str, str] = {}
    for name, rows in files.items():
        for r in rows:
            if r["id"] in seen:
                problems.append(f"id {r['id']} ({r['a']!r} / {r['b']!r}) is in {seen[r['id']]} and {name}")
            seen[r["id"]] = name
    dev_texts = {
        normalized(t) for name, rows in files.items() if name != "test" for r in rows for t in (r["a"], r["b"])
    }
    for r in files["test"]:
        for t in (r["a"], r["b"]):
            if normalized(t) in dev_texts:
                problems.append(f"test question {t!r} (pair {r['id']}) is also in the dev data")
    if problems:
        raise ValueError("\n  ".join(["the splits overlap:", *problems]))


def render(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps({k: r[k] for k in FIELDS}, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def outputs() -> dict[Path, bytes]:
    files = {
        "pairs": build(),
        "dev_more": build_written("dev_more", "dev"),
        "dev_retired_test": build_written("dev_retired_test", "dev"),
        "test": build_written("test", "test"),
    }
    check_disjoint(files)
    return {
        OUT: render(files["pairs"]),
        DEV_MORE_OUT: render(files["dev_more"]),
        RETIRED_OUT: render(files["dev_retired_test"]),
        TEST_OUT: render(files["test"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Write pairs.jsonl, dev_more.jsonl, dev_retired_test.jsonl and test.jsonl."
    )
    ap.add_argument("--check", action="store_true", help="only compare the files on disk with what the sources give")
    args = ap.parse_args()
    try:
        out = outputs()
    except ValueError as exc:
        print(f"make_pairs: {exc}", file=sys.stderr)
        return 1
    if args.check:
        stale = [p.name for p, data in out.items() if not p.exists() or p.read_bytes() != data]
        if stale:
            print(f"out of date with their sources: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("pairs.jsonl, dev_more.jsonl, dev_retired_test.jsonl and test.jsonl match their sources")
        return 0
    for path, data in out.items():
        path.write_bytes(data)
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        by: dict[tuple[str, str], int] = {}
        for r in rows:
            by[(r["label"], r["category"])] = by.get((r["label"], r["category"]), 0) + 1
        digest = hashlib.sha256(data).hexdigest()
        print(f"{len(rows)} pairs -> {path.name} (sha256 {digest})")
        for k in sorted(by):
            print(f"  {k[0]:9} {k[1]:19} {by[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
