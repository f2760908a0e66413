"""The strict check behind a semantic hit: do two questions ask the same thing?

Embeddings place "cancel my order" and "cancel my subscription", "refund for
order 1234" and "refund for order 1235", "I was charged" and "I was not
charged" within a few hundredths of each other. So a
nearest neighbour above the similarity threshold is only a candidate: it is
served when its question and the new one also agree, exactly, on

* numbers: amounts, quantities, ids, codes, times, ordinals ("2nd", "second");
* negation: whether the question is negated (not, never, no, without, can't...);
* named things: plans, products, brands, places, months (capitalised words that
  do not open a sentence, all-caps acronyms, and known names in any case), with
  their direction when the question has one ("from Basic to Pro");
* the action asked for, as a canonical verb class (cancel, pause, upgrade,
  refund, return, track, reset, delete, ...);
* the thing acted on (order, subscription, account, password, card, ...);
* qualifiers that change the answer (before/after, damaged/late/missing,
  international, monthly/annual, all, partial...), and the kind of question
  (when, why, who, how many).

Synonyms map to one class ("terminate" and "cancel"; "parcel" and "order";
"money back" and "refund"), so paraphrases still agree. Everything else in the
question (fillers, greetings, word order) is left to the embedding. The check is
deliberately conservative: a paraphrase it cannot see through is a miss (a call
to the model), never a wrong answer.

A question's `Signature` is computed once, when its answer is stored, and kept
with the vector, so a lookup computes only the new question's.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import orjson

# Part of every cache generation: a changed check never reads signatures made by an older one.
VERIFY_VERSION = 1

# --------------------------------------------------------------------------- lexicons
#
# Each maps a word or phrase (lower case, after contractions are expanded) to a
# canonical class. Phrases are matched before single words, longest first.

_ACTIONS: dict[str, tuple[str, ...]] = {
    "cancel": ("cancel", "cancellation", "terminate", "termination", "stop", "discontinue", "end my", "end our"),
    "pause": ("pause", "suspend", "freeze", "put on hold", "on hold", "take a break", "hold my"),
    "resume": ("resume", "unpause", "reactivate", "reinstate", "restart", "unfreeze", "turn back on"),
    "upgrade": ("upgrade", "move up"),
    "downgrade": ("downgrade",),
    "renew": ("renew", "renewal", "autorenew", "auto-renew", "auto renew", "auto-renewal", "autorenewal"),
    "refund": ("refund", "reimburse", "reimbursement", "money back", "get my money"),
    "return": (
        "return",
        "send back",
        "send it back",
        "ship back",
        "send them back",
        "send an item back",
        "send the item back",
    ),
    "exchange": ("exchange", "swap", "replace", "replacement"),
    "track": ("track", "tracking", "where is", "where my", "status of", "tracking number"),
    "change": ("change", "update", "edit", "modify", "switch", "correct", "amend", "alter"),
    "reset": (
        "reset",
        "forgot my",
        "forgot the",
        "forgot password",
        "forgotten password",
        "forgot your",
        "recover",
        "recovery",
    ),
    "delete": ("delete", "deletion", "remove", "erase", "close my", "close an", "close the", "get rid of"),
    "deactivate": ("deactivate", "deactivation"),
    "enable": ("enable", "activate", "activation", "turn on", "switch on"),
    "disable": ("disable", "turn off", "switch off"),
    "add": ("add", "attach", "include", "invite"),
    "connect": ("connect", "link", "sync", "integrate", "pair"),
    "disconnect": ("disconnect", "unlink", "unpair"),
    "signup": (
        "sign up",
        "signup",
        "register",
        "registration",
        "create an account",
        "open an account",
        "make an account",
        "enroll",
        "join",
    ),
    "login": ("log in", "login", "log into", "sign in", "signin", "sign into", "access"),
    "logout": ("log out", "logout", "sign out", "signout"),
    "pay": ("pay", "paid", "paying"),
    "charge": ("charge", "charged", "billed", "bill me", "overcharged", "charging"),
    "price": ("price", "pricing", "cost", "fee", "how much"),
    "buy": ("buy", "place an order", "place my order"),
    "download": ("download", "export", "copy of"),
    "install": ("install", "installation", "set up", "setup"),
    "uninstall": ("uninstall",),
    "contact": (
        "contact",
        "talk to",
        "speak to",
        "speak with",
        "talk with",
        "get in touch",
        "reach",
        "call",
        "chat with",
    ),
    "transfer": ("transfer", "move", "migrate", "wire"),
    "verify": ("verify", "verification", "confirm", "confirmation"),
    "unsubscribe": ("unsubscribe", "opt out", "opt-out", "stop sending", "stop emailing"),
    "subscribe": ("subscribe",),
    "apply": ("apply", "redeem"),
    "share": ("share",),
    "extend": ("extend", "extension"),
    "report": ("report", "dispute", "complain", "complaint"),
    "compare": ("compare", "comparison", "difference between", "versus", "vs"),
    "view": ("view", "see", "find", "look up", "look at", "locate"),
    "print": ("print",),
    "book": ("book", "reserve", "schedule"),
    "reschedule": ("reschedule", "postpone"),
    "sell": ("sell",),
}

_OBJECTS: dict[str, tuple[str, ...]] = {
    "order": (
        "order",
        "package",
        "parcel",
        "shipment",
        "my purchase",
        "the purchase",
        "a purchase",
        "this purchase",
        "your purchase",
        "delivery box",
    ),
    "item": ("item", "product", "goods"),
    "subscription": ("subscription", "membership", "plan", "phone plan", "mobile plan"),
    "account": ("account", "profile"),
    "password": ("password", "passcode", "passphrase", "credentials"),
    "pin": ("pin",),
    "username": ("username", "user name", "user id", "login name"),
    "email": ("email", "e-mail", "email address", "e-mail address"),
    "newsletter": (
        "newsletter",
        "marketing email",
        "promotional email",
        "marketing emails",
        "promotional emails",
        "mailing list",
    ),
    "notification": ("notification", "alert", "push notification"),
    "phone": ("phone number", "mobile number", "cell number", "phone"),
    "address": ("address",),
    "billing": ("billing",),
    "shipping": ("shipping", "ship", "deliver", "delivery", "postage"),
    "card": ("card", "credit card", "debit card", "bank card"),
    "giftcard": ("gift card", "gift certificate", "giftcard"),
    "payment": ("payment", "payment method", "payment info", "payment details", "billing info", "billing details"),
    "invoice": ("invoice", "receipt", "bill"),
    "statement": ("statement", "bank statement"),
    "trial": ("trial", "free trial"),
    "coupon": (
        "coupon",
        "promo code",
        "discount code",
        "promotional code",
        "voucher",
        "voucher code",
        "coupon code",
        "discount",
        "promo",
    ),
    "warranty": ("warranty", "guarantee"),
    "app": ("app", "application", "mobile app"),
    "website": ("website", "site", "web site", "webpage"),
    "2fa": (
        "2fa",
        "two-factor",
        "two factor",
        "mfa",
        "2-step",
        "two-step",
        "authenticator",
        "two factor authentication",
        "two-factor authentication",
    ),
    "cart": ("cart", "basket", "checkout"),
    "wishlist": ("wishlist", "wish list"),
    "review": ("review", "rating"),
    "size": ("size",),
    "color": ("color", "colour"),
    "data": ("data",),
    "storage": ("storage", "space", "disk space"),
    "history": ("history", "order history", "purchase history"),
    "seat": ("seat", "license", "licence"),
    "member": ("member", "user", "teammate", "employee", "staff"),
    "spouse": ("wife", "husband", "partner", "spouse"),
    "child": ("kid", "child", "children", "son", "daughter"),
    "parent": ("parent", "mom", "dad", "mother", "father"),
    "friend": ("friend",),
    "device": ("device",),
    "tablet": ("tablet",),
    "laptop": ("laptop", "computer", "pc"),
    "tv": ("tv", "television", "smart tv"),
    "router": ("router", "modem"),
    "internet": ("internet", "wifi", "wi-fi", "connection", "network", "broadband"),
    "sim": ("sim", "sim card", "esim"),
    "flight": ("flight",),
    "booking": ("booking", "reservation"),
    "ticket": ("ticket",),
    "baggage": ("baggage", "luggage", "bag", "suitcase"),
    "hotel": ("hotel", "room"),
    "loan": ("loan", "mortgage"),
    "limit": ("limit", "credit limit", "spending limit"),
    "balance": ("balance",),
    "atm": ("atm", "cash machine"),
    "appointment": ("appointment",),
    "store": ("store", "shop", "branch", "location", "in-store", "in store"),
    "agent": ("agent", "human", "representative", "person", "customer service", "support team", "support", "someone"),
    "key": ("key", "license key", "api key"),
    "file": ("file", "document", "attachment", "folder"),
    "photo": ("photo", "picture", "image"),
    "backup": ("backup",),
    "language": ("language",),
    "currency": ("currency",),
    "timezone": ("timezone", "time zone"),
    "name": ("name", "display name"),
    "team": ("team", "workspace", "organization", "organisation", "company account"),
    "points": ("points", "reward", "rewards", "loyalty", "miles"),
    "credit": ("credit", "store credit", "credits"),
    "gift": ("gift",),
    "return_label": ("return label", "shipping label", "label"),
}

_MODIFIERS: dict[str, tuple[str, ...]] = {
    "before": ("before", "prior to", "ahead of"),
    "after": ("after", "once"),
    "early": ("early", "earlier"),
    "late": ("late", "later", "delayed", "delay", "overdue"),
    "today": ("today",),
    "tomorrow": ("tomorrow",),
    "yesterday": ("yesterday",),
    "tonight": ("tonight",),
    "weekend": ("weekend",),
    "immediately": ("immediately", "right away", "right now", "instantly"),
    "end_of_period": (
        "end of the month",
        "end of the billing period",
        "end of my billing period",
        "end of the period",
        "end of the cycle",
        "end of the year",
    ),
    "monthly": ("monthly", "per month", "a month", "month-to-month"),
    "annual": ("annual", "annually", "yearly", "per year", "a year"),
    "weekly": ("weekly", "per week"),
    "daily": ("daily", "per day", "a day"),
    "lifetime": ("lifetime",),
    "international": ("international", "internationally", "abroad", "overseas", "outside the us", "another country"),
    "domestic": ("domestic", "domestically", "locally"),
    "all": ("all", "both", "every", "everything", "entire", "whole"),
    "partial": ("partial", "partially", "part of"),
    "full": ("full", "fully", "completely"),
    "many": ("multiple", "several", "many", "more than one"),
    "more": ("more", "extra", "additional", "increase", "higher", "raise"),
    "less": ("less", "fewer", "decrease", "lower", "reduce"),
    "cheaper": ("cheaper", "cheapest", "less expensive"),
    "faster": ("faster", "fastest", "express", "expedited", "quicker", "overnight", "next-day", "next day"),
    "damaged": ("damaged", "broken", "cracked", "defective", "faulty", "dented", "smashed", "torn"),
    "wrong": ("wrong", "incorrect", "mistaken"),
    "missing": ("missing", "lost", "lose", "losing", "never came"),
    "stolen": ("stolen",),
    "expired": ("expired", "expire", "expiring", "expiry", "expiration"),
    "declined": ("declined", "rejected", "denied", "failed", "failing", "bounced"),
    "locked": ("locked", "blocked", "suspended", "banned", "locked out", "disabled"),
    "hacked": ("hacked", "compromised", "breached", "unauthorized", "fraudulent", "fraud", "scam"),
    "slow": ("slow", "slowly", "lagging", "laggy"),
    "online": ("online", "on the website", "on your website", "on the site", "web"),
    "permanent": ("permanent", "permanently", "forever", "for good"),
    "temporary": ("temporary", "temporarily", "for a while", "for a few months", "for now"),
    "auto": ("automatic", "automatically"),
    "manual": ("manual", "manually"),
    "new": ("new", "newer", "latest"),
    "old": ("old", "older", "previous", "former"),
    "other_person": ("someone else", "another person", "somebody else", "other person", "for someone"),
    "as_gift": ("as a gift",),
    "used": ("used", "opened", "worn"),
    "unused": ("unused", "unopened", "sealed", "unworn"),
    "sale": ("sale", "clearance", "on sale", "discounted"),
    "in_stock": ("in stock", "available in stock", "back in stock"),
    "out_of_stock": ("out of stock", "sold out", "unavailable"),
    "duplicate": ("twice", "double", "duplicate", "two times"),
    "usd": ("$", "usd", "dollar", "dollars", "bucks"),
    "eur": ("€", "eur", "euro", "euros"),
    "gbp": ("£", "gbp", "pound", "pounds", "quid"),
    "gb": ("gb", "gigabyte", "gigabytes"),
    "mb": ("mb", "megabyte", "megabytes"),
    "tb": ("tb", "terabyte", "terabytes"),
    "kg": ("kg", "kilo", "kilos", "kilogram", "kilograms"),
    "lb": ("lb", "lbs", "pound weight"),
    "percent": ("%", "percent", "per cent"),
    "minute": ("minute", "minutes", "min", "mins"),
    "hour": ("hour", "hours", "hr", "hrs"),
    "day": ("day", "days", "business day", "business days", "working day", "working days"),
    "week": ("week", "weeks"),
    "month": ("month", "months"),
    "year": ("year", "years"),
    "time_unit": ("times",),
    "employer": ("work email", "company email"),
}

# Named things known in lower case (users do not always capitalise).
_KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    # plans and tiers
    "pro": ("pro",),
    "premium": ("premium",),
    "basic": ("basic",),
    "plus": ("plus",),
    "free": ("free", "for free", "free of charge", "no charge", "at no cost"),
    "enterprise": ("enterprise",),
    "business": ("business",),
    "family": ("family",),
    "student": ("student", "students"),
    "starter": ("starter",),
    "standard": ("standard",),
    "individual": ("individual",),
    "personal": ("personal",),
    "ultimate": ("ultimate",),
    "lite": ("lite",),
    "gold": ("gold",),
    "silver": ("silver",),
    "platinum": ("platinum",),
    "teacher": ("teacher", "teachers", "educator"),
    "military": ("military", "veteran", "veterans"),
    "senior": ("senior", "seniors"),
    "nonprofit": ("nonprofit", "non-profit", "charity"),
    # platforms, payment and shipping brands
    "ios": ("ios",),
    "android": ("android",),
    "iphone": ("iphone",),
    "ipad": ("ipad",),
    "mac": ("mac", "macbook", "macos"),
    "windows": ("windows",),
    "linux": ("linux",),
    "chrome": ("chrome",),
    "firefox": ("firefox",),
    "safari": ("safari",),
    "paypal": ("paypal",),
    "apple pay": ("apple pay", "applepay"),
    "google pay": ("google pay", "gpay"),
    "visa": ("visa",),
    "mastercard": ("mastercard",),
    "amex": ("amex", "american express"),
    "venmo": ("venmo",),
    "klarna": ("klarna",),
    "afterpay": ("afterpay",),
    "bitcoin": ("bitcoin", "crypto", "cryptocurrency"),
    "ups": ("ups",),
    "fedex": ("fedex",),
    "dhl": ("dhl",),
    "usps": ("usps",),
    "royal mail": ("royal mail",),
    "amazon": ("amazon",),
    "alexa": ("alexa",),
    "roku": ("roku",),
    "xbox": ("xbox",),
    "playstation": ("playstation", "ps5", "ps4"),
    "slack": ("slack",),
    "zoom": ("zoom",),
    "google": ("google",),
    "outlook": ("outlook",),
    "gmail": ("gmail",),
    "facebook": ("facebook",),
    "apple": ("apple",),
    "microsoft": ("microsoft",),
    "sso": ("sso", "single sign-on", "single sign on"),
    "api": ("api",),
    "vpn": ("vpn",),
    "bank account": ("bank account",),
    "cash": ("cash",),
    "check": ("cheque",),
    "wire": (),
    # places
    "canada": ("canada",),
    "usa": ("usa", "united states", "the us", "america"),
    "uk": ("uk", "united kingdom", "britain", "england"),
    "mexico": ("mexico",),
    "germany": ("germany",),
    "france": ("france",),
    "spain": ("spain",),
    "italy": ("italy",),
    "ireland": ("ireland",),
    "australia": ("australia",),
    "new zealand": ("new zealand",),
    "japan": ("japan",),
    "china": ("china",),
    "india": ("india",),
    "brazil": ("brazil",),
    "netherlands": ("netherlands", "holland"),
    "sweden": ("sweden",),
    "norway": ("norway",),
    "switzerland": ("switzerland",),
    "poland": ("poland",),
    "eu": ("eu", "europe", "european union"),
    "alaska": ("alaska",),
    "hawaii": ("hawaii",),
    "puerto rico": ("puerto rico",),
    "london": ("london",),
    "paris": ("paris",),
    "berlin": ("berlin",),
    "new york": ("new york", "nyc"),
    "chicago": ("chicago",),
    "toronto": ("toronto",),
    "sydney": ("sydney",),
    "tokyo": ("tokyo",),
    "madrid": ("madrid",),
    "dublin": ("dublin",),
    "boston": ("boston",),
    "seattle": ("seattle",),
    "texas": ("texas",),
    "california": ("california",),
    "florida": ("florida",),
    # months and days
    "january": ("january",),
    "february": ("february",),
    "march": (),
    "april": ("april",),
    "june": ("june",),
    "july": ("july",),
    "august": ("august",),
    "september": ("september",),
    "october": ("october",),
    "november": ("november",),
    "december": ("december",),
    "monday": ("monday",),
    "tuesday": ("tuesday",),
    "wednesday": ("wednesday",),
    "thursday": ("thursday",),
    "friday": ("friday",),
    "saturday": ("saturday",),
    "sunday": ("sunday",),
    "christmas": ("christmas", "xmas"),
    "black friday": ("black friday",),
}

_QUESTION: dict[str, tuple[str, ...]] = {
    "when": ("when", "how long", "what time", "what date", "which day", "how soon", "how many days"),
    "why": ("why", "how come", "what is the reason", "reason for"),
    "who": ("who",),
    "quantity": ("how many", "how much data", "how much storage", "how much space", "how much time"),
}

# Removed before anything else: phrases whose words would read as something they are not.
_NOISE_PHRASES = (
    "not sure",
    "no idea",
    "whether or not",
    "or not",
    "no problem",
    "no worries",
    "not only",
    "thank you",
    "thanks",
    "no rush",
    "how do i",
    "how can i",
    "is it possible",
    "is there a way",
    "i would like",
    "i want to",
    "i need to",
    "i'd like",
    "please",
    "quick question",
    "for some reason",
    "at all",
    "in advance",
    "as soon as possible",
    "every time",
    "each time",
    "all the time",
    "bought",
    "booked",
    "purchased",
    "ordered",
)

_NEGATIONS = frozenset(
    {
        "not",
        "no",
        "never",
        "none",
        "nothing",
        "nobody",
        "nowhere",
        "neither",
        "nor",
        "without",
        "cannot",
        "unable",
        "dont",
        "didnt",
        "doesnt",
        "cant",
        "wont",
        "isnt",
        "havent",
        "hasnt",
        "wasnt",
        "werent",
        "arent",
        "shouldnt",
        "couldnt",
        "wouldnt",
        "aint",
        "no longer",
    }
)

_NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
    "dozen": 12,
    "half": 0.5,
    "single": 1,
    "couple": 2,
}
_ORDINALS = {
    "first": 1,
    "second": 2,
    "third": 3,
    "fourth": 4,
    "fifth": 5,
    "sixth": 6,
    "seventh": 7,
    "eighth": 8,
    "ninth": 9,
    "tenth": 10,
}
# "one" is a number unless a determiner makes it a pronoun ("this one", "which one").
_ONE_PRONOUN_BEFORE = frozenset(
    {
        "this",
        "that",
        "which",
        "the",
        "any",
        "every",
        "each",
        "another",
        "other",
        "no",
        "some",
        "a",
        "an",
        "new",
        "old",
        "right",
        "wrong",
    }
)

_ASKING = frozenset(
    {
        "know",
        "tell",
        "wondering",
        "wonder",
        "ask",
        "asking",
        "me",
        "idea",
        "sure",
        "out",
        "say",
        "explain",
        "and",
        "but",
        "so",
    }
)
_PRICE_FOLLOWERS = frozenset(
    {
        "is",
        "are",
        "was",
        "does",
        "do",
        "did",
        "will",
        "would",
        "should",
        "can",
        "could",
        "to",
        "for",
        "it",
        "money",
        "extra",
        "more",
        "less",
        "am",
    }
)
_PLAN_WORDS = frozenset({"plan", "plans", "tier", "tiers", "membership", "subscription", "package"})
_DETERMINERS = frozenset({"the", "a", "an", "my", "our", "your", "their", "his", "her", "this", "that", "its"})
_DIRECTION = frozenset({"from", "to", "into"})

# Words that may open a sentence capitalised without naming anything.
_COMMON = frozenset(
    """
    a about above after again against all also am an and any anyone anything are as at back be because been before
    being below between both but by can could did do does doing done down during each else even ever every few for
    from further get gets getting give go going gone got had has have having he her here hers herself him himself his
    how however i if in into is it its itself just kindly let like made make many may me might mine more most much must
    my myself need needs new next no nor not now of off ok okay on once only or other our ours ourselves out over own
    per please quick quickly really regarding same she should since so some someone something soon still such than
    thank thanks that the their theirs them themselves then there these they this those through to too under until up
    upon us very via want wanted wants was we well were what whats when whenever where whether which while who whom
    whose why will with within would yes yet you your yours yourself yourselves hi hello hey dear good morning
    afternoon evening greetings help hmm um uh urgent question sorry excuse tell show explain describe say answer
    ask asking wondering wonder know knew think thought trying tried try able unable possible way ways okay
    any anybody everyone everybody nobody none nothing something anything sure just actually basically also
    still already yet again currently recently today yesterday tomorrow please thanks ok is are am was were
    does did do has have had can could should would will shall may might must
    im ive id youre theyre issue issues problem problems trouble customer unfortunately apparently hopefully
    lately last next usually sometimes maybe perhaps anyway btw fyi wait great awesome hiya guys folks
    earlier morning weird strange odd hello hey dear regards cheers question questions hopefully
    """.split()
)

_WORD_RE = re.compile(r"[$€£%]|#?[A-Za-z0-9][A-Za-z0-9]*(?:[-'’./:,/][A-Za-z0-9]+)*|[.!?;:\n\"()]")
_HAS_DIGIT = re.compile(r"\d")
_PURE_NUMBER = re.compile(r"^\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^\d+(?:\.\d+)?$")
_ORDINAL_RE = re.compile(r"^(\d+)(?:st|nd|rd|th)$")
_TIME_RE = re.compile(r"^(\d{1,2})(?::(\d{2}))?(am|pm)$|^(\d{1,2}):(\d{2})$")
_UNIT_SUFFIX_RE = re.compile(r"^(\d+(?:\.\d+)?)(gb|mb|tb|kg|lbs?|k|m|x|%)$")
_SENTENCE_END = frozenset({".", "!", "?", "\n", ";", ":", '"', "("})


def _build_phrases() -> tuple[dict[tuple[str, ...], tuple[str, str]], int]:
    table: dict[tuple[str, ...], tuple[str, str]] = {}

    def add(kind: str, lex: dict[str, tuple[str, ...]]) -> None:
        for canon, words in lex.items():
            for w in words:
                key = tuple(w.split())
                table.setdefault(key, (kind, canon))

    # Order matters for words in two lexicons: the first kind wins.
    add("question", _QUESTION)
    add("modifier", _MODIFIERS)
    add("name", _KNOWN_NAMES)
    add("object", _OBJECTS)
    add("action", _ACTIONS)
    return table, max(len(k) for k in table)


_PHRASES, _MAX_PHRASE = _build_phrases()
_NOISE = tuple(tuple(p.split()) for p in sorted(_NOISE_PHRASES, key=lambda p: -len(p.split())))


def _stems(w: str) -> list[str]:
    """Crude inflection stripping, only for lexicon look-ups (so "cancelled" finds "cancel")."""
    out = []
    if w.endswith("ies") and len(w) > 4:
        out.append(w[:-3] + "y")
    if w.endswith("es") and len(w) > 3:
        out.append(w[:-2])
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        out.append(w[:-1])
    if w.endswith("ied") and len(w) > 4:
        out.append(w[:-3] + "y")
    if w.endswith("ed") and len(w) > 4:
        out.append(w[:-2])
        out.append(w[:-1])
        if len(w) > 5 and w[-3] == w[-4]:
            out.append(w[:-3])  # cancelled -> cancel
    if w.endswith("ing") and len(w) > 5:
        out.append(w[:-3])
        out.append(w[:-3] + "e")
        if w[-4] == w[-5]:
            out.append(w[:-4])  # cancelling -> cancel
    return out


@dataclass(frozen=True, slots=True)
class Signature:
    numbers: tuple[str, ...]
    negated: bool
    names: frozenset[str]
    actions: frozenset[str]
    objects: frozenset[str]
    modifiers: frozenset[str]
    question: str
    rest: frozenset[str] = frozenset()  # content words no rule explains (stemmed)

    def to_json(self) -> bytes:
        raw = orjson.dumps(
            [
                list(self.numbers),
                self.negated,
                sorted(self.names),
                sorted(self.actions),
                sorted(self.objects),
                sorted(self.modifiers),
                self.question,
                sorted(self.rest),
            ]
        )
        return bytes(memoryview(raw))  # right-sized: orjson's bytes keep a 4 KiB buffer, and the index keeps these

    @classmethod
    def from_json(cls, raw: bytes | str) -> Signature:
        n, neg, names, acts, objs, mods, q, rest = orjson.loads(raw)
        return cls(
            tuple(n), bool(neg), frozenset(names), frozenset(acts), frozenset(objs), frozenset(mods), q, frozenset(rest)
        )

    def describe(self) -> dict[str, object]:
        return {
            "numbers": list(self.numbers),
            "negated": self.negated,
            "names": sorted(self.names),
            "actions": sorted(self.actions),
            "objects": sorted(self.objects),
            "modifiers": sorted(self.modifiers),
            "question": self.question,
            "rest": sorted(self.rest),
        }


def disagreement(a: Signature, b: Signature) -> str | None:
    """None when the two questions agree; else what they differ on (a metric label)."""
    if a.numbers != b.numbers:
        return "number"
    if a.negated != b.negated:
        return "negation"
    if a.names != b.names:
        return "named_thing"
    if a.actions != b.actions:
        return "action"
    # The things acted on: one question may name more context than the other
    # ("change the card on my account" ~ "change my card"), but never another thing.
    if not (a.objects <= b.objects or b.objects <= a.objects):
        return "object"
    if a.modifiers != b.modifiers:
        return "qualifier"
    if a.question != b.question:
        return "question"
    # One unexplained word swapped for another ("waterproof" / "machine washable",
    # "dog" / "cat"): the lexicons cannot say whether they mean the same, so they do not.
    # A word only one side has is context ("my new phone"), not a swap.
    if (a.rest - b.rest) and (b.rest - a.rest):
        return "content"
    return None


# --------------------------------------------------------------------------- extraction


@dataclass(slots=True)
class _Tok:
    low: str
    orig: str
    start: bool  # opens a sentence


def _expand(word: str) -> list[str]:
    """Contractions: don't -> do not; what's -> what is; account's -> account."""
    w = word.replace("’", "'")
    low = w.lower()
    if "'" not in low:
        return [w]
    if low.endswith("n't"):
        base = w[:-3]
        b = base.lower()
        if b == "wo":
            base = "will"
        elif b == "ca":
            base = "can"
        elif b == "sha":
            base = "shall"
        return [base, "not"]
    head, _, tail = w.rpartition("'")
    if tail.lower() == "s" and head.lower() in {
        "what",
        "where",
        "who",
        "how",
        "it",
        "that",
        "there",
        "here",
        "when",
        "why",
        "he",
        "she",
    }:
        return [head, "is"]
    if tail.lower() in {"s", "re", "ve", "ll", "d", "m", ""}:
        return [head]
    return [w]


