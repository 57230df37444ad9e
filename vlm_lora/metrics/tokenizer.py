"""Pure-Python imitation of the COCO caption tokenizer.

pycocoevalcap's ``PTBTokenizer`` writes all captions, one per line, to a file,
runs Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` (Java)
on it and drops the tokens listed in ``PUNCTUATIONS``.  This module does the
same without Java: a small longest-match lexer with the rules of CoreNLP's
``PTBLexer.flex`` (words, numbers, hyphenated words, clitics ``n't 's 're 've
'd 'll 'm``, assimilations ``cannot gonna wanna ...``, abbreviation and
acronym lists, quotes, brackets, ellipses, dashes, currency, URLs, e-mails),
tuned token for token against the 3.4.1 jar.

Behaviour worth knowing (identical to the Java pipeline):

* brackets become ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` and are *kept*:
  pycocoevalcap's list holds upper-case ``-LRB-`` etc., which never match the
  lower-cased output;
* ``. , : ; ? ! - -- ...`` and quote tokens are dropped, while ``!!``, ``?!``,
  ``%``, ``&``, ``*``, ``#``, ``$`` are kept;
* abbreviations keep their period (``mr.``, ``st.``, ``etc.``, ``u.s.``,
  ``e.g.``, single letters like ``b.``); other words lose it;
* ``3.5``, ``10,000``, ``12:30``, ``3/4``, ``well-known``, ``o'clock`` stay
  single tokens, ``1 1/2`` becomes one token joined by U+00A0.

Known differences from the Java tokenizer (none seen in real captions):

* ``ptb_tokenize`` treats its input as a one-line file.  Java sees every
  caption of a batch at once and a few rules look past the end of a line (an
  acronym such as ``B.`` followed by a line starting with ``The``, ``A``, ``He``
  ...; ``'ll`` / ``5'10`` at the very end of the file); ``ptb_tokenize_lines``
  reproduces that for a list of captions, as ``score_captions`` uses it;
* the rules were reconstructed from the public ``PTBLexer.flex`` history and
  checked against the 3.4.1 jar on ~60k strings (handwritten cases, random
  word salads, random character soup): all identical except some HTML
  entities glued to digits (``82&eacute;``).  Not emulated at all: SGML tags
  spanning lines and CP1252 control characters (U+0080-U+009F);
* letters and digits use Python's Unicode tables and ``str.lower``, which can
  differ from Java 7/8 for exotic characters; characters no rule accepts
  (e.g. emoji) are deleted, as Java does.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "ptb_tokenize_lines"]

# Exactly pycocoevalcap/tokenizer/ptbtokenizer.py.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def _letter_class() -> str:
    """Character-class body matching every Unicode letter (``str.isalpha``)."""
    parts, start, prev = [], -1, -1
    for cp in range(0x30001):
        if cp < 0x30000 and chr(cp).isalpha():
            start = cp if start < 0 else start
            prev = cp
        elif start >= 0:
            parts.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
            start = -1
    return "".join(parts) + "\u00ad"  # JFlex LETTER also includes the soft hyphen


L = "[" + _letter_class() + "]"
AN = r"(?:" + L + r"|\d)"
ASCII_AN = "[A-Za-z0-9]"
APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOSETC = r"(?:['`\u0092\u2019\u0091\u2018\u201b]|(?i:&apos;))"
SPACENL = "[ \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\u000b\u000c\u0085]"
SKIP = re.compile("(?:[ \t\u00a0\u2000-\u200b\u3000\r\n\u2028\u2029\u000b\u000c\u0085"
                  "\x00\x7f\u200e\u200f\ufeff]|(?i:&nbsp;))+")

SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"  # HTML accented vowels count as letters in words
WORD = rf"(?:{L}|{SPLET})(?:{L}|{SPLET}|\d)*(?:[.!?](?:{L}|{SPLET})(?:{L}|{SPLET}|\d)*)*"
PHONE = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"
         r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SREDAUX = rf"[nN]{APOSETC}[tT]"
SWORD = r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
ACRO = (r"[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)"
        r"|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))")
ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+"
THING = rf"(?:[dDoOlL]{APOSETC}{AN})?{AN}+(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{APOSETC}{AN})?{AN}+)*"
HTHINGS = [rf"{ASCII_AN}[A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{ACRO2}\.))+",
           rf"{ASCII_AN}[A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\.|[A-Za-z0-9\u00ad]+))+"]
THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
INSENTP = "[,;:\u3001]"
QUOTE_CHARS = "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]"
QUOTES = [f"{APOS}|''|{QUOTE_CHARS}{{1,2}}", f"{QUOTE_CHARS}{{1,2}}|''|{APOS}"]
FILE_EXT = (r"(?i:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov"
            r"|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv|mp[34g])")


def _cl(words: str) -> str:
    """Caseless alternation; a leading ``^`` marks a case-sensitive first letter."""
    alts = [re.escape(w[1]) + "(?i:" + w[2:] + ")" if w[0] == "^" else "(?i:" + w + ")"
            for w in words.split()]
    return "(?:" + "|".join(alts) + ")"


# Abbreviation lists of CoreNLP 3.4.1 (each entry checked against the jar).
ABBREV1 = _cl(r"jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
              r"ala ariz ^Az ^Ark calif colo conn ct dak ^Del fla ga ^Ill ind kans? ky ^La ^Mass md "
              r"mich minn ^Miss mo mont neb nev okla ^Ore ^Pa penn tenn ^Tex va vt ^Wash wisc? wyo "
              r"inc cos? corp ltd plc rt bancorp bhd assn univ intl sys tel est ext sq jr sr bros "
              r"(?:ed|ph)\.d blvd rd esq etc al seq bldg") + r"|(?i:pp?t)[ye](?i:s)?"
ABBREV4 = _cl(r"mr mrs ms ^Miss drs? profs? sens? reps? attys? lt col gen messrs govs? adm rev maj "
              r"sgt cpl pvt capt ste? ave pres lieut hon brig co?mdr pfc spc supts? det mt ft adj adv "
              r"asst assoc ens insp mlle mme msgr sfc vs alex wm jos cie a\.k\.a cf treas ph invt elec "
              r"natl m[ft]g dept") + "|v|" + ACRO
ABBREV3 = _cl(r"ca figs? prop nos? art pp op")
SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
        r"(?:[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|[A-Za-z][A-Za-z0-9_:.\-]*))?))*[ ]*/?"
        r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
ACRO_FOLLOW = "(?:" + SGML + "|" + _cl(
                  r"^About ^According ^Additionally ^After ^An ^A ^As ^At ^But ^Did ^During ^Earlier "
                  r"^He ^Her ^Here ^How ^However ^If ^In ^It ^Last ^Many ^More ^Mr\. ^Ms\. ^Now ^Once "
                  r"^One ^Other ^Our ^She ^Since ^So ^Some ^Such ^That ^The ^Their ^Then ^There ^These "
                  r"^They ^This ^We ^When ^While ^What ^Who ^Why ^Yet ^You") + ")"
APOWORD = (rf"{APOS}[nN]{APOS}?|[lLdDjJ]{APOS}|(?i:dunkin|somethin|ol){APOS}|{APOS}(?i:em)"
           rf"|[A-HJ-XZn]{APOSETC}{L}{{2}}{L}*|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?)"
           rf"|{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*|{APOS}(?i:cause)"
           rf"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:o){APOSETC}(?i:o)")
EMAIL = (r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
         r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:(?i:&gt;)|>)?")
FULLURL = r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"
LIKELYURL = (r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
             r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)))"
             r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?")
SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
ASIANSMILEY = (r"[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
               r"|\([\^x=~<>']-[\^x=~<>'`]\)")
MISCSYMBOL = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be"
              "\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a"
              "\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2025"
              "\u2030-\u2038\u203b\u203c\u203e-\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f"
              "\u2190-\u21ff\u2200-\u2bff\u3001-\u3006\u3008-\u3020\u30fb\uff01-\uff0f\uff1a-\uff20"
              "\uff3b-\uff40\uff5b-\uff65]")


def _latex_quotes(tok: str, left: bool) -> str:
    """CoreNLP ``latexQuotes``: map quote characters to `` ` `` / ``'`` forms."""
    if left:
        tok = re.sub(r"&apos;|'", "`", tok)
        tok = re.sub(r"\"|''|'`|`'|&quot;", "``", tok)
    else:
        tok = re.sub(r"\"|''|'`|`'|&quot;", "''", tok)
    tok = re.sub("[\u0091\u2018\u201b\u2039]", "`", tok)
    tok = re.sub("[\u0092\u2019\u203a]", "'", tok)
    tok = re.sub("[\u0093\u201c\u00ab]", "``", tok)
    return re.sub("[\u0094\u201d\u00bb]", "''", tok)


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# An action maps the matched token text to (output tokens, characters consumed).
Action = Callable[[str], tuple[list[str], int]]


