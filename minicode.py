"""minicode.py: the minicode world, the project's embedded default and its controlled experiment.

A task is a function of one argument whose body chains 2-8 *steps*. A step has a kind (what it does), an
input and output type, code in several styles (loop, comprehension, builtin), phrasings for the docstring,
and phrasings for a plan comment. The world knows which step every line of an expert solution belongs to,
so it can say what the E-step found (does q's comment name the step that follows?) and write the true plan
(the oracle's latents).

Paper object                                  -> here
  expert code (mid-training traces)             -> corpus("midtrain"): solutions without comments
  code with natural comments (pretraining)      -> corpus("pretrain"): ~half the steps carry a plan comment
  RLVR problems / held-out benchmark            -> SPLITS: minicode-train / minicode-heldout (dev: choosing)
  the latent intent of a line (ground truth)    -> Task.step_of, Task.true_plan, names_of

Held-out tasks use compositions (sequences of step kinds) that training tasks never use; the dev split's
compositions are held out and kept apart from the test tasks', for choosing settings.

Worlds (WORLDS) differ in what the text gives away: plain (the bare `minicode-*` names) comments in short
phrases of its own and names variables after their steps; echo's comments restate the docstring's words; anon's names
are neutral. In skills (with anon's names) the docstring names *skills* (SKILLS: fixed macros of 2-3 steps)
instead of steps, so what each one expands into is world knowledge from pretraining, and a plan comment per
skill block spells it out; there the true plan says what the prompt does not. In arith (anon's tasks, task for
task) the docstring writes each integer parameter as a small sum ("add 7 + 5 - 3") and the code holds its
value (`+ 9`); a plan comment works the sum out first ("# 7 + 5 = 12, 12 - 3 = 9: shift by 9"), something
the context determines but a small model may not compute in one forward pass. In chain (anon's names, 2-4
steps) one parameter a task is a chain of 1-8 operations worked from left to right ("11 - 9 + 5 * 2 - 4"),
which the plan comment works out one operation at a time: the positive control, the world where written
state pays (its base model ships as models/minicode-chain-base; run.sh's default). A name
`minicode-WORLD-SPLIT` (parse) picks one; worlds.sh asks which lets latents pay.

Names. A stage names its corpus or benchmark with one flag, minicode's or real code's, and resolves it with
load_traces or load_problems here: minicode's own names first, any other by data.py's loaders (data.py knows
nothing of this world; the dependency runs one way, minicode -> data). `python minicode.py --corpus C
--tokenizer T` prints the size of any corpus a stage takes (traces, lines, tokens, packed rows) and the time to
build, tokenize and pack it.
"""
import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import random
import re
import time

import data as D
from data import Problem, Trace, render

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build a corpus of expert traces and report its size.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--corpus", default="minicode-midtrain",
                        help="minicode-midtrain, minicode-pretrain, stdlib, a directory of .py files, hf:NAME or a .jsonl")
    parser.add_argument("--tasks", type=int, default=10000, help="minicode: number of tasks")
    parser.add_argument("--field", default="content", help="hf: the text field of each record")
    parser.add_argument("--tokenizer", default="tiny-llama", help="model spec whose tokenizer counts tokens")
    parser.add_argument("--row-len", type=int, default=2048, help="packed row length")
    parser.add_argument("--out", default=None, help="write the traces here as jsonl")
    ARGS = parser.parse_args()

ARG_NAMES = {"ints": ["nums", "values", "xs", "numbers"], "int": ["n", "x", "num"], "text": ["s", "text", "line"],
             "words": ["words", "tokens", "items"], "counts": ["counts", "freq", "table"]}
TYPE_PHRASES = {"ints": ["a list of integers", "a list of numbers", "an integer list"],
                "int": ["an integer", "a number", "a non-negative integer"],
                "text": ["a string", "a piece of text", "a lowercase sentence"],
                "words": ["a list of words", "a list of strings"],
                "counts": ["a dictionary mapping words to counts", "a dict of counts"]}
VOCAB = ("apple banana cherry delta echo fig grape hotel ice jade kiwi lemon mango night ocean pear quiz "
         "river sun tree umbra vine wave xray yarn zebra").split()


@dataclasses.dataclass(frozen=True)
class World:
    """What a world's text gives away. plain (the first world): a plan comment is a short phrase of its own
    ("# only evens") and every output variable and the function are named after their steps, so the code
    documents itself. echo: a plan comment restates the docstring's own words for the step, as comments
    in real code often restate the spec, so a model can find its place in a long docstring by matching its
    last comment. anon: variables and the function get neutral names (res, tmp, solve), so the first
    tokens of a step no longer say which step it is. skills: the docstring names *skills* (SKILLS), fixed macros
    of 2-3 steps whose expansion only pretraining shows, and a plan comment spells the expansion out; with
    anon's names the code does not say where one skill ends (see SKILLS). arith (with anon's names, anon's
    tasks otherwise): the docstring writes each integer parameter as a small sum ("add 7 + 5 - 3 to every
    number") while the code holds its value (`v + 9`), and a plan comment works the sum out first
    ("# 7 + 5 = 12, 12 - 3 = 9: shift by 9"), a scratchpad for what a small model may not compute in one
    forward pass (see expression). chain (with anon's names): one parameter of every task, a value in 2..20, is
    written as a chain of 1-8 operations worked from left to right ("3 + 4 * 2 - 5" for 9), the code holds its value;
    the plan comment works it out one operation at a time, each a local step (the last result and the next
    operation, found by the one before it), where the code's value needs them all composed at once (see
    chain_expression). It is the positive control: the world where written state pays."""
    echo: bool = False
    anon: bool = False
    skills: bool = False
    arith: bool = False
    chain: bool = False


WORLDS = {"plain": World(), "echo": World(echo=True), "anon": World(anon=True), "echo+anon": World(True, True),
          "skills": World(anon=True, skills=True), "arith": World(anon=True, arith=True),
          "chain": World(anon=True, chain=True)}
DEFAULT_WORLD = "plain"   # the world of the bare `minicode-*` names and of models/minicode-base
NEUTRAL_NAMES = ("res", "out", "tmp", "cur", "data", "part", "got", "mid", "buf", "y", "z", "t", "r", "u")
NEUTRAL_FUNCTIONS = ("solve", "compute", "transform", "process", "apply", "run")


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str
    src: str                # input type
    dst: str                # output type
    names: tuple            # output variable names to choose from
    doc: tuple              # docstring phrasings; {k} etc. are filled from params
    plan: tuple             # plan comment phrasings
    styles: dict            # style -> code template; {i} input var, {o} output var, {v} loop var, {k} params
    params: tuple = ()      # (name, choices) pairs

    # A task chains units that answer these three questions: steps, or skills (below).
    def expand(self, params):
        """The (step, params) pairs whose code this unit writes: itself."""
        return ((self, params),)

    def phrasings(self, params):
        """Its docstring phrasings, parameters filled in."""
        return [d.format(**params) for d in self.doc]

    def comment(self, params, pick):
        """A plan comment's words: the phrasing that pick chooses (rng.choice for pretraining's varied words,
        the first for the oracle's), parameters filled in."""
        return pick(self.plan).format(**params)