def _tokens(text: str) -> list[_Tok]:
    text = unicodedata.normalize("NFKC", text)
    out: list[_Tok] = []
    start = True
    for m in _WORD_RE.finditer(text):
        raw = m.group(0)
        if raw in _SENTENCE_END:
            start = True
            continue
        if raw.endswith((".", ",", ":")):
            raw = raw.rstrip(".,:")
        for piece in _expand(raw):
            if not piece:
                continue
            out.append(_Tok(piece.lower(), piece, start))
            start = False
    return out


def _number(tok: str) -> str | None:
    t = tok.lstrip("#")
    if _PURE_NUMBER.match(t):
        v = float(t.replace(",", ""))
        return str(int(v)) if v == int(v) else repr(v)
    m = _ORDINAL_RE.match(t)
    if m:
        return "ord" + m.group(1)
    m = _TIME_RE.match(t)
    if m:
        if m.group(3):
            h = int(m.group(1)) % 12 + (12 if m.group(3) == "pm" else 0)
            return f"t{h:02d}:{m.group(2) or '00'}"
        return f"t{int(m.group(4)):02d}:{m.group(5)}"
    return None


@lru_cache(maxsize=8192)
def signature(text: str) -> Signature:
    toks = _tokens(text)
    title_case = _mostly_capitalised(toks)
    lows = [t.low for t in toks]

    numbers: list[tuple[str, str]] = []  # (direction, value)
    names: list[tuple[str, str]] = []
    actions: set[str] = set()
    objects: set[str] = set()
    modifiers: set[str] = set()
    question = ""
    negations = 0
    rest: set[str] = set()

    def direction(i: int) -> str:
        j = i - 1
        if j >= 0 and lows[j] in _DETERMINERS:
            j -= 1
        if j >= 0 and lows[j] in ("plan", "tier"):
            j -= 1
        return "to" if j >= 0 and lows[j] in ("to", "into") else ("from" if j >= 0 and lows[j] == "from" else "")

    i = 0
    n = len(toks)
    prev_kind, prev_end = "", -1
    while i < n:
        # noise phrases first
        skip = 0
        for p in _NOISE:
            if tuple(lows[i : i + len(p)]) == p:
                skip = len(p)
                break
        if skip:
            i += skip
            continue
        low, tok = lows[i], toks[i]
        # negation (before lexicons: "no longer", "not")
        if low in _NEGATIONS:
            negations += 1
            i += 1
            continue
        if low == "no" or (low == "longer" and i and lows[i - 1] == "no"):
            i += 1
            continue
        # lexicon phrases, longest first
        matched = False
        for size in range(min(_MAX_PHRASE, n - i), 0, -1):
            key = tuple(lows[i : i + size])
            hit = _PHRASES.get(key)
            if hit is None and size == 1:
                for s in _stems(low):
                    hit = _PHRASES.get((s,))
                    if hit is not None:
                        break
            if hit is None:
                continue
            kind, canon = hit
            last_kind, last_end = prev_kind, prev_end
            prev_kind, prev_end = kind, i + size
            if kind == "question":
                # Only in question position: "when travelling" or "where, when I..." is a clause.
                asked = tok.start or i + size >= n or toks[i + size].start or (i and lows[i - 1] in _ASKING)
                if asked and (canon == "quantity" or not question):
                    question = canon
            elif kind == "modifier":
                modifiers.add(canon)
            elif kind == "name":
                names.append((direction(i), canon))
            elif kind == "object":
                if not (canon == "subscription" and key[-1] in _PLAN_WORDS and last_kind == "name" and last_end == i):
                    objects.add(canon)
            else:
                if canon == "price" and key == ("how", "much") and i + 2 < n and lows[i + 2] not in _PRICE_FOLLOWERS:
                    question = "quantity"  # "how much luggage": an amount of something, not a price
                elif canon == "buy" and key in (("purchase",), ("purchased",), ("purchasing",)):
                    actions.add("buy")
                else:
                    actions.add(canon)
            i += size
            matched = True
            break
        if matched:
            continue
        # numbers, codes, times
        if _HAS_DIGIT.search(low):
            num = _number(low)
            if num is None:
                m = _UNIT_SUFFIX_RE.match(low)
                if m:
                    num = _number(m.group(1))
                    unit = m.group(2)
                    modifiers.add({"lbs": "lb", "%": "percent"}.get(unit, unit))
            numbers.append((direction(i), num if num is not None else "code:" + low.lstrip("#")))
            i += 1
            continue
        if low in _NUMBER_WORDS and not (
            low == "one" and ((i and lows[i - 1] in _ONE_PRONOUN_BEFORE) or (i + 1 < n and lows[i + 1] == "of"))
        ):
            if not (low == "couple" and i + 1 < n and lows[i + 1] != "of"):
                v = _NUMBER_WORDS[low]
                numbers.append((direction(i), str(int(v)) if v == int(v) else repr(v)))
                i += 1
                continue
        if low in _ORDINALS and not (low == "second" and i and lows[i - 1] in ("a", "per", "one")):
            numbers.append(("", f"ord{_ORDINALS[low]}"))
            i += 1
            continue
        # "purchase": a thing after a determiner (my purchase), else the act
        if low in ("purchase", "purchases", "purchased", "purchasing"):
            if i and lows[i - 1] in _DETERMINERS:
                objects.add("order")
            else:
                actions.add("buy")
            i += 1
            continue
        # capitalised names and acronyms
        o = tok.orig
        if o[:1].isupper() and low not in ("i",) and not title_case:
            is_acronym = len(o) >= 2 and o.isupper() and o.isalpha()
            if (
                is_acronym
                or (not tok.start and low not in _COMMON)
                or (tok.start and low not in _COMMON and not _looks_like_verb(low))
            ):
                names.append((direction(i), low))
                i += 1
                continue
        word = low.replace("'", "").replace("-", "")  # gluten-free -> glutenfree
        if word.isalpha() and len(word) > 2 and word not in _COMMON and word not in _GENERIC:
            stem = _norm(word)
            if stem not in _GENERIC:
                rest.add(stem)
        i += 1

    # Direction matters only when the question has a source ("from Basic to Pro");
    # "upgrade to Pro" and "I want Pro" name the same thing.
    has_from = any(d == "from" for d, _ in numbers + names)
    # Numbers keep their order: "ordered 3, got 2" is not "ordered 2, got 3".
    num_seq = tuple((f"{d}:{v}" if d and has_from else v) for d, v in numbers)
    name_set = frozenset((f"{d}:{v}" if d and has_from else v) for d, v in names)
    if "pause" in actions:
        modifiers.discard("temporary")  # a pause is temporary; saying so changes nothing
    return Signature(
        num_seq,
        negations % 2 == 1,
        name_set,
        frozenset(actions),
        frozenset(objects),
        frozenset(modifiers),
        question,
        frozenset(rest),
    )


