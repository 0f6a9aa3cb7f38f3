"""Tests of bigbatch.recipes."""
