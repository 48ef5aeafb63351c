"""Reports made from the store's :class:`~mailer.store.records.Report`: the HTML page of ``mailer report --html``."""

from __future__ import annotations

from .engagement import Engagement, LinkClicks, engagement_of
from .html import render_report_html, write_report_html

__all__ = ["Engagement", "LinkClicks", "engagement_of", "render_report_html", "write_report_html"]
