"""Tests of bigbatch.data."""
