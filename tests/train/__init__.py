"""Tests of bigbatch.train."""