def _S(kind, src, dst, names, doc, plan, params=(), **styles):
    return Step(kind, src, dst, tuple(names.split()), tuple(doc), tuple(plan), styles, tuple(params))


# Code templates are lines joined by "|"; indentation inside a template is 4 spaces per level.
STEPS = [
    # ints -> ints
    _S("keep_even", "ints", "ints", "evens even_vals kept", ["keep only the even numbers", "drop the odd values"],
       ["keep the even numbers", "filter out odd values", "only evens"],
       loop="{o} = []|for {v} in {i}:|    if {v} % 2 == 0:|        {o}.append({v})",
       comp="{o} = [{v} for {v} in {i} if {v} % 2 == 0]"),
    _S("keep_odd", "ints", "ints", "odds odd_vals kept", ["keep only the odd numbers", "remove the even values"],
       ["keep the odd ones", "drop evens", "odd values only"],
       loop="{o} = []|for {v} in {i}:|    if {v} % 2 != 0:|        {o}.append({v})",
       comp="{o} = [{v} for {v} in {i} if {v} % 2 == 1]"),
    _S("keep_positive", "ints", "ints", "positives pos kept", ["keep the positive numbers", "discard values <= 0"],
       ["positives only", "remove non-positive numbers"],
       loop="{o} = []|for {v} in {i}:|    if {v} > 0:|        {o}.append({v})",
       comp="{o} = [{v} for {v} in {i} if {v} > 0]",
       builtin="{o} = list(filter(lambda {v}: {v} > 0, {i}))"),
    _S("keep_greater", "ints", "ints", "big large kept", ["keep the numbers greater than {k}", "remove values of at most {k}"],
       ["keep values above {k}", "filter by > {k}"], params=(("k", (0, 2, 3, 5, 7, 10)),),
       loop="{o} = []|for {v} in {i}:|    if {v} > {k}:|        {o}.append({v})",
       comp="{o} = [{v} for {v} in {i} if {v} > {k}]"),
    _S("square_each", "ints", "ints", "squares squared sq", ["square every number", "replace each value by its square"],
       ["square them", "square each element"],
       loop="{o} = []|for {v} in {i}:|    {o}.append({v} * {v})", comp="{o} = [{v} ** 2 for {v} in {i}]",
       builtin="{o} = list(map(lambda {v}: {v} * {v}, {i}))"),
    _S("add_each", "ints", "ints", "shifted moved plus", ["add {k} to every number", "increase each value by {k}"],
       ["shift by {k}", "add {k} to each"], params=(("k", (1, 2, 3, 5, 10)),),
       loop="{o} = []|for {v} in {i}:|    {o}.append({v} + {k})", comp="{o} = [{v} + {k} for {v} in {i}]"),
    _S("times_each", "ints", "ints", "scaled times mult", ["multiply every number by {k}", "scale each value by {k}"],
       ["scale by {k}", "multiply each by {k}"], params=(("k", (2, 3, 4, 5)),),
       loop="{o} = []|for {v} in {i}:|    {o}.append({v} * {k})", comp="{o} = [{v} * {k} for {v} in {i}]"),
    _S("abs_each", "ints", "ints", "absolutes mags abs_vals", ["take the absolute value of every number",
                                                               "make every value non-negative"],
       ["absolute values", "drop the signs"],
       loop="{o} = []|for {v} in {i}:|    if {v} < 0:|        {o}.append(-{v})|    else:|        {o}.append({v})",
       comp="{o} = [abs({v}) for {v} in {i}]", builtin="{o} = list(map(abs, {i}))"),
    _S("sort_up", "ints", "ints", "ordered sorted_vals ascending", ["sort the numbers in increasing order",
                                                                    "arrange the values from smallest to largest"],
       ["sort ascending", "order them"], builtin="{o} = sorted({i})",
       loop="{o} = list({i})|{o}.sort()"),
    _S("sort_down", "ints", "ints", "descending ranked sorted_desc", ["sort the numbers in decreasing order",
                                                                      "arrange the values from largest to smallest"],
       ["sort descending", "largest first"], builtin="{o} = sorted({i}, reverse=True)",
       loop="{o} = list({i})|{o}.sort(reverse=True)"),
    _S("reverse_list", "ints", "ints", "backwards flipped rev", ["reverse the order of the numbers",
                                                                "turn the list around"],
       ["reverse it", "flip the order"], builtin="{o} = {i}[::-1]",
       loop="{o} = []|for {v} in reversed({i}):|    {o}.append({v})"),
    _S("dedupe", "ints", "ints", "unique distinct seen_vals", ["remove repeated numbers, keeping first occurrences",
                                                               "drop duplicates but keep the order"],
       ["dedupe", "remove duplicates in order"],
       loop="{o} = []|for {v} in {i}:|    if {v} not in {o}:|        {o}.append({v})",
       builtin="{o} = list(dict.fromkeys({i}))"),
    _S("first_k", "ints", "ints", "head front firsts", ["keep the first {k} numbers", "take only the first {k} values"],
       ["first {k} only", "truncate to {k}"], params=(("k", (2, 3, 4)),), builtin="{o} = {i}[:{k}]",
       loop="{o} = []|for {v} in {i}:|    if len({o}) < {k}:|        {o}.append({v})"),
    _S("drop_k", "ints", "ints", "tail rest remaining", ["drop the first {k} numbers", "skip the first {k} values"],
       ["skip {k}", "drop the first {k}"], params=(("k", (1, 2, 3)),), builtin="{o} = {i}[{k}:]"),
    _S("running_sum", "ints", "ints", "prefix cumulative running", ["replace the list by its running totals",
                                                                    "compute the prefix sums"],
       ["running totals", "accumulate prefix sums"],
       loop="{o} = []|acc = 0|for {v} in {i}:|    acc += {v}|    {o}.append(acc)"),
    _S("diffs", "ints", "ints", "deltas steps gaps", ["take the differences between neighbouring numbers",
                                                      "list each value minus the one before it"],
       ["pairwise differences", "consecutive deltas"],
       loop="{o} = []|for j in range(1, len({i})):|    {o}.append({i}[j] - {i}[j - 1])",
       comp="{o} = [b - a for a, b in zip({i}, {i}[1:])]"),
    _S("clamp", "ints", "ints", "clipped bounded capped", ["clip every number into the range {lo}..{hi}",
                                                           "limit each value to between {lo} and {hi}"],
       ["clip to [{lo}, {hi}]", "bound the values"], params=(("lo", (0, 1)), ("hi", (5, 9, 10))),
       loop="{o} = []|for {v} in {i}:|    {o}.append(min(max({v}, {lo}), {hi}))",
       comp="{o} = [min(max({v}, {lo}), {hi}) for {v} in {i}]"),
    # ints -> int
    _S("total", "ints", "int", "total acc result", ["add the numbers up", "sum the values"], ["sum up", "total them"],
       loop="{o} = 0|for {v} in {i}:|    {o} += {v}", builtin="{o} = sum({i})"),
    _S("largest", "ints", "int", "best biggest top", ["take the largest number (0 for an empty list)",
                                                      "find the maximum, or 0 if there is none"],
       ["find the max", "keep the largest"],
       loop="{o} = {i}[0] if {i} else 0|for {v} in {i}:|    if {v} > {o}:|        {o} = {v}",
       builtin="{o} = max({i}, default=0)"),
    _S("smallest", "ints", "int", "least lowest low", ["take the smallest number (0 for an empty list)",
                                                      "find the minimum, or 0 if there is none"],
       ["find the min", "keep the smallest"],
       loop="{o} = {i}[0] if {i} else 0|for {v} in {i}:|    if {v} < {o}:|        {o} = {v}",
       builtin="{o} = min({i}, default=0)"),
    _S("count_greater", "ints", "int", "count hits n_big", ["count the numbers greater than {k}",
                                                            "how many values exceed {k}"],
       ["count values over {k}", "tally the big ones"], params=(("k", (0, 3, 5)),),
       loop="{o} = 0|for {v} in {i}:|    if {v} > {k}:|        {o} += 1",
       comp="{o} = sum(1 for {v} in {i} if {v} > {k})"),
    _S("length", "ints", "int", "size count n_items", ["count the numbers", "take the length of the list"],
       ["how many", "count them"], builtin="{o} = len({i})", loop="{o} = 0|for _ in {i}:|    {o} += 1"),
    _S("span", "ints", "int", "spread width span", ["take the largest minus the smallest number (0 if empty)",
                                                    "compute the range max - min, or 0 for no numbers"],
       ["max minus min", "spread of the values"],
       loop="if {i}:|    {o} = max({i}) - min({i})|else:|    {o} = 0",
       builtin="{o} = max({i}) - min({i}) if {i} else 0"),
    # int -> int
    _S("add_const", "int", "int", "shifted bumped plus", ["add {k}", "increase it by {k}"], ["plus {k}", "add {k}"],
       params=(("k", (1, 3, 7, 10)),), builtin="{o} = {i} + {k}"),
    _S("times_const", "int", "int", "scaled doubled mult", ["multiply by {k}", "scale it by {k}"],
       ["times {k}", "scale by {k}"], params=(("k", (2, 3, 5)),), builtin="{o} = {i} * {k}"),
    _S("mod_const", "int", "int", "rem modded residue", ["take the remainder modulo {k}", "reduce it modulo {k}"],
       ["mod {k}", "remainder by {k}"], params=(("k", (3, 7, 10)),), builtin="{o} = {i} % {k}"),
    _S("digit_sum", "int", "int", "digit_total dsum sod", ["add up the decimal digits of its absolute value",
                                                           "compute the digit sum of its magnitude"],
       ["sum the digits", "digit sum"],
       loop="{o} = 0|rest = abs({i})|while rest > 0:|    {o} += rest % 10|    rest //= 10",
       builtin="{o} = sum(int(c) for c in str(abs({i})))"),
    # int -> ints
    _S("digits_of", "int", "ints", "digits ds figures", ["list the decimal digits of its absolute value",
                                                         "split its magnitude into digits"],
       ["split into digits", "get the digits"], builtin="{o} = [int(c) for c in str(abs({i}))]"),
    _S("count_up", "int", "ints", "seq upto steps", ["list the numbers from 0 up to (not including) it, at most 12",
                                                     "make the range 0..n-1, capped at 12 numbers"],
       ["build the range", "count up from zero"],
       loop="{o} = []|for j in range(min({i}, 12)):|    {o}.append(j)", builtin="{o} = list(range(min({i}, 12)))"),
    # text -> text
    _S("lower_text", "text", "text", "lowered low_s small", ["convert it to lowercase", "lowercase every letter"],
       ["lowercase", "normalize case"], builtin="{o} = {i}.lower()"),
    _S("upper_text", "text", "text", "upper shout caps", ["convert it to uppercase", "capitalize every letter"],
       ["uppercase it", "to upper case"], builtin="{o} = {i}.upper()"),
    _S("reverse_text", "text", "text", "backwards rev_s flipped", ["reverse the characters", "spell it backwards"],
       ["reverse the string", "flip it"], builtin="{o} = {i}[::-1]",
       loop="{o} = ''|for ch in {i}:|    {o} = ch + {o}"),
    _S("drop_vowels", "text", "text", "consonants stripped no_vowels", ["remove the vowels (a, e, i, o, u)",
                                                                        "delete every vowel"],
       ["strip vowels", "drop aeiou"],
       loop="{o} = ''|for ch in {i}:|    if ch.lower() not in 'aeiou':|        {o} += ch",
       comp="{o} = ''.join(ch for ch in {i} if ch.lower() not in 'aeiou')"),
    _S("swap_char", "text", "text", "replaced swapped fixed", ["replace every '{a}' with '{b}'",
                                                               "turn each '{a}' into '{b}'"],
       ["swap {a} for {b}", "replace {a}"], params=(("a", ("a", "e", " ")), ("b", ("_", "*", "-"))),
       builtin="{o} = {i}.replace('{a}', '{b}')"),
    _S("keep_letters", "text", "text", "letters alpha clean", ["keep only the letters", "drop everything but letters"],
       ["letters only", "remove non-letters"], comp="{o} = ''.join(ch for ch in {i} if ch.isalpha())",
       loop="{o} = ''|for ch in {i}:|    if ch.isalpha():|        {o} += ch"),
    # text -> int
    _S("count_vowels", "text", "int", "vowels n_vowels vc", ["count its vowels", "how many vowels it has"],
       ["count vowels", "tally the vowels"],
       loop="{o} = 0|for ch in {i}:|    if ch.lower() in 'aeiou':|        {o} += 1",
       comp="{o} = sum(1 for ch in {i} if ch.lower() in 'aeiou')"),
    _S("text_length", "text", "int", "size length n_chars", ["take its length", "count its characters"],
       ["length", "count chars"], builtin="{o} = len({i})"),
    # text -> words, words -> text
    _S("split_words", "text", "words", "words parts tokens", ["split it into words on whitespace",
                                                              "break it into a list of words"],
       ["split into words", "tokenize"], builtin="{o} = {i}.split()"),
    _S("join_words", "words", "text", "joined line sentence", ["join the words with '{sep}'",
                                                               "glue the words together separated by '{sep}'"],
       ["join with '{sep}'", "glue them"], params=(("sep", (" ", "-", ",")),), builtin="{o} = '{sep}'.join({i})"),
    # words -> ints / words
    _S("word_lengths", "words", "ints", "lengths sizes lens", ["replace each word by its length",
                                                               "measure every word"],
       ["word lengths", "length of each"], comp="{o} = [len(w) for w in {i}]",
       loop="{o} = []|for w in {i}:|    {o}.append(len(w))"),
    _S("keep_long", "words", "words", "long_words longer kept", ["keep the words longer than {k} letters",
                                                                 "drop words of {k} letters or fewer"],
       ["long words only", "filter short words"], params=(("k", (3, 4, 5)),),
       comp="{o} = [w for w in {i} if len(w) > {k}]",
       loop="{o} = []|for w in {i}:|    if len(w) > {k}:|        {o}.append(w)"),
    _S("sort_words", "words", "words", "alphabetical ordered sorted_words", ["sort the words alphabetically",
                                                                             "put the words in dictionary order"],
       ["sort alphabetically", "order the words"], builtin="{o} = sorted({i})"),
    _S("capitalize_words", "words", "words", "titled caps capitalized", ["capitalize each word",
                                                                         "make each word start with a capital"],
       ["capitalize", "title case"], comp="{o} = [w.capitalize() for w in {i}]",
       loop="{o} = []|for w in {i}:|    {o}.append(w[:1].upper() + w[1:])"),
    # -> counts
    _S("count_words", "words", "counts", "counts freq tally", ["count how often each word occurs",
                                                               "build a word frequency table"],
       ["count occurrences", "word frequencies"],
       loop="{o} = {{}}|for w in {i}:|    {o}[w] = {o}.get(w, 0) + 1",
       comp="{o} = {{w: {i}.count(w) for w in {i}}}"),
    _S("count_letters", "text", "counts", "letter_counts freq hist", ["count each letter (ignore other characters)",
                                                                      "tally how often every letter appears"],
       ["letter histogram", "count letters"],
       loop="{o} = {{}}|for ch in {i}:|    if ch.isalpha():|        {o}[ch] = {o}.get(ch, 0) + 1"),
    # counts -> ...
    _S("count_values", "counts", "ints", "values amounts nums", ["list the counts in key order",
                                                                 "take the values sorted by their keys"],
       ["values by key", "counts in key order"], comp="{o} = [{i}[key] for key in sorted({i})]"),
    _S("sorted_keys", "counts", "words", "keys names sorted_keys", ["list the keys in sorted order",
                                                                    "take the sorted keys"],
       ["sorted keys", "the keys"], builtin="{o} = sorted({i})"),
    _S("max_count", "counts", "int", "most peak top_count", ["take the largest count (0 if empty)",
                                                             "find the highest value, or 0"],
       ["largest count", "peak"], builtin="{o} = max({i}.values(), default=0)",
       loop="{o} = 0|for key in {i}:|    if {i}[key] > {o}:|        {o} = {i}[key]"),
    _S("total_count", "counts", "int", "total all_counts n", ["add up all the counts", "sum the values"],
       ["sum counts", "total"], builtin="{o} = sum({i}.values())",
       loop="{o} = 0|for key in {i}:|    {o} += {i}[key]"),
    _S("keep_frequent", "counts", "counts", "frequent common kept", ["keep the entries with a count of at least {k}",
                                                                     "drop entries counted fewer than {k} times"],
       ["keep frequent ones", "filter rare entries"], params=(("k", (2, 3)),),
       comp="{o} = {{key: c for key, c in {i}.items() if c >= {k}}}"),
]
STEP_BY_KIND = {s.kind: s for s in STEPS}


