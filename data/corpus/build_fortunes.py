#!/usr/bin/env python3
"""Build the multilingual fortune corpus ``data/corpus/fortunes/<lang>.jsonl``.

Re-run it exactly like this (as root, on Debian 12 "bookworm"; from the repository root):

    apt-get install -y fortunes fortunes-de fortunes-es fortunes-it
    python3 data/corpus/build_fortunes.py

``python3 data/corpus/build_fortunes.py --check`` rebuilds in memory and exits 1 if the
files on disk differ (they should be byte-identical).

Built from these Debian 12 packages (``dpkg-query -W``); the script refuses other versions
unless given ``--any-version``, since other versions give other files:

    fortunes      1:1.99.1-7.3   (English; BSD licence)
    fortunes-min  1:1.99.1-7.3   (English; BSD licence; a dependency of fortunes)
    fortunes-de   0.35-1         (German; GPL-2+)
    fortunes-es   1.36           (Spanish; texts presumed public domain, package GPL-2+)
    fortunes-it   1.99-4.1       (Italian; declared public domain / "freeware")

There is no French fortune package in Debian 12 (``fortunes-fr`` does not exist), so there is
no ``fr.jsonl``; see README.md beside this script.

What it does (standard library only, deterministic):

* lists each package's files with ``dpkg-query -L`` and reads the fortune collections under
  /usr/share/games/fortunes (regular files only: the ``.u8`` and top-level symlinks point at the
  same files, ``.dat`` are strfile indexes);
* skips offensive collections (anything under an ``off/`` folder, fortune-it's ``-o`` files)
  and the collections that are ASCII art or bilingual by design (``EXCLUDED`` below);
* decodes each file as UTF-8, falling back to cp1252/latin-1 for old 8-bit files, then repairs
  mojibake left in the packaged files (UTF-8 read as latin-1/cp1252, once or more, e.g. "CÃ©line"
  -> "Céline", and stray C1 controls such as U+0092 -> "'");
* splits entries at lines holding only ``%``; removes overstrike (``x\\bx``) and terminal escape
  sequences; NFC-normalises; strips trailing spaces from each line and blank lines around the
  entry (line breaks and indentation inside an entry are kept);
* drops entries shorter than 40 or longer than 600 characters, entries whose non-space
  characters are less than 70 % letters, entries with other control characters, and entries
  not in the collection's language (``language_ok``: a character-trigram model trained on the
  collections themselves must pick the collection's language, and no other language, French
  included, may show clearly more function words; this removes e.g. English quotations inside
  the German collections);
* deduplicates within a language (case- and whitespace-insensitive; the first occurrence in
  sorted path order keeps its source);
* per language, sorts the survivors by the SHA-256 of their text and keeps the first
  ``MAX_PER_LANG`` (400), passing over an entry whose collection already has
  ``MAX_PER_COLLECTION`` (100): a pseudo-random sample spread over the collections roughly in
  proportion to their (filtered) size, with no collection above a quarter of the language,
  identical on every run;
* writes one JSON object per line, ``{"text": ..., "source": "<package>/<collection>"}``, in that
  hash order, UTF-8 without ASCII escaping, ``\\n`` line ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

FORTUNE_DIR = "/usr/share/games/fortunes/"
OUT_DIR = Path(__file__).resolve().parent / "fortunes"

# package -> (language, version it was built from)
PACKAGES = {
    "fortunes": ("en", "1:1.99.1-7.3"),
    "fortunes-min": ("en", "1:1.99.1-7.3"),
    "fortunes-de": ("de", "0.35-1"),
    "fortunes-es": ("es", "1.36"),
    "fortunes-it": ("it", "1.99-4.1"),
}

# Collections left out on purpose (besides off/ and -o files): ASCII art, or bilingual pairs.
EXCLUDED = {
    "fortunes/ascii-art": "ASCII art",
    "fortunes-de/asciiart": "ASCII art",
    "fortunes-it/banner": "ASCII-art banner",
    "fortunes-de/translations": "English/German phrase pairs",
}

MIN_CHARS = 40
MAX_CHARS = 600
MIN_LETTER_SHARE = 0.70
MAX_PER_LANG = 400
MAX_PER_COLLECTION = MAX_PER_LANG // 4  # so that one big collection (de/zitate) cannot fill most of a language

# Common function words; a word listed for two or more languages is removed from all of them
# (below), so each hit is evidence for exactly one language. Italian also lists the
# apostrophe-accent spellings of old ASCII files ("perche'" -> "perche").
_FUNCTION_WORDS = {
    "en": """the and of to is that it you was for are with he be this have not but they his
        from what when can there if all your will one would who which do my we an at by or on
        she her them been has were how than then out about just like because only should could
        into its our him me any some more most never always every why where""",
    "de": """der die das und ist nicht ein eine einen einem dem den des zu mit sich auf für ich
        du er sie wir ihr es auch wenn aber noch nur wie kann sind wird hat haben oder bei von
        aus nach dass daß man mir mich dich was wer so schon immer keine kein sein war im vom
        zum zur über als doch diese dieser ihn uns sehr wieder nichts alles viel""",
    "es": """el los las del que y en es un una por con para se lo su sus al como más pero sí
        cuando todo todos hay está ser muy ya también porque sin sobre yo le nos siempre nunca
        donde quien qué cómo esta este eso pues hasta desde hace tiene puede hombre mujer mas
        ni sólo solo cada mejor bien""",
    "fr": """le la les des du et est une un pas que qui dans pour sur avec ce cette il elle ils
        je nous vous son sa ses au aux ne plus mais ou où comme tout être avoir fait été sont
        très aussi leur on y en""",
    "it": """il lo la gli le di del della dei che e è non un una uno per con su sono ma come più
        piu anche questo questa quello mi ti ci si ho ha hanno se perché perche cosa quando
        molto tutto tutti nel nella alla al dalla sempre essere io lui lei noi voi loro sia
        ogni già gia così cosi fa fatto""",
}
# Also frequent in another of these languages (en "so"/de "so", es "me"/en "me", it "all'"...).
_SHARED = set("an so all si son me he ha cosa war mi".split())
_counts = Counter(w for words in _FUNCTION_WORDS.values() for w in set(words.split()))
FUNCTION_WORDS = {
    lang: frozenset(w for w in words.split() if _counts[w] == 1 and w not in _SHARED)
    for lang, words in _FUNCTION_WORDS.items()
}

_WORD = re.compile(r"[^\W\d_]+")
_OVERSTRIKE = re.compile(r"[^\x08]\x08")
_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[()][A-Za-z0-9]|[A-Za-z=>])")
_CONTROL_OK = {"\n", "\t"}
# A run of characters that could be the latin-1/cp1252 reading of UTF-8 bytes.
_CP1252_SPECIALS = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
_MOJIBAKE_RUN = re.compile("[\u0080-\u00ff" + _CP1252_SPECIALS + "]{2,}")
_MOJIBAKE_HINT = re.compile("[ÃÂâ][\u0080-\u00bf" + _CP1252_SPECIALS + "]")


def _to_bytes(run: str) -> bytes | None:
    out = bytearray()
    for ch in run:
        if ord(ch) < 0x100 and not 0x80 <= ord(ch) < 0xA0 or ch in _CP1252_SPECIALS:
            try:
                out += ch.encode("cp1252")
            except UnicodeEncodeError:
                out += ch.encode("latin-1")
        else:  # a C1 control: latin-1 reading of the same byte
            out += ch.encode("latin-1")
    return bytes(out)


def fix_mojibake(text: str) -> str:
    """Undo UTF-8-read-as-latin-1/cp1252, repeatedly, only where the result is valid UTF-8."""
    for _ in range(4):
        if not _MOJIBAKE_HINT.search(text):
            break

        def repair(m: re.Match) -> str:
            try:
                return _to_bytes(m.group(0)).decode("utf-8")
            except UnicodeDecodeError:
                return m.group(0)

        fixed = _MOJIBAKE_RUN.sub(repair, text)
        if fixed == text:
            break
        text = fixed
    # Stray C1 controls are cp1252 bytes read as latin-1 (e.g. U+0092 for a right quote).
    return re.sub(
        "[\u0080-\u009f]",
        lambda m: bytes([ord(m.group(0))]).decode("cp1252", errors="replace"),
        text,
    )


def decode_file(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def clean(raw: str) -> str:
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    while True:
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = _ESCAPE.sub("", text)
    text = fix_mojibake(text)
    text = unicodedata.normalize("NFC", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n").rstrip()


def split_entries(text: str) -> list[str]:
    entries, cur = [], []
    for line in text.split("\n"):
        if line.rstrip() == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    return entries


def function_word_scores(text: str) -> dict[str, int]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {lang: sum(w in fw for w in words) for lang, fw in FUNCTION_WORDS.items()}


def trigrams(text: str) -> list[str]:
    """Character trigrams of the lower-cased letters, words separated by one space."""
    padded = " " + " ".join(w.lower() for w in _WORD.findall(text)) + " "
    return [padded[i:i + 3] for i in range(len(padded) - 2)]


class LanguageId:
    """Character-trigram language identification, trained on the collections themselves.

    Each language's model counts the trigrams of all its candidate entries (those that passed
    the other filters); an entry is scored with its own trigrams left out of its language's
    counts, so it gets no credit for being part of the training text. The collections are
    overwhelmingly in their own language, so a quotation in another language scores higher
    under that language's model.
    """

    def __init__(self, texts_by_lang: dict[str, list[str]]):
        self.counts = {lang: Counter(t for text in texts for t in trigrams(text))
                       for lang, texts in sorted(texts_by_lang.items())}
        self.totals = {lang: sum(c.values()) for lang, c in self.counts.items()}
        self.vocab = len(set().union(*self.counts.values())) + 1

    def best(self, text: str, own: str) -> str:
        grams = trigrams(text)
        self_counts = Counter(grams)
        scores = {}
        for lang, counts in self.counts.items():
            minus = self_counts if lang == own else {}
            denom = math.log(self.totals[lang] - (len(grams) if minus else 0) + self.vocab)
            scores[lang] = sum(math.log(counts[g] - minus.get(g, 0) + 1) for g in grams) - len(grams) * denom
        return max(sorted(scores), key=scores.__getitem__)


def language_ok(text: str, lang: str, lid: LanguageId) -> bool:
    """The trigram model of `lang` fits best, and no other language (French included, which
    has no model) has at least 3, and more than `lang`, of its distinctive function words."""
    if lid.best(text, lang) != lang:
        return False
    scores = function_word_scores(text)
    own = scores.pop(lang)
    return not any(n >= 3 and n > own for n in scores.values())


def reject_reason(text: str) -> str | None:
    """Why the entry is dropped before the language check, or None."""
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return "length"
    if any(unicodedata.category(c) == "Cc" and c not in _CONTROL_OK for c in text) or "\ufffd" in text:
        return "control"
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < MIN_LETTER_SHARE * len(visible):
        return "non-letters"
    return None


def dedup_key(text: str) -> str:
    return " ".join(text.casefold().split())


def installed_version(pkg: str) -> str | None:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", pkg],
        capture_output=True, text=True,
    )
    status, _, version = res.stdout.partition(" ")
    return version if res.returncode == 0 and status == "installed" else None


def collection_files(pkg: str) -> list[tuple[str, Path]]:
    """(collection name, path) of the package's fortune collections, sorted; offensive ones out."""
    listing = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True, check=True)
    found = []
    for line in listing.stdout.splitlines():
        if not line.startswith(FORTUNE_DIR) or line.endswith((".dat", ".u8")):
            continue
        path = Path(line)
        if path.is_symlink() or not path.is_file():
            continue
        rel = line[len(FORTUNE_DIR):]
        parts = rel.split("/")
        if "off" in parts[:-1] or parts[-1].endswith("-o"):
            continue
        # drop the language folder (de/, es/, it/): "<package>/<collection file name>"
        name = "/".join(parts[1:]) if len(parts) > 1 and parts[0] in {"de", "es", "it", "fr"} else rel
        found.append((name, path))
    return sorted(found)


