"""The report's HTML comes from Jinja2 templates (lit_prune/study/report/templates), autoescaped."""

from lit_prune.study.report.render import Gallery, Heading, Para, page, table_html
from lit_prune.study.report.tables import Table


def test_verdicts_are_coloured_by_the_template_and_text_is_escaped():
    rows = [["a<b", "reproduced"], ["c", "not reproduced"], ["d", "partly"]]
    headline = Table("headline", "Headline", ["claim", "verdict"], rows)
    html = table_html(headline)
    assert '<td class="verdict-reproduced">reproduced</td>' in html and "<td>a&lt;b</td>" in html
    assert '<td class="verdict-not-reproduced">not reproduced</td>' in html
    other = table_html(Table("survival", "Survival", ["claim", "verdict"], rows))
    assert "verdict-" not in other  # only the headline's verdict column is coloured
    record = {
        "features": [
            {"feature": 3, "status": "lost", "dense": [{"left": "x\n", "token": "<b>", "right": ""}]}
        ]
    }
    doc = page("T & U", [Heading("Sec one"), Para("x & y"), headline, Gallery(record)], {})
    assert doc.startswith("<!DOCTYPE html>") and "<title>T &amp; U</title>" in doc
    assert '<li><a href="#sec-one">Sec one</a></li>' in doc and '<h2 id="sec-one">' in doc
    assert "<mark>&lt;b&gt;</mark>" in doc and "x⏎" in doc and "(does not fire on these sequences)" in doc
    assert doc.count('class="verdict-') == 3 and "<script" not in doc
