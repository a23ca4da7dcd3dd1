"""Showing what AGD did: terminal rendering (rich) and HTML reports."""