def build(verbose: bool = True) -> tuple[dict[str, bytes], dict]:
    stats: dict = {"rejected": defaultdict(Counter), "kept_pool": Counter(), "encodings": {}}
    # 1. read, clean and filter every collection: lang -> [(text, source)] in sorted path order
    candidates: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pkg, (lang, _) in PACKAGES.items():
        for name, path in collection_files(pkg):
            source = f"{pkg}/{name}"
            if source in EXCLUDED:
                stats["rejected"][source]["excluded collection"] += 1
                continue
            text, enc = decode_file(path.read_bytes())
            stats["encodings"][source] = enc
            for raw in split_entries(text):
                entry = clean(raw)
                if not entry:
                    continue
                reason = reject_reason(entry)
                if reason:
                    stats["rejected"][source][reason] += 1
                else:
                    candidates[lang].append((entry, source))

    # 2. language check, then deduplication
    lid = LanguageId({lang: [t for t, _ in entries] for lang, entries in candidates.items()})
    per_lang: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for lang, entries in sorted(candidates.items()):
        seen: set[str] = set()
        for entry, source in entries:
            if not language_ok(entry, lang, lid):
                reason = "language"
            elif dedup_key(entry) in seen:
                reason = "duplicate"
            else:
                seen.add(dedup_key(entry))
                per_lang[lang].append((entry, source))
                stats["kept_pool"][source] += 1
                continue
            stats["rejected"][source][reason] += 1

    outputs: dict[str, bytes] = {}
    for lang in sorted(per_lang):
        ranked = sorted(per_lang[lang], key=lambda e: (hashlib.sha256(e[0].encode("utf-8")).hexdigest(), e[1]))
        chosen, taken = [], Counter()
        for text, source in ranked:
            if taken[source] < MAX_PER_COLLECTION:
                chosen.append((text, source))
                taken[source] += 1
                if len(chosen) == MAX_PER_LANG:
                    break
        lines = [json.dumps({"text": t, "source": s}, ensure_ascii=False) + "\n" for t, s in chosen]
        outputs[f"{lang}.jsonl"] = "".join(lines).encode("utf-8")
        if verbose:
            n_chars = sum(len(t) for t, _ in chosen)
            by_source = Counter(s for _, s in chosen)
            print(
                f"{lang}: pool {len(per_lang[lang])}, kept {len(chosen)}, {n_chars} characters, "
                f"{len(outputs[f'{lang}.jsonl'])} bytes, from {len(by_source)} collections"
            )
    return outputs, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    ap.add_argument("--any-version", action="store_true", help="build from whatever package versions are installed")
    ap.add_argument("--stats", action="store_true", help="print per-collection counts of kept and rejected entries")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = ap.parse_args()

    bad = []
    for pkg, (_, want) in PACKAGES.items():
        have = installed_version(pkg)
        if have != want:
            bad.append(f"{pkg}: installed {have or 'nothing'}, built from {want}")
    if bad:
        print("package versions differ from the ones the corpus was built from:\n  " + "\n  ".join(bad), file=sys.stderr)
        if not args.any_version:
            print("install them (see the top of this script) or pass --any-version", file=sys.stderr)
            return 2

    outputs, stats = build()
    if args.stats:
        for source in sorted(set(stats["kept_pool"]) | set(stats["rejected"])):
            rej = ", ".join(f"{k} {v}" for k, v in sorted(stats["rejected"][source].items()))
            enc = stats["encodings"].get(source, "-")
            print(f"  {source:45s} {enc:7s} pool {stats['kept_pool'][source]:5d}  rejected: {rej}")

    if args.check:
        differ = []
        for name, data in outputs.items():
            path = args.out / name
            if not path.is_file() or path.read_bytes() != data:
                differ.append(name)
        extra = sorted(p.name for p in args.out.glob("*") if p.name not in outputs) if args.out.is_dir() else []
        if differ or extra:
            print(f"differs: {differ}; unexpected files: {extra}", file=sys.stderr)
            return 1
        print("up to date")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        tmp = args.out / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, args.out / name)
    print(f"wrote {', '.join(sorted(outputs))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