# Skills: named macros of 2-3 steps with fixed parameters, for the skills world. A docstring that names
# skills ("tidy it, then apply boost") no longer spells out the steps: what "tidy" expands into is world
# knowledge that only pretraining shows. A plan comment that spells the expansion out ("# tidy: positives
# only, dedupe, sort ascending") brings the memorized macro into the context once; without it the model must
# recall the macro and keep its place inside it at every line, from code that (with anon's names) does not
# say where one skill ends. Skills share steps (dedupe, sort_up, abs_each, ...) so that a line alone does not
# tell them apart. The names are arbitrary words that no step's phrasing or name uses.
SKILL_DOC = ("{name} it", "apply {name}")  # a skill's docstring phrasings: its name and nothing more


@dataclasses.dataclass(frozen=True)
class Skill:
    kind: str               # its name
    steps: tuple            # ((Step, params), ...): what it expands into
    params = ()             # nothing to draw: the parameters of its steps are fixed

    @property
    def src(self):
        return self.steps[0][0].src

    @property
    def dst(self):
        return self.steps[-1][0].dst

    def expand(self, params):
        return self.steps

    def phrasings(self, params):
        return [d.format(name=self.kind) for d in SKILL_DOC]

    def comment(self, params, pick):
        """'tidy: positives only, dedupe, sort ascending': its name, then each step's plan phrasing."""
        return self.kind + ": " + ", ".join(step.comment(p, pick) for step, p in self.steps)


