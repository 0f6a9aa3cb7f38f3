"""Tests of bigbatch.tools."""
