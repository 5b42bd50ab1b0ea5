"""The tools of the tool-use training data: real standard-library functions with simple typed parameters.

Each tool is described to the model by its function's own docstring (the first paragraph that is not a
signature line), its parameters by a JSON schema; the user's phrasings and the answer's wording are ours.
Seven whole tools are held out for evaluation (`HELDOUT_TOOLS`), each a sibling of a training tool, so the
model can only get them right by reading the tool list.
"""

from __future__ import annotations

import calendar
import fnmatch
import html
import math
import posixpath
import shlex
import string
import textwrap
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from random import Random
from typing import Any

WORDS = ["apple", "river", "stone", "green", "cloud", "tiger", "paper", "light", "north", "music", "table", "garden",
         "silver", "window", "rocket", "forest", "orange", "planet", "summer", "bridge", "pencil", "coffee", "yellow",
         "winter", "island", "dragon", "mirror", "castle", "python", "spring", "market", "engine", "letter", "purple"]
FILES = ["report", "notes", "data", "main", "config", "setup", "index", "photo", "backup", "readme"]
EXTS = [".txt", ".py", ".csv", ".json", ".md", ".tar.gz", ".png", ".log"]
DIRS = ["home", "user", "docs", "src", "tmp", "var", "projects", "music", "lib", "work"]
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    description: str
    sample: Callable[[Random], Any]


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    asks: tuple[str, ...]  # the user's phrasings, str.format-ed with the arguments
    answer: str  # the assistant's answer from the result: format fields are the arguments and `result`
    doc: str | None = None  # the docstring to describe it by, when `fn`'s own is empty

    @property
    def description(self) -> str:
        return describe(self.doc or self.fn.__doc__ or "")

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry for this tool."""
        props = {p.name: {"type": JSON_TYPES[p.type], "description": p.description} for p in self.params}
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": props, "required": [p.name for p in self.params]}}}

    def sample_args(self, rng: Random) -> dict[str, Any]:
        return {p.name: p.sample(rng) for p in self.params}

    def run(self, args: dict[str, Any]) -> str:
        """Call the real function; the result as the tool message's text (strings raw, the rest as JSON)."""
        return result_text(self.fn(*[args[p.name] for p in self.params]))

    def signature(self) -> str:
        return f"{self.name}({', '.join(f'{p.name}: {JSON_TYPES[p.type]}' for p in self.params)})"


def result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, tuple | list):
        return "[" + ", ".join(result_text(v) if not isinstance(v, str) else f'"{v}"' for v in value) + "]"
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def describe(doc: str) -> str:
    """The first sentence of the docstring's first paragraph that is not a signature line."""
    for para in textwrap.dedent(doc).strip().split("\n\n"):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if lines and ("->" in lines[0] or (lines[0].endswith(")") and "(" in lines[0].split(" ")[0])):
            lines = lines[1:]  # "hypot(*coordinates) -> value", "log(x, [base=math.e])"
        text = " ".join(" ".join(ln for ln in lines if ln).split())
        if text:  # the first sentence: enough to pick the tool, short enough for a small context
            return text.split(". ")[0].rstrip(".") + "."
    return ""


# -- argument samplers --------------------------------------------------------------------------------------
def ints(lo: int, hi: int) -> Callable[[Random], int]:
    return lambda r: r.randint(lo, hi)


def floats(lo: float, hi: float, digits: int = 2) -> Callable[[Random], float]:
    return lambda r: round(r.uniform(lo, hi), digits)


def words(n_lo: int = 1, n_hi: int = 3) -> Callable[[Random], str]:
    return lambda r: " ".join(r.choice(WORDS) for _ in range(r.randint(n_lo, n_hi)))


def word(r: Random) -> str:
    return r.choice(WORDS)


def path(r: Random) -> str:
    return "/" + "/".join(r.choice(DIRS) for _ in range(r.randint(1, 3))) + "/" + r.choice(FILES) + r.choice(EXTS)


def messy_path(r: Random) -> str:
    parts = [r.choice(DIRS + [".", "..", ""]) for _ in range(r.randint(2, 5))]
    return "/" + "//".join(parts) + "/" + r.choice(FILES)