def _keep(tok: str) -> tuple[list[str], int]:
    return [tok], len(tok)


def _const(out: str) -> Action:
    return lambda tok: ([out], len(tok))


def _map(table: dict[str, str]) -> Action:
    return lambda tok: ([table.get(tok, tok)], len(tok))


def _pushback(n: int) -> Action:
    return lambda tok: ([tok[:-n]], len(tok) - n)


def _quotes(left: bool) -> Action:
    return lambda tok: ([_latex_quotes(tok, left)], len(tok))


def _nbsp(tok: str) -> tuple[list[str], int]:
    return [tok.replace(" ", "\u00a0")], len(tok)


def _amp(tok: str) -> tuple[list[str], int]:
    return [re.sub("(?i:&amp;)", "&", tok)], len(tok)


def _parens(tok: str) -> tuple[list[str], int]:
    return [tok.replace("(", "-LRB-").replace(")", "-RRB-")], len(tok)


def _acronym(tok: str) -> tuple[list[str], int]:
    # processAcronym: "B." -> "B" (period re-lexed); "U.S." -> "U.S." (period re-lexed too).
    return [tok[:-1] if len(tok) == 2 else tok], len(tok) - 1


def _hyphens(tok: str) -> tuple[list[str], int]:
    return ["--" if 3 <= len(tok) <= 4 else tok], len(tok)