def _K(kind, *steps):
    """A skill from its steps in order: a step kind, or (kind, params) for a step with parameters."""
    pairs = [(step, {}) if isinstance(step, str) else step for step in steps]
    return Skill(kind, tuple((STEP_BY_KIND[k], p) for k, p in pairs))


SKILLS = [
    # ints -> ints
    _K("tidy", "keep_positive", "dedupe", "sort_up"),
    _K("boost", ("add_each", {"k": 3}), ("times_each", {"k": 2})),
    _K("squash", ("clamp", {"lo": 0, "hi": 9}), "dedupe"),
    _K("sift", "keep_even", "sort_down"),
    _K("fold", "running_sum", "reverse_list"),
    _K("brew", "abs_each", "sort_up", ("first_k", {"k": 3})),
    _K("knit", "square_each", ("keep_greater", {"k": 10})),
    _K("churn", "diffs", "abs_each"),
    _K("glaze", ("times_each", {"k": 3}), ("add_each", {"k": 1}), "sort_down"),
    _K("whisk", "dedupe", "reverse_list", ("drop_k", {"k": 1})),
    _K("toss", "keep_odd", "square_each"),
    _K("stir", "sort_up", "diffs"),
    # ints -> int
    _K("mash", "keep_positive", "total"),
    _K("bake", "dedupe", "length"),
    _K("roast", "abs_each", "largest"),
    # int -> int, int -> ints
    _K("zest", "digit_sum", ("times_const", {"k": 3})),
    _K("knead", "digits_of", "sort_down"),
    _K("poach", "count_up", "square_each"),
    # text -> words, words -> ints
    _K("weave", "lower_text", "split_words", "sort_words"),
    _K("spin", "word_lengths", "sort_up"),
]
SKILL_BY_KIND = {k.kind: k for k in SKILLS}


def plan_comment(unit, params, exprs=None):
    """The oracle's plan comment for a step (its first plan phrasing, parameters filled in) or a skill (its
    expansion in its steps' first plan phrasings); in the arith world, after the working of exprs."""
    return "# " + worked(exprs, unit.comment(params, lambda phrasings: phrasings[0]))


# The arith world writes an integer parameter as a sum of 2-3 terms of 1..9 ("7 + 5 - 3" for 9) whose
# partial results stay in 0..30: a step or two of small arithmetic, which its plan comment works out first.
TERMS, PARTIALS = range(1, 10), range(0, 31)


@functools.lru_cache(maxsize=None)
def _sums(value, n_terms):
    """Every sum of n_terms that equals value with each partial result in PARTIALS, as signed terms
    ((7, 5, -3) is 7 + 5 - 3), in a fixed order. The first term is positive; 0 is a - a."""
    signed = (*TERMS, *(-t for t in TERMS))
    return tuple(terms for terms in itertools.product(TERMS, *[signed] * (n_terms - 1))
                 if list(itertools.accumulate(terms))[-1] == value
                 and all(p in PARTIALS for p in itertools.accumulate(terms)))


