"""The pieces of the strict check behind a semantic hit (`..verify` puts them together).

`tokens` cuts a question into Unicode tokens, `lexicon` holds the closed-class
words of each language, `numbers` reads numbers, times and dates, `reading`
files every token into what the guards compare, and `matching` says when two
content words are the same word.
"""
