"""Showing what AGD did: terminal rendering (rich), the HTML report, and the style all reports and plots share."""
