"""The data profile: exact numbers on a tiny corpus, the written files, the script estimate."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.font_manager  # noqa: F401
import pytest

from Ava.data.dedup import dedup_documents
from Ava.data.profile import format_profile, profile_documents, script_profile, write_profile
from Ava.data.records import DataReport, Document

# Imported above, at collection: a first import builds matplotlib's font list with `fc-list`, a
# subprocess, which the data tests' autouse fixture refuses.


def _doc(name: str, text: str, source: str = "") -> Document:
    return Document(name=name, text=text, source=f"/data/{name}", source_name=source)


@pytest.fixture
def corpus() -> list[Document]:
    return [
        _doc("w1", "the cat sat on the mat", "web"),          # 22 chars
        _doc("w2", "the cat sat on the mat", "web"),          # exact duplicate
        _doc("w3", "  the cat  sat on the mat ", "web"),      # 26 chars, whitespace duplicate
        _doc("w4", "", "web"),                                # empty
        _doc("r1", "Привет мир", "ru"),                       # 10 chars
        _doc("r2", "   ", "ru"),                              # whitespace-only, a duplicate of w4
        _doc("u1", "x" * 1500),                               # no source name
    ]


def test_profile_numbers_on_a_known_corpus(corpus):
    profile = profile_documents(corpus, token_counts={"web": 24, "ru": 5, "": 300})
    assert (profile["documents"], profile["chars"], profile["tokens"]) == (7, 1583, 329)
    assert profile["empty_documents"] == 2
    assert profile["duplicates"] == {"method": "exact hash scan", "exact_duplicates": 3}
    assert profile["issues"] is None

    length = profile["length_chars"]
    assert (length["min"], length["median"], length["max"]) == (0, 22.0, 1500)
    assert length["p90"] == pytest.approx(26 + 0.4 * (1500 - 26))
    assert length["histogram"]["edges"] == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert length["histogram"]["counts"] == [1, 0, 1, 0, 1, 3, 0, 0, 0, 0, 1]
    assert sum(length["histogram"]["counts"]) == profile["documents"]

    sources = profile["sources"]
    assert list(sources) == ["(unnamed)", "ru", "web"]
    counts = {name: (s["documents"], s["chars"], s["tokens"], s["empty_documents"]) for name, s in sources.items()}
    assert counts == {"(unnamed)": (1, 1500, 300, 0), "ru": (2, 13, 5, 1), "web": (4, 70, 24, 1)}


def test_profile_without_tokens_and_with_dedup_stats_or_no_scan(corpus):
    profile = profile_documents(corpus, duplicates_scan=False)
    assert profile["tokens"] is None and profile["duplicates"] is None
    assert all(s["tokens"] is None for s in profile["sources"].values())

    kept, stats = dedup_documents(corpus, "exact")
    profile = profile_documents(kept, dedup=stats)
    assert profile["documents"] == 4
    assert profile["duplicates"]["method"] == "dedup (exact)"
    assert profile["duplicates"]["exact_removed"] == 3
    assert profile["duplicates"]["removed_by_source"] == {"ru": 1, "web": 2}
    assert "removed by dedup (exact) 3 exact + 0 near" in format_profile(profile).splitlines()[0]
    assert profile_documents(kept, dedup=stats.to_dict()) == profile  # the dict pipeline stats hold


def test_profile_reports_reader_issues_and_tokenized_only_sources(corpus):
    report = DataReport()
    report.add("web", "skipped rows (malformed row)", "web.jsonl:3")
    report.add("web", "replaced chars", "web.jsonl:9", count=4)
    profile = profile_documents(corpus, token_counts={"web": 24, "books": 7}, report=report)
    assert profile["issues"] == {
        "total": 5, "by_source": {"web": {"replaced chars": 4, "skipped rows (malformed row)": 1}},
    }
    assert profile["sources"]["books"]["documents"] == 0 and profile["sources"]["books"]["tokens"] == 7
    assert profile["sources"]["ru"]["tokens"] == 0
    text = format_profile(profile)
    assert "reader issues (5)" in text and "web: 4 replaced chars" in text


def test_script_estimate_tells_cyrillic_from_latin_and_english():
    english = ["The quick brown fox jumps over the lazy dog, and it was happy with that."] * 3
    russian = ["Съешь же ещё этих мягких французских булок, да выпей чаю."] * 3
    german = ["Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich."]
    assert script_profile(english)["script"] == {"Latin": 1.0}
    assert script_profile(english)["english_share"] == 1.0
    assert script_profile(russian)["script"] == {"Cyrillic": 1.0}
    assert script_profile(russian)["english_share"] == 0.0
    assert script_profile(german)["script"] == {"Latin": 1.0}
    assert script_profile(german)["english_share"] == 0.0
    mixed = script_profile(["abc", "где", "中文字"])
    third = pytest.approx(1 / 3, abs=1e-4)
    assert mixed["script"] == {"CJK": third, "Cyrillic": third, "Latin": third}
    assert mixed["letters_sampled"] == 9
    assert script_profile(["", "123 !!"]) == {"script": {}, "letters_sampled": 0, "english_share": None}

    profile = profile_documents([_doc("e", english[0], "en"), _doc("r", russian[0], "ru")])
    assert profile["sources"]["en"]["script"] == {"Latin": 1.0}
    assert profile["sources"]["ru"]["script"] == {"Cyrillic": 1.0}


def test_write_profile_writes_json_and_png(corpus, tmp_path: Path):
    profile = profile_documents(corpus, token_counts={"web": 24, "ru": 5, "": 300})
    json_path, png_path = write_profile(profile, tmp_path / "out")
    assert (json_path.name, png_path.name) == ("profile.json", "profile.png")
    text = json_path.read_text(encoding="utf-8")
    assert json.loads(text) == profile
    assert text.index('"chars"') < text.index('"documents"') < text.index('"sources"')  # sorted keys
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_empty_corpus_profiles_and_writes(tmp_path: Path):
    profile = profile_documents([])
    assert (profile["documents"], profile["chars"], profile["sources"]) == (0, 0, {})
    assert profile["length_chars"]["histogram"] == {"edges": [0, 1], "counts": [0]}
    assert profile["length_chars"]["median"] is None
    _, png_path = write_profile(profile, tmp_path)
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert format_profile(profile).startswith("documents 0")


def test_format_profile_is_a_short_table(corpus):
    text = format_profile(profile_documents(corpus, token_counts={"web": 24, "ru": 5, "": 300}))
    lines = text.splitlines()
    assert lines[0] == "documents 7   chars 1.58k   tokens 329   empty 2   exact duplicates 3"
    assert lines[1] == "length (chars): min 0  median 22  p90 616  max 1,500"
    web = next(line for line in lines if line.startswith("web"))
    assert web.split()[:4] == ["web", "4", "70", "24"] and "Latin 100%" in web
    assert any(line.startswith("ru") and "Cyrillic 100%" in line for line in lines)


def _overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of visible texts (tick labels, axis labels, titles) whose drawn boxes overlap."""
    import itertools

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for i, ax in enumerate(fig.axes):
        texts = [ax.xaxis.label, ax.yaxis.label, ax.title, ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
        for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            texts += [tick.label1 for tick in axis.get_major_ticks()  # the ticks drawn: inside the limits
                      if min(low, high) <= tick.get_loc() <= max(low, high)]
        boxes += [(f"axes {i}: {t.get_text()!r}", t.get_window_extent(renderer))
                  for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


def test_profile_plot_labels_do_not_overlap():
    """Documents up to millions of characters (22 length bins), long source names and counts in
    the millions: after layout, no two labels of the figure overlap."""
    from Ava.data.profile import _plot

    lengths = [0, 3, 40, 700, 9_000, 60_000, 450_000, 3_000_000] * 3
    docs = [_doc(f"d{i}", "x" * n, f"source_with_a_rather_long_descriptive_name_{i % 7}") for i, n in enumerate(lengths)]
    profile = profile_documents(docs, duplicates_scan=False)
    for i, entry in enumerate(profile["sources"].values()):
        entry["documents"], entry["chars"] = 1_234_567 * (i + 1), 987_654_321_000 * (i + 1)
    assert len(profile["length_chars"]["histogram"]["counts"]) > 20
    fig = _plot(profile)
    assert _overlapping_labels(fig) == []
    hist_ax = fig.axes[0]
    assert [t.get_text() for t in hist_ax.get_xticklabels()][:3] == ["0", "1–2", "2–5"]