def _mostly_capitalised(toks: list[_Tok]) -> bool:
    """Title Case or ALL CAPS text: capitals say nothing about names there."""
    words = [t.orig for t in toks if t.orig[:1].isalpha()]
    if len(words) < 3:
        return False
    caps = sum(1 for w in words if w[:1].isupper())
    return caps / len(words) > 0.6


_VERB_ENDINGS = ("ing", "ed", "ize", "ise")

# Words of support-speak that carry no topic: how a question is put, not what it is about.
_GENERIC = frozenset(
    """
    receive arrive arriv show come came sent send place plac process way method option available availabl
    accept allow allowed work happen happened problem issue info information detail details policy time exist
    existing different another other same right wrong again currently lately recently still anymore yet soon
    bring take taken keep kept put let making make made give given use used using need needed want wanted like
    look looking try tried trying seem seems thing things something anything everything stuff lot lots bit
    best good great fine nice easy easiest hard quick quickly possible able way ways go going gone get got getting
    come coming mean means work working worked able help helping sure okay just really actually also maybe
    guys folks team support question questions wondering wonder hello thanks thank please kindly regards
    enter offer provide
    """.split()
)


def _norm(w: str) -> str:
    """A light, consistent stemmer for unexplained words (shoes/shoe, arrived/arrive)."""
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "xes", "zes", "ches", "shes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    if w.endswith("ing") and len(w) > 5:
        w = w[:-3]
        if len(w) > 2 and w[-1] == w[-2]:
            w = w[:-1]
    elif w.endswith("ed") and len(w) > 4:
        w = w[:-2]
        if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "ls":
            w = w[:-1]
    if w.endswith("e") and len(w) > 4:
        w = w[:-1]
    return w


def _looks_like_verb(low: str) -> bool:
    return low.endswith(_VERB_ENDINGS)