def char(r: Random) -> str:
    return r.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789$%&@#?!")


def year(r: Random) -> int:
    return r.randint(1900, 2100)


def html_text(r: Random) -> str:
    a, b = r.choice(WORDS), r.choice(WORDS)
    return r.choice([f"<b>{a}</b> & {b}", f"{a} < {b}", f'"{a}" & <{b}>', f"x > {r.randint(1, 99)} & {a}"])


def quoted_url(r: Random) -> str:
    return r.choice(WORDS) + r.choice(["%20", "%2F", "%3F", "%26"]) + r.choice(WORDS)


def shell_text(r: Random) -> str:
    return r.choice([f"{r.choice(WORDS)}'s file", f"{r.choice(WORDS)} {r.choice(WORDS)}", f"$HOME/{r.choice(WORDS)}",
                     f"{r.choice(WORDS)}; rm -rf /"])


def pattern(r: Random) -> str:
    return r.choice(["*", r.choice(FILES) + "*", "*" + r.choice(EXTS), "?" * r.randint(3, 6) + r.choice(EXTS)])


def digits_or_word(r: Random) -> str:
    return str(r.randint(0, 99999)) if r.random() < 0.5 else r.choice(WORDS)


P, TEXT = Param, "the text to work on"
TOOLS: list[Tool] = [
    Tool("gcd", math.gcd, (P("a", int, "the first integer", ints(2, 400)), P("b", int, "the second integer",
        ints(2, 400))),
         ("What is the greatest common divisor of {a} and {b}?", "Find the GCD of {a} and {b}.",
          "Compute the greatest common divisor of the numbers {a} and {b}.",
          "Which largest number divides both {a} and {b}?"),
         "The greatest common divisor of {a} and {b} is {result}."),
    Tool("lcm", math.lcm, (P("a", int, "the first integer", ints(2, 60)), P("b", int, "the second integer",
        ints(2, 60))),
         ("What is the least common multiple of {a} and {b}?", "Find the LCM of {a} and {b}.",
          "Compute the least common multiple of the numbers {a} and {b}.",
          "Which smallest number is a multiple of both {a} and {b}?"),
         "The least common multiple of {a} and {b} is {result}."),
    Tool("factorial", math.factorial, (P("n", int, "a non-negative integer", ints(0, 15)),),
         ("What is {n} factorial?", "Compute {n}!.", "Calculate the factorial of {n}.", "How much is {n}! exactly?"),
         "{n}! is {result}."),
    Tool("comb", math.comb, (P("n", int, "how many items there are", ints(2, 30)),
                             P("k", int, "how many to choose", ints(1, 8))),
         ("How many ways are there to choose {k} items from {n} without order?", "Compute {n} choose {k}.",
          "What is the binomial coefficient of {n} and {k}?",
          "In how many ways can I pick {k} of {n} items, order not mattering?"),
         "There are {result} ways to choose {k} of {n} items."),
    Tool("perm", math.perm, (P("n", int, "how many items there are", ints(2, 20)),
                             P("k", int, "how many to arrange", ints(1, 6))),
         ("How many ways are there to arrange {k} items out of {n} in order?",
          "Compute the number of permutations of {k} out of {n}.",
          "How many ordered selections of {k} from {n} items exist?",
          "In how many ways can I line up {k} of {n} items?"),
         "There are {result} ordered ways to pick {k} of {n} items."),
    Tool("isqrt", math.isqrt, (P("n", int, "a non-negative integer", ints(0, 100000)),),
         ("What is the integer square root of {n}?", "Compute isqrt({n}).",
          "Give me the integer part of the square root of {n}.", "Floor of the square root of {n}, please."),
         "The integer square root of {n} is {result}."),
    Tool("sqrt", math.sqrt, (P("x", float, "a non-negative number", floats(0, 1000)),),
         ("What is the square root of {x}?", "Compute sqrt({x}).", "Calculate the square root of the number {x}.",
          "Take the square root of {x} for me."),
         "The square root of {x} is {result}."),
    Tool("hypot", math.hypot, (P("x", float, "the x coordinate", floats(-50, 50, 1)),
                               P("y", float, "the y coordinate", floats(-50, 50, 1))),
         ("How far is the point ({x}, {y}) from the origin?", "Compute the Euclidean distance of ({x}, {y}) from 0.",
          "What is the length of the vector ({x}, {y})?", "Find the hypotenuse for legs {x} and {y}."),
         "The distance from the origin to ({x}, {y}) is {result}."),
    Tool("log", math.log, (P("x", float, "a positive number", floats(0.5, 5000)),
                           P("base", float, "the base of the logarithm", lambda r: r.choice([2.0, 10.0, 3.0, 5.0]))),
         ("What is the logarithm of {x} to base {base}?", "Compute log base {base} of {x}.",
          "Calculate log({x}) in base {base}.", "To what power must {base} be raised to get {x}?"),
         "The logarithm of {x} to base {base} is {result}."),
    Tool("degrees", math.degrees, (P("x", float, "an angle in radians", floats(-7, 7)),),
         ("Convert {x} radians to degrees.", "How many degrees is an angle of {x} radians?",
          "What is {x} rad in degrees?", "Express the angle {x} (radians) in degrees."),
         "{x} radians is {result} degrees."),
    Tool("radians", math.radians, (P("x", float, "an angle in degrees", floats(-360, 360, 1)),),
         ("Convert {x} degrees to radians.", "How many radians is an angle of {x} degrees?",
          "What is {x} degrees in radians?", "Express the angle {x} (degrees) in radians."),
         "{x} degrees is {result} radians."),
    Tool("floor", math.floor, (P("x", float, "a number", floats(-500, 500)),),
         ("What is the floor of {x}?", "Round {x} down to an integer.", "Compute floor({x}).",
          "Which is the largest integer not above {x}?"),
         "The floor of {x} is {result}."),
    Tool("ceil", math.ceil, (P("x", float, "a number", floats(-500, 500)),),
         ("What is the ceiling of {x}?", "Round {x} up to an integer.", "Compute ceil({x}).",
          "Which is the smallest integer not below {x}?"),
         "The ceiling of {x} is {result}."),
    Tool("power", math.pow, (P("x", float, "the base", floats(0.5, 20, 1)), P("y", float, "the exponent",
        floats(-3, 6, 1))),
         ("What is {x} raised to the power {y}?", "Compute {x} ** {y}.", "Calculate {x} to the power of {y}.",
          "How much is {x} to the {y}th power?"),
         "{x} to the power {y} is {result}."),
    Tool("round_number", round, (P("number", float, "the number to round", floats(-1000, 1000, 4)),
                                 P("ndigits", int, "how many decimal digits to keep", ints(0, 3))),
         ("Round {number} to {ndigits} decimal places.", "What is {number} rounded to {ndigits} digits?",
          "Please round the number {number} keeping {ndigits} decimals.",
          "Give me {number} with only {ndigits} digits after the point."),
         "{number} rounded to {ndigits} digits is {result}."),
    Tool("divmod", divmod, (P("x", int, "the dividend", ints(10, 10000)), P("y", int, "the divisor", ints(2, 60))),
         ("Divide {x} by {y} and give me the quotient and the remainder.", "What are {x} // {y} and {x} % {y}?",
          "Compute divmod({x}, {y}).", "How many times does {y} go into {x}, and what is left over?"),
         "{x} divided by {y} gives quotient and remainder {result}."),
    Tool("binary", bin, (P("number", int, "an integer", ints(0, 5000)),),
         ("What is {number} in binary?", "Convert {number} to binary.", "Show the binary representation of {number}.",
          "Write the integer {number} in base 2."),
         "{number} in binary is {result}."),
    Tool("hexadecimal", hex, (P("number", int, "an integer", ints(0, 70000)),),
         ("What is {number} in hexadecimal?", "Convert {number} to hexadecimal.",
          "Show the hexadecimal representation of {number}.", "Write the integer {number} in base 16."),
         "{number} in hexadecimal is {result}."),
    Tool("octal", oct, (P("number", int, "an integer", ints(0, 5000)),),
         ("What is {number} in octal?", "Convert {number} to octal.", "Show the octal representation of {number}.",
          "Write the integer {number} in base 8."),
         "{number} in octal is {result}."),
    Tool("character", chr, (P("i", int, "a Unicode code point", ints(33, 126)),),
         ("Which character has code point {i}?", "What is chr({i})?", "Give me the character with ordinal {i}.",
          "Turn the code point {i} into its character."),
         "Code point {i} is the character {result}."),
    Tool("code_point", ord, (P("c", str, "a single character", char),),
         ("What is the code point of '{c}'?", "What is ord('{c}')?",
          "Give me the Unicode number of the character '{c}'.",
          "Which ordinal does '{c}' have?"),
         "The code point of '{c}' is {result}."),
    Tool("upper", str.upper, (P("text", str, TEXT, words()),),
         ('Convert "{text}" to upper case.', 'What is "{text}" in capital letters?', 'Make "{text}" uppercase.',
          'Write "{text}" in all caps.'),
         'In upper case, "{text}" is "{result}".'),
    Tool("lower", str.lower, (P("text", str, TEXT, lambda r: words()(r).upper()),),
         ('Convert "{text}" to lower case.', 'What is "{text}" in small letters?', 'Make "{text}" lowercase.',
          'Write "{text}" without capitals.'),
         'In lower case, "{text}" is "{result}".'),
    Tool("title_case", str.title, (P("text", str, TEXT, words(2, 4)),),
         ('Convert "{text}" to title case.', 'Capitalise every word of "{text}".', 'Make "{text}" a title.',
          'Write "{text}" with each word starting in upper case.'),
         'In title case, "{text}" is "{result}".'),
    Tool("swap_case", str.swapcase, (P("text", str, TEXT, lambda r: words(1, 2)(r).title()),),
         ('Swap the case of "{text}".', 'Invert upper and lower case in "{text}".', 'Make "{text}" swap its case.',
          'Write "{text}" with its upper and lower case letters swapped.'),
         'With its case swapped, "{text}" is "{result}".'),
    Tool("capitalize", str.capitalize, (P("text", str, TEXT, words(2, 3)),),
         ('Capitalize "{text}".', 'Make the first letter of "{text}" upper case.', 'Start "{text}" with a capital.',
          'Write "{text}" as a sentence with an initial capital.'),
         'Capitalized, "{text}" is "{result}".'),
    Tool("count_substring", str.count, (P("text", str, TEXT, words(3, 6)),
                                        P("sub", str, "the substring to count", lambda r: r.choice("aeiorst"))),
         ('How many times does "{sub}" occur in "{text}"?', 'Count the "{sub}" in "{text}".',
          'Count occurrences of "{sub}" in the text "{text}".', 'In "{text}", how often does "{sub}" appear?'),
         '"{sub}" occurs {result} times in "{text}".'),
    Tool("starts_with", str.startswith, (P("text", str, TEXT, words(2, 3)),
                                         P("prefix", str, "the prefix to test", lambda r: r.choice(WORDS)[:3])),
         ('Does "{text}" start with "{prefix}"?', 'Check whether "{text}" begins with "{prefix}".',
          'Is "{prefix}" a prefix of "{text}"?', 'Tell me if the text "{text}" starts with "{prefix}".'),
         'Starts with "{prefix}": {result}.'),
    Tool("ends_with", str.endswith, (P("text", str, TEXT, words(2, 3)),
                                     P("suffix", str, "the suffix to test", lambda r: r.choice(WORDS)[-3:])),
         ('Does "{text}" end with "{suffix}"?', 'Check whether "{text}" finishes with "{suffix}".',
          'Is "{suffix}" a suffix of "{text}"?', 'Tell me if the text "{text}" ends with "{suffix}".'),
         'Ends with "{suffix}": {result}.'),
    Tool("replace", str.replace, (P("text", str, TEXT, words(2, 4)), P("old", str, "the substring to replace", word),
                                  P("new", str, "what to put instead", word)),
         ('In "{text}", replace "{old}" with "{new}".', 'Replace every "{old}" in "{text}" by "{new}".',
          'Substitute "{new}" for "{old}" in "{text}".', 'Change "{old}" to "{new}" everywhere in "{text}".'),
         'After the replacement the text is "{result}".'),
    Tool("zero_fill", str.zfill, (P("text", str, "a numeric string", lambda r: str(r.randint(0, 9999))),
                                  P("width", int, "the width to fill", ints(5, 10))),
         ('Pad "{text}" with zeros to width {width}.', 'Zero-fill "{text}" to {width} characters.',
          'Left-pad the number "{text}" with zeros up to {width} digits.', 'Write "{text}" as {width} digits.'),
         'Zero-filled to width {width}: "{result}".'),
    Tool("find_substring", str.find, (P("text", str, TEXT, words(2, 4)),
                                      P("sub", str, "the substring to look for", lambda r: r.choice("aeiorstn"))),
         ('Where is "{sub}" first found in "{text}"?', 'Find the index of "{sub}" in "{text}".',
          'At which position does "{sub}" first appear in "{text}"?', 'Locate "{sub}" in the text "{text}".'),
         '"{sub}" is first found at index {result} of "{text}" (-1 means absent).'),
    Tool("length", len, (P("text", str, TEXT, words(1, 5)),),
         ('How long is "{text}"?', 'How many characters are in "{text}"?', 'Count the characters of "{text}".',
          'What is the length of the string "{text}"?'),
         '"{text}" has {result} characters.'),
    Tool("cap_words", string.capwords, (P("s", str, TEXT, words(2, 4)),),
         ('Capitalize each word in "{s}".', 'Apply capwords to "{s}".', 'Make every word of "{s}" start upper case.',
          'Give "{s}" with capitalized words.'),
         'With capitalized words: "{result}".'),
    Tool("shorten", textwrap.shorten, (P("text", str, TEXT, words(5, 9)),
                                       P("width", int, "the maximum width", ints(12, 30))),
         ('Shorten "{text}" to at most {width} characters.', 'Truncate "{text}" to fit {width} characters.',
          'Make "{text}" fit within {width} columns.', 'Cut "{text}" down to {width} characters.'),
         'Shortened: "{result}".'),
    Tool("html_escape", html.escape, (P("s", str, "the text to escape", html_text),
                                      P("quote", bool, "also escape quote characters", lambda r: r.random() < 0.5)),
         ('Escape "{s}" for HTML (escape quotes: {quote}).', 'Make "{s}" safe for HTML, quote={quote}.',
          'HTML-escape the text "{s}" with quote set to {quote}.', 'Convert "{s}" to HTML-safe text; quote {quote}.'),
         'HTML-escaped: {result}'),
    Tool("url_unquote", urllib.parse.unquote, (P("string", str, "a percent-encoded string", quoted_url),),
         ('Decode the URL string "{string}".', 'Unquote "{string}".', 'Replace the %xx escapes in "{string}".',
          'What does "{string}" decode to?'),
         'Decoded: "{result}".'),
    Tool("shell_quote", shlex.quote, (P("s", str, "the string to escape", shell_text),),
         ('Quote "{s}" for a shell.', 'Shell-escape the string "{s}".', 'Make "{s}" safe as a shell argument.',
          'How do I write "{s}" in a shell command?'),
         "Shell-escaped: {result}"),
    Tool("shell_split", shlex.split, (P("s", str, "the command line", lambda r: " ".join(
        [r.choice(["ls", "cp", "grep", "echo"]), *[r.choice(WORDS) for _ in range(r.randint(1, 3))]])),
                                      P("comments", bool, "whether to allow comments", lambda r: r.random() < 0.5)),
         ('Split "{s}" like a shell would (comments {comments}).', 'Tokenize the command "{s}", comments={comments}.',
          'Break "{s}" into shell words; comments: {comments}.', 'Shell-split "{s}" with comments set to {comments}.'),
         "The words are {result}."),
    Tool("filename_match", fnmatch.fnmatch, (P("name", str, "the file name",
        lambda r: r.choice(FILES) + r.choice(EXTS)),
                                             P("pat", str, "the shell-style pattern", pattern)),
         ('Does "{name}" match the pattern "{pat}"?', 'Check "{name}" against the glob "{pat}".',
          'Is "{name}" matched by "{pat}"?', 'Test the file name "{name}" with pattern "{pat}".'),
         'Match: {result}.'),
    Tool("basename", posixpath.basename, (P("p", str, "a path", path),),
         ('What is the file name in the path "{p}"?', 'Get the basename of "{p}".',
          'Give me the final component of "{p}".', 'Which file does "{p}" point to, without its directory?'),
         'The final component of "{p}" is "{result}".'),
    Tool("dirname", posixpath.dirname, (P("p", str, "a path", path),),
         ('What is the directory in the path "{p}"?', 'Get the dirname of "{p}".',
          'Give me the directory component of "{p}".', 'Which directory holds "{p}"?'),
         'The directory of "{p}" is "{result}".'),
    Tool("split_extension", posixpath.splitext, (P("p", str, "a path", path),),
         ('Split the extension from "{p}".', 'What is the extension of "{p}"?',
          'Separate "{p}" into root and extension.', 'Give me the root and the extension of the path "{p}".'),
         "Root and extension: {result}."),
    Tool("normalize_path", posixpath.normpath, (P("path", str, "a path", messy_path),),
         ('Normalize the path "{path}".', 'Clean up "{path}".', 'Simplify the path "{path}".',
          'What is "{path}" without the double slashes and dots?'),
         'Normalized: "{result}".'),
    Tool("is_leap_year", calendar.isleap, (P("year", int, "a year", year),),
         ("Is {year} a leap year?", "Check whether {year} is a leap year.",
          "Does the year {year} have a 29th of February?",
          "Tell me if {year} is leap."),
         "Leap year: {result}."),
    Tool("leap_days", calendar.leapdays, (P("y1", int, "the first year", ints(1800, 2000)),
                                          P("y2", int, "the year after the last", ints(2001, 2200))),
         ("How many leap years are there from {y1} up to {y2}?", "Count the leap years between {y1} and {y2}.",
          "Give me the number of leap years in the range {y1} to {y2}.",
          "From {y1} until {y2}, how many years are leap?"),
         "There are {result} leap years from {y1} up to {y2}."),
    Tool("weekday", calendar.weekday, (P("year", int, "the year", year), P("month", int, "the month (1-12)",
        ints(1, 12)),
                                       P("day", int, "the day of the month (1-28)", ints(1, 28))),
         ("Which day of the week is {year}-{month}-{day}?", "What weekday was {day}/{month}/{year} (day/month/year)?",
          "Give me the weekday number of year {year}, month {month}, day {day}.",
          "On which weekday does day {day} of month {month} in {year} fall?"),
         "Weekday {result} (0 is Monday)."),
    Tool("month_range", calendar.monthrange, (P("year", int, "the year", year),
                                              P("month", int, "the month (1-12)", ints(1, 12))),
         ("How many days has month {month} of {year}, and which weekday does it start on?",
          "Give me the month range of {year}-{month}.",
          "What are the first weekday and length of month {month} in {year}?",
          "Describe month {month} of the year {year}: first weekday and number of days."),
         "First weekday and number of days: {result}."),
    Tool("unicode_name", unicodedata.name, (P("chr", str, "a single character", char),),
         ("What is the Unicode name of '{chr}'?", "Name the character '{chr}'.",
          "Look up the Unicode name for '{chr}'.",
          "Which name does Unicode give to '{chr}'?"),
         "The Unicode name of '{chr}' is {result}."),
    Tool("copy_sign", math.copysign, (P("x", float, "the magnitude", floats(-100, 100)),
                                      P("y", float, "the number giving the sign", floats(-100, 100))),
         ("Give {x} the sign of {y}.", "Compute copysign({x}, {y}).", "Take the magnitude of {x} with the sign of {y}.",
          "What is {x} with the sign of {y}?"),
         "{x} with the sign of {y} is {result}."),
    Tool("is_digit", str.isdigit, (P("text", str, TEXT, digits_or_word),),
         ('Is "{text}" made of digits only?', 'Check whether "{text}" is a digit string.',
          'Does "{text}" contain only digits?', 'Tell me if "{text}" is all digits.'),
         "Digits only: {result}."),
]

HELDOUT_TOOLS = {"lcm", "radians", "hexadecimal", "swap_case", "ends_with", "dirname", "leap_days"}
BY_NAME = {t.name: t for t in TOOLS}
