"""How the order list's count reads (console/templates/_order_list.html): exact, capped at
LIST_COUNT_CAP ("1,000+": more truly match), or stopped on its budget ("at least 206": a
product filter's count, issue 13), which an operator read as "a bit over 206" when it said
"206+"."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from console.order_list import OrderFilters
from console.web import templates


def _head(count: tuple[int, bool], partial: bool) -> str:
    html = templates().get_template("_order_list.html").render(
        f=OrderFilters(product="common"), after=None, before=None, error=None,
        operator=SimpleNamespace(may_act=False),
        list={"orders": [], "count": count, "partial": partial, "more_after": False,
              "more_before": False, "first_id": None, "last_id": None})
    head = re.search(r'<div class="listhead">(.*?)</div>', html, re.S)
    assert head is not None
    text = re.sub(r"<[^>]+>", "", head.group(1)).split("oldest first")[0]
    return " ".join(text.split())


@pytest.mark.parametrize(("count", "partial", "text"), [
    ((769, False), False, "769 orders match"),
    ((1, False), False, "1 order matches"),
    ((0, False), False, "0 orders match"),
    # Not exact: the exact count follows by itself (partial) or on a click (capped).
    ((1_000, True), False, "1,000+ orders match count them all"),
    ((206, True), True, "at least 206 orders match (counting them all…)"),
    ((1, True), True, "at least 1 order matches (counting them all…)"),
])
def test_the_count_says_whether_it_is_exact_capped_or_stopped_early(
        count: tuple[int, bool], partial: bool, text: str) -> None:
    assert _head(count, partial) == text