def expression(rng, value):
    """value as the text of a sum of 2 or 3 terms (half each), drawn uniformly among those that reach it."""
    n_terms = rng.choice((2, 3))
    sums = _sums(value, n_terms) or _sums(value, 5 - n_terms)
    if not sums:
        raise ValueError(f"no sum of 2-3 terms in {TERMS} reaches {value} within {PARTIALS}")
    terms = rng.choice(sums)
    return str(terms[0]) + "".join(f" {'+' if t > 0 else '-'} {abs(t)}" for t in terms[1:])


# The chain world writes one integer parameter of a task as a start of 1..20 and n operations (+ or - 1..9,
# * 2 or * 3), worked from left to right with every partial result in 0..CHAIN_MAX and no operation twice,
# so that the operation after "* 2" in the docstring is found by matching "* 2" (an induction step).
CHAIN_MAX = 50
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def chain_expression(rng, value, n_ops):
    """value as the text of a chain of n_ops operations from a start in 1..20, drawn backwards from the value
    (each step uniformly among the operations that keep the partial result in range)."""
    for _ in range(1000):
        v, ops = value, []
        for _ in range(n_ops):
            options = ([("+", d) for d in TERMS if v - d >= 0] + [("-", d) for d in TERMS if v + d <= CHAIN_MAX]
                       + [("*", m) for m in (2, 3) if v > 0 and v % m == 0])
            op, d = rng.choice([o for o in options if o not in ops] or options)
            ops.append((op, d))
            v = v - d if op == "+" else v + d if op == "-" else v // d
        if 1 <= v <= 20 and len(set(ops)) == n_ops:
            return str(v) + "".join(f" {op} {d}" for op, d in reversed(ops))
    raise ValueError(f"no chain of {n_ops} operations reaches {value}")


def evaluate(text):
    """An arith or chain expression's value, worked from left to right (not Python's precedence)."""
    first, *rest = text.split()
    value = int(first)
    for op, term in zip(rest[::2], rest[1::2]):
        value = _APPLY[op](value, int(term))
    return value


def working(text):
    """An expression's text worked out left to right: '7 + 5 - 3' -> '7 + 5 = 12, 12 - 3 = 9'."""
    first, *rest = text.split()
    partial, steps = int(first), []
    for op, term in zip(rest[::2], rest[1::2]):
        new = _APPLY[op](partial, int(term))
        steps.append(f"{partial} {op} {term} = {new}")
        partial = new
    return ", ".join(steps)


def worked(exprs, words):
    """A plan comment's words after the working of a step's expressions ({param: text}, in the order of its
    params, '; ' between two), or the words alone where the step has none."""
    if not exprs:
        return words
    return "; ".join(working(text) for text in exprs.values()) + ": " + words


# The working's fixed form, for names_of to read past (on a normalized comment).
_WORKING = re.compile(r"^(\d+ [-+*] \d+ = \d+(, |; ))*\d+ [-+*] \d+ = \d+: ")