def _ctx(tok: str, context: str) -> str:
    """Pattern for token ``tok`` that must be followed by ``context`` (JFlex ``tok/context``)."""
    return f"(?P<t>{tok})(?:{context})"


# Rules in PTBLexer.flex order.  The longest match wins (trailing context
# included) and ties go to the earlier rule.  A rule may list several
# patterns: Python's ``re`` takes the first alternative that matches, JFlex
# the longest, so alternatives are tried in both orders where it matters.
_RULES_SRC: list[tuple[list[str], Action]] = [
    ([r"(?i:c\+\+|[cf]#)"], _keep),
    ([r"(?i:cannot|'twas)"], _pushback(3)),
    ([r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)"], _pushback(2)),
    ([SGML], _nbsp),
    ([r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]"], _const("--")),
    ([r"&(?i:amp);"], _const("&")),
    ([r"&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"], _keep),
    ([_ctx(WORD, REDAUX)], _keep),
    ([_ctx(SWORD, SREDAUX)], _keep),
    ([WORD], _keep),
    ([APOWORD], _keep),
    ([_ctx(r"[yY]" + APOS, L)], _keep),
    ([FULLURL], _keep),
    ([LIKELYURL], _keep),
    ([EMAIL], _keep),
    ([r"@[a-zA-Z_][a-zA-Z_0-9]*", f"#(?:{L}|{SPLET})+"], _keep),
    ([_ctx(REDAUX, "[^A-Za-z]")], _quotes(False)),
    ([r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}"], _keep),
    ([r"[-+]?\d*(?:[.:,\u00ad\u066b\u066c]\d+)+", r"[-+]?\d+"], _keep),
    (["[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"], _keep),
    ([r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}"], _nbsp),
    ([r"[\u00bc\u00bd\u00be\u2153-\u215e]"], _map(_FRACTIONS)),
    ([rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"
      rf"|cap{APOS}n|c{APOS}est)"], _amp),
    ([r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"], _keep),
    ([r"[A-Z]*\$|#"], _keep),
    (["[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20aa\u20ac\u20b9\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"],
     _map(_CURRENCY)),
    ([_ctx(f"(?:{ACRO})\\.", f"{SPACENL}+{ACRO_FOLLOW}{SPACENL}")], _acronym),
    ([_ctx(ABBREV3 + r"\.", SPACENL + r"?\d")], _keep),
    ([_ctx(f"(?:{ABBREV1})\\.", r"[\s\S]{2}"), f"(?:{ABBREV1})\\."], _keep),
    ([f"(?:{ABBREV4})\\."], _keep),
    ([_ctx(APOS + r"\d\d", SPACENL)], _keep),
    ([_ctx(f"{AN}+(?:\\.{AN}+)*\\.{FILE_EXT}", f"{SPACENL}|[.?!,]")], _keep),
    ([_ctx(WORD + r"\.", INSENTP)], _keep),
    ([PHONE], lambda t: _parens(t.replace(" ", "\u00a0"))),
    ([_ctx("\"|(?i:&quot;)", "[A-Za-z0-9$]")], _quotes(True)),
    (["\"|(?i:&quot;)"], _quotes(False)),
    ([r"<|(?i:&lt;)"], _const("<")),
    ([r">|(?i:&gt;)"], _const(">")),
    ([_ctx(SMILEY, "[^A-Za-z0-9]")], _parens),
    ([ASIANSMILEY], _parens),
    ([r"[(){}\[\]]"], _map(_BRACKETS)),
    ([r"-+"], _hyphens),
    ([r"\.\.\.+|[\u0085\u2026]", r"\.[ \u00a0](?:\.[ \u00a0])+\."], _const("...")),
    ([r"@+|#+|_+"], _keep),
    ([r"\*+|(?:\\\*){1,3}"], _keep),
    ([INSENTP], _keep),
    ([r"[?!]+"], _keep),
    (["[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"], _keep),
    ([r"="], _keep),
    ([r"/"], _keep),
    ([_ctx(h + r"\.", INSENTP) for h in HTHINGS], _keep),
    (HTHINGS, _keep),
    ([_ctx(THING + r"\.", INSENTP)], _keep),
    ([THING], _keep),
    ([_ctx(THINGA + r"\.", INSENTP), THINGA], _amp),
    ([_ctx("'", r"[A-Za-z][^ \t\n\r\u00a0]")], _quotes(True)),
    ([REDAUX], _quotes(False)),
    ([SREDAUX], _quotes(False)),
    (QUOTES, _quotes(False)),
    ([r"<<|>>"], _keep),
    ([MISCSYMBOL], _keep),
]


@functools.cache
def _rules() -> list[tuple[list[re.Pattern[str]], Action]]:
    """Compiled rules (compiled on first use: the letter class makes this slow-ish)."""
    return [([re.compile(p) for p in patterns], action) for patterns, action in _RULES_SRC]


# Fast path for plain lower-case captions ("a dog, on a bench."), which the
# full lexer would split on spaces anyway: only assimilations split and the
# final period goes unless the last word is an abbreviation.
_SIMPLE = re.compile(r"[a-z ,]*(?:[a-z]\.)?")
_ASSIMILATIONS = {w: (w[:-3], w[-3:]) if w == "cannot" else (w[:-2], w[-2:])
                  for w in ("cannot", "gonna", "gotta", "lemme", "gimme", "wanna")}


def _simple_tokens(line: str) -> list[str] | None:
    """Tokens of a plain lower-case line, or None when the full lexer is needed."""
    if not _SIMPLE.fullmatch(line):
        return None
    words = line.replace(",", " ").split()
    if line.endswith("."):
        if re.fullmatch(f"(?:{ABBREV1}|{ABBREV3}|{ABBREV4})\\.", words[-1]):
            return None
        words[-1] = words[-1][:-1]
    return [part for w in words for part in _ASSIMILATIONS.get(w, (w,))]


def _lex(text: str, following: str | None = None) -> list[str]:
    """Raw PTBLexer-style tokens of ``text`` (original case, punctuation included).

    ``following`` is the start of the next line of the file (None: end of file);
    a few rules look at it through their trailing context.
    """
    limit = len(text)
    if following is not None:
        text = text + "\n" + following
    out: list[str] = []
    pos = 0
    while pos < limit:
        m = SKIP.match(text, pos)
        if m:
            pos = m.end()
            continue
        best_len, best_tok, best_action = 0, "", _keep
        for patterns, action in _rules():
            for pattern in patterns:
                m = pattern.match(text, pos)
                if m is not None and m.end() - pos > best_len:
                    best_len = m.end() - pos
                    best_tok = m.group("t") if "t" in pattern.groupindex else m.group(0)
                    best_action = action
        if best_len == 0:  # untokenizable character: deleted, as Java does by default
            pos += 1
            continue
        tokens, consumed = best_action(best_tok)
        out.extend(t.replace("\u00ad", "") or t for t in tokens)
        pos += consumed
    return out


@functools.lru_cache(maxsize=1 << 16)
def _tokenize_line(line: str, following: str | None) -> str:
    simple = _simple_tokens(line)
    if simple is not None:
        return " ".join(simple)
    tokens = (tok.lower() for tok in _lex(line, following))
    return " ".join(tok for tok in tokens if tok not in PUNCTUATIONS)


def ptb_tokenize(text: str) -> str:
    """Tokenize one caption as pycocoevalcap's PTBTokenizer would (space-joined)."""
    return _tokenize_line(text.replace("\n", " "), None)


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """Tokenize captions the way one PTBTokenizer call on this list would.

    Identical to ``[ptb_tokenize(c) for c in captions]`` except for the rare
    rule that looks into the next line (see the module docstring).
    """
    lines = [c.replace("\n", " ") for c in captions]
    out = []
    for i, line in enumerate(lines):
        following = None if i + 1 == len(lines) else lines[i + 1]
        for j in range(i + 2, len(lines)):  # context rules need < 40 characters
            if len(following) >= 40:
                break
            following += "\n" + lines[j]
        out.append(_tokenize_line(line, None if following is None else following[:40]))
    return out
