"""A data profile: what a corpus holds before training on it.

:func:`profile_documents` returns a JSON-ready dict (documents, characters, tokens and empty
documents, per source and overall; document lengths; exact duplicates; the readers' skipped and
repaired rows; a writing-system estimate per source), :func:`write_profile` saves it as
``profile.json`` and ``profile.png``, and :func:`format_profile` renders it for the terminal.

The *script* estimate is what it says: the share of letters per Unicode script (Latin, Cyrillic,
CJK, Arabic, ...) in a sample of each source, read from the Unicode character names, plus a rough
"English share" (documents in which common English words are frequent). It is a cheap,
dependency-free sanity check ("is this source the language I think it is?"), not language
identification: it cannot tell French from English, or Russian from Ukrainian.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dedup import UNNAMED_SOURCE, DedupStats, progress, source_key, text_digest
from .records import DataReport, Document, plural

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SAMPLE_DOCUMENTS = 256
"""Documents per source the script estimate reads (evenly spaced, deterministic)."""
SAMPLE_CHARS = 4000
"""Characters read from the start of each sampled document."""

# The word of a Unicode character name that names its script -> the name the profile reports.
_SCRIPTS = {
    "LATIN": "Latin", "GREEK": "Greek", "COPTIC": "Greek", "CYRILLIC": "Cyrillic",
    "ARMENIAN": "Armenian", "GEORGIAN": "Georgian", "HEBREW": "Hebrew", "ARABIC": "Arabic",
    "SYRIAC": "Syriac", "THAANA": "Thaana", "ETHIOPIC": "Ethiopic", "DEVANAGARI": "Devanagari",
    "BENGALI": "Bengali", "GURMUKHI": "Gurmukhi", "GUJARATI": "Gujarati", "ORIYA": "Oriya",
    "TAMIL": "Tamil", "TELUGU": "Telugu", "KANNADA": "Kannada", "MALAYALAM": "Malayalam",
    "SINHALA": "Sinhala", "THAI": "Thai", "LAO": "Lao", "TIBETAN": "Tibetan", "MYANMAR": "Myanmar",
    "KHMER": "Khmer", "MONGOLIAN": "Mongolian", "HANGUL": "Hangul",
    "CJK": "CJK", "HIRAGANA": "CJK", "KATAKANA": "CJK", "BOPOMOFO": "CJK",
}
# Very common English words: they make up ~40% of the words of ordinary English prose and few of
# them are common in other languages, so a document where they are >= 15% of the words is
# "English-like".
_ENGLISH = frozenset(
    "the of and to a in is it that was for on are with as he she be at by this have from or had not "
    "but what all were when we there can an which their said if do will each about how up out them "
    "then they so these would has been his her you i".split()
)
_ENGLISH_MIN_SHARE = 0.15
_PLOT_SOURCES = 20
_PLOT_BIN_LABELS = 24  # more histogram bins than this: every other bin label is shown
_PLOT_NAME_CHARS = 32  # longer source names are shortened in the plot
_LETTER_WORD = re.compile(r"[^\W\d_]+")


def profile_documents(
    docs: Sequence[Document],
    *,
    token_counts: Mapping[str, int] | None = None,
    report: DataReport | None = None,
    dedup: DedupStats | Mapping[str, Any] | None = None,
    duplicates_scan: bool = True,
) -> dict[str, Any]:
    """Profile a corpus.

    Args:
        docs: the documents (after dedup, when ``dedup`` is given).
        token_counts: tokens per source name (``""`` counts as ``"(unnamed)"``), when tokenized.
        report: the readers' report of skipped/repaired rows.
        dedup: statistics of a deduplication already run (a ``DedupStats`` or its ``to_dict()``);
            reported instead of a new scan.
        duplicates_scan: without ``dedup``, count exact duplicates (normalised-text hash, as
            ``dedup: exact`` would remove them); False skips the hashing.

    Returns:
        A JSON-ready dict: ``documents``, ``chars``, ``tokens`` (None without ``token_counts``),
        ``empty_documents`` (empty or whitespace-only), ``length_chars`` (``min``, ``median``,
        ``p90``, ``max``, and ``histogram`` ``{"edges", "counts"}`` with bins
        ``[edges[i], edges[i+1])`` on a 1-2-5 log scale, counts summing to ``documents``),
        ``sources`` (``{name: {documents, chars, tokens, empty_documents, script,
        english_share}}``), ``duplicates`` (None when neither scanned nor given) and ``issues``
        (None without ``report``).
    """
    lengths = np.zeros(len(docs), dtype=np.int64)
    sources: dict[str, dict[str, Any]] = defaultdict(lambda: {"documents": 0, "chars": 0, "empty_documents": 0})
    members: dict[str, list[int]] = defaultdict(list)
    seen: set[bytes] = set()
    duplicates = 0
    scan = dedup is None and duplicates_scan
    for i, doc in enumerate(progress(docs, "profile")):
        key = source_key(doc)
        entry = sources[key]
        lengths[i] = len(doc.text)
        entry["documents"] += 1
        entry["chars"] += len(doc.text)
        entry["empty_documents"] += not doc.text.strip()
        members[key].append(i)
        if scan:
            digest = text_digest(doc.text)
            duplicates += digest in seen
            seen.add(digest)

    tokens = None
    if token_counts is not None:
        by_source: Counter[str] = Counter()
        for name, count in token_counts.items():
            by_source[name or UNNAMED_SOURCE] += int(count)
        for name, count in by_source.items():
            sources[name]["tokens"] = count  # a source only tokenized still appears
        tokens = sum(by_source.values())
    for name, entry in sources.items():
        entry.setdefault("tokens", None if token_counts is None else 0)
        sample = [docs[i].text[:SAMPLE_CHARS] for i in _evenly_spaced(members[name], SAMPLE_DOCUMENTS)]
        entry.update(script_profile(sample))

    if dedup is not None:
        stats = dedup.to_dict() if isinstance(dedup, DedupStats) else dict(dedup)
        dup_info: dict[str, Any] | None = {"method": f"dedup ({stats['mode']})", **stats}
    elif scan:
        dup_info = {"method": "exact hash scan", "exact_duplicates": duplicates}
    else:
        dup_info = None

    return {
        "documents": len(docs),
        "chars": int(lengths.sum()),
        "tokens": tokens,
        "empty_documents": sum(entry["empty_documents"] for entry in sources.values()),
        "length_chars": length_stats(lengths),
        "sources": {name: sources[name] for name in sorted(sources)},
        "duplicates": dup_info,
        "issues": None if report is None else {"total": report.total(), "by_source": report.to_dict()},
    }


def _evenly_spaced(items: list[int], count: int) -> list[int]:
    """At most ``count`` items spread evenly over ``items`` (all of them when fewer)."""
    if len(items) <= count:
        return items
    step = len(items) / count
    return [items[int(k * step)] for k in range(count)]


def length_stats(lengths: np.ndarray) -> dict[str, Any]:
    """Summary and log-scale histogram of document lengths.

    Args:
        lengths: ``(N,)`` document lengths (characters).

    Returns:
        ``{"min", "median", "p90", "max", "histogram": {"edges", "counts"}}``; bins are
        ``[edges[i], edges[i+1])`` with edges ``0, 1, 2, 5, 10, 20, 50, ...`` up to the first edge
        above the longest document; ``sum(counts) == N``. The statistics are None when ``N == 0``.
    """
    edges = [0, 1]
    top = int(lengths.max()) if len(lengths) else 0
    while edges[-1] <= top:
        edges.append(edges[-1] * 5 // 2 if str(edges[-1])[0] == "2" else edges[-1] * 2)
    counts = np.bincount(np.searchsorted(edges, lengths, side="right") - 1, minlength=len(edges) - 1)
    stats: dict[str, Any] = {"min": None, "median": None, "p90": None, "max": None}
    if len(lengths):
        stats = {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "max": top,
        }
    return {**stats, "histogram": {"edges": edges, "counts": [int(c) for c in counts]}}


def script_profile(texts: Sequence[str]) -> dict[str, Any]:
    """Writing systems of a sample of texts (a heuristic, not language identification).

    Args:
        texts: the sampled texts.

    Returns:
        ``{"script": {name: share of letters}, "letters_sampled": n, "english_share": share}``:
        script shares (4 decimals, summing to ~1; letters of no listed script count as
        ``"Other"``) come from the script word in each letter's Unicode name (``CYRILLIC SMALL
        LETTER A`` → Cyrillic; Han and kana are ``CJK``). ``english_share`` is the share of texts
        with words in which >= 15% of the words are very common English words (None when no text
        has words).
    """
    chars: Counter[str] = Counter()
    for text in texts:
        chars.update(unicodedata.normalize("NFC", text))  # counted in C; classified once per character
    by_script: Counter[str] = Counter()
    for ch, count in chars.items():
        if ch.isalpha():
            by_script[_script_of(ch)] += count
    total = sum(by_script.values())
    script = {name: round(count / total, 4) for name, count in by_script.most_common()} if total else {}

    english = with_words = 0
    for text in texts:
        found = _LETTER_WORD.findall(text.lower())
        if found:
            with_words += 1
            english += sum(w in _ENGLISH for w in found) >= _ENGLISH_MIN_SHARE * len(found)
    return {
        "script": script,
        "letters_sampled": total,
        "english_share": round(english / with_words, 4) if with_words else None,
    }


def _script_of(ch: str) -> str:
    for word in unicodedata.name(ch, "").split():  # "FULLWIDTH LATIN CAPITAL LETTER A" is Latin
        if word in _SCRIPTS:
            return _SCRIPTS[word]
    return "Other"


def write_profile(profile: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Save a profile as ``profile.json`` (sorted keys, indented) and ``profile.png``.

    The figure is drawn with matplotlib's object API on an Agg canvas, so it neither needs a
    display nor touches pyplot's global state.

    Args:
        profile: a dict from :func:`profile_documents`.
        out_dir: folder to write into (created when missing).

    Returns:
        The paths of the JSON file and the PNG.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "profile.json", out_dir / "profile.png"
    json_path.write_text(json.dumps(profile, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _plot(profile).savefig(png_path, dpi=100)
    return json_path, png_path


def _plot(profile: Mapping[str, Any]) -> Figure:
    """Length histogram, documents per source, tokens (else characters) per source.

    No two labels overlap: the histogram's bin labels stand vertical (every other one is shown
    past :data:`_PLOT_BIN_LABELS` bins), long source names are shortened, the count axes use
    compact numbers (``2.5M``) with at most a few ticks, and the layout is constrained.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    sources = profile["sources"]
    names = sorted(sources, key=lambda n: -sources[n]["documents"])[:_PLOT_SOURCES][::-1]  # largest on top
    has_tokens = profile.get("tokens") is not None
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)  # room between the panels for the edge tick labels
    FigureCanvasAgg(fig)
    hist_ax, docs_ax, size_ax = fig.subplots(1, 3, width_ratios=(2, 1, 1))
    compact = FuncFormatter(lambda value, _pos: _compact(value))

    histogram = profile["length_chars"]["histogram"]
    edges = histogram["edges"]
    labels = ["0"] + [f"{_compact(lo)}–{_compact(hi)}" for lo, hi in zip(edges[1:-1], edges[2:])]  # [lo, hi)
    every = 1 if len(labels) <= _PLOT_BIN_LABELS else -(-len(labels) // _PLOT_BIN_LABELS)
    hist_ax.bar(range(len(labels)), histogram["counts"], color="tab:blue")
    hist_ax.set_xticks(range(len(labels)), [label if i % every == 0 else "" for i, label in enumerate(labels)],
                       rotation=90, fontsize=8)
    hist_ax.set(title="Document length (characters)", ylabel="documents")
    hist_ax.yaxis.set_major_formatter(compact)

    shown = [_shorten(n, _PLOT_NAME_CHARS) for n in names]
    docs_ax.barh(range(len(names)), [sources[n]["documents"] for n in names], color="tab:green")
    docs_ax.set_yticks(range(len(names)), shown, fontsize=8 if len(names) > 10 else None)
    docs_ax.set(title="Documents per source")
    size_key = "tokens" if has_tokens else "chars"
    size_ax.barh(range(len(names)), [sources[n][size_key] or 0 for n in names], color="tab:orange")
    size_ax.set(title=f"{size_key.capitalize()} per source")
    size_ax.set_yticks(range(len(names)), [""] * len(names))
    for ax in (docs_ax, size_ax):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.xaxis.set_major_formatter(compact)
    fig.suptitle(f"{plural(profile['documents'], 'document')}, {_compact(profile['chars'])} characters"
                 + (f", {_compact(profile['tokens'])} tokens" if has_tokens else ""))
    return fig


def _shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the middle replaced by ``…`` (ends kept: they tell
    sources apart)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def format_profile(profile: Mapping[str, Any]) -> str:
    """A short human-readable summary of a profile: totals, lengths and one row per source.

    Args:
        profile: a dict from :func:`profile_documents`.

    Returns:
        Lines joined by newlines, no trailing newline.
    """
    tokens = profile.get("tokens")
    length = profile["length_chars"]
    dup = profile.get("duplicates")
    head = (f"documents {profile['documents']:,}   chars {_compact(profile['chars'])}"
            + (f"   tokens {_compact(tokens)}" if tokens is not None else "")
            + f"   empty {profile['empty_documents']:,}")
    if dup is not None and "exact_duplicates" in dup:
        head += f"   exact duplicates {dup['exact_duplicates']:,}"
    elif dup is not None:
        head += f"   removed by dedup ({dup['mode']}) {dup['exact_removed']:,} exact + {dup['near_removed']:,} near"
    lines = [head]
    if length["median"] is not None:
        lines.append(f"length (chars): min {length['min']:,}  median {length['median']:,.0f}  "
                     f"p90 {length['p90']:,.0f}  max {length['max']:,}")
    width = max([len("source")] + [len(n) for n in profile["sources"]])
    lines.append(f"{'source':<{width}}  {'docs':>9}  {'chars':>8}  {'tokens':>8}  script")
    for name, entry in profile["sources"].items():
        script = ", ".join(f"{s} {share:.0%}" for s, share in list(entry["script"].items())[:3]) or "-"
        if entry["english_share"] is not None:
            script += f"; English-like {entry['english_share']:.0%}"
        tok = _compact(entry["tokens"]) if entry["tokens"] is not None else "-"
        lines.append(f"{name:<{width}}  {entry['documents']:>9,}  {_compact(entry['chars']):>8}  {tok:>8}  {script}")
    issues = profile.get("issues")
    if issues and issues["total"]:
        lines.append(f"reader issues ({issues['total']:,}):")
        for source, kinds in issues["by_source"].items():
            lines.extend(f"  {source}: {count:,} {kind}" for kind, count in kinds.items())
    return "\n".join(lines)


def _compact(n: float) -> str:
    """``950``, ``12.3k``, ``4.5M``, ``1.2B``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"