def operations(comment):
    """Each 'a + b = c', 'a - b = c' or 'a * b = c' a comment writes, as (a, b, c, is it right): a model's
    working checked."""
    return [(int(a), int(b), int(c), _APPLY[op](int(a), int(b)) == int(c))
            for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", comment)]


def _expressions(rng, params):
    """A step's integer parameters as sums ({name: text}); string parameters (sep, a, b) stay as they are."""
    return {name: expression(rng, v) for name, v in params.items() if isinstance(v, int)}


# The steps whose parameter a chain can be, and the values it takes there: wider than their own choices, so
# that guessing the value is a 1-in-19 shot (pi's reward for knowing it is about log 19 = 2.9 nats), and only
# steps where every value acts differently on the tests (first_k = 15 and = 9 would both keep a whole list).
CHAIN_STEPS, CHAIN_VALUES = ("add_each", "times_each", "keep_greater", "count_greater", "add_const", "times_const",
                             "mod_const"), range(2, 21)


def _one_chain(rng, chain, params, ops):
    """The chain world's expressions: the parameter of one of the task's CHAIN_STEPS, drawn uniformly, gets a
    value from CHAIN_VALUES (in params) written as a chain of n operations (n drawn from ops); the other
    parameters stay plain numbers."""
    i = rng.choice([i for i, unit in enumerate(chain) if unit.kind in CHAIN_STEPS])
    name, = params[i]
    params[i][name] = rng.choice(CHAIN_VALUES)
    exprs = [{} for _ in params]
    exprs[i] = {name: chain_expression(rng, params[i][name], rng.choice(ops))}
    return exprs


def _param_choices(step):
    """Every parameter setting of a step: its own choices, and CHAIN_VALUES where a chain may set it."""
    names = [name for name, _ in step.params]
    choices = [sorted({*c, *(CHAIN_VALUES if step.kind in CHAIN_STEPS else ())}) for _, c in step.params]
    return [dict(zip(names, values)) for values in itertools.product(*choices)]


def _normalize(comment):
    return " ".join(comment.strip().lstrip("#").lower().split())


def _plan_names():
    """Every plan phrasing of every step, with every parameter value -> the (kind, params) pairs it names."""
    names = {}
    for step in STEPS:
        for params in _param_choices(step):
            for phrase in step.plan + step.doc:  # echo worlds comment with the docstring's phrasings
                named = (step.kind, tuple(sorted(params.items())))
                names.setdefault(_normalize(phrase.format(**params)), set()).add(named)
    for skill in SKILLS:  # its name, its docstring phrasings, its expansion in any of its steps' plan phrasings
        phrases = [skill.kind, *skill.phrasings({})]
        for wording in itertools.product(*(step.plan for step, _ in skill.steps)):
            chosen = iter(wording)  # one plan phrasing per step, in order
            phrases.append(skill.comment({}, lambda phrasings: next(chosen)))
        for phrase in phrases:
            names.setdefault(_normalize(phrase), set()).add((skill.kind, ()))
    return names


_NAMES = _plan_names()


def names_of(comment):
    """The (kind, params) pairs a comment names, as a set: empty when it is no plan or docstring phrasing of
    a step (a few phrasings are shared by two kinds, so a comment can name more than one). A skill's name,
    docstring phrasings and expansion comment (in any wording) name (skill, ()). An arith comment names what
    its words after the working name ("# 7 + 5 = 12, 12 - 3 = 9: shift by 9" names add_each with k 9)."""
    return _NAMES.get(_WORKING.sub("", _normalize(comment)), set())


CHAIN_NOTE = "Work the expression from left to right."
RESULT_PHRASES = ["Return the result.", "Return what is left.", "Return the final value.", ""]
OPENERS = ["Given {arg}, {steps}.", "Take {arg}: {steps}.", "For {arg}, {steps}.", "{Steps}. The input is {arg}."]


def composition_key(kinds):
    return "|".join(kinds)


def _composition_hash(kinds):
    return int(hashlib.sha256(composition_key(kinds).encode()).hexdigest(), 16)


def is_held_out(kinds, share=15):
    """A fixed ~15% of compositions (sequences of step kinds) are reserved for held-out tasks."""
    return _composition_hash(kinds) % 100 < share


def side_of(kinds):
    """train, dev or test. A third of the held-out compositions are dev: settings are chosen on them, and
    the test tasks (minicode-heldout) never share a composition with them."""
    if not is_held_out(kinds):
        return "train"
    return "dev" if _composition_hash(kinds) // 100 % 3 == 0 else "test"


def _random_chain(rng, length, pool=STEPS):
    """A chain of `length` units from pool (steps or skills) whose types line up, no kind twice in a row."""
    for _ in range(100):
        chain = [rng.choice(pool)]
        while len(chain) < length:
            options = [s for s in pool if s.src == chain[-1].dst and s.kind != chain[-1].kind]
            if not options:
                break
            chain.append(rng.choice(options))
        if len(chain) == length:
            return chain
    raise RuntimeError("no chain of that length")


def _random_input(rng, typ):
    if typ == "ints":
        return [rng.randint(-9, 20) for _ in range(rng.randint(3, 8))]
    if typ == "int":
        return rng.randint(0, 999)
    words = [rng.choice(VOCAB) for _ in range(rng.randint(2, 6))]
    if typ == "text":
        return " ".join(words)
    if typ == "words":
        return words
    return {w: rng.randint(1, 4) for w in words}  # counts


@dataclasses.dataclass
class Task:
    kinds: tuple
    problem: Problem
    trace: Trace            # the expert trace (no comments)
    plan_comments: list     # a plan comment per action or None (pretraining corpus; None where no step starts)
    step_of: list           # per action: index of the step its line belongs to (None: the final return)
    params: list            # per step: its parameters, e.g. {"k": 3}
    plan: list              # per step: the oracle's plan comment
    exprs: list = None      # per step: its parameters as the docstring writes them ({} but in arith and chain)

    def n_ops(self):
        """Operations in the task's chains (its sums in arith): what one forward pass must compose for a value."""
        return sum(len(text.split()) // 2 for e in self.exprs or () for text in e.values())

    def chain_starts(self):
        """Per action: does a step whose parameter is a chain start here (where, in a chain world, a comment
        pays)?"""
        return [start and bool(self.exprs and self.exprs[i]) for start, i in zip(self.step_starts(), self.step_of)]

    def step_starts(self):
        """Per action: does a step start here (the place a plan comment belongs)?"""
        return [i is not None and (t == 0 or self.step_of[t - 1] != i) for t, i in enumerate(self.step_of)]

    def true_plan(self):
        """The oracle's latents: each step's plan comment before its first line (the step's first plan
        phrasing; in an echo world, the docstring's words for it)."""
        return [self.plan[i] if start else None for start, i in zip(self.step_starts(), self.step_of)]


    def first_departure(self, completion):
        """Where a failed completion of this task left the true plan, read from its comments: 'no comments',
        'skipped a step' (a comment names the step after the one due), 'another step', 'wrong parameter'
        (the step due, other parameters), 'unnamed comment' (no step's phrasing), 'extra comment' (more
        comments than steps), 'stopped early' (fewer), or 'code after right comments'."""
        comments = [line.strip() for line in completion.splitlines() if line.strip().startswith("#")]
        if not comments:
            return "no comments"
        due = [(kind, tuple(sorted(p.items()))) for kind, p in zip(self.kinds, self.params)]
        for i, comment in enumerate(comments):
            names = names_of(comment)
            if i >= len(due):
                return "extra comment"
            if due[i] in names:
                continue
            kinds = {kind for kind, _ in names}
            if due[i][0] in kinds:
                return "wrong parameter"
            if i + 1 < len(due) and due[i + 1][0] in kinds:
                return "skipped a step"
            return "another step" if names else "unnamed comment"
        return "stopped early" if len(comments) < len(due) else "code after right comments"


LENGTHS = (2, 2, 3, 3, 4, 5)  # steps per composition, drawn uniformly from this tuple (pretraining, mid-training)


def make_task(rng, held_out=False, comment_rate=0.0, n_tests=5, lengths=LENGTHS, world=WORLDS[DEFAULT_WORLD],
              ops=(1,)):
    """One minicode task: a composition from the training side of the split (held_out False), the held-out
    side (True), or one part of it ("dev" or "test"), a reference solution in a random mix of styles, a
    docstring in varied words and n_tests unit tests made by running the reference. comment_rate: share of
    steps that get a plan comment in the trace's latents. world: what the text gives away (World). In a skills
    world the composition is a chain of skills (lengths counts skills), each written as its steps' code, and
    kinds, step_of, params (empty) and plan are per skill. In an arith world the docstring writes each integer
    parameter as a sum (expression) and every plan comment works the sums out first (worked); in a chain world
    one step's parameter is a chain of n operations, n drawn from ops (_one_chain), and only compositions with a
    step that can take one are drawn."""
    want = {False: ("train",), True: ("dev", "test")}.get(held_out, (held_out,))
    while True:
        chain = _random_chain(rng, rng.choice(lengths), SKILLS if world.skills else STEPS)
        kinds = tuple(s.kind for s in chain)
        if side_of(kinds) in want and (not world.chain or any(s.kind in CHAIN_STEPS for s in chain)):
            break
    params = [{name: rng.choice(choices) for name, choices in s.params} for s in chain]
    if world.arith:  # drawn from a copy of the stream, which then moves on as anon's does, task for task
        sub = random.Random(repr(rng.getstate()))
        exprs = [_expressions(sub, p) for p in params]
    elif world.chain:
        exprs = _one_chain(random.Random(repr(rng.getstate())), chain, params, ops)
    else:
        exprs = [{} for _ in params]
    steps = [step for unit, p in zip(chain, params) for step, _ in unit.expand(p)]
    arg = rng.choice(ARG_NAMES[chain[0].src])
    name = (rng.choice(NEUTRAL_FUNCTIONS) if world.anon
            else "_".join(dict.fromkeys(s.names[0] for s in steps[-3:])))
    # body: each step's code, with fresh output names; a comment (pretraining's) per unit, in its own words
    body, commented, own_words, step_of, used, var = [], [], [], [], {arg}, arg
    for i, (unit, p) in enumerate(zip(chain, params)):
        for step, step_params in unit.expand(p):
            code, var = _step_code(rng, step, step_params, var, used, world)
            step_of += [i] * len(code)
            body += code
        commented.append(rng.random() < comment_rate)
        own_words.append(worked(exprs[i], unit.comment(p, rng.choice)) if commented[-1] else None)
    body.append(f"return {var}")
    step_of.append(None)
    # a chain is kept on one docstring line (glued while wrapping), so its text is the working's
    glue = (lambda e: {k: v.replace(" ", "\x01") for k, v in e.items()}) if world.chain else (lambda e: e)
    phrases = [rng.choice(unit.phrasings({**p, **glue(e)})) for unit, p, e in zip(chain, params, exprs)]
    text = _describe(rng, phrases, chain[0].src, arg) + (" " + CHAIN_NOTE if world.chain else "")
    prompt = f"def {name}({arg}):\n" + _docstring(text.strip()).replace("\x01", " ")
    actions = [f"    {line}\n" for line in body]
    # comments: pretraining's (some units) and the oracle's (every unit), in the world's words
    words = phrases if world.echo else own_words
    plan = ([f"# {w}" for w in phrases] if world.echo
            else [plan_comment(s, p, e) for s, p, e in zip(chain, params, exprs)])
    plan_comments = [None] * len(actions)
    for t, i in enumerate(step_of):
        if i is not None and (t == 0 or step_of[t - 1] != i) and commented[i]:
            plan_comments[t] = words[i]
    problem = _problem(rng, prompt, "".join(actions), name, chain[0].src, n_tests)
    return Task(kinds, problem, Trace("", prompt, actions), plan_comments, step_of, params, plan, exprs)


def _step_code(rng, step, params, var, used, world):
    """One step's code lines in a random style, reading var -> (lines, its output variable, added to used)."""
    names = NEUTRAL_NAMES if world.anon else step.names
    out = next((n for n in rng.sample(names, len(names)) if n not in used), None) or f"{step.names[0]}{len(used)}"
    used.add(out)
    style = rng.choice(sorted(step.styles))
    loop_var = next(v for v in ("v", "x", "item", "val", "num", "e") if v not in used)  # used holds the argument
    return step.styles[style].format(i=var, o=out, v=loop_var, **params).split("|"), out


def _describe(rng, phrases, typ, arg):
    """The docstring's text: the units' phrases in order, an opener naming the argument, a closing phrase."""
    if len(phrases) == 1:  # a one-skill task
        steps = phrases[0]
    else:
        steps = ", then ".join(phrases[:-1]) + (" and finally " if len(phrases) > 2 else " and then ") + phrases[-1]
    opener = rng.choice(OPENERS)
    doc = opener.format(arg=f"{rng.choice(TYPE_PHRASES[typ])} `{arg}`", steps=steps,
                        Steps=steps[:1].upper() + steps[1:])
    return (doc + " " + rng.choice(RESULT_PHRASES)).strip()


def _problem(rng, prompt, solution, name, typ, n_tests):
    """The Problem: n_tests distinct random inputs of type typ, expected outputs from running the reference."""
    inputs = []
    while len(inputs) < n_tests:
        x = _random_input(rng, typ)
        if x not in inputs:
            inputs.append(x)
    ns = {}
    exec(compile(prompt + solution, f"<minicode {name}>", "exec"), ns)
    fn = ns[name]
    asserts = "".join(f"    assert candidate({x!r}) == {fn(_copy(x))!r}\n" for x in inputs)
    return Problem(task_id="", prompt=prompt, entry_point=name, test=f"\n\ndef check(candidate):\n{asserts}",
                   canonical_solution=solution, source="minicode")


def _copy(x):
    return json.loads(json.dumps(x))


def _docstring(text, width=88):
    words, lines, cur = text.split(), [], "   "
    for w in words:
        if len(cur) + 1 + len(w) > width - 4 and cur.strip():
            lines.append(cur)
            cur = "   "
        cur += " " + w
    lines.append(cur)
    lines[0] = '    """' + lines[0].strip()
    return "\n".join(lines) + '\n    """\n'


def tasks(n, seed, held_out=False, comment_rate=0.0, prefix="minicode", lengths=LENGTHS, world=DEFAULT_WORLD,
          ops=(1,)):
    """n tasks from a seeded stream; the same arguments give the same tasks. Worlds share the stream's
    seed, so echo's tasks are plain's with other comments. ops: a chain world's operations per chain."""
    rng = random.Random(f"{prefix}-{seed}-{held_out}" + ("" if lengths == LENGTHS else f"-{lengths}"))
    side = {False: "train", True: "heldout", "test": "heldout"}.get(held_out, held_out)
    out = []
    for i in range(n):
        t = make_task(rng, held_out=held_out, comment_rate=comment_rate, lengths=lengths, world=WORLDS[world],
                      ops=ops)
        t.problem.task_id = t.trace.id = f"{prefix}/{side}/{seed}/{i}"
        out.append(t)
    return out


# The named minicode splits. Seeds differ by purpose so the sets do not overlap by construction. The base
# model sees compositions of 2-5 steps; it is near perfect on new compositions of that length (greedy pass@1
# 0.998) but not on longer ones (40 held-out tasks each: 1.0 at 5 steps, 0.78 at 6, 0.33 at 7, 0.20 at 8).
# So RL problems and the held-out benchmark are long compositions: that is where there is something to learn.
# dev holds held-out compositions of their own, on which world settings, budgets and c are chosen; heldout's
# test tasks never share a composition with them (by construction in the worlds after plain; in plain, whose
# test set predates dev, none of the 500 happens to: checked by a test). dev-long: 8 steps, one more than any
# mid-training trace, where the models' failures differ most.
SPLITS = {
    "train": dict(n=5000, seed=1, held_out=False, lengths=(4, 5, 6, 7)),  # RLVR problems
    "valid": dict(n=500, seed=2, held_out=False),                         # in-distribution eval
    "heldout": dict(n=500, seed=3, held_out="test", lengths=(5, 6, 7)),   # new, longer compositions: the test
    "dev": dict(n=500, seed=4, held_out="dev", lengths=(5, 6, 7)),        # for choosing settings
    "dev-long": dict(n=500, seed=5, held_out="dev", lengths=(8,)),        # longer than any mid-training trace
}
# A skills world counts skills instead (2-3 steps each, 2.25 on average), in the same roles as the lengths
# above: pretraining 1-3 skills (2-9 steps, 87% of them 2-6), mid-training 2-4 (4-12 steps) and RL problems
# 3-4, heldout and dev 4 (8-12 steps, the top of mid-training's range as plain's 5-7 are of its 3-7),
# dev-long 5 (10-15 steps), one skill more than any mid-training trace. Chosen on dev (LOG.md, 2026-12-01):
# at 3 skills NTP already passed 98% of dev, which leaves nothing for latents to show.
SKILL_LENGTHS = {"pretrain": (1, 2, 2, 3), "midtrain": (2, 3, 4), "train": (3, 4), "valid": (1, 2, 2, 3),
                 "heldout": (4,), "dev": (4,), "dev-long": (5,)}
# A chain world keeps compositions short (2-4 steps, where the base models track their steps almost without
# fault) and makes the chain the hard part: (steps, operations per chain) per split. Pretraining and
# mid-training show 1-6 operations; the test and dev tasks 3-6, where one forward pass must compose at least
# three; dev-long 7-8, more than any trace showed.
CHAIN_LENGTHS = {"pretrain": ((2, 3, 4), (1, 2, 3, 4, 5, 6)), "midtrain": ((2, 3, 4), (1, 2, 3, 4, 5, 6)),
                 "train": ((2, 3, 4), (2, 3, 4, 5, 6)), "valid": ((2, 3, 4), (1, 2, 3, 4, 5, 6)),
                 "heldout": ((3, 4), (3, 4, 5, 6)), "dev": ((3, 4), (3, 4, 5, 6)), "dev-long": ((3, 4), (7, 8))}
CORPORA = ("pretrain", "midtrain", "midtrain-oracle")


def parse(spec):
    """A minicode name -> (world, what): `minicode-heldout` is the default world's heldout split,
    `minicode-plain-midtrain` the plain world's mid-training corpus. None for names that are not minicode's."""
    if not spec.startswith("minicode-"):
        return None
    world, what = DEFAULT_WORLD, spec[len("minicode-"):]
    for name in WORLDS:
        if what.startswith(name + "-"):
            world, what = name, what[len(name) + 1:]
    return (world, what) if what in SPLITS or what in CORPORA else None


def names(kind="split"):
    """Every minicode name of a kind ('split' or 'corpus'), for error messages and help."""
    return [f"minicode-{w + '-' if w != DEFAULT_WORLD else ''}{s}" for w in WORLDS
            for s in (SPLITS if kind == "split" else CORPORA)]


def split_tasks(world, split):
    """A named split's tasks. The plain world's heldout keeps its first test set, drawn before dev existed."""
    spec = dict(SPLITS[split])
    if world == "plain" and split == "heldout":
        spec["held_out"] = True
    if WORLDS[world].skills:
        spec["lengths"] = SKILL_LENGTHS[split]
    spec.update(_chain_shape(world, split))
    return tasks(**spec, world=world)


def _chain_shape(world, split):
    """tasks()'s lengths and ops for a split of a chain world ({} in any other world)."""
    return dict(zip(("lengths", "ops"), CHAIN_LENGTHS[split])) if WORLDS[world].chain else {}


MIDTRAIN_LENGTHS = (3, 4, 5, 6, 7)  # mid-training reaches past pretraining's 2-5 steps, toward the long tasks


def pretrain_tasks(n, seed=0, world=DEFAULT_WORLD):
    """The pretraining stream: about half the steps carry a plan comment (the trace's latents). A skills world
    must teach both what the steps are and what each skill expands into, so its tasks alternate: the even ones
    are the pretraining tasks of the same world without skills (anon's, task for task, for skills), the odd
    ones skill tasks of 1-3 skills, about half the skill blocks commented with their expansion."""
    if not WORLDS[world].skills:
        return tasks(n, seed=100 + seed, comment_rate=0.5, prefix="minicode-pretrain", world=world,
                     **_chain_shape(world, "pretrain"))
    steps = pretrain_tasks((n + 1) // 2, seed, _steps_world(world))
    skills = tasks(n // 2, seed=100 + seed, comment_rate=0.5, prefix="minicode-pretrain-skills",
                   lengths=SKILL_LENGTHS["pretrain"], world=world)
    return [t for pair in itertools.zip_longest(steps, skills) for t in pair if t is not None]


def _steps_world(world):
    """The world a skills world's step tasks come from: the same flags without skills."""
    flags = dataclasses.replace(WORLDS[world], skills=False)
    return next(name for name, w in WORLDS.items() if w == flags)


def midtrain_tasks(n, seed=0, world=DEFAULT_WORLD):
    """The mid-training stream as tasks (each knows its steps): seed 0 is the corpus, other seeds give
    more traces of the same distribution (the E-step's held-out set). A skills world's are skill tasks."""
    shape = {"lengths": SKILL_LENGTHS["midtrain"] if WORLDS[world].skills else MIDTRAIN_LENGTHS,
             **_chain_shape(world, "midtrain")}
    return tasks(n, seed=200 + seed, prefix="minicode-midtrain", world=world, **shape)


def corpus(kind, n, seed=0, world=DEFAULT_WORLD):
    """Text corpora of minicode. kind='pretrain': functions where ~half the steps carry a plan comment
    (as real code often does); kind='midtrain': expert traces of 3-7 steps (2-4 skills in a skills world)
    without comments (RA3's to annotate)."""
    if kind == "pretrain":  # load_traces keeps the comments apart
        return [render(t.trace, t.plan_comments) for t in pretrain_tasks(n, seed, world)]
    if kind == "midtrain":
        return [t.trace for t in midtrain_tasks(n, seed, world)]
    raise ValueError(f"corpus: kind is 'pretrain' or 'midtrain', not {kind!r}")


# =====================================================================================================
# The names the stages take
# =====================================================================================================

def load_traces(spec, n_tasks=10000, field="content"):
    """(traces, latents or None) of a corpus a stage names: minicode-pretrain (plan comments as latents),
    minicode-midtrain, minicode-midtrain-oracle (the same traces with the true plan comments as latents), a
    minicode problem split (its expert solutions), each of n_tasks tasks (minicode-WORLD-... for another
    world); any other name goes to data.load_traces (a traces .jsonl, stdlib, a directory of .py files,
    hf:NAME_OR_PATH with `field`)."""
    world, what = parse(spec) or (None, None)
    if what == "pretrain":
        pre = pretrain_tasks(n_tasks, world=world)
        return [t.trace for t in pre], [t.plan_comments for t in pre]
    if what == "midtrain":
        return corpus("midtrain", n_tasks, world=world), None
    if what == "midtrain-oracle":  # the same traces with the world's true plan comments (the oracle)
        mid = midtrain_tasks(n_tasks, world=world)
        return [t.trace for t in mid], [t.true_plan() for t in mid]
    if what in SPLITS:  # the expert solutions of a problem split's first n_tasks (mstep.py --steps 0)
        return [t.trace for t in split_tasks(world, what)[:n_tasks]], None
    return D.load_traces(spec, field=field, also=[*names("corpus"), "a minicode split"])


def load_problems(name, data=None):
    """Problems of a benchmark a stage names: a minicode split (minicode-train, -valid, -heldout, -dev,
    -dev-long; minicode-WORLD-SPLIT for another world, e.g. minicode-plain-heldout); any other name goes to
    data.load_problems (humaneval, humaneval+, mbpp[-SPLIT], mbpp+ with files from `data` or $RA3_DATA, a
    problems .jsonl)."""
    world, split = parse(name) or (None, None)
    if split in SPLITS:
        return [t.problem for t in split_tasks(world, split)]
    return D.load_problems(name, data, also=names("split"))


def main(args):
    import model
    t0 = time.perf_counter()
    traces, _ = load_traces(args.corpus, args.tasks, args.field)
    t_build = time.perf_counter() - t0
    _, tok = model.load_model(args.tokenizer, device="cpu")
    t0 = time.perf_counter()
    docs = [ids for ids, _, _ in D.encode_traces(tok, traces)]
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = D.pack(docs, args.row_len)
    t_pack = time.perf_counter() - t0
    n_tok = sum(map(len, docs))
    stats = dict(corpus=args.corpus, traces=len(traces), lines=sum(len(t.actions) for t in traces), tokens=n_tok,
                 tokenizer=args.tokenizer, rows=len(packed.input_ids), row_len=args.row_len,
                 fill=n_tok / packed.input_ids.numel(), split_docs=packed.n_split, build_s=round(t_build, 2),
                 tokenize_s=round(t_tok, 2), pack_s=round(t_pack, 2))
    if args.out:
        D.write_traces(args.out, traces)
    print(json.dumps(stats))


if __name__ == "__main__":
    main(ARGS)
